r"""4-bit blockwise quantisation: NF4, FP4 and int4 codebooks, double quantisation (QLoRA, arXiv 2305.14314).

A weight tensor is cut into blocks of ``blocksize`` consecutive values (row-major order). Each block keeps
one fp32 scale, its absolute maximum, and every value becomes the index of the nearest level of a
16-entry codebook ``code`` (levels in [-1, 1])::

        absmax_b = max_{i in b} |w_i|                      (one fp32 per block: 32/blocksize bits/param)
        q_i      = argmin_k | w_i / absmax_b - code[k] |   (4 bits/param, two per byte)
        w_i ~=     code[q_i] * absmax_b                    (dequantise)

The storage format is bitsandbytes' (``bitsandbytes.functional.quantize_4bit``), byte for byte: codes
packed two per ``uint8``, the *first* element in the high nibble, packed tensor of shape (ceil(n/2), 1),
absmax as fp32 per block, and the same codebooks and rounding. Double quantisation (QLoRA Section 3,
"Double Quantization") then quantises the absmax values themselves: subtract their mean, quantise them
with the 8-bit *dynamic* map in blocks of 256, which cuts the cost of the constants from
32/64 = 0.5 to 8/64 + 32/(64 * 256) = 0.127 bits per parameter (:func:`bits_per_parameter`).

Everything here is vectorised torch (no Python loop over blocks) and runs on any device; the fused GPU
path lives in ``lora_ref.kernels`` and is never the teaching path.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ._checks import as_int, check_int

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bitsandbytes' quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4", "int4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NF4_OFFSET = 0.9677083                                        # bitsandbytes' create_normal_map default


# ----------------------------------------------------------------------------------------------------
# Codebooks, computed from their definitions
# ----------------------------------------------------------------------------------------------------

def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    r"""The 16 NormalFloat4 levels (QLoRA Section 3, "4-bit NormalFloat Quantization"), sorted, in [-1, 1].

    NF4 levels are quantiles of N(0, 1), so that each level gets an equal share of normally distributed
    weights. To have an *exact zero* (padding, zeros in the weights) with 16 levels, the type is
    asymmetric: 8 positive and 7 negative quantiles plus 0::

        positive = Phi^{-1}( linspace(offset, 1/2, 9)[:-1] )      (8 values, largest Phi^{-1}(offset) ~ 1.848)
        negative = -Phi^{-1}( linspace(offset, 1/2, 8)[:-1] )     (7 values)
        code     = sort(positive + [0] + negative) / max          (normalised to [-1, 1])

    ``offset`` = 0.9677083 = ((1 - 1/32) + (1 - 1/30)) / 2 is bitsandbytes' choice (the mean of the
    outermost bin centres for 16 and 15 bins per side), so that +-1 are not the infinite quantile 1.
    Phi^{-1} is ``torch.special.ndtri`` evaluated in float64; the grid is built in float32 exactly as
    bitsandbytes' ``create_normal_map`` does (its torch.linspace runs in the default dtype), which is why
    the result equals ``bitsandbytes.functional.get_4bit_type("nf4")`` to the last bit of fp32.

    Returns: (16,) float32, ascending; code[7] == 0 exactly, code[0] == -1, code[15] == 1.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset={offset!r} must lie in (0.5, 1): it is a probability above the median")
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())       # (8,)
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())      # (7,)
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float()
    values = values.sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    r"""bitsandbytes' FP4 (E2M1: 1 sign, 2 exponent, 1 mantissa bit) levels, *indexed by bit pattern*.

    Unlike NF4 the index is a real float encoding ``s e1 e0 m`` and the table is in bit order, not sorted.
    bitsandbytes decodes the three magnitude bits as (before normalising by the largest value, 12)::

        e = 0 (subnormal):   m * 2^-4            -> 0, 0.0625
        e = 1, 2, 3:         (1 + m/2) * 2^(4-e) -> 8, 12 | 4, 6 | 2, 3

    i.e. the exponent field counts *down* (e=1 is the largest binade) and the subnormal step is 2^-4.
    The normal magnitudes {2, 3, 4, 6, 8, 12}/12 equal the OCP MX E2M1 ones {1, 1.5, 2, 3, 4, 6}/6, but
    bitsandbytes' subnormal is 0.0625/12 = 0.0052, not E2M1's 0.5/6 = 0.083. (bitsandbytes' comment says
    ``create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4)`` regenerates it; that
    function gives a subnormal of 0.0208, so the table actually used by quantize_4bit is the one computed
    here.) The sign bit gives the negatives; pattern 0b1000 is -0.

    Returns: (16,) float32 in bit-pattern order; equal to ``get_4bit_type("fp4")``.
    """
    mags = []
    for e in range(4):
        for m in range(2):
            mags.append(m * 2.0 ** -4 if e == 0 else (1 + m / 2) * 2.0 ** (4 - e))
    mags = torch.tensor(mags, dtype=torch.float32)
    code = torch.cat([mags, -mags])                    # sign bit is the high bit of the nibble
    return code / code.abs().max()


def int4_code() -> torch.Tensor:
    r"""Symmetric int4 (absmax) levels k/7 for k = -7..7, in bitsandbytes' sign-magnitude bit order.

    Index i: (7 - i)/7 for i = 0..7 and -(i - 8)/7 for i = 8..15, so 0b0111 is +0 and 0b1000 is -0:
    15 distinct levels, the usual "int4 with a symmetric range". Quantising to it is the round-to-nearest
    ``q = round(7 w / absmax)`` of the QLoRA paper's Int4 baseline. Equal to the table of
    ``get_4bit_type("int4")`` (which itself fails in bitsandbytes 0.50: it divides an integer tensor).
    """
    k = torch.arange(8, dtype=torch.float32)                   # 0, 1, ..., 7
    code = torch.cat([7 - k, -k])
    return code / 7.0


def get_code(quant_type: str) -> torch.Tensor:
    """The 16-level codebook of ``quant_type`` ("nf4", "fp4" or "int4"), (16,) float32."""
    makers = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}
    if quant_type not in makers:
        raise ValueError(f"quant_type={quant_type!r}; expected one of {QUANT_TYPES}")
    return makers[quant_type]()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    r"""The 8-bit *dynamic* (tree) map of Dettmers 2016 (arXiv 1511.04561), as bitsandbytes builds it.

    Used for double quantisation of the absmax values (QLoRA) and for 8-bit optimizer state
    (arXiv 2110.02861). A value is sign * 10^(-E) * fraction: for each decade i = 0..max_exponent_bits-1
    the fraction interval [0.1, 1] is split into 2^(i + non_sign_bits - max_exponent_bits) (signed) bins
    and the bin *midpoints* are the levels, so small magnitudes get few levels, large ones many::

        levels_i = 10^(i - (max_exponent_bits - 1)) * midpoints(linspace(0.1, 1, n_i + 1)),  +- if signed

    plus the exact values 0 and 1. Computed in float32 exactly like bitsandbytes.

    Returns: (256,) float32, ascending (code[0] ~ -0.993, code[-1] == 1 for the signed map).
    """
    non_sign_bits = total_bits - 1       # also for unsigned maps: there the spare bit doubles the fraction bins
    data: list[float] = []

    def add(n_items: int, decade: int) -> None:
        bounds = torch.linspace(0.1, 1, n_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + decade)
        data.extend((scale * means).tolist())
        if signed:
            data.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):
        add(2 ** (i + non_sign_bits - max_exponent_bits) if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1), i)
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1      # all exponent bits zero, no indicator bit
    if extra > 0:
        add(extra, max_exponent_bits - 1)
    data += [0.0, 1.0]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits} "
                         f"give {len(data)} levels, not {2 ** total_bits}")
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# The state: everything needed to dequantise, serialisable
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class QuantState:
    """What dequantisation needs besides the codes; mirrors ``bitsandbytes.functional.QuantState``.

    Fields:
        absmax: (n_blocks,) float32 block scales, or, when ``state2`` is set (double quantisation),
            their 8-bit codes (n_blocks,) uint8.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the default dequantisation dtype).
        blocksize: values per block.
        quant_type: "nf4", "fp4", "int4" (4-bit) or "dynamic8" (the 8-bit state of the absmax values).
        code: the codebook, (16,) or (256,) float32.
        offset: mean of the absmax values subtracted before double quantisation (None otherwise).
        state2: the QuantState of the 8-bit absmax codes (None without double quantisation).
    """
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: float | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def nbytes(self, include_code: bool = False) -> int:
        """Bytes of the block constants (absmax, nested absmax, offset); codebooks only if asked."""
        n = self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            n += self.state2.nbytes(include_code) + 4            # + the fp32 offset
        if include_code:
            n += self.code.numel() * self.code.element_size()
        return n

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor on ``device`` (the state is frozen: this never moves in place)."""
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device),
                       state2=self.state2.to(device) if self.nested else None)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors can store it), with bitsandbytes' key names.

        Keys: ``absmax``, ``quant_map`` and, nested, ``nested_absmax``, ``nested_quant_map``; the
        non-tensor fields go as JSON bytes in a uint8 tensor under ``quant_state.bitsandbytes__<type>``,
        exactly like ``bitsandbytes.functional.QuantState.as_dict(packed=True)``, so either library
        reads the other's 4-bit checkpoints (NF4/FP4).
        """
        if self.quant_type == "dynamic8":
            raise ValueError("to_dict serialises a 4-bit state; the nested 8-bit state is stored inside it")
        meta: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            out["nested_absmax"] = self.state2.absmax
            out["nested_quant_map"] = self.state2.code.clone()
            meta.update(nested_blocksize=self.state2.blocksize, nested_offset=self.offset,
                        nested_dtype=str(self.state2.dtype).removeprefix("torch."))
        blob = json.dumps(meta).encode("utf-8")
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], device: torch.device | str | None = None) -> "QuantState":
        """Inverse of :meth:`to_dict`; keys may carry a prefix (``"weight.absmax"``), as in a state dict."""
        short = {k.split(".")[-1] if "quant_state." not in k else "quant_state." + k.split("quant_state.")[-1]: v
                 for k, v in d.items()}
        blobs = [k for k in short if k.startswith("quant_state.bitsandbytes__")]
        if len(blobs) != 1:
            raise ValueError(f"expected exactly one 'quant_state.bitsandbytes__<type>' entry, found {blobs}")
        meta = json.loads(bytes(short[blobs[0]].cpu().tolist()).decode("utf-8"))
        for key in ("absmax", "quant_map"):
            if key not in short:
                raise ValueError(f"quant state dict lacks {key!r}; keys: {sorted(d)}")
        dev = device if device is not None else short["absmax"].device
        state2 = offset = None
        if "nested_absmax" in short:
            n_blocks = short["absmax"].numel()
            state2 = cls(absmax=short["nested_absmax"].to(dev), shape=(n_blocks,),
                         dtype=getattr(torch, meta.get("nested_dtype", "float32")),
                         blocksize=int(meta["nested_blocksize"]), quant_type="dynamic8",
                         code=short["nested_quant_map"].to(dev))
            offset = float(meta["nested_offset"])
        return cls(absmax=short["absmax"].to(dev), shape=tuple(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                   blocksize=int(meta["blocksize"]), quant_type=meta["quant_type"],
                   code=short["quant_map"].to(dev), offset=offset, state2=state2)


# ----------------------------------------------------------------------------------------------------
# Input checks and the nearest-level rule
# ----------------------------------------------------------------------------------------------------

def _check_float_input(A: torch.Tensor, what: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} quantises float32/float16/bfloat16 tensors, got dtype {A.dtype}"
                         + (" (an integer tensor: convert it with .float() first if that is meant)"
                            if not A.dtype.is_floating_point else ""))
    bad = ~torch.isfinite(A)
    if bad.any():
        n_nan, n_inf = int(torch.isnan(A).sum()), int(torch.isinf(A).sum())
        first = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"{what}: input has {n_nan} NaN and {n_inf} Inf values (first at flat index {first}); "
                         "a non-finite value would poison its whole block's absmax")


def _check_blocksize(blocksize: int, allowed: tuple[int, ...] | None = BLOCKSIZES_4BIT) -> int:
    """``blocksize`` as a Python int (np.int64(64) and torch.tensor(64) are fine), or ValueError."""
    value = as_int(blocksize)
    if value is None or value <= 0:
        raise ValueError(f"blocksize={blocksize!r} must be a positive integer")
    if allowed is not None and value not in allowed:
        raise ValueError(f"blocksize={value} is not one bitsandbytes allows; use one of {allowed}")
    return value


def _check_out_dtype(dtype, what: str) -> None:
    """Dequantised values are real numbers in [-absmax, absmax]: an integer dtype would truncate them."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what}: dtype={dtype!r} must be a floating-point torch.dtype "
                         f"(float32, float16, bfloat16, float64)")


def _check_state(state, what: str) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(f"{what} needs the QuantState that quantisation returned with the codes, "
                        f"got {type(state).__name__}")


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) -> (n_blocks, blocksize), zero-padding the last block (zeros never raise an absmax)."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)


def scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Block absmax and the values scaled into [-1, 1], exactly as bitsandbytes' reference kernels do.

    The one blockwise absmax scaling of the package: 4-bit codes (:func:`quantize_blockwise`), the 8-bit
    map (:func:`quantize_8bit`) and, through them, double quantisation and the 8-bit optimizer state.

    s_i = clamp(A_i * (1 / absmax_b), -1, 1) for full blocks (a multiply by the reciprocal, as in the
    CUDA kernel) and s_i = A_i / absmax_b in a last, partial block (bitsandbytes' PyTorch path divides
    there; the two differ by at most one ulp, which can move a value sitting on a decision boundary, so
    we copy it to get the same bytes). An all-zero block has absmax 0 and scales to zeros.

    Shapes: flat (n,) float32 -> scaled (n,), absmax (n_blocks,) float32.
    """
    n = flat.numel()
    if n == 0:
        return flat, flat.new_zeros(0)
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        am = tail.abs().amax()
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(tail / am.clamp(min=1e-38), -1, 1)])
    return scaled, absmax


def nearest_code_index(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    r"""Index of the nearest level of ``code`` (16 or 256 levels, any order) for every value of ``x``.

    The one nearest-level search of the package (4-bit codes, the 8-bit map; ``lora_ref.optim_fast``'s
    table-driven search is tested equal to it).

    The levels are sorted, the decision boundaries are the midpoints of neighbours, and ``bucketize``
    finds the bin: x exactly on a midpoint goes to the *lower* level (bitsandbytes' ``x > midpoint``
    test in its CUDA decision tree and ``torch.bucketize(right=False)`` in its CPU path). The sort is
    stable, so for FP4/int4, whose tables hold +0 and -0, ties between equal levels resolve as in
    bitsandbytes' CPU quantiser (index 0 before 8).

    Shapes: x (...,) float32, code (k,) -> (...,) int64 indices into ``code`` (not into the sorted code).
    """
    order = torch.argsort(code, stable=True)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / 2                # (k - 1,)
    if midpoints.numel() > 15:                                # the 8-bit map: a binary search per value
        return order[torch.bucketize(x, midpoints)]
    # bin = number of midpoints strictly below x (= torch.bucketize(x, midpoints)); 15 vectorised
    # comparisons over x are several times faster than bucketize's per-element binary search
    bins = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for m in midpoints.tolist():
        bins += x > m
    return order[bins.long()]


# ----------------------------------------------------------------------------------------------------
# 4-bit blockwise quantise / dequantise
# ----------------------------------------------------------------------------------------------------

def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Blockwise absmax quantisation to the codes of any codebook: the first half of :func:`quantize_4bit`.

    Per block b of ``blocksize`` consecutive values (row-major; the last may be shorter)::

        absmax_b = max |x_b|,   s_i = clamp(x_i * (1 / absmax_b), -1, 1),   q_i = nearest level of s_i

    (:func:`scale_blocks`, :func:`nearest_code_index`). Notebook 05's ``quantize_blockwise``.
    (bitsandbytes' ``quantize_blockwise`` is its 8-bit quantiser: here :func:`quantize_8bit`.)

    Shapes: x any shape, float; code (16,) levels in [-1, 1], any order ->
    codes (x.numel(),) uint8 indices into ``code``, absmax (ceil(numel / blocksize),) float32.
    """
    _check_float_input(x, "quantize_blockwise")
    blocksize = _check_blocksize(blocksize, allowed=None)
    scaled, absmax = scale_blocks(x.detach().reshape(-1).float(), blocksize)       # (n,), (n_blocks,)
    return nearest_code_index(scaled, code.to(scaled.device, torch.float32)).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape,
                         blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Inverse of :func:`quantize_blockwise`: x_i = code[q_i] * absmax_b in fp32, reshaped, cast once.

    The second half of :func:`dequantize_4bit` (after unpacking). Notebook 05's ``dequantize_blockwise``.
    Shapes: codes (n,) integer, absmax (ceil(n / blocksize),), code (16,) -> ``shape`` in ``dtype``.
    """
    values = code.to(codes.device, torch.float32)[codes.reshape(-1).long()]         # (n,) in [-1, 1]
    n = values.numel()
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"{absmax.numel()} block scales for {n} codes in blocks of {blocksize} "
                         f"(need {n_blocks})")
    out = (_blocks(values, blocksize) * absmax.to(codes.device).float().unsqueeze(1)).reshape(-1)[:n]
    return out.reshape(shape).to(dtype)


def pack_4bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """(n,) codes in [0, 15] -> (ceil(n/2),) uint8, two per byte, the *first* in the high nibble
    (bitsandbytes' order); an odd count is padded with the code ``pad``. Inverse: :func:`unpack_4bit`."""
    q = codes.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad)])
    return (q[0::2] << 4) | q[1::2]


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                  dq_blocksize: int = 256) -> tuple[torch.Tensor, QuantState]:
    r"""Blockwise 4-bit quantisation, byte-identical to ``bitsandbytes.functional.quantize_4bit``.

    Per block b of ``blocksize`` consecutive values (row-major; the last block may be shorter)::

        absmax_b = max |A_b|,   s_i = clamp(A_i * (1 / absmax_b), -1, 1),   q_i = nearest level of s_i

    (a multiply by the reciprocal, as bitsandbytes' kernels do; an all-zero block has absmax 0 and
    decodes to exact zeros). Codes are packed two per byte, first element in the high nibble; an odd
    count is padded with the code of 0. With ``double_quant`` the absmax values are quantised again
    (:func:`double_quantize`): bitsandbytes' ``compress_statistics=True``.

    Args:
        A: float32/float16/bfloat16 tensor of any shape. Empty tensors give empty outputs.
        blocksize: 32, 64 (QLoRA's choice), ..., 4096.
        quant_type: "nf4", "fp4" or "int4" (int4 has no bitsandbytes counterpart; same packing).

    Returns:
        packed: (ceil(n/2), 1) uint8.   state: :class:`QuantState`.
    Raises:
        ValueError on a non-float dtype, NaN/Inf values, a bad blocksize or quant_type.
    """
    _check_float_input(A, "quantize_4bit")
    blocksize = _check_blocksize(blocksize)
    code = get_code(quant_type).to(A.device)
    codes, absmax = quantize_blockwise(A, code, blocksize)              # (n,) uint8, (n_blocks,)
    zero = int(nearest_code_index(torch.zeros(1, device=A.device), code))   # an odd count pads with 0's code
    packed = pack_4bit(codes, pad=zero).unsqueeze(1)                     # (ceil(n/2), 1)
    state = QuantState(absmax=absmax, shape=tuple(A.shape), dtype=A.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code)
    if double_quant:
        state = double_quantize(state, dq_blocksize)
    return packed, state


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2), 1) uint8 -> (n,) int64 codes: high nibble first, then low nibble."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {flat.dtype}")
    if flat.numel() != -(-n // 2):
        raise ValueError(f"{flat.numel()} packed bytes cannot hold {n} 4-bit codes (need {-(-n // 2)})")
    return torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)[:n].long()


def block_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax per block: stored directly, or decoded from double quantisation (+ the offset)."""
    if not state.nested:
        return state.absmax.float()
    return dequantize_8bit(state.absmax, state.state2, torch.float32) + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""Inverse of :func:`quantize_4bit`: w_i = code[q_i] * absmax_b, computed in fp32, cast once to dtype.

    The readable eager path (a codebook gather and a broadcast multiply); bit-identical to
    ``bitsandbytes.functional.dequantize_4bit`` when ``dtype`` is the state's dtype.

    Shapes: packed (ceil(n/2), 1) uint8 -> tensor of ``state.shape`` in ``dtype`` (default: state.dtype).
    """
    _check_state(state, "dequantize_4bit")
    dtype = state.dtype if dtype is None else dtype
    _check_out_dtype(dtype, "dequantize_4bit")
    codes = unpack_4bit(packed, state.numel)                             # (n,)
    absmax = block_absmax(state).to(packed.device)                      # (n_blocks,)
    if absmax.numel() != state.n_blocks:
        raise ValueError(f"state has {absmax.numel()} block scales, shape {state.shape} with blocksize "
                         f"{state.blocksize} needs {state.n_blocks}")
    return dequantize_blockwise(codes, absmax, state.code, state.shape, state.blocksize, dtype)


# ----------------------------------------------------------------------------------------------------
# 8-bit blockwise (dynamic map): double quantisation and 8-bit optimizer state
# ----------------------------------------------------------------------------------------------------

def quantize_8bit(A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256
                  ) -> tuple[torch.Tensor, QuantState]:
    r"""8-bit blockwise quantisation to a sorted 256-level map (default: the signed dynamic map).

    bitsandbytes calls this ``quantize_blockwise``; here that name is the 4-bit building block of
    notebook 05 (:func:`quantize_blockwise`), and this is the 8-bit one.

    Per block: absmax_b = max |A_b|, s_i = A_i / absmax_b, q_i = index of the nearest level of ``code``,
    a value on a midpoint going to the lower level: bitsandbytes' reference PyTorch kernel
    (``backends/default/ops.py``), bit for bit. Note: bitsandbytes 0.50's *compiled CPU* kernel is not
    exactly nearest-level (its table-driven binary search picks a neighbouring level for ~0.15% of
    Gaussian inputs, even 0.0 -> 2.1e-5); our codes are never farther from the input than its codes.

    Shapes: A (...) float -> codes of A's shape, uint8; state.absmax (n_blocks,) float32.
    """
    _check_float_input(A, "quantize_8bit")
    blocksize = _check_blocksize(blocksize, allowed=None)
    code = (create_dynamic_map() if code is None else code).to(A.device, torch.float32)
    if code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError(f"an 8-bit map has 256 ascending levels, got {code.numel()} values")
    scaled, absmax = scale_blocks(A.detach().reshape(-1).float(), blocksize)
    q = nearest_code_index(scaled, code).to(torch.uint8).reshape(A.shape)
    return q, QuantState(absmax=absmax, shape=tuple(A.shape), dtype=A.dtype, blocksize=blocksize,
                         quant_type="dynamic8", code=code)


def dequantize_8bit(q: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_8bit`: code[q_i] * absmax_b in fp32, cast to dtype (default state's)."""
    _check_state(state, "dequantize_8bit")
    _check_out_dtype(state.dtype if dtype is None else dtype, "dequantize_8bit")
    if q.dtype != torch.uint8:
        raise ValueError(f"8-bit codes must be uint8, got {q.dtype}")
    flat = state.code.to(q.device)[q.reshape(-1).long()]
    n = flat.numel()
    out = (_blocks(flat, state.blocksize) * state.absmax.to(q.device).float().unsqueeze(1)).reshape(-1)[:n]
    return out.to(state.dtype if dtype is None else dtype).reshape(q.shape)


def double_quantize(state: QuantState, blocksize: int = 256) -> QuantState:
    r"""Quantise a 4-bit state's fp32 absmax values with 8 bits (QLoRA Section 3, "Double Quantization").

    absmax values are all positive, so their mean c is subtracted first to use the signed map's range::

        c = mean(absmax),   (q2, absmax2) = quantize_8bit(absmax - c, dynamic map, blocksize)

    Storage per parameter drops from 32/bs to 8/bs + 32/(bs * 256) bits (:func:`bits_per_parameter`).
    Returns a new state with ``absmax`` = q2 (uint8), ``offset`` = c, ``state2`` = the 8-bit state.
    """
    if state.nested:
        raise ValueError("state is already double-quantised")
    absmax = state.absmax.float()
    offset = absmax.mean() if absmax.numel() else torch.zeros((), device=absmax.device)
    q2, state2 = quantize_8bit(absmax - offset, blocksize=blocksize)
    return replace(state, absmax=q2, offset=float(offset), state2=state2)


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------

def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256,
                       bits: int = 4, absmax_bits: int = 32, dq_bits: int = 8) -> float:
    r"""Average storage per weight, codes plus block constants (QLoRA Section 3)::

        plain:        bits + absmax_bits / blocksize                                = 4 + 32/64 = 4.5
        double quant: bits + dq_bits / blocksize + absmax_bits / (blocksize * dq_bs) = 4 + 8/64 + 32/16384
                                                                                     = 4.127

    (The one fp32 offset per tensor and the shared codebooks are negligible and left out, as in the paper.)
    """
    blocksize, dq_blocksize, bits, absmax_bits, dq_bits = (
        check_int(name, v, minimum=1) for name, v in (("blocksize", blocksize), ("dq_blocksize", dq_blocksize),
                                                      ("bits", bits), ("absmax_bits", absmax_bits),
                                                      ("dq_bits", dq_bits)))
    if not double_quant:
        return bits + absmax_bits / blocksize
    return bits + dq_bits / blocksize + absmax_bits / (blocksize * dq_blocksize)


def quantized_nbytes(packed: torch.Tensor, state: QuantState) -> int:
    """Bytes actually held for one quantised tensor: packed codes + block constants (codebooks excluded)."""
    return packed.numel() * packed.element_size() + state.nbytes()


def quantization_error(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = False) -> dict[str, float]:
    """Round-trip error of ``w``: relative Frobenius ||w - deq(q(w))|| / ||w||, mean |err|, max |err|."""
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    err = dequantize_4bit(packed, state, torch.float32) - w.float()
    norm = w.float().norm()
    return {"rel_error": float(err.norm() / norm) if norm > 0 else 0.0,
            "mae": float(err.abs().mean()) if err.numel() else 0.0,
            "max_abs": float(err.abs().max()) if err.numel() else 0.0,
            "mse": float(err.pow(2).mean()) if err.numel() else 0.0}
