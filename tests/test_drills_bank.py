"""The question bank: well formed, answerable, covering the article, and its typed figures match lora_ref."""
import re
from collections import Counter

import pytest

from lora_ref import memory as mem
from lora_ref.drills import bank
from lora_ref.drills.grading import grade, grade_choice
from lora_ref.drills.items import TOPICS, Item, kp, validate_item
from lora_ref.quant import bits_per_parameter, nf4_code

ITEMS = bank.ITEMS


def test_bank_size_and_spread():
    assert len(ITEMS) >= 60
    per_topic = Counter(i.topic for i in ITEMS)
    # every theme of the brief has real depth (sizing is mostly generated, see test_drills_generators)
    for topic in TOPICS:
        if topic != "sizing":
            assert per_topic[topic] >= 5, (topic, per_topic[topic])
    assert set(Counter(i.kind for i in ITEMS)) == {"free", "choice", "bug"}
    assert len({i.id for i in ITEMS}) == len(ITEMS)


@pytest.mark.parametrize("item", ITEMS, ids=lambda i: i.id)
def test_item_well_formed(item: Item):
    validate_item(item)
    assert item.follow_ups, "every item offers follow-up questions"
    assert item.prompt.strip().rstrip(")").endswith(("?", ".", ":")), item.prompt[-30:]


@pytest.mark.parametrize("item", [i for i in ITEMS if i.kind == "choice"], ids=lambda i: i.id)
def test_choice_has_exactly_one_correct_option(item: Item):
    verdicts = [grade_choice(item, chr(ord("a") + k)).correct for k in range(len(item.choices))]
    assert verdicts.count(True) == 1 and verdicts.index(True) == item.correct
    # the model answer explains the right option, not just its letter
    assert len(item.answer) > 80


@pytest.mark.parametrize("item", [i for i in ITEMS if i.kind in ("free", "bug")], ids=lambda i: i.id)
def test_free_items_answerable_and_discriminating(item: Item):
    model = item.answer + (f" (line {item.bug_lines[0]})" if item.kind == "bug" else "")
    full = grade(item, model)
    assert full.score == 1.0, f"the model answer misses its own key points: {full.missed}"
    assert grade(item, "").score == 0.0
    assert grade(item, "I am not sure, I would have to look it up.").score == 0.0
    generic = grade(item, "LoRA uses low rank matrices to make fine-tuning of large language models cheaper.")
    assert generic.score < 0.5, generic.covered


@pytest.mark.parametrize("item", [i for i in ITEMS if i.kind == "bug"], ids=lambda i: i.id)
def test_bug_lines_point_at_code(item: Item):
    lines = item.code.rstrip("\n").split("\n")
    for b in item.bug_lines:
        assert lines[b - 1].strip(), f"bug line {b} is blank"
    assert any(f"line {b}" in item.answer.lower() or f"lines {b}" in item.answer.lower() for b in item.bug_lines)


def test_article_high_frequency_questions_and_templates_covered():
    # the article's 8 high-frequency questions, 4 answer templates and 6 checklist lines each have an item
    must = {
        "lora.principle", "rank.choose", "qlora.three", "qlora.accuracy", "peft.prefix-prompt-ptuning", "full.when",
        "eval.methods", "deploy.merge-vs-separate", "mp.considerations",                 # questions
        "rank.heuristic-formula", "qlora.poor",                                          # templates Q1, Q2 (Q3, Q4 above)
        "lora.param-count", "lora.compute-claim", "full.memory", "lora.init", "lora.scaling",
        "impl.merge-invariants", "qlora.not-innovation",                                 # checklist
    }
    assert must <= set(bank.BY_ID)


def test_article_errors_are_corrected_in_model_answers():
    corrected = {i.id for i in ITEMS if i.corrects_article}
    for needed in ("qlora.three", "rank.heuristic-formula", "eval.perplexity", "bug.nf4-table", "bug.scale-7",
                   "bug.searchsorted", "bug.view-transpose", "bug.clone", "bug.labels", "lora.compute-claim",
                   "full.memory", "impl.freeze", "bug.lora-init-fan"):
        assert needed in corrected
    assert len(corrected) >= 20
    assert "dual-weight" in bank.get_item("qlora.three").answer and "wrong" in bank.get_item("qlora.three").answer


def test_figures_typed_in_the_bank_match_lora_ref():
    text = " ".join(i.answer + " " + " ".join(i.choices) for i in ITEMS)
    # LoRA parameter counts quoted in prose
    assert f"{mem.lora_param_count('llama-2-7b', 16, 'all-linear'):,}" == "39,976,960"
    assert "39,976,960" in text
    assert mem.lora_param_count("llama-2-7b", 16, "attention") == 16_777_216
    assert "16.8M" in bank.get_item("lora.param-count").answer
    # 131,072 per 4096x4096 matrix at r=16 and the 128x per-matrix ratio
    assert 16 * (4096 + 4096) == 131_072 and 4096 * 4096 // 131_072 == 128
    # double quantisation figures
    assert round(bits_per_parameter(64, True) - 4, 3) == 0.127 and "0.127" in text
    assert bits_per_parameter(64, False) == 4.5
    assert round(bits_per_parameter(64, False) - bits_per_parameter(64, True), 3) == 0.373 and "0.373" in text
    # Llama-2-7B total and mixed-precision Adam at 16 bytes/parameter
    assert round(mem.param_count("llama-2-7b") / 1e9, 2) == 6.74 and "6.74B" in text
    assert round(16 * mem.param_count("llama-2-7b") / 1e9) == 108 and "108 GB" in text


def test_nf4_values_quoted_in_bank_are_the_real_codebook():
    code = nf4_code().tolist()
    answer = bank.get_item("bug.nf4-table").answer
    positives = [float(x) for x in re.findall(r"0\.\d{4}", answer.split("positive values are")[1])[:7]]
    assert positives == [round(c, 4) for c in code[8:15]]
    # and the article's table (in the code) is wrong exactly where the answer says
    article = [float(x) for x in re.findall(r"-?\d\.\d+", bank.get_item("bug.nf4-table").code)]
    assert "float('inf')" in bank.get_item("bug.nf4-table").code
    assert [round(c, 4) for c in code[:8]] == article[:8]          # the negative half is right
    assert [round(c, 4) for c in code[8:15]] != article[8:15]      # the positive half is not


def test_validate_item_rejects_bad_items():
    good = bank.get_item("qlora.not-innovation")
    from dataclasses import replace
    with pytest.raises(ValueError, match="correct"):
        validate_item(replace(good, correct=7))
    with pytest.raises(ValueError, match="topic"):
        validate_item(replace(good, topic="nope"))
    with pytest.raises(ValueError, match="distinct"):
        validate_item(replace(good, choices=("a", "a", "b")))
    bug = bank.get_item("bug.labels")
    with pytest.raises(ValueError, match="bug_lines"):
        validate_item(replace(bug, bug_lines=(99,)))
    with pytest.raises(ValueError, match="key points"):
        validate_item(replace(bank.get_item("lora.init"), key_points=(kp("x", "x"),)))
    with pytest.raises(KeyError, match="no bank item"):
        bank.get_item("lora.nope")


def test_key_points_are_specific_to_their_question():
    """Another question's model answer should not earn the points, except for items on the same subject."""
    from lora_ref.drills.grading import covers, normalise
    free = [i for i in ITEMS if i.kind == "free"]
    tokens = {o.id: set(normalise(o.answer)) for o in ITEMS}
    scores = {(it.id, o.id): sum(covers(tokens[o.id], p) for p in it.key_points) / len(it.key_points)
              for it in free for o in ITEMS if o.id != it.id}
    assert sum(scores.values()) / len(scores) < 0.15
    same_subject = {("lora.no-latency", "deploy.merge-vs-separate"), ("rank.model-size", "rank.choose"),
                    ("qlora.three", "qlora.not-innovation"), ("qlora.dq", "qlora.three"), ("qlora.paged", "qlora.three"),
                    ("eval.perplexity", "bug.eval-score"), ("eval.loss-masking", "bug.labels")}
    assert {pair for pair, s in scores.items() if s == 1.0} <= same_subject
