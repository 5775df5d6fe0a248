"""Grade one submission, start to finish, in its own process: ``python -m autograder.worker JOB.json``.

The grading run starts one worker per submission (``--jobs`` at a time) in a new session and kills
the session (and, through the kernel's pid file, the kernel's) when the submission exceeds its wall
time. The worker never executes learner code itself; learner code runs only in the sandboxed kernel
and the sandboxed judge. Steps, each of which turns a failure into a line of the result, never into a
lost submission:

1. judge: ``python -m autograder.judge run`` on the answer cells (see :mod:`autograder.judge`);
2. ``nbgrader autograde`` (in process, with the course's gradebook; the kernel is the sandbox kernel).
   If the kernel dies, the cell it was running is skipped on a retry (at most ``MAX_CRASHES`` times);
3. verdicts: the judge's outputs against the reference outputs; a test cell that checks an exercise the
   judge failed loses its points (``manual_score = 0`` in the gradebook, so nbgrader's own export and
   feedback agree); withdrawals from a previous run of this student are cleared first (idempotent);
4. audit: static scan of the answer cells + what the kernel and the judge recorded at run time;
5. feedback HTML without hidden tests, checked for leaked hidden-test lines;
6. ``<out>/results/<assignment>/<student>.json``.
"""
from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

MAX_CRASHES = 3
TAG = re.compile(r"<[^>]+>")


def _gradebook_retry(fn, tries: int = 20):
    from sqlalchemy.exc import OperationalError
    for i in range(tries):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc) or i == tries - 1:
                raise
            time.sleep(0.2 + 0.1 * i)


def _config(job: dict):
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    here = Path(__file__).resolve().parent
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(here)).load_config()
    extra = Config()
    extra.CourseDirectory.root = job["course_root"]
    extra.CourseDirectory.source_directory = job["source_dir"]
    extra.CourseDirectory.release_directory = "release"
    extra.CourseDirectory.db_url = job["db_url"]
    extra.Execute.timeout = job["cell_timeout"]
    extra.Execute.kernel_name = "autograder-sandbox"
    extra.Execute.startup_timeout = 120
    cfg.merge(extra)
    return cfg


def _env(job: dict, scratch: Path) -> None:
    """Environment inherited by the kernel: where it may write, its limits, quiet caches."""
    for sub in ("home", "tmp", "ipython", "mpl", "cache", "runtime"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AUTOGRADER_SCRATCH": str(scratch), "HOME": str(scratch / "home"), "TMPDIR": str(scratch / "tmp"),
        "IPYTHONDIR": str(scratch / "ipython"), "MPLCONFIGDIR": job.get("mpl_cache") or str(scratch / "mpl"),
        "XDG_CACHE_HOME": str(scratch / "cache"), "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "JUPYTER_PATH": job["jupyter_path"], "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"]),
        "AUTOGRADER_OUTPUT_BYTES": str(job["output_bytes"]),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "cache" / "torchinductor"),
        "TRITON_CACHE_DIR": str(scratch / "cache" / "triton"),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        **{k: str(v) for k, v in job["limits_env"].items()},
    })
    os.environ["AUTOGRADER_HIDDEN"] = os.pathsep.join(job.get("hidden", []))
    if job.get("model_cache"):
        os.environ["LORA_REF_CACHE"] = job["model_cache"]   # read-only in the sandbox; built by the grader


def run_judge(job: dict, scratch: Path, answers: list[dict]) -> tuple[dict, list[str]]:
    """Run the judge; when its process dies in an answer cell or a case, run it again without that
    cell or case (at most MAX_CRASHES times), like the kernel's retry. Returns (log, what died)."""
    skip_cells: list[str] = []
    skip_cases: dict[str, list[int]] = {}
    deaths: list[str] = []
    patched: set[str] = set()
    for _ in range(MAX_CRASHES + 1):
        log, died = _judge_once(job, scratch, answers, skip_cells, skip_cases)
        patched |= set(log.get("patched", []))         # evidence from attempts that died is kept
        log["patched"] = sorted(patched)
        if not died:
            return log, deaths
        deaths.append(died)
        running = [g for g, v in log.get("cells", {}).items() if v == "running"]
        cases = [(e, v["running"]) for e, v in log.get("cases", {}).items() if isinstance(v, dict) and "running" in v]
        if log.get("stage") == "answers" and running:
            skip_cells.append(running[0])
        elif log.get("stage") == "cases" and cases:
            skip_cases.setdefault(cases[0][0], []).append(cases[0][1])
        else:
            return log, deaths
    return log, deaths


def _judge_once(job: dict, scratch: Path, answers: list[dict], skip_cells: list[str],
                skip_cases: dict[str, list[int]]) -> tuple[dict, str]:
    judge_dir = scratch / "judge"
    work = judge_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    for f in ("judge.json", "outputs.safetensors"):
        (judge_dir / f).unlink(missing_ok=True)
    spec = {"work": str(work), "scratch": str(judge_dir), "limits": job["limits"], "answer_cells": answers,
            "exercises": job["exercises"], "cell_timeout": job["cell_timeout"],
            "case_timeout": job["cell_timeout"], "blocked_reads": job["blocked_reads"],
            "skip_cells": skip_cells, "skip_cases": skip_cases}
    (judge_dir / "job.json").write_text(json.dumps(spec))
    env = dict(os.environ, HOME=str(work), TMPDIR=str(work), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(work / "torchinductor"), TRITON_CACHE_DIR=str(work / "triton"))
    died = ""
    with open(judge_dir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "autograder.judge", "run", str(judge_dir / "job.json")],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=job["judge_timeout"])
            if rc != 0:
                died = f"the judge process died with {_exit_text(rc)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            died = f"the judge ran past its time limit ({job['judge_timeout']} s)"
    log_path = judge_dir / "judge.json"
    try:
        log = json.loads(log_path.read_text())
    except (OSError, json.JSONDecodeError):
        log = {}
    if died:
        running = [g for g, v in log.get("cells", {}).items() if v == "running"]
        cases = [f"{e} case {v['running']}" for e, v in log.get("cases", {}).items()
                 if isinstance(v, dict) and "running" in v]
        where = (f" while running answer cell {running[0]}" if running and log.get("stage") == "answers" else
                 f" while running {cases[0]}" if cases else f" during stage {log.get('stage', 'setup')!r}")
        died += where
    return log, died


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def autograde(job: dict, cfg, scratch: Path) -> tuple[bool, list[str], str]:
    """nbgrader autograde in this process; retry past cells that kill the kernel."""
    from nbgrader.converters import Autograde
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log

    crashes: list[str] = []
    skip: list[str] = []
    log = ""
    for _ in range(MAX_CRASHES + 1):
        for f in ("progress.json", "kernel.pid"):
            (scratch / f).unlink(missing_ok=True)
        (scratch / "skip.json").write_text(json.dumps(skip))
        coursedir = CourseDirectory(config=cfg)
        coursedir.assignment_id, coursedir.student_id = job["assignment"], job["student"]
        app = Autograde(coursedir=coursedir, config=cfg)
        app.force, app.create_student = True, True
        result = capture_log(app)
        log = result.get("log", "") + result.get("error", "")
        _kill_kernel(scratch)
        if result.get("success"):
            return True, crashes, log
        if "DeadKernelError" not in log and "Kernel died" not in log:
            return False, crashes, log
        try:
            progress = json.loads((scratch / "progress.json").read_text())
        except (OSError, json.JSONDecodeError):
            progress = {}
        sha = progress.get("sha")
        first = (progress.get("source") or "").strip().splitlines()[:1]
        crashes.append(f"the kernel died while running the cell starting {first[0][:80]!r}" if first
                       else "the kernel died before running any cell")
        if not sha or sha in skip:
            return False, crashes, log
        skip.append(sha)
    return False, crashes, log


def _kill_kernel(scratch: Path) -> None:
    try:
        pid = int((scratch / "kernel.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


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


def gradebook_scores(job: dict) -> dict[str, dict]:
    from nbgrader.api import Gradebook, MissingEntry

    def read():
        with Gradebook(job["db_url"], job["course_id"]) as gb:
            try:
                nb = gb.find_submission_notebook(job["assignment"], job["assignment"], job["student"])
            except MissingEntry:
                return {}
            return {g.name: {"auto": g.auto_score, "manual": g.manual_score, "max": g.max_score,
                             "score": g.score} for g in nb.grades}
    return _gradebook_retry(read)


def set_manual(job: dict, grade_ids: list[str], value: float | None) -> None:
    from nbgrader.api import Gradebook, MissingEntry

    def write():
        with Gradebook(job["db_url"], job["course_id"]) as gb:
            for gid in grade_ids:
                try:
                    g = gb.find_grade(gid, job["assignment"], job["assignment"], job["student"])
                except MissingEntry:
                    continue
                g.manual_score = value
                g.needs_manual_grade = False
            gb.db.commit()
    if grade_ids:
        _gradebook_retry(write)


def feedback(job: dict, cfg) -> tuple[str, list[str]]:
    from nbgrader.converters import GenerateFeedback
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log
    from traitlets.config import Config

    extra = Config()
    extra.HTMLExporter.template_name = "feedback"
    cfg = cfg.copy()
    cfg.merge(extra)
    coursedir = CourseDirectory(config=cfg)
    coursedir.assignment_id, coursedir.student_id = job["assignment"], job["student"]
    app = GenerateFeedback(coursedir=coursedir, config=cfg)
    app.force = True
    result = capture_log(app)
    path = Path(job["course_root"]) / "feedback" / job["student"] / job["assignment"] / f"{job['assignment']}.html"
    if not result.get("success") or not path.exists():
        return "", []
    text = html.unescape(TAG.sub("", path.read_text(errors="replace")))
    leaks = [line for line in job["hidden_lines"] if line in text]
    return str(path), leaks


def add_judge_section(path: Path, result: dict) -> None:
    """Put the judge's verdicts at the top of the feedback page, so a withdrawn test cell (shown as
    0 points although it ran without error) is explained. The messages name the case and the output
    that differs, never hidden-test code."""
    rows = []
    for ex_id, o in sorted(result["judge"].items()):
        verdict = "passed" if o["passed"] else f"failed: {html.escape(o['error'][:400])}"
        rows.append(f"<li><code>{html.escape(ex_id)}</code> ({o['cases_passed']}/{o['cases']} cases) {verdict}</li>")
    withdrawn = "".join(f"<li>{html.escape(w.split(':', 1)[0])}: points withdrawn, see the checks above</li>"
                        for w in result["audit"]["withdrawn"])
    block = ('<div class="autograder-judge" style="border:1px solid #888;padding:8px;margin:8px">'
             "<b>Checks run outside your notebook</b> (your answer cells alone, in a fresh process, against the "
             f"reference):<ul>{''.join(rows)}</ul>" + (f"<ul>{withdrawn}</ul>" if withdrawn else "") + "</div>")
    text = path.read_text()
    m = re.search(r"<body[^>]*>", text)
    if m:
        path.write_text(text[:m.end()] + block + text[m.end():])


def grade(job: dict) -> dict:
    from autograder import audit, judge
    from autograder.course import cell_kind
    import nbformat

    t0 = time.time()
    course = Path(job["course_root"])
    scratch = Path(job["scratch"])
    submitted = course / "submitted" / job["student"] / job["assignment"] / f"{job['assignment']}.ipynb"
    result = dict(student=job["student"], assignment=job["assignment"], original=job["original"],
                  status="graded", notes=list(job["notes"]), score=0.0, max_score=job["max_score"],
                  nbgrader_score=0.0, cells={}, judge={}, judge_cells={}, patched=[], crashes=[],
                  audit={"flag": "ok", "static": [], "runtime": [], "withdrawn": []}, feedback="", hidden_leaks=[])
    _env(job, scratch / "kernel")
    nb = nbformat.read(str(submitted), as_version=4)
    answers = [{"grade_id": c.metadata["nbgrader"]["grade_id"], "source": c.source}
               for c in nb.cells if cell_kind(c) == "answer" and c.cell_type == "code"]

    # 1. judge
    timings = result["timings"] = {}
    log, deaths = run_judge(job, scratch, answers)
    timings["judge"] = round(time.time() - t0, 1)
    result["judge_cells"] = {g: e for g, e in log.get("cells", {}).items() if e != "ok"}
    result["judge_deaths"] = deaths
    result["patched"] = log.get("patched", [])
    outcomes = judge.verdicts(job["exercises"], log, scratch / "judge" / "outputs.safetensors", Path(job["reference"]))
    for ex_id, o in outcomes.items():
        if deaths and log.get("stage") != "done" and not o.passed:
            o.error = f"{deaths[-1]}; {o.error}" if o.error else deaths[-1]
        result["judge"][ex_id] = o.__dict__

    # 2. autograde
    set_manual(job, job["previous_withdrawals"], None)
    cfg = _config(job)
    ok, crashes, log_text = autograde(job, cfg, scratch / "kernel")
    timings["autograde"] = round(time.time() - t0 - timings["judge"], 1)
    result["crashes"] = crashes
    if not ok:
        result["status"] = "error"
        tail = [l for l in log_text.splitlines() if "Error" in l or "error" in l][-3:]
        result["notes"].append("nbgrader could not grade this notebook" + (": " + " | ".join(t.strip()[:200] for t in tail) if tail else ""))

    # 3. scores and withdrawals
    scores = gradebook_scores(job) if ok else {}
    errors = notebook_errors(course / "autograded" / job["student"] / job["assignment"] / f"{job['assignment']}.ipynb")
    withdrawn = []
    for gid, points in job["test_points"].items():
        s = scores.get(gid, {})
        exercises = job["exercises_of"].get(gid, [])
        failed = [e for e in exercises if not result["judge"].get(e, {}).get("passed", False)]
        auto = s.get("auto") or 0.0
        cell = dict(score=auto, max=points, error=errors.get(gid, ""), exercises=exercises, withdrawn=False)
        if auto > 0 and failed:
            cell.update(score=0.0, withdrawn=True)
            reason = "; ".join(f"{e}: {result['judge'][e]['error']}" for e in failed)
            withdrawn.append(gid)
            result["audit"]["withdrawn"].append(
                f"{gid}: passed in the notebook ({auto:g}/{points:g}) but the clean-process judge failed {reason}")
            if not cell["error"]:
                cell["error"] = f"judge: {result['judge'][failed[0]]['error']}"
        result["cells"][gid] = cell
    set_manual(job, withdrawn, 0.0)
    result["withdrawn"] = withdrawn
    manual = {gid: s for gid, s in scores.items() if gid not in job["test_points"]}
    result["nbgrader_score"] = sum((s.get("auto") or 0.0) for gid, s in scores.items())
    result["score"] = sum(c["score"] for c in result["cells"].values()) + sum((s.get("score") or 0.0) for s in manual.values())
    result["manual_pending"] = sorted(manual)

    # 4. audit
    findings = audit.scan([(a["grade_id"], a["source"]) for a in answers])
    result["audit"]["static"] = [str(f) for f in findings]
    from autograder.sandbox import read_audit_log
    runtime = []
    for where, folder in (("kernel", scratch / "kernel"), ("judge", scratch / "judge")):
        for rec in read_audit_log(folder):
            runtime.append(f"{where}: {rec.get('kind')}: {rec.get('detail')}")
    runtime += [f"judge: {p}" for p in result["patched"]]
    result["audit"]["runtime"] = runtime
    high = any(f.severity == "high" for f in findings)
    if withdrawn or result["patched"] or any(": write_outside:" in r or ": blocked_" in r for r in runtime):
        result["audit"]["flag"] = "integrity"
    elif high or findings or runtime:
        result["audit"]["flag"] = "review"

    # 5. feedback
    if ok:
        try:
            result["feedback"], result["hidden_leaks"] = feedback(job, cfg)
            if result["feedback"]:
                add_judge_section(Path(result["feedback"]), result)
        except Exception as exc:  # noqa: BLE001 - feedback is a convenience; the grade stands
            result["notes"].append(f"feedback HTML failed: {exc}")
    result["seconds"] = round(time.time() - t0, 1)
    timings["rest"] = round(result["seconds"] - timings["judge"] - timings["autograde"], 1)
    return result


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["result_path"])
    try:
        result = grade(job)
    except Exception as exc:  # noqa: BLE001 - the batch must go on; the result says what happened
        import traceback
        result = dict(student=job["student"], assignment=job["assignment"], original=job["original"],
                      status="error", notes=list(job["notes"]) + [f"grader error: {type(exc).__name__}: {exc}"],
                      score=0.0, max_score=job["max_score"], traceback=traceback.format_exc()[-3000:])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(out)


if __name__ == "__main__":
    main()
