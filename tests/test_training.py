"""The training loop on the tiny model: it learns, it touches only adapters, its metrics are right."""
import copy
import math

import pytest
import torch

from lora_ref import data
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers
from lora_ref.training import evaluate_loss, fact_accuracy, train


@pytest.fixture(scope="module")
def tok():
    return data.tiny_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset()


def test_lora_training_lowers_loss_and_keeps_base_frozen(tiny, tok, splits):
    base_state = {k: v.clone() for k, v in tiny.state_dict().items()}
    inject_lora(tiny, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    few = splits.train[:16]
    before = evaluate_loss(tiny, tok, few)
    res = train(tiny, tok, few, steps=40, lr=1e-2, batch_size=8, progress=False)
    after = evaluate_loss(tiny, tok, few)
    assert after < before - 0.5, (before, after)             # it memorises 16 examples
    assert len(res.losses) == 40 and res.tokens_trained > 0 and res.seconds > 0
    for name, layer in lora_layers(tiny).items():            # frozen weights are bit-identical
        assert torch.equal(layer.base_layer.weight, base_state[f"{name}.weight"])
    assert torch.equal(tiny.model.embed_tokens.weight, base_state["model.embed_tokens.weight"])


def test_evaluate_loss_is_token_weighted(tiny, tok, splits):
    """Mean over all answer tokens, not a mean of per-batch means (hand-computed here)."""
    exs = list(splits.heldout[:5])
    got = evaluate_loss(tiny, tok, exs, batch_size=2)
    total = count = 0.0
    with torch.no_grad():
        for ex in exs:
            enc = data.encode_example(tok, ex)
            logits = tiny(enc["input_ids"][None]).logits[0, :-1]
            labels = enc["labels"][1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert math.isclose(got, total / count, rel_tol=1e-5)


def test_training_errors(tiny, tok, splits):
    with pytest.raises(ValueError, match="no trainable parameters"):
        for p in tiny.parameters():
            p.requires_grad_(False)
        train(tiny, tok, splits.train, steps=1, progress=False)
    inject_lora(tiny, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="steps=0"):
        train(tiny, tok, splits.train, steps=0, progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        train(tiny, tok, [], steps=1, progress=False)


def test_fact_accuracy_counts_correct_answers(tiny, tok, splits, monkeypatch):
    exs = list(splits.heldout[:4])
    import lora_ref.training as tr
    monkeypatch.setattr(tr, "generate_answers", lambda m, t, qs, *a, **k: [exs[0].answer, "no idea",
                                                                            exs[2].answer, ""])
    acc, answers = fact_accuracy(tiny, tok, exs, return_answers=True)
    assert acc == 0.5 and answers[1] == "no idea"


def test_generation_is_left_padded_and_restores_tokenizer(tiny, tok, splits):
    from lora_ref.training import generate_answers
    side = tok.padding_side
    a = generate_answers(tiny, tok, [splits.heldout[0].question, "Hi"], max_new_tokens=4)
    b = generate_answers(tiny, tok, ["Hi"], max_new_tokens=4)
    assert a[1] == b[0]                                      # padding does not change a greedy answer
    assert tok.padding_side == side
