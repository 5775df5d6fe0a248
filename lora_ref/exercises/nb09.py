"""Hidden-test answers of notebook 09_interview_drills, all computed by lora_ref (never typed in).

Numeric cells: the learner assigns a number; the reference is the value lora_ref's calculators give
(:mod:`lora_ref.memory`, :mod:`lora_ref.quant`, :mod:`lora_ref.peft_family`). Multiple-choice cells: the
learner assigns a letter; the reference is the correct option of the drill bank's item
(:mod:`lora_ref.drills.bank`), so the notebook, the terminal drills and the widget can never disagree.

An Exercise's ``reference`` here is a value, and ``run`` turns either value into a one-element tensor.
"""
from __future__ import annotations

import math

import torch

from lora_ref._checks import as_real

from lora_ref import memory as mem
from lora_ref.exercises import Exercise, register
from lora_ref.peft_family import prefix_tuning_params, prompt_tuning_params
from lora_ref.quant import bits_per_parameter


def _number(obj, case) -> dict[str, torch.Tensor]:
    value = as_real(obj)                  # np.float32 / a 0-d tensor from a computed answer count too
    if value is None or not math.isfinite(value):
        raise AssertionError(f"the answer must be a finite number (int or float), got {obj!r}")
    return {"value": torch.tensor(value, dtype=torch.float64)}


def _letter(obj, case) -> dict[str, torch.Tensor]:
    if not isinstance(obj, str) or len(obj.strip()) != 1 or not obj.strip().isalpha():
        raise AssertionError(f"the answer must be one letter such as 'b', got {obj!r}")
    return {"choice": torch.tensor(float(ord(obj.strip().lower()) - ord("a")), dtype=torch.float64)}


def _choice_reference(item_id: str) -> str:
    from lora_ref.drills import get_item
    return chr(ord("a") + get_item(item_id).correct)


class _Lazy:
    """A reference value computed on first use (the drill bank is only imported when needed)."""

    def __init__(self, fn):
        self.fn = fn

    def value(self):
        return self.fn()


def _numeric(ex_id: str, symbol: str, compute, rtol: float = 1e-6) -> None:
    register(Exercise(ex_id, symbol, _Lazy(compute), lambda: [{}],
                      lambda obj, case: _number(obj.value() if isinstance(obj, _Lazy) else obj, case),
                      atol=0.0, rtol=rtol))


def _choice(ex_id: str, symbol: str, item_id: str) -> None:
    register(Exercise(ex_id, symbol, _Lazy(lambda: _choice_reference(item_id)), lambda: [{"item": item_id}],
                      lambda obj, case: _letter(obj.value() if isinstance(obj, _Lazy) else obj, case),
                      atol=0.0, rtol=0.0))


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")

# the article's own example: r=16 on q,k,v,o of a 4096-wide, 32-layer model (Llama-2-7B)
_numeric("09.lora_params_llama2", "lora_params_llama2", lambda: mem.lora_param_count("llama-2-7b", 16, ATTN))
# grouped-query attention: k and v are 1024 wide on Llama-3-8B
_numeric("09.lora_params_llama3_qv", "lora_params_llama3_qv",
         lambda: mem.lora_param_count("llama-3-8b", 8, ("q_proj", "v_proj")))
_numeric("09.lora_params_smollm2", "lora_params_smollm2", lambda: mem.lora_param_count("smollm2-135m", 16))
_numeric("09.reduction_ratio", "reduction_ratio",
         lambda: 4 * 4096 * 4096 / (4 * 16 * (4096 + 4096)), rtol=1e-6)
_numeric("09.adapter_mb_llama2", "adapter_mb_llama2",
         lambda: mem.lora_param_count("llama-2-7b", 16, ATTN) * 2 / 1e6, rtol=1e-3)
_numeric("09.dq_bits", "dq_bits", lambda: bits_per_parameter(64, True, 256) - 4, rtol=1e-3)
_numeric("09.full_ft_gb_7b", "full_ft_gb_7b", lambda: 16 * mem.param_count("llama-2-7b") / 1e9, rtol=2e-3)
_numeric("09.prompt_params", "prompt_params", lambda: prompt_tuning_params(20, 4096))
_numeric("09.prefix_params", "prefix_params", lambda: prefix_tuning_params(20, 32, 1024)[1])

_choice("09.mc_heuristic", "mc_heuristic", "rank.heuristic-formula")
_choice("09.mc_not_innovation", "mc_not_innovation", "qlora.not-innovation")
_choice("09.mc_prefix_kv", "mc_prefix_kv", "peft.prefix-kv")
_choice("09.mc_bf16_eps", "mc_bf16_eps", "mp.bf16-eps")
_choice("09.mc_unmerged_latency", "mc_unmerged_latency", "deploy.unmerged-latency")
_choice("09.mc_perplexity", "mc_perplexity", "eval.perplexity-mc")
