"""A two-exercise course used to test the autograder without depending on the real notebooks.

``SOURCE`` is a percent-format notebook source (see tools/build_notebooks.py) for an assignment
``99_selftest``; importing this module registers its exercises ``99.lora_delta`` and ``99.scaled_linear``
in :mod:`lora_ref.exercises` (the grader imports it when ``LORA_REF_EXTRA_EXERCISES`` names it).
:func:`build_course` writes the instructor notebook into a temporary course folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_ref.exercises import Exercise, REGISTRY, register

ASSIGNMENT = "99_selftest"

SOURCE = '''
# %% [markdown]
# # Self-test assignment
# %% locked id=setup
import math
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
# %% answer id=lora_delta
def lora_delta(A, B, alpha, r):
    """delta W = (alpha / r) * B @ A, shape (out, in)."""
    ### BEGIN SOLUTION
    return (alpha / r) * (B @ A)
    ### END SOLUTION
# %% test id=test_lora_delta points=2
A = torch.ones(2, 3)
B = torch.ones(4, 2)
assert lora_delta(A, B, 4, 2).shape == (4, 3), "delta W must have shape (out, in)"
assert torch.allclose(lora_delta(A, B, 4, 2), torch.full((4, 3), 4.0)), "(4/2) * 2 = 4 in every entry"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("99.lora_delta", lora_delta)
### END HIDDEN TESTS
# %% answer id=scaled_linear
class ScaledLinear(nn.Module):
    """y = scale * (x @ W.T), W of shape (out, in)."""
    def __init__(self, weight, scale):
        super().__init__()
        ### BEGIN SOLUTION
        self.weight = nn.Parameter(weight.clone())
        self.scale = scale
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
        return self.scale * (x @ self.weight.T)
        ### END SOLUTION
# %% test id=test_scaled_linear points=3
m = ScaledLinear(torch.eye(3), 2.0)
assert torch.allclose(m(torch.ones(1, 3)), torch.full((1, 3), 2.0)), "identity weight, scale 2: y = 2x"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("99.scaled_linear", ScaledLinear)
### END HIDDEN TESTS
# %% [markdown] manual id=explain points=1
# Why is B initialised to zero?
'''


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


def build_course(root: Path) -> Path:
    """Write ``root/solutions/99_selftest/99_selftest.ipynb`` from SOURCE; return its path."""
    import importlib.util
    import nbformat

    spec = importlib.util.spec_from_file_location("build_notebooks", Path(__file__).resolve().parents[1] / "tools" / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    nb = builder.parse(SOURCE, ASSIGNMENT)
    path = Path(root) / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path

