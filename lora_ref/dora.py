r"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

Every pretrained weight is a magnitude times a direction (Section 3, eq. 2)::

    W = m * W / ||W||_c          m = ||W||_c   one norm per output unit: (out,)

DoRA trains the magnitude ``m`` directly and the direction with LoRA (Section 4.1, eq. 5)::

    W' = m * (W + s B A) / ||W + s B A||_c

In nn.Linear's convention (W is (out, in), y = x W^T) the paper's column norm ||.||_c is the norm of
each *row* of W, i.e. over the inputs of one output unit: ``torch.linalg.norm(W, dim=1)``, shape (out,).
At init B = 0 and m = ||W||_c, so W' = W: the adapted model starts at the pretrained one, as LoRA does.

Section 4.3 (memory): the norm ||W + s B A||_c is treated as a constant in backward (detached), so
no gradient flows through it; it still changes in forward as B A changes. PEFT does the same
(``peft/tuners/lora/dora.py``), and so does :func:`dora_forward`.

Without forming W' (PEFT's forward; only x W^T and the LoRA branch are computed)::

    g = m / ||W + s B A||_c                     (out,), detached norm
    y = x W^T + b + (g - 1) * (x W^T) + g * s * (x A^T B^T)
      = g * (x W^T + s x A^T B^T) + b           (the bias is not rescaled)

Extra trainable parameters over LoRA: ``out_features`` per layer (the magnitude vector).
State-dict / PEFT key of the magnitude: ``<module>.lora_magnitude_vector``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import LoRALinear, check_merge_finite, merged_weight


def column_norm(W: torch.Tensor) -> torch.Tensor:
    """||W||_c of DoRA eq. 2 for an nn.Linear weight W (out, in): the norm of each row, shape (out,)."""
    if W.dim() != 2:
        raise ValueError(f"W must be a matrix (out, in), got shape {tuple(W.shape)}")
    return torch.linalg.norm(W, dim=1)


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A||_c, detached (DoRA Section 4.3): shapes W (out, in), A (r, in), B (out, r) -> (out,).

    Computed in W's dtype from B A detached, as PEFT's ``DoraLinearLayer.get_weight_norm``.
    """
    lora_weight = (B.detach() @ A.detach()).to(W.dtype)
    return column_norm(W + scaling * lora_weight).detach()


def dora_extra(x: torch.Tensor, base_result: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """What DoRA adds on top of the base layer's output: (g - 1) * x W^T + g * s * x A^T B^T.

    ``base_result`` is x W^T without the bias (out of the base layer, bias removed, or recomputed on the
    dropped-out input). g = m / ||W + s B A||_c is detached in its norm (Section 4.3). The order of
    operations is PEFT's ``DoraLinearLayer.forward``, so the two agree to the last rounding.
    Shapes: x (..., in), base_result (..., out), W (out, in), A (r, in), B (out, r), magnitude (out,).
    """
    g = (magnitude / dora_weight_norm(W, A, B, scaling)).view(1, -1)      # (1, out)
    lora = (x.to(A.dtype) @ A.t()) @ B.t()                                 # never forms B A for the input
    return (g - 1) * base_result + g * lora * scaling


def dora_forward(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA's output y = g * (x W^T + s x A^T B^T) + b with g = m / ||W + s B A||_c (detached norm).

    Shapes: x (..., in), W (out, in), bias (out,) or None, A (r, in), B (out, r), magnitude (out,) -> (..., out).
    Gradients reach A, B and the magnitude, never through the norm. The bias is not rescaled.
    """
    base = F.linear(x, W)                                                  # x W^T, no bias
    out = base + dora_extra(x, base, W, A, B, magnitude, scaling).to(base.dtype)
    return out if bias is None else out + bias


def dora_merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """W' = m * (W + s B A) / ||W + s B A||_c (eq. 5), shape (out, in), in W's dtype (math in >= fp32)."""
    work = torch.promote_types(W.dtype, torch.float32)
    V = merged_weight(W.to(work), A.detach(), B.detach(), scaling)        # W + s B A (shapes, finiteness)
    g = magnitude.detach().to(work) / column_norm(V)
    return check_merge_finite(g.view(-1, 1) * V).to(W.dtype)             # a zero row of V: g = inf


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight the layer computes with: dequantised when the base is 4-bit (lora_ref.qlora)."""
    return base.dequantize(torch.float32) if hasattr(base, "dequantize") else base.weight


class DoRALinear(LoRALinear):
    """A LoRALinear whose update is split into a trained magnitude and a LoRA-adapted direction.

    Same constructor as :class:`lora_ref.lora.LoRALinear`; adds ``lora_magnitude_vector`` (out,),
    initialised to ||W||_c (+ s B A, which is 0 at init). Dropout, as in PEFT, applies to the input of
    both the rescaled base term and the LoRA term: y = base(x) + (g - 1) x_d W^T + g s x_d A^T B^T.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        W = _dense_weight(base)
        norm = dora_weight_norm(W.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling)
        self.lora_magnitude_vector = nn.Parameter(norm.clone())          # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        out = self.base_layer(x)
        if self.disabled or self.merged:
            return out
        W = _dense_weight(self.base_layer).to(x.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            xd, base_result = x, (out if bias is None else out - bias)    # reuse the base output (PEFT)
        else:
            xd = self.dropout(x)
            base_result = F.linear(xd, W)                                  # the base term sees the same mask
        extra = dora_extra(xd, base_result, W, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling)
        return out + extra.to(out.dtype)

    def merge(self) -> None:
        """W <- m * (W + s B A) / ||W + s B A||_c; the norm is kept so that unmerge inverts it."""
        if self.merged:
            return
        w = self._mergeable_weight()
        work = torch.promote_types(w.dtype, torch.float32)
        norm = dora_weight_norm(w.data.to(work), self.lora_A.to(work), self.lora_B.to(work), self.scaling)
        w.data.copy_(dora_merged_weight(w.data, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling))
        self._merge_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        """W <- W' / g - s B A with the norm saved at merge time (PEFT's unmerge)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        work = torch.promote_types(w.dtype, torch.float32)
        g = (self.lora_magnitude_vector.detach().to(work) / self._merge_norm).view(-1, 1)
        w.data.copy_((w.data.to(work) / g - self.delta_weight().to(work)).to(w.dtype))
        del self._merge_norm
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


def dora_param_count(shape, r: int, targets) -> int:
    """Trainable parameters of DoRA on ``targets`` of every layer of a model shape (lora_ref.memory presets):
    LoRA's r (in + out) per projection plus the magnitude vector, out_features per projection."""
    from . import memory as mem

    dims = mem.linear_shapes(shape)
    magnitudes = sum(dims[t][0] for t in targets) * mem.get_shape(shape).n_layers
    return mem.lora_param_count(shape, r, targets) + magnitudes
