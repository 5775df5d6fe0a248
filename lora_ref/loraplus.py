r"""LoRA+: different learning rates for A and B (Hayou et al., 2024, arXiv 2402.12354).

With one learning rate for both, the LoRA update is inefficient in wide models: feature learning needs
B's step to be larger than A's by a factor that grows with the width (Section 3, Theorem 1; Proposition 2
for the one-dimensional intuition). LoRA+ sets

    eta_B = lambda * eta_A,       lambda >> 1 (the paper's default lambda = 2^4 = 16, Section 4)

The parameter groups follow PEFT's ``create_loraplus_optimizer`` (``peft/optimizers/loraplus.py``)
exactly, for the trainable parameters of a model:

1. "A":           everything not below, lr = eta_A, weight decay ``weight_decay``
2. "B":           names containing ``lora_B`` and every 1-D parameter (biases, DoRA's magnitude vector),
                  lr = lambda * eta_A, weight decay ``weight_decay``
3. "B_no_decay":  those of group 2 inside an nn.LayerNorm or with "bias" in the name: weight decay 0

(PEFT's fourth group, LoRA on embeddings at ``loraplus_lr_embedding``, is empty here: lora_ref adapts
linear layers only.)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters inside an nn.LayerNorm or with 'bias' in the name (transformers' no-decay rule)."""
    out = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.LayerNorm) or "bias" in full:
                out.add(full)
    return out


def loraplus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The three LoRA+ groups of ``model``'s trainable parameters (see the module docstring).

    Each group is {"name", "params", "lr", "weight_decay"}; pass them to any torch optimizer.
    """
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be positive")
    if not lr_ratio > 0:
        raise ValueError(f"lr_ratio={lr_ratio!r} must be positive (LoRA+ uses lambda >= 1)")
    no_decay = _no_decay_names(model)
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    return [{"name": "A", "params": groups["A"], "lr": lr, "weight_decay": weight_decay},
            {"name": "B", "params": groups["B"], "lr": lr * lr_ratio, "weight_decay": weight_decay},
            {"name": "B_no_decay", "params": groups["B_no_decay"], "lr": lr * lr_ratio, "weight_decay": 0.0}]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                              *, lr: float, lr_ratio: float = 16.0, weight_decay: float = 0.0,
                              **kwargs) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups` (PEFT's ``create_loraplus_optimizer``; empty
    groups are dropped, since some optimizers refuse them)."""
    groups = [g for g in loraplus_param_groups(model, lr, lr_ratio, weight_decay) if g["params"]]
    if not groups:
        raise ValueError("model has no trainable parameters")
    return optimizer_cls(groups, lr=lr, **kwargs)
