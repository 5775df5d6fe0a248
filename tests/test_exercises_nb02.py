"""The hidden checks of notebook 02 accept lora_ref and catch each classic LoRALinear mistake.

Every mutant below is lora_ref's layer with one mistake (most of them the seed article's); a hidden
check that let one through would be a test that cannot fail.
"""
import math

import pytest
import torch
import torch.nn as nn

from lora_ref.exercises import check, get
from lora_ref.lora import lora_scaling as reference_scaling
from lora_ref.lora import LoRALinear

LAYER_CHECKS = ["02.lora_init", "02.lora_forward", "02.lora_forward_half", "02.lora_merge",
                "02.lora_merge_half"]


def test_reference_passes_every_check():
    check("02.lora_scaling", reference_scaling)
    for ex in LAYER_CHECKS:
        check(ex, LoRALinear)


def test_cases_are_deterministic_and_cover_dtypes():
    for ex in LAYER_CHECKS:
        assert get(ex).cases() == get(ex).cases()
    dtypes = {c["dtype"] for ex in LAYER_CHECKS for c in get(ex).cases()}
    assert dtypes == {"float32", "float64", "bfloat16", "float16"}
    assert any(c["dropout"] > 0 and c["train"] for c in get("02.lora_forward").cases())
    assert any(c["use_rslora"] for c in get("02.lora_forward").cases())


class ArticleShapes(LoRALinear):
    """The article's convention: A (in, r), B (r, out); kaiming then reads fan_in = r."""
    def __init__(self, base, r=8, alpha=16.0, dropout=0.0, use_rslora=False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        A = torch.empty(self.in_features, r, dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A.T.contiguous())          # right shape, wrong bound


class CopiesBase(LoRALinear):
    def __init__(self, base, *args, **kwargs):
        clone = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None).to(base.weight.dtype)
        clone.weight.data = base.weight.data.clone()
        if base.bias is not None:
            clone.bias.data = base.bias.data.clone()
        super().__init__(clone, *args, **kwargs)


class IgnoresRsLoRA(LoRALinear):
    def __init__(self, base, r=8, alpha=16.0, dropout=0.0, use_rslora=False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        self.scaling = self.alpha / r


class HalfAdapters(LoRALinear):
    """A and B in the base's half dtype instead of float32."""
    def __init__(self, base, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        self.lora_A = nn.Parameter(self.lora_A.detach().to(base.weight.dtype))
        self.lora_B = nn.Parameter(self.lora_B.detach().to(base.weight.dtype))


class DropoutOnEverything(LoRALinear):
    def forward(self, x):
        out = self.base_layer(self.dropout(x))
        if self.merged:
            return out
        return out + (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling).to(out.dtype)


class AddsUpdateAfterMerge(LoRALinear):
    def forward(self, x):
        out = self.base_layer(x)
        return out + (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling).to(out.dtype)


class MergeNotIdempotent(LoRALinear):
    def merge(self):
        self._apply_delta(+1.0)
        self.merged = True


class MergeForgetsScaling(LoRALinear):
    def delta_weight(self):
        return self.lora_B.float() @ self.lora_A.float()


class MergesInHalf(LoRALinear):
    def delta_weight(self):
        w = self.base_layer.weight
        return (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)) * self.scaling


@pytest.mark.parametrize("mutant, exercise", [
    (ArticleShapes, "02.lora_init"),
    (CopiesBase, "02.lora_init"),
    (IgnoresRsLoRA, "02.lora_init"),
    (IgnoresRsLoRA, "02.lora_forward"),
    (HalfAdapters, "02.lora_init"),
    (DropoutOnEverything, "02.lora_forward"),
    (AddsUpdateAfterMerge, "02.lora_merge"),
    (MergeNotIdempotent, "02.lora_merge"),
    (MergeForgetsScaling, "02.lora_merge"),
    (MergesInHalf, "02.lora_merge_half"),
])
def test_each_mistake_is_caught(mutant, exercise):
    with pytest.raises(AssertionError, match=exercise.replace(".", r"\.")):
        check(exercise, mutant)


def test_scaling_mistakes_are_caught():
    with pytest.raises(AssertionError):
        check("02.lora_scaling", lambda alpha, r, use_rslora=False: alpha / r)
    with pytest.raises(AssertionError):
        check("02.lora_scaling", lambda alpha, r, use_rslora=False: alpha / math.sqrt(r))
