r"""Prepare a model for one fine-tuning method: full, LoRA or QLoRA, in place.

The one place that turns a fresh base model into the thing to train, used by notebooks 03 and 06,
``peft_family.compare_methods`` and the benchmarks, so that every comparison trains the same setups::

    full    every parameter trains                                   (no adapters)
    lora    frozen 16/32-bit base + LoRA adapters (inject_lora)       (LoRA, arXiv 2106.09685, Section 4)
    qlora   frozen NF4 base (double quantisation) + LoRA adapters    (QLoRA, arXiv 2305.14314, Section 3):
            quantize_model, then inject_qlora; adapters on Linear4bit bases are QLoRALinear

Soft-prompt methods (prompt, P-tuning, prefix) wrap the model instead: ``lora_ref.peft_family.build``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._checks import check_choice
from .lora import LoRAConfig, inject_lora
from .memory import METHODS        # the three methods are named once, where their memory is sized
from .qlora import inject_qlora, quantize_model


def prepare_model(model: nn.Module, method: str, config: LoRAConfig | None = None, *,
                  quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Set ``model`` up for ``method`` ("full", "lora" or "qlora"), in place, and return it.

    ``config``: the adapters for "lora"/"qlora" (default ``LoRAConfig(r=8, alpha=16, target_modules=
    "all-linear")``, QLoRA's choice of every linear layer). "qlora" quantises every linear layer but the
    output head (``quantize_model``: ``quant_type``, ``double_quant``, ``compute_dtype``; None keeps each
    layer's dtype) and then injects the adapters. "full" unfreezes every parameter.
    """
    check_choice("method", method, METHODS)
    if method == "full":
        if config is not None:
            raise ValueError("full fine-tuning takes no LoRA config")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    config = config if config is not None else LoRAConfig(r=8, alpha=16.0, target_modules="all-linear")
    if method == "lora":
        return inject_lora(model, config)
    quantize_model(model, quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
    return inject_qlora(model, config)
