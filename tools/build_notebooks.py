"""Build the course notebooks from their text sources.

    course_src/NN_topic.py  --(this script)-->  solutions/NN_topic/NN_topic.ipynb   (instructor copy)
                            --(nbgrader generate_assignment)-->  notebooks/NN_topic/NN_topic.ipynb  (student copy)

Sources are plain Python in "percent" format, so they diff and review like code. A cell starts with a
header line; everything up to the next header is its body:

    # %% [markdown]                      markdown cell (body lines lose their leading "# ")
    # %% [markdown] manual id=q1 points=2   manually graded written answer
    # %%                                 ordinary code cell (demo, measurement, plot)
    # %% locked id=setup                 read-only code cell
    # %% answer id=lora_forward          learner's answer cell: ### BEGIN SOLUTION / ### END SOLUTION inside
    # %% test id=test_lora_forward points=3   autograded test cell: ### BEGIN HIDDEN TESTS ... inside

Cell ids are derived from the grade ids (or the position), so two builds give byte-identical files.

Usage:
    python tools/build_notebooks.py            # every source, then the student copies
    python tools/build_notebooks.py 02_lora_linear
    python tools/build_notebooks.py --check    # exit 1 if solutions/ or notebooks/ are out of date
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "course_src"
HEADER = re.compile(r"^# %%(?P<rest>.*)$")


def _attrs(words: list[str]) -> tuple[list[str], dict[str, str]]:
    flags, kv = [], {}
    for w in words:
        if "=" in w:
            k, v = w.split("=", 1)
            kv[k] = v
        else:
            flags.append(w)
    return flags, kv


def _markdown_body(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith("# "):
            out.append(line[2:])
        elif line.rstrip() in ("#", ""):          # blank lines (also trailing ones) are paragraph breaks
            out.append("")
        else:
            raise ValueError(f"markdown line must start with '# ': {line!r}")
    return "\n".join(out).strip("\n")


def parse(text: str, stem: str) -> nbformat.NotebookNode:
    """Turn a percent-format source into an nbgrader source notebook."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            cells.append((m.group("rest").strip(), []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{stem}: code before the first '# %%' header: {line!r}")

    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    seen_ids: set[str] = set()
    for index, (header, body) in enumerate(cells):
        words = header.split()
        is_md = bool(words) and words[0] == "[markdown]"
        flags, kv = _attrs(words[1:] if is_md else words)
        source = _markdown_body(body) if is_md else "\n".join(body).strip("\n")
        grade_id = kv.get("id")
        cell_id = grade_id or f"{stem[:2]}-cell-{index:03d}"
        if cell_id in seen_ids:
            raise ValueError(f"{stem}: duplicate cell id {cell_id!r}")
        seen_ids.add(cell_id)

        cell = nbformat.v4.new_markdown_cell(source) if is_md else nbformat.v4.new_code_cell(source)
        cell.id = cell_id
        meta = None
        kind = flags[0] if flags else None
        if kind == "manual":
            meta = dict(grade=True, solution=True, locked=False, points=int(kv["points"]))
        elif kind == "locked":
            meta = dict(grade=False, solution=False, locked=True)
        elif kind == "answer":
            if "### BEGIN SOLUTION" not in source:
                raise ValueError(f"{stem}:{cell_id}: answer cell without ### BEGIN SOLUTION")
            meta = dict(grade=False, solution=True, locked=False)
        elif kind == "test":
            meta = dict(grade=True, solution=False, locked=True, points=int(kv["points"]))
        elif kind is not None:
            raise ValueError(f"{stem}: unknown cell kind {kind!r}")
        if meta is not None:
            if not grade_id:
                raise ValueError(f"{stem}: {kind} cell #{index} needs id=")
            meta.update(grade_id=grade_id, schema_version=3)
            cell.metadata["nbgrader"] = meta
        elif "### BEGIN SOLUTION" in source or "### BEGIN HIDDEN TESTS" in source:
            raise ValueError(f"{stem}:{cell_id}: solution/hidden markers outside an answer/test cell")
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def build_solution(stem: str, out_root: Path) -> Path:
    nb = parse((SRC / f"{stem}.py").read_text(), stem)
    path = out_root / stem / f"{stem}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def generate_student(stem: str, course_root: Path) -> None:
    """Run nbgrader generate_assignment with the course configuration, inside course_root."""
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "nbgrader", "generate_assignment", stem, "--force", "--no-db",
           f"--CourseDirectory.root={course_root}",
           "--CourseDirectory.source_directory=solutions",
           "--CourseDirectory.release_directory=notebooks",
           "--log-level=WARN"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    # nbgrader copies every file of the source folder; only the notebook belongs in the release
    for extra in (course_root / "notebooks" / stem).iterdir():
        if extra.name != f"{stem}.ipynb":
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()


def stems(selected: list[str]) -> list[str]:
    every = sorted(p.stem for p in SRC.glob("[0-9][0-9]_*.py"))
    if not selected:
        return every
    unknown = [s for s in selected if s not in every]
    if unknown:
        raise SystemExit(f"unknown notebook(s) {unknown}; sources are {every}")
    return selected


def check(selected: list[str]) -> int:
    """Rebuild into a temporary course folder and compare byte for byte."""
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for stem in stems(selected):
            build_solution(stem, tmp / "solutions")
            generate_student(stem, tmp)
            for sub in ("solutions", "notebooks"):
                a, b = tmp / sub / stem / f"{stem}.ipynb", ROOT / sub / stem / f"{stem}.ipynb"
                if not b.exists() or not filecmp.cmp(a, b, shallow=False):
                    bad.append(str(b.relative_to(ROOT)))
    for b in bad:
        print(f"out of date: {b}  (run: python tools/build_notebooks.py)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="stems like 02_lora_linear (default: all)")
    ap.add_argument("--check", action="store_true", help="only check that committed files are up to date")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.notebooks)
    for stem in stems(args.notebooks):
        path = build_solution(stem, ROOT / "solutions")
        generate_student(stem, ROOT)
        print(f"built {path.relative_to(ROOT)} and notebooks/{stem}/{stem}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
