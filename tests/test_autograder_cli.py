"""The grading command's contract with an instructor, without running any notebook (fast):
clear one-line errors (exit 2), one class per output folder, zip members that try to escape, a
notebook of another assignment, what grades.csv and the console say, feedback pages, make's codes."""
from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

from autograder import grade, intake, reports
from autograder.contracts import Audit, CellScore, Result

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "autograder", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _make(*args, timeout=120):
    # -o: treat the venv as up to date (make would otherwise reinstall it when pyproject.toml is newer)
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_missing_submissions_path_is_one_line_and_exit_2(tmp_path):
    proc = _cli("grade", tmp_path / "nope.zip", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"autograder grade: submissions path {tmp_path / 'nope.zip'} does not exist"]
    assert "Traceback" not in proc.stdout + proc.stderr
    made = _make("grade", f"SUBMISSIONS={tmp_path / 'nope.zip'}")
    assert made.returncode == 2 and "Traceback" not in made.stdout + made.stderr
    ours = [l for l in (made.stdout + made.stderr).splitlines() if not l.startswith("make")]
    assert ours == [f"autograder grade: submissions path {tmp_path / 'nope.zip'} does not exist"], made.stderr


def test_unreachable_scheduler_is_a_clear_error_at_start(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    (tmp_path / "in").mkdir()
    t = time.time()
    proc = _cli("grade", tmp_path / "in", "--scheduler", f"tcp://127.0.0.1:{port}", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Dask scheduler" in lines[0] and str(port) in lines[0], proc.stderr
    assert time.time() - t < 60
    assert not (tmp_path / "out" / "grades.csv").exists()


def test_bad_cluster_spec_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    proc = _cli("grade", tmp_path / "in", "--cluster", "remote:3", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "expected local:N" in proc.stderr


def _pdf_set(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for n in names:
        (folder / f"{n}.pdf").write_bytes(b"%PDF-1.4")
    return folder


def test_two_submission_sets_never_share_an_output_folder(tmp_path, monkeypatch):
    """A second class graded after the first goes to its own folder by default; into the same
    folder it is refused with the reason, unless --add asks for it (issue 13, item 1)."""
    monkeypatch.chdir(tmp_path)
    first = _pdf_set(tmp_path / "samples_like", [f"s{i}" for i in range(5)])
    second = _pdf_set(tmp_path / "class", ["a", "b", "c"])
    grade.grade(grade.Options(submissions=first, quiet=True))
    results = grade.grade(grade.Options(submissions=second, quiet=True))
    assert len(results) == 3
    rows = list(csv.DictReader(open(tmp_path / "grading" / "class" / "grades.csv")))
    assert sorted(r["student"] for r in rows) == ["a", "b", "c"]
    with pytest.raises(grade.UsageError, match="already holds the grades of .*samples_like.*--add"):
        grade.grade(grade.Options(submissions=second, out=tmp_path / "grading" / "samples_like", quiet=True))
    merged = grade.grade(grade.Options(submissions=second, out=tmp_path / "grading" / "samples_like", quiet=True, add=True))
    assert len(merged) == 8
    again = grade.grade(grade.Options(submissions=second, quiet=True))      # the same set again: fine
    assert len(again) == 3


def _selftest_release(tmp_path):
    from autograder.selftest import ASSIGNMENT, build_course
    build_course(tmp_path)
    opts = grade.Options(source=tmp_path / "solutions", out=tmp_path / "out")
    a = grade.prepare_assignment(ASSIGNMENT, opts, tmp_path / "out" / "course")
    return a, nbformat.read(str(tmp_path / "out" / "course" / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"), as_version=4)


def test_zip_with_a_traversal_member_refuses_it_and_keeps_the_rest(tmp_path):
    a, release = _selftest_release(tmp_path)
    z = tmp_path / "class.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("alice_99_selftest.ipynb", nbformat.writes(release))
        zf.writestr("../../escape_99_selftest.ipynb", nbformat.writes(release))
        zf.writestr("/abs_99_selftest.ipynb", nbformat.writes(release))
    subs = {s.student: s for s in intake.collect(z, {a.name: a}, None, tmp_path / "work")}
    assert subs["alice"].status == "ok"
    for bad in ("escape_99_selftest", "abs_99_selftest"):
        assert subs[bad].status == "rejected" and "path traversal" in subs[bad].notes[0], subs[bad].notes
    assert not (tmp_path / "escape_99_selftest.ipynb").exists() and not Path("/abs_99_selftest.ipynb").exists()
    assert not list(tmp_path.parent.glob("escape_99_selftest.ipynb"))


def test_notebook_of_another_assignment_is_named_as_such(tmp_path):
    """--assignment 02 given a notebook of 05: one row that says so, not "answer cell missing"."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ROOT / "notebooks" / "05_nf4_quantisation" / "05_nf4_quantisation.ipynb", folder / "kim.ipynb")
    results = grade.grade(grade.Options(submissions=folder, assignment="02_lora_linear", out=tmp_path / "out", quiet=True))
    assert len(results) == 1
    r = results[0]
    assert r["status"] == "rejected" and r["assignment"] == "05_nf4_quantisation"
    assert any("wrong assignment" in n and "05_nf4_quantisation" in n and "02_lora_linear" in n for n in r["notes"])
    assert not any("missing" in n for n in r["notes"]), r["notes"]


# -- what the reports say ---------------------------------------------------------------------------------------

def _result(**kw) -> Result:
    base = dict(student="eve", assignment="02_lora_linear", status="graded", score=9.0, max_score=9.0, nbgrader_score=9.0)
    return Result(**{**base, **kw})


def test_grades_csv_says_why_a_full_score_is_flagged(tmp_path):
    r = _result(audit=Audit(flag="integrity", runtime=["judge: blocked_import: lora_ref.lora"]), patched=["torch.allclose"])
    timeout = _result(student="tim", status="timeout", score=0, notes=["ran past the per-submission time limit (900 s); killed"])
    memory = _result(student="mem", score=6.0, cells={"test_a": CellScore(score=0.0, max=3.0, error="MemoryError: "),
                                                       "test_b": CellScore(score=6.0, max=6.0)})
    blank = _result(student="bob", score=0.0, cells={"test_a": CellScore(score=0.0, max=3.0, error="NotImplementedError")})
    reports.write_grades([r, timeout, memory, blank], tmp_path / "grades.csv")
    rows = {row["student"]: row for row in csv.DictReader(open(tmp_path / "grades.csv"))}
    assert "torch.allclose" in rows["eve"]["notes"] and "escape attempts recorded: 1" in rows["eve"]["notes"]
    assert "time limit" in rows["tim"]["notes"]
    assert "test_a 0/3: MemoryError" in rows["mem"]["notes"] and "test_b" not in rows["mem"]["notes"]
    assert "not answered yet" in rows["bob"]["notes"]


def test_summary_never_cuts_a_word_and_the_table_never_cuts_notes(tmp_path):
    long = "AssertionError: " + " ".join(f"word{i:03d}" for i in range(80))
    results = [_result(student=s, score=0.0, cells={"t": CellScore(score=0.0, max=9.0, error=long)},
                       notes=[long]) for s in ("a", "b")]
    rows = reports.summarize(results)
    reports.write_summary(rows, tmp_path / "s.csv", tmp_path / "s.md")
    cell = next(l for l in (tmp_path / "s.md").read_text().splitlines() if "test cell t" in l).split("|")[-2].strip()
    assert cell.endswith("…") and all(w.startswith("word") or w in ("AssertionError:", "…") for w in cell.split())
    assert all(len(w) == 7 for w in cell.split() if w.startswith("word")), cell
    text = reports.table(results, width=100)
    assert "word079" in text and max(len(l) for l in text.splitlines()) <= 100


def test_feedback_names_test_cells_and_hides_grader_paths(tmp_path):
    page = tmp_path / "f.html"
    page.write_text('<li><a href="#test_lora_forward">Test cell</a> (Score: 1.0 / 1.0)</li>'
                    f"<pre>{tmp_path}/grading/course/mplcache is not a writable directory</pre>")
    reports.clean_feedback(page, [str(tmp_path)])
    text = page.read_text()
    assert 'Test cell <code>test_lora_forward</code>' in text and str(tmp_path) not in text


def test_make_validate_reports_the_code_of_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    proc = _make("validate", f"NB={bad}")
    assert proc.returncode == 2
    assert "make validate: exit 2" in proc.stderr and "cannot be read" in proc.stdout + proc.stderr


def test_cli_defaults_come_from_contracts_and_the_isolation_flag_reaches_the_grader(monkeypatch, capsys):
    """--jobs/--memory-mb defaults are DEFAULTS'; --accept-no-isolation is the only way past a missing sandbox."""
    from autograder import cli, grade, sandbox
    from autograder.contracts import DEFAULTS

    seen = {}

    def fake_grade(opts):
        seen["opts"] = opts
        return grade.isolation_mode(opts) and []

    monkeypatch.setattr(grade, "grade", fake_grade)
    monkeypatch.setattr(sandbox, "available", lambda: "no user namespaces (test)")
    assert cli.main(["grade", "nowhere"]) == 2
    assert "refusing to grade" in capsys.readouterr().err
    assert seen["opts"].jobs == DEFAULTS.jobs and seen["opts"].memory_mb == DEFAULTS.memory_mb
    assert seen["opts"].accept_no_isolation is False
    monkeypatch.setattr("autograder.reports.table", lambda *a, **k: "")
    try:
        cli.main(["grade", "nowhere", "--accept-no-isolation"])
    except Exception:
        pass  # what follows grading (reports on an empty run) is not this test's concern
    assert seen["opts"].accept_no_isolation is True
    assert "WITHOUT isolation" in capsys.readouterr().err


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_a_memory_limit_below_what_torch_maps_is_refused_before_any_grading(tmp_path, monkeypatch, fork_server):
    """A CUDA build of torch maps several GB of address space, which RLIMIT_AS counts: a limit below it
    would fail every cell that imports torch and score a whole class zero. The run measures what torch
    maps here (the fork server's own imports, or a fresh interpreter without one) and refuses, naming the
    limit to use. Here: CPU torch (about 600 MB) and a limit of 1100 MB, which leaves no 1 GB of room."""
    from autograder import sandbox
    from autograder.selftest import ASSIGNMENT, build_course
    monkeypatch.setenv("AUTOGRADER_FORK_SERVER", fork_server)
    monkeypatch.setenv("AUTOGRADER_EXTRA_EXERCISES", "autograder.selftest_exercises")
    mapped = sandbox.torch_mapped_mb()
    assert mapped is not None and 300 < mapped < 1100, mapped         # so 1100 leaves less than HEADROOM_MB
    build_course(tmp_path)
    a, release = _selftest_release(tmp_path / "release")
    (tmp_path / "in").mkdir()
    nbformat.write(release, str(tmp_path / "in" / f"alice_{ASSIGNMENT}.ipynb"))
    opts = grade.Options(submissions=tmp_path / "in", source=tmp_path / "solutions", out=tmp_path / "out",
                         memory_mb=1100, quiet=True)
    import lora_ref.exercises as exercises
    try:
        with pytest.raises(grade.UsageError) as err:
            grade.grade(opts)
    finally:
        for key in [k for k in exercises.REGISTRY if k.startswith("99.")]:
            del exercises.REGISTRY[key]
        sys.modules.pop("autograder.selftest_exercises", None)     # registers its exercises on import
    message = str(err.value)
    assert "importing torch alone maps" in message and "--memory-mb" in message, message
    suggested = int(message.split("--memory-mb ")[1].split()[0])
    assert suggested >= mapped + sandbox.HEADROOM_MB
    assert not list((tmp_path / "out" / "results").rglob("*.json")), "a submission was graded under that limit"


def test_memory_room_names_the_limit_that_fits_a_cuda_build():
    from autograder import sandbox
    assert sandbox.memory_room(4096, 700) == ""                 # a CPU build under the default
    why = sandbox.memory_room(4096, 9000)                       # what a CUDA build can map
    assert "9000 MB" in why and "--memory-mb 12288" in why, why
    assert sandbox.memory_room(4096, None) == ""                # not measurable: the limit stands as given
