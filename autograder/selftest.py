"""A two-exercise course used to test the autograder without depending on the real notebooks.

``SOURCE`` is a percent-format notebook source (see tools/build_notebooks.py) for an assignment
``99_selftest``; its exercises ``99.lora_delta`` and ``99.scaled_linear`` are registered by
:mod:`autograder.selftest_exercises`, which the grading run's processes import when the environment variable
``AUTOGRADER_EXTRA_EXERCISES`` names it (:func:`autograder.course.register_extra_exercises`; tests set it,
a real grading run does not).
:func:`build_course` writes the instructor notebook into a temporary course folder.
"""
from __future__ import annotations

from pathlib import Path

ASSIGNMENT = "99_selftest"

SOURCE = '''
# %% [markdown]
# # Self-test assignment
# %% locked id=setup
import math
import matplotlib.pyplot as plt   # its import must leave no warning in the feedback (config folder, fonts)
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

