"""Hidden-test cases of notebook 02_lora_linear: the learner's LoRALinear against lora_ref.lora.LoRALinear.

The learner defines ``lora_scaling`` and a ``LoRALinear`` class with lora_ref's constructor and attributes
(``LoRALinear(base, r, alpha, dropout=0.0, use_rslora=False)``, ``base_layer``, ``lora_A`` (r, in),
``lora_B`` (out, r), ``scaling``, ``merged``, ``delta_weight()``, ``merge()``, ``unmerge()``), so each
``run`` below drives both classes the same way: same seeds, same inputs, named outputs compared.

Half-precision cases are separate exercises with a tolerance of a few bf16/fp16 rounding steps: a learner
may round in a different (equally valid) order than the reference.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn as nn

from lora_ref.exercises import Case, Exercise, register
from lora_ref.lora import LoRALinear, lora_scaling

_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_ATOL, HALF_RTOL = 3e-2, 2e-2


def _scaling_cases(seed: int = 2021) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(8):
        r = rng.choice([1, 2, 4, 8, 16, 64, 256])
        alpha = rng.choice([1, 8, 16, 32.0, 0.5, 7.5])
        cases.append(dict(alpha=alpha, r=r, use_rslora=bool(i % 2)))
    return cases


def _run_scaling(fn, case: Case) -> dict[str, torch.Tensor]:
    value = fn(case["alpha"], case["r"], use_rslora=case["use_rslora"])
    return {"scaling": torch.tensor(float(value), dtype=torch.float64)}


def _layer_cases(seed: int, dtypes: list[str], n: int, dropout: bool = False) -> list[Case]:
    """Random layer shapes; r anywhere in [1, min(in, out)]; with or without bias; rsLoRA on half the cases."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        in_f, out_f = rng.randint(2, 48), rng.randint(2, 48)
        cases.append(dict(
            seed=seed * 100 + i, dtype=dtypes[i % len(dtypes)], in_f=in_f, out_f=out_f,
            r=rng.randint(1, min(in_f, out_f, 16)), alpha=rng.choice([1.0, 4.0, 16.0, 32.0]),
            bias=bool(rng.random() < 0.7), use_rslora=bool(i % 2),
            batch=tuple(rng.choice([(3,), (2, 5), (1, 1, 4)])),
            dropout=rng.choice([0.1, 0.5]) if dropout else 0.0, train=bool(dropout and i % 3 != 2),
        ))
    return cases


def _build(cls, case: Case):
    """Base layer and adapter from fixed seeds: the same A for every class that inits A the same way."""
    dtype = _DTYPES[case["dtype"]]
    torch.manual_seed(case["seed"])
    base = nn.Linear(case["in_f"], case["out_f"], bias=case["bias"]).to(dtype)
    torch.manual_seed(case["seed"] + 1)
    layer = cls(base, case["r"], case["alpha"], dropout=case["dropout"], use_rslora=case["use_rslora"])
    return base, layer


def _set_b(layer, case: Case) -> None:
    """A trained-looking B (the init's B = 0 would hide every mistake in the update path)."""
    g = torch.Generator().manual_seed(case["seed"] + 2)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64)
                           .to(layer.lora_B.dtype))


def _input(case: Case, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"] + 3)
    return torch.randn(*case["batch"], case["in_f"], generator=g, dtype=torch.float64).to(dtype)


def _run_init(cls, case: Case) -> dict[str, torch.Tensor]:
    base, layer = _build(cls, case)
    if layer.base_layer is not base:
        raise AssertionError("[02.lora_init] base_layer must be the very layer passed in (wrap it, do not copy it)")
    frozen = torch.tensor([not p.requires_grad for p in base.parameters()])
    return {
        "lora_A": layer.lora_A.detach().clone(),
        "lora_B": layer.lora_B.detach().clone(),
        "scaling": torch.tensor(float(layer.scaling), dtype=torch.float64),
        "base_frozen": frozen,
        "A_trainable": torch.tensor(bool(layer.lora_A.requires_grad)),
        "B_trainable": torch.tensor(bool(layer.lora_B.requires_grad)),
        "merged": torch.tensor(bool(layer.merged)),
    }


def _run_forward(cls, case: Case) -> dict[str, torch.Tensor]:
    dtype = _DTYPES[case["dtype"]]
    _, layer = _build(cls, case)
    _set_b(layer, case)
    layer.train(case["train"])
    x = _input(case, dtype)
    torch.manual_seed(case["seed"] + 4)            # the dropout mask
    out = layer(x)
    return {"out": out.detach()}


def _run_merge(cls, case: Case) -> dict[str, torch.Tensor]:
    dtype = _DTYPES[case["dtype"]]
    base, layer = _build(cls, case)
    _set_b(layer, case)
    layer.eval()
    x = _input(case, dtype)
    before = layer(x).detach()
    delta = layer.delta_weight().detach().clone()
    if case["dtype"] == "float64":      # at least fp32 is the rule; fp32 or fp64 both fine for fp64 layers
        delta = delta.double()
    layer.merge()
    w_merged = base.weight.detach().clone()
    layer.merge()                                   # idempotent: a second merge changes nothing
    w_twice = base.weight.detach().clone()
    out_merged = layer(x).detach()                  # the update is in W now: it must not be added again
    merged_flag = torch.tensor(bool(layer.merged))
    layer.unmerge()
    layer.unmerge()                                 # and unmerging twice neither
    return {"delta_weight": delta, "weight_merged": w_merged, "weight_merged_twice": w_twice,
            "out_before": before, "out_merged": out_merged, "merged_flag": merged_flag,
            "weight_unmerged": base.weight.detach().clone(), "unmerged_flag": torch.tensor(bool(layer.merged))}


register(Exercise(id="02.lora_scaling", symbol="lora_scaling", reference=lora_scaling,
                  cases=_scaling_cases, run=_run_scaling, atol=1e-12, rtol=1e-12))
register(Exercise(id="02.lora_init", symbol="LoRALinear", reference=LoRALinear,
                  cases=lambda seed=21: _layer_cases(seed, ["float32", "float64", "bfloat16", "float16"], 12),
                  run=_run_init, atol=0.0, rtol=0.0))
register(Exercise(id="02.lora_forward", symbol="LoRALinear", reference=LoRALinear,
                  cases=lambda seed=22: (_layer_cases(seed, ["float32", "float64"], 10)
                                 + _layer_cases(seed + 1, ["float32"], 6, dropout=True)),
                  run=_run_forward, atol=1e-5, rtol=1e-4))
register(Exercise(id="02.lora_forward_half", symbol="LoRALinear", reference=LoRALinear,
                  cases=lambda seed=24: _layer_cases(seed, ["bfloat16", "float16"], 8),
                  run=_run_forward, atol=HALF_ATOL, rtol=HALF_RTOL))
register(Exercise(id="02.lora_merge", symbol="LoRALinear", reference=LoRALinear,
                  cases=lambda seed=25: _layer_cases(seed, ["float32", "float64"], 10),
                  run=_run_merge, atol=1e-5, rtol=1e-4, topics=("deployment", "implementation")))
register(Exercise(id="02.lora_merge_half", symbol="LoRALinear", reference=LoRALinear,
                  cases=lambda seed=26: _layer_cases(seed, ["bfloat16", "float16"], 8),
                  run=_run_merge, atol=HALF_ATOL, rtol=HALF_RTOL, topics=("deployment", "mixed-precision")))
