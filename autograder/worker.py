"""Grade one submission, start to finish, in its own process: ``python -m autograder.worker JOB.json``.

The grading run starts one worker per submission (``--jobs`` at a time). The worker never executes
learner code itself; learner code runs only in the sandboxed kernel and the sandboxed judge harness, both
started by this process (the kernel through nbgrader) in fresh PID namespaces. The worker is a child
subreaper and owns those processes: it ends them (and with them their whole namespaces) by killing its
own children, never by a pid read from a file; a watchdog does the same at the submission's time limit.
Stages, each a function filling its part of the :class:`~autograder.contracts.Result`, each turning a
failure into a line of the result, never into a lost submission:

1. judge: :func:`autograder.judge.run_judge` on the answer cells (see :mod:`autograder.harness`);
2. ``nbgrader autograde`` (in process, with the course's gradebook; the kernel is the sandbox kernel).
   If the kernel dies, the cell it was running is skipped on a retry (at most ``MAX_CRASHES`` times).
   Stages 1 and 2 run side by side (the judge in a thread that waits on its harness process): the judge's
   interpreter start and ``import torch`` hide behind the notebook's execution on a spare core. Nothing
   is killed until both are done, so neither stage's clean-up can end the other's sandbox;
3. verdicts: the judge's outputs against the reference outputs; a test cell that checks an exercise the
   judge failed loses its points (``manual_score = 0`` in the gradebook, so nbgrader's own export and
   feedback agree); withdrawals from a previous run of this student are cleared first (idempotent);
4. audit: static scan of the answer cells + what the kernel and the judge recorded at run time;
5. feedback HTML without hidden tests, checked for leaked hidden-test lines;
6. ``<out>/results/<assignment>/<student>.json``.
"""
from __future__ import annotations

import ctypes
import html
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from autograder import layout, sandbox
from autograder.contracts import Audit, CellScore, Job, Result

MAX_CRASHES = 3
TAG = re.compile(r"<[^>]+>")
PR_SET_CHILD_SUBREAPER = 36


def kill_children() -> int:
    """SIGKILL every child of this process (the kernel's and the judge's launchers; each takes its PID
    namespace along). Children are read from /proc (the kernel's record, not a file learner code can write)."""
    me, killed = os.getpid(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    return killed


def _gradebook_retry(fn, tries: int = 20):
    from sqlalchemy.exc import OperationalError
    for i in range(tries):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc) or i == tries - 1:
                raise
            time.sleep(0.2 + 0.1 * i)


def kernel_socket_link(job: Job) -> Path:
    """A short path through which nbgrader and the kernel reach the kernel's unix sockets.

    A unix socket's path is limited to 107 bytes (``sun_path``) and the kernel's runtime folder sits deep
    in the grading folder (``<out>/scratch/<assignment>/<student>/kernel/runtime``): a long output path
    or student id made ZMQ fail with "File name too long". The sockets stay in that folder (hidden from
    every other sandbox: through this link a classmate's kernel finds only the empty cover); the link,
    ``/tmp/autograder-<random>``, only shortens the name. The worker removes it when it is done."""
    import secrets
    import tempfile

    target = layout.kernel_dir(Path(job.scratch)) / "runtime"
    base = Path("/tmp") if os.access("/tmp", os.W_OK) else Path(tempfile.gettempdir())
    for _ in range(100):
        link = base / f"autograder-{secrets.token_hex(6)}"
        try:
            os.symlink(target, link)
            return link
        except FileExistsError:
            continue
    raise RuntimeError(f"could not make a socket link in {base}")


def _config(job: Job, sockets: Path | None = None):
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    here = Path(__file__).resolve().parent
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(here)).load_config()
    extra = Config()
    extra.CourseDirectory.root = job.course_root
    extra.CourseDirectory.source_directory = job.source_dir
    extra.CourseDirectory.release_directory = "release"
    extra.CourseDirectory.db_url = job.db_url
    extra.Execute.timeout = job.cell_timeout
    extra.Execute.kernel_name = "autograder-sandbox"
    extra.Execute.startup_timeout = 120
    # nbgrader raises on a late output (raise_on_iopub_timeout); nbclient's 4 s fail a loaded machine
    extra.Execute.iopub_timeout = max(30, job.cell_timeout // 4)
    extra.KernelManager.transport = "ipc"     # unix sockets in the kernel's runtime folder: it has no network
    extra.KernelManager.ip = str((sockets or layout.kernel_dir(Path(job.scratch)) / "runtime") / "kernel")
    cfg.merge(extra)
    return cfg


def kernel_plan(job: Job, sockets: Path | None = None) -> sandbox.Plan:
    """The kernel sees its own sandbox folder (writable; its working folder is in it), the read-only
    caches, the Python installation and the repository (hidden tests import lora_ref in the kernel: the
    judge, not the kernel, decides what counts). Hidden: the grading folder (gradebook, autograded copies,
    other submissions, reference outputs), the instructor's notebooks, the submissions, and
    :data:`~autograder.sandbox.PRIVATE_ROOTS` (``/tmp``, ``/home``, ...: other kernels' socket links, the
    grader's home). ``sockets``, the kernel's short socket link (:func:`kernel_socket_link`), is made again
    inside the ``/tmp`` cover."""
    kernel = layout.kernel_dir(Path(job.scratch))
    repo = str(Path(__file__).resolve().parents[1])
    expose = [p for p in (job.mpl_cache, job.model_cache) if p] + sandbox.python_paths() + [repo]
    links = {str(sockets): str(kernel / "runtime")} if sockets else {}
    return sandbox.Plan(writable=[str(kernel)], hidden=[job.out, job.source_dir, *job.hidden, *sandbox.PRIVATE_ROOTS],
                        expose=expose, cwd=str(kernel / "work"), links=links)


def _env(job: Job, sockets: Path | None = None) -> None:
    """Environment inherited by the kernel: its sandbox plan, where it may write, its limits, quiet caches."""
    kernel = layout.kernel_dir(Path(job.scratch))
    for sub in layout.KERNEL_SUBDIRS:
        (kernel / sub).mkdir(parents=True, exist_ok=True)
    layout.kernel_startup_error(kernel).unlink(missing_ok=True)
    os.environ.update({
        "AUTOGRADER_SCRATCH": str(kernel), "AUTOGRADER_PLAN": kernel_plan(job, sockets).to_env(),
        "AUTOGRADER_ISOLATION": sandbox.NAMESPACES if job.isolation == sandbox.NAMESPACES else "none",
        "HOME": str(kernel / "home"), "TMPDIR": str(kernel / "tmp"),
        "IPYTHONDIR": str(kernel / "ipython"), "MPLCONFIGDIR": job.mpl_cache or str(kernel / "mpl"),
        "XDG_CACHE_HOME": str(kernel / "cache"), "JUPYTER_RUNTIME_DIR": str(kernel / "runtime"),
        "JUPYTER_PATH": os.pathsep.join([job.jupyter_path, *sandbox.extra_jupyter_paths()]),
        "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
        "AUTOGRADER_OUTPUT_BYTES": str(job.output_bytes),
        "TORCHINDUCTOR_CACHE_DIR": str(kernel / "cache" / "torchinductor"),
        "TRITON_CACHE_DIR": str(kernel / "cache" / "triton"),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        **job.limits.as_env(),
    })
    os.environ.pop("AUTOGRADER_HIDDEN", None)
    if job.model_cache:
        os.environ["LORA_REF_CACHE"] = job.model_cache   # read-only in the sandbox; built by the grader


# -- stages -------------------------------------------------------------------------------------------------

def stage_judge(job: Job, result: Result, answers: list[dict]) -> None:
    """1. The answer cells, alone, in the sandboxed harness, against the run's secret cases."""
    from autograder import judge
    log, deaths = judge.run_judge(answers, job.exercises, Path(job.reference), layout.judge_dir(Path(job.scratch)),
                                  limits=job.limits, cell_timeout=job.cell_timeout, judge_timeout=job.judge_timeout,
                                  hidden=[job.out, job.source_dir, *job.hidden],
                                  isolated=job.isolation == sandbox.NAMESPACES)
    # no kill_children() here: nbgrader's kernel may be running beside the judge (see grade())
    result.judge_cells = {g: e for g, e in log.get("cells", {}).items() if e != "ok"}
    result.judge_deaths = deaths
    result.patched = log.get("patched", [])
    result.containment = log.get("containment") or result.containment
    for ex_id, o in judge.verdicts(job.exercises, log, Path(job.reference)).items():
        if deaths and log.get("stage") != "done" and not o.passed:
            o.error = f"{deaths[-1]}; {o.error}" if o.error else deaths[-1]
        result.judge[ex_id] = o


def stage_autograde(job: Job, result: Result, cfg, settle=lambda: None) -> bool:
    """2. nbgrader autograde in this process, the kernel sandboxed; retry past cells that kill it.
    ``settle`` is called before each clean-up that kills this worker's children (the judge running
    beside this stage is waited for first)."""
    from nbgrader.converters import Autograde
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log

    kernel = layout.kernel_dir(Path(job.scratch))
    set_manual(job, job.previous_withdrawals, None)
    skip: list[str] = []
    log = ""
    for _ in range(MAX_CRASHES + 1):
        layout.kernel_progress(kernel).unlink(missing_ok=True)
        os.environ["AUTOGRADER_SKIP"] = json.dumps(skip)      # not a file: the kernel's folder is the learner's
        coursedir = CourseDirectory(config=cfg)
        coursedir.assignment_id, coursedir.student_id = job.assignment, job.student
        app = Autograde(coursedir=coursedir, config=cfg)
        app.force, app.create_student = True, True
        out = capture_log(app)
        log = out.get("log", "") + out.get("error", "")
        layout.autograde_log(Path(job.scratch)).write_text(log)
        settle()
        kill_children()
        if out.get("success"):
            return True
        if "DeadKernelError" not in log and "Kernel died" not in log:
            break
        try:
            progress = json.loads(layout.read_small(layout.kernel_progress(kernel), 10_000) or "{}")
        except json.JSONDecodeError:
            progress = {}
        sha = str(progress.get("sha", ""))[:40]
        first = str(progress.get("source") or "").strip().splitlines()[:1]
        result.crashes.append(f"the kernel died while running the cell starting {first[0][:80]!r}" if first
                              else "the kernel died before running any cell")
        if not sha or sha in skip:
            break
        skip.append(sha)
    result.status = "error"
    tail = [l for l in log.splitlines() if "Error" in l or "error" in l][-3:]
    result.notes.append("nbgrader could not grade this notebook" + (": " + " | ".join(t.strip()[:200] for t in tail) if tail else ""))
    startup = layout.read_small(layout.kernel_startup_error(kernel), 2000).strip()
    if startup:            # a grader-side failure (the sandbox could not be built), not the learner's
        result.notes.append(f"the grading kernel failed to start: {startup}")
    return False


def stage_withdraw(job: Job, result: Result, ok: bool) -> None:
    """3. Scores from the gradebook; a test cell whose exercises the judge failed loses its points."""
    scores = gradebook_scores(job) if ok else {}
    course = Path(job.course_root)
    errors = notebook_errors(course / "autograded" / job.student / job.assignment / f"{job.assignment}.ipynb")
    withdrawn = []
    for gid, points in job.test_points.items():
        s = scores.get(gid, {})
        exercises = job.exercises_of.get(gid, [])
        failed = [e for e in exercises if not (result.judge.get(e) and result.judge[e].passed)]
        auto = s.get("auto") or 0.0
        cell = CellScore(score=auto, max=points, error=errors.get(gid, ""), exercises=exercises)
        if auto > 0 and failed:
            cell.score, cell.withdrawn = 0.0, True
            reason = "; ".join(f"{e}: {result.judge[e].error if e in result.judge else 'not judged'}" for e in failed)
            withdrawn.append(gid)
            result.audit.withdrawn.append(
                f"{gid}: passed in the notebook ({auto:g}/{points:g}) but the clean-process judge failed {reason}")
            if not cell.error and failed[0] in result.judge:
                cell.error = f"judge: {result.judge[failed[0]].error}"
        result.cells[gid] = cell
    set_manual(job, withdrawn, 0.0)
    result.withdrawn = withdrawn
    manual = {gid: s for gid, s in scores.items() if gid not in job.test_points}
    result.nbgrader_score = sum((s.get("auto") or 0.0) for s in scores.values())
    result.score = sum(c.score for c in result.cells.values()) + sum((s.get("score") or 0.0) for s in manual.values())
    result.manual_pending = sorted(manual)


def stage_audit(job: Job, result: Result, answers: list[dict]) -> None:
    """4. Evidence: static scan of the answer cells and what the sandboxes recorded (integrity does not
    depend on it: the judge's verdicts do)."""
    from autograder import audit
    findings = audit.scan([(a["grade_id"], a["source"]) for a in answers])
    result.audit.static = [str(f) for f in findings]
    runtime = []
    for where, folder in layout.audit_folders(Path(job.scratch)).items():
        for rec in sandbox.read_audit_log(folder):
            runtime.append(f"{where}: {rec.get('kind')}: {rec.get('detail')}")
    runtime += [f"judge: {p}" for p in result.patched]
    result.audit.runtime = runtime
    high = any(f.severity == "high" for f in findings)
    if result.withdrawn or result.patched or any(": write_outside:" in r or ": blocked_" in r for r in runtime):
        result.audit.flag = "integrity"
    elif high or findings or runtime:
        result.audit.flag = "review"
    if result.containment != sandbox.NAMESPACES:
        result.notes.append(f"isolation: {result.containment or job.isolation}")


def stage_feedback(job: Job, result: Result, cfg) -> None:
    """5. Feedback HTML without hidden tests; if a line of a hidden test shows up anyway (learner code
    printed it), the page is withheld and the submission flagged."""
    try:
        result.feedback, result.hidden_leaks = feedback(job, cfg)
        if result.feedback and result.hidden_leaks:
            Path(result.feedback).write_text("<html><body><p>Feedback withheld: the notebook's outputs reproduce "
                                             "hidden tests. Ask your instructor.</p></body></html>")
            result.audit.flag = "integrity"
            result.audit.runtime.append(f"kernel: hidden test lines printed into the outputs ({len(result.hidden_leaks)})")
        elif result.feedback:
            add_judge_section(Path(result.feedback), result)
    except Exception as exc:  # noqa: BLE001 - feedback is a convenience; the grade stands
        result.notes.append(f"feedback HTML failed: {exc}")


def notebook_errors(path: Path) -> dict[str, str]:
    """grade_id -> first line of the error shown by each failing graded cell of an autograded notebook."""
    import nbformat

    errors = {}
    if not path.exists():
        return errors
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if not gid or cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                evalue = re.sub(r"\x1b\[[0-9;]*m", "", str(out.get("evalue", ""))).strip().splitlines()
                errors[gid] = f"{out.get('ename')}: {evalue[0][:200]}" if evalue else str(out.get("ename"))
                break
    return errors


def gradebook_scores(job: Job) -> dict[str, dict]:
    from nbgrader.api import Gradebook, MissingEntry

    def read():
        with Gradebook(job.db_url, job.course_id) as gb:
            try:
                nb = gb.find_submission_notebook(job.assignment, job.assignment, job.student)
            except MissingEntry:
                return {}
            return {g.name: {"auto": g.auto_score, "manual": g.manual_score, "max": g.max_score,
                             "score": g.score} for g in nb.grades}
    return _gradebook_retry(read)


def set_manual(job: Job, grade_ids: list[str], value: float | None) -> None:
    from nbgrader.api import Gradebook, MissingEntry

    def write():
        with Gradebook(job.db_url, job.course_id) as gb:
            for gid in grade_ids:
                try:
                    g = gb.find_grade(gid, job.assignment, job.assignment, job.student)
                except MissingEntry:
                    continue
                g.manual_score = value
                g.needs_manual_grade = False
            gb.db.commit()
    if grade_ids:
        _gradebook_retry(write)


def feedback(job: Job, cfg) -> tuple[str, list[str]]:
    from nbgrader.converters import GenerateFeedback
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log
    from traitlets.config import Config

    extra = Config()
    extra.HTMLExporter.template_name = "feedback"
    cfg = cfg.copy()
    cfg.merge(extra)
    coursedir = CourseDirectory(config=cfg)
    coursedir.assignment_id, coursedir.student_id = job.assignment, job.student
    app = GenerateFeedback(coursedir=coursedir, config=cfg)
    app.force = True
    out = capture_log(app)
    path = Path(job.course_root) / "feedback" / job.student / job.assignment / f"{job.assignment}.html"
    if not out.get("success") or not path.exists():
        # said, not swallowed: a machine whose nbconvert cannot find its templates wrote no page for anyone
        why = (out.get("error") or out.get("log") or "no page written").strip().splitlines()
        raise RuntimeError(why[-1][:300] if why else "no page written")
    text = html.unescape(TAG.sub("", path.read_text(errors="replace")))
    leaks = [line for line in job.hidden_lines if line in text]
    return str(path), leaks


def add_judge_section(path: Path, result: Result) -> None:
    """Put the judge's verdicts at the top of the feedback page, so a withdrawn test cell (shown as
    0 points although it ran without error) is explained. The messages name the case and the output
    that differs, never hidden-test code."""
    rows = []
    for ex_id, o in sorted(result.judge.items()):
        verdict = "passed" if o.passed else f"failed: {html.escape(o.error[:400])}"
        rows.append(f"<li><code>{html.escape(ex_id)}</code> ({o.cases_passed}/{o.cases} cases) {verdict}</li>")
    withdrawn = "".join(f"<li>{html.escape(w.split(':', 1)[0])}: points withdrawn, see the checks above</li>"
                        for w in result.audit.withdrawn)
    block = ('<div class="autograder-judge" style="border:1px solid #888;padding:8px;margin:8px">'
             "<b>Checks run outside your notebook</b> (your answer cells alone, in a fresh process, against the "
             f"reference):<ul>{''.join(rows)}</ul>" + (f"<ul>{withdrawn}</ul>" if withdrawn else "") + "</div>")
    text = path.read_text()
    m = re.search(r"<body[^>]*>", text)
    if m:
        path.write_text(text[:m.end()] + block + text[m.end():])


def _watchdog(seconds: float) -> threading.Event:
    """At the submission's time limit, end every sandbox this worker started (their whole PID namespaces)."""
    fired = threading.Event()

    def loop() -> None:
        if not fired.wait(seconds):
            fired.set()
            while True:
                kill_children()
                time.sleep(0.5)
    threading.Thread(target=loop, name="autograder-watchdog", daemon=True).start()
    return fired


def grade(job: Job) -> Result:
    """Grade one submission: judge, autograde, withdraw, audit, feedback (see the module docstring).

    ``job`` comes from the grading run (:func:`autograder.grade.grade`); the returned Result is complete
    even when a stage failed (its notes say which). Learner code runs only in sandboxes this process
    started; they are all gone when this returns."""
    from autograder.course import answer_cells
    import nbformat

    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)    # orphans of our sandboxes come back to us
    watchdog = _watchdog(max(10.0, job.submission_timeout - 15))
    t0 = time.time()
    submitted = Path(job.course_root) / "submitted" / job.student / job.assignment / f"{job.assignment}.ipynb"
    result = Result(student=job.student, assignment=job.assignment, original=job.original, notes=list(job.notes),
                    max_score=job.max_score, containment=job.isolation)
    judge, sockets = None, None
    try:
        sockets = kernel_socket_link(job)
        _env(job, sockets)
        answers = answer_cells(nbformat.read(str(submitted), as_version=4))
        judge = _JudgeThread(job, result, answers)
        judge.start()
        cfg = _config(job, sockets)
        t1 = time.time()
        ok = stage_autograde(job, result, cfg, settle=judge.settle)
        result.timings["autograde"] = round(time.time() - t1, 1)
        judge.settle()
        result.timings["judge"] = judge.seconds
        result.timings["judge_and_autograde_wall"] = round(time.time() - t0, 1)
        stage_withdraw(job, result, ok)
        stage_audit(job, result, answers)
        if ok:
            stage_feedback(job, result, cfg)
    finally:
        if judge is not None and judge.ident is not None:
            judge.join()
        kill_children()
        if sockets is not None:
            sockets.unlink(missing_ok=True)
    if watchdog.is_set():
        result.status = "timeout"
        result.notes.append(f"ran past the per-submission time limit ({job.submission_timeout} s); its sandboxes were ended")
    watchdog.set()
    result.seconds = round(time.time() - t0, 1)
    result.timings["rest"] = round(result.seconds - result.timings.get("judge_and_autograde_wall", 0.0), 1)
    return result


class _JudgeThread(threading.Thread):
    """Stage 1 beside stage 2. ``settle()`` waits for it and re-raises what it raised, once."""

    def __init__(self, job: Job, result: Result, answers: list[dict]):
        super().__init__(name="autograder-judge", daemon=True)
        self.job, self.result, self.answers = job, result, answers
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t = time.time()
        try:
            stage_judge(self.job, self.result, self.answers)
        except BaseException as exc:  # noqa: BLE001 - handed to the worker's thread by settle()
            self.error = exc
        self.seconds = round(time.time() - t, 1)

    def settle(self) -> None:
        if self.ident is not None:
            self.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def main() -> None:
    from autograder.course import register_extra_exercises
    register_extra_exercises()
    job = Job.read(Path(sys.argv[1]))
    try:
        result = grade(job)
    except Exception as exc:  # noqa: BLE001 - the batch must go on; the result says what happened
        import traceback
        result = Result.error(f"grader error: {type(exc).__name__}: {exc}", job=job,
                              traceback=traceback.format_exc()[-3000:])
    result.write(Path(job.result_path))


if __name__ == "__main__":
    main()
