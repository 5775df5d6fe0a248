"""Time every course notebook as a learner runs it (not in grading mode) and commit the record.

Executes the solution copy of each notebook top to bottom with nbclient, in its own folder, the way
"Run All" does in JupyterLab, and writes ``notebook_times_<device>.json``: total seconds, the slowest
cells, the machine's load average before and after (on a shared machine the times are upper bounds),
and whether the run stayed inside the course's 3-minute CPU budget.

    python tools/time_notebooks.py [NN_topic ...] [--threads N]     writes runs/notebook_times/
    python tools/time_notebooks.py --update [NN_topic ...]          updates the committed record

By default the record goes to ``runs/notebook_times/`` (not committed), so timing one notebook never
touches the committed ``benchmarks/results/notebook_times_<device>.json``; ``--update`` merges the new
times into that file (the notebooks not run keep their committed entries).

The graded runs (NBGRADER_EXECUTION set, one thread) are timed by tests/test_notebooks.py instead.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 180


def _cell_seconds(cell) -> float:
    meta = cell.get("metadata", {}).get("execution", {})
    start, end = meta.get("iopub.execute_input"), meta.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda s: dt.datetime.fromisoformat(s.replace("Z", "+00:00"))   # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def time_notebook(stem: str, timeout: int = 1200) -> dict:
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "solutions" / stem / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.pop("NBGRADER_EXECUTION", None)        # a learner's run, not a graded one
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    error = None
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    except Exception as exc:                                           # keep timing the others
        error = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"[:300]
    seconds = time.perf_counter() - t0
    if env_before is not None:
        os.environ["NBGRADER_EXECUTION"] = env_before
    cells = sorted(((round(_cell_seconds(c), 1), i, (c.source.splitlines() or [""])[0][:70])
                    for i, c in enumerate(nb.cells) if c.cell_type == "code"), reverse=True)
    return {"seconds": round(seconds, 1), "within_budget": seconds <= BUDGET_S and error is None,
            "error": error, "load_average_before": load0,
            "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "slowest_cells": [{"index": i, "seconds": s, "first_line": line} for s, i, line in cells[:3]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stems", nargs="*", help="notebooks to time (default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP_NUM_THREADS for the kernels (default: the notebooks choose)")
    ap.add_argument("--out", default=None,
                    help="folder for the record (default: runs/notebook_times, or benchmarks/results with --update)")
    ap.add_argument("--update", action="store_true",
                    help="merge the times into the committed benchmarks/results record (default: leave it alone)")
    args = ap.parse_args(argv)
    committed = ROOT / "benchmarks" / "results"
    folder = Path(args.out) if args.out else committed if args.update else ROOT / "runs" / "notebook_times"
    if not args.update and folder.resolve() == committed.resolve():
        ap.error(f"{committed} holds the committed record: pass --update to change it")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    stems = args.stems or sorted(p.stem for p in (ROOT / "course_src").glob("[0-9][0-9]_*.py"))
    from tqdm import tqdm

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = folder / f"notebook_times_{device}.json"
    # only an update merges into an earlier record; a scratch run records just what it ran
    record = json.loads(out.read_text()) if args.update and out.exists() else {}
    record.update({"what": "each solution notebook run top to bottom as a learner runs it (tools/time_notebooks.py)",
                   "budget_seconds": BUDGET_S, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "machine": platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
    record.setdefault("notebooks", {})
    for stem in tqdm(stems, desc="notebooks"):
        res = time_notebook(stem)
        res["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        record["notebooks"][stem] = res
        print(f"{stem:32s} {res['seconds']:7.1f} s  {'ok' if res['within_budget'] else 'OVER / ERROR'}"
              f"  load {res['load_average_before']:.1f}->{res['load_average_after']:.1f}"
              + (f"  {res['error']}" if res["error"] else ""), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(record["notebooks"][stem].get("error") is None for stem in stems) else 1


if __name__ == "__main__":
    sys.exit(main())
