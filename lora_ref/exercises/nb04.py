"""Hidden-test cases of notebook 04_rank_and_alpha: the learner's subspace similarity (LoRA paper, Section 7)
and effective rank, against :mod:`lora_ref.lowrank`.

Cases are LoRA-like A matrices (r, k) with r from 1 to 64, including pairs that share directions (so phi
is far from both 0 and 1), rank-deficient updates, and bad arguments that must raise ValueError.
"""
from __future__ import annotations

import random

import torch

from lora_ref import lowrank
from lora_ref.exercises import Case, Exercise, register


def _similarity_cases(seed: int = 7) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for n in range(10):
        k = rng.choice([16, 40, 96])
        r1, r2 = rng.randint(1, min(8, k)), rng.randint(1, min(64, k))
        cases.append(dict(seed=700 + n + 1000 * (seed - 7), k=k, r1=r1, r2=r2, shared=rng.randint(0, min(r1, r2)),
                          pairs=((1, 1), (r1, r2), (max(1, r1 // 2), max(1, r2 // 3)))))
    cases.append(dict(seed=1, k=16, r1=4, r2=4, shared=0, pairs=((0, 1),)))          # i out of range
    cases.append(dict(seed=2, k=16, r1=4, r2=6, shared=0, pairs=((1, 7),)))          # j out of range
    cases.append(dict(seed=3, k=16, r1=4, r2=6, shared=0, pairs=((1, 1),), k2=17))   # widths differ
    return cases


def _matrices(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    A1 = torch.randn(case["r1"], case["k"], generator=g)
    A2 = torch.randn(case["r2"], case.get("k2", case["k"]), generator=g)
    s = case["shared"]
    if s:                                   # A2's first rows mix A1's rows: partly shared subspaces
        A2[:s] = A1[:s] * 2.0 + 0.1 * A2[:s]
    return A1, A2


def _run_similarity(fn, case: Case) -> dict[str, torch.Tensor]:
    A1, A2 = _matrices(case)
    values = []
    for i, j in case["pairs"]:
        try:
            values.append(float(fn(A1, A2, i, j)))
        except ValueError:
            return {"raised_value_error": torch.tensor(1)}
    return {"raised_value_error": torch.tensor(0), "phi": torch.tensor(values, dtype=torch.float64)}


def _energy_cases(seed: int = 8) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for n in range(10):
        m, k = rng.randint(4, 40), rng.randint(4, 40)
        cases.append(dict(seed=800 + n + 1000 * (seed - 8), m=m, k=k, rank=rng.randint(1, min(m, k)),
                          fraction=rng.choice([0.5, 0.8, 0.9, 0.99, 1.0]),
                          dtype=rng.choice(["float32", "float64"])))
    cases.append(dict(seed=9, m=5, k=5, rank=5, fraction=0.0, dtype="float32"))
    cases.append(dict(seed=9, m=5, k=5, rank=5, fraction=1.2, dtype="float32"))
    return cases


def _run_energy(fn, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    dtype = torch.float64 if case["dtype"] == "float64" else torch.float32
    # a rank-limited matrix with decaying singular values, like a learned update
    B = torch.randn(case["m"], case["rank"], generator=g, dtype=torch.float64)
    A = torch.randn(case["rank"], case["k"], generator=g, dtype=torch.float64)
    W = ((B * torch.logspace(0, -2, case["rank"], dtype=torch.float64)) @ A).to(dtype)
    try:
        value = fn(W, case["fraction"])
    except ValueError:
        return {"raised_value_error": torch.tensor(1)}
    return {"raised_value_error": torch.tensor(0), "rank": torch.tensor(int(value))}


register(Exercise(id="04.subspace_similarity", symbol="subspace_similarity", reference=lowrank.subspace_similarity,
                  cases=_similarity_cases, run=_run_similarity, atol=1e-7, rtol=1e-6))
register(Exercise(id="04.rank_for_energy", symbol="rank_for_energy", reference=lowrank.rank_for_energy,
                  cases=_energy_cases, run=_run_energy))
