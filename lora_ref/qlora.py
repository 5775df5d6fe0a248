r"""QLoRA: LoRA adapters on a frozen 4-bit base (Dettmers et al., 2023, arXiv 2305.14314, Section 3).

The base weight lives as 4-bit codes plus block constants (``lora_ref.quant``); it is dequantised to the
*compute dtype* (bf16 in the paper) on the fly, in forward and again in backward, and thrown away::

    Y = X doubleDequant(c1, c2, W_nf4) + s X A^T B^T         (QLoRA eq. 5, in nn.Linear's convention)

    x ──► [4-bit W: dequantise ► F.linear] ──────────────┐   (frozen; saves only the packed codes)
    │                                                  (+) ──► y
    └──► dropout ► A (r x in) ► B (out x r) ► * s ─────┘   (trainable, 16/32-bit)

Gradients flow to A and B only, through dL/dX = dL/dY W (W dequantised again in backward): the
dequantised weight is never kept for backward, which is the memory argument of QLoRA made visible
(:class:`Dequantize4bitLinear`).

Merging for deployment (the most asked PEFT question, peft#1080, #2105): the adapter was trained against
dequant(W_nf4), not the original 16-bit W. So: dequantise, add s B A in fp32, export in 16-bit
(:func:`merge_for_deployment`). Re-quantising the merged weight to 4 bits adds a fresh rounding error
that can be as large as the adapter's update itself: :func:`requantization_error` measures it.

State-dict keys of :class:`Linear4bit`: ``weight`` (packed uint8, (ceil(n/2), 1)), ``absmax``, ``code``,
with double quantisation also ``nested_absmax``, ``nested_code``, ``offset``; and ``bias``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_ref._checks import check_int

from lora_ref import quant
from lora_ref.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers, merged_weight, set_submodule

# ----------------------------------------------------------------------------------------------------
# One dispatch point for the dequantise used in forward and backward
# ----------------------------------------------------------------------------------------------------

_FAST = {"looked_up": False, "fn": None}


def _fast_dequantize():
    """``lora_ref.kernels.dequantize_4bit`` if that module imports and defines it, else None (cached)."""
    if not _FAST["looked_up"]:
        _FAST["looked_up"] = True
        try:
            from lora_ref import kernels
            _FAST["fn"] = getattr(kernels, "dequantize_4bit", None)
        except ImportError:
            _FAST["fn"] = None
    return _FAST["fn"]


def dequantize_for_compute(packed: torch.Tensor, state: quant.QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise a 4-bit weight to ``dtype`` for a matmul: the fused kernel on CUDA when available,
    else the readable eager ``lora_ref.quant.dequantize_4bit``. Both give the same bits."""
    if packed.is_cuda:
        fast = _fast_dequantize()
        if fast is not None:
            return fast(packed, state, dtype)
    return quant.dequantize_4bit(packed, state, dtype)


class Dequantize4bitLinear(torch.autograd.Function):
    r"""y = x W^T + b with W held in 4 bits; saves only the packed codes (and the state's references).

    forward:  W = dequant(packed, state) in x.dtype (transient), y = F.linear(x, W, b)
    backward: dL/dx = dL/dy @ W, with W dequantised *again* (never stored); W and b are frozen, so no
              dL/dW is formed; dL/db only if the bias requires grad.
    Shapes: x (..., in), packed (ceil(out*in/2), 1) uint8, b (out,) -> y (..., out).
    """

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        weight = dequantize_for_compute(packed, state, x.dtype)            # (out, in), freed after use
        ctx.state = state                                                  # frozen dataclass: no copy
        ctx.save_for_backward(packed)                                      # 0.5 byte/param, already resident
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_for_compute(packed, ctx.state, grad_out.dtype)
            grad_x = grad_out @ weight                                     # (..., out) @ (out, in)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def quantize_4bit_in_chunks(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                            double_quant: bool = True, chunk_numel: int = 1 << 24
                            ) -> tuple[torch.Tensor, quant.QuantState]:
    """``lora_ref.quant.quantize_4bit`` a few million values at a time: the same bytes, bounded workspace.

    The quantiser's temporaries (an fp32 copy, the scaled values, int64 level indices) take ~24 bytes per
    value: 5.6 GB for one 28672x8192 Llama-2-70B projection, more than the whole 4-bit layer. Blocks are
    independent (absmax_b depends on block b only), so quantising whole blocks chunk by chunk and
    concatenating gives identical codes and absmax; double quantisation then runs once over all absmax
    values, as in the one-shot call. Workspace: ~24 * ``chunk_numel`` bytes (0.4 GB by default).
    """
    blocksize = check_int("blocksize", blocksize, minimum=1)          # np.int64(64) too; a plain int after
    flat = weight.reshape(-1)
    n = flat.numel()
    step = max(blocksize, chunk_numel - chunk_numel % blocksize)        # whole blocks (and an even count)
    if n <= step:
        return quant.quantize_4bit(weight, blocksize, quant_type, double_quant)
    packed, absmax = [], []
    for i in range(0, n, step):
        p, st = quant.quantize_4bit(flat[i:i + step], blocksize, quant_type, double_quant=False)
        packed.append(p)
        absmax.append(st.absmax)
    state = quant.QuantState(absmax=torch.cat(absmax), shape=tuple(weight.shape), dtype=weight.dtype,
                             blocksize=blocksize, quant_type=quant_type, code=st.code)
    if double_quant:
        state = quant.double_quantize(state)
    return torch.cat(packed), state


# ----------------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer
# ----------------------------------------------------------------------------------------------------

class Linear4bit(nn.Module):
    """A frozen ``nn.Linear`` stored in 4 bits (NF4/FP4/int4, bitsandbytes' format).

    Build it with :meth:`from_linear`. Forward casts the input to ``compute_dtype`` (default: the
    original weight's dtype; QLoRA uses bf16), runs :class:`Dequantize4bitLinear`, and returns the
    input's dtype. ``weight`` is the packed uint8 codes, so ``LoRALinear(Linear4bit)`` trains fp32
    adapters (PEFT's behaviour on quantised bases). ``is_lora_base`` lets ``inject_lora`` target it.
    """

    is_lora_base = True

    def __init__(self, packed: torch.Tensor, state: quant.QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"a linear weight is 2-D (out, in); the state's shape is {state.shape}")
        if state.quant_type not in quant.QUANT_TYPES:
            raise ValueError(f"quant_type={state.quant_type!r}; expected one of {quant.QUANT_TYPES}")
        self.out_features, self.in_features = state.shape
        self.compute_dtype = compute_dtype or state.dtype
        if self.compute_dtype not in quant.FLOAT_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype} must be one of {quant.FLOAT_DTYPES}")
        self._set_quantized(packed, state)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantise ``linear.weight`` (out, in) blockwise; the bias stays in its own dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit_in_chunks(linear.weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    def _set_quantized(self, packed: torch.Tensor, state: quant.QuantState) -> None:
        """(Re)register the buffers that hold the weight: packed codes and the state's tensors."""
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        if state.nested:
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_code", state.state2.code)
            self.register_buffer("offset", torch.tensor(state.offset, dtype=torch.float32))
            self._offset = float(state.offset)          # a Python float: no device sync per forward
        else:
            self._offset = None
            for name in ("nested_absmax", "nested_code", "offset"):
                if name in self._buffers:
                    del self._buffers[name]
        self.blocksize, self.quant_type, self.orig_dtype = state.blocksize, state.quant_type, state.dtype
        self.dq_blocksize = state.state2.blocksize if state.nested else None

    _QUANT_BUFFERS = ("weight", "absmax", "code", "nested_absmax", "nested_code", "offset")

    def _apply(self, fn, recurse=True):
        """Let ``.to(device)`` move the 4-bit buffers but never let ``.to(dtype)``/``.half()`` cast them:
        fp32 block scales and codebooks rounded to bf16 would change every dequantised value."""
        held = {k: self._buffers.pop(k) for k in self._QUANT_BUFFERS if k in self._buffers}
        super()._apply(fn, recurse)
        device = fn(torch.zeros(1, device=held["weight"].device)).device
        for k, t in held.items():
            self._buffers[k] = t.to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "offset" in self._buffers:
            self._offset = float(self._buffers["offset"])

    @property
    def double_quant(self) -> bool:
        return "nested_absmax" in self._buffers

    @property
    def quant_state(self) -> quant.QuantState:
        """A QuantState over the current buffers (so it follows ``.to(device)``)."""
        state2 = None
        if self.double_quant:
            state2 = quant.QuantState(absmax=self.nested_absmax, shape=(self.absmax.numel(),),
                                      dtype=torch.float32, blocksize=self.dq_blocksize,
                                      quant_type="dynamic8", code=self.nested_code)
        return quant.QuantState(absmax=self.absmax, shape=(self.out_features, self.in_features),
                                dtype=self.orig_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                                code=self.code, offset=self._offset if state2 is not None else None,
                                state2=state2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, (out, in), in ``dtype`` (eager path)."""
        return quant.dequantize_4bit(self.weight, self.quant_state, dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by quant(weight) with this layer's settings (lossy; used by merge)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        packed, state = quant.quantize_4bit(weight.to(self.orig_dtype), self.blocksize, self.quant_type,
                                            self.double_quant, self.dq_blocksize or 256)
        self._set_quantized(packed.to(self.weight.device), state.to(self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = Dequantize4bitLinear.apply(x.to(self.compute_dtype), self.weight, self.quant_state, bias)
        return y.to(x.dtype)

    def storage(self) -> dict[str, float]:
        """Bytes of the 4-bit weight (codes + constants, excluding the shared 16/256-entry codebooks)
        against the original dense weight, and the resulting bits per parameter."""
        n = self.out_features * self.in_features
        held = quant.quantized_nbytes(self.weight, self.quant_state)
        dense = n * torch.empty((), dtype=self.orig_dtype).element_size()
        return {"numel": n, "bytes_4bit": held, "bytes_dense": dense, "bits_per_param": 8 * held / n}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


# ----------------------------------------------------------------------------------------------------
# The QLoRA layer: LoRALinear over a Linear4bit, with a merge that knows the base is quantised
# ----------------------------------------------------------------------------------------------------

class QLoRALinear(LoRALinear):
    """``LoRALinear`` wrapping a :class:`Linear4bit`. Adds no state; only merge differs.

    ``merge()`` does what PEFT does on 4-bit bases: W4 <- quant(dequant(W4) + s B A), i.e. it
    *re-quantises* (lossy; see :func:`requantization_error`); it keeps the pre-merge codes so
    ``unmerge()`` restores them exactly. For deployment prefer :func:`merge_for_deployment` (16-bit).
    """

    def __init__(self, base: Linear4bit, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        if not isinstance(base, Linear4bit):
            raise TypeError(f"QLoRALinear wraps a Linear4bit, got {type(base).__name__}")
        super().__init__(base, r, alpha, dropout, use_rslora)

    def merge(self) -> None:
        if self.merged:
            return
        base = self.base_layer
        merged = merged_weight(base.dequantize(torch.float32), self.lora_A, self.lora_B, self.scaling)
        self._before_merge = (base.weight, base.quant_state)
        base.requantize_(merged)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        packed, state = self._before_merge
        self.base_layer._set_quantized(packed, state)
        del self._before_merge
        self.merged = False


class StandaloneQLoRALinear(nn.Module):
    r"""A LoRA layer that owns its NF4 weight: the seed article's ``QLoRALinear`` interface, done right.

    ``StandaloneQLoRALinear(in_features, out_features, rank=16, alpha=16.0, blocksize=64)``, then
    ``quantize_weight(W)`` stores W (out, in) as NF4 codes (``weight_4bit``, (out*in/2,) uint8, first code
    in the high nibble) and fp32 block scales (``absmax``); nothing dense is kept. Forward::

        y = x dequant(W_nf4)^T + s (x A^T) B^T,     s = alpha / rank,   A (rank, in) kaiming, B (out, rank) 0

    in the input's dtype. Notebook 05's exercise (the article's bugs fixed). In a model, use
    :class:`QLoRALinear` over a :class:`Linear4bit` instead: it shares :class:`LoRALinear`'s constructor,
    merge and file format.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 16, alpha: float = 16.0,
                 blocksize: int = 64):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.blocksize = blocksize
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))                 # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))                # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("code", quant.nf4_code())
        self.register_buffer("weight_4bit", None)
        self.register_buffer("absmax", None)

    @torch.no_grad()
    def quantize_weight(self, weight: torch.Tensor) -> None:
        packed, state = quant.quantize_4bit(weight, blocksize=self.blocksize, quant_type="nf4")
        self.weight_4bit, self.absmax = packed.reshape(-1), state.absmax

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(W_nf4), (out, in), computed in fp32 and cast once to ``dtype``."""
        if self.weight_4bit is None:
            raise RuntimeError("no weight quantised yet: call quantize_weight(weight) first")
        state = quant.QuantState(absmax=self.absmax, shape=(self.out_features, self.in_features),
                                 dtype=dtype, blocksize=self.blocksize, quant_type="nf4", code=self.code)
        return quant.dequantize_4bit(self.weight_4bit, state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.dequantize_weight(x.dtype))
        return base + self.scaling * ((x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T)


def _as_qlora(model: nn.Module) -> None:
    """Give every LoRALinear whose base is a Linear4bit QLoRALinear's merge (same state, so a class swap)."""
    for layer in lora_layers(model).values():
        if isinstance(layer.base_layer, Linear4bit) and not isinstance(layer, QLoRALinear):
            layer.__class__ = QLoRALinear


def inject_qlora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """``inject_lora`` on a quantised model (call :func:`quantize_model` first); adapters on Linear4bit
    bases become :class:`QLoRALinear`. In place; everything but the adapters is frozen."""
    inject_lora(model, config)
    _as_qlora(model)
    return model


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------

def model_nbytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(t.data_ptr() if t.numel() else id(t), t.numel() * t.element_size())
    return sum(seen.values())


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: bytes of the whole model before and after, per layer too."""
    bytes_before: int
    bytes_after: int
    quantized: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    @property
    def linear_bytes(self) -> tuple[int, int]:
        """(dense bytes, 4-bit bytes) of the quantised layers' weights only."""
        return (sum(int(v["bytes_dense"]) for v in self.quantized.values()),
                sum(int(v["bytes_4bit"]) for v in self.quantized.values()))

    def __str__(self) -> str:
        dense, q4 = self.linear_bytes
        bits = 8 * q4 / max(1, sum(v["numel"] for v in self.quantized.values()))
        return (f"quantised {len(self.quantized)} linear layers ({_fmt(dense)} -> {_fmt(q4)}, "
                f"{bits:.3f} bits/param); model {_fmt(self.bytes_before)} -> {_fmt(self.bytes_after)} "
                f"({100 * self.ratio:.1f}%); skipped: {', '.join(sorted(self.skipped)) or 'none'}")


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   skip: tuple[str, ...] = ("lm_head",)) -> QuantReport:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`Linear4bit`, in place (QLoRA's recipe:
    nf4, double_quant=True, compute_dtype=torch.bfloat16; None keeps each layer's own dtype).

    ``skip``: module names (last component or full dotted name) left dense; the output head by default,
    as bitsandbytes/transformers do. A linear whose weight is shared with another module (tied
    embeddings) is skipped too: quantising it would silently untie it. Linears already inside a
    LoRALinear (``.base_layer``) are quantised and their wrapper becomes a :class:`QLoRALinear`.
    Returns a :class:`QuantReport` (bytes before and after).
    """
    before = model_nbytes(model)
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}")
    report = QuantReport(before, before)
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        short = name.rsplit(".", 1)[-1]
        wrapper = name.rsplit(".", 2)[-2] if name.endswith(".base_layer") and "." in name else None
        if short in skip or name in skip or (wrapper is not None and wrapper in skip):
            report.skipped[name] = "in skip"
        elif len(owners.get(id(mod.weight), [])) > 1:
            report.skipped[name] = f"weight shared with {[o for o in owners[id(mod.weight)] if not o.startswith(name + '.')]}"
        else:
            targets.append(name)
    del mod
    # by name, one at a time: once a layer is replaced nothing here refers to its 16-bit weight, so it is
    # freed before the next is quantised (peak: the model plus one layer's workspace, not 2x the linears)
    for name in targets:
        q = Linear4bit.from_linear(model.get_submodule(name), quant_type, blocksize, double_quant, compute_dtype)
        set_submodule(model, name, q)
        report.quantized[name] = q.storage()
    _as_qlora(model)
    report.bytes_after = model_nbytes(model)
    return report


# ----------------------------------------------------------------------------------------------------
# Building a model already quantised: one 16-bit decoder layer at a time (how a 70B model fits 48 GB)
# ----------------------------------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: its largest ``nn.ModuleList`` (``model.model.layers`` in Llama)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers")
    return max(lists, key=len)


def build_quantized(config, device: torch.device | str = "cpu", weights=None, quantize=None,
                    dtype: torch.dtype = torch.bfloat16, progress: bool = True, on_layer=None) -> nn.Module:
    r"""Build a transformers causal LM with its decoder layers quantised *while it is built*.

    ``from_pretrained`` + :func:`quantize_model` first materialises the whole 16-bit model: 2 bytes per
    parameter, 138 GB for Llama-2-70B, before a single weight is in 4 bits. QLoRA's "65B on one 48 GB
    GPU" (arXiv 2305.14314, Section 1) needs the weights to arrive in 4 bits. Here the peak is::

        everything but the layers (c bytes/param: embeddings, final norm, lm_head)
      + the 4-bit layers built so far + ONE 16-bit layer + the quantiser's workspace (:func:`quantize_4bit_in_chunks`)

    Steps: (1) the model is created with no decoder layers on ``device`` (real embeddings, norm, lm_head,
    rotary table) and with all its layers on the ``meta`` device (shapes only, no memory); (2) for each
    layer in turn: allocate it on ``device`` (``to_empty``), fill it (``weights`` or a random init),
    ``quantize(layer)`` (default: :func:`quantize_model`, NF4 + double quantisation, bf16 compute), and its
    16-bit weights are freed before the next layer is allocated.

    Args:
        config: a transformers config (e.g. ``LlamaConfig``); the model class is ``AutoModelForCausalLM``'s.
        weights: None (random init, transformers' own ``_init_weights``: N(0, initializer_range) linears,
            norms at 1), or an object with ``get(name) -> tensor`` and ``names()`` for full parameter names
            (``lora_ref.models.SafetensorsWeights`` streams a safetensors checkpoint one tensor at a time).
        quantize: ``quantize(layer)`` replaces a layer's linears in place (default: :func:`quantize_model`,
            computing in ``dtype``); ``lora_ref.kernels.quantize_model_fast`` builds the fast path instead.
        dtype: dtype of the 16-bit parts; on_layer: called as ``on_layer(i, model)`` after layer i is done.
    Returns the model (train mode off, every base parameter frozen).
    """
    from transformers import AutoModelForCausalLM
    from tqdm.auto import tqdm

    device = torch.device(device)
    n_layers = config.num_hidden_layers
    quantize = quantize or (lambda layer: quantize_model(layer))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            layers = decoder_layers(AutoModelForCausalLM.from_config(config))     # shapes only
        config.num_hidden_layers = 0
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config)                   # no layers: ~1 GB for 70B
        finally:
            config.num_hidden_layers = n_layers
    finally:
        torch.set_default_dtype(old)
    model.config.num_hidden_layers = n_layers
    empty = decoder_layers(model) if any(isinstance(m, nn.ModuleList) for m in model.modules()) else None
    if empty is None or len(empty):
        raise ValueError("could not find the (empty) decoder-layer list of the model built without layers")
    parent = next(m for m in model.modules() if any(c is empty for c in m.children()))
    list_name = next(k for k, c in parent.named_children() if c is empty)
    setattr(parent, list_name, layers)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for name, buf in layers.named_buffers():
        raise ValueError(f"decoder layers hold a buffer ({name}); to_empty would leave it uninitialised")
    if weights is not None:
        _load_into(model, weights, skip_prefix=prefix + ".", device=device)
    model.requires_grad_(False)
    for i in tqdm(range(n_layers), desc="build + quantise layers", disable=not progress):
        layer = layers[i].to_empty(device=device)                                # 16-bit, uninitialised
        with torch.no_grad():
            if weights is None:
                for m in layer.modules():
                    model._init_weights(m)
            else:
                _load_into(layer, weights, prefix=f"{prefix}.{i}.", device=device)
        layer.requires_grad_(False)
        quantize(layer)
        if on_layer is not None:
            on_layer(i, model)
    model.eval()
    return model


@torch.no_grad()
def _load_into(module: nn.Module, weights, prefix: str = "", skip_prefix: str | None = None,
               device: torch.device | None = None) -> None:
    """Copy ``weights.get(prefix + name)`` into every parameter and persistent buffer of ``module``.

    Tied parameters (lm_head.weight is embed_tokens.weight) are filled once; a tensor missing from the
    checkpoint is an error, except a tied one whose twin is present."""
    available = set(weights.names())
    seen: set[int] = set()
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers())
    persistent = set(module.state_dict(keep_vars=True).keys())
    missing = []
    for name, t in tensors:
        full = prefix + name
        if skip_prefix and full.startswith(skip_prefix):
            continue
        if name not in persistent and not isinstance(t, nn.Parameter):
            continue                                              # non-persistent buffer (rotary table)
        if full not in available:
            if id(t) not in seen:
                missing.append(full)
            continue
        src = weights.get(full)
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"{full}: checkpoint shape {tuple(src.shape)} != model shape {tuple(t.shape)}")
        t.copy_(src.to(device=t.device, dtype=t.dtype))
        seen.add(id(t))
    missing = [m for m in missing if not any(id(t) in seen for n, t in tensors if prefix + n == m)]
    if missing:
        raise KeyError(f"the checkpoint has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every Linear4bit (adapter-free) by a dense ``nn.Linear`` holding dequant(W) in ``dtype``."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Linear4bit):
            set_submodule(model, name, _dense_linear(mod.dequantize(torch.float32), mod.bias, dtype))
    return model


def _dense_linear(weight_fp32: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight_fp32.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight_fp32.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight_fp32.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(dtype))
    lin.requires_grad_(False)
    return lin


def merge_for_deployment(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    r"""QLoRA model -> plain 16-bit model, in place: for every adapter on a 4-bit base

        W_16 = cast_dtype( dequant(W_nf4) + s B A )      (sum in fp32, one rounding at the end)

    the layer becomes an ``nn.Linear`` in ``dtype``; Linear4bit layers without adapters are dequantised;
    adapters on dense bases are merged as usual; finally the whole model is cast to ``dtype``.
    Merging into the *original* 16-bit weights instead would add the 4-bit quantisation error the
    adapter was trained to live with (see :func:`requantization_error`, ``original=``).
    """
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if isinstance(base, Linear4bit):
            if layer.merged:
                layer.unmerge()
            merged = base.dequantize(torch.float32)
            if not layer.disabled:
                try:
                    merged = merged_weight(merged, layer.lora_A, layer.lora_B, layer.scaling)   # fp32 sum
                except ValueError as e:
                    raise ValueError(f"{name}: {e}; not exported") from None
            set_submodule(model, name, _dense_linear(merged, base.bias, dtype))
        else:
            if not layer.disabled:
                layer.merge()
            set_submodule(model, name, base)
    dequantize_model(model, dtype)
    return model.to(dtype)


@dataclass(frozen=True)
class MergeError:
    """Errors of deployment choices for one layer, relative to the adapted weight W_eff = dequant(W4) + s B A.

    All are ||W_choice - W_eff||_F / ||s B A||_F: the fraction of the learned update that is lost.
    """
    delta_norm: float             # ||s B A||_F
    merged_16bit: float           # W_choice = cast16(W_eff)               (merge_for_deployment)
    requantized: float            # W_choice = dequant(quant(W_eff))       (merge, then back to 4 bits)
    merged_into_original: float   # W_choice = W_orig + s B A              (nan unless ``original`` given)


def requantization_error(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                         original: dict[str, torch.Tensor] | None = None) -> dict[str, MergeError]:
    """Measure, per QLoRA layer, what each way of deploying a trained adapter costs (see MergeError).

    Keeping the adapter separate is exact by definition (error 0). ``original``: optional
    {layer name: original dense weight} to also measure merging into the pre-quantisation weights.
    A value near or above 1 means the choice wipes out about as much as the adapter learned.
    """
    out = {}
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if not isinstance(base, Linear4bit):
            continue
        with torch.no_grad():
            delta = layer.delta_weight()
            w_eff = base.dequantize(torch.float32) + delta
            dn = float(delta.norm())
            denom = dn if dn > 0 else float("nan")
            packed, state = quant.quantize_4bit(w_eff, base.blocksize, base.quant_type, base.double_quant)
            requant = quant.dequantize_4bit(packed, state, torch.float32)
            into_orig = float("nan")
            if original is not None and name in original:
                into_orig = float((original[name].to(delta.device).float() + delta - w_eff).norm()) / denom
            out[name] = MergeError(dn, float((w_eff.to(dtype).float() - w_eff).norm()) / denom,
                                   float((requant - w_eff).norm()) / denom, into_orig)
    return out


def summarize_merge_errors(errors: dict[str, MergeError]) -> dict[str, float]:
    """Mean of each relative error over layers (NaNs ignored)."""
    keys = ("merged_16bit", "requantized", "merged_into_original")
    res = {}
    for k in keys:
        vals = [getattr(e, k) for e in errors.values() if not math.isnan(getattr(e, k))]
        res[k] = sum(vals) / len(vals) if vals else float("nan")
    return res
