"""Hidden-test cases of notebook 03_lora_on_a_real_model.

The learner writes four functions; each is compared with the lora_ref code that does the same job:

* ``select_targets(model, target_modules)``: the full names of the linear layers LoRA will wrap, sorted
  (reference: :func:`lora_ref.lora.select_targets`, the choice :func:`lora_ref.lora.inject_lora` makes);
* ``lora_trainable_params(model, target_modules, r)``: r (in + out) summed over those layers
  (reference: :func:`lora_ref.lora.lora_trainable_params`);
* ``answer_only_labels(prompt_ids, completion_ids, eos_id)``: :func:`lora_ref.data.answer_only_labels`;
* ``collate(batch, pad_id)``: :func:`lora_ref.data.collate`.

Models are tiny random Llamas (same module names as SmolLM2) of varied depth and width; ``target_modules``
are short names or ``"all-linear"``. A bad target must raise ValueError in both implementations.
"""
from __future__ import annotations

import random

import torch

from lora_ref import data
from lora_ref.exercises import Case, Exercise, given, register
from lora_ref.lora import lora_trainable_params, select_targets

_TARGETS = [("q_proj", "v_proj"), "all-linear", ("down_proj",), ("k_proj", "o_proj", "up_proj"),
            ("gate_proj", "q_proj"), ("v_proj",), ("query", "v_proj"), ("lm_head_typo",)]


def _tiny(case: Case):
    from lora_ref.models import tiny_llama
    return tiny_llama(seed=case["seed"], num_hidden_layers=case["layers"], hidden_size=case["hidden"],
                      intermediate_size=case["inter"], num_attention_heads=4, num_key_value_heads=case["kv"])


def _model_cases(seed: int, n: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        cases.append(dict(seed=seed + i, layers=rng.randint(1, 3), hidden=rng.choice([32, 64]),
                          inter=rng.choice([48, 96, 128]), kv=rng.choice([1, 2, 4]),
                          targets=_TARGETS[i % len(_TARGETS)], r=rng.choice([1, 2, 4, 8])))
    return cases


def _raised(fn, *args) -> tuple[bool, object]:
    try:
        return False, fn(*args)
    except ValueError:
        return True, None


def _run_select(fn, case: Case) -> dict[str, torch.Tensor]:
    model = _tiny(case)
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    raised, names = _raised(fn, model, case["targets"])
    if raised:
        return {"raised_value_error": torch.tensor(1)}
    names = list(names)
    unknown = sorted(set(names) - set(linear))
    if unknown:
        raise AssertionError(f"[03.select_targets] returned names that are not linear layers: {unknown[:3]}")
    if names != sorted(names):
        raise AssertionError("[03.select_targets] the list of names must be sorted")
    return {"raised_value_error": torch.tensor(0),
            "selected (1 per linear layer, in sorted name order)": torch.tensor([int(n in names) for n in linear])}


def _run_count(fn, case: Case) -> dict[str, torch.Tensor]:
    raised, value = _raised(fn, _tiny(case), case["targets"], case["r"])
    if raised:
        return {"raised_value_error": torch.tensor(1)}
    return {"raised_value_error": torch.tensor(0), "trainable": torch.tensor(int(value), dtype=torch.int64)}


def _label_cases(seed: int = 3) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for i in range(12):
        eos = rng.choice([2, 7, None])
        prompt = [rng.randint(0, 9) for _ in range(rng.randint(0, 8))]
        completion = [rng.randint(0, 9) for _ in range(rng.randint(1, 8))]
        if eos is not None and i % 3 == 0:
            completion.insert(rng.randint(0, len(completion)), eos)   # make sure an end-of-turn is there
        cases.append(dict(prompt=tuple(prompt), completion=tuple(completion), eos=eos))
    cases.append(dict(prompt=(1, 2), completion=(), eos=2))         # empty completion: ValueError
    return cases


def _run_labels(fn, case: Case) -> dict[str, torch.Tensor]:
    raised, out = _raised(fn, list(case["prompt"]), list(case["completion"]), case["eos"])
    if raised:
        return {"raised_value_error": torch.tensor(1)}
    return {"raised_value_error": torch.tensor(0),
            "input_ids": torch.as_tensor(out["input_ids"]), "labels": torch.as_tensor(out["labels"])}


def _collate_cases(seed: int = 4) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    cases = []
    for i in range(8):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 5))]
        cases.append(dict(seed=40 + i + 1000 * (seed - 4), lengths=tuple(lengths), pad_id=rng.choice([0, 2, 5])))
    return cases


def _run_collate(fn, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    batch = []
    for n in case["lengths"]:
        ids = torch.randint(0, 50, (n,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, n, (1,), generator=g))] = given(case, "ignore_index", lambda: data.IGNORE_INDEX)
        batch.append({"input_ids": ids, "labels": labels})
    out = fn(batch, case["pad_id"])
    return {k: torch.as_tensor(out[k]) for k in ("input_ids", "attention_mask", "labels")}


register(Exercise(id="03.select_targets", symbol="select_targets", reference=select_targets,
                  cases=lambda seed=300: _model_cases(seed, 8), run=_run_select))
register(Exercise(id="03.lora_trainable_params", symbol="lora_trainable_params",
                  reference=lora_trainable_params, cases=lambda seed=310: _model_cases(seed, 8), run=_run_count))
register(Exercise(id="03.answer_only_labels", symbol="answer_only_labels", reference=data.answer_only_labels,
                  cases=_label_cases, run=_run_labels))
register(Exercise(id="03.collate", symbol="collate", reference=data.collate, cases=_collate_cases,
                  run=_run_collate))
