"""How fast is grading a class? Seconds per submission: plain nbgrader vs the autograder, 1 and N jobs.

    python benchmarks/grading_speed.py [--assignment 02_lora_linear] [--n 4] [--jobs 2] [--out benchmarks/grading_speed.json]
    python benchmarks/grading_speed.py --class-scale M [--workers 2]     # -> benchmarks/results/grading_class_cpu.json
    python benchmarks/grading_speed.py --model                          # print the cost model from the committed run
    python benchmarks/grading_speed.py --scaling 1,2,4,8 [--per-job 3] --out F.json   # --jobs N on a many-core machine

Scaling mode (``--scaling N1,N2,...``): does ``--jobs N`` grade N times as fast on N idle cores? A
machine of 2 cores cannot say, since at ``--jobs 1`` the judge already runs on the second core. On a
machine of many cores, each level N grades ``N x per-job`` submissions with ``--jobs N`` (the same work
per job at every level, so the run's fixed cost weighs the same), and reports throughput (submissions
per second) and its ratio to ``--jobs 1``'s; plain sequential ``nbgrader autograde`` of ``per-job``
submissions is measured in the same run for reference, and one untimed grading run warms the machine
first. Every submission is a solution, so a lost point or a missing feedback page stops the run (a broken set-up, not a timing:
on a machine with a CUDA build of torch, pass ``--extra=--memory-mb=N`` as the grader asks). The JSON is
written after every level.

Class-scale mode (``--class-scale M``): M mixed submissions (cycling through the built-in samples
``perfect``, ``forgot_scaling``, ``partial``, ``blank``) graded, in one run, by plain sequential
``nbgrader autograde``, by the autograder's local pool (``--jobs W``), and by a local Dask cluster of W
workers (``--cluster local:W``); then the same Dask command again, when every result is up to date,
which measures the coordinator's own cost (intake, ledger, reports) per submission. Where the time of
one submission goes is measured separately: ``import torch`` in a fresh interpreter, the start of the
sandbox kernel and of a plain ipykernel (to the first reply), and the worker's stages (judge,
autograde, feedback and audit). :func:`cost_model` turns these into hours for a course
(1,000 students x 10 notebooks) on 10 and 100 machines like this one.

In one run, on the same N submissions (the instructor's solutions pasted into the student copy, one
per student):

- ``nbgrader``: one plain ``nbgrader autograde A`` process grading every submission one after another
  (nbgrader's own way: no sandbox, no judge, no feedback);
- ``autograder_jobs1``: ``python -m autograder grade --jobs 1`` (sandbox, judge, audit, feedback, reports);
- ``autograder_jobsN``: the same with ``--jobs N``.

Reports seconds per submission for each, the autograder's overhead over nbgrader, and the parallel
speed-up (jobs1 / jobsN). The machine is shared, so the load average before and after is recorded too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_submissions(folder: Path, assignment: str, n: int) -> None:
    from autograder.samples import perfect
    student = nbformat.read(str(ROOT / "notebooks" / assignment / f"{assignment}.ipynb"), as_version=4)
    solution = nbformat.read(str(ROOT / "solutions" / assignment / f"{assignment}.ipynb"), as_version=4)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        nbformat.write(perfect(student, solution), str(folder / f"student{i:02d}_{assignment}.ipynb"))


def plain_nbgrader(tmp: Path, submissions: Path, assignment: str, timeout: int, feedback: bool = False):
    """nbgrader autograde, one process, all students in sequence (the generation step is not timed).

    With ``feedback``, also ``nbgrader generate_feedback`` (the feedback HTML a grading run of the
    autograder writes too): returns (autograde seconds, generate_feedback seconds)."""
    course = tmp / ("plain_feedback" if feedback else "plain")
    course.mkdir()
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    common = [f"--CourseDirectory.root={course}", f"--CourseDirectory.source_directory={ROOT / 'solutions'}",
              "--CourseDirectory.release_directory=release", "--log-level=ERROR"]
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--force", *common],
                          cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader generate_assignment failed:\n{proc.stderr[-3000:]}")
    for f in sorted(submissions.glob("*.ipynb")):
        dest = course / "submitted" / f.name.split("_")[0] / assignment
        dest.mkdir(parents=True)
        shutil.copy(f, dest / f"{assignment}.ipynb")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", assignment, "--force", *common,
                           f"--Execute.timeout={timeout}"], cwd=tmp, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader autograde failed:\n{proc.stderr[-3000:]}")
    if not feedback:
        return seconds
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "generate_feedback", assignment, "--force", *common],
                          cwd=tmp, env=env, capture_output=True, text=True)
    fb = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader generate_feedback failed:\n{proc.stderr[-3000:]}")
    return seconds, fb


def autograder(tmp: Path, submissions: Path, assignment: str, jobs: int, timeout: int, extra: list[str] = (),
               name: str | None = None) -> tuple[float, list[dict]]:
    out = tmp / (name or f"jobs{jobs}")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "autograder", "grade", str(submissions), "--assignment", assignment,
                           "--jobs", str(jobs), "--timeout", str(timeout), "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"autograder failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    results = [json.loads(p.read_text()) for p in sorted((out / "results" / assignment).glob("*.json"))]
    return seconds, results


CLASS_RESULT = ROOT / "benchmarks" / "results" / "grading_class_cpu.json"
MIX = ("perfect", "forgot_scaling", "partial", "blank")


def make_mixed(folder: Path, assignment: str, m: int) -> dict[str, str]:
    """M submissions cycling through MIX (each a built-in sample); returns student -> kind."""
    from autograder import samples
    every = folder.parent / "all_samples"
    samples.write_samples(every, ROOT / "solutions", [assignment])
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for i in range(m):
        kind = MIX[i % len(MIX)]
        src = next(p for p in every.glob(f"{kind}_*.ipynb"))
        student = f"s{i:03d}{kind.replace('_', '')}"
        shutil.copy(src, folder / f"{student}_{assignment}.ipynb")
        kinds[student] = kind
    return kinds


def _seconds(cmd: list[str], env=None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, env=env, check=True)
    return time.perf_counter() - t


def kernel_start(kernel: str, jupyter_path: str | None = None, repeat: int = 3) -> float:
    """Seconds from starting a kernel to its first kernel_info reply (median of ``repeat``).

    The sandbox kernel is started as a grading worker starts it: its own scratch folder
    (``AUTOGRADER_SCRATCH``, the only writable place inside the sandbox) and unix-socket transport in that
    folder's runtime directory, since the sandbox has no network."""
    from jupyter_client.manager import KernelManager

    from autograder import layout
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if jupyter_path:
        env["JUPYTER_PATH"] = jupyter_path
    old = os.environ.get("JUPYTER_PATH")
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="kernel_start_") as scratch:
            kw = {}
            if kernel == "autograder-sandbox":
                for sub in layout.KERNEL_SUBDIRS:
                    (Path(scratch) / sub).mkdir()
                env.update(AUTOGRADER_SCRATCH=scratch, HOME=str(Path(scratch) / "home"),
                           JUPYTER_RUNTIME_DIR=str(Path(scratch) / "runtime"))
                env.pop("AUTOGRADER_PLAN", None)    # default plan: only the scratch folder writable
                kw = {"transport": "ipc", "ip": str(Path(scratch) / "runtime" / "kernel")}
            if jupyter_path:
                os.environ["JUPYTER_PATH"] = jupyter_path   # where the kernelspec is looked up
            try:
                t = time.perf_counter()
                km = KernelManager(kernel_name=kernel, **kw)
                km.start_kernel(env=env)
                kc = km.client()
                kc.start_channels()
                kc.wait_for_ready(timeout=120)
                times.append(time.perf_counter() - t)
                kc.stop_channels()
                km.shutdown_kernel(now=True)
            finally:
                if old is None:
                    os.environ.pop("JUPYTER_PATH", None)
                else:
                    os.environ["JUPYTER_PATH"] = old
    return sorted(times)[len(times) // 2]


def overhead_breakdown(tmp: Path, course_root: Path) -> dict:
    """Fixed costs of one submission, each measured alone (median of 3)."""
    py = sys.executable
    torch_import = sorted(_seconds([py, "-c", "import torch"]) for _ in range(3))[1]
    bare = sorted(_seconds([py, "-c", "pass"]) for _ in range(3))[1]
    return {"python_start_s": round(bare, 2), "import_torch_s": round(torch_import - bare, 2),
            "kernel_start_plain_ipykernel_s": round(kernel_start("python3"), 2),
            "kernel_start_sandbox_s": round(kernel_start("autograder-sandbox", str(course_root)), 2)}


def _stage_means(results: list[dict]) -> dict:
    keys = sorted({k for r in results for k in r.get("timings", {})})
    return {k: round(sum(r["timings"].get(k, 0.0) for r in results) / len(results), 2) for k in keys}


PER_SUBMISSION_PHASES = ("intake_collect_s", "intake_store_s", "payloads_s", "collect_s")


def class_scale(args) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="grading_class_") as tmp:
        tmp = Path(tmp)
        subs = tmp / "submissions"
        kinds = make_mixed(subs, args.assignment, args.class_scale)
        plain = plain_nbgrader(tmp, subs, args.assignment, args.timeout)
        print(f"plain nbgrader autograde: {plain:.1f} s for {args.class_scale}", flush=True)
        pool, r_pool = autograder(tmp, subs, args.assignment, args.workers, args.timeout)
        print(f"autograder --jobs {args.workers}: {pool:.1f} s", flush=True)
        dask_s, r_dask = autograder(tmp, subs, args.assignment, args.workers, args.timeout,
                                    extra=["--cluster", f"local:{args.workers}"], name="dask")
        print(f"autograder --cluster local:{args.workers}: {dask_s:.1f} s", flush=True)
        # read before the rerun below writes its own (a run with nothing to grade: no dispatch, no collect)
        coord = json.loads((tmp / "dask" / "coordinator.json").read_text())
        tasks = [json.loads(p.read_text()) for p in sorted((tmp / "dask" / "scratch").glob("*/*/task.json"))]
        again, _ = autograder(tmp, subs, args.assignment, args.workers, args.timeout,
                              extra=["--cluster", f"local:{args.workers}"], name="dask")
        print(f"same command again (all up to date): {again:.1f} s", flush=True)
        # the coordinator's own work in the Dask run that grows with the class: intake, storing, payloads,
        # writing what came back (gradebook, files, result, ledger); once per run (start-up, the assignment's
        # gradebook template, references, reports) it is not per submission, and a large class hides it
        coord_busy = sum(coord.get(k, 0.0) for k in PER_SUBMISSION_PHASES)
        breakdown = overhead_breakdown(tmp, tmp / "dask" / "course")
    m = args.class_scale
    same = {r["student"]: (r["score"], r["status"]) for r in r_pool} == {r["student"]: (r["score"], r["status"]) for r in r_dask}
    return {
        "what": "benchmarks/grading_speed.py --class-scale: M mixed submissions of one assignment graded by plain "
                "sequential nbgrader autograde, the autograder's local pool, and a local Dask cluster, in one run",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "assignment": args.assignment, "submissions": m, "workers": args.workers, "cell_timeout": args.timeout,
        "mix": {k: sum(1 for v in kinds.values() if v == k) for k in MIX},
        "seconds_total": {"nbgrader_sequential": round(plain, 1), f"pool_jobs{args.workers}": round(pool, 1),
                          f"dask_local{args.workers}": round(dask_s, 1), "dask_rerun_up_to_date": round(again, 1)},
        "seconds_per_submission": {"nbgrader_sequential": round(plain / m, 2), f"pool_jobs{args.workers}": round(pool / m, 2),
                                   f"dask_local{args.workers}": round(dask_s / m, 2)},
        "dask_task_seconds_mean": round(sum(t["seconds"] for t in tasks) / len(tasks), 2) if tasks else None,
        # a task's time: waiting for its Dask worker's fork server (its start, on that worker's first task),
        # writing its private course, the worker process, reading back what it wrote
        "dask_task_split_mean": {k: round(sum(t[k] for t in tasks) / len(tasks), 2)
                                 for k in ("server_s", "setup_s", "worker_s", "after_s")} if tasks else None,
        "dask_task_server_s_max": max((t["server_s"] for t in tasks), default=None),
        "coordinator_seconds_per_submission": round(coord_busy / m, 3),
        "coordinator_phases_dask": coord,
        "stage_seconds_mean_pool": _stage_means(r_pool),
        "stage_seconds_mean_dask": _stage_means(r_dask),
        "overhead_breakdown": breakdown,
        "dask_equals_pool": same,
        "scores": {r["student"]: r["score"] for r in r_dask},
    }


def cost_model(run: dict, per_notebook: dict | None = None, students: int = 1000, machines=(10, 100)) -> dict:
    """Hours to grade ``students`` x the course's notebooks on N machines like the measuring one.

    T(N) = sum over notebooks of (plain nbgrader seconds of that notebook x the autograder's task/nbgrader
    ratio measured in ``run``) x students / (N x workers per machine) + coordinator seconds per submission x
    submissions. The per-notebook nbgrader seconds are the committed CI run's (one copy: half of
    ``seconds_both_copies``); the coordinator is one process, so its term does not shrink with N."""
    if per_notebook is None:
        committed = json.loads((ROOT / "benchmarks" / "results" / "notebook_grading_cpu.json").read_text())["notebooks"]
        per_notebook = {nb: round(v["seconds_both_copies"] / 2, 2) for nb, v in committed.items()}
    ratio = run["dask_task_seconds_mean"] / run["seconds_per_submission"]["nbgrader_sequential"]
    task_s = {nb: s * ratio for nb, s in per_notebook.items()}
    per_student = sum(task_s.values())
    subs = students * len(task_s)
    workers = run["workers"]
    coord = run["coordinator_seconds_per_submission"] * subs
    out = {"students": students, "notebooks": len(task_s), "submissions": subs,
           "task_over_nbgrader_ratio": round(ratio, 2), "task_seconds_per_student": round(per_student, 1),
           "workers_per_machine": workers, "coordinator_hours": round(coord / 3600, 2),
           "nbgrader_seconds_per_notebook": per_notebook, "hours": {}}
    for n in machines:
        out["hours"][str(n)] = round((per_student * students / (n * workers) + coord) / 3600, 2)
    return out


def _dask_split_text(run: dict) -> str:
    """Where a Dask task's time goes beyond its worker's, and where the Dask run's extra time over the pool's."""
    sp, w, tot, ph = run["dask_task_split_mean"], run["workers"], run["seconds_total"], run["coordinator_phases_dask"]
    extra = tot[f"dask_local{w}"] - tot[f"pool_jobs{w}"]
    per_chain = (run["dask_task_seconds_mean"] - sp["worker_s"]) * run["submissions"] / w
    return (f"Where the Dask run's {extra:+.1f} s against the pool's go: a task took {run['dask_task_seconds_mean']:g} s "
            f"on average, of which its worker process {sp['worker_s']:g} s; the rest is waiting for its Dask worker's "
            f"fork server ({sp['server_s']:g} s on average: the server starts with a worker's first task and makes it "
            f"wait up to {run['dask_task_server_s_max']:g} s, where the pool starts its one server while the run sets up), "
            f"writing the task's private course ({sp['setup_s']:g} s) and reading back what the worker wrote "
            f"({sp['after_s']:g} s): {per_chain:.1f} s on each of the {w} workers, one after another. Before any task, "
            f"{ph['templates_s']:g} s went to the gradebook template the tasks grade into (one per assignment; the pool "
            f"grades into the class gradebook); the other {extra - per_chain - ph['templates_s']:.1f} s are the "
            f"cluster's start and stop and whatever of the coordinator's collecting ({ph['collect_s']:g} s in all) "
            "did not overlap the tasks, not timed apart.")


README_START = "<!-- grading_class_cpu: generated by benchmarks/grading_speed.py --readme; do not edit -->"
README_END = "<!-- end grading_class_cpu -->"


def readme_text(run: dict) -> str:
    """The README's class-scale paragraph, rendered from the committed run (tests compare the two)."""
    sps, tot, bd, model = run["seconds_per_submission"], run["seconds_total"], run["overhead_breakdown"], run["cost_model"]
    w = run["workers"]
    stages = ", ".join(f"{k} {v:g} s" for k, v in run["stage_seconds_mean_pool"].items())
    phases = ", ".join(f"{k[:-2].replace('_', ' ')} {run['coordinator_phases_dask'].get(k, 0):g} s" for k in PER_SUBMISSION_PHASES)
    lines = [
        README_START,
        f"Class-scale run ({run['date'][:10]}, {run['machine']['cpus']}-core {run['machine']['cpu']}, load average "
        f"{run['machine']['load_avg_before'][0]:g} before / {run['machine']['load_avg_after'][0]:g} after: a shared "
        f"machine), {run['submissions']} mixed submissions of {run['assignment']} "
        f"({', '.join(f'{n} {k}' for k, n in run['mix'].items())}), `benchmarks/results/grading_class_cpu.json`:",
        "",
        "| mode | total s | s / submission |",
        "| --- | --- | --- |",
        f"| plain `nbgrader autograde`, sequential | {tot['nbgrader_sequential']:g} | {sps['nbgrader_sequential']:g} |",
        f"| autograder, local pool `--jobs {w}` | {tot[f'pool_jobs{w}']:g} | {sps[f'pool_jobs{w}']:g} |",
        f"| autograder, `--cluster local:{w}` (Dask) | {tot[f'dask_local{w}']:g} | {sps[f'dask_local{w}']:g} |",
        f"| the Dask command again, all up to date (start-up, intake, reports) | {tot['dask_rerun_up_to_date']:g} | "
        f"{tot['dask_rerun_up_to_date'] / run['submissions']:.2f} |",
        "",
        f"Dask results equal the pool's: {run['dask_equals_pool']}. One Dask task took {run['dask_task_seconds_mean']:g} s "
        f"on average (worker stages, pool run: {stages}); the coordinator's own work that grows with the class (intake, storing, payloads, "
        f"writing what came back: {phases}) "
        f"was {run['coordinator_seconds_per_submission']:g} s per submission. Fixed costs of one submission, measured alone: Python "
        f"start {bd['python_start_s']:g} s, `import torch` {bd['import_torch_s']:g} s (paid by the kernel and by "
        f"the judge's harness, each a fresh process), kernel start to first reply {bd['kernel_start_plain_ipykernel_s']:g} s "
        f"for a plain ipykernel and {bd['kernel_start_sandbox_s']:g} s for the sandbox kernel.",
        *([] if not run.get("dask_task_split_mean") else ["", _dask_split_text(run)]),
        "",
        f"Cost model (`cost_model`): a course of {model['students']:,} students x {model['notebooks']} notebooks = "
        f"{model['submissions']:,} submissions; per student {model['task_seconds_per_student']:g} s of worker time (the "
        f"committed plain-nbgrader seconds of each notebook x the measured task/nbgrader ratio "
        f"{model['task_over_nbgrader_ratio']:g}), {model['workers_per_machine']} workers per machine like this one, plus "
        f"{model['coordinator_hours']:g} h of coordinator time (one process; it does not shrink with machines): "
        + "; ".join(f"**{h:g} h on {n} machines**" for n, h in model["hours"].items()) + ".",
        README_END,
    ]
    return "\n".join(lines)


SPEED_RESULT = ROOT / "benchmarks" / "grading_speed.json"
SPEED_START = "<!-- grading_speed: generated by benchmarks/grading_speed.py --readme; do not edit -->"
SPEED_END = "<!-- end grading_speed -->"


def speed_text(run: dict) -> str:
    """The README's paragraph on the default mode's committed run (tests compare the two)."""
    sps, st, m = run["seconds_per_submission"], run["stage_seconds_mean_jobs1"], run["machine"]
    j = run["jobs"]
    return "\n".join([
        SPEED_START,
        f"Committed run ({run['date'][:10]}, {m['cpus']}-core {m['cpu']}, load average {m['load_avg_before'][0]:g} "
        f"before / {m['load_avg_after'][0]:g} after), {run['submissions']} submissions of {run['assignment']} "
        f"(scores {', '.join(run['scores'])}; all graded: {run['all_graded']}), `benchmarks/grading_speed.json`: "
        f"plain sequential `nbgrader autograde` {sps['nbgrader']:g} s/submission (then `nbgrader generate_feedback` "
        f"{run['seconds_nbgrader_generate_feedback'] / run['submissions']:.1f} s); autograder `--jobs 1` "
        f"{sps['autograder_jobs1']:g} s (x{run['overhead_vs_nbgrader_jobs1']:g} of plain `autograde`, "
        f"x{run['overhead_vs_nbgrader_with_feedback_jobs1']:g} of `autograde` + `generate_feedback`, the same "
        f"artefacts; mean stages: "
        f"judge {st['judge']:g} s beside autograde {st['autograde']:g} s, then {st['rest']:g} s of withdrawals, "
        f"audit and feedback); `--jobs {j}` {sps[f'autograder_jobs{j}']:g} s, a parallel speed-up of "
        f"{run['parallel_speedup']:g} over `--jobs 1` (x{run['speedup_vs_nbgrader']:g} plain nbgrader's speed).",
        SPEED_END,
    ])


SCALING_RESULTS = [ROOT / "benchmarks" / "results" / f"grading_scaling_{x}_h200.json" for x in ("a", "b")]
JOBS1_RESULT = ROOT / "benchmarks" / "results" / "grading_jobs1_h200.json"
SCALING_START = "<!-- grading_scaling: generated by benchmarks/grading_speed.py --readme; do not edit -->"
SCALING_END = "<!-- end grading_scaling -->"


def _fixed_seconds(run: dict) -> float:
    """A --jobs 1 level's seconds beyond its workers' (one after another): the command's own fixed cost."""
    one = run["levels"]["1"]
    st = one["stage_seconds_mean"]
    return one["seconds"] - one["submissions"] * (max(st["autograde"], st["judge"]) + st["rest"])


def scaling_text(runs: list[dict], jobs1: dict, speed: dict) -> str:
    """The README's paragraph on the committed --scaling runs (tests compare the two)."""
    m = runs[0]["machine"]
    levels = sorted({int(n) for r in runs for n in r["levels"]})
    names = [chr(ord("a") + i) for i in range(len(runs))]
    head = "| `--jobs N` | submissions | " + " | ".join(f"run {x}: s, speed-up (efficiency)" for x in names) + " |"
    rows = [head, "| --- " * (2 + len(runs)) + "|"]
    for n in levels:
        cells = []
        for r in runs:
            lv = r["levels"].get(str(n))
            cells.append("-" if lv is None else f"{lv['seconds']:g} s" + (
                f", x{lv['speedup_vs_jobs1']:g} ({lv['efficiency']:g})" if "speedup_vs_jobs1" in lv else ""))
        rows.append(f"| {n} | {runs[0]['levels'][str(n)]['submissions']} | " + " | ".join(cells) + " |")

    def vs_plain(r):
        one, plain = r["levels"]["1"], r["nbgrader_sequential"]
        # runs written before the warm-up was moved in front of plain nbgrader lack the ratio's key
        cold = "" if "over_nbgrader_sequential" in one else ", plain nbgrader before the warm-up run"
        return (f"{one['seconds']:g} s against plain nbgrader's {plain['seconds']:g} s for {plain['submissions']} "
                f"(x{one['seconds'] / plain['seconds']:.2f}{cold})")

    rest = max(lv["stage_seconds_mean"]["rest"] for r in runs + [jobs1] for lv in r["levels"].values())
    st = speed["stage_seconds_mean_jobs1"]
    caveat = ("" if rest > 0.5 else
              f" **Caveat: the stage after autograde (withdrawals, audit, feedback) took at most {rest:g} s there, "
              "most likely because no feedback page was written**: the packages were installed with `pip --target`, "
              "where nbconvert finds none of its templates, and a page not written was not reported (both fixed "
              "since: `sandbox.extra_jupyter_paths`, tested by `test_feedback_pages_find_the_templates_of_a_"
              "pythonpath_install`; a page not written is now a note in the result, and `--scaling` stops on it; "
              "these runs kept no result files to confirm the cause). In the committed 2-core run that stage took "
              f"{st['rest']:g} s of a submission's {speed['seconds_per_submission']['autograder_jobs1']:g} s: "
              "per-submission work on every level, so the ratios to plain nbgrader above are too low by about that "
              "much, and they need a rerun.")
    every = runs + [jobs1]
    loads = ", ".join(f"{r['machine']['load_avg_before'][0]:g}" for r in runs)
    dates = ", ".join(r["date"][:16].replace("T", " ") for r in runs)
    cmd = " ".join(["--scaling", ",".join(map(str, levels)), "--per-job", str(runs[0]["per_job"]),
                    *("--extra=" + e for e in runs[0]["extra_args"])])
    at1 = "; ".join(f"run {x} " + vs_plain(r) for x, r in zip(names, runs))

    def each(f):
        return ", ".join(f(r) for r in every)
    return "\n".join([
        SCALING_START,
        f"Scaling runs ({dates} UTC, {m['cpus']}-core {m['cpu']} of an H200 machine, load average {loads} before, "
        f"Python {m['python']}, torch of the machine's image, the other packages carried as wheels; `{cmd}`, "
        f"`benchmarks/results/grading_scaling_{{a,b}}_h200.json`), {runs[0]['assignment']}, every submission a "
        "solution graded in full:",
        "",
        *rows,
        "",
        f"At `--jobs 1`: {at1}; with {jobs1['levels']['1']['submissions']} submissions (`--scaling 1 --per-job "
        f"{jobs1['per_job']}`, `benchmarks/results/grading_jobs1_h200.json`) {vs_plain(jobs1)}. Per submission the "
        f"worker's autograde stage took {each(lambda r: format(r['levels']['1']['stage_seconds_mean']['autograde'], 'g'))} s "
        f"against plain nbgrader's {each(lambda r: format(r['nbgrader_sequential']['seconds_per_submission'], 'g'))} s "
        f"(the judge beside it: {each(lambda r: format(r['levels']['1']['stage_seconds_mean']['judge'], 'g'))} s); "
        f"the rest of the command, {each(lambda r: format(_fixed_seconds(r), '.0f'))} s, is its fixed cost (start-up, "
        "the release and reference outputs, the fork server's imports, reports), paid once per command and not per "
        "submission: small batches pay it in full." + caveat + _scaling_reading(runs, jobs1, rest),
        SCALING_END,
    ])


def _scaling_reading(runs: list[dict], jobs1: dict, rest: float) -> str:
    """What the committed runs say together: computed here, so that a new run rewrites it."""
    every = runs + [jobs1]
    lows = [lv["stage_seconds_mean"]["rest"] for r in every for lv in r["levels"].values()]
    if rest <= 0.5:
        return ""
    ratios = [r["levels"]["1"]["seconds"] / r["nbgrader_sequential"]["seconds"] for r in every]
    auto1 = [r["levels"]["1"]["stage_seconds_mean"]["autograde"] for r in every]
    others = [lv["stage_seconds_mean"]["autograde"] for r in runs for n, lv in r["levels"].items() if n != "1"]
    top = max(int(n) for n in runs[0]["levels"])
    low = min(int(n) for n in runs[0]["levels"] if int(n) > 1)

    def eff(r):       # throughput at the top level over the lowest parallel level's, per added worker
        a, b = r["levels"][str(low)], r["levels"][str(top)]
        return b["throughput_per_min"] / a["throughput_per_min"], b["throughput_per_min"] / a["throughput_per_min"] / (top / low)
    effs = "; ".join(f"run {chr(ord('a') + i)} x{eff(r)[0]:.2f} ({eff(r)[1]:.2f} of x{top // low})"
                     for i, r in enumerate(runs))
    # per submission: the worker's time (judge beside autograde, then the stage after it) against plain
    # nbgrader's; the batch at which the fixed cost falls under 1.1x is a model of these measurements
    per = [(max(r["levels"]["1"]["stage_seconds_mean"]["autograde"], r["levels"]["1"]["stage_seconds_mean"]["judge"])
            + r["levels"]["1"]["stage_seconds_mean"]["rest"]) / r["nbgrader_sequential"]["seconds_per_submission"]
           for r in every]
    big = max(every, key=lambda r: r["levels"]["1"]["submissions"])
    st, plain = big["levels"]["1"]["stage_seconds_mean"], big["nbgrader_sequential"]["seconds_per_submission"]
    w = max(st["autograde"], st["judge"]) + st["rest"]
    need = _fixed_seconds(big) / (1.1 * plain - w) if 1.1 * plain > w else float("inf")
    return (
        f" The stage after autograde took {min(lows):g}-{max(lows):g} s a submission in these runs: every feedback "
        "page was written (`--scaling` stops on a solution without one). `--jobs 1` did not repeat: "
        f"x{min(ratios):.2f}-x{max(ratios):.2f} of plain nbgrader, its autograde stage {min(auto1):g}-{max(auto1):g} s "
        f"against {min(others):g}-{max(others):g} s on every parallel level, so the speed-ups over `--jobs 1` in the "
        f"table carry that spread; from `--jobs {low}` to `--jobs {top}` (the same submissions per worker) throughput "
        f"grew {effs}. Per submission the worker's time (autograde, the judge beside it, the stage after) was "
        f"x{min(per):.2f}-x{max(per):.2f} of plain nbgrader's: the goal of x1.1 is met per submission, and a command "
        f"pays its fixed cost once on top; with the {big['levels']['1']['submissions']}-submission run's figures a "
        f"`--jobs 1` batch reaches x1.1 at about {need:.0f} submissions (a model: fixed / (1.1 x plain - per "
        "submission), not a measurement).")


def scaling(args) -> dict:
    levels = sorted({int(x) for x in args.scaling.split(",")})
    if not levels or levels[0] < 1 or args.per_job < 1:
        raise SystemExit(f"--scaling={args.scaling} and --per-job={args.per_job} must be positive")
    report = {
        "what": "benchmarks/grading_speed.py --scaling: --jobs N grading N x per_job submissions (solutions) of one "
                "assignment, for each N, in one run; speed-up = throughput(N) / throughput(1)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_before": [round(x, 2) for x in os.getloadavg()]},
        "assignment": args.assignment, "per_job": args.per_job, "cell_timeout": args.timeout,
        "extra_args": args.extra, "levels": {},
    }
    out = args.out
    with tempfile.TemporaryDirectory(prefix="grading_scaling_") as tmp:
        tmp = Path(tmp)
        # one untimed run first: the first grading run of a fresh machine also pays its cold disk cache and
        # bytecode compilation, which made --jobs 1 look slow and every speed-up look better than linear;
        # it comes before plain nbgrader too, which shares those imports (torch, nbgrader, jupyter)
        warm = tmp / "warm_subs"
        make_submissions(warm, args.assignment, 1)
        report["warmup_seconds"] = round(autograder(tmp, warm, args.assignment, 1, args.timeout, extra=args.extra,
                                                    name="warmup")[0], 1)
        base = tmp / "plain_subs"
        make_submissions(base, args.assignment, args.per_job)
        plain = plain_nbgrader(tmp, base, args.assignment, args.timeout)
        report["nbgrader_sequential"] = {"submissions": args.per_job, "seconds": round(plain, 1),
                                         "seconds_per_submission": round(plain / args.per_job, 2)}
        print(f"plain nbgrader autograde: {plain:.1f} s for {args.per_job}", flush=True)
        for n in levels:
            subs = tmp / f"subs{n}"
            make_submissions(subs, args.assignment, n * args.per_job)
            seconds, results = autograder(tmp, subs, args.assignment, n, args.timeout, extra=args.extra)
            m = len(results)
            # every submission is a solution: a lost point, or a missing feedback page (the stage would
            # take no time: an H200 run before this check had nbconvert without its templates), is a broken set-up
            wrong = [r for r in results if r["status"] != "graded" or r["score"] != r["max_score"] or not r.get("feedback")]
            if wrong or m != n * args.per_job:
                r = wrong[0] if wrong else {}
                log = tmp / f"jobs{n}" / "scratch" / args.assignment / str(r.get("student")) / "worker.log"
                report["failed"] = {"jobs": n, "results": m, "first_wrong": {k: r.get(k) for k in (
                    "student", "status", "score", "max_score", "feedback", "notes", "cells", "judge")},
                    "worker_log_tail": log.read_text()[-3000:] if log.exists() else ""}
                print("a solution lost points: the timings would mean nothing\n"
                      + json.dumps(report["failed"], indent=1, default=str)[:6000], flush=True)
                if out:
                    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
                break
            level = {"submissions": m, "seconds": round(seconds, 1), "throughput_per_min": round(60 * m / seconds, 2),
                     "all_graded": all(r["status"] == "graded" for r in results),
                     "scores": sorted({f"{r['score']:g}/{r['max_score']:g}" for r in results}),
                     "stage_seconds_mean": {k: round(sum(r["timings"][k] for r in results) / m, 1)
                                            for k in ("judge", "autograde", "rest")}}
            if n == 1:      # the autograder's cost over plain nbgrader, the same number of submissions, one run
                level["over_nbgrader_sequential"] = round(seconds / plain, 2)
            one = report["levels"].get("1")
            if one:
                level["speedup_vs_jobs1"] = round(level["throughput_per_min"] / one["throughput_per_min"], 2)
                level["efficiency"] = round(level["speedup_vs_jobs1"] / n, 2)
            report["levels"][str(n)] = level
            report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
            print(f"--jobs {n}: {m} submissions in {seconds:.1f} s ({level['throughput_per_min']:g}/min"
                  + (f", x{level['speedup_vs_jobs1']:g} of --jobs 1" if one else "") + ")", flush=True)
            if out:
                out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _replace_block(text: str, start: str, end: str, block: str) -> str:
    if start in text:
        return text[:text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assignment", default="02_lora_linear")
    ap.add_argument("--n", type=int, default=4, help="submissions (default 4)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=int, default=300, help="per-cell timeout for every mode")
    ap.add_argument("--out", type=Path, default=None, help="where the JSON goes (default per mode)")
    ap.add_argument("--class-scale", type=int, metavar="M", help="class-scale mode with M mixed submissions")
    ap.add_argument("--workers", type=int, default=2, help="class-scale: pool jobs and Dask workers (default 2)")
    ap.add_argument("--scaling", metavar="N1,N2,...", help="scaling mode: --jobs N for each N (a many-core machine)")
    ap.add_argument("--per-job", type=int, default=3, help="scaling: submissions per job at every level (default 3)")
    ap.add_argument("--extra", action="append", default=[], help="scaling: one more argument for every grading run")
    ap.add_argument("--model", action="store_true", help="print the cost model of the committed class-scale run")
    ap.add_argument("--readme", action="store_true", help="write the committed run's paragraph into autograder/README.md")
    args = ap.parse_args(argv)
    if args.model:
        run = json.loads(CLASS_RESULT.read_text())
        print(json.dumps(cost_model(run), indent=1))
        return 0
    if args.readme:
        readme = ROOT / "autograder" / "README.md"
        text = readme.read_text()
        text = _replace_block(text, README_START, README_END, readme_text(json.loads(CLASS_RESULT.read_text())))
        text = _replace_block(text, SPEED_START, SPEED_END, speed_text(json.loads(SPEED_RESULT.read_text())))
        text = _replace_block(text, SCALING_START, SCALING_END, scaling_text(
            [json.loads(p.read_text()) for p in SCALING_RESULTS], json.loads(JOBS1_RESULT.read_text()),
            json.loads(SPEED_RESULT.read_text())))
        readme.write_text(text)
        return 0
    if args.scaling:
        report = scaling(args)
        print(json.dumps(report, indent=1))
        return 0
    if args.class_scale is not None:
        if args.class_scale < 1 or args.workers < 1:
            raise SystemExit(f"--class-scale={args.class_scale} and --workers={args.workers} must be positive")
        report = class_scale(args)
        report["cost_model"] = cost_model(report)
        out = args.out or CLASS_RESULT
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return 0
    args.out = args.out or SPEED_RESULT
    if args.n < 1 or args.jobs < 1:
        raise SystemExit(f"--n={args.n} and --jobs={args.jobs} must be positive")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="grading_speed_") as tmp:
        tmp = Path(tmp)
        subs = tmp / "submissions"
        make_submissions(subs, args.assignment, args.n)
        plain, plain_fb = plain_nbgrader(tmp, subs, args.assignment, args.timeout, feedback=True)
        print(f"plain nbgrader autograde: {plain:.1f} s for {args.n} (then generate_feedback {plain_fb:.1f} s)")
        one, r1 = autograder(tmp, subs, args.assignment, 1, args.timeout)
        print(f"autograder --jobs 1:      {one:.1f} s")
        many, rn = autograder(tmp, subs, args.assignment, args.jobs, args.timeout)
        print(f"autograder --jobs {args.jobs}:      {many:.1f} s")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "assignment": args.assignment, "submissions": args.n, "jobs": args.jobs, "cell_timeout": args.timeout,
        "seconds_total": {"nbgrader": round(plain, 1), "autograder_jobs1": round(one, 1),
                          f"autograder_jobs{args.jobs}": round(many, 1)},
        "seconds_per_submission": {"nbgrader": round(plain / args.n, 1), "autograder_jobs1": round(one / args.n, 1),
                                   f"autograder_jobs{args.jobs}": round(many / args.n, 1)},
        "seconds_nbgrader_generate_feedback": round(plain_fb, 1),
        "overhead_vs_nbgrader_jobs1": round(one / plain, 2),
        # the same artefacts: scores and feedback HTML (plain nbgrader needs its second command for them)
        "overhead_vs_nbgrader_with_feedback_jobs1": round(one / (plain + plain_fb), 2),
        "parallel_speedup": round(one / many, 2),
        "speedup_vs_nbgrader": round(plain / many, 2),
        "scores": sorted({f"{r['score']:g}/{r['max_score']:g}" for r in r1 + rn}),
        "all_graded": all(r["status"] == "graded" for r in r1 + rn),
        "stage_seconds_mean_jobs1": {k: round(sum(r["timings"][k] for r in r1) / len(r1), 1)
                                     for k in ("judge", "autograde", "rest")},
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
