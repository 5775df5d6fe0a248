r"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2021, arXiv 2106.09685).

A frozen weight W (out x in) is adapted by a trainable low-rank update::

        x ──────────────► W x ───────────────┐            (frozen base layer, wrapped, not copied)
        │                                     (+) ──► h
        └─► dropout ─► A (r x in) ─► B (out x r) ─► * s ┘   (trainable, s = alpha / r)

    h = W x + s * B A dropout(x),     delta W = s * B A      (Section 4.1, eq. 3)

Shapes follow ``nn.Linear`` and PEFT's file format: ``A`` is (r, in_features), ``B`` is (out_features, r),
so an adapter is exported without transposes. (The seed article uses A (in x r), B (r x out) and
transposes on merge; that is the same maths in a convention nothing else reads.)

State-dict keys: wrapping ``q_proj`` turns ``...q_proj.weight`` into ``...q_proj.base_layer.weight``
and adds ``...q_proj.lora_A`` / ``...q_proj.lora_B`` (the names PEFT uses in memory).
``merge_and_unload`` gives back a plain ``nn.Linear`` under the original key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import as_int, as_real, check_int, check_real

ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``r`` update ``s * B @ A``.

    Args:
        base: the layer to adapt; any module with ``in_features``, ``out_features`` and a ``weight``
            (``nn.Linear``, or a quantised linear that dequantises its weight). It is kept by reference.
        r: rank of the update, 1 <= r <= min(in, out).
        alpha: scaling numerator; s = alpha / r, or alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023:
            keeps the update's scale stable as r grows).
        dropout: dropout probability on the LoRA branch input only (the base path is untouched).

    Init (Section 4.1): A ~ kaiming_uniform(a=sqrt(5)) (as nn.Linear and PEFT do; the paper says Gaussian),
    B = 0, so B A = 0 and the adapted model starts exactly at the pretrained one.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        for attr in ("in_features", "out_features", "weight"):
            if not hasattr(base, attr):
                raise TypeError(f"LoRALinear wraps a linear layer; {type(base).__name__} has no {attr!r}")
        in_f, out_f = int(base.in_features), int(base.out_features)
        r_int = as_int(r)                               # int, numpy or 0-d tensor integers (sweeps pass np.int64)
        if r_int is None or not 1 <= r_int <= min(in_f, out_f):
            raise ValueError(f"rank r={r!r} must be an integer in [1, min(in_features, out_features)] = "
                             f"[1, {min(in_f, out_f)}] for a {out_f}x{in_f} layer")
        r = r_int
        alpha = check_real("alpha", alpha, positive=True)
        dropout = _check_dropout(dropout)

        self.base_layer = base
        for p in base.parameters():                     # frozen: only A and B learn
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(self.alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        w = base.weight
        # adapters train in fp32 when the base is half precision or quantised (PEFT's autocast_adapter_dtype)
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=dtype))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=w.device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LoRALinear expects a torch.Tensor of shape (..., {self.in_features}), "
                            f"got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"input is a 0-d tensor (a scalar); expected shape (..., {self.in_features})")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"input dtype {x.dtype} is not floating point")
        out = self.base_layer(x)
        if self.disabled or self.merged:                # merged: the update already lives in W
            return out
        h = self.dropout(x).to(self.lora_A.dtype)
        update = (h @ self.lora_A.t()) @ self.lora_B.t()   # (..., in) -> (..., r) -> (..., out): never forms B A
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """delta W = s * B @ A, shape (out, in), in at least fp32 (half-precision products lose bits)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)      # fp64 stays fp64
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def _mergeable_weight(self) -> torch.Tensor:
        """The base weight a merge writes into: floating point only (a 4-bit one is dequantised first)."""
        w = self.base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError(f"cannot merge into a {w.dtype} weight; dequantise it first (see lora_ref.qlora)")
        return w

    def _apply_delta(self, sign: float) -> None:
        w = self._mergeable_weight()
        w.data.copy_(merged_weight(w.data, self.lora_A, self.lora_B, self.scaling, sign))

    def merge(self) -> None:
        """W <- W + s B A. Idempotent: merging twice is a no-op (guarded by ``merged``)."""
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """W <- W - s B A: the inverse of merge (exact up to the weight dtype's rounding)."""
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def enable_adapters(self, enabled: bool = True) -> None:
        self.disabled = not enabled

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:.4g}{', rslora' if self.use_rslora else ''}"
                f"{', merged' if self.merged else ''}")


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    r"""The factor s of the update s B A: alpha / r (LoRA Section 4.1), or alpha / sqrt(r) with rsLoRA.

    rsLoRA (Kalajdzievski 2023, arXiv 2312.03732, Theorem 3.2): with alpha / r the update's size shrinks as r
    grows; alpha / sqrt(r) keeps it stable (PEFT's ``use_rslora=True``). Notebook 02's ``lora_scaling``.
    Raises ValueError unless r is a positive integer and alpha a positive finite number.
    """
    r = check_int("r", r, minimum=1)
    alpha = check_real("alpha", alpha, positive=True)
    return alpha / (math.sqrt(r) if use_rslora else r)


def merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  sign: float = 1.0) -> torch.Tensor:
    r"""W' = W + sign * s B A, summed in at least fp32 (fp64 stays fp64) and rounded once to W's dtype.

    The one merge of the package: :meth:`LoRALinear.merge`/``unmerge`` (``sign=-1``), ``QLoRALinear.merge``,
    ``qlora.merge_for_deployment`` and serving's merged models all call it (PEFT merges the same way).
    Shapes: W (out, in), A (r, in), B (out, r). Raises ValueError on shapes that do not fit or a non-finite
    result (PEFT's ``safe_merge``; nothing is written). Rounding the sum to bf16 loses every part of s B A
    smaller than half a bf16 step of W (peft#1388): measured in notebook 07.
    """
    r = A.shape[0] if A.dim() == 2 else -1
    if W.dim() != 2 or A.dim() != 2 or A.shape != (r, W.shape[1]) or B.shape != (W.shape[0], r):
        raise ValueError(f"shapes do not fit W' = W + s B A: W {tuple(W.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)} (need A (r, in), B (out, r))")
    work = torch.promote_types(torch.promote_types(W.dtype, A.dtype), torch.float32)
    delta = (B.to(work) @ A.to(work)) * scaling                   # s B A, (out, in)
    return check_merge_finite(W.to(work) + sign * delta).to(W.dtype)


def check_merge_finite(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` if every entry is finite, else ValueError: a merge writes nothing it cannot undo."""
    if not torch.isfinite(weight).all():
        raise ValueError("merging would produce non-finite weights (NaN/Inf); nothing merged")
    return weight


def _check_dropout(dropout) -> float:
    """A probability in [0, 1) as a float: 0.1, np.float32(0.1) or a 0-d tensor, but not the string '0.1'."""
    p = as_real(dropout)
    if p is None or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
    return p


@dataclass
class LoRAConfig:
    """Which layers get adapters and how big they are. Mirrors PEFT's LoraConfig fields."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str = field(default_factory=lambda: ("q_proj", "v_proj"))
    use_rslora: bool = False
    exclude_modules: Sequence[str] = ("lm_head",)   # "all-linear" never adapts the output head (as PEFT)
    use_dora: bool = False                          # DoRA layers (lora_ref.dora.DoRALinear), as PEFT's use_dora

    def __post_init__(self):
        # plain Python numbers from here on (np.int64 from a sweep would break json.dumps of the config)
        self.r = check_int("r", self.r, minimum=1)
        self.alpha = check_real("alpha", self.alpha, positive=True)
        self.dropout = _check_dropout(self.dropout)
        self.exclude_modules = ((self.exclude_modules,) if isinstance(self.exclude_modules, str)
                                else tuple(self.exclude_modules or ()))
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            self.target_modules = (self.target_modules,)
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty")


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names of the model's linear layers, e.g. ['down_proj', 'gate_proj', ..., 'v_proj']."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def _matches(name: str, config: LoRAConfig) -> bool:
    short = name.rsplit(".", 1)[-1]
    # PEFT's exclude_modules rule: the last name component, the whole dotted name, a suffix, or a regex
    if any(short == ex or name == ex or name.endswith("." + ex) or re.fullmatch(ex, name)
           for ex in config.exclude_modules):
        return False
    if config.target_modules == ALL_LINEAR:
        return True
    # a target matches the last name component, or the whole dotted name (PEFT's rule), or a regex on it
    return any(short == t or name == t or name.endswith("." + t) or re.fullmatch(t, name)
               for t in config.target_modules)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model`` ('model.layers.0.mlp.up_proj'), replacing what
    was there: how LoRA, quantisation and serving swap layers in place."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def targeted_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The (name, linear layer) pairs ``inject_lora`` would wrap, without changing ``model``.

    Raises ValueError if the model already carries LoRA layers, if a target matches nothing (listing the
    model's linear layer names: PEFT's most asked question, "Target modules ... not found in the base
    model"), or if r is larger than a targeted layer allows.
    """
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"LoRA is already injected into this model ({len(existing)} LoRALinear layers, e.g. "
                         f"{next(iter(existing))}); lora_ref keeps one adapter per model: load a fresh model, "
                         "or merge_and_unload first (several adapters: lora_ref.serving.AdapterServer)")
    linears = [(n, m) for n, m in model.named_modules()
               if not isinstance(m, LoRALinear) and _is_linear_like(m) and not n.endswith(".base_layer")]
    targets = [(n, m) for n, m in linears if _matches(n, config)]
    if config.target_modules != ALL_LINEAR:
        # a target whose layers are all excluded is not an error (PEFT: exclude_modules wins)
        hit = {t for t in config.target_modules for n, _ in linears
               if n.rsplit(".", 1)[-1] == t or n == t or n.endswith("." + t) or re.fullmatch(t, n)}
        missing = [t for t in config.target_modules if t not in hit]
        if missing:
            non_linear = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in missing]
            why = (f" ({', '.join(non_linear[:3])} {'is' if len(non_linear) == 1 else 'are'} not nn.Linear)"
                   if non_linear else "")
            raise ValueError(f"target_modules {missing} match no linear layer{why}. "
                             f"This model's linear layers are: {linear_module_names(model)}")
    if not targets:
        raise ValueError(f"no linear layer to adapt; linear layers: {linear_module_names(model)}")
    too_small = [(n, m) for n, m in targets if config.r > min(int(m.in_features), int(m.out_features))]
    if too_small:
        n, m = too_small[0]
        raise ValueError(f"rank r={config.r} is larger than {len(too_small)} targeted layer(s) allow, e.g. {n} "
                         f"({m.out_features}x{m.in_features}: r <= {min(int(m.in_features), int(m.out_features))})")
    return targets


def select_targets(model: nn.Module, target_modules: Sequence[str] | str,
                   exclude_modules: Sequence[str] = ("lm_head",)) -> list[str]:
    """The full names of the linear layers LoRA wraps for ``target_modules`` (short names, dotted names,
    regexes or "all-linear"), sorted; notebook 03's ``select_targets``. ValueError as :func:`inject_lora`
    for a target that matches no linear layer. The rank plays no part in the choice."""
    config = LoRAConfig(r=1, alpha=1.0, target_modules=target_modules, exclude_modules=exclude_modules)
    return sorted(name for name, _ in targeted_layers(model, config))


def lora_trainable_params(model: nn.Module, target_modules: Sequence[str] | str, r: int) -> int:
    """Parameters LoRA of rank r trains on ``target_modules``: sum over the wrapped layers of r (in + out)
    (LoRA Section 4.1), without touching the model; notebook 03's ``lora_trainable_params``. Equals
    ``count_parameters(inject_lora(model, LoRAConfig(r=r, target_modules=...))).trainable``."""
    config = LoRAConfig(r=r, alpha=float(r), target_modules=target_modules)
    return sum(config.r * (int(m.in_features) + int(m.out_features)) for _, m in targeted_layers(model, config))


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every targeted linear layer of ``model`` in a LoRALinear, in place; freeze everything else.

    All or nothing: every check (:func:`targeted_layers`) runs before the model is changed. A new layer
    takes the train/eval mode of the layer it wraps, as PEFT's do: injecting into a model in eval mode
    gives deterministic outputs (LoRA dropout off) without another ``model.eval()``.
    """
    targets = targeted_layers(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    layer_cls = LoRALinear
    if config.use_dora:                             # the same layer plus a trained magnitude (DoRA)
        from .dora import DoRALinear as layer_cls
    for name, module in targets:
        layer = layer_cls(module, config.r, config.alpha, config.dropout, config.use_rslora)
        set_submodule(model, name, layer.train(module.training))
    return model


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or getattr(m, "is_lora_base", False)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model).values():
        layer.enable_adapters(enabled)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layer back (no added latency)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        set_submodule(model, name, layer.base_layer)
    return model


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {100 * self.ratio:.4f}")


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable vs total parameters; tied weights (embedding = lm_head) are counted once, as PEFT does."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():            # parameters() already yields each shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return ParamCount(trainable, total)


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
