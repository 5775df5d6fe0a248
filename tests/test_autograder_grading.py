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

# one xdist worker runs the whole module, so the class is graded once (tests/conftest.py: SHARED_FIXTURE_MODULES)
pytestmark = pytest.mark.slow
EXTRA = "autograder.selftest_exercises"
ESCAPE = Path("/tmp/autograder_escape.txt")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOGRADER_EXTRA_EXERCISES", EXTRA)
    from autograder import grade, samples

    # a deep grading folder: the kernel's runtime folder is then far past a unix socket's 107-byte name
    # limit (the kernel must still start: autograder.worker.kernel_socket_link)
    root = tmp_path_factory.mktemp("class") / "a-grading-folder-deep-enough-that-no-socket-path-inside-it-fits"
    root.mkdir()
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
    # no grader path, no Matplotlib warning (a read-only config folder), test cells named (issue 13, item 9)
    root = graded[0]
    assert "not a writable directory" not in html and "building the font cache" not in html
    assert "mplcache" not in html and str(root) not in html
    assert "Test cell <code>test_scaled_linear</code>" in html and "Test cell <code>test_lora_delta</code>" in html


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
    assert "rich output of this cell dropped after" in nb.read_text()


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
        assert "FAILED  test_lora_delta" in proc.stdout and "NotImplementedError: not answered yet" in proc.stdout
        assert not any(line.rstrip().endswith("NotImplementedError:") for line in proc.stdout.splitlines())


def test_make_validate_names_the_autograders_exit_code(graded):
    root = graded[0]
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "validate", f"NB={root / 'inbox' / f'blank_{ASSIGNMENT}.ipynb'}"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "make validate: exit 1 (a visible test failed" in proc.stderr, proc.stderr


# -- the same class on a Dask cluster ---------------------------------------------------------------------------

DASK_STUDENTS = ("perfect", "blank", "forgot_scaling", "cheat_patch", "crash_exit")


def _verdict(r: dict) -> dict:
    return dict(status=r["status"], score=r["score"], nbgrader_score=r["nbgrader_score"], max_score=r["max_score"],
                withdrawn=sorted(r["withdrawn"]), crashes=len(r["crashes"]), flag=r["audit"]["flag"],
                cells={g: (c["score"], c["max"], c["withdrawn"]) for g, c in r["cells"].items()},
                judge={e: (o["passed"], o["cases"], o["cases_passed"]) for e, o in r["judge"].items()})


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, seconds: float = 120) -> None:
    import socket
    import time
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, "the dask scheduler exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def dask_processes(tmp_path):
    """A real `dask scheduler` and `dask worker` processes on 127.0.0.1, stopped (by pid) at the end."""
    import os
    import signal
    dask = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    env = dict(os.environ, AUTOGRADER_EXTRA_EXERCISES=EXTRA, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    procs = []

    def start(*args, log):
        p = subprocess.Popen([dask, *args], stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        procs.append(p)
        return p

    scheduler = start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", "--no-show",
                      log="scheduler.log")
    _wait_port(port, scheduler)
    address = f"tcp://127.0.0.1:{port}"

    def worker(name):
        return start("worker", address, "--name", name, "--nthreads", "1", "--no-nanny", "--memory-limit", "0",
                     "--host", "127.0.0.1", "--no-dashboard", log=f"{name}.log")
    yield address, worker
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()


def test_dask_cluster_grades_like_the_local_run_despite_a_killed_worker(graded, dask_processes, tmp_path):
    """Two `dask worker` processes; the one that takes the first task is killed (SIGKILL) while it
    grades, a third joins late. Every submission gets exactly one result, equal to the local run's,
    and one gradebook row; a second run grades nothing again (results on disk are the record)."""
    import os
    import signal
    import time
    from distributed import Client

    root, opts, local = graded
    address, worker = dask_processes
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for s in DASK_STUDENTS:
        (inbox / f"{s}_{ASSIGNMENT}.ipynb").write_bytes((root / "inbox" / f"{s}_{ASSIGNMENT}.ipynb").read_bytes())
    workers = {"w1": worker("w1"), "w2": worker("w2")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autograder", "grade", str(inbox), "--scheduler", address, "--source",
           str(root / "solutions"), "--out", str(out), "--timeout", str(opts.timeout), "--submission-timeout",
           str(opts.submission_timeout), "--memory-mb", str(opts.memory_mb), "--quiet"]
    env = dict(os.environ, AUTOGRADER_EXTRA_EXERCISES=EXTRA)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    killed = None
    with Client(address, timeout=30) as client:
        deadline = time.time() + 600
        busy_since: dict[str, float] = {}
        while killed is None and time.time() < deadline and run.poll() is None:
            info = client.scheduler_info()["workers"]
            for addr, keys in client.processing().items():
                name = info.get(addr, {}).get("name")
                if keys and name in workers:
                    busy_since.setdefault(name, time.time())
                    if time.time() - busy_since[name] > 3:          # mid-task: its grading subprocess runs
                        os.kill(workers[name].pid, signal.SIGKILL)
                        killed = name
                        worker("w3")                               # a worker that joins late
                        break
            time.sleep(0.5)
    output, _ = run.communicate(timeout=900)
    assert killed, "no worker was seen grading, so none was killed: " + output[-2000:]
    assert run.returncode == 0, output[-3000:]
    files = sorted(p.stem for p in (out / "results" / ASSIGNMENT).glob("*.json"))
    assert files == sorted(DASK_STUDENTS)
    remote = {s: json.loads((out / "results" / ASSIGNMENT / f"{s}.json").read_text()) for s in DASK_STUDENTS}
    for s in DASK_STUDENTS:        # error texts name the run's secret cases, so verdicts are compared
        assert _verdict(remote[s]) == _verdict(local[s]), s
    assert len((out / "grades.csv").read_text().splitlines()) == 1 + len(DASK_STUDENTS)
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{out / 'course' / 'gradebook.db'}", "lora-course") as gb:
        subs = gb.assignment_submissions(ASSIGNMENT)
        assert sorted(x.student_id for x in subs) == sorted(DASK_STUDENTS)    # one row each
        for x in subs:
            assert x.score == remote[x.student_id]["score"], x.student_id
    feedback = Path(remote["perfect"]["feedback"])
    assert feedback.is_file() and str(out / "course" / "feedback") in str(feedback)
    # each Dask worker forks its tasks' workers from its own fork server (imports paid once per worker)
    tasks = {s: json.loads((out / "scratch" / ASSIGNMENT / s / "task.json").read_text()) for s in DASK_STUDENTS}
    assert {t["started"] for t in tasks.values()} == {"forked"}, tasks
    for t in tasks.values():          # where a task's time went (the class-scale benchmark reads it)
        parts = [t[k] for k in ("server_s", "setup_s", "worker_s", "after_s")]
        assert min(parts) >= 0 and t["worker_s"] > 0 and abs(sum(parts) - t["seconds"]) <= 0.2, t
    before = {p: p.read_bytes() for p in (out / "results").rglob("*.json")}
    again = subprocess.run(cmd[:-1], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(DASK_STUDENTS)} submission(s) already graded" in again.stdout, again.stdout[-2000:]
    assert {p: p.read_bytes() for p in (out / "results").rglob("*.json")} == before
