"""Hidden-test cases of notebook 07_merge_and_deploy.

* ``07.merged_weight``      learner's ``merged_weight(W, A, B, scaling, sign=1.0)`` vs
                            :func:`lora_ref.lora.merged_weight` (fp32/fp64 tight; bf16/fp16 within a rounding step)
* ``07.batched_lora_delta`` learner's ``batched_lora_delta(x, A_all, B_all, s_all, idx)`` vs
                            :func:`lora_ref.serving.batched_lora_delta` (mixed-adapter batches)
"""
from __future__ import annotations

import random

import torch

from lora_ref.exercises import Case, Exercise, register
from lora_ref.lora import merged_weight
from lora_ref.serving import batched_lora_delta

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def _merge_cases(seed: int, dtypes: list[str], n: int) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        o, inn = rng.randint(1, 40), rng.randint(1, 40)
        out.append(dict(seed=seed + i, dtype=dtypes[i % len(dtypes)], out_f=o, in_f=inn,
                        r=rng.randint(1, min(o, inn, 8)), scaling=rng.choice([0.25, 1.0, 2.0, 4.0]),
                        sign=rng.choice([1.0, -1.0])))
    return out


def _run_merge(fn, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    W = torch.randn(case["out_f"], case["in_f"], generator=g).to(_DTYPES[case["dtype"]])
    A = torch.randn(case["r"], case["in_f"], generator=g) * 0.1
    B = torch.randn(case["out_f"], case["r"], generator=g) * 0.1
    if case["dtype"] == "float64":
        A, B = A.double(), B.double()
    return {"merged": fn(W, A, B, case["scaling"], sign=case["sign"])}


def _delta_cases(seed: int = 707) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    out = []
    for i in range(10):
        out.append(dict(seed=70700 + i + 1000 * (seed - 707), b=rng.randint(1, 6), t=rng.choice([None, 1, 3, 5]),
                        n=rng.randint(1, 4), r=rng.randint(1, 6), in_f=rng.randint(2, 24), out_f=rng.randint(2, 24)))
    return out


def _run_delta(fn, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    b, t, n = case["b"], case["t"], case["n"]
    x = torch.randn((b, case["in_f"]) if t is None else (b, t, case["in_f"]), generator=g)
    A_all = torch.randn(n + 1, case["r"], case["in_f"], generator=g)
    B_all = torch.randn(n + 1, case["out_f"], case["r"], generator=g)
    A_all[0], B_all[0] = 0, 0                                   # slot 0: "no adapter"
    s_all = torch.rand(n + 1, generator=g) * 4
    idx = torch.randint(0, n + 1, (b,), generator=g)
    return {"delta": fn(x, A_all, B_all, s_all, idx)}


register(Exercise("07.merged_weight", "merged_weight", merged_weight,
                  lambda seed=7100: _merge_cases(seed, ["float32", "float64"], 8), _run_merge, atol=1e-5, rtol=1e-5))
register(Exercise("07.merged_weight_half", "merged_weight", merged_weight,
                  lambda seed=7200: _merge_cases(seed, ["bfloat16", "float16"], 8), _run_merge, atol=1e-3, rtol=1e-2))
register(Exercise("07.batched_lora_delta", "batched_lora_delta", batched_lora_delta, _delta_cases, _run_delta,
                  atol=1e-4, rtol=1e-4))
