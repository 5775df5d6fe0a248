r"""LoftQ: LoRA-fine-tuning-aware quantisation (Li et al., 2023, arXiv 2310.08659).

QLoRA starts from Q(W) + s B A with B = 0, i.e. from the quantised model: its step-0 error is the whole
quantisation error W - Q(W). LoftQ chooses Q and the adapter *together* so that Q + s B A ~ W
(Section 3, eq. 6: min ||W - Q - A B^T||_F), alternating T times (Algorithm 1)::

    R_0 = W
    for t = 1..T:
        Q_t   = dequant(quant(W - L_{t-1} R_{t-1}))        (L_0 R_0 = 0: Q_1 = Q(W), plain QLoRA)
        L_t R_t = best rank-r approximation of W - Q_t      (SVD: L = U sqrt(S), R = sqrt(S) V^T)

and returns Q_T, A = R_T, B = L_T (PEFT's ``loftq_init`` in ``peft/utils/loftq_utils.py``, which uses
bitsandbytes' NF4 with blocksize 64 and no double quantisation: lora_ref.quant gives the same codes).

Scaling: PEFT puts L and R in B and A as they are, so its adapter adds s L R: right only when
s = alpha / r = 1 (peft issue #1982). Here both factors are divided by sqrt(s), as PiSSA's are, so
s B A = L R for every alpha; with s = 1 the two are identical.

The error after t = 1 is ||(W - Q(W)) - best_rank_r(W - Q(W))||_F <= ||W - Q(W)||_F: LoftQ never starts
worse than QLoRA, and more iterations can reduce it further (the paper uses T = 5 for 4 bits).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ._checks import check_int

from . import quant
from .lora import LoRAConfig, inject_lora, lora_layers
from .lowrank import _check_matrix, _check_rank


def nf4_roundtrip(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                  quant_type: str = "nf4") -> torch.Tensor:
    """dequant(quant(W)) in fp32, shape of W: the weight a 4-bit layer computes with (lora_ref.quant)."""
    packed, state = quant.quantize_4bit(W.float(), blocksize, quant_type, double_quant)
    return quant.dequantize_4bit(packed, state, torch.float32)


def low_rank_factors(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (m, r), R (r, n)) with L R the best rank-r approximation of M: L = U sqrt(S), R = sqrt(S) V^T."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = torch.sqrt(S[:r])
    return U[:, :r] * root, root.unsqueeze(1) * Vh[:r]


@torch.no_grad()
def loftq_factors(W: torch.Tensor, r: int, scaling: float = 1.0, num_iter: int = 1,
                  quantize: Callable[[torch.Tensor], torch.Tensor] | None = None, blocksize: int = 64,
                  double_quant: bool = False, quant_type: str = "nf4"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ Algorithm 1: (Q (out, in) dequantised, A (r, in), B (out, r)), all fp32, Q + s B A ~ W.

    ``quantize`` maps a weight to dequant(quant(weight)); default :func:`nf4_roundtrip` with ``blocksize``,
    ``double_quant`` and ``quant_type``. Q is exactly representable in the 4-bit format (it is a
    dequantised result), so quantising it again with the same settings gives it back. ``num_iter`` = T >= 1.
    """
    _check_matrix(W)
    _check_rank(r, W)
    num_iter = check_int("num_iter", num_iter, minimum=1)
    if not scaling > 0:
        raise ValueError(f"scaling={scaling!r} must be positive")
    W = W.detach().float()
    residual = W
    for _ in range(num_iter):                                                # Q_t = q(W - L_{t-1} R_{t-1})
        Q = quantize(residual).float() if quantize else nf4_roundtrip(residual, blocksize, double_quant, quant_type)
        L, R = low_rank_factors(W - Q, r)                                    # L_t R_t ~ W - Q_t
        residual = W - L @ R
    root = math.sqrt(scaling)
    return Q, R / root, L / root


def step0_error(W: torch.Tensor, Q: torch.Tensor, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                scaling: float = 1.0) -> float:
    """Relative step-0 error ||W - (Q + s B A)||_F / ||W||_F (no adapter: ||W - Q||_F / ||W||_F)."""
    approx = Q.float() if A is None else Q.float() + scaling * (B.float() @ A.float())
    return float((W.float() - approx).norm() / W.float().norm())


@torch.no_grad()
def apply_loftq(model: nn.Module, num_iter: int = 1, blocksize: int = 64, double_quant: bool = False,
                quant_type: str = "nf4") -> dict[str, dict[str, float]]:
    """LoftQ-initialise every LoRA layer of a *dense* model in place (after ``inject_lora``): each base
    weight becomes Q_T (so ``lora_ref.qlora.quantize_model`` with the same settings stores it exactly)
    and A, B the factors. Returns per layer the step-0 errors {'qlora': ||W - Q(W)||/||W||, 'loftq': ...}."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call inject_lora first")
    errors = {}
    for name, layer in layers.items():
        w = layer.base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError(f"{name}: LoftQ needs the dense base weight, got {w.dtype}; run it before quantising")
        W = w.detach().float()
        Q, A, B = loftq_factors(W, layer.r, layer.scaling, num_iter, None, blocksize, double_quant, quant_type)
        errors[name] = {"qlora": step0_error(W, nf4_roundtrip(W, blocksize, double_quant, quant_type)),
                        "loftq": step0_error(W, Q, A, B, layer.scaling)}
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))
        w.copy_(Q.to(w.dtype))
    return errors
