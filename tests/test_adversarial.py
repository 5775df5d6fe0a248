"""A hostile class against the grader (autograder issue 11): every cheat scores no more than the plainly
wrong answer, every probe is contained, the batch completes.

Attacks are generated from the assignments' notebooks (tests/adversarial.py). Two levels:

- the judge alone (fast), for 02 and 05: each attack's answer cells run in the real sandboxed harness
  against the real cases drawn from a secret, with a classmate's files and the reference outputs lying
  next to the attacker's folder, a listener on 127.0.0.1 and a sentinel process outside;
- one batch through ``grade.grade`` (``--jobs 2``, nbgrader and the sandboxed kernel), 02 and 05 mixed:
  the kernel side of the same attacks, withdrawal, feedback, survivors after the batch.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import adversarial  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JUDGED = ["02_lora_linear", "05_nf4_quantisation"]
pytestmark = pytest.mark.slow


class Listener:
    """A TCP server on 127.0.0.1 that counts every byte it receives."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.received += len(data)


def survivors(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Listener, sentinel and the marker the probes' children carry; checked and cleaned after the module."""
    listener = Listener()
    sentinel = subprocess.Popen(["sleep", "3000"], start_new_session=True)
    marker = f"ADVERSARIAL-{os.getpid()}-{time.time_ns()}"
    # the grader's own private files, outside every folder the grading run knows of: /tmp and its home
    private = [Path("/tmp") / f"{marker}.secret", Path.home() / f".{marker}.secret"]
    for path in private:
        path.write_text("the grader's secret")
    yield dict(listener=listener, sentinel=sentinel, marker=marker, private=private)
    for path in private:
        path.unlink(missing_ok=True)
    for pid in survivors(marker):
        os.kill(pid, signal.SIGKILL)
    sentinel.kill()


def _ctx(world, secret_paths: list[Path]) -> dict:
    return dict(outside_pids=[world["sentinel"].pid, os.getpid(), os.getppid()], sentinel=world["sentinel"].pid,
                marker=world["marker"], port=world["listener"].port,
                secret_paths=[str(p) for p in [*secret_paths, *world["private"]]])


# -- the judge alone --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=JUDGED)
def judged(request, world, tmp_path_factory):
    from autograder import judge
    from autograder.contracts import Limits
    from autograder.course import load_assignment

    A = request.param
    out = tmp_path_factory.mktemp(f"judge_{A[:2]}")
    a = load_assignment(ROOT / "solutions", A)
    ref = out / "reference" / f"{A}.safetensors"
    assert judge.reference_outputs(a.exercise_ids, ref, secret=int.from_bytes(os.urandom(7), "little")) == {}
    student = nbformat.read(str(ROOT / "notebooks" / A / f"{A}.ipynb"), as_version=4)
    solution = nbformat.read(str(ROOT / "solutions" / A / f"{A}.ipynb"), as_version=4)
    # a classmate's files where the previous layout kept them
    mate = out / "scratch" / A / "classmate_perfect" / "judge"
    mate.mkdir(parents=True)
    good = adversarial.perfect(student, solution)
    (mate / "job.json").write_text(json.dumps({"answer_cells": adversarial.answer_cells(good)}))
    autograded = out / "course" / "autograded" / "classmate_perfect" / A
    autograded.mkdir(parents=True)
    nbformat.write(good, str(autograded / f"{A}.ipynb"))
    secrets = [ref, out / "course", mate, ROOT / "solutions", ROOT / "lora_ref"]
    paths = adversarial.write_attacks(out / "inbox", A, student, solution, _ctx(world, secrets))
    def one(name):
        answers = adversarial.answer_cells(nbformat.read(str(paths[name]), as_version=4))
        log, deaths = judge.run_judge(answers, a.exercise_ids, ref, out / "scratch" / A / name / "judge",
                                      limits=Limits(memory_mb=3072), cell_timeout=60, judge_timeout=300,
                                      hidden=[str(out)])
        verdicts = judge.verdicts(a.exercise_ids, log, ref)
        return name, dict(passed=sum(o.passed for o in verdicts.values()), log=log, deaths=deaths, verdicts=verdicts)

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:       # two at a time, as --jobs 2 grades
        results = dict(pool.map(one, list(paths)))
    return A, results


def test_judge_baselines(judged):
    A, r = judged
    n = len(r["perfect"]["verdicts"])
    assert r["perfect"]["passed"] == n, {k: v.error for k, v in r["perfect"]["verdicts"].items() if not v.passed}
    assert r["wrong"]["passed"] == 0
    assert r["perfect"]["log"]["containment"] == "namespaces"


@pytest.mark.parametrize("cheat", adversarial.CHEATS)
def test_judge_cheats_score_no_more_than_wrong(judged, cheat):
    A, r = judged
    assert r[f"cheat{cheat}"]["passed"] <= r["wrong"]["passed"], (
        {k: v.passed for k, v in r[f"cheat{cheat}"]["verdicts"].items()}, r[f"cheat{cheat}"]["log"]["cells"])


def test_judge_probe_is_contained(judged, world):
    A, r = judged
    probe = r["probeprobe"]
    reports = [adversarial.probe_report(e) for e in probe["log"]["cells"].values()]
    reports = [x for x in reports if x]
    assert len(reports) == 1, probe["log"]["cells"]
    rep = reports[0]
    assert rep["where"] == "judge" and rep["pid"] == 1, rep
    assert rep["signalable_outside"] == 0 and rep["outside_proc_readable"] == 0, rep
    assert rep["sent"] == 0 and rep["readable_n"] == 0 and rep["secret_fds"] == 0, rep
    assert world["sentinel"].poll() is None, "a probe killed the sentinel"
    assert probe["passed"] == len(probe["verdicts"]), "the probe's answers are correct and still count"


def test_judge_leaves_no_survivor_and_sent_nothing(judged, world):
    assert survivors(world["marker"]) == []
    assert world["listener"].received == 0 and world["listener"].connections == 0


# -- one batch through the whole grader -------------------------------------------------------------------------

# the kernel's side of the attacks (the judge's side is tested above, for every attack): 5 notebook runs
BATCH = {"02_lora_linear": ["wrong", "cheatsteal", "probeprobe", "probehooks"],
         "05_nf4_quantisation": ["probeprobe"]}


@pytest.fixture(scope="module")
def batch(world, tmp_path_factory):
    from autograder import grade

    root = tmp_path_factory.mktemp("hostile_class")
    inbox, out = root / "inbox", root / "out"
    secrets = [out / "reference", out / "course" / "gradebook.db", out / "course" / "autograded",
               out / "results", ROOT / "solutions", out / "scratch" / "02_lora_linear" / "wrong02"]
    for A, students in BATCH.items():
        student = nbformat.read(str(ROOT / "notebooks" / A / f"{A}.ipynb"), as_version=4)
        solution = nbformat.read(str(ROOT / "solutions" / A / f"{A}.ipynb"), as_version=4)
        made = adversarial.write_attacks(root / "made" / A, A, student, solution, _ctx(world, secrets))
        inbox.mkdir(exist_ok=True)
        for s in students:
            shutil.copy(made[s], inbox / f"{s}{A[:2]}_{A}.ipynb")
    opts = grade.Options(submissions=inbox, out=out, jobs=2, timeout=120, submission_timeout=600, quiet=True)
    results = {(r["assignment"], r["student"]): r for r in grade.grade(opts)}
    time.sleep(1)
    return root, out, results


def _r(batch, A, s):
    return batch[2][(A, f"{s}{A[:2]}")]


def test_batch_one_result_per_submission(batch):
    assert len(batch[2]) == sum(len(v) for v in BATCH.values())
    assert all(r["status"] == "graded" for r in batch[2].values()), {k: r["notes"] for k, r in batch[2].items()}


def test_batch_cheats_score_no_more_than_wrong(batch):
    for A, students in BATCH.items():
        if "wrong" not in students:
            continue
        wrong = _r(batch, A, "wrong")["score"]
        for s in students:
            if s.startswith("cheat"):
                r = _r(batch, A, s)
                assert r["score"] <= wrong, (A, s, r["score"], r["cells"], r["judge"])


def test_batch_kernel_probes_contained(batch, world):
    root, out, _ = batch
    for A in ("02_lora_linear", "05_nf4_quantisation"):
        nb = out / "course" / "autograded" / f"probeprobe{A[:2]}" / A / f"{A}.ipynb"
        text = nb.read_text()
        rep = adversarial.probe_report(text.replace('\\"', '"'))
        assert rep is not None and rep["where"] == "kernel", text[-2000:]
        assert rep["signalable_outside"] == 0 and rep["outside_proc_readable"] == 0, rep
        assert rep["sent"] == 0 and rep["readable_n"] == 0 and rep["secret_fds"] == 0, rep
    assert world["sentinel"].poll() is None, "the grader or a probe killed a process the grader did not start"
    assert survivors(world["marker"]) == [], "a probe's child outlived the batch"
    assert world["listener"].received == 0


def test_batch_hidden_tests_do_not_reach_feedback(batch):
    r = _r(batch, "02_lora_linear", "probehooks")
    html = Path(r["feedback"]).read_text() if r["feedback"] else ""
    assert "check(" not in html and "BEGIN HIDDEN" not in html, html[:2000]
    assert r["hidden_leaks"] and r["audit"]["flag"] == "integrity", "the leak must be detected and flagged"
    assert r["score"] == r["max_score"], "the probe's answers are right; withholding feedback costs no points"


def test_judge_of_06_holds_no_reference(tmp_path):
    """Notebook 06's base layer is lora_ref's Linear4bit, whose module also holds 06's references
    (QLoRALinear, Dequantize4bitLinear): the judge used to load it beside learner code, and ``steal`` found
    them there. It now builds the case's base from the grader's tensors (nb06.GivenLinear4bit)."""
    from autograder import judge
    from autograder.contracts import Limits
    from autograder.course import load_assignment

    A = "06_qlora_on_a_gpu"
    a = load_assignment(ROOT / "solutions", A)
    ref = tmp_path / "reference" / f"{A}.safetensors"
    assert judge.reference_outputs(a.exercise_ids, ref, secret=int.from_bytes(os.urandom(7), "little")) == {}
    nb = nbformat.read(str(ROOT / "notebooks" / A / f"{A}.ipynb"), as_version=4)
    adversarial.steal(nb, A)
    log, _ = judge.run_judge(adversarial.answer_cells(nb), a.exercise_ids, ref, tmp_path / "scratch" / "judge",
                             limits=Limits(memory_mb=3072), cell_timeout=60, judge_timeout=300, hidden=[str(tmp_path)])
    verdicts = judge.verdicts(a.exercise_ids, log, ref)
    assert log["containment"] == "namespaces"
    assert "06.qlora_linear" in verdicts
    assert not any(v.passed for v in verdicts.values()), {k: v.passed for k, v in verdicts.items()}
