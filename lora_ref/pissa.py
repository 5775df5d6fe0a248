r"""PiSSA: principal singular values and singular vectors adaptation (Meng et al., 2024, arXiv 2404.02948).

LoRA starts the adapter at zero (B = 0) and trains it from noise. PiSSA starts it at the *principal*
part of W and freezes the rest (Section 3, eqs. 2-5), in nn.Linear's convention W (out, in)::

    W = U diag(S) V^T                                     SVD, S descending
    B A = U[:, :r] diag(S[:r]) V[:, :r]^T / s             the top-r part, shared as sqrt(S) on both sides:
    A = diag(sqrt(S[:r] / s)) V[:, :r]^T      (r, in)
    B = U[:, :r] diag(sqrt(S[:r] / s))        (out, r)
    W_res = W - s B A                                     the residual, frozen in the base layer

so W_res + s B A = W: the adapted model equals the original at step 0, and training moves the
directions that carry most of W's energy. Dividing S by the scaling s = alpha / r is PEFT's convention
(``init_lora_weights="pissa"`` in ``peft/tuners/lora/layer.py``): it makes s B A the top-r part whatever
alpha is. (The paper's eqs. 2-3 have no s; with alpha = r they coincide.)

The SVD runs in fp32 (torch has no half-precision SVD), as PEFT's does; the residual is cast back to the
base weight's dtype. Singular vectors are defined up to a sign per pair (u_i, v_i); s B A and W_res are not.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lora import LoRALinear, lora_layers
from .lowrank import _check_matrix, _check_rank


def pissa_factors(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r), W_res (out, in)) with W_res + scaling * B @ A = W (PiSSA Section 3).

    A and B are fp32; W_res has W's dtype. Same SVD call and operations as PEFT's ``pissa_init``.
    """
    _check_matrix(W)
    _check_rank(r, W)
    if not scaling > 0:
        raise ValueError(f"scaling={scaling!r} must be positive")
    W32 = W.detach().to(torch.float32)
    U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
    Sr = S[:r] / scaling
    A = torch.diag(torch.sqrt(Sr)) @ Vh[:r]                   # (r, in)
    B = U[:, :r] @ torch.diag(torch.sqrt(Sr))                 # (out, r)
    W_res = W32 - scaling * B @ A
    return A, B, W_res.to(W.dtype)


@torch.no_grad()
def pissa_init(layer: LoRALinear) -> LoRALinear:
    """Initialise a LoRALinear in place with PiSSA: A, B from the top-r singular triplets of its base
    weight, the base weight replaced by the residual (the base layer object is kept, only its data changes)."""
    w = layer.base_layer.weight
    if not w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"PiSSA needs a floating-point base weight, got {w.dtype}: initialise before quantising "
                        "(then quantise the residual, as the paper's QPiSSA does)")
    A, B, W_res = pissa_factors(w, layer.r, layer.scaling)
    layer.lora_A.copy_(A.to(layer.lora_A.dtype))
    layer.lora_B.copy_(B.to(layer.lora_B.dtype))
    w.copy_(W_res)
    return layer


def apply_pissa(model: nn.Module) -> nn.Module:
    """PiSSA-initialise every LoRA layer of ``model`` (after ``inject_lora``), in place."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call inject_lora first")
    for layer in layers.values():
        pissa_init(layer)
    return model
