"""Grade on a Dask cluster: one task per submission, run by ``dask worker`` processes on any machines.

``python -m autograder grade SUBMISSIONS --scheduler tcp://HOST:8786`` (a running ``dask scheduler``)
or ``--cluster local:N`` (a :class:`distributed.LocalCluster` of N one-thread workers on this machine).

Each task carries everything its submission needs, as bytes (:func:`payload`): the job (limits,
timeouts, exercises, points), the released notebook, the instructor's assignment folder, a gradebook
holding only the assignment, the reference outputs, the matplotlib font cache and the submitted
notebook. A worker (:func:`run_task`) unpacks them into a private temporary course, runs the same
sandboxed pipeline as a local run (:func:`autograder.grade.run_worker`, one ``autograder.worker``
process), and returns the result, the autograded notebook, the feedback page and the grades of its
private gradebook; it deletes its folder. Only the coordinator writes: it copies the grades into the
class gradebook (:func:`merge_grades`: one submission row per student, updated in place), puts the
notebook and the feedback where nbgrader keeps them, writes the result and the ledger entry
(:class:`autograder.grade.Ledger`). Results are therefore those of a local run (a test compares).

Faults: a worker that dies mid-task (killed, machine lost) loses only its private folder; the scheduler
runs the task again on another worker (Dask's ``distributed.scheduler.allowed-failures``, default 3,
after which the submission gets an ``error`` result saying so). Workers may join at any time. An
unreachable scheduler is an error at start (exit 2). An interrupted run resumes: results whose ledger
entries match are not graded again. Workers need the same code as the coordinator (the task carries a
digest of ``autograder/`` and ``lora_ref/``; a worker with another checkout and other code refuses it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from autograder.contracts import Job, Result

CONNECT_TIMEOUT_S = 10


class Pool:
    """A Dask client (and the local cluster it started, if any) that grades jobs."""

    def __init__(self, client, cluster=None):
        self.client, self.cluster = client, cluster

    def workers_hint(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def dashboard(self) -> str | None:
        services = self.client.scheduler_info().get("services", {})
        return self.client.dashboard_link if "dashboard" in services else None

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def grade(self, jobs: list[tuple[Job, str, dict]], prepared: dict, course_root: Path, done, opts) -> None:
        """Submit one task per job; as each finishes, write its outputs (coordinator only) and call
        ``done(job, key, entry)``."""
        from distributed import as_completed
        from autograder import grade as grade_mod, reports

        if not jobs:
            return {}
        t0 = time.perf_counter()
        templates = {name: template_gradebook(name, opts, Path(course_root).parent) for name in
                     sorted({j.assignment for j, _, _ in jobs})}
        needs_model = {n: grade_mod.needs_model([a]) for n, a in prepared.items()}
        from autograder import worker as _imported_once      # noqa: F401 - merge_grades' imports, before timing it
        from nbgrader import api as _imported_too             # noqa: F401
        futures, busy = {}, 0.0
        t_payloads = time.perf_counter()
        templates_s = t_payloads - t0                # once per assignment: a gradebook of its own
        for job, key, entry in jobs:
            task = payload(job, Path(course_root), opts.source, templates[job.assignment], needs_model[job.assignment],
                           opts.submission_timeout)
            fut = self.client.submit(run_task, task, key=f"grade-{job.assignment}-{job.student}-{os.urandom(4).hex()}",
                                     pure=False)
            futures[fut] = (job, key, entry)
        if not opts.quiet:
            link = self.dashboard()
            print(f"grading {len(jobs)} submission(s) on {self.client.scheduler.address} "
                  f"({self.workers_hint()} worker(s) now; more may join)" + (f"; dashboard: {link}" if link else ""),
                  file=sys.stderr)
        payloads_s = time.perf_counter() - t_payloads     # per submission: its payload, submitted
        bar = reports.progress(len(jobs), opts.quiet)
        for fut in as_completed(list(futures)):
            job, key, entry = futures.pop(fut)
            t1 = time.perf_counter()
            try:
                output = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker, lost scheduler...: the submission gets a row
                name = type(exc).__name__
                why = (f"the Dask workers grading this submission died {_failures(exc)}: it may crash its worker "
                       "process (see the workers' logs)" if name == "KilledWorker" else
                       f"the Dask task failed: {name}: {str(exc)[:300]}")
                Result.error(why, job=job).write(Path(job.result_path))
            else:
                apply(output, job, Path(course_root))
            fut.release()
            bar.done(done(job, key, entry))
            busy += time.perf_counter() - t1
        bar.close()
        return {"templates_s": round(templates_s, 3), "payloads_s": round(payloads_s, 3), "collect_s": round(busy, 3)}


def _failures(exc) -> str:
    from dask import config
    return f"{config.get('distributed.scheduler.allowed-failures', 3) + 1} times"


def connect(scheduler: str | None, cluster: str | None, quiet: bool = False, timeout: int = CONNECT_TIMEOUT_S) -> Pool:
    """A client of the scheduler at ``scheduler``, or of a new local cluster (``cluster="local:N"``).
    Raises :class:`autograder.grade.UsageError` (one line, exit 2) when it cannot."""
    import logging
    from autograder.grade import UsageError
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise UsageError(f"grading on Dask needs the 'distributed' package ({exc}); pip install distributed") from None
    if cluster:
        m = re.fullmatch(r"local:(\d+)", cluster.strip())
        if not m or int(m[1]) < 1:
            raise UsageError(f"--cluster {cluster!r}: expected local:N with N >= 1 workers (e.g. local:2)")
        lc = LocalCluster(n_workers=int(m[1]), threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0", memory_limit=0, silence_logs=logging.ERROR)
        return Pool(Client(lc), lc)
    if not re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://", scheduler or ""):
        raise UsageError(f"--scheduler {scheduler!r}: expected an address like tcp://HOST:8786")
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"cannot reach the Dask scheduler at {scheduler} within {timeout} s "
                         f"({type(exc).__name__}); is `dask scheduler` running there?") from None
    return Pool(client)


# -- what a task carries --------------------------------------------------------------------------------------------

def template_gradebook(name: str, opts, out: Path) -> bytes:
    """A gradebook holding only assignment ``name`` (no student): each task grades into a copy."""
    from autograder import grade as grade_mod
    root = Path(out) / "cluster" / name
    grade_mod.prepare_assignment(name, opts, root)
    return (root / "gradebook.db").read_bytes()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def payload(job: Job, course_root: Path, source: Path, gradebook: bytes, needs_model: bool, wall: int) -> dict:
    from autograder import grade as grade_mod
    from autograder.course import EXTRA_EXERCISES
    a, s = job.assignment, job.student
    return {
        "job": dataclasses.asdict(job),
        "release": (course_root / "release" / a / f"{a}.ipynb").read_bytes(),
        "instructor": _files(Path(source).resolve() / a),
        "gradebook": gradebook,
        "reference": Path(job.reference).read_bytes(),
        "submitted": (course_root / "submitted" / s / a / f"{a}.ipynb").read_bytes(),
        "fonts": {p.name: p.read_bytes() for p in (course_root / "mplcache").glob("fontlist*.json")},
        "env": {k: v for k, v in os.environ.items() if k == EXTRA_EXERCISES},
        "code": grade_mod.grader_digest(),
        "checkout": [socket.gethostname(), str(grade_mod.ROOT)],
        "needs_model": needs_model,
        "wall": wall,
    }


# -- on the worker --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _worker_model_cache() -> str | None:
    from autograder import grade as grade_mod

    class _A:  # needs_model's view of an assignment that loads the model
        cells = [type("C", (), {"source": "load_smollm2"})()]
    return grade_mod.model_cache([_A()])


def _worker_threads() -> int:
    """Threads for one submission's kernel: this machine's cores over the task slots of *all* the Dask
    workers on it (``dask worker --nworkers N`` starts N processes that each know only their own slots;
    a kernel that took every core over its own worker's share oversubscribed them N times over)."""
    try:
        from distributed import get_worker
        worker = get_worker()
        slots = _slots_on_host(worker.address.rsplit(":", 1)[0], worker.state.nthreads)
    except Exception:  # noqa: BLE001 - not in a worker (tests call run_task directly)
        slots = 1
    return max(1, (os.cpu_count() or 1) // max(1, slots))


_SLOTS: dict = {}


def _slots_on_host(host: str, own: int) -> int:
    """Task slots of the Dask workers whose address is on ``host`` (asked of the scheduler once per
    worker process; ``own`` where it cannot be asked)."""
    if host not in _SLOTS:
        try:
            from distributed import get_client
            workers = get_client().scheduler_info(n_workers=-1)["workers"]
            _SLOTS[host] = sum(w.get("nthreads", 1) for a, w in workers.items() if a.rsplit(":", 1)[0] == host) or own
        except Exception:  # noqa: BLE001 - an older scheduler, a lost connection: this worker's own slots
            _SLOTS[host] = own
    return max(own, _SLOTS[host])


_SERVER_LOCK = threading.Lock()
_SERVER: dict = {}          # this Dask worker process's fork server and the code digest it imported


def _owned_by_a_lasting_thread(factory):
    """Call ``factory`` in a thread that lives as long as this process, and return what it returns.
    The fork server's PR_SET_PDEATHSIG fires when the *thread* that started it ends, and the threads
    that run Dask tasks may come and go; the server must die only with the worker process."""
    box: dict = {}
    made = threading.Event()

    def owner():
        try:
            box["value"] = factory()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        made.set()
        threading.Event().wait()                  # never set: the thread ends with the process

    threading.Thread(target=owner, name="autograder-forkserver-owner", daemon=True).start()
    made.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def worker_fork_server(digest: str):
    """This Dask worker's fork server (see :mod:`autograder.forkserver`): started by its first task,
    shared by the tasks after it, so a long-lived worker pays the grading imports once rather than once
    per submission. A new one replaces it when it has died or when the code on disk (``digest``) is no
    longer the code it imported; the old one finishes its workers first. None where
    ``AUTOGRADER_FORK_SERVER=0`` or it cannot start: the task then starts a plain worker process."""
    if os.environ.get("AUTOGRADER_FORK_SERVER", "1") == "0":
        return None
    from autograder import grade as grade_mod
    from autograder.forkserver import ForkServer
    with _SERVER_LOCK:
        server = _SERVER.get("server")
        if server is not None and server.alive() and _SERVER.get("digest") == digest:
            return server
        if server is not None:
            server.detach()
        try:
            server = _owned_by_a_lasting_thread(lambda: ForkServer(grade_mod._env(), preexec_fn=grade_mod._set_pdeathsig))
        except OSError:
            server = None
        _SERVER.update(server=server, digest=digest)
        return server


def run_task(task: dict) -> dict:
    """Grade one submission in a private temporary course; return what the coordinator writes."""
    from autograder import grade as grade_mod

    t0 = time.time()
    job = Job(**{k: v for k, v in task["job"].items() if k in Job.__dataclass_fields__})
    host = socket.gethostname()
    same_checkout = task.get("checkout") == [host, str(grade_mod.ROOT)]    # a local worker: the very same files
    if not same_checkout and task["code"] != grade_mod.grader_digest():
        problem = (f"the Dask worker on {host} runs other code than the coordinator (digest "
                   f"{grade_mod.grader_digest()} vs {task['code']}): install the same commit on every worker")
        return {"result": dataclasses.asdict(Result.error(problem, job=job)), "host": host}
    from autograder import sandbox
    why = sandbox.available() if job.isolation == sandbox.NAMESPACES else ""
    if why:
        problem = (f"the Dask worker on {host} cannot isolate learner code ({why}); the coordinator asked for "
                   "namespaces: not graded there")
        return {"result": dataclasses.asdict(Result.error(problem, job=job)), "host": host}
    server = worker_fork_server(grade_mod.grader_digest())
    mapped = server.mapped_mb() if server is not None else None     # waits for a server that is still starting
    t_server = time.time()
    why = sandbox.memory_room(job.limits.memory_mb, mapped if mapped is not None else sandbox.torch_mapped_mb())
    if why:
        return {"result": dataclasses.asdict(Result.error(f"the Dask worker on {host}: {why}", job=job)), "host": host}
    root = Path(tempfile.mkdtemp(prefix=f"autograder-{job.student}-"))
    try:
        a, s = job.assignment, job.student
        course = root / "course"
        (course / "release" / a).mkdir(parents=True)
        (course / "release" / a / f"{a}.ipynb").write_bytes(task["release"])
        (course / "submitted" / s / a).mkdir(parents=True)
        (course / "submitted" / s / a / f"{a}.ipynb").write_bytes(task["submitted"])
        (course / "gradebook.db").write_bytes(task["gradebook"])
        source = root / "source"
        for rel, data in task["instructor"].items():
            (source / a / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / a / rel).write_bytes(data)
        reference = root / "reference" / f"{a}.safetensors"
        reference.parent.mkdir(parents=True)
        reference.write_bytes(task["reference"])
        scratch = root / "scratch" / a / s
        (scratch / "kernel" / "mpl").mkdir(parents=True)
        for name, data in task["fonts"].items():
            (scratch / "kernel" / "mpl" / name).write_bytes(data)
        result_path = root / "results" / a / f"{s}.json"
        result_path.parent.mkdir(parents=True)
        grade_mod._kernelspec(course)
        local = dataclasses.replace(
            job, course_root=str(course), source_dir=str(source), db_url=f"sqlite:///{course / 'gradebook.db'}",
            out=str(root), scratch=str(scratch), result_path=str(result_path), reference=str(reference),
            previous_withdrawals=[], threads=_worker_threads(), jupyter_path=str(course),
            mpl_cache=None,                                   # the kernel's own mpl/, fonts copied in
            model_cache=_worker_model_cache() if task["needs_model"] else None,
            hidden=[str(source), str(course / "submitted")])
        t_setup = time.time()
        started = grade_mod.run_worker(local, task["wall"], env=task["env"], server=server)
        t_worker = time.time()
        page = course / "feedback" / s / a / f"{a}.html"
        if page.exists():
            from autograder.reports import clean_feedback
            clean_feedback(page, [str(root), str(grade_mod.ROOT), sys.prefix])
        try:
            result = Result.read(result_path)
        except (OSError, ValueError, TypeError) as exc:
            result = Result.error(f"unreadable result file: {exc}", job=job)
        log = (scratch / "worker.log").read_bytes()[-4000:] if (scratch / "worker.log").exists() else b""
        # where a task's time goes beyond the worker's (see benchmarks/grading_speed.py --class-scale)
        split = {"server_s": round(t_server - t0, 2), "setup_s": round(t_setup - t_server, 2),
                 "worker_s": round(t_worker - t_setup, 2), "after_s": round(time.time() - t_worker, 2)}
        return {"result": dataclasses.asdict(result), "host": host, "seconds": round(time.time() - t0, 1),
                "started": started, **split,
                "autograded": _files(course / "autograded" / s / a), "feedback": _files(course / "feedback" / s / a),
                "grades": private_grades(local), "log": log.decode(errors="replace")}
    finally:
        if not os.environ.get("AUTOGRADER_KEEP_TASKS"):      # set it on a worker to keep the folders for debugging
            shutil.rmtree(root, ignore_errors=True)


def private_grades(job: Job) -> dict | None:
    """The submission's rows of the task's own gradebook (scores, manual scores, comments)."""
    from nbgrader.api import Gradebook, MissingEntry
    with Gradebook(job.db_url, job.course_id) as gb:
        try:
            nb = gb.find_submission_notebook(job.assignment, job.assignment, job.student)
        except MissingEntry:
            return None
        return {"grades": {g.name: {"auto_score": g.auto_score, "manual_score": g.manual_score,
                                    "extra_credit": g.extra_credit, "needs_manual_grade": g.needs_manual_grade}
                           for g in nb.grades},
                "comments": {c.name: {"auto_comment": c.auto_comment, "manual_comment": c.manual_comment}
                             for c in nb.comments},
                "flagged": nb.flagged}


# -- back on the coordinator ----------------------------------------------------------------------------------------

def merge_grades(db_url: str, course_id: str, assignment: str, student: str, rows: dict) -> None:
    """Copy a task's grades into the class gradebook: the student's one submission row is created or
    updated in place (as ``nbgrader autograde --force`` does), so a rerun never duplicates it."""
    from nbgrader.api import Gradebook
    from autograder.worker import _gradebook_retry

    def write():
        with warnings.catch_warnings(), Gradebook(db_url, course_id) as gb:
            warnings.simplefilter("ignore")       # SQLAlchemy's autoflush notes from nbgrader's own API
            gb.update_or_create_student(student)
            gb.update_or_create_submission(assignment, student)
            nb = gb.find_submission_notebook(assignment, assignment, student)
            for g in nb.grades:
                for k, v in rows["grades"].get(g.name, {}).items():
                    setattr(g, k, v)
            for c in nb.comments:
                for k, v in rows["comments"].get(c.name, {}).items():
                    setattr(c, k, v)
            nb.flagged = bool(rows.get("flagged"))
            gb.db.commit()
    _gradebook_retry(write)


def apply(output: dict, job: Job, course_root: Path) -> None:
    """Write a finished task's outputs into the class folder, as a local run would have left them."""
    a, s = job.assignment, job.student
    result = Result(**{k: v for k, v in output["result"].items() if k in Result.__dataclass_fields__})
    for kind in ("autograded", "feedback"):
        folder = course_root / kind / s / a
        if folder.exists():
            shutil.rmtree(folder)
        for rel, data in (output.get(kind) or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    page = course_root / "feedback" / s / a / f"{a}.html"
    result.feedback = str(page) if result.feedback and page.exists() else ""
    if output.get("grades"):
        merge_grades(job.db_url, job.course_id, a, s, output["grades"])
    if output.get("log"):
        (Path(job.scratch) / "worker.log").write_text(output["log"])
    (Path(job.scratch) / "task.json").write_text(json.dumps({k: output.get(k) for k in (
        "host", "seconds", "started", "server_s", "setup_s", "worker_s", "after_s")}))
    result.write(Path(job.result_path))
