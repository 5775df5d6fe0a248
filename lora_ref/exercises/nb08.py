"""Hidden-test cases of notebook 08_evaluating_and_choosing.

* ``08.prepend_virtual_tokens``  prompt tuning's input: [P ; E(x)], mask and labels extended
  (reference :func:`lora_ref.peft_family.prepend_virtual_tokens`)
* ``08.prefix_to_key_values``    prefix tuning's per-layer keys/values in KV-cache layout
  (reference :func:`lora_ref.peft_family.prefix_to_key_values`)
* ``08.token_weighted_perplexity``  the fix of the seed article's "eval score"
  (reference :func:`lora_ref.peft_family.token_weighted_perplexity`)
"""
from __future__ import annotations

import random

import torch

from lora_ref.exercises import Case, Exercise, register
from lora_ref.peft_family import prefix_to_key_values, prepend_virtual_tokens, token_weighted_perplexity


def _prepend_cases(seed: int = 801) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    return [dict(seed=8010 + i + 1000 * (seed - 801), n=rng.randint(1, 6), b=rng.randint(1, 4), t=rng.randint(1, 7),
                 d=rng.randint(2, 12), labels=bool(i % 3), half=(i % 4 == 3)) for i in range(10)]


def _run_prepend(fn, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    P = torch.randn(case["n"], case["d"], generator=g)
    emb = torch.randn(case["b"], case["t"], case["d"], generator=g)
    if case["half"]:
        emb = emb.to(torch.bfloat16)            # the prompt is fp32, the model bf16: cast to the embeddings' dtype
    mask = (torch.rand(case["b"], case["t"], generator=g) > 0.3).long()
    labels = torch.randint(0, 50, (case["b"], case["t"]), generator=g) if case["labels"] else None
    e, m, l = fn(P, emb, mask, labels)
    out = {"embeds": e, "mask": m}
    if case["labels"]:
        out["labels"] = l
    elif l is not None:
        raise AssertionError("with labels=None the third output must be None")
    return out


def _prefix_cases(seed: int = 802) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    return [dict(seed=8020 + i + 1000 * (seed - 802), n=rng.randint(1, 5), batch=rng.randint(1, 3), L=rng.randint(1, 4),
                 H=rng.randint(1, 3), hd=rng.randint(1, 6)) for i in range(10)]


def _run_prefix(fn, case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    prefix = torch.randn(case["n"], 2 * case["L"] * case["H"] * case["hd"], generator=g)
    kv = fn(prefix, case["batch"], case["L"], case["H"], case["hd"])
    if len(kv) != case["L"]:
        raise AssertionError(f"expected one (key, value) pair per layer ({case['L']}), got {len(kv)}")
    return {"keys": torch.stack([k for k, _ in kv]), "values": torch.stack([v for _, v in kv])}


def _ppl_cases(seed: int = 803) -> list[Case]:
    rng = random.Random(seed)   # the judge passes a per-run secret seed (exercises.draw_cases)
    return [dict(losses=[round(rng.uniform(0.1, 4.0), 3) for _ in range(k)],
                 tokens=[rng.randint(1, 300) for _ in range(k)]) for k in (1, 2, 3, 5, 8, 13)]


def _run_ppl(fn, case: Case) -> dict[str, torch.Tensor]:
    return {"perplexity": torch.tensor(float(fn(case["losses"], case["tokens"])), dtype=torch.float64)}


register(Exercise("08.prepend_virtual_tokens", "prepend_virtual_tokens", prepend_virtual_tokens,
                  _prepend_cases, _run_prepend, atol=1e-6, rtol=1e-6))
register(Exercise("08.prefix_to_key_values", "prefix_to_key_values", prefix_to_key_values,
                  _prefix_cases, _run_prefix, atol=0.0, rtol=0.0))
register(Exercise("08.token_weighted_perplexity", "token_weighted_perplexity", token_weighted_perplexity,
                  _ppl_cases, _run_ppl, atol=1e-9, rtol=1e-9))
