"""Integration tests on the real SmolLM2-135M-Instruct (slow: a few per suite)."""
import copy
import json

import pytest
import torch

from lora_ref import data
from lora_ref.adapters import save_adapter
from lora_ref.lora import LoRAConfig, count_parameters, inject_lora, lora_layers
from lora_ref.models import chat, load_smollm2

pytestmark = pytest.mark.slow


def test_real_llama_with_gqa_projections(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (576, 192, 192)
    assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (1536, 1536)
    assert count_parameters(model).total == 134_515_008


def test_chats_correctly(smollm2):
    model, tok = smollm2
    assert "Paris" in chat(model, tok, "What is the capital of France?", max_new_tokens=16)


def test_adapter_loads_in_peft_with_same_logits(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = smollm2
    ours = copy.deepcopy(model)
    cfg = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
    inject_lora(ours, cfg)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(ours).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    save_adapter(ours, tmp_path, cfg)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    ids = tok("Velora Cycles opens at", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        base = model(ids).logits
    assert (a - b).abs().max() <= 1e-5
    assert (a - base).abs().max() > 1e-2          # the adapter is not a no-op


def test_lora_learns_the_company_facts(smollm2):
    """A few minutes of CPU LoRA training: held-out fact accuracy well above the base model's.

    All 82 held-out questions (phrased unlike any training question): on 21 of them, a CPU whose float
    sums round differently moved the score by one answer across the bar (CI: 6/21, here 7/21). Measured
    here (tests' single thread): base 2/82, tuned 30/82 (37%); the bar, +20 points, leaves ~13 answers of margin."""
    from lora_ref.training import evaluate_loss, fact_accuracy, train
    model, tok = smollm2
    heldout = list(data.load_dataset().heldout)
    tuned = copy.deepcopy(model)
    base_acc = fact_accuracy(tuned, tok, heldout)
    base_loss = evaluate_loss(tuned, tok, heldout)
    inject_lora(tuned, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    train(tuned, tok, data.load_dataset().train, steps=80, lr=1e-3, batch_size=8, warmup_steps=8, progress=False)
    acc = fact_accuracy(tuned, tok, heldout)
    loss = evaluate_loss(tuned, tok, heldout)
    assert loss < base_loss - 1.0, (base_loss, loss)
    assert acc >= base_acc + 0.2, (base_acc, acc)
