"""From grades to drills: the topics of the exercises a learner failed become cards due now.

Two reports are read (detected by their keys):

* the autograder's per-submission result, ``<out>/results/<assignment>/<student>.json``
  (:class:`autograder.contracts.Result`): an exercise failed when the judge says so (``judge[id].passed``
  is false) or when a test cell that calls it lost points (``cells[grade_id].score < max``);
* ``python -m autograder validate --json NOTEBOOK``: ``failed`` lists test cells by grade id; the exercises
  each cell checks are read from the course's solution notebook of that assignment (the student copy has
  no hidden tests), ``solutions/<stem>/<stem>.ipynb``.

Each exercise names its drill topics (``Exercise.topics``, else its notebook's,
:func:`lora_ref.exercises.topics_of`); every bank card and generator of those topics is scheduled due now
(:meth:`lora_ref.drills.progress.Progress.make_due`), so the next ``lora-drill`` session starts with them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .engine import catalogue
from .progress import Progress

CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.[\w.-]+)["']""")


@dataclass(frozen=True)
class Scheduled:
    failed: tuple[str, ...]          # exercise ids
    topics: tuple[str, ...]
    cards: tuple[str, ...]           # card ids made due


def _course_root() -> Path:
    from ..results import results_dir
    return results_dir().parents[1]


def exercises_of_cells(stem: str, root: Path | None = None) -> dict[str, list[str]]:
    """Test-cell grade id -> exercise ids its hidden ``check("NN.name", ...)`` calls name, from the solution."""
    path = (root or _course_root()) / "solutions" / stem / f"{stem}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: cannot tell which exercises the cells of {stem} check")
    nb = json.loads(path.read_text())
    out = {}
    for cell in nb["cells"]:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if grade_id:
            out[grade_id] = CHECK_CALL.findall(source)
    return out


def failed_exercises(report: dict, root: Path | None = None) -> list[str]:
    """Exercise ids a graded report shows as failed (a per-submission result or a validate --json report)."""
    if not isinstance(report, dict):
        raise ValueError(f"a grade report is a JSON object, got {type(report).__name__}")
    failed: list[str] = []
    if "judge" in report or "cells" in report:                       # autograder Result
        failed += [ex for ex, o in (report.get("judge") or {}).items() if not o.get("passed", False)]
        for cell in (report.get("cells") or {}).values():
            if float(cell.get("score", 0)) < float(cell.get("max", 0)):
                failed += cell.get("exercises", [])
    elif "failed" in report and "notebook" in report:                # validate --json
        stem = Path(report["notebook"]).stem
        by_cell = exercises_of_cells(stem, root)
        for f in report["failed"]:
            failed += by_cell.get(f.get("cell"), [])
    else:
        raise ValueError("not a grade report: expected the autograder's results/<assignment>/<student>.json "
                         "(keys 'judge', 'cells') or `python -m autograder validate --json` output "
                         "(keys 'notebook', 'failed')")
    return sorted(set(failed))


def topics_for(exercise_ids) -> list[str]:
    from ..exercises import topics_of
    return sorted({t for ex in exercise_ids for t in topics_of(ex)})


def schedule_failed(progress: Progress, report: dict, now: datetime | None = None,
                    root: Path | None = None) -> Scheduled:
    """Make every card of the failed exercises' topics due now; returns what was failed and scheduled."""
    failed = failed_exercises(report, root)
    topics = topics_for(failed)
    cards = [c for c in catalogue() if c.topic in topics]
    for c in cards:
        progress.make_due(c.id, c.topic, c.kind, now)
    return Scheduled(tuple(failed), tuple(topics), tuple(c.id for c in cards))


def schedule_from_file(progress: Progress, path: str | Path, now: datetime | None = None) -> Scheduled:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such grade report") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); pass a results/<assignment>/<student>.json file or the "
                         "output of `python -m autograder validate --json`") from None
    return schedule_failed(progress, report, now)
