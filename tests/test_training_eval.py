"""lora-train's evaluation as a new user meets it (issue 13, item 5): fast, visible, explained."""
import json
import re

import pytest
import torch

from lora_ref import data, training
from lora_ref.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return data.tiny_tokenizer()


def test_batched_answers_equal_one_at_a_time_in_input_order(tiny, tok):
    qs = [e.question for e in data.load_dataset().heldout[:5]] + ["Hi", "Where is the shop, and when does it open?"]
    batched = training.generate_answers(tiny, tok, qs, max_new_tokens=6, batch_size=3)   # sorted, 3 batches
    alone = [training.generate_answers(tiny, tok, [q], max_new_tokens=6)[0] for q in qs]
    assert batched == alone


def test_answer_budget_follows_the_reference_answers(tiny, tok, monkeypatch):
    exs = data.load_dataset().heldout[:6]
    longest = max(len(tok(e.answer, add_special_tokens=False)["input_ids"]) for e in exs)
    assert training.answer_token_budget(tok, exs) == longest + 1 + training.ANSWER_MARGIN_TOKENS
    seen = {}

    def fake(model, tokenizer, questions, max_new_tokens, *a, **k):
        seen["max_new_tokens"] = max_new_tokens
        return [""] * len(questions)
    monkeypatch.setattr(training, "generate_answers", fake)
    training.fact_accuracy(tiny, tok, exs)
    assert seen["max_new_tokens"] == training.answer_token_budget(tok, exs)
    training.fact_accuracy(tiny, tok, exs, max_new_tokens=5)
    assert seen["max_new_tokens"] == 5
    with pytest.raises(ValueError, match="no examples"):
        training.answer_token_budget(tok, [])


def test_every_lora_train_option_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        training.main(["--help"])
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z-]+)", out, re.M)
    assert len(options) >= 15
    blocks = re.split(r"\n  (?=--)", out.split("options:")[1])[1:]
    for block in blocks:
        assert "(default" in block, f"no default stated: {block.split()[0]}"


def test_lora_train_says_what_it_does_and_configures_threads(tmp_path, monkeypatch, capsys):
    """The whole command on the tiny model: progress and phases are reported, threads are configured."""
    import lora_ref.models as models
    monkeypatch.setattr(models, "load_smollm2", lambda device=None: (tiny_llama(seed=0), data.tiny_tokenizer()))
    calls = []
    monkeypatch.setattr(models, "configure_cpu_threads", lambda *a, **k: calls.append(1) or 1)
    threads = torch.get_num_threads()
    try:
        assert training.main(["--steps", "2", "--heldout-limit", "3", "--device", "cpu", "--r", "2",
                              "--out", str(tmp_path / "a")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert calls, "lora-train did not configure CPU threads (2 spinning OpenMP threads on a busy machine)"
    assert "evaluating the base model: loss on 3 held-out answers" in out.out
    assert "evaluating the LoRA model" in out.out and "s of evaluation" in out.out
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["lora"]["seconds"] > 0 and 0 <= metrics["lora"]["fact_accuracy"] <= 1


def test_evaluation_shows_progress_bars(tiny, tok, capsys):
    exs = data.load_dataset().heldout[:4]
    training.evaluate(tiny, tok, exs, max_new_tokens=2, progress=True)
    err = capsys.readouterr().err
    assert "eval loss" in err and "generating answers" in err


@pytest.mark.slow
def test_batched_evaluation_matches_unbatched_on_smollm2(smollm2):
    """On the real model, a few questions: batched answers (left padding, length-sorted) equal the
    one-at-a-time answers, and the answer budget gives the same verdicts as the old 48 tokens."""
    model, tok = smollm2
    exs = data.load_dataset().heldout[::20]                     # 5 questions
    budget = training.answer_token_budget(tok, data.load_dataset().heldout)
    qs = [e.question for e in exs]
    batched = training.generate_answers(model, tok, qs, max_new_tokens=budget)
    alone = [training.generate_answers(model, tok, [q], max_new_tokens=budget)[0] for q in qs]
    assert batched == alone
    long = training.generate_answers(model, tok, qs, max_new_tokens=48)
    assert [data.is_correct(a, e) for a, e in zip(batched, exs)] == [data.is_correct(a, e) for a, e in zip(long, exs)]
