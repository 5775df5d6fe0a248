"""Exercises of the self-test assignment (see :mod:`autograder.selftest`): a reference and cases."""
from __future__ import annotations

import torch
from torch import nn

from lora_ref.exercises import REGISTRY, Exercise, register


def reference_lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    return (alpha / r) * (B @ A)


class ReferenceScaledLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.weight.T)


def _delta_cases():
    return [dict(seed=s, out=o, inn=i, r=r, alpha=a) for s, (o, i, r, a) in
            enumerate([(4, 3, 2, 4.0), (8, 16, 4, 8.0), (5, 7, 1, 1.0)])]


def _delta_run(fn, case):
    g = torch.Generator().manual_seed(case["seed"])
    A = torch.randn(case["r"], case["inn"], generator=g)
    B = torch.randn(case["out"], case["r"], generator=g)
    return {"delta": fn(A, B, case["alpha"], case["r"])}


def _linear_cases():
    return [dict(seed=s, out=o, inn=i, scale=k) for s, (o, i, k) in enumerate([(3, 3, 2.0), (6, 4, 0.5)])]


def _linear_run(cls, case):
    g = torch.Generator().manual_seed(case["seed"])
    w = torch.randn(case["out"], case["inn"], generator=g)
    x = torch.randn(5, case["inn"], generator=g, requires_grad=True)
    m = cls(w, case["scale"])
    y = m(x)
    y.sum().backward()
    return {"y": y.detach(), "x_grad": x.grad}


if "99.lora_delta" not in REGISTRY:
    register(Exercise("99.lora_delta", "lora_delta", reference_lora_delta, _delta_cases, _delta_run))
    register(Exercise("99.scaled_linear", "ScaledLinear", ReferenceScaledLinear, _linear_cases, _linear_run))
