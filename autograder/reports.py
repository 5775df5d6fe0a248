"""Class-level outputs built from the per-submission results: grades, per-exercise summary, audit.

- ``grades.csv``: one row per student x assignment: final score (judge withdrawals applied), nbgrader's
  own score, maximum, percent, status, audit flag, notes (:func:`explain`: why the submission lost
  points or was flagged: intake notes, timeouts, memory, crashes, withdrawal evidence, escape attempts).
- ``summary.csv`` / ``summary.md``: per test cell (the unit nbgrader scores) and per judged exercise:
  submissions, mean score, failure rate (score below the cell's points), most common error.
- ``histogram.png``: distribution of percent scores of graded submissions.
- ``audit.md``: every submission flagged ``integrity`` or ``review``, with its evidence.

The feedback pages get a last pass here too (:func:`clean_feedback`): test cells named, no grader paths.
"""
from __future__ import annotations

import csv
import html
import json
import re
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

from autograder.contracts import Result

NOT_ANSWERED = "not answered yet"


def load_results(folder: Path) -> list[Result]:
    results = []
    for path in sorted(Path(folder).glob("*/*.json")):
        try:
            results.append(Result.read(path))
        except (OSError, ValueError, TypeError) as exc:
            results.append(Result.error(f"unreadable result file: {exc}", student=path.stem,
                                        assignment=path.parent.name))
    return sorted(results, key=lambda r: (r.assignment, r.student))


def _pct(r: Result) -> float:
    return 100.0 * r.score / r.max_score if r.max_score else 0.0


def error_text(error: str) -> str:
    """A cell's error as a learner should read it: an answer left as released raises
    ``NotImplementedError`` with no message; say what it means."""
    e = (error or "").strip()
    if re.fullmatch(r"NotImplementedError:?", e):
        return f"NotImplementedError: {NOT_ANSWERED}"
    return e


def explain(r: Result) -> list[str]:
    """Why this submission lost points or was flagged, one line each: :meth:`Result.why` (notes,
    crashes, judge deaths, withdrawals, replaced attributes, escape attempts), then each test cell
    that lost points with its error (memory, time, wrong answer), then the static findings of a
    ``review`` flag."""
    lines = r.why()
    for gid, c in sorted(r.cells.items()):
        if c.score < c.max and not c.withdrawn:
            lines.append(f"{gid} {c.score:g}/{c.max:g}" + (f": {error_text(c.error)}" if c.error else ""))
    if r.audit.flag == "review" and r.audit.static:
        lines.append(f"review: {r.audit.static[0]}" + (f" (+{len(r.audit.static) - 1} more in audit.md)"
                                                       if len(r.audit.static) > 1 else ""))
    elif r.audit.flag == "integrity" and len(lines) == len(r.notes):
        lines.append("integrity: " + "; ".join((r.audit.runtime + r.audit.static)[:2] or ["see audit.md"]))
    seen, unique = set(), []
    for line in lines:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    return unique


def write_grades(results: list[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "score", "max_score", "percent", "nbgrader_score", "status",
                    "audit_flag", "withdrawn_cells", "notes"])
        for r in results:
            w.writerow([r.student, r.assignment, f"{r.score:g}", f"{r.max_score:g}", f"{_pct(r):.1f}",
                        f"{r.nbgrader_score:g}", r.status, r.audit.flag, " ".join(r.withdrawn),
                        " | ".join(explain(r))])


def summarize(results: list) -> list[dict]:
    """Rows for each test cell and each judged exercise of each assignment."""
    results = [r if isinstance(r, Result) else Result(**{k: v for k, v in r.items() if k in Result.__dataclass_fields__})
               for r in results]
    cells: dict[tuple[str, str], list] = defaultdict(list)
    exercises: dict[tuple[str, str], list] = defaultdict(list)
    for r in results:
        if r.status != "graded":
            continue
        for gid, c in r.cells.items():
            cells[(r.assignment, gid)].append(c)
        for ex_id, o in r.judge.items():
            exercises[(r.assignment, ex_id)].append(o)
    rows = []
    for (a, gid), cs in sorted(cells.items()):
        failed = [c for c in cs if c.score < c.max]
        common = Counter(error_text(c.error) for c in failed if c.error).most_common(1)
        rows.append(dict(assignment=a, item=f"test cell {gid}", submissions=len(cs),
                         mean=sum(c.score for c in cs) / len(cs), max=cs[0].max,
                         failure_rate=len(failed) / len(cs),
                         most_common_error=f"{common[0][0]} ({common[0][1]}x)" if common else ""))
    for (a, ex_id), os_ in sorted(exercises.items()):
        failed = [o for o in os_ if not o.passed]
        common = Counter(error_text(o.error) for o in failed if o.error).most_common(1)
        rows.append(dict(assignment=a, item=f"judge {ex_id}", submissions=len(os_),
                         mean=sum(o.passed for o in os_) / len(os_), max=1.0, failure_rate=len(failed) / len(os_),
                         most_common_error=f"{common[0][0]} ({common[0][1]}x)" if common else ""))
    return rows


def shorten(text: str, width: int) -> str:
    """At most ``width`` characters, cut at a word boundary (never mid-word), ``…`` where cut."""
    text = " ".join(text.split())
    return text if len(text) <= width else textwrap.shorten(text, width, placeholder=" …")


def write_summary(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["assignment", "item", "submissions", "mean", "max", "failure_rate", "most_common_error"])
        w.writeheader()
        for row in rows:
            w.writerow({**row, "mean": f"{row['mean']:.3g}", "failure_rate": f"{row['failure_rate']:.3f}"})
    lines = ["# Per-exercise summary", "", "| assignment | item | n | mean / max | failure rate | most common error |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        err = shorten(row["most_common_error"], 240).replace("|", "\\|")
        lines.append(f"| {row['assignment']} | {row['item']} | {row['submissions']} | {row['mean']:.2f} / {row['max']:g} "
                     f"| {100 * row['failure_rate']:.0f}% | {err} |")
    md_path.write_text("\n".join(lines) + "\n")


def write_histogram(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = [_pct(r) for r in results if r.status == "graded"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(pct, bins=[i * 10 for i in range(11)], edgecolor="black")
    ax.set_xlabel("score (% of the assignment's points)")
    ax.set_ylabel("submissions")
    ax.set_title(f"Scores of {len(pct)} graded submissions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_audit(results: list[Result], path: Path) -> None:
    lines = ["# Audit report", "",
             "`integrity`: the judge withdrew points, learner code replaced watched attributes, or tried to write",
             "outside its sandbox or to read/import the reference. `review`: suspicious patterns only.", ""]
    flagged = [r for r in results if r.audit.flag != "ok"]
    if not flagged:
        lines.append("No submission flagged.")
    for r in flagged:
        lines += [f"## {r.student} / {r.assignment}: {r.audit.flag}", ""]
        for title, items in (("Points withdrawn", r.audit.withdrawn), ("Runtime evidence", r.audit.runtime),
                             ("Static scan", r.audit.static)):
            if items:
                lines.append(f"**{title}**")
                lines += [f"- {item}" for item in items[:40]]
                lines.append("")
    path.write_text("\n".join(lines) + "\n")


def table(results: list, width: int = 150) -> str:
    """The console table; long notes wrap onto indented lines instead of being cut."""
    results = [r if isinstance(r, Result) else Result(**{k: v for k, v in r.items() if k in Result.__dataclass_fields__})
               for r in results]
    sw = max([7] + [len(r.student) for r in results])
    aw = max([10] + [len(r.assignment) for r in results])
    head = f"{'student':<{sw}} {'assignment':<{aw}} {'score':>11} {'status':<10} {'audit':<9} notes"
    indent = len(head) - len("notes")
    rows = [head, "-" * len(head)]
    for r in results:
        note = "; ".join(explain(r))
        score = f"{r.score:g}/{r.max_score:g}"
        first = f"{r.student:<{sw}} {r.assignment:<{aw}} {score:>11} {r.status:<10} {r.audit.flag:<9} "
        wrapped = textwrap.wrap(note, max(40, width - indent), break_long_words=False, break_on_hyphens=False) or [""]
        rows.append(first + wrapped[0])
        rows += [" " * indent + w for w in wrapped[1:]]
    return "\n".join(rows)


def write_all(results: list[Result], out: Path) -> None:
    write_grades(results, out / "grades.csv")
    write_summary(summarize(results), out / "summary.csv", out / "summary.md")
    write_histogram(results, out / "histogram.png")
    write_audit(results, out / "audit.md")


# -- feedback pages -------------------------------------------------------------------------------------------------

TOC_LABEL = re.compile(r'(<a href="#(?P<gid>[^"]+)">)(?P<label>Test cell|Coding free-response|Written response|Task)(</a>)')


def clean_feedback(path: Path, grader_paths: list[str]) -> None:
    """Last pass over a feedback page: the table of contents names each test cell (nbgrader's template
    writes "Test cell" for all of them), and no path of the grader's machine (output folder, repository,
    Python installation) is shown to the learner."""
    text = path.read_text(errors="replace")
    text = TOC_LABEL.sub(lambda m: f'{m[1]}{m["label"]} <code>{html.escape(m["gid"])}</code>{m[4]}', text)
    for p in sorted({p for p in grader_paths if p and len(p) > 4}, key=len, reverse=True):
        text = text.replace(p, "…").replace(html.escape(p), "…")
    path.write_text(text)


# -- progress -------------------------------------------------------------------------------------------------------

class progress:
    """A live bar for a grading run: done / failed (status other than graded) / ETA (tqdm's)."""

    def __init__(self, total: int, quiet: bool = False, desc: str = "grading"):
        from tqdm import tqdm
        self.failed = 0
        self.bar = tqdm(total=total, desc=desc, unit="submission", disable=quiet, file=sys.stderr, smoothing=0.1)

    def done(self, result: Result) -> None:
        if result.status != "graded":
            self.failed += 1
        self.bar.set_postfix_str(f"failed={self.failed} last={result.student}")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()
