"""Grade a class: intake, one gradebook, parallel sandboxed workers, reports.

Layout of the output folder (``--out``, default ``grading/``)::

    course/                nbgrader course root: gradebook.db, release/, submitted/, autograded/, feedback/
    course/kernels/        the ``autograder-sandbox`` kernelspec (see autograder.kernel)
    intake/<A>/<student>/  every file as received, never modified
    reference/<A>.safetensors   reference outputs of the assignment's exercises
    scratch/<A>/<student>/ per-submission sandbox (kernel and judge logs)
    results/<A>/<student>.json  one result per submission (see autograder.worker)
    grades.csv, summary.csv, summary.md, histogram.png, audit.md

Regrading is idempotent (``--force`` everywhere, previous judge withdrawals cleared), and a run only
writes the results, scratch and nbgrader folders of the students it grades; grades.csv and the summary
are rebuilt from every result in ``results/``, so a later run with one student's new file updates that
row and leaves the others as they were.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from autograder import course as course_mod
from autograder import intake
from autograder.sandbox import Limits

ROOT = Path(__file__).resolve().parents[1]
COURSE_ID = "lora-course"


@dataclass
class Options:
    submissions: Path | None = None
    assignment: str | None = None
    jobs: int = 2
    timeout: int = 120                # per cell, seconds
    submission_timeout: int = 900     # per submission, wall seconds
    memory_mb: int = 4096
    out: Path = Path("grading")
    source: Path = ROOT / "solutions"
    student: str | None = None
    output_bytes: int = 1_000_000
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("jobs", "timeout", "submission_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def _kernelspec(course_root: Path) -> Path:
    folder = course_root / "kernels" / "autograder-sandbox"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "autograder.kernel", "-f", "{connection_file}"],
            "display_name": "Python 3 (autograder sandbox)", "language": "python",
            "metadata": {"debugger": False}}
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))
    return course_root


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def matplotlib_cache(course_root: Path) -> str:
    """Build matplotlib's font cache once; kernels read it (read-only) instead of rebuilding it each."""
    folder = course_root / "mplcache"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("fontlist*.json")):
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=dict(_env(), MPLCONFIGDIR=str(folder)),
                       capture_output=True, timeout=300)
    return str(folder)


def model_cache(assignments) -> str | None:
    """If a notebook loads SmolLM2, build lora_ref's model cache once, before grading: kernels read it
    through the read-only sandbox instead of each converting the GGUF file again (about 20 s)."""
    if not any("load_smollm2" in c.source or "load_tokenizer" in c.source for a in assignments for c in a.cells):
        return None
    code = "from lora_ref.models import smollm2_folder, cache_dir; smollm2_folder(); print(cache_dir().parent)"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=900)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None


def prepare_assignment(name: str, opts: Options, course_root: Path) -> course_mod.Assignment:
    """Load the instructor notebook; (re)generate the release and gradebook entries if it changed."""
    a = course_mod.load_assignment(opts.source, name)
    course_root.mkdir(parents=True, exist_ok=True)
    stamp = course_root / ".generated" / f"{name}.digest"
    release = course_root / "release" / name / f"{name}.ipynb"
    if not (stamp.exists() and stamp.read_text() == a.digest and release.exists()):
        cmd = [sys.executable, "-m", "nbgrader", "generate_assignment", name, "--force",
               f"--CourseDirectory.root={course_root}", f"--CourseDirectory.source_directory={opts.source.resolve()}",
               "--CourseDirectory.release_directory=release", f"--CourseDirectory.course_id={COURSE_ID}",
               f"--CourseDirectory.db_url=sqlite:///{course_root / 'gradebook.db'}", "--log-level=ERROR"]
        proc = subprocess.run(cmd, cwd=course_root, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0 or not release.exists():
            raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(a.digest)
    a.attach_release(release)
    return a


def hidden_lines(a: course_mod.Assignment) -> list[str]:
    """Distinctive lines of the hidden tests, to check feedback HTML for leaks."""
    lines = []
    for c in a.test_cells:
        inside = False
        for line in c.source.splitlines():
            if "BEGIN HIDDEN TESTS" in line:
                inside = True
            elif "END HIDDEN TESTS" in line:
                inside = False
            elif inside and len(line.strip()) >= 12 and not line.strip().startswith(("#", "from ", "import ")):
                lines.append(line.strip())
    return lines


def _result_path(out: Path, assignment: str, student: str) -> Path:
    return out / "results" / assignment / f"{student}.json"


def _previous_withdrawals(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text()).get("withdrawn", []))
    except (OSError, json.JSONDecodeError):
        return []


def _static_result(sub: intake.Submission, a: course_mod.Assignment | None) -> dict:
    return dict(student=sub.student, assignment=sub.assignment or "unknown", original=str(sub.original),
                status=sub.status, notes=sub.notes, score=0.0, max_score=a.max_score if a else 0.0,
                cells={}, judge={}, audit={"flag": "ok", "static": [], "runtime": [], "withdrawn": []})


def _run_worker(job: dict, wall: int) -> None:
    """Run one worker; on timeout kill its session and its kernel, and write the result ourselves."""
    job_path = Path(job["scratch"]) / "job.json"
    job_path.write_text(json.dumps(job))
    log = open(Path(job["scratch"]) / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "autograder.worker", str(job_path)], stdout=log, stderr=log,
                            env=_env(), start_new_session=True, cwd=job["scratch"])
    try:
        rc = proc.wait(timeout=wall)
        problem = "" if rc == 0 and Path(job["result_path"]).exists() else f"the grading worker died (exit {rc})"
    except subprocess.TimeoutExpired:
        problem = f"ran past the per-submission time limit ({wall} s); killed"
    finally:
        for pidfile in (Path(job["scratch"]) / "kernel" / "kernel.pid",):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        log.close()
    if problem:
        result = dict(student=job["student"], assignment=job["assignment"], original=job["original"],
                      status="timeout" if "time limit" in problem else "error",
                      notes=list(job["notes"]) + [problem], score=0.0, max_score=job["max_score"], cells={},
                      judge={}, audit={"flag": "ok", "static": [], "runtime": [], "withdrawn": []},
                      withdrawn=job["previous_withdrawals"])
        Path(job["result_path"]).write_text(json.dumps(result, indent=1, sort_keys=True))


def grade(opts: Options) -> list[dict]:
    from autograder import judge, reports

    out = opts.out.resolve()
    course_root = out / "course"
    course_root.mkdir(parents=True, exist_ok=True)
    names = course_mod.list_assignments(opts.source)
    if opts.assignment and opts.assignment not in names:
        raise SystemExit(f"unknown assignment {opts.assignment!r}; instructor notebooks exist for {names}")
    if opts.submissions is None:
        from autograder import samples
        opts.submissions = samples.write_samples(out / "samples", opts.source, [opts.assignment] if opts.assignment else None)
        if not opts.quiet:
            print(f"no submissions given: grading the built-in samples in {opts.submissions}")
    assignments = {n: course_mod.load_assignment(opts.source, n) for n in names}
    subs = intake.collect(opts.submissions, assignments, opts.assignment, out)
    if opts.student:
        subs = [s for s in subs if s.student == opts.student]
    if opts.assignment:
        subs = [s for s in subs if s.assignment in (opts.assignment, None)]
    used = sorted({s.assignment for s in subs if s.assignment in assignments})
    prepared = {n: prepare_assignment(n, opts, course_root) for n in used}
    # intake again with the release attached, so deleted metadata can be restored
    subs = intake.collect(opts.submissions, prepared or assignments, opts.assignment, out)
    if opts.student:
        subs = [s for s in subs if s.student == opts.student]
    if opts.assignment:
        subs = [s for s in subs if s.assignment in (opts.assignment, None)]
    _kernelspec(course_root)
    mpl_cache = matplotlib_cache(course_root)
    models = model_cache(prepared.values())
    limits = Limits(memory_mb=opts.memory_mb, cpu_seconds=opts.submission_timeout * (os.cpu_count() or 1))
    refs = {}
    for n, a in prepared.items():
        path = out / "reference" / f"{n}.safetensors"
        errors = judge.reference_outputs(a.exercise_ids, path)
        if errors:
            raise RuntimeError(f"reference outputs of {n} failed (a bug in lora_ref.exercises?): {errors}")
        refs[n] = path
    jobs, results = [], []
    for sub in subs:
        intake.store(sub, course_root, out / "intake")
        a = prepared.get(sub.assignment)
        rpath = _result_path(out, sub.assignment or "unknown", sub.student)
        rpath.parent.mkdir(parents=True, exist_ok=True)
        if sub.status != "ok" or a is None:
            rpath.write_text(json.dumps(_static_result(sub, a), indent=1, sort_keys=True))
            continue
        scratch = out / "scratch" / a.name / sub.student
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        jobs.append(dict(
            student=sub.student, assignment=a.name, original=str(sub.original), notes=sub.notes,
            course_root=str(course_root), source_dir=str(opts.source.resolve()), course_id=COURSE_ID,
            db_url=f"sqlite:///{course_root / 'gradebook.db'}", scratch=str(scratch),
            jupyter_path=str(course_root), limits=limits.__dict__, limits_env=limits.as_env(),
            cell_timeout=opts.timeout, judge_timeout=max(60, opts.submission_timeout // 3),
            threads=max(1, (os.cpu_count() or 1) // opts.jobs), output_bytes=opts.output_bytes,
            exercises=a.exercise_ids, exercises_of=a.exercises_of,
            test_points={c.grade_id: c.points for c in a.test_cells}, max_score=a.max_score,
            reference=str(refs[a.name]), result_path=str(rpath), hidden_lines=hidden_lines(a),
            previous_withdrawals=_previous_withdrawals(rpath), mpl_cache=mpl_cache, model_cache=models,
            blocked_reads=[str(ROOT / "lora_ref"), str(opts.source.resolve()), str(course_root)],
            hidden=[str(opts.source.resolve()), str(course_root / "submitted"), str(out / "intake"),
                    str(out / "samples"), str(out / "unzipped"), str(Path(opts.submissions).resolve())]))
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="grading", unit="submission", disable=opts.quiet, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        futures = {pool.submit(_run_worker, job, opts.submission_timeout): job for job in jobs}
        for fut in as_completed(futures):
            fut.result()
            bar.set_postfix_str(futures[fut]["student"])
            bar.update()
    bar.close()
    results = reports.load_results(out / "results")
    reports.write_all(results, out)
    return results
