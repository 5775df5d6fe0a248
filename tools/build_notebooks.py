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

Measured figures in markdown (and manual) cells are never typed by hand: a placeholder names the committed
result they come from, and the build fills it in (an unknown file or key fails the build):

    {{result:FILE:KEY.PATH}}            e.g. {{result:lora_cpu_demo_cpu.json:trainable}}
    {{result:FILE:KEY.PATH:FORMAT}}     e.g. {{result:quality_quant_cpu.json:model.fp4.heldout_loss:.3f}}

FILE is a file under benchmarks/results/ (read with lora_ref.results.load_result), KEY.PATH is dotted into
the JSON (integer indices for lists; `*` for every entry, then a last `@mean`, `@min`, `@max`, `@sum` or
`@len`, e.g. per_seed.lora.*.fact_accuracy.@mean; `A/B` for the ratio of two keys of the file, or of a key
and a number, e.g. results.recipe.tokens_per_s/results.bf16_lora.tokens_per_s, adapter_file_bytes/1e6), FORMAT is a Python format spec (.1f, ,d, .1%). The README's Results
section is built the same way from course_src/readme_results.md (between the RESULTS markers of README.md).

Usage:
    python tools/build_notebooks.py            # every source, then the student copies
    python tools/build_notebooks.py 02_lora_linear
    python tools/build_notebooks.py --check    # exit 1 if solutions/, notebooks/ or README.md are out of date
    python tools/build_notebooks.py --readme   # only rebuild README.md's Results section
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
README = ROOT / "README.md"
README_TEMPLATE = SRC / "readme_results.md"
README_BEGIN = "<!-- BEGIN RESULTS: generated from course_src/readme_results.md by tools/build_notebooks.py; edit there -->"
README_END = "<!-- END RESULTS -->"
PLACEHOLDER = re.compile(r"\{\{result:(?P<file>[^:{}]+):(?P<key>[^:{}]+)(?::(?P<fmt>[^{}]*))?\}\}")


class PlaceholderError(ValueError):
    """A {{result:...}} placeholder that names no committed figure (the build stops on it)."""


AGGREGATES = {"@mean": lambda v: sum(v) / len(v), "@min": min, "@max": max, "@sum": sum, "@len": len}


def lookup(data, key: str, placeholder: str):
    """``data`` followed along the dotted ``key`` ("model.loss.fp4", "runs.0.tok_s"). A dict key that itself
    contains dots ("0.5") is matched whole first, so keys of any shape can be named. ``*`` takes every entry
    of a dict or list, and a last segment ``@mean``/``@min``/``@max``/``@sum``/``@len`` reduces them
    ("per_seed.lora.*.fact_accuracy.@mean": the mean over seeds, computed from the committed per-seed runs)."""
    parts = key.split(".")
    if parts[-1].startswith("@"):
        if parts[-1] not in AGGREGATES:
            raise PlaceholderError(f"{placeholder}: unknown reduction {parts[-1]!r}; expected one of {sorted(AGGREGATES)}")
        values = _walk(data, parts[:-1], 0, placeholder)
        if not isinstance(values, list) or not values or not (
                parts[-1] == "@len" or all(isinstance(v, (int, float)) for v in values)):
            raise PlaceholderError(f"{placeholder}: {parts[-1]} needs a non-empty list of numbers (use '*'), got {values!r}")
        return AGGREGATES[parts[-1]](values)
    return _walk(data, parts, 0, placeholder)


def _walk(data, parts: list[str], i: int, placeholder: str):
    while i < len(parts):
        here = ".".join(parts[:i]) or "the top"
        if parts[i] == "*":
            if not isinstance(data, (dict, list)):
                raise PlaceholderError(f"{placeholder}: '*' at {here}, which is a {type(data).__name__}")
            return [_walk(v, parts, i + 1, placeholder) for v in (data.values() if isinstance(data, dict) else data)]
        if isinstance(data, dict):
            for j in range(len(parts), i, -1):      # the longest dotted run that is one key
                k = ".".join(parts[i:j])
                if k in data:
                    data, i = data[k], j
                    break
            else:
                raise PlaceholderError(f"{placeholder}: no key {parts[i]!r} at {here} (keys there: {sorted(data)[:12]})")
        elif isinstance(data, list):
            try:
                data, i = data[int(parts[i])], i + 1
            except (ValueError, IndexError):
                raise PlaceholderError(f"{placeholder}: {parts[i]!r} is not an index of the list of {len(data)} "
                                       f"at {here}") from None
        else:
            raise PlaceholderError(f"{placeholder}: {here} is a {type(data).__name__}, not a dict or list, "
                                   f"so it has no {parts[i]!r}")
    return data


def _ratio(data, key: str, placeholder: str) -> float:
    """``A/B``: the ratio of two figures of the same file, each a KEY.PATH or a number (bytes/1e9)."""
    sides = []
    for side in key.split("/"):
        try:
            sides.append(float(side))
        except ValueError:
            sides.append(lookup(data, side, placeholder))
    if len(sides) != 2 or not all(isinstance(v, (int, float)) for v in sides):
        raise PlaceholderError(f"{placeholder}: A/B needs two numbers, got {sides!r}")
    if sides[1] == 0:
        raise PlaceholderError(f"{placeholder}: division by zero")
    return sides[0] / sides[1]


def resolve(file: str, key: str, fmt: str | None = None, placeholder: str | None = None) -> str:
    """The committed figure ``benchmarks/results/<file>`` -> ``key``, formatted with ``fmt`` (a format spec)."""
    from lora_ref.results import load_result

    placeholder = placeholder or f"{{{{result:{file}:{key}{':' + fmt if fmt else ''}}}}}"
    if not file.endswith(".json"):
        raise PlaceholderError(f"{placeholder}: FILE must be a .json file under benchmarks/results/")
    data = load_result(file)
    if data is None:
        raise PlaceholderError(f"{placeholder}: benchmarks/results/{file} does not exist")
    value = _ratio(data, key, placeholder) if "/" in key else lookup(data, key, placeholder)
    if isinstance(value, (dict, list)):
        raise PlaceholderError(f"{placeholder}: names a {type(value).__name__}, not a single figure")
    try:
        return format(value, fmt or "")
    except (ValueError, TypeError) as e:
        raise PlaceholderError(f"{placeholder}: cannot format {value!r} with {fmt!r}: {e}") from None


def fill_results(text: str, where: str = "") -> str:
    """``text`` with every ``{{result:FILE:KEY[:FORMAT]}}`` replaced by the committed figure; a malformed
    placeholder (anything else starting with ``{{result``) is an error too."""
    def one(m: re.Match) -> str:
        try:
            return resolve(m["file"].strip(), m["key"].strip(), m["fmt"], m[0])
        except PlaceholderError as e:
            raise PlaceholderError(f"{where}: {e}" if where else str(e)) from None

    out = PLACEHOLDER.sub(one, text)
    if "{{result" in out:
        bad = out[out.index("{{result"):][:80]
        raise PlaceholderError(f"{where}: malformed placeholder {bad!r}; expected {{{{result:FILE:KEY.PATH[:FORMAT]}}}}")
    return out


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
        if is_md:
            source = fill_results(source, f"{stem}:{cell_id}")
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


def render_readme(readme: str | None = None) -> str:
    """README.md with the part between its RESULTS markers rebuilt from course_src/readme_results.md."""
    readme = README.read_text() if readme is None else readme
    if readme.count(README_BEGIN) != 1 or readme.count(README_END) != 1:
        raise ValueError(f"README.md needs exactly one {README_BEGIN!r} and one {README_END!r} line")
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    body = fill_results(README_TEMPLATE.read_text(), "course_src/readme_results.md").strip("\n")
    return f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}"


def check_readme() -> bool:
    return render_readme() == README.read_text()


def check(selected: list[str]) -> int:
    """Rebuild into a temporary course folder and compare byte for byte (README's Results section too)."""
    bad = [] if selected or check_readme() else ["README.md"]
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
    ap.add_argument("--readme", action="store_true", help="only rebuild README.md's Results section")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.notebooks)
    if args.readme or not args.notebooks:
        README.write_text(render_readme())
        print("built README.md's Results section from course_src/readme_results.md")
        if args.readme:
            return 0
    for stem in stems(args.notebooks):
        path = build_solution(stem, ROOT / "solutions")
        generate_student(stem, ROOT)
        print(f"built {path.relative_to(ROOT)} and notebooks/{stem}/{stem}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
