"""Class-level outputs built from the per-submission results: grades, per-exercise summary, audit.

- ``grades.csv``: one row per student x assignment: final score (judge withdrawals applied), nbgrader's
  own score, maximum, percent, status, audit flag, notes.
- ``summary.csv`` / ``summary.md``: per test cell (the unit nbgrader scores) and per judged exercise:
  submissions, mean score, failure rate (score below the cell's points), most common error.
- ``histogram.png``: distribution of percent scores of graded submissions.
- ``audit.md``: every submission flagged ``integrity`` or ``review``, with its evidence.
"""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path


def load_results(folder: Path) -> list[dict]:
    results = []
    for path in sorted(Path(folder).glob("*/*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            results.append(dict(student=path.stem, assignment=path.parent.name, status="error",
                                notes=[f"unreadable result file: {exc}"], score=0.0, max_score=0.0))
    return sorted(results, key=lambda r: (r.get("assignment", ""), r.get("student", "")))


def _pct(r: dict) -> float:
    return 100.0 * r.get("score", 0.0) / r["max_score"] if r.get("max_score") else 0.0


def write_grades(results: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "score", "max_score", "percent", "nbgrader_score", "status",
                    "audit_flag", "withdrawn_cells", "notes"])
        for r in results:
            w.writerow([r.get("student"), r.get("assignment"), f"{r.get('score', 0.0):g}", f"{r.get('max_score', 0.0):g}",
                        f"{_pct(r):.1f}", f"{r.get('nbgrader_score', 0.0):g}", r.get("status"),
                        r.get("audit", {}).get("flag", "ok"), " ".join(r.get("withdrawn", [])),
                        " | ".join(r.get("notes", []))])


def summarize(results: list[dict]) -> list[dict]:
    """Rows for each test cell and each judged exercise of each assignment."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    exercises: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        if r.get("status") != "graded":
            continue
        for gid, c in r.get("cells", {}).items():
            cells[(r["assignment"], gid)].append(c)
        for ex_id, o in r.get("judge", {}).items():
            exercises[(r["assignment"], ex_id)].append(o)
    rows = []
    for (a, gid), cs in sorted(cells.items()):
        failed = [c for c in cs if c["score"] < c["max"]]
        common = Counter(c["error"] for c in failed if c.get("error")).most_common(1)
        rows.append(dict(assignment=a, item=f"test cell {gid}", submissions=len(cs),
                         mean=sum(c["score"] for c in cs) / len(cs), max=cs[0]["max"],
                         failure_rate=len(failed) / len(cs),
                         most_common_error=f"{common[0][0]} ({common[0][1]}x)" if common else ""))
    for (a, ex_id), os_ in sorted(exercises.items()):
        failed = [o for o in os_ if not o["passed"]]
        common = Counter(o["error"] for o in failed if o.get("error")).most_common(1)
        rows.append(dict(assignment=a, item=f"judge {ex_id}", submissions=len(os_),
                         mean=sum(o["passed"] for o in os_) / len(os_), max=1.0, failure_rate=len(failed) / len(os_),
                         most_common_error=f"{common[0][0]} ({common[0][1]}x)" if common else ""))
    return rows


def write_summary(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["assignment", "item", "submissions", "mean", "max", "failure_rate", "most_common_error"])
        w.writeheader()
        for row in rows:
            w.writerow({**row, "mean": f"{row['mean']:.3g}", "failure_rate": f"{row['failure_rate']:.3f}"})
    lines = ["# Per-exercise summary", "", "| assignment | item | n | mean / max | failure rate | most common error |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        err = row["most_common_error"].replace("|", "\\|")[:160]
        lines.append(f"| {row['assignment']} | {row['item']} | {row['submissions']} | {row['mean']:.2f} / {row['max']:g} "
                     f"| {100 * row['failure_rate']:.0f}% | {err} |")
    md_path.write_text("\n".join(lines) + "\n")


def write_histogram(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = [_pct(r) for r in results if r.get("status") == "graded"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(pct, bins=[i * 10 for i in range(11)], edgecolor="black")
    ax.set_xlabel("score (% of the assignment's points)")
    ax.set_ylabel("submissions")
    ax.set_title(f"Scores of {len(pct)} graded submissions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_audit(results: list[dict], path: Path) -> None:
    lines = ["# Audit report", "",
             "`integrity`: the judge withdrew points, learner code replaced watched attributes, or tried to write",
             "outside its sandbox or to read/import the reference. `review`: suspicious patterns only.", ""]
    flagged = [r for r in results if r.get("audit", {}).get("flag", "ok") != "ok"]
    if not flagged:
        lines.append("No submission flagged.")
    for r in flagged:
        a = r["audit"]
        lines += [f"## {r['student']} / {r['assignment']}: {a['flag']}", ""]
        for title, key in (("Points withdrawn", "withdrawn"), ("Runtime evidence", "runtime"), ("Static scan", "static")):
            if a.get(key):
                lines.append(f"**{title}**")
                lines += [f"- {item}" for item in a[key][:40]]
                lines.append("")
    path.write_text("\n".join(lines) + "\n")


def table(results: list[dict]) -> str:
    head = f"{'student':<24} {'assignment':<20} {'score':>11} {'status':<10} {'audit':<9} notes"
    rows = [head, "-" * len(head)]
    for r in results:
        note = "; ".join(r.get("notes", []))
        if r.get("withdrawn"):
            note = f"withdrawn: {', '.join(r['withdrawn'])}" + (f"; {note}" if note else "")
        score = f"{r.get('score', 0):g}/{r.get('max_score', 0):g}"
        rows.append(f"{r.get('student', '')[:24]:<24} {r.get('assignment', '')[:20]:<20} {score:>11} "
                    f"{r.get('status', ''):<10} {r.get('audit', {}).get('flag', 'ok'):<9} {note[:90]}")
    return "\n".join(rows)


def write_all(results: list[dict], out: Path) -> None:
    write_grades(results, out / "grades.csv")
    write_summary(summarize(results), out / "summary.csv", out / "summary.md")
    write_histogram(results, out / "histogram.png")
    write_audit(results, out / "audit.md")
