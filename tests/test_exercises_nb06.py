"""Notebook 06's graded exercises: the notebook's own solutions pass every hidden case, and the mistakes
the exercise is about (a Function that keeps the dense weight, a double-quant decode without the offset,
a dropped bias gradient, adapters in the wrong shape) are caught."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_ref import qlora, quant
from lora_ref.exercises import check, get
from test_exercises_nb05 import answers


@pytest.fixture(scope="module")
def nb():
    ns = answers("06_qlora_on_a_gpu")
    return ns


@pytest.mark.parametrize("exercise", ["06.dequantize_4bit", "06.dequantize_4bit_linear", "06.qlora_linear"])
def test_notebook_solution_passes_hidden_tests(nb, exercise):
    check(exercise, nb[get(exercise).symbol])


def test_reference_passes_its_own_cases():
    for ex_id in ("06.dequantize_4bit", "06.dequantize_4bit_linear", "06.qlora_linear"):
        ex = get(ex_id)
        out = ex.run(ex.reference, ex.cases()[0])
        assert out, ex_id
    out = get("06.dequantize_4bit_linear").run(qlora.Dequantize4bitLinear, get("06.dequantize_4bit_linear").cases()[0])
    assert not out["keeps_dense_weight"]


def test_decode_without_offset_fails(nb):
    def no_offset(packed, state, dtype=None):
        if state.state2 is None:
            return nb["dequantize_4bit"](packed, state, dtype)
        s = quant.QuantState(absmax=state.absmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                             quant_type=state.quant_type, code=state.code, offset=0.0, state2=state.state2)
        return nb["dequantize_4bit"](packed, s, dtype)
    with pytest.raises(AssertionError, match="06.dequantize_4bit"):
        check("06.dequantize_4bit", no_offset)


def test_naive_function_that_saves_the_weight_fails(nb):
    deq = nb["dequantize_4bit"]

    class Naive(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, packed, state, bias):
            w = deq(packed, state, x.dtype)
            ctx.save_for_backward(w)
            ctx.has_bias = bias is not None
            return F.linear(x, w, bias)

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
            return g @ w, None, None, gb

    with pytest.raises(AssertionError, match="keeps_dense_weight"):
        check("06.dequantize_4bit_linear", Naive)

    class AsAttribute(Naive):
        @staticmethod
        def forward(ctx, x, packed, state, bias):
            ctx.w = deq(packed, state, x.dtype)
            return F.linear(x, ctx.w, bias)

        @staticmethod
        def backward(ctx, g):
            gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
            return g @ ctx.w, None, None, gb

    with pytest.raises(AssertionError, match="keeps_dense_weight"):
        check("06.dequantize_4bit_linear", AsAttribute)


def test_dropped_bias_gradient_fails(nb):
    Good = nb["Dequantize4bitLinear"]

    class NoBiasGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, packed, state, bias):
            ctx.state = state
            ctx.save_for_backward(packed)
            return Good.forward(ctx, x, packed, state, bias)

        @staticmethod
        def backward(ctx, g):
            gx, _, _, _ = Good.backward(ctx, g)
            return gx, None, None, None

    with pytest.raises(AssertionError, match="grad_bias"):
        check("06.dequantize_4bit_linear", NoBiasGrad)


def test_article_adapter_shapes_fail(nb):
    Good = nb["QLoRALinear"]

    class Transposed(Good):                       # the article's A (in, r), B (r, out)
        def __init__(self, base, r=8, alpha=16.0):
            super().__init__(base, r, alpha)
            self.lora_A = torch.nn.Parameter(self.lora_A.detach().t().contiguous())
            self.lora_B = torch.nn.Parameter(self.lora_B.detach().t().contiguous())

        def forward(self, x):
            base = self.base_layer
            out = base(x)
            return out + self.scaling * (x @ self.lora_A @ self.lora_B)

    with pytest.raises(AssertionError, match="06.qlora_linear"):
        check("06.qlora_linear", Transposed)
