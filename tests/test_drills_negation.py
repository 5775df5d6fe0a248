"""The drill grader as a new user met it (issue 13, item 6): negated key points, unreadable numbers,
wrong answers said to be wrong."""
import io
import json

import pytest

from lora_ref.drills import bank
from lora_ref.drills.cli import main
from lora_ref.drills.engine import catalogue, resolve
from lora_ref.drills.grading import AGAIN, grade, grade_free, grade_numeric
from lora_ref.drills.progress import Progress

NEGATED = "B is not zero and A is not random; nothing starts at the pretrained model"


def call(args, stdin=""):
    out = io.StringIO()
    return main(args, io.StringIO(stdin), out), out.getvalue()


def test_a_fully_negated_answer_is_wrong():
    g = grade_free(bank.get_item("lora.init"), NEGATED)
    assert not g.correct and g.verdict == "WRONG" and g.score == 0.0 and g.suggested == AGAIN
    assert len(g.contradicted) == 3 and "You said the opposite of: B is zero at init" in g.feedback


@pytest.mark.parametrize("text", ["B isn't zero.", "B can't be zero", "B is never zero", "Nothing sets B to zero"])
def test_negations_of_a_key_point(text):
    assert "B is zero at init" in grade_free(bank.get_item("lora.init"), text).contradicted


@pytest.mark.parametrize("text", ["B is zero, and A is not zero but random.", "B is zero; A is random, not zero.",
                                  "A is random while B is zero"])
def test_a_negation_elsewhere_does_not_contradict(text):
    g = grade_free(bank.get_item("lora.init"), text)
    assert "B is zero at init" in g.covered and not g.contradicted


def test_negative_key_points_are_not_judged_by_negation():
    item = next(resolve(c.id, 0) for c in catalogue() if any(kp.text == "same parameter object, no copy"
                                                            for kp in resolve(c.id, 0).key_points))
    g = grade(item, "It is the same parameter object: no copy is made.")
    assert "same parameter object, no copy" in g.covered


def test_no_model_answer_contradicts_itself():
    for c in catalogue():
        item = resolve(c.id, 0)
        if item.kind in ("free", "bug"):
            assert not grade(item, item.answer).contradicted, item.id


def test_unreadable_number_asks_again_and_reveals_nothing():
    item = resolve("gen.lora-params@3", 0)
    g = grade_numeric(item, "about a third")
    assert g.unreadable and g.verdict == "UNREADABLE" and "45,088,768" not in g.feedback and "45.1" not in g.feedback
    rc, out = call(["--db", ":memory:", "practice", "--once", "--id", "gen.lora-params@3"],
                   "about a third\n45.1M\n\n")
    assert rc == 0
    first, _, rest = out.partition("could not read a number")
    assert "45,088,768" not in first and "Your answer: " in rest and "CORRECT." in rest


def test_unreadable_answer_is_not_recorded(tmp_path):
    db = tmp_path / "p.sqlite"
    rc, out = call(["--db", str(db), "practice", "--once", "--id", "gen.lora-params@3", "--answer", "about a third"])
    assert rc == 2 and "45,088,768" not in out
    with Progress(db) as p:
        assert p.reviews() == []


def test_a_wrong_free_text_answer_says_so():
    rc, out = call(["--db", ":memory:", "practice", "--once", "--id", "lora.init", "--answer", NEGATED])
    assert rc == 0 and "WRONG. Key points covered: 0/4" in out
    rc, out = call(["--db", ":memory:", "practice", "--once", "--id", "lora.init", "--answer", "B is zero, A is random."])
    assert "PARTLY RIGHT. Key points covered: 2/4" in out
    rc, out = call(["--db", ":memory:", "practice", "--once", "--id", "lora.init", "--answer", NEGATED, "--json"])
    assert json.loads(out)["correct"] is False
