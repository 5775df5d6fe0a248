"""Grade a class: intake, one gradebook, parallel sandboxed workers (local processes or a Dask cluster), reports.

Layout of the output folder (``--out``; default ``grading/<name of the submission set>``)::

    course/                nbgrader course root: gradebook.db, release/, submitted/, autograded/, feedback/
    course/kernels/        the ``autograder-sandbox`` kernelspec (see autograder.kernel)
    intake/<A>/<student>/  every file as received, never modified
    reference/<A>.safetensors   reference outputs of the assignment's exercises
    scratch/<A>/<student>/ per-submission sandbox (kernel and judge logs)
    results/<A>/<student>.json  one result per submission (see autograder.contracts.Result)
    run.json               what this folder grades (its submission sets) and the ledger of graded inputs
    run.journal            ledger entries of a run not yet folded into run.json (left by a killed run)
    grades.csv, summary.csv, summary.md, histogram.png, audit.md

One output folder holds one class: ``run.json`` names the submission sets graded into it, and a run
with another set refuses to mix them (``--add`` merges on purpose; ``--student S`` updates one student).
A run grades only what changed: a submission whose file, instructor notebook and grader are those of
the ledger entry written with its result is not graded again (``--regrade`` grades everything again),
so an interrupted run resumes where it stopped. Grading is idempotent (``--force`` everywhere,
previous judge withdrawals cleared) and writes only the results, scratch and nbgrader folders of the
students it grades; grades.csv and the summary are rebuilt from every result in ``results/``.

Where the submissions are graded: ``--jobs N`` local worker processes (default), or a Dask cluster
(``--scheduler tcp://HOST:8786`` or ``--cluster local:N``; see :mod:`autograder.cluster`). Either way
only this process (the coordinator) writes the gradebook, the results and the reports.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
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
from autograder.contracts import DEFAULTS, Job, Result
from autograder.sandbox import Limits

ROOT = Path(__file__).resolve().parents[1]
COURSE_ID = "lora-course"
SAMPLES = "built-in samples"


class UsageError(Exception):
    """Bad input from the instructor: the CLI prints the message as one line and exits 2."""


@dataclass
class Options:
    submissions: Path | None = None
    assignment: str | None = None
    jobs: int = DEFAULTS.jobs
    timeout: int = DEFAULTS.cell_timeout              # per cell, seconds
    submission_timeout: int = DEFAULTS.submission_timeout   # per submission, wall seconds
    memory_mb: int = DEFAULTS.memory_mb
    out: Path | None = None           # default: grading/<name of the submission set>
    source: Path = ROOT / "solutions"
    student: str | None = None
    output_bytes: int = DEFAULTS.output_bytes
    quiet: bool = False
    scheduler: str | None = None      # tcp://HOST:8786: grade on this Dask cluster
    cluster: str | None = None        # local:N: start a local Dask cluster of N workers
    regrade: bool = False             # grade again submissions whose results are up to date
    add: bool = False                 # merge another submission set into this output folder
    accept_no_isolation: bool = False  # grade even where namespaces are unavailable (every result says so)

    def __post_init__(self) -> None:
        for name in ("jobs", "timeout", "submission_timeout"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.scheduler and self.cluster:
            raise UsageError("--scheduler and --cluster exclude each other: connect to a cluster or start one")


def default_out(submissions: Path | None) -> Path:
    """``grading/samples`` for the built-in samples, else ``grading/<file or folder name>``: two
    submission sets never share a folder by default."""
    if submissions is None:
        return Path("grading") / "samples"
    p = Path(submissions)
    name = p.stem if p.suffix == ".zip" else (p.resolve().name or "submissions")
    return Path("grading") / intake.slug(name)


def _kernelspec(course_root: Path) -> Path:
    folder = course_root / "kernels" / "autograder-sandbox"
    folder.mkdir(parents=True, exist_ok=True)
    from autograder import sandbox
    spec = {"argv": sandbox.command(["-m", "autograder.kernel", "-f", "{connection_file}"], not sandbox.available()),
            "display_name": "Python 3 (autograder sandbox)", "language": "python",
            "metadata": {"debugger": False}}
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))
    return course_root


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def matplotlib_cache(course_root: Path) -> str:
    """Build matplotlib's font cache once; each submission gets a writable copy (see :func:`mpl_dir`)."""
    folder = course_root / "mplcache"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("fontlist*.json")):
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=dict(_env(), MPLCONFIGDIR=str(folder)),
                       capture_output=True, timeout=300)
    return str(folder)


def mpl_dir(cache: str | Path, scratch: Path) -> str:
    """A per-submission, writable MPLCONFIGDIR holding a copy of the font cache: matplotlib warns
    (naming the folder, in the learner's feedback) when its config folder is not writable, and
    rebuilds the font list (seconds) when it finds none."""
    from autograder import layout
    folder = layout.kernel_dir(Path(scratch)) / "mpl"      # the worker's MPLCONFIGDIR when Job.mpl_cache is None
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(cache).glob("fontlist*.json"):
        shutil.copy2(f, folder / f.name)
    return str(folder)


def model_cache(assignments) -> str | None:
    """If a notebook loads SmolLM2, build lora_ref's model cache once, before grading: kernels read it
    through the read-only sandbox instead of each converting the GGUF file again (about 20 s)."""
    if not needs_model(assignments):
        return None
    from lora_ref.models import cache_dir, smollm2_folder
    try:
        smollm2_folder()              # a path check once built (this process imports torch anyway)
    except Exception:  # noqa: BLE001 - without the cache each kernel converts the GGUF itself: slower, not wrong
        return None
    return str(cache_dir().parent)


def needs_model(assignments) -> bool:
    return any("load_smollm2" in c.source or "load_tokenizer" in c.source for a in assignments for c in a.cells)


def prepare_assignment(name: str, opts: Options, course_root: Path) -> course_mod.Assignment:
    """Load the instructor notebook; (re)generate the release and gradebook entries if it changed."""
    a = course_mod.load_assignment(opts.source, name)
    course_root.mkdir(parents=True, exist_ok=True)
    stamp = course_root / ".generated" / f"{name}.digest"
    release = course_root / "release" / name / f"{name}.ipynb"
    if not (stamp.exists() and stamp.read_text() == a.digest and release.exists()):
        cmd = [sys.executable, "-m", "autograder.nbgrader_run", "generate_assignment", name, "--force",
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


def _static_result(sub: intake.Submission, a: course_mod.Assignment | None) -> Result:
    return Result.error("", status=sub.status, student=sub.student, assignment=sub.assignment or "unknown",
                        original=str(sub.original), notes=sub.notes, max_score=a.max_score if a else 0.0)


# -- what this output folder grades, and what it has graded (run.json) -------------------------------------------

@functools.lru_cache(maxsize=1)
def grader_digest() -> str:
    """Digest of the grader's and the reference's code: a result graded by other code is stale."""
    h = hashlib.sha256()
    for pkg in ("autograder", "lora_ref"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Ledger:
    """``run.json``: the submission sets graded into this folder, and for each result the digests of
    its input file, instructor notebook and grader. Only the coordinator writes it, after the result.

    A result's entry is appended to ``run.journal`` (one JSON line) and folded into ``run.json`` at the
    end of the run (:meth:`compact`): rewriting the whole ledger after every result made a class of n
    submissions cost O(n^2), since each result rewrote every entry before it. A run that is killed
    leaves its journal, which the next run reads first; a line cut short by the kill is ignored (its
    submission is graded again)."""

    def __init__(self, out: Path):
        self.path = out / "run.json"
        self.journal = out / "run.journal"
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        self.sources: list[str] = list(data.get("sources", []))
        self.graded: dict[str, dict] = dict(data.get("graded", {}))
        self.graded.update(self._replay())

    def _replay(self) -> dict[str, dict]:
        graded = {}
        try:
            lines = self.journal.read_text().splitlines()
        except OSError:
            return graded
        for line in lines:
            try:
                key, entry = json.loads(line)
            except (ValueError, TypeError):
                continue            # the last line of a killed run
            graded[key] = entry
        return graded

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sources": self.sources, "graded": self.graded}, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def compact(self) -> None:
        """Fold the journal into ``run.json`` (a kill between the two steps only replays entries again)."""
        if self.journal.exists():
            self.save()
            self.journal.unlink()

    def claim(self, source: str, out: Path, opts: Options) -> None:
        """Refuse to mix submission sets in one folder unless asked (``--add``, ``--student``)."""
        if source in self.sources:
            return
        had = sorted(p for p in (out / "results").glob("*/*.json")) if (out / "results").exists() else []
        if (self.sources or had) and not (opts.add or opts.student):
            before = ", ".join(self.sources) if self.sources else "an earlier run that did not record its submissions"
            raise UsageError(
                f"{out} already holds the grades of {before} ({len(had)} results); this run grades {source}. "
                f"Grade it into its own folder (--out DIR), or pass --add to merge it into that class")
        self.sources.append(source)
        self.save()

    def up_to_date(self, key: str, entry: dict, rpath: Path) -> bool:
        return self.graded.get(key) == entry and rpath.exists()

    def record(self, key: str, entry: dict) -> None:
        self.graded[key] = entry
        with open(self.journal, "a") as f:          # one line: O(1) whatever the size of the class
            f.write("\n" + json.dumps([key, entry]) + "\n")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# -- one submission, on this machine ------------------------------------------------------------------------------

def _set_pdeathsig() -> None:
    """In the child: die with the thread that started us (a Dask worker killed mid-task leaves no orphan)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker(job: Job, wall: int, env: dict | None = None, server=None) -> str:
    """Run one worker (``env``: extra environment variables), forked by ``server`` (an
    :class:`autograder.forkserver.ForkServer`) when there is one, else started as ``python -m
    autograder.worker``; on timeout kill its session, and write the result ourselves. The worker's
    process dies with the thread (or the fork server) that started it. Returns how it was started:
    ``"forked"`` or ``"process"``."""
    scratch = Path(job.scratch)
    job_path = scratch / "job.json"
    job.write(job_path)
    if server is not None:
        from autograder.forkserver import ForkServerError
        try:
            rc = server.run(str(job_path), str(scratch / "worker.log"), job.scratch, dict(_env(), **(env or {})), wall)
        except ForkServerError:
            pass                               # start this one as a plain process (below)
        else:
            _worker_ended(job, rc, wall)
            return "forked"
    log = open(scratch / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "autograder.worker", str(job_path)], stdout=log, stderr=log,
                            env=dict(_env(), **(env or {})), start_new_session=True, cwd=job.scratch,
                            preexec_fn=_set_pdeathsig)
    rc = None
    try:
        rc = proc.wait(timeout=wall)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        log.close()
    _worker_ended(job, rc, wall)
    return "process"


def _worker_ended(job: Job, rc: int | None, wall: int | None = None) -> None:
    """Write the result of a worker that did not (``rc`` None: it ran past its time limit)."""
    if rc is None:
        problem = f"ran past the per-submission time limit ({wall or job.submission_timeout} s); killed"
    elif rc == 0 and Path(job.result_path).exists():
        return
    else:
        problem = f"the grading worker died (exit {rc})"
    status = "timeout" if rc is None else "error"
    Result.error(problem, job=job, status=status).write(Path(job.result_path))


_run_worker = run_worker      # the name earlier code and tests use


def finish(job: Job, out: Path) -> Result:
    """The coordinator's last step for every graded submission, local or remote: read the result,
    clean its feedback page (see :func:`autograder.reports.clean_feedback`)."""
    from autograder import reports

    rpath = Path(job.result_path)
    try:
        result = Result.read(rpath)
    except (OSError, ValueError, TypeError) as exc:
        result = Result.error(f"unreadable result file: {exc}", job=job)
        result.write(rpath)
    if result.feedback and Path(result.feedback).exists():
        reports.clean_feedback(Path(result.feedback), [str(out), str(ROOT), sys.prefix])
    return result


# -- the grading run ----------------------------------------------------------------------------------------------

def _select(subs: list[intake.Submission], opts: Options) -> list[intake.Submission]:
    if opts.student:
        subs = [s for s in subs if s.student == opts.student]
    if opts.assignment:
        for s in subs:
            if s.status == "ok" and s.assignment not in (opts.assignment, None):
                s.status = "rejected"
                s.notes.append(f"wrong assignment: this is a notebook of {s.assignment}, not {opts.assignment} "
                               f"(--assignment); not graded (grade it with --assignment {s.assignment})")
    return subs


def grade(opts: Options) -> list[dict]:
    """Grade ``opts.submissions``; return every result of the output folder (dicts, as written)."""
    from autograder import judge, reports

    course_mod.register_extra_exercises()

    if opts.submissions is not None and not Path(opts.submissions).exists():
        raise UsageError(f"submissions path {opts.submissions} does not exist")
    names = course_mod.list_assignments(opts.source)
    if opts.assignment and opts.assignment not in names:
        raise UsageError(f"unknown assignment {opts.assignment!r}; instructor notebooks exist for {names}")
    out = (opts.out or default_out(opts.submissions)).resolve()
    opts.out = out
    pool = None
    if opts.scheduler or opts.cluster:
        from autograder import cluster
        pool = cluster.connect(opts.scheduler, opts.cluster, quiet=opts.quiet)     # fails here, before any work
    # the local pool's fork server imports what workers need while this run sets up
    server = _fork_server() if pool is None else None
    try:
        return _grade(opts, out, names, pool, judge, reports, server)
    finally:
        if pool is not None:
            pool.close()
        if server is not None:
            server.close()


def check_memory_room(memory_mb: int, server=None) -> None:
    """Refuse a memory limit below what importing torch maps in this Python (a UsageError, exit 2),
    measured by the fork server's own imports or, without one, by a fresh interpreter."""
    from autograder import sandbox
    mapped = server.mapped_mb() if server is not None else None
    why = sandbox.memory_room(memory_mb, mapped if mapped is not None else sandbox.torch_mapped_mb())
    if why:
        raise UsageError(why)


def isolation_mode(opts: Options) -> str:
    """'namespaces' where learner code can be isolated here; else refuse, unless the instructor accepted it."""
    from autograder import sandbox
    why = sandbox.available()
    if not why:
        return sandbox.NAMESPACES
    message = f"WARNING: learner code cannot be isolated on this machine ({why})"
    if not opts.accept_no_isolation:
        raise UsageError(message + "; refusing to grade (accept_no_isolation grades without PID, network and "
                         "file-system isolation)")
    print(message + "; grading WITHOUT isolation as asked", file=sys.stderr)
    return "none"


def _grade(opts: Options, out: Path, names: list[str], pool, judge, reports, server=None) -> list[dict]:
    isolation = isolation_mode(opts)
    course_root = out / "course"
    course_root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out)
    if opts.submissions is None:
        from autograder import samples
        source = f"{SAMPLES} of {opts.assignment or samples.DEFAULT_ASSIGNMENT}"
        ledger.claim(source, out, opts)
        opts.submissions = samples.write_samples(out / "samples", opts.source, [opts.assignment] if opts.assignment else None)
        if not opts.quiet:
            print(f"no submissions given: grading the built-in samples in {opts.submissions}")
    else:
        ledger.claim(str(Path(opts.submissions).resolve()), out, opts)
    assignments = {n: course_mod.load_assignment(opts.source, n) for n in names}
    t_collect = time.perf_counter()
    try:
        subs = _select(intake.collect(opts.submissions, assignments, opts.assignment, out), opts)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    collect_s = time.perf_counter() - t_collect
    used = sorted({s.assignment for s in subs if s.status == "ok" and s.assignment in assignments})
    prepared = {n: prepare_assignment(n, opts, course_root) for n in used}
    t_collect = time.perf_counter()
    # intake again with the release attached (deleted metadata is restored from it); every assignment
    # stays known, so a notebook of another assignment is recognised as such, not as a broken copy
    subs = _select(intake.collect(opts.submissions, {**assignments, **prepared}, opts.assignment, out), opts)
    collect_s += time.perf_counter() - t_collect
    _kernelspec(course_root)
    digest = grader_digest()
    limits = Limits(memory_mb=opts.memory_mb, cpu_seconds=opts.submission_timeout * (os.cpu_count() or 1))
    todo, skipped = [], 0
    t_store = time.perf_counter()
    for sub in subs:
        intake.store(sub, course_root, out / "intake")
        a = prepared.get(sub.assignment)
        rpath = _result_path(out, sub.assignment or "unknown", sub.student)
        rpath.parent.mkdir(parents=True, exist_ok=True)
        if sub.status != "ok" or a is None:
            _static_result(sub, a).write(rpath)
            continue
        key = f"{a.name}/{sub.student}"
        entry = {"input": _sha(sub.original), "assignment": a.digest, "grader": digest,
                 "options": [opts.timeout, opts.submission_timeout, opts.memory_mb]}
        if not (opts.regrade or opts.student) and ledger.up_to_date(key, entry, rpath):
            skipped += 1
            continue
        todo.append((sub, a, rpath, key, entry))
    store_s = time.perf_counter() - t_store
    if skipped and not opts.quiet:
        print(f"{skipped} submission(s) already graded with these files and this grader (results in "
              f"{out / 'results'}): not graded again (--regrade grades them again)")
    jobs = []
    if todo:
        mpl_cache = matplotlib_cache(course_root)
        models = model_cache(prepared.values()) if pool is None else None
        refs = {}
        secret = secrets.randbits(62)         # this run's hidden cases: no table of outputs can be prepared
        for n, a in prepared.items():
            path = out / "reference" / f"{n}.safetensors"
            errors = judge.reference_outputs(a.exercise_ids, path, secret)
            if errors:
                raise RuntimeError(f"reference outputs of {n} failed (a bug in lora_ref.exercises?): {errors}")
            refs[n] = path
        for sub, a, rpath, key, entry in todo:
            scratch = out / "scratch" / a.name / sub.student
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir(parents=True)
            mpl_dir(mpl_cache, scratch)        # MPLCONFIGDIR: the kernel's own (writable) mpl/, fonts copied in
            job = Job(
                student=sub.student, assignment=a.name, original=str(sub.original), course_root=str(course_root),
                source_dir=str(opts.source.resolve()), db_url=f"sqlite:///{course_root / 'gradebook.db'}",
                out=str(out), scratch=str(scratch), result_path=str(rpath), reference=str(refs[a.name]),
                exercises=a.exercise_ids, exercises_of=a.exercises_of,
                test_points={c.grade_id: c.points for c in a.test_cells}, max_score=a.max_score,
                hidden_lines=hidden_lines(a), course_id=COURSE_ID, notes=list(sub.notes),
                previous_withdrawals=_previous_withdrawals(rpath),
                limits=dataclasses.asdict(limits), cell_timeout=opts.timeout,
                judge_timeout=max(60, opts.submission_timeout // 3), submission_timeout=opts.submission_timeout,
                threads=max(1, (os.cpu_count() or 1) // opts.jobs),
                output_bytes=opts.output_bytes, jupyter_path=str(course_root), mpl_cache=None,
                model_cache=models, isolation=isolation,
                hidden=[str(opts.source.resolve()), str(course_root / "submitted"), str(out / "intake"),
                        str(out / "samples"), str(out / "unzipped"), str(Path(opts.submissions).resolve())])
            jobs.append((job, key, entry))

    def done(job: Job, key: str, entry: dict) -> Result:
        result = finish(job, out)
        if result.status in ("graded",):
            ledger.record(key, entry)         # an error or timeout is tried again by the next run
        return result

    # the coordinator's own time: per submission (intake, storing, ledger; the pool's payloads and collecting)
    # and once per run (references, caches, job folders: jobs_s; reports); start-up is not counted
    coordinator = {"submissions": len(subs), "graded_now": len(jobs), "intake_collect_s": round(collect_s, 3),
                   "intake_store_s": round(store_s, 3), "jobs_s": round(time.perf_counter() - t_store - store_s, 3)}
    if pool is not None:
        coordinator.update(pool.grade([(j, k, e) for j, k, e in jobs], prepared, course_root, done, opts) or {})
    elif jobs:
        check_memory_room(opts.memory_mb, server)
        _local(jobs, opts, done, server)
    ledger.compact()
    t_reports = time.perf_counter()
    results = reports.load_results(out / "results")
    reports.write_all(results, out)
    coordinator["reports_s"] = round(time.perf_counter() - t_reports, 3)
    (out / "coordinator.json").write_text(json.dumps(coordinator, indent=1))   # the coordinator's own time
    return [dataclasses.asdict(r) for r in results]


def _local(jobs: list[tuple[Job, str, dict]], opts: Options, done, server=None) -> None:
    from autograder import reports

    bar = reports.progress(len(jobs), opts.quiet)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        futures = {pool.submit(run_worker, job, opts.submission_timeout, None, server): (job, key, entry)
                   for job, key, entry in jobs}
        for fut in as_completed(futures):
            fut.result()
            job, key, entry = futures[fut]
            bar.done(done(job, key, entry))
    bar.close()


def _fork_server():
    """The run's fork server (worker imports paid once, see :mod:`autograder.forkserver`), or None where
    it cannot start or ``AUTOGRADER_FORK_SERVER=0``: then every worker is a plain process."""
    if os.environ.get("AUTOGRADER_FORK_SERVER", "1") == "0":
        return None
    from autograder.forkserver import ForkServer, ForkServerError
    try:
        return ForkServer(_env(), preexec_fn=_set_pdeathsig)
    except (ForkServerError, OSError):
        return None
