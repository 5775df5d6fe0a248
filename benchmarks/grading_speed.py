"""How fast is grading a class? Seconds per submission: plain nbgrader vs the autograder, 1 and N jobs.

    python benchmarks/grading_speed.py [--assignment 02_lora_linear] [--n 4] [--jobs 2] [--out benchmarks/grading_speed.json]

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


def plain_nbgrader(tmp: Path, submissions: Path, assignment: str, timeout: int) -> float:
    """nbgrader autograde, one process, all students in sequence (the generation step is not timed)."""
    course = tmp / "plain"
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
    return seconds


def autograder(tmp: Path, submissions: Path, assignment: str, jobs: int, timeout: int) -> tuple[float, list[dict]]:
    out = tmp / f"jobs{jobs}"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "autograder", "grade", str(submissions), "--assignment", assignment,
                           "--jobs", str(jobs), "--timeout", str(timeout), "--out", str(out), "--quiet"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"autograder failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    results = [json.loads(p.read_text()) for p in sorted((out / "results" / assignment).glob("*.json"))]
    return seconds, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assignment", default="02_lora_linear")
    ap.add_argument("--n", type=int, default=4, help="submissions (default 4)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=int, default=300, help="per-cell timeout for every mode")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "grading_speed.json")
    args = ap.parse_args(argv)
    if args.n < 1 or args.jobs < 1:
        raise SystemExit(f"--n={args.n} and --jobs={args.jobs} must be positive")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="grading_speed_") as tmp:
        tmp = Path(tmp)
        subs = tmp / "submissions"
        make_submissions(subs, args.assignment, args.n)
        plain = plain_nbgrader(tmp, subs, args.assignment, args.timeout)
        print(f"plain nbgrader autograde: {plain:.1f} s for {args.n}")
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
        "overhead_vs_nbgrader_jobs1": round(one / plain, 2),
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
