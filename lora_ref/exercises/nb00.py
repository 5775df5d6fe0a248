"""Hidden-test cases of notebook 00_welcome: the warm-up ``count_params`` against lora_ref.lora.count_parameters.

The learner's function returns ``(trainable, total)``; lora_ref's returns a ``ParamCount`` with the same two
numbers. Cases freeze different parts of small models, including ones whose parameters are shared
(tied embeddings, one module used twice), which must be counted once.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from lora_ref.exercises import Case, Exercise, register
from lora_ref.lora import count_parameters
from lora_ref.models import tiny_llama


def _counts(result) -> tuple[int, int]:
    if hasattr(result, "trainable") and hasattr(result, "total"):
        return int(result.trainable), int(result.total)
    trainable, total = result
    return int(trainable), int(total)


def _shared_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    block = nn.Linear(6 + seed % 5, 6 + seed % 5)
    return nn.Sequential(block, nn.ReLU(), block, nn.Linear(6 + seed % 5, 3, bias=bool(seed % 2)))


def _tiny_llama(seed: int, tie: bool) -> nn.Module:
    # imported here at module load, not at call time: the out-of-kernel judge drops lora_ref from
    # sys.modules (and blocks importing it) before it runs learner code through these cases
    return tiny_llama(seed=seed, tie_word_embeddings=tie, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1 + seed % 2)


def _cases(seed: int = 0) -> list[Case]:
    # the judge passes a per-run secret seed (exercises.draw_cases): same structures, other sizes and weights
    return [dict(c, seed=c["seed"] + seed) for c in [
        dict(model="shared_mlp", seed=0, trainable=r".*"),
        dict(model="shared_mlp", seed=1, trainable=r"^0\."),          # the shared block only
        dict(model="shared_mlp", seed=2, trainable=r"bias$"),
        dict(model="tiny_llama", seed=0, tie=True, trainable=r".*"),
        dict(model="tiny_llama", seed=1, tie=True, trainable=r"q_proj|v_proj"),
        dict(model="tiny_llama", seed=2, tie=False, trainable=r"lm_head|norm"),
        dict(model="tiny_llama", seed=3, tie=True, trainable=r"embed_tokens"),
        dict(model="tiny_llama", seed=4, tie=False, trainable=r"$^"),   # everything frozen
    ]]


def _run(fn, case: Case) -> dict[str, torch.Tensor]:
    model = (_shared_mlp(case["seed"]) if case["model"] == "shared_mlp"
             else _tiny_llama(case["seed"], case["tie"]))
    pattern = re.compile(case["trainable"])
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name)))
    trainable, total = _counts(fn(model))
    return {"trainable": torch.tensor(trainable), "total": torch.tensor(total)}


register(Exercise(id="00.count_params", symbol="count_params", reference=count_parameters,
                  cases=_cases, run=_run, atol=0.0, rtol=0.0))
