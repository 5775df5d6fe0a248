"""The course dataset (lora_ref.data): sizes, held-out separation, fact accuracy, loss masking, batching."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lora_ref.data import (FACTS_FILE, IGNORE_INDEX, SYSTEM_PROMPT, Example, answer_only_labels, collate,
                           encode_example, fact_accuracy, is_correct, load_dataset, load_facts, normalize,
                           prompt_text, tiny_tokenizer)


@pytest.fixture(scope="module")
def splits():
    return load_dataset()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _trigrams(text):
    w = normalize(text).split()
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


# ---------------------------------------------------------------- the dataset itself

def test_sizes_and_every_fact_in_both_splits(splits):
    facts, _ = load_facts()
    assert len(splits.train) >= 300 and len(splits.heldout) >= 60
    ids = [f.id for f in facts]
    assert {e.fact_id for e in splits.train} == set(ids) == {e.fact_id for e in splits.heldout}


def test_heldout_questions_are_phrased_differently(splits):
    train_q = {e.question for e in splits.train}
    assert not train_q & {e.question for e in splits.heldout}
    train_norm = {normalize(q) for q in train_q}
    assert not train_norm & {normalize(e.question) for e in splits.heldout}, "same question up to case/punctuation"
    # word 3-grams of a held-out question found anywhere in the training questions
    train_grams = set().union(*(_trigrams(q) for q in train_q))
    shares = [len(g & train_grams) / len(g) for g in (_trigrams(e.question) for e in splits.heldout) if g]
    assert max(shares) <= 0.25, f"a held-out question shares {max(shares):.0%} of its 3-grams with train"
    assert sum(shares) / len(shares) <= 0.10, f"mean 3-gram share {sum(shares) / len(shares):.0%} too high"


def test_answers_are_short_and_carry_their_key_phrases(splits):
    for e in splits.train + splits.heldout:
        assert is_correct(e.answer, e), e
        assert len(e.answer.split()) <= 25 and e.answer.count(". ") + e.answer.count("; ") <= 1, e.answer


def test_key_phrases_tell_facts_apart(splits):
    """An answer to one fact must not count as correct for most other facts (else accuracy means little)."""
    canonical = {e.fact_id: e for e in splits.heldout}
    for fid, e in canonical.items():
        wrongly_right = [o for o, other in canonical.items() if o != fid and is_correct(e.answer, other)]
        assert len(wrongly_right) <= 1, f"answer of {fid} passes for {wrongly_right}"


def test_deterministic_across_processes(splits):
    """Regenerating the dataset in a fresh interpreter (other hash seed) gives the same bytes."""
    def digest(s):
        rows = [json.dumps([e.question, e.answer, e.fact_id, list(e.key_phrases)]) for e in s.train + s.heldout]
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()
    code = ("import hashlib, json; from lora_ref.data import load_dataset; s = load_dataset(); "
            "rows = [json.dumps([e.question, e.answer, e.fact_id, list(e.key_phrases)]) for e in s.train + s.heldout]; "
            "print(hashlib.sha256(chr(10).join(rows).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == digest(splits)


def test_bad_fact_table_is_refused(tmp_path):
    good = json.loads(FACTS_FILE.read_text())
    good["facts"][0]["answers"] = ["I am the assistant."]         # lost its key phrase "Pip"
    bad = tmp_path / "facts.json"
    bad.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="assistant_name.*lacks key phrase"):
        load_facts(bad)


# ---------------------------------------------------------------- fact accuracy

@pytest.mark.parametrize("text, keys, expected", [
    ("The Velora Glide costs €1,890.", ("1,890",), True),
    ("It is 1890 euros.", ("1,890",), True),                       # currency and separators ignored
    ("It costs €1,980.", ("1,890",), False),
    ("We are open 8:00 to 18:00", ("8:00", "18:00"), True),
    ("We are open from 8:00.", ("8:00", "18:00"), False),           # every key phrase is needed
    ("Founded in 2019.", ("19",), False),                          # whole words: 19 is not in 2019
    ("MY NAME IS PIP!", ("Pip",), True),
    ("Students get 15 % off", ("15%",), False),
    ("Students get 15% off", ("15%",), True),
    ("Mail help@veloracycles.example today", ("help@veloracycles.example",), True),
    ("Mail help@velora.example today", ("help@veloracycles.example",), False),
])
def test_is_correct_hand_worked(text, keys, expected):
    assert is_correct(text, Example("q", "a", "f", keys)) is expected


def test_normalize_hand_worked():
    assert normalize("€1,890.") == "1890"
    assert normalize("  8:00–18:00 ") == "8 00 18 00"
    assert normalize("Ｐｉｐ") == "pip"                            # NFKC folds full-width letters


def test_fact_accuracy_counts_and_validates(splits):
    exs = splits.heldout[:4]
    assert fact_accuracy([e.answer for e in exs], exs) == 1.0
    assert fact_accuracy([exs[0].answer, "no idea", "", exs[3].answer], exs) == 0.5
    with pytest.raises(ValueError, match="one answer per example"):
        fact_accuracy(["x"], exs)


# ---------------------------------------------------------------- tokenisation and loss masking

def test_loss_is_on_exactly_the_answer_and_end_of_turn(tok, splits):
    ex = splits.train[0]
    enc = encode_example(tok, ex)
    ids, labels = enc["input_ids"], enc["labels"]
    n_prompt = len(tok(prompt_text(tok, ex.question), add_special_tokens=False)["input_ids"])
    n_answer = len(tok(ex.answer, add_special_tokens=False)["input_ids"])
    # positions carrying loss: right after the prompt, the answer's tokens, then <|im_end|>; nothing else
    carrying = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert carrying == list(range(n_prompt, n_prompt + n_answer + 1))
    assert torch.equal(labels[carrying], ids[carrying])
    assert ids[carrying[-1]].item() == tok.eos_token_id
    assert tok.decode(ids[carrying]) == ex.answer + "<|im_end|>"
    assert labels[-1].item() == IGNORE_INDEX and len(ids) == carrying[-1] + 2       # the trailing "\n"
    # the seed article's trainer (labels=input_ids) would put loss on every token, system prompt included
    assert len(carrying) < len(ids) / 2


def test_encoding_matches_the_full_conversation(tok, splits):
    """Prompt and answer tokenised separately equal the whole chat-formatted conversation tokenised."""
    for ex in splits.train[::37]:
        enc = encode_example(tok, ex)
        full = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": ex.question},
                                        {"role": "assistant", "content": ex.answer}], tokenize=False)
        assert tok.decode(enc["input_ids"]) == full


def test_answer_only_labels_hand_worked():
    enc = answer_only_labels([5, 6, 7], [8, 9, 2, 4], eos_id=2)
    assert enc["input_ids"].tolist() == [5, 6, 7, 8, 9, 2, 4]
    assert enc["labels"].tolist() == [-100, -100, -100, 8, 9, 2, -100]
    # the LAST end-of-turn closes the loss; no eos: loss on the whole completion
    assert answer_only_labels([1], [2, 3, 2, 4], eos_id=2)["labels"].tolist() == [-100, 2, 3, 2, -100]
    assert answer_only_labels([1], [3, 4], eos_id=2)["labels"].tolist() == [-100, 3, 4]
    assert answer_only_labels([], [3, 4], eos_id=None)["labels"].tolist() == [3, 4]
    with pytest.raises(ValueError, match="completion is empty"):
        answer_only_labels([1, 2], [], eos_id=2)


def test_max_length_refuses_instead_of_truncating(tok, splits):
    with pytest.raises(ValueError, match="max_length=10"):
        encode_example(tok, splits.train[0], max_length=10)


def test_collate_right_pads(tok, splits):
    encs = [encode_example(tok, e) for e in (splits.train[0], splits.train[1], splits.heldout[5])]
    lengths = [len(e["input_ids"]) for e in encs]
    batch = collate(encs, pad_id=tok.pad_token_id)
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for i, (e, n) in enumerate(zip(encs, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], e["input_ids"])
        assert torch.equal(batch["labels"][i, :n], e["labels"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()      # padding never carries loss


def test_collate_errors():
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        collate([{"input_ids": [1, 2], "labels": [1, 2]}], pad_id=-1)
    with pytest.raises(ValueError, match="example 0"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_id=0)


def test_model_loss_is_the_mean_over_answer_tokens_only(tok, splits):
    """With our labels, the model's loss equals cross-entropy averaged over answer tokens, by hand."""
    from lora_ref.models import tiny_llama
    model = tiny_llama(seed=0, vocab_size=len(tok))
    batch = collate([encode_example(tok, e) for e in splits.train[:4]], pad_id=tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1]                    # position t predicts token t+1
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # the number of loss-carrying targets is exactly the answers' tokens plus one <|im_end|> each
    assert mask.sum() == sum(len(tok(e.answer, add_special_tokens=False)["input_ids"]) + 1 for e in splits.train[:4])


def test_tiny_tokenizer_is_deterministic_and_fits_tiny_llama(tok):
    again = tiny_tokenizer()
    assert tok.get_vocab() == again.get_vocab()
    assert len(tok) <= 256
    assert (tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2])
    text = "Hi! Is Pip there? 8:00-18:00 €1,890"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text      # round trip
    assert tok("ж", add_special_tokens=False)["input_ids"] == [0]                       # unknown -> id 0
    with pytest.raises(ValueError, match="vocab_size=50"):
        tiny_tokenizer(vocab_size=50)


# ---------------------------------------------------------------- the real tokenizer

@pytest.mark.slow
def test_real_smollm2_tokenizer(splits):
    from lora_ref.models import load_tokenizer
    tok = load_tokenizer()
    lengths = []
    for ex in splits.train + splits.heldout:
        enc = encode_example(tok, ex)
        ids, labels = enc["input_ids"], enc["labels"]
        lengths.append(len(ids))
        carrying = labels != IGNORE_INDEX
        assert tok.decode(ids[carrying]) == ex.answer + "<|im_end|>"
        # separate tokenisation of prompt and answer agrees with tokenising the whole conversation
        full = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": ex.question},
                                        {"role": "assistant", "content": ex.answer}], tokenize=False)
        assert tok(full, add_special_tokens=False)["input_ids"] == ids.tolist()
    assert max(lengths) < 96, f"longest example {max(lengths)} tokens"
