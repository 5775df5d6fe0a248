"""Unit tests of the autograder's parts (no notebook is executed here, except by the judge)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from autograder import audit, intake, judge, reports
from autograder.course import check_calls, load_assignment
from autograder.preprocessors import SanitizeTestErrors
from autograder.selftest import ASSIGNMENT, build_course

EXTRA = "autograder.selftest_exercises"
PY = sys.executable


@pytest.fixture(autouse=True)
def selftest_exercises(monkeypatch):
    """Register the self-test exercises for this test (and its subprocesses) only."""
    import lora_ref.exercises as exercises
    from autograder.course import register_extra_exercises
    monkeypatch.setenv("AUTOGRADER_EXTRA_EXERCISES", EXTRA)
    register_extra_exercises()
    yield
    for key in [k for k in exercises.REGISTRY if k.startswith("99.")]:
        del exercises.REGISTRY[key]
    sys.modules.pop(EXTRA, None)


# -- course parsing ------------------------------------------------------------------------------------------

def test_check_calls_finds_ids_in_order_without_repeats():
    src = 'x = 1\ncheck("02.a", A)\nlora_ref.exercises.check(exercise_id="02.b", obj=B)\ncheck("02.a", A)\ncheck(name, A)'
    assert check_calls(src) == ["02.a", "02.b"]


def test_check_calls_falls_back_to_regex_for_magics():
    assert check_calls('%time check("05.nf4", nf4)\n!ls') == ["05.nf4"]


def test_selftest_assignment_maps_test_cells_to_exercises(tmp_path):
    build_course(tmp_path)
    a = load_assignment(tmp_path / "solutions", ASSIGNMENT)
    assert a.exercises_of == {"test_lora_delta": ["99.lora_delta"], "test_scaled_linear": ["99.scaled_linear"]}
    assert [c.grade_id for c in a.answer_cells] == ["lora_delta", "scaled_linear"]
    assert a.max_score == 6.0


# -- static audit ----------------------------------------------------------------------------------------------

def test_audit_flags_patching_and_reference_imports():
    src = textwrap.dedent("""
        import torch, builtins
        import numpy as np
        torch.allclose = lambda *a, **k: True
        setattr(np.testing, "assert_allclose", None)
        builtins.print = None
        import sys; sys.modules["lora_ref"] = None
        from lora_ref.lora import LoRALinear
        def check(*a): pass
        torch.Tensor.__eq__ = lambda a, b: True
    """)
    found = audit.scan([("cell", src)])
    whats = " | ".join(f.what for f in found if f.severity == "high")
    for needle in ("torch.allclose", "setattr on np.testing", "builtins.print", "sys.modules", "imports lora_ref.lora",
                   "function named check", "torch.Tensor.__eq__"):
        assert needle in whats, (needle, whats)


def test_audit_does_not_flag_ordinary_module_code():
    src = textwrap.dedent("""
        class LoRALinear(nn.Module):
            def __init__(self, base, r):
                super().__init__()
                self.base_layer = base
                setattr(self, "r", r)
                self.lora_A = nn.Parameter(torch.zeros(r, 3))
            def forward(self, x):
                return F.linear(x, self.lora_A) * math.sqrt(2)
        LoRALinear.extra = 1
    """)
    assert audit.scan([("cell", src)]) == []


# -- intake ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assignment(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    build_course(root)
    a = load_assignment(root / "solutions", ASSIGNMENT)
    # the released copy: nbgrader's generate_assignment, as the grader runs it
    from autograder.grade import Options, prepare_assignment
    a = prepare_assignment(ASSIGNMENT, Options(source=root / "solutions", out=root / "out"), root / "out" / "course")
    return a


def _release(a):
    return nbformat.read(str(a.path.parents[2] / "out" / "course" / "release" / a.name / f"{a.name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name,student,assignment_name", [
    ("alice_99_selftest.ipynb", "alice", "99_selftest"),
    ("99_selftest-Bob (1).ipynb", "bob_1", "99_selftest"),
    ("smithjane_LATE_4821_99011_homework.ipynb", "smithjane", None),
    ("Untitled3.ipynb", "untitled3", None),
])
def test_name_parsing(name, student, assignment_name):
    assert intake._name_parts(Path("/x") / name, ["99_selftest", "02_lora_linear"])[:2] == (student, assignment_name)


def test_moodle_folder_names_the_student():
    p = Path("/x/Grace Hopper_5512_assignsubmission_file_/99_selftest.ipynb")
    assert intake._name_parts(p, ["99_selftest"])[:2] == ("grace_hopper_5512", "99_selftest")


def test_intake_rejects_bad_files_and_repairs_others(tmp_path, assignment):
    rel = _release(assignment)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken_99_selftest.ipynb").write_text(nbformat.writes(rel)[:200])
    (folder / "scan_99_selftest.pdf").write_bytes(b"%PDF")
    nbformat.write(nbformat.convert(_release(assignment), 3), str(folder / "old_99_selftest.ipynb"))
    bare = nbformat.from_dict(json.loads(nbformat.writes(rel)))
    for c in bare.cells:
        c.metadata.pop("nbgrader", None)
    nbformat.write(bare, str(folder / "weird name.ipynb"))
    dup = nbformat.from_dict(json.loads(nbformat.writes(rel)))
    answer = next(c for c in dup.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "lora_delta")
    twin = nbformat.from_dict(json.loads(json.dumps(answer)))
    twin.id = "twin"
    dup.cells.insert(dup.cells.index(answer), twin)
    nbformat.write(dup, str(folder / "dup_99_selftest.ipynb"))
    subs = {s.student: s for s in intake.collect(folder, {assignment.name: assignment}, None, tmp_path)}
    assert subs["broken"].status == "rejected" and "invalid JSON" in subs["broken"].notes[0]
    assert subs["scan"].status == "rejected" and "not a notebook" in subs["scan"].notes[0]
    assert subs["old"].status == "ok" and any("nbformat 3" in n for n in subs["old"].notes)
    weird = subs["weird_name"]
    assert weird.status == "ok" and weird.assignment == "99_selftest", weird.notes
    restored = [c.metadata["nbgrader"]["grade_id"] for c in weird.notebook.cells if c.metadata.get("nbgrader")]
    assert set(restored) >= {"lora_delta", "test_lora_delta", "scaled_linear", "test_scaled_linear"}
    assert any("metadata was deleted" in n for n in weird.notes)
    d = subs["dup"]
    graded = [c for c in d.notebook.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "lora_delta"]
    assert len(graded) == 1 and any("appears 2 times" in n for n in d.notes)
    nbformat.validate(d.notebook)


def test_zip_slip_is_refused(tmp_path):
    import zipfile
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../escape.ipynb", "{}")
    dest, refused = intake._safe_extract(z, tmp_path / "dest")
    assert refused == ["../../escape.ipynb"] and not (tmp_path.parent / "escape.ipynb").exists()


# -- feedback sanitising -------------------------------------------------------------------------------------------

def test_sanitize_cuts_test_cell_tracebacks_only():
    nb = nbformat.v4.new_notebook()
    test = nbformat.v4.new_code_cell("check('x', f)")
    test.metadata["nbgrader"] = {"grade": True, "solution": False, "grade_id": "t", "points": 1}
    test.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="[99.x] case 0 differs",
                                           traceback=["  File lora_ref/secret.py", "    check('99.x', f)", "AssertionError"])]
    other = nbformat.v4.new_code_cell("1/0")
    other.outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                            traceback=["line 1", "ZeroDivisionError"])]
    nb.cells = [test, other]
    nb, _ = SanitizeTestErrors().preprocess(nb, {})
    assert nb.cells[0].outputs[0].traceback == ["AssertionError: [99.x] case 0 differs"]
    assert nb.cells[1].outputs[0].traceback == ["line 1", "ZeroDivisionError"]


# -- reports ---------------------------------------------------------------------------------------------------------

def test_summary_counts_failures_and_most_common_error():
    results = [dict(student=s, assignment="A", status="graded", score=sc, max_score=2.0,
                    cells={"t": dict(score=sc, max=2.0, error=err)}, judge={}, audit={"flag": "ok"})
               for s, sc, err in [("a", 2.0, ""), ("b", 0.0, "AssertionError: shape"), ("c", 0.0, "AssertionError: shape"),
                                  ("d", 0.0, "NameError: x")]]
    rows = reports.summarize(results)
    assert rows[0]["mean"] == 0.5 and rows[0]["failure_rate"] == 0.75
    assert rows[0]["most_common_error"] == "AssertionError: shape (2x)"


# -- sandbox -----------------------------------------------------------------------------------------------------------

def _sandboxed(tmp_path, code: str, memory_mb: int = 2048, hidden=(), expose=(), links=None) -> subprocess.CompletedProcess:
    """Run ``code`` after sandbox.enter, in the namespaces sandbox.command gives (as the kernel and judge run)."""
    from autograder import sandbox
    box = tmp_path / "box"
    box.mkdir()
    plan = sandbox.Plan(writable=[str(box)], hidden=[str(p) for p in hidden], expose=[str(p) for p in expose],
                        cwd=str(box), links=dict(links or {}))
    prog = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from autograder import sandbox
        from autograder.contracts import Limits
        plan = sandbox.Plan.from_env({plan.to_env()!r})
        report, auditor = sandbox.enter(plan, Limits(memory_mb={memory_mb}), Path({str(box / "audit.jsonl")!r}))
        auditor.active = True
        auditor.install()
        print(json.dumps(dict(report.__dict__, isolation=report.isolation)))
    """) + textwrap.dedent(code)
    return subprocess.run(sandbox.command(["-c", prog]), capture_output=True, text=True, timeout=120, cwd=box,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))


def test_sandbox_blocks_writes_outside_and_records_them(tmp_path):
    outside = tmp_path / "outside.txt"
    proc = _sandboxed(tmp_path, f"""
        open("inside.txt", "w").write("ok")
        try:
            open({str(outside)!r}, "w").write("escaped")
            print("ESCAPED")
        except OSError as e:
            print("blocked", type(e).__name__)
    """)
    assert "blocked" in proc.stdout and "ESCAPED" not in proc.stdout, proc.stdout + proc.stderr
    assert not outside.exists() and (tmp_path / "box" / "inside.txt").exists()
    log = (tmp_path / "box" / "audit.jsonl").read_text()
    assert "write_outside" in log and "outside.txt" in log


def test_sandbox_hides_folders_and_exposes_only_what_is_asked(tmp_path):
    out = tmp_path / "out"
    (out / "scratch" / "mine").mkdir(parents=True)
    (out / "scratch" / "other").mkdir(parents=True)
    (out / "gradebook.db").write_text("secret")
    (out / "scratch" / "other" / "job.json").write_text("{}")
    (out / "scratch" / "mine" / "cache.txt").write_text("cache")
    proc = _sandboxed(tmp_path, f"""
        import os
        print("OUT", sorted(os.listdir({str(out)!r})), sorted(os.listdir({str(out / "scratch")!r})))
        print("CACHE", open({str(out / "scratch" / "mine" / "cache.txt")!r}).read())
        for p in [{str(out / "gradebook.db")!r}, {str(out / "scratch" / "other" / "job.json")!r}]:
            print("SEEN" if os.path.exists(p) else "UNSEEN", p)
        try:
            open({str(out / "scratch" / "mine" / "x")!r}, "w")
            print("WROTE")
        except OSError:
            print("READONLY")
    """, hidden=[out], expose=[out / "scratch" / "mine"])
    assert "OUT ['scratch'] ['mine']" in proc.stdout, proc.stdout + proc.stderr
    assert "CACHE cache" in proc.stdout and "SEEN" not in proc.stdout.replace("UNSEEN", "")
    assert "READONLY" in proc.stdout, "an exposed folder that is not writable must be read-only"
    assert (out / "gradebook.db").read_text() == "secret"


def test_sandbox_nests_covers_and_exposures_and_hides_private_roots(tmp_path):
    """The course may live in /home and the grading folder in /tmp: a folder hidden inside an exposed one
    is covered again, one exposed inside a cover is bound back, /tmp and the grader's home are empty but
    for that, the Python installation still imports, and a planned link is made inside the /tmp cover."""
    import secrets as _secrets
    from autograder import sandbox
    course = tmp_path / "course"
    (course / "grading" / "scratch" / "mine").mkdir(parents=True)
    (course / "grading" / "gradebook.db").write_text("secret")
    (course / "grading" / "scratch" / "mine" / "ok.txt").write_text("mine")
    (course / "notes.txt").write_text("course")
    token = _secrets.token_hex(6)
    private = [Path("/tmp") / f"autograder-test-{token}", Path.home() / f".autograder-test-{token}"]
    link = Path("/tmp") / f"autograder-link-{token}"
    for path in private:
        path.write_text("private")
    try:
        proc = _sandboxed(tmp_path, f"""
            import os, numpy
            print("PRIVATE", [os.path.exists(p) for p in {[str(p) for p in private]!r}])
            print("COURSE", open({str(course / "notes.txt")!r}).read())
            print("GRADING", os.listdir({str(course / "grading")!r}))
            print("MINE", open({str(course / "grading" / "scratch" / "mine" / "ok.txt")!r}).read())
            print("LINK", open({str(link / "ok.txt")!r}).read())
            print("TMP", os.listdir("/tmp"))
        """, hidden=[*sandbox.PRIVATE_ROOTS, course / "grading"],
            expose=[*sandbox.python_paths(), Path(__file__).resolve().parents[1], course, course / "grading" / "scratch" / "mine"],
            links={str(link): str(course / "grading" / "scratch" / "mine")})
    finally:
        for path in private:
            path.unlink()
    out = proc.stdout
    assert '"isolation": "namespaces"' in out, out + proc.stderr
    assert "PRIVATE [False, False]" in out, out + proc.stderr
    for needle in ("COURSE course", "GRADING ['scratch']", "MINE mine", "LINK mine"):
        assert needle in out, (needle, out, proc.stderr)
    tmp_seen = eval(out.split("TMP ")[1].splitlines()[0])
    assert f"autograder-test-{token}" not in tmp_seen and f"autograder-link-{token}" in tmp_seen
    assert not link.exists(), "the link was made in the sandbox's cover, not on the host"


def test_sandbox_namespaces_are_locked_and_isolated(tmp_path):
    """Root inside the user namespace cannot undo the sandbox: covers cannot be unmounted, read-only mounts
    cannot be made writable again; the process is pid 1 of its own PID namespace; the network is down."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "secret").write_text("42")
    proc = _sandboxed(tmp_path, f"""
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        print("UMOUNT", libc.umount2({str(out).encode()!r}, 2))
        print("REMOUNT", libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None))
        print("MOUNT_RW", libc.mount(None, {str(tmp_path).encode()!r}, None, ctypes.c_ulong(32 | 4096), None))
        print("SECRET", os.path.exists({str(out / "secret")!r}))
        try:
            open({str(tmp_path / "evil")!r}, "w")
            print("WROTE")
        except OSError:
            print("READONLY")
        print("PID", os.getpid(), "PROCS", len([d for d in os.listdir("/proc") if d.isdigit()]))
        status = open("/proc/self/status").read()
        print("NNP", [l.split()[1] for l in status.splitlines() if l.startswith("NoNewPrivs")][0])
        print("NPROC", [l.split()[2] for l in open("/proc/self/limits") if l.startswith("Max processes")][0])
        try:
            socket.create_connection(("127.0.0.1", 22), timeout=2)
            print("NET open")
        except OSError as e:
            print("NET", e.errno)
    """, hidden=[out])
    lines = proc.stdout
    assert '"isolation": "namespaces"' in lines, lines + proc.stderr
    for needle in ("UMOUNT -1", "REMOUNT -1", "MOUNT_RW -1", "SECRET False", "READONLY", "PID 1 PROCS 1", "NET 101", "NNP 1", "NPROC 4096"):
        assert needle in lines, (needle, lines, proc.stderr)
    assert not (tmp_path / "evil").exists()


def test_sandbox_memory_limit_turns_a_bomb_into_memory_error(tmp_path):
    proc = _sandboxed(tmp_path, """
        hoard = []
        try:
            for _ in range(64):
                hoard.append(bytearray(512 * 1024 * 1024))
        except MemoryError:
            print("MemoryError after", len(hoard))
    """, memory_mb=2048)
    assert "MemoryError after" in proc.stdout, proc.stdout + proc.stderr
    assert int(proc.stdout.split("MemoryError after")[1].split()[0]) < 4


def test_worker_reads_sandbox_files_without_following_symlinks(tmp_path):
    """A learner may replace the files of its sandbox folder with symlinks to the grader's files: the
    worker reads them as nothing (the evidence is lost, nothing leaks into the result)."""
    from autograder import layout, sandbox
    secret = tmp_path / "gradebook.db"
    secret.write_text('{"kind": "leak", "detail": "secret"}\n')
    box = tmp_path / "box"
    box.mkdir()
    (box / "audit.jsonl").symlink_to(secret)
    (box / "progress.json").symlink_to(secret)
    assert sandbox.read_audit_log(box) == []
    assert layout.read_small(box / "progress.json") == ""
    (box / "audit.jsonl").unlink()
    (box / "audit.jsonl").write_text('{"kind": "write_outside", "detail": "x"}\nnot json\n')
    assert [r["kind"] for r in sandbox.read_audit_log(box)] == ["write_outside", "garbled"]


def test_harness_frames_round_trip_and_refuse_oversized(tmp_path):
    import io
    from autograder.harness import read_frame, write_frame
    r, w = os.pipe()
    write_frame(w, "T", {"case": ["02.x", 3]}, b"abc")
    write_frame(w, "J", {"stage": "done"})
    os.close(w)
    f = os.fdopen(r, "rb")
    assert read_frame(f) == ("T", {"case": ["02.x", 3]}, b"abc")
    assert read_frame(f) == ("J", {"stage": "done"}, b"")
    assert read_frame(f) is None
    big = io.BytesIO(b"T" + (10).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="too large"):
        read_frame(big, max_blob=1 << 20)


def test_sandbox_refuses_to_run_unisolated_unless_asked(tmp_path):
    from autograder import sandbox
    plan = sandbox.Plan(writable=[str(tmp_path)], cwd=str(tmp_path))
    prog = ("from pathlib import Path; from autograder import sandbox; from autograder.contracts import Limits\n"
            f"r, a = sandbox.enter(sandbox.Plan.from_env({plan.to_env()!r}), Limits(), Path({str(tmp_path / 'a.jsonl')!r}))\n"
            "print('ISOLATION', r.isolation)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    plain = subprocess.run([PY, "-c", prog], capture_output=True, text=True, timeout=60, env=env)
    assert plain.returncode != 0 and "not started in a PID namespace" in plain.stderr
    asked = subprocess.run([PY, "-c", prog], capture_output=True, text=True, timeout=60,
                           env=dict(env, AUTOGRADER_ISOLATION="none"))
    assert "ISOLATION none: learner code ran WITHOUT namespaces" in asked.stdout, asked.stdout + asked.stderr


# -- judge -------------------------------------------------------------------------------------------------------------

GOOD = {"lora_delta": "def lora_delta(A, B, alpha, r):\n    return (alpha / r) * (B @ A)",
        "scaled_linear": textwrap.dedent("""
            class ScaledLinear(nn.Module):
                def __init__(self, weight, scale):
                    super().__init__()
                    self.weight = nn.Parameter(weight.clone())
                    self.scale = scale
                def forward(self, x):
                    return self.scale * (x @ self.weight.T)""")}


def _judge(tmp_path, cells: dict[str, str]) -> tuple[dict, dict]:
    from autograder.contracts import Limits
    exercises = ["99.lora_delta", "99.scaled_linear"]
    ref = tmp_path / "ref.safetensors"
    assert judge.reference_outputs(exercises, ref, secret=7) == {}
    answers = [{"grade_id": g, "source": s} for g, s in cells.items()]
    log, deaths = judge.run_judge(answers, exercises, ref, tmp_path / "judge", limits=Limits(memory_mb=3072, cpu_seconds=120),
                                  cell_timeout=10, judge_timeout=120, hidden=[str(tmp_path)])
    out = judge.verdicts(exercises, log, ref)
    return {k: v.passed for k, v in out.items()}, dict(log=log, deaths=deaths, outcomes=out)


def test_judge_passes_correct_answers(tmp_path):
    verdict, _ = _judge(tmp_path, GOOD)
    assert verdict == {"99.lora_delta": True, "99.scaled_linear": True}


def test_the_judge_sees_packages_installed_on_pythonpath(tmp_path, monkeypatch):
    """Where packages are installed with ``pip --target`` and found through PYTHONPATH (a machine whose
    interpreter cannot be changed), the judge's harness imports them too, even from a folder the sandbox
    covers (/tmp). Without it the harness lacked IPython there and died at every answer cell."""
    site_dir = tmp_path.parent / f"{tmp_path.name}_site"
    site_dir.mkdir()
    (site_dir / "targeted_helper.py").write_text("def half(x):\n    return x / 2\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH")) if p))
    cells = dict(GOOD, lora_delta="from targeted_helper import half\n"
                                  "def lora_delta(A, B, alpha, r):\n    return half(2 * alpha / r) * (B @ A)")
    verdict, info = _judge(tmp_path, cells)
    assert info["log"]["cells"]["lora_delta"] in ("", "ok"), info["log"]["cells"]
    assert verdict == {"99.lora_delta": True, "99.scaled_linear": True}, info["log"]


def test_feedback_pages_find_the_templates_of_a_pythonpath_install(tmp_path):
    """``pip install --target DIR`` puts nbconvert's HTML templates in DIR/share/jupyter, where Jupyter
    does not look: on such a machine (an H200 with the grading packages carried as wheels) every feedback
    page failed, and silently. The worker's environment names that folder; a template found only there
    renders."""
    import nbformat
    from autograder import worker
    from autograder.contracts import Job

    site_dir = tmp_path / "site"
    tpl = site_dir / "share" / "jupyter" / "nbconvert" / "templates" / "only_on_pythonpath"
    tpl.mkdir(parents=True)
    (tpl / "conf.json").write_text('{"mimetypes": {"text/html": true}}')
    (tpl / "index.html.j2").write_text("rendered from the PYTHONPATH install")
    job = Job(student="s", assignment="a", original="", course_root=str(tmp_path / "course"), source_dir=str(tmp_path),
              db_url="", out=str(tmp_path / "out"), scratch=str(tmp_path / "scratch"), result_path="", reference="",
              exercises=[], exercises_of={}, test_points={}, max_score=0, hidden_lines=[],
              jupyter_path=str(tmp_path / "course"))
    saved = dict(os.environ)
    try:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir), saved.get("PYTHONPATH")) if p)
        worker._env(job)
        assert os.environ["JUPYTER_PATH"].split(os.pathsep)[0] == job.jupyter_path     # the kernelspec first
        from nbconvert import HTMLExporter
        body, _ = HTMLExporter(template_name="only_on_pythonpath").from_notebook_node(nbformat.v4.new_notebook())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "rendered from the PYTHONPATH install" in body


def test_a_feedback_page_that_is_not_written_is_said(tmp_path):
    """nbgrader's GenerateFeedback reports failure in its return value, not by raising; a run whose
    pages all failed said nothing. Now the result carries the reason."""
    from autograder import worker
    from autograder.contracts import Job, Result

    course = tmp_path / "course"
    course.mkdir()
    job = Job(student="s", assignment="a", original="", course_root=str(course), source_dir=str(tmp_path / "source"),
              db_url=f"sqlite:///{course / 'gradebook.db'}", out=str(tmp_path / "out"), scratch=str(tmp_path / "scratch"),
              result_path="", reference="", exercises=[], exercises_of={}, test_points={}, max_score=0, hidden_lines=[])
    result = Result(student="s", assignment="a", original="", max_score=0)
    worker.stage_feedback(job, result, worker._config(job))     # nothing was autograded: no page can be written
    assert result.feedback == ""
    assert any(n.startswith("feedback HTML failed: ") and len(n) > len("feedback HTML failed: ") for n in result.notes), result.notes


def test_judge_is_not_fooled_by_patching(tmp_path):
    cheat = dict(GOOD)
    cheat["lora_delta"] = textwrap.dedent("""
        import torch, numpy, builtins
        torch.allclose = lambda *a, **k: True
        torch.Tensor.__eq__ = lambda a, b: True
        numpy.testing.assert_allclose = lambda *a, **k: None
        builtins.isinstance = lambda *a: True
        def lora_delta(A, B, alpha, r):
            return B @ A          # forgot the scaling
    """)
    verdict, info = _judge(tmp_path, cheat)
    assert verdict["99.lora_delta"] is False
    assert "differs from the reference" in info["outcomes"]["99.lora_delta"].error
    patched = " ".join(info["log"]["patched"])
    assert "torch.allclose" in patched and "builtins.isinstance" in patched and "torch.Tensor.__eq__" in patched


def test_judge_blocks_the_reference_and_survives_a_crash(tmp_path):
    cells = {"lora_delta": "from autograder.selftest_exercises import reference_lora_delta as lora_delta",
             "scaled_linear": GOOD["scaled_linear"] + "\nimport os\nos._exit(3)"}
    verdict, info = _judge(tmp_path, cells)
    assert verdict == {"99.lora_delta": False, "99.scaled_linear": False}
    # the reference is not in the harness at all (names bound to references are deleted, lora_ref is sealed)
    assert info["log"]["cells"]["lora_delta"].startswith("ImportError")
    assert info["deaths"] and "scaled_linear" in info["deaths"][0]
    assert "skipped" in info["log"]["cells"]["scaled_linear"]


def test_judge_ignores_a_forked_twin_of_the_harness(tmp_path):
    """A child forked by learner code past the audit hook (ctypes' fork) whose exec is refused goes on as a
    copy of the harness; its frames must not reach the worker (they raced ours: flaky verdicts)."""
    cells = dict(GOOD)
    cells["scaled_linear"] = GOOD["scaled_linear"] + textwrap.dedent("""
        import ctypes, os, sys
        if ctypes.CDLL(None).fork() == 0:
            try:
                os.execv(sys.executable, [sys.executable, "-c", "pass"])
            except BaseException:
                pass          # refused: this child now runs the harness's loop too
    """)
    for _ in range(3):
        verdict, info = _judge(tmp_path, cells)
        assert verdict == {"99.lora_delta": True, "99.scaled_linear": True}, info["log"]["cells"]
        assert not info["deaths"], info["deaths"]


def test_judge_times_out_an_infinite_loop(tmp_path):
    cells = dict(GOOD)
    cells["scaled_linear"] = GOOD["scaled_linear"] + "\nwhile True:\n    try:\n        pass\n    except Exception:\n        pass"
    verdict, info = _judge(tmp_path, cells)
    assert verdict == {"99.lora_delta": True, "99.scaled_linear": True}   # the class was defined before the loop
    assert info["log"]["cells"]["scaled_linear"].startswith("CellTimeout")


def test_kernel_caps_rich_outputs_of_a_cell():
    """display() in a loop and a huge cell result stop at the cap; one line says so; the next cell starts afresh."""
    from autograder.kernel import CappedDisplay

    class Sink:
        def __init__(self):
            self.sent = []

        def publish(self, data, metadata=None, **kw):
            self.sent.append(data)

        def write_format_data(self, format_dict, md_dict=None):
            self.sent.append(format_dict)

    sink = Sink()
    shell = type("Shell", (), {"display_pub": sink, "displayhook": sink})()
    capped = CappedDisplay(shell, cap=1000)
    for _ in range(50):
        shell.display_pub.publish({"text/html": "y" * 300})
    shell.displayhook.write_format_data({"text/plain": "z" * 5000})
    assert [len(d.get("text/html", "")) for d in sink.sent[:3]] == [300, 300, 300]
    notes = [d for d in sink.sent if "dropped after 1000 characters" in d.get("text/plain", "")]
    assert len(sink.sent) == 5 and len(notes) == 1, sink.sent        # 3 outputs, the note, an empty result
    capped.reset()
    shell.display_pub.publish({"text/html": "fresh"})
    assert sink.sent[-1] == {"text/html": "fresh"}


SYSTEM_PY = shutil.which("python3", path="/usr/bin:/bin") or ""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root (CI runs as root)")
@pytest.mark.skipif(not SYSTEM_PY, reason="no system python3 in /usr/bin")
def test_sandbox_holds_for_an_unprivileged_grader():
    """An instructor grades as an ordinary user, not as root: the same unshare then runs unprivileged.
    As uid 65534: full isolation, the private roots and the hidden folder empty, writes outside refused,
    and RLIMIT_NPROC binds (it does not for uid 0): a fork loop stops at the limit."""
    import tempfile
    from autograder import sandbox
    root = Path(tempfile.mkdtemp(prefix="autograder-unpriv-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        box, hidden = root / "box", root / "hidden"
        box.mkdir()
        hidden.mkdir()
        (hidden / "secret").write_text("42")
        os.chown(box, 65534, 65534)
        plan = sandbox.Plan(writable=[str(box)], hidden=[str(hidden), *sandbox.PRIVATE_ROOTS],
                            expose=[*sandbox.python_paths(), str(Path(__file__).resolve().parents[1])], cwd=str(box))
        prog = textwrap.dedent(f"""
            import json, os, time
            from pathlib import Path
            from autograder import sandbox
            from autograder.contracts import Limits
            report, auditor = sandbox.enter(sandbox.Plan.from_env({plan.to_env()!r}), Limits(nproc=40),
                                            Path({str(box / "audit.jsonl")!r}))
            print("ISOLATION", report.isolation)
            print("SECRET", os.path.exists({str(hidden / "secret")!r}))
            try:
                open({str(root / "evil")!r}, "w")
                print("WROTE")
            except OSError:
                print("READONLY")
            open("mine.txt", "w").write("ok")
            kids = []
            try:
                for _ in range(200):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(30)
                        os._exit(0)
                    kids.append(pid)
                print("FORKS", len(kids))
            except OSError as e:
                print("FORK_STOPPED", len(kids), type(e).__name__)
            for pid in kids:
                os.kill(pid, 9)
        """)
        argv = sandbox.command(["-c", prog])
        # the system Python: this one may live where uid 65534 cannot enter (CI's is under /root, mode 700);
        # the sandbox and its contracts need the standard library only
        argv[argv.index(sys.executable)] = SYSTEM_PY
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                              capture_output=True, text=True, timeout=120, cwd=box,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HOME=str(box)))
        out = proc.stdout
        assert "ISOLATION namespaces" in out, out + proc.stderr
        for needle in ("SECRET False", "READONLY", "FORK_STOPPED"):
            assert needle in out, (needle, out, proc.stderr)
        assert int(out.split("FORK_STOPPED ")[1].split()[0]) < 40
        assert (box / "mine.txt").read_text() == "ok" and not (root / "evil").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_worker_imports_only_the_notebook_it_grades(tmp_path):
    """Looking one exercise up imports its notebook's module only, and the harness's allowed modules (which
    need every notebook's exercises) come saved in the run's reference file: a worker grading 02 does not
    import the exercises of the ten other notebooks (seconds per submission)."""
    prog = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from autograder import judge
        import lora_ref.exercises as exercises
        exercises.get("02.lora_forward")
        loaded = sorted(m for m in sys.modules if m.startswith("lora_ref.exercises.nb"))
        allowed = judge._allowed_modules(Path({str(tmp_path / "ref.safetensors")!r}))
        print(json.dumps({{"loaded": loaded, "allowed": allowed,
                          "after": sorted(m for m in sys.modules if m.startswith("lora_ref.exercises.nb"))}}))
    """)
    assert judge.reference_outputs(["02.lora_forward"], tmp_path / "ref.safetensors") == {}
    proc = subprocess.run([PY, "-c", prog], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == ["lora_ref.exercises.nb02"] == got["after"], got
    assert got["allowed"] == judge.harmless_modules()


def test_grading_processes_skip_the_slow_optional_import(tmp_path):
    """A grading process (``import autograder`` first) reads and validates notebooks without importing
    rfc3987_syntax (3.5-4 s per process at import); a broken notebook is still refused."""
    code = textwrap.dedent(f"""
        import sys, time
        import autograder
        t = time.perf_counter()
        import nbformat
        seconds = time.perf_counter() - t
        assert sys.modules.get("rfc3987_syntax", "absent") is None, "rfc3987_syntax was imported"
        nb = nbformat.read({str(Path(__file__).resolve().parents[1] / "notebooks/02_lora_linear/02_lora_linear.ipynb")!r}, as_version=4)
        nbformat.validate(nb)
        nb.cells[0]["cell_type"] = "not-a-cell-type"
        try:
            nbformat.validate(nb)
        except nbformat.ValidationError:
            print("refused", round(seconds, 2))
        else:
            raise SystemExit("a broken notebook passed validation")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused"), proc.stdout


def test_nbgrader_run_records_the_alembic_head_nbgrader_would(tmp_path):
    """``python -m autograder.nbgrader_run`` is nbgrader with a faster start: the gradebook it creates
    records the migration head that nbgrader's own ``alembic heads`` subprocess reports."""
    import sqlite3

    import nbgrader.api

    from autograder.nbgrader_run import alembic_head
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    old = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]                   # nbgrader starts `alembic` by name
    try:
        assert alembic_head() == nbgrader.api.get_alembic_version()
    finally:
        os.environ["PATH"] = old
    repo = Path(__file__).resolve().parents[1]
    db = tmp_path / "gradebook.db"
    proc = subprocess.run([sys.executable, "-m", "autograder.nbgrader_run", "generate_assignment", "00_welcome",
                           "--force", f"--CourseDirectory.root={tmp_path}",
                           f"--CourseDirectory.source_directory={repo / 'solutions'}",
                           "--CourseDirectory.release_directory=release", f"--CourseDirectory.db_url=sqlite:///{db}",
                           "--log-level=ERROR"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "release" / "00_welcome" / "00_welcome.ipynb").exists()
    assert sqlite3.connect(db).execute("select version_num from alembic_version").fetchall() == [(alembic_head(),)]


def test_an_audit_hook_counts_only_when_learner_code_adds_it(tmp_path):
    """A library that adds an audit hook as it is imported (filelock 4 does; torch's CUDA build imports
    it) is no integrity flag; learner code that adds one itself is."""
    proc = _sandboxed(tmp_path, """
        Path("libhook.py").write_text("import sys\\nsys.addaudithook(lambda *a: None)\\n")
        sys.path.insert(0, ".")
        exec(compile("import libhook", "<answer cell 1>", "exec"))
        exec(compile("import sys\\nsys.addaudithook(lambda *a: None)", "<answer cell 2>", "exec"))
        print("done")
    """)
    assert "done" in proc.stdout, proc.stdout + proc.stderr
    hooks = [json.loads(line) for line in (tmp_path / "box" / "audit.jsonl").read_text().splitlines()
             if '"audit_hook"' in line]
    assert len(hooks) == 1 and "<answer cell 2>" in hooks[0]["detail"], hooks
