"""``python -m autograder validate NOTEBOOK``: run a notebook's visible tests; exit non-zero on failure.

``nbgrader validate`` prints a verdict but always exits 0. This runs the same nbgrader ``Validator``
(so the notebook executes exactly as under nbgrader, with ``NBGRADER_EXECUTION`` set) and returns:

- 0: every test cell passed;
- 1: a test cell failed (each failing cell is printed with its grade id and error), or a locked/test
  cell was edited (nbgrader will restore it when grading, so the notebook may not behave as it does
  here), or a cell's type changed;
- 2: the file could not be read as a notebook.

An answer cell left as released raises ``NotImplementedError`` with no message; its failing tests say
"not answered yet". Through ``make validate`` the code is printed (make itself exits 2 on any failure).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _grade_ids(path: Path) -> dict[str, str]:
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    return {c.source.strip(): c.metadata.get("nbgrader", {}).get("grade_id", f"cell {i}") for i, c in enumerate(nb.cells)}


def _error_line(lines: list[str]) -> str:
    """The last line of a traceback, with a meaning where Python prints none."""
    from autograder.reports import error_text
    return error_text(lines[-1]) if lines else "failed"


def validate(path: Path, timeout: int = 120, as_json: bool = False) -> int:
    from nbgrader.validator import Validator
    from traitlets.config import Config

    path = Path(path)
    try:
        ids = _grade_ids(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a notebook"
        print(f"{path}: cannot read as a notebook: {exc}")
        return 2
    cfg = Config()
    cfg.Execute.timeout = timeout
    cfg.Execute.iopub_timeout = max(30, timeout // 4)    # nbclient's 4 s fail on a loaded machine
    cfg.Validator.ignore_checksums = False
    results = Validator(config=cfg).validate(str(path.resolve()))
    report = {"notebook": str(path), "passed": not results, "failed": [], "changed": [], "type_changed": []}
    for item in results.get("failed", []):
        error = ANSI.sub("", item.get("raw_error", "")).strip().splitlines()
        report["failed"].append({"cell": ids.get(item["source"], "?"), "error": _error_line(error)})
    for item in results.get("changed", []):
        report["changed"].append({"cell": ids.get(item["source"], "?")})
    for item in results.get("type_changed", []):
        report["type_changed"].append({"cell": ids.get(item["source"], "?"), "now": item.get("new_type")})
    if as_json:
        print(json.dumps(report, indent=1))
    elif not results:
        print(f"{path}: all visible tests passed")
    else:
        for f in report["failed"]:
            print(f"FAILED  {f['cell']}: {f['error']}")
        for c in report["changed"]:
            print(f"EDITED  {c['cell']}: this locked/test cell was changed; grading restores the original")
        for c in report["type_changed"]:
            print(f"TYPE    {c['cell']}: cell type changed to {c['now']}")
        n = len(report["failed"]) + len(report["changed"]) + len(report["type_changed"])
        print(f"{path}: {n} problem(s)")
    return 0 if not results else 1
