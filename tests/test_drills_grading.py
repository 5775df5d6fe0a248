"""Grading: quantities with units, multiple choice, free-text key-point coverage, spot-the-bug lines, ratings."""
import pytest

from lora_ref.drills import bank
from lora_ref.drills.grading import (AGAIN, GOOD, HARD, FREE_TEXT_LIMITS, QuantityError, cited_lines, format_quantity,
                                     grade, grade_bug, grade_free, grade_numeric, normalise, parse_choice,
                                     parse_quantity, parse_rating)
from lora_ref.drills.items import Item, kp


@pytest.mark.parametrize("text, unit, answer_unit, expected", [
    ("16.8M", "params", None, 16.8e6),
    ("16,777,216", "params", None, 16_777_216),
    ("16 777 216", "params", None, 16_777_216),
    ("16.8 million params", "params", None, 16.8e6),
    ("~16.8M parameters", "params", None, 16.8e6),
    ("7B", "params", None, 7e9),
    ("131K", "params", None, 131e3),
    ("3.2e12 FLOPs", "FLOPs", None, 3.2e12),
    ("1.2 TFLOPs", "FLOPs", None, 1.2e12),
    ("2 GB", "bytes", None, 2e9),
    ("1.5 GiB", "bytes", None, 1.5 * 2**30),
    ("512 MiB", "bytes", None, 512 * 2**20),
    ("33.5", "bytes", "MB", 33.5e6),
    ("6.74", "params", "B", 6.74e9),
    ("4.127 bits", "bits/param", None, 4.127),
    ("128x", "x", None, 128.0),
])
def test_parse_quantity(text, unit, answer_unit, expected):
    assert parse_quantity(text, unit, answer_unit) == pytest.approx(expected)


@pytest.mark.parametrize("text, unit, match", [
    ("two gigabytes", "bytes", "could not read a number"),
    ("2 GB", "params", "in bytes"),
    ("3 parsecs", "params", "not a unit"),
    ("3 M", "bytes", "not a byte unit"),
    ("", "params", "could not read"),
])
def test_parse_quantity_errors_name_the_text(text, unit, match):
    with pytest.raises(QuantityError, match=match):
        parse_quantity(text, unit)


def _numeric(value, unit="bytes", answer_unit="GB", rel_tol=0.02):
    return Item(id="t.num", topic="sizing", kind="numeric", prompt="How many bytes?", answer="Because arithmetic.",
                key_points=(), difficulty=1, source="a test source", value=value, unit=unit,
                answer_unit=answer_unit, rel_tol=rel_tol)


def test_grade_numeric_tolerance_units_and_hints():
    item = _numeric(14.116e9)
    assert grade_numeric(item, "14.1 GB").correct
    assert grade_numeric(item, "14.1").correct                         # bare number: the asked unit
    assert grade_numeric(item, "13.15 GiB").correct                    # 13.15 GiB = 14.12 GB
    miss = grade_numeric(item, "14.1 GiB")                             # 15.1 GB: off by 7.4%
    assert not miss.correct and "GiB vs GB" in miss.feedback
    assert "1000" in grade_numeric(item, "14.1 MB").feedback
    bad = grade_numeric(item, "a lot")
    assert not bad.correct and bad.suggested == AGAIN and "could not read" in bad.feedback
    count = _numeric(16_777_216, "params", None, 0.005)
    assert grade_numeric(count, "16.8M").correct and grade_numeric(count, "16,777,216").correct
    assert not grade_numeric(count, "17M").correct                     # 1.3% off, tolerance 0.5%
    assert "factor of 2" in grade_numeric(count, "8.39M").feedback     # forgot A or B
    assert "16,777,216" in format_quantity(16_777_216, "params") and "16.8M" in format_quantity(16_777_216, "params")


def test_choice_parsing():
    assert parse_choice("b", 4) == 1 and parse_choice("(C)", 4) == 2 and parse_choice("4", 4) == 3
    with pytest.raises(QuantityError, match="not one of the options"):
        parse_choice("e", 4)


def test_normalise_spelling_symbols_and_synonyms():
    assert normalise("Quantisation") == normalise("quantization")
    assert normalise("bfloat16") == normalise("bf16")
    assert normalise("low-rank") == normalise("low rank") == ["lowrank"]
    assert normalise("α / r") == normalise("alpha/r")
    assert normalise("optimiser") == normalise("optimizer")
    assert "zero" in normalise("B is initialised with zeros")


def test_free_text_coverage_scores_and_suggestions():
    item = bank.get_item("lora.init")
    good = grade_free(item, "B starts at zero and A is random (Kaiming uniform), so delta W is zero and the "
                            "model starts unchanged; if both were zero the gradients would be zero too.")
    assert good.score == 1.0 and good.suggested == GOOD and not good.missed
    half = grade_free(item, "B is zero, A is random.")
    assert 0.4 <= half.score < 0.75 and half.suggested == HARD and half.missed
    assert grade_free(item, "No idea.").suggested == AGAIN


def test_free_text_limits_are_stated_and_real():
    # a plain negation is caught now (issue 13); saying the opposite in other words is the stated blind spot
    item = bank.get_item("lora.init")
    assert grade_free(item, "B is not zero").contradicted == ("B is zero at init",)
    assert grade_free(item, "B is nonzero, a large value").covered == ()            # not covered either
    assert "B is zero at init" in grade_free(item, "B starts at a big value, far from zero").covered   # blind spot
    assert "opposite" in FREE_TEXT_LIMITS and "rate yourself" in FREE_TEXT_LIMITS


def test_bug_grading_needs_the_line_and_the_reason():
    item = bank.get_item("bug.scale-7")
    right = grade_bug(item, "Line 3: dividing absmax by 7 is the int4 range; NF4 codes are in [-1, 1], so values "
                            "saturate at the end codes. Use absmax; an all-zero block gives NaN.")
    assert right.correct and right.score == 1.0
    wrong_line = grade_bug(item, "Line 5: dividing by 7 is int4's range, values saturate; scale should be absmax")
    assert not wrong_line.correct and "line 3" in wrong_line.feedback
    line_only = grade_bug(item, "line 3")
    assert not line_only.correct and line_only.score == pytest.approx(1 / 5)


def test_cited_lines():
    assert cited_lines("line 12 and lines 3-5, L7") == {3, 4, 5, 7, 12}
    assert cited_lines("14: wrong shape") == {14}
    assert cited_lines("the transpose is wrong") == set()


def test_parse_rating():
    assert parse_rating("", 3) == 3 and parse_rating("1", 3) == 1 and parse_rating("Easy", 3) == 4
    with pytest.raises(ValueError, match="1-4"):
        parse_rating("7", 3)


def test_grade_dispatch_by_kind():
    assert grade(bank.get_item("mp.formats"), "b").correct
    assert not grade(bank.get_item("mp.formats"), "a").correct
    with pytest.raises(ValueError):
        kp("", "x")
