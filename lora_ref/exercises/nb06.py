"""Hidden-test cases of notebook 06_qlora_on_a_gpu: the learner's QLoRA pieces against lora_ref.

    dequantize_4bit(packed, state, dtype=None)      -> lora_ref.quant.dequantize_4bit (plain and double quant)
    Dequantize4bitLinear (torch.autograd.Function)  -> lora_ref.qlora.Dequantize4bitLinear
    QLoRALinear(base: Linear4bit, r, alpha)         -> lora_ref.qlora.QLoRALinear

Each ``run`` also returns a flag the reference always passes: the Function must not keep the dequantised
weight for backward (neither through ``save_for_backward`` nor as a ``ctx`` attribute), which is the
whole point of QLoRA's memory saving and what a numerically correct but naive answer gets wrong.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_ref import qlora, quant
from lora_ref.exercises import Case, Exercise, given, given_only, register

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"])
    return (torch.randn(*case["shape"], generator=g) * case["std"]).to(_DTYPES[case["dtype"]])


def _dequant_cases(seed: int = 606) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for i in range(12):
        shape = rng.choice([(rng.randint(1, 60), rng.randint(1, 200)), (rng.randint(1000, 9000),),
                            (rng.randint(20, 90), 64)])
        cases.append(dict(seed=800 + i + 1000 * (seed - 606), shape=shape, dtype=("float32", "bfloat16", "float16")[i % 3],
                          std=rng.choice([0.02, 1.0]), quant_type=("nf4", "fp4")[(i // 3) % 2],
                          blocksize=rng.choice([32, 64, 128]), double_quant=i % 4 != 0,
                          dq_blocksize=rng.choice([16, 64, 256])))
    return cases


def _run_dequant(fn, case: Case) -> dict[str, torch.Tensor]:
    packed, state = given(case, "quantized", lambda: quant.quantize_4bit(
        _weight(case), case["blocksize"], case["quant_type"], case["double_quant"], case["dq_blocksize"]))
    out = fn(packed, state, torch.float32)
    default = fn(packed, state)
    return {"out_fp32": out, "out_default_dtype": default}


def _linear_cases(seed: int = 607) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for i in range(8):
        cases.append(dict(seed=900 + i + 1000 * (seed - 607), out_f=rng.choice([8, 33, 64]), in_f=rng.choice([16, 64, 96]),
                          bias=("none", "frozen", "trainable")[i % 3], double_quant=bool(i % 2),
                          batch=rng.choice([(4,), (2, 3), (1, 2, 5)])))
    return cases


def _keeps_dense_weight(y: torch.Tensor, saved: list[torch.Tensor], n_weight: int) -> bool:
    """True if autograd or the ctx holds a float tensor as large as the weight."""
    big = [t for t in saved if t.is_floating_point() and t.numel() >= n_weight]
    attrs = [v for v in vars(y.grad_fn).values() if isinstance(v, torch.Tensor)] if y.grad_fn is not None else []
    big += [t for t in attrs if t.is_floating_point() and t.numel() >= n_weight]
    return bool(big)


def _run_function(fn_cls, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    out_f, in_f = case["out_f"], case["in_f"]
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    packed, state = given(case, "quantized", lambda: quant.quantize_4bit(w, 64, "nf4", case["double_quant"]))
    bias = None
    if case["bias"] != "none":
        bias = (torch.randn(out_f, generator=g) * 0.1).requires_grad_(case["bias"] == "trainable")
    x = torch.randn(*case["batch"], in_f, generator=g).requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn_cls.apply(x, packed, state, bias)
    keeps = _keeps_dense_weight(y, saved, out_f * in_f)
    y.backward(torch.randn(y.shape, generator=g))
    grad_b = bias.grad if bias is not None and bias.grad is not None else torch.zeros(out_f)
    return {"out": y.detach(), "grad_x": x.grad.detach(), "grad_bias": grad_b.detach(),
            "keeps_dense_weight": torch.tensor(keeps)}


def _layer_cases(seed: int = 608) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for i in range(8):
        in_f, out_f = rng.choice([32, 64, 96]), rng.choice([16, 48, 64])
        cases.append(dict(seed=1000 + i + 1000 * (seed - 608), in_f=in_f, out_f=out_f, r=rng.choice([1, 2, 4, 8]),
                          alpha=rng.choice([1.0, 8.0, 16.0]), bias=bool(i % 2), double_quant=i % 3 != 0,
                          batch=rng.choice([(3,), (2, 4)])))
    return cases


class GivenLinear4bit(nn.Module):
    """The judge's base layer for ``06.qlora_linear``: lora_ref.qlora (Linear4bit beside QLoRALinear, the
    reference) is sealed there. What a QLoRALinear reads of a Linear4bit, over tensors the grader made:
    ``weight`` (packed codes), ``quant_state``, ``bias``, ``compute_dtype``, ``in/out_features``; its
    forward uses the grader's dequantised weight, so a learner's layer that calls its base gets the
    Linear4bit's output."""

    def __init__(self, packed: torch.Tensor, state, bias: torch.Tensor | None, dense: torch.Tensor,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.compute_dtype, self.quant_state = compute_dtype, state
        self.register_buffer("weight", packed)
        self.register_buffer("dense", dense, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dense.to(self.compute_dtype), bias).to(x.dtype)


def _base_4bit(case: Case) -> nn.Module:
    """The case's frozen NF4 layer: lora_ref's Linear4bit in the grader and the kernel, its stand-in
    (:class:`GivenLinear4bit`, same tensors) in the judge."""
    def make():
        torch.manual_seed(case["seed"])
        lin = nn.Linear(case["in_f"], case["out_f"], bias=case["bias"])
        real = qlora.Linear4bit.from_linear(lin, "nf4", 64, case["double_quant"], compute_dtype=torch.float32)
        return real.weight, real.quant_state, real.bias, real.dequantize(torch.float32)

    packed, state, bias, dense = given(case, "base_4bit", make)
    bias = None if bias is None else bias.detach().clone()
    if given_only():
        return GivenLinear4bit(packed, state, bias, dense, torch.float32)
    return qlora.Linear4bit(packed, state, bias, compute_dtype=torch.float32)


def _run_layer(cls, case: Case) -> dict[str, torch.Tensor]:
    base = _base_4bit(case)
    torch.manual_seed(case["seed"] + 1)
    layer = cls(base, case["r"], case["alpha"])
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    init_A = layer.lora_A.detach().clone()
    init_B = layer.lora_B.detach().clone()
    g = torch.Generator().manual_seed(case["seed"] + 2)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    x = torch.randn(*case["batch"], case["in_f"], generator=g).requires_grad_(True)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=g))
    return {"wraps_base": torch.tensor(layer.base_layer is base),
            "only_adapters_train": torch.tensor(trainable == ["lora_A", "lora_B"]),
            "scaling": torch.tensor(float(layer.scaling), dtype=torch.float64),
            "init_A": init_A, "init_B": init_B, "out": y.detach(), "grad_A": layer.lora_A.grad.detach(),
            "grad_B": layer.lora_B.grad.detach(), "grad_x": x.grad.detach()}


register(Exercise(id="06.dequantize_4bit", symbol="dequantize_4bit", reference=quant.dequantize_4bit,
                  cases=_dequant_cases, run=_run_dequant, atol=1e-7, rtol=1e-6))
register(Exercise(id="06.dequantize_4bit_linear", symbol="Dequantize4bitLinear",
                  reference=qlora.Dequantize4bitLinear, cases=_linear_cases, run=_run_function,
                  atol=1e-5, rtol=1e-4))
register(Exercise(id="06.qlora_linear", symbol="QLoRALinear", reference=qlora.QLoRALinear,
                  cases=_layer_cases, run=_run_layer, atol=1e-5, rtol=1e-4))
