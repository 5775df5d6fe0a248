"""The ledger of graded inputs (``run.json`` + ``run.journal``, autograder.grade.Ledger): what lets a
killed run resume, and what a class of thousands must not pay for quadratically."""
from __future__ import annotations

import json

from autograder.grade import Ledger

ENTRY = {"input": "a" * 16, "assignment": "b" * 16, "grader": "c" * 16, "options": [300, 1800, 4096]}


def test_a_result_appends_one_line_and_rewrites_nothing(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.sources.append("class")
    ledger.save()
    before = (tmp_path / "run.json").read_bytes()
    sizes = []
    for i in range(200):
        ledger.record(f"02/s{i:03d}", ENTRY)
        sizes.append((tmp_path / "run.journal").stat().st_size)
    # every record adds the same few bytes, however many came before: O(1) per result, not O(n)
    steps = {b - a for a, b in zip(sizes, sizes[1:])}
    assert len(steps) == 1 and steps.pop() < 200, sizes[:5]
    assert (tmp_path / "run.json").read_bytes() == before
    ledger.compact()
    assert not (tmp_path / "run.journal").exists()
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["sources"] == ["class"] and len(data["graded"]) == 200 and data["graded"]["02/s007"] == ENTRY


def test_a_killed_run_leaves_a_journal_the_next_run_reads(tmp_path):
    ledger = Ledger(tmp_path)
    for i in range(3):
        ledger.record(f"02/s{i}", ENTRY)
    ledger.record("02/s0", dict(ENTRY, input="d" * 16))      # graded again later in the same run: the last wins
    with open(tmp_path / "run.journal", "a") as f:            # the kill cut the next line short
        f.write('\n["02/s9", {"input": "ee')
    again = Ledger(tmp_path)
    assert sorted(again.graded) == ["02/s0", "02/s1", "02/s2"]
    assert again.graded["02/s0"]["input"] == "d" * 16
    result = tmp_path / "s1.json"
    result.write_text("{}")
    assert again.up_to_date("02/s1", ENTRY, result) and not again.up_to_date("02/s9", ENTRY, result)
    again.record("02/s9", ENTRY)                              # a record after the cut line is read whole
    assert "02/s9" in Ledger(tmp_path).graded
    again.compact()
    assert sorted(Ledger(tmp_path).graded) == ["02/s0", "02/s1", "02/s2", "02/s9"]
