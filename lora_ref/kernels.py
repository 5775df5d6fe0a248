r"""Fused GPU fast paths for QLoRA: a Triton NF4 dequantiser, a lean 4-bit+LoRA linear, a chunked loss.

Never the teaching path: ``lora_ref.quant.dequantize_4bit`` is the readable version, and every function
here is tested against it. On a machine without CUDA/Triton everything falls back to plain torch, so the
same code runs (slowly) on the course's CPU machines.

1. :func:`dequantize_4bit`: one Triton kernel reads bitsandbytes' packed format (uint8, two codes per
   byte, high nibble first; one absmax per block, or with double quantisation an 8-bit code per block
   decoded as ``code2[q] * absmax2[b // 256] + offset``) and writes the 16-bit weight, so every byte is
   read once and every value written once::

        w[2i]   = code[byte_i >> 4]   * absmax[(2i)   // blocksize]
        w[2i+1] = code[byte_i & 0xF]  * absmax[(2i+1) // blocksize]

   It moves n/2 + 2n bytes for n bf16 weights (the floor: 113 MB for 11008x4096, 26 us at 4.3 TB/s).
   The arithmetic is that of bitsandbytes (fp32 products rounded once to the output dtype, no fused
   multiply-add in the absmax decode), so the values are bit-identical.

2. :class:`LoRA4bitFunction` / :func:`qlora_linear`: the frozen NF4 weight plus a LoRA branch in one
   autograd node (QLoRA paper, arXiv 2305.14314, Section 3, eq. 5-6: Y = X dDequant(W) + s X A^T B^T in
   bf16). It saves only the 16-bit input X and the rank-r product X A^T for backward (the 4-bit weight is
   not a saved activation: it is dequantised again in backward into a shared scratch buffer), so no fp32
   copy of X per adapter (what PEFT's fp32 adapters cost) and no dequantised weight outlives its matmul.

3. :func:`chunked_cross_entropy`: next-token loss from hidden states and the lm_head weight, chunk by
   chunk, recomputing each chunk's logits in backward: no (tokens x vocab) fp32 logits exist at once
   (12 * tokens * vocab bytes in the usual path; see ``lora_ref.memory.activation_bytes``).

Measured on one H200 (benchmarks/README.md): the dequantiser runs the 11008x4096 weight in 0.063 ms
(1.5x bitsandbytes in the same run, bit-identical); a Llama-2-7B QLoRA step (4 x 512 tokens, r=16 on
all 7 projections, gradient checkpointing) peaks at 5.50 GB against the recipe's 6.86 GB (25.9 GB
without checkpointing) at 1.1-1.4x its speed. The step is bound by kernel launches on the CPU,
not by the GPU.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_ref._checks import as_int
from lora_ref.lora import lora_scaling, set_submodule

try:  # Triton ships with CUDA builds of torch; the CPU machines of the course have none.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (a CUDA device and Triton installed)."""
    if not HAS_TRITON or not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


# ----------------------------------------------------------------------------------------------------
# What the kernel needs from a QuantState (lora_ref.quant.QuantState or bitsandbytes' QuantState)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NF4Layout:
    """The flat tensors of a 4-bit state, on one device, ready for a kernel launch.

    absmax: (n_blocks,) fp32, or uint8 codes when ``nested``; code: (16,) fp32; when nested: absmax2
    (n_blocks2,) fp32, code2 (256,) fp32, blocksize2 and the fp32 ``offset``.
    """

    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    code: torch.Tensor
    nested: bool = False
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: float = 0.0
    pairs: torch.Tensor | None = None      # (256,) int64: fp32 code[i >> 4] in the low, code[i & 15] in the high half

    def to(self, device: torch.device | str) -> "NF4Layout":
        """The same layout with every tensor on ``device``."""
        from dataclasses import replace
        mv = lambda t: None if t is None else t.to(device)          # noqa: E731
        return replace(self, absmax=mv(self.absmax), code=mv(self.code), absmax2=mv(self.absmax2),
                       code2=mv(self.code2), pairs=mv(self.pairs))

    def pair_table(self) -> torch.Tensor:
        """The 256-entry table of (code[hi], code[lo]) fp32 pairs as int64, built once on first use."""
        if self.pairs is None:
            i = torch.arange(256, device=self.code.device)
            pair = torch.stack((self.code[i >> 4], self.code[i & 15]), dim=1).contiguous()   # (256, 2) fp32
            object.__setattr__(self, "pairs", pair.view(torch.int64).reshape(256))
        return self.pairs


_LAYOUTS: dict[int, tuple] = {}


def _layout_key(state) -> tuple:
    s2 = getattr(state, "state2", None)
    off = getattr(state, "offset", None)
    off = float(off.item() if isinstance(off, torch.Tensor) else off) if s2 is not None else None
    return (id(state.code), None if s2 is None else id(s2.absmax), None if s2 is None else id(s2.code),
            off, int(state.blocksize), tuple(int(d) for d in state.shape), state.dtype)


def layout_of(state, device: torch.device | str | None = None) -> NF4Layout:
    """Read a ``lora_ref.quant.QuantState`` (or a ``bitsandbytes.functional.QuantState``) into a layout.

    Cached by the identity of the state's tensors (absmax, code, nested absmax and code) while they
    live: a model dequantises the same weights every step, and a layer may build a fresh QuantState
    object over the same buffers on every forward (``lora_ref.qlora.Linear4bit.quant_state``).
    """
    dev = torch.device(device) if device is not None else state.absmax.device
    key = _layout_key(state)
    hit = _LAYOUTS.get(id(state.absmax))
    if hit is not None and hit[0]() is state.absmax and hit[1] == key and hit[2].absmax.device == dev:
        return hit[2]
    lay = _layout_of(state, dev)
    if state.absmax.device == dev:
        ident = id(state.absmax)
        ref = weakref.ref(state.absmax, lambda _r, k=ident: _LAYOUTS.pop(k, None))
        _LAYOUTS[ident] = (ref, key, lay)
    return lay


def _layout_of(state, dev: torch.device) -> NF4Layout:
    shape = tuple(int(s) for s in state.shape)
    if state.blocksize % 2:
        raise ValueError(f"blocksize={state.blocksize} must be even (two codes per byte share a block)")
    code = state.code.to(dev, torch.float32).contiguous()
    if code.numel() != 16:
        raise ValueError(f"a 4-bit state has a 16-level code, got {code.numel()} levels "
                         f"(quant_type={getattr(state, 'quant_type', '?')!r})")
    nested = getattr(state, "state2", None) is not None
    if not nested:
        return NF4Layout(math.prod(shape), shape, state.dtype, int(state.blocksize),
                         state.absmax.to(dev, torch.float32).contiguous(), code)
    s2 = state.state2
    offset = state.offset
    offset = float(offset.item() if isinstance(offset, torch.Tensor) else offset)
    return NF4Layout(math.prod(shape), shape, state.dtype, int(state.blocksize),
                     state.absmax.to(dev).contiguous(), code, True,
                     s2.absmax.to(dev, torch.float32).contiguous(), s2.code.to(dev, torch.float32).contiguous(),
                     int(s2.blocksize), offset)


# ----------------------------------------------------------------------------------------------------
# Plain torch (CPU fallback, and the function torch.compile fuses)
# ----------------------------------------------------------------------------------------------------

def _block_scales_torch(lay: NF4Layout) -> torch.Tensor:
    if not lay.nested:
        return lay.absmax
    q = lay.code2[lay.absmax.long()]                                       # (n_blocks,)
    nb = q.numel()
    pad = (-nb) % lay.blocksize2
    scaled = (F.pad(q, (0, pad)).view(-1, lay.blocksize2) * lay.absmax2.unsqueeze(1)).reshape(-1)[:nb]
    return scaled + lay.offset


def dequantize_4bit_torch(packed: torch.Tensor, lay: NF4Layout, dtype: torch.dtype) -> torch.Tensor:
    """Vectorised torch: unpack nibbles, gather levels, multiply by the per-block scale (fp32), cast."""
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)[: lay.numel].long()
    vals = lay.code[codes]
    scales = _block_scales_torch(lay)
    pad = (-lay.numel) % lay.blocksize
    out = (F.pad(vals, (0, pad)).view(-1, lay.blocksize) * scales.unsqueeze(1)).reshape(-1)[: lay.numel]
    return out.to(dtype).reshape(lay.shape)


_compiled = None


def dequantize_4bit_compiled(packed: torch.Tensor, lay: NF4Layout, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_4bit_torch` under ``torch.compile`` (Inductor writes one fused kernel)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(dequantize_4bit_torch, dynamic=False)
    return _compiled(packed, lay, dtype)


# ----------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, mask,
                     BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
        """The absmax of quantisation blocks ``blk``: stored as is, or (double quantisation, QLoRA
        Section 3) an 8-bit code into ``code2`` times its second-level absmax, plus the mean ``offset``."""
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * a2
            scale = scale + offset                                        # two roundings, like bitsandbytes
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_out,
                             absmax2_ptr, code2_ptr, offset,
                             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                             BYTES: tl.constexpr, SELECT: tl.constexpr):
        """One program decodes BYTES packed bytes into 2*BYTES values."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BYTES + tl.arange(0, BYTES)                          # byte indices
        n_bytes = (n_out + 1) // 2
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi = b >> 4
        lo = b & 15
        blk = (offs * 2) // BLOCKSIZE                                     # 2i and 2i+1 share a block
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, mask, BLOCKSIZE2, NESTED)
        if SELECT:
            # 16 levels held in registers, picked by a 4-level select tree on the code bits
            c0 = tl.load(code_ptr + 0); c1 = tl.load(code_ptr + 1); c2 = tl.load(code_ptr + 2)
            c3 = tl.load(code_ptr + 3); c4 = tl.load(code_ptr + 4); c5 = tl.load(code_ptr + 5)
            c6 = tl.load(code_ptr + 6); c7 = tl.load(code_ptr + 7); c8 = tl.load(code_ptr + 8)
            c9 = tl.load(code_ptr + 9); c10 = tl.load(code_ptr + 10); c11 = tl.load(code_ptr + 11)
            c12 = tl.load(code_ptr + 12); c13 = tl.load(code_ptr + 13); c14 = tl.load(code_ptr + 14)
            c15 = tl.load(code_ptr + 15)
            vh = _select16(hi, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
            vl = _select16(lo, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
        else:
            vh = tl.load(code_ptr + hi)                                   # 64-byte table: an L1 hit
            vl = tl.load(code_ptr + lo)
        out = tl.interleave(vh * scale, vl * scale)                       # (2*BYTES,): hi, lo, hi, lo...
        out_offs = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_offs < n_out)

    @triton.jit
    def _select16(k, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
        b0 = (k & 1) != 0
        b1 = (k & 2) != 0
        b2 = (k & 4) != 0
        b3 = (k & 8) != 0
        v01 = tl.where(b0, c1, c0); v23 = tl.where(b0, c3, c2)
        v45 = tl.where(b0, c5, c4); v67 = tl.where(b0, c7, c6)
        v89 = tl.where(b0, c9, c8); vab = tl.where(b0, c11, c10)
        vcd = tl.where(b0, c13, c12); vef = tl.where(b0, c15, c14)
        v03 = tl.where(b1, v23, v01); v47 = tl.where(b1, v67, v45)
        v8b = tl.where(b1, vab, v89); vcf = tl.where(b1, vef, vcd)
        v07 = tl.where(b2, v47, v03); v8f = tl.where(b2, vcf, v8b)
        return tl.where(b3, v8f, v07)


    @triton.jit
    def _dequant_4bit_tiled_kernel(packed_ptr, absmax_ptr, code_ptr, pair_ptr, out_ptr, n_out,
                                   absmax2_ptr, code2_ptr, offset,
                                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                                   ROWS: tl.constexpr, PAIR: tl.constexpr):
        """One program decodes ROWS quantisation blocks: a (ROWS, BLOCKSIZE/2) tile of bytes, one scale
        per row (loaded and decoded once per block, not once per byte)."""
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid = tl.program_id(0).to(tl.int64)
        blk = pid * ROWS + tl.arange(0, ROWS)                             # (ROWS,) block ids
        n_blocks = (n_out + BLOCKSIZE - 1) // BLOCKSIZE
        bmask = blk < n_blocks
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, bmask, BLOCKSIZE2, NESTED)
        offs = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]          # (ROWS, HALF) byte offsets
        n_bytes = (n_out + 1) // 2
        b = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int32)
        if PAIR:
            # one 8-byte gather per byte from a 256-entry table of (code[hi], code[lo]) pairs
            v = tl.load(pair_ptr + b)                                     # int64
            vh = (v & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            vl = ((v >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        else:
            vh = tl.load(code_ptr + (b >> 4))
            vl = tl.load(code_ptr + (b & 15))
        sc = scale[:, None]
        out = tl.interleave(vh * sc, vl * sc)                             # (ROWS, BLOCKSIZE)
        out_offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_offs < n_out)


    @triton.jit
    def _dequant_4bit_outmajor_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_out,
                                      absmax2_ptr, code2_ptr, offset,
                                      BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                                      ROWS: tl.constexpr):
        """Output-major: a (ROWS, BLOCKSIZE) tile of *outputs*, each lane reading its byte (two lanes share
        one, an L1 hit) and shifting out its nibble: contiguous 16-byte stores, no interleave shuffle."""
        pid = tl.program_id(0).to(tl.int64)
        blk = pid * ROWS + tl.arange(0, ROWS)
        n_blocks = (n_out + BLOCKSIZE - 1) // BLOCKSIZE
        bmask = blk < n_blocks
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, bmask, BLOCKSIZE2, NESTED)
        j = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]     # (ROWS, BLOCKSIZE) outputs
        m = j < n_out
        b = tl.load(packed_ptr + (j >> 1), mask=m, other=0).to(tl.int32)
        nib = (b >> (4 - 4 * (j & 1)).to(tl.int32)) & 15                    # even j: high nibble
        v = tl.load(code_ptr + nib)
        tl.store(out_ptr + j, (v * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m)


# launch parameters, tuned on an H200 by benchmarks/dequant_speed.py (see benchmarks/results/)
# (H200, 2026-11-28, 11008x4096: tiled/2048 bytes/4 warps/code gather 0.077 ms, 1.60x bitsandbytes' 0.124 ms)
TRITON_CONFIG = {"kernel": "tiled", "BYTES": 2048, "num_warps": 4, "SELECT": False, "PAIR": False}


def dequantize_4bit_triton(packed: torch.Tensor, lay: NF4Layout, dtype: torch.dtype,
                           out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """The Triton kernel; ``out`` (any shape with ``numel`` elements of ``dtype``) is written in place."""
    if not triton_available(packed.device):
        raise RuntimeError("the Triton dequantiser needs a CUDA device and Triton; use dequantize_4bit()")
    cfg = {**TRITON_CONFIG, **config}
    if out is None:
        out = torch.empty(lay.shape, dtype=dtype, device=packed.device)
    elif out.numel() < lay.numel or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of >= {lay.numel} elements, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if lay.numel == 0:
        return out
    a2 = lay.absmax2 if lay.nested else lay.absmax
    c2 = lay.code2 if lay.nested else lay.code
    if cfg["kernel"] == "outmajor":
        rows = max(1, cfg["BYTES"] // (lay.blocksize // 2))
        grid = (triton.cdiv(-(-lay.numel // lay.blocksize), rows),)
        _dequant_4bit_outmajor_kernel[grid](packed, lay.absmax, lay.code, out, lay.numel, a2, c2,
                                            float(lay.offset), BLOCKSIZE=lay.blocksize,
                                            BLOCKSIZE2=lay.blocksize2, NESTED=lay.nested, ROWS=rows,
                                            num_warps=cfg["num_warps"], enable_fp_fusion=False)
    elif cfg["kernel"] == "tiled":
        rows = max(1, cfg["BYTES"] // (lay.blocksize // 2))
        grid = (triton.cdiv(-(-lay.numel // lay.blocksize), rows),)
        pairs = lay.pair_table() if cfg["PAIR"] else lay.code
        _dequant_4bit_tiled_kernel[grid](packed, lay.absmax, lay.code, pairs, out, lay.numel, a2, c2,
                                         float(lay.offset), BLOCKSIZE=lay.blocksize, BLOCKSIZE2=lay.blocksize2,
                                         NESTED=lay.nested, ROWS=rows, PAIR=cfg["PAIR"],
                                         num_warps=cfg["num_warps"], enable_fp_fusion=False)
    else:
        grid = (triton.cdiv(-(-lay.numel // 2), cfg["BYTES"]),)
        _dequant_4bit_kernel[grid](packed, lay.absmax, lay.code, out, lay.numel, a2, c2, float(lay.offset),
                                   BLOCKSIZE=lay.blocksize, BLOCKSIZE2=lay.blocksize2, NESTED=lay.nested,
                                   BYTES=cfg["BYTES"], SELECT=cfg["SELECT"], num_warps=cfg["num_warps"],
                                   enable_fp_fusion=False)
    return out


def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Dequantise bitsandbytes-format 4-bit codes with the fastest path available.

    Args:
        packed: (ceil(n/2), 1) or (ceil(n/2),) uint8 codes, two per byte, high nibble first.
        state: ``lora_ref.quant.QuantState`` (or bitsandbytes' QuantState, or an :class:`NF4Layout`).
        dtype: output dtype (default: the state's dtype).
        out: optional buffer to write into (reused scratch memory); returned viewed to the state's shape.
        backend: "auto" (Triton on CUDA, else torch), "triton", "torch" or "compile".
    Returns: a tensor of ``state.shape`` equal, bit for bit, to ``lora_ref.quant.dequantize_4bit``.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    lay = state if isinstance(state, NF4Layout) else layout_of(state, packed.device)
    dtype = lay.dtype if dtype is None else dtype
    if packed.numel() != -(-lay.numel // 2):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold shape {lay.shape} "
                         f"({lay.numel} codes need {-(-lay.numel // 2)} bytes)")
    if backend == "auto":
        backend = "triton" if triton_available(packed.device) else "torch"
    if backend == "triton":
        res = dequantize_4bit_triton(packed, lay, dtype, out)
        return res.view(-1)[: lay.numel].view(lay.shape)
    if backend == "torch":
        res = dequantize_4bit_torch(packed, lay, dtype)
    elif backend == "compile":
        res = dequantize_4bit_compiled(packed, lay, dtype)
    else:
        raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'compile', got {backend!r}")
    if out is not None:
        out.view(-1)[: lay.numel].copy_(res.reshape(-1))
        return out.view(-1)[: lay.numel].view(lay.shape)
    return res


# ----------------------------------------------------------------------------------------------------
# Scratch buffer: one dequantised weight alive at a time
# ----------------------------------------------------------------------------------------------------

class ScratchBuffer:
    """One reusable buffer per (device, dtype), grown to the largest weight asked for.

    A QLoRA layer needs its dequantised weight only for the duration of one matmul, forward or backward;
    writing every layer's weight into the same buffer keeps exactly one 16-bit weight in memory and
    spares the allocator a malloc/free per layer. Safe because ops on one CUDA stream run in order.
    """

    def __init__(self):
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (torch.device(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:numel]

    def clear(self) -> None:
        self._bufs.clear()


SCRATCH = ScratchBuffer()


def dequantize_into_scratch(packed: torch.Tensor, lay: NF4Layout, dtype: torch.dtype) -> torch.Tensor:
    """The weight, dequantised into the shared scratch buffer on CUDA (a fresh tensor elsewhere)."""
    if not triton_available(packed.device):
        return dequantize_4bit_torch(packed, lay, dtype)
    buf = SCRATCH.get(lay.numel, dtype, packed.device)
    return dequantize_4bit_triton(packed, lay, dtype, out=buf).view(lay.shape)


# ----------------------------------------------------------------------------------------------------
# 4-bit base + LoRA in one autograd node
# ----------------------------------------------------------------------------------------------------

class LoRA4bitFunction(torch.autograd.Function):
    r"""y = x W^T + s (x A^T) B^T, with W = dDequant(packed) in the compute dtype of x.

    Shapes: x (..., in), W (out, in) from 4 bits, A (r, in), B (out, r) -> y (..., out).
    Backward (W frozen): dx = g W + s (g B) A;  dA = s (g B)^T x;  dB = s g^T (x A^T).
    Saved for backward: x (compute dtype) and x A^T (..., r); the weight is dequantised again.
    A and B may be fp32 parameters: they are cast to the compute dtype for the matmuls (QLoRA eq. 5-6
    compute in bf16) and their gradients are returned in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, packed, lay, lora_A, lora_B, scaling):
        dt = x.dtype
        w = dequantize_into_scratch(packed, lay, dt)
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_A.to(dt)
        b = lora_B.to(dt)
        xa = x2 @ a.t()                                                  # (t, r)
        y = torch.addmm(x2 @ w.t(), xa, b.t(), alpha=scaling)                # base + s (x A^T) B^T
        ctx.save_for_backward(x, xa, lora_A, lora_B)
        ctx.packed, ctx.lay, ctx.scaling = packed, lay, scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, xa, lora_A, lora_B = ctx.saved_tensors
        dt = x.dtype
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1]).to(dt)
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_A.to(dt)
        b = lora_B.to(dt)
        gb = g2 @ b                                                      # (t, r)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            w = dequantize_into_scratch(ctx.packed, ctx.lay, dt)
            dx = torch.addmm(g2 @ w, gb, a, alpha=s).view(x.shape)
        if ctx.needs_input_grad[3]:
            dA = (gb.t() @ x2).to(lora_A.dtype).mul_(s)                  # (r, in)
        if ctx.needs_input_grad[4]:
            dB = (g2.t() @ xa).to(lora_B.dtype).mul_(s)                  # (out, r)
        return dx, None, None, dA, dB, None


def qlora_linear(x: torch.Tensor, packed: torch.Tensor, state, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """Functional form of :class:`LoRA4bitFunction`; ``state`` a QuantState or an :class:`NF4Layout`."""
    lay = state if isinstance(state, NF4Layout) else layout_of(state, packed.device)
    if x.shape[-1] != lay.shape[-1]:
        raise ValueError(f"input's last dimension is {x.shape[-1]}, the 4-bit weight is {lay.shape}")
    return LoRA4bitFunction.apply(x, packed, lay, lora_A, lora_B, float(scaling))


class FastQLoRALinear(nn.Module):
    """A frozen NF4 linear with a LoRA adapter, on the fused path: drop-in for an adapted ``nn.Linear``.

    Built from a 16-bit ``nn.Linear`` (:meth:`from_linear`, which quantises with ``lora_ref.quant``) or
    from packed codes and a state. Parameters: ``lora_A`` (r, in) and ``lora_B`` (out, r), initialised
    as in ``lora_ref.lora.LoRALinear`` (kaiming-uniform A, zero B), fp32 by default. Buffers: ``packed``;
    the block constants live in ``lay`` (they follow ``.to(device)`` but are not in the state dict: for
    files and merging use ``lora_ref.qlora`` and ``lora_ref.adapters``; this class serves speed).

    Scaling: alpha / r, or alpha / sqrt(r) with ``use_rslora=True`` (rsLoRA, arXiv 2312.03732), as
    ``lora_ref.lora.LoRALinear``. Dropout on the adapter's input is NOT supported: the fused node saves
    x once for both base and adapter, and a dropout mask would need a second saved copy of x, so
    ``dropout != 0`` raises a ValueError (``lora_ref.qlora.QLoRALinear`` supports it).
    """

    def __init__(self, packed: torch.Tensor, state, r: int, alpha: float, bias: torch.Tensor | None = None,
                 adapter_dtype: torch.dtype = torch.float32, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if dropout:
            raise ValueError(f"FastQLoRALinear has no adapter dropout (got dropout={dropout!r}): the fused "
                             "node saves one copy of x for base and adapter; use lora_ref.qlora.QLoRALinear")
        lay = layout_of(state, packed.device)
        if len(lay.shape) != 2:
            raise ValueError(f"a linear weight is 2-D, got shape {lay.shape}")
        out_f, in_f = lay.shape
        if as_int(r) is None or not 1 <= r <= min(in_f, out_f):
            raise ValueError(f"rank r={r!r} must be an integer in [1, {min(in_f, out_f)}]")
        r = as_int(r)
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.use_rslora = bool(use_rslora)
        self.register_buffer("packed", packed)
        self.lay = lay
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        dev = packed.device
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=dev, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=dev, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, blocksize: int = 64,
                    double_quant: bool = True, **kw) -> "FastQLoRALinear":
        """Quantise ``linear.weight`` to NF4 (chunk by chunk: bounded workspace, same bytes); ``kw`` as __init__."""
        from lora_ref.qlora import quantize_4bit_in_chunks
        packed, state = quantize_4bit_in_chunks(linear.weight.data, blocksize, "nf4", double_quant)
        return cls(packed, state, r, alpha, linear.bias, **kw)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.lay.absmax.device != self.packed.device:        # .to(device) moves the block constants too
            self.lay = self.lay.to(self.packed.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = LoRA4bitFunction.apply(x, self.packed, self.lay, self.lora_A, self.lora_B, self.scaling)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, nf4"


def quantize_model_fast(model: nn.Module, r: int, alpha: float,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                        blocksize: int = 64, double_quant: bool = True, **kw) -> nn.Module:
    """Replace every targeted ``nn.Linear`` by a :class:`FastQLoRALinear` in place, freeing its 16-bit
    weight as it goes (one layer at a time, so the peak is the model plus one weight); freeze the rest.
    ``kw`` (``adapter_dtype``, ``use_rslora``, ``dropout``) go to :class:`FastQLoRALinear`."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named one of {targets} in the model")
    for name in names:
        lin = model.get_submodule(name)
        set_submodule(model, name, FastQLoRALinear.from_linear(lin, r, alpha, blocksize, double_quant, **kw))
        lin.weight = None
        del lin
    return model


def _fused_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Make every Llama-style RMSNorm (``weight``, ``variance_epsilon``) call ``F.rms_norm``: one fused
    kernel that computes in fp32 and saves only x and 1/rms, instead of transformers' chain of fp32
    upcast, pow, mean, rsqrt, multiply and downcast (each a launch, the fp32 copy saved for backward).
    Not bit-identical to transformers (the weight is applied before the one rounding to 16 bits).
    Returns the number of norms patched."""
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight"):
            m.forward = _fused_rms_norm_forward.__get__(m)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# Chunked cross-entropy: no full (tokens x vocab) fp32 logits
# ----------------------------------------------------------------------------------------------------

class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, ignore_index):
        acc = torch.promote_types(hidden.dtype, torch.float32)            # fp32 for 16-bit inputs
        total = hidden.new_zeros((), dtype=acc)
        n = (labels != ignore_index).sum()
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i:i + chunk] @ weight.t()).to(acc)           # (c, V)
            total += F.cross_entropy(logits, labels[i:i + chunk], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(hidden, weight, labels, n)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return total / n.clamp(min=1)

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, n = ctx.saved_tensors
        chunk, ii = ctx.chunk, ctx.ignore_index
        scale = g / n.clamp(min=1)
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk]
            lab = labels[i:i + chunk]
            acc = torch.promote_types(hidden.dtype, torch.float32)
            p = torch.softmax((h @ weight.t()).to(acc), dim=-1)          # d loss / d logits = p - onehot
            valid = (lab != ii).unsqueeze(1)                              # (c, 1)
            # subtract the one-hot with a scatter (no boolean indexing: no host sync, so a CUDA graph
            # can capture the step); ignored rows (label ii) get zero gradient
            idx = torch.where(valid.squeeze(1), lab, 0).unsqueeze(1)
            p.scatter_add_(1, idx, -valid.to(acc))
            p = (p * (scale * valid)).to(hidden.dtype)
            if dh is not None:
                dh[i:i + chunk] = p @ weight
            if dw is not None:
                dw += (p.t() @ h).to(dw.dtype)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = 1024, ignore_index: int = -100, shift: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight^T`` without materialising all logits.

    Args:
        hidden: (batch, seq, d) final hidden states (after the last norm); weight: (V, d) lm_head weight.
        labels: (batch, seq) token ids, ``ignore_index`` where no loss is taken.
        chunk: tokens per chunk; memory ~ chunk * V * (4 + 4 + 2) bytes instead of 12 * tokens * V.
        shift: predict token t+1 from position t (causal LM), as transformers' ``ForCausalLMLoss``.
    Equals ``F.cross_entropy(logits.float().view(-1, V), labels, ignore_index)`` on shifted labels.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedCE.apply(h, weight, labels.reshape(-1).contiguous(), chunk, ignore_index)


# ----------------------------------------------------------------------------------------------------
# One CUDA graph per training step: the CPU launches the step once, not kernel by kernel
# ----------------------------------------------------------------------------------------------------

class CUDAGraphStep:
    """Capture a whole training step (forward, backward with checkpointing, optimizer) as one CUDA graph.

    A QLoRA step on the Llama-2-7B shape is ~30,000 small kernel launches; Python and the CUDA driver
    need more time to issue them than the GPU needs to run them (profiled: 628 ms CPU vs 231 ms CUDA), so
    the speed follows the host CPU. After capture, ``step()`` is one ``cudaGraphLaunch``: the GPU runs
    the recorded kernels back to back (PyTorch's "whole-network capture", torch.cuda.graphs docs).

    ``step_fn()`` must do one full step on *static* tensors (same shapes and addresses every call: copy a
    new batch into them before ``step()``), return the loss tensor, and never synchronise with the host:
    no ``.item()``, no boolean-mask indexing, an optimizer built with ``capturable=True``, checkpointing
    with ``preserve_rng_state=False`` (no dropout in the model). It runs ``warmup`` times eagerly on a side
    stream first (lazy state such as Adam's moments and the dequantise scratch buffer is created then).
    """

    def __init__(self, step_fn, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep needs a CUDA device")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step_fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # capture on the warm-up stream: cuBLAS keeps one workspace per stream (32 MiB on Hopper), so a
        # third stream would add one more to the peak
        with torch.cuda.graph(self.graph, stream=side):
            self.loss = step_fn()

    def __call__(self) -> torch.Tensor:
        """Replay the step; returns the (static) loss tensor of this step."""
        self.graph.replay()
        return self.loss
