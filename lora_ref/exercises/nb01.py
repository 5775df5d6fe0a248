"""Hidden-test cases of notebook 01_low_rank.

- ``best_rank_r(W, r)`` and ``energy_spectrum(W)`` against lora_ref.lowrank on random matrices of random
  shapes (float32, float64, bfloat16), with a clear gap between singular values so that the best rank-r
  approximation is unique;
- ``lora_param_count(hidden, intermediate, n_layers, n_heads, n_kv_heads, r, targets)`` against
  lora_ref.memory.lora_param_count_for_dims on real model shapes (multi-head and grouped-query attention).
"""
from __future__ import annotations

import random

import torch

from lora_ref import lowrank, memory
from lora_ref.exercises import Case, Exercise, register

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _matrix(case: Case) -> torch.Tensor:
    """U diag(S) V^T with S decaying geometrically: distinct singular values, a unique best rank r."""
    g = torch.Generator().manual_seed(case["seed"])
    m, n = case["m"], case["n"]
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    S = 3.0 * case["decay"] ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.T).to(_DTYPES[case["dtype"]])


def _matrix_cases(seed: int, dtypes: list[str], n: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        m, k = rng.randint(2, 40), rng.randint(2, 40)
        cases.append(dict(seed=seed * 100 + i, dtype=dtypes[i % len(dtypes)], m=m, n=k,
                          r=rng.randint(1, min(m, k)), decay=rng.choice([0.5, 0.7, 0.85])))
    return cases


def _run_best_rank_r(fn, case: Case) -> dict[str, torch.Tensor]:
    return {"W_r": fn(_matrix(case), case["r"]).detach()}


def _run_energy(fn, case: Case) -> dict[str, torch.Tensor]:
    return {"energy": fn(_matrix(case)).detach()}


_SHAPES = {   # hidden, intermediate, n_layers, n_heads, n_kv_heads (config.json of each model)
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "llama-2-7b": (4096, 11008, 32, 32, 32),
    "llama-3-8b": (4096, 14336, 32, 32, 8),
    "mistral-7b": (4096, 14336, 32, 32, 8),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4),
    "toy": (64, 160, 3, 8, 2),
}
_TARGET_SETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                ("k_proj",), ("down_proj", "up_proj")]


def _count_cases(seed: int = 106) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for i, name in enumerate(sorted(_SHAPES) * 2):
        cases.append(dict(model=name, r=rng.choice([1, 4, 8, 16, 64]), targets=_TARGET_SETS[i % len(_TARGET_SETS)]))
    return cases


def _run_count(fn, case: Case) -> dict[str, torch.Tensor]:
    hidden, inter, layers, heads, kv = _SHAPES[case["model"]]
    value = fn(hidden, inter, layers, heads, kv, case["r"], case["targets"])
    return {"count": torch.tensor(int(value), dtype=torch.int64)}


register(Exercise(id="01.best_rank_r", symbol="best_rank_r", reference=lowrank.best_rank_r,
                  cases=lambda seed=11: _matrix_cases(seed, ["float32", "float64"], 12),
                  run=_run_best_rank_r, atol=1e-4, rtol=1e-4))
register(Exercise(id="01.best_rank_r_half", symbol="best_rank_r", reference=lowrank.best_rank_r,
                  cases=lambda seed=12: _matrix_cases(seed, ["bfloat16"], 4),
                  run=_run_best_rank_r, atol=2e-2, rtol=2e-2))
register(Exercise(id="01.energy_spectrum", symbol="energy_spectrum", reference=lowrank.energy_spectrum,
                  cases=lambda seed=13: _matrix_cases(seed, ["float32", "float64", "bfloat16"], 12),
                  run=_run_energy, atol=1e-5, rtol=1e-4))
register(Exercise(id="01.lora_param_count", symbol="lora_param_count", reference=memory.lora_param_count_for_dims,
                  cases=_count_cases, run=_run_count, atol=0.0, rtol=0.0))
