"""Notebook 10's hidden tests: the reference passes, typical mistakes fail."""
import pytest
import torch
import torch.nn.functional as F

from lora_ref.dora import column_norm, dora_forward, dora_merged_weight
from lora_ref.exercises import check, draw_cases, get
from lora_ref.loftq import loftq_factors
from lora_ref.loraplus import loraplus_param_groups
from lora_ref.pissa import pissa_factors

IDS = ["10.dora_forward", "10.dora_merge", "10.pissa_factors", "10.loftq_factors", "10.loraplus_groups"]


@pytest.mark.parametrize("ex_id", IDS)
def test_reference_passes_and_cases_are_seeded(ex_id):
    ex = get(ex_id)
    check(ex_id, ex.reference)
    assert len(draw_cases(ex, secret=123)) == len(ex.cases())


def test_dora_with_attached_norm_fails():
    def attached(x, W, bias, A, B, m, s):
        V = W + s * B @ A
        out = x @ ((m / column_norm(V)).unsqueeze(1) * V).t()
        return out if bias is None else out + bias
    with pytest.raises(AssertionError, match="grad_A|grad_B"):
        check("10.dora_forward", attached)


def test_dora_merge_rescaling_the_wrong_axis_fails():
    def wrong(W, A, B, m, s):
        V = W + s * B @ A
        return V * (m.mean() / V.norm(dim=0, keepdim=True))
    with pytest.raises(AssertionError):
        check("10.dora_merge", wrong)


def test_pissa_without_dividing_by_scaling_fails():
    def no_scaling(W, r, s):
        return pissa_factors(W, r, 1.0)[:2] + (W - s * pissa_factors(W, r, 1.0)[1] @ pissa_factors(W, r, 1.0)[0],)
    with pytest.raises(AssertionError):
        check("10.pissa_factors", no_scaling)


def test_loftq_without_alternating_fails():
    def one_shot(W, r, s, T, quantize):
        return loftq_factors(W, r, s, 1, quantize)
    with pytest.raises(AssertionError):
        check("10.loftq_factors", one_shot)


def test_loraplus_same_lr_for_b_fails():
    def same_lr(model, lr, ratio, wd):
        return loraplus_param_groups(model, lr, 1.0, wd)
    with pytest.raises(AssertionError, match="lr"):
        check("10.loraplus_groups", same_lr)
