"""Command line: ``python -m autograder {grade,validate,audit,samples}``."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from autograder.contracts import DEFAULTS


def _grade(args) -> int:
    from autograder import grade, reports

    try:
        opts = grade.Options(submissions=args.submissions, assignment=args.assignment, jobs=args.jobs,
                             timeout=args.timeout, submission_timeout=args.submission_timeout,
                             memory_mb=args.memory_mb, out=args.out, source=args.source, student=args.student,
                             quiet=args.quiet, scheduler=args.scheduler, cluster=args.cluster,
                             regrade=args.regrade, add=args.add,
                             accept_no_isolation=args.accept_no_isolation)
        results = grade.grade(opts)
    except grade.UsageError as exc:
        print(f"autograder grade: {exc}", file=sys.stderr)
        return 2
    out = opts.out.resolve()
    print(reports.table(results, width=shutil.get_terminal_size((150, 40)).columns))
    graded = [r for r in results if r.get("status") == "graded"]
    flagged = [r for r in results if r.get("audit", {}).get("flag", "ok") != "ok"]
    print(f"\n{len(results)} submissions: {len(graded)} graded, {len(results) - len(graded)} not gradable "
          f"or failed; {len(flagged)} flagged in the audit")
    print(f"grades:    {out / 'grades.csv'}\nsummary:   {out / 'summary.md'}\nhistogram: {out / 'histogram.png'}\n"
          f"audit:     {out / 'audit.md'}\nfeedback:  {out / 'course' / 'feedback'}")
    return 0


def _validate(args) -> int:
    from autograder.validate import validate
    return validate(args.notebook, timeout=args.timeout, as_json=args.json)


def _audit(args) -> int:
    import nbformat
    from autograder.audit import scan
    from autograder.course import cell_kind

    nb = nbformat.read(str(args.notebook), as_version=4)
    cells = [(c.metadata["nbgrader"]["grade_id"], c.source) for c in nb.cells if cell_kind(c) == "answer"]
    findings = scan(cells)
    for f in findings:
        print(f)
    print(f"{args.notebook}: {len(findings)} finding(s) in {len(cells)} answer cell(s)")
    return 1 if any(f.severity == "high" for f in findings) else 0


def _samples(args) -> int:
    from autograder.samples import write_samples
    folder = write_samples(args.dest, args.source, [args.assignment] if args.assignment else None)
    print(f"wrote {len(list(folder.rglob('*.*')))} sample submissions to {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from autograder.grade import ROOT

    ap = argparse.ArgumentParser(prog="python -m autograder", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a folder/zip/nbgrader tree of submissions (default: built-in samples)")
    g.add_argument("submissions", nargs="?", type=Path, help="folder of .ipynb, a .zip, or an nbgrader submitted/ tree")
    g.add_argument("--assignment", help="grade only this assignment (also used for files that name none)")
    g.add_argument("--jobs", type=int, default=DEFAULTS.jobs,
                   help=f"submissions graded at once (default {DEFAULTS.jobs})")
    g.add_argument("--timeout", type=int, default=DEFAULTS.cell_timeout,
                   help=f"seconds per notebook cell (default {DEFAULTS.cell_timeout})")
    g.add_argument("--submission-timeout", type=int, default=DEFAULTS.submission_timeout,
                   help=f"wall seconds per submission (default {DEFAULTS.submission_timeout})")
    g.add_argument("--memory-mb", type=int, default=DEFAULTS.memory_mb,
                   help=f"address-space limit of learner processes (default {DEFAULTS.memory_mb})")
    g.add_argument("--accept-no-isolation", action="store_true",
                   help="grade even where user/mount/PID/network namespaces are unavailable (unsafe; every "
                        "result says so). Without it, grading refuses to start there")
    g.add_argument("--out", type=Path, default=None,
                   help="output folder (default grading/<name of SUBMISSIONS>, grading/samples for the samples); "
                        "one folder holds one class")
    g.add_argument("--source", type=Path, default=ROOT / "solutions", help="instructor notebooks (default solutions/)")
    g.add_argument("--student", help="regrade only this student")
    g.add_argument("--regrade", action="store_true",
                   help="grade again submissions already graded with the same file and grader (default: skip them)")
    g.add_argument("--add", action="store_true",
                   help="merge these submissions into an output folder that holds another submission set")
    g.add_argument("--scheduler", metavar="tcp://HOST:8786", help="grade on this Dask cluster (`dask scheduler`)")
    g.add_argument("--cluster", metavar="local:N", help="grade on a local Dask cluster of N workers")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=_grade)
    v = sub.add_parser("validate", help="run a notebook's visible tests; exit 1 if one fails")
    v.add_argument("notebook", type=Path)
    v.add_argument("--timeout", type=int, default=DEFAULTS.cell_timeout,
                   help=f"seconds per cell (default {DEFAULTS.cell_timeout})")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(fn=_validate)
    a = sub.add_parser("audit", help="static scan of a notebook's answer cells for patching patterns")
    a.add_argument("notebook", type=Path)
    a.set_defaults(fn=_audit)
    s = sub.add_parser("samples", help="write the built-in sample submissions")
    s.add_argument("dest", type=Path)
    s.add_argument("--assignment")
    s.add_argument("--source", type=Path, default=ROOT / "solutions")
    s.set_defaults(fn=_samples)
    args = ap.parse_args(argv)
    return args.fn(args)
