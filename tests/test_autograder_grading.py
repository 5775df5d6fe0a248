"""End to end: grade a class of generated submissions of a small self-test assignment.

One batch of every kind of bad submission (see autograder/samples.py) is graded once per module with
the real nbgrader, in parallel, in the sandbox; each test then checks one submission's result.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from autograder.selftest import ASSIGNMENT, build_course

pytestmark = pytest.mark.slow
EXTRA = "autograder.selftest_exercises"
ESCAPE = Path("/tmp/autograder_escape.txt")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_REF_EXTRA_EXERCISES", EXTRA)
    from autograder import grade, samples

    root = tmp_path_factory.mktemp("class")
    build_course(root)
    opts = grade.Options(submissions=root / "inbox", source=root / "solutions", out=root / "out", jobs=2,
                         timeout=15, submission_timeout=400, memory_mb=3072, quiet=True)
    a = grade.prepare_assignment(ASSIGNMENT, opts, root / "out" / "course")
    release = nbformat.read(str(root / "out" / "course" / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"), as_version=4)
    solution = nbformat.read(str(a.path), as_version=4)
    (root / "inbox").mkdir()
    samples.write_assignment_samples(root / "inbox", ASSIGNMENT, release, solution)
    ESCAPE.unlink(missing_ok=True)
    results = {r["student"]: r for r in grade.grade(opts)}
    yield root, opts, results
    mp.undo()
    import lora_ref.exercises as exercises
    for key in [k for k in exercises.REGISTRY if k.startswith("99.")]:
        del exercises.REGISTRY[key]


def test_every_file_gets_a_result(graded):
    root, _, results = graded
    inbox = [p for p in (root / "inbox").rglob("*") if p.is_file()]
    assert len(results) == len(inbox) == 21
    kept = [p for p in (root / "out" / "intake").rglob("*") if p.is_file()]
    assert sorted(p.read_bytes() for p in kept) == sorted(p.read_bytes() for p in inbox), "an original file was lost"
    csv = (root / "out" / "grades.csv").read_text().splitlines()
    assert len(csv) == 22 and csv[0].startswith("student,assignment,score")
    assert (root / "out" / "histogram.png").stat().st_size > 1000
    assert "test cell test_scaled_linear" in (root / "out" / "summary.md").read_text()


@pytest.mark.parametrize("student,score", [
    ("perfect", 5), ("blank", 0), ("partial", 2), ("forgot_scaling", 2), ("nbformat3", 5), ("jonesmary", 5),
    ("missing_cells", 5),
    ("grace_hopper_5512", 5), ("duplicated_cells", 5), ("deleted_metadata", 5), ("edited_locked", 2),
    ("infinite_loop", 5), ("memory_bomb", 5), ("huge_output", 5), ("crash_exit", 2), ("segfault", 2),
])
def test_scores(graded, student, score):
    r = graded[2][student]
    assert r["status"] == "graded", r["notes"]
    assert r["score"] == score, (r["cells"], r["judge"], r["notes"], r.get("crashes"))
    assert r["max_score"] == 6


def test_perfect_is_clean_and_feedback_hides_hidden_tests(graded):
    r = graded[2]["perfect"]
    assert r["audit"]["flag"] == "ok", r["audit"]
    assert all(o["passed"] for o in r["judge"].values())
    html = Path(r["feedback"]).read_text()
    assert 'check("99.scaled_linear"' not in html and "check(&quot;" not in html and r["hidden_leaks"] == []
    assert "Checks run outside your notebook" in html


def test_patching_cheat_loses_the_points_and_is_flagged(graded):
    r = graded[2]["cheat_patch"]
    # the patching code sits in the lora_delta cell: its lora_ref import fails in the judge, so that
    # cell defines nothing there either; ScaledLinear is wrong (x 1.01) and passed only thanks to the patch
    assert r["nbgrader_score"] == 5 and r["score"] == 0, (r["nbgrader_score"], r["cells"])
    assert sorted(r["withdrawn"]) == ["test_lora_delta", "test_scaled_linear"]
    assert "differs from the reference" in r["judge"]["99.scaled_linear"]["error"]
    assert r["audit"]["flag"] == "integrity"
    static = " ".join(r["audit"]["static"])
    assert "torch.allclose" in static and "_grading.check" in static
    assert any("blocked_import" in x for x in r["audit"]["runtime"])


def test_reference_delegation_gets_nothing(graded):
    r = graded[2]["cheat_reference"]
    assert r["nbgrader_score"] == 5 and r["score"] == 0
    assert sorted(r["withdrawn"]) == ["test_lora_delta", "test_scaled_linear"]
    assert any("imports autograder.selftest_exercises" in s for s in r["audit"]["static"])


def test_crashes_are_named_and_skipped(graded):
    for student in ("crash_exit", "segfault"):
        r = graded[2][student]
        assert r["crashes"] and "kernel died" in r["crashes"][0]
        assert r["judge_deaths"], student


def test_writes_outside_are_contained_and_flagged(graded):
    root, _, results = graded
    r = results["write_outside"]
    assert not ESCAPE.exists() and not (root / "out" / "course" / "escape.txt").exists()
    assert r["audit"]["flag"] == "integrity"
    assert any("write_outside" in x and "autograder_escape" in x for x in r["audit"]["runtime"])


def test_huge_output_is_capped(graded):
    root = graded[0]
    nb = root / "out" / "course" / "autograded" / "huge_output" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    assert nb.stat().st_size < 3_000_000
    assert "truncated" in nb.read_text()


def test_rejected_files_say_why(graded):
    results = graded[2]
    assert results["invalid_json"]["status"] == "rejected" and "invalid JSON" in results["invalid_json"]["notes"][0]
    assert results["not_a_notebook"]["status"] == "rejected"
    # a deleted test cell is put back by nbgrader and run (the learner cannot dodge a test by deleting it)
    assert any("test cell test_scaled_linear is missing" in n for n in results["missing_cells"]["notes"])
    assert results["missing_cells"]["cells"]["test_scaled_linear"]["score"] == 3


def test_regrading_one_student_is_idempotent_and_touches_no_other(graded):
    from autograder import grade

    root, opts, before = graded
    results_dir = root / "out" / "results" / ASSIGNMENT
    others = {p.name: p.read_bytes() for p in results_dir.glob("*.json") if p.stem != "cheat_patch"}
    autograded = root / "out" / "course" / "autograded"
    other_nbs = {p: p.read_bytes() for p in autograded.rglob("*.ipynb") if "cheat_patch" not in p.parts}
    opts.student = "cheat_patch"
    again = {r["student"]: r for r in grade.grade(opts)}
    opts.student = None
    assert {p.name: p.read_bytes() for p in results_dir.glob("*.json") if p.stem != "cheat_patch"} == others
    assert {p: p.read_bytes() for p in autograded.rglob("*.ipynb") if "cheat_patch" not in p.parts} == other_nbs
    a, b = before["cheat_patch"], again["cheat_patch"]
    for key in ("score", "nbgrader_score", "withdrawn", "cells", "judge"):
        assert a[key] == b[key], key
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{root / 'out' / 'course' / 'gradebook.db'}", "lora-course") as gb:
        sub = gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, "cheat_patch")
        assert sub.score == b["score"]
        assert gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, "perfect").score == 5


@pytest.mark.parametrize("name,code", [("perfect", 0), ("blank", 1), ("invalid_json", 2)])
def test_validate_exit_codes(graded, name, code):
    root = graded[0]
    path = root / "inbox" / f"{name}_{ASSIGNMENT}.ipynb"
    proc = subprocess.run([sys.executable, "-m", "autograder", "validate", str(path), "--timeout", "30"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 1:
        assert "FAILED  test_lora_delta" in proc.stdout and "NotImplementedError" in proc.stdout
