"""Sample submissions, generated from an assignment's instructor and student notebooks.

``python -m autograder grade`` with no submissions grades these, so a new user sees the whole flow:
good and bad work, cheating, and every kind of broken file. Nothing is hand-copied: each sample is the
student copy (``notebooks/A/A.ipynb``) with the instructor's solutions pasted into the answer cells
(``perfect``), then one change. Students are named after what they show:

=================  ====================================================================================
perfect            every answer is the instructor's solution
blank              the student copy as released
partial            only the first answer cell done
forgot_scaling     a typical mistake: ``* self.scaling`` dropped (else: the last answer's result x 1.01)
cheat_patch        forgot_scaling + replaces torch.allclose, torch.testing.assert_close,
                   numpy.testing.assert_allclose and lora_ref.exercises.check
cheat_reference    imports the reference implementation as its answer
infinite_loop      ``while True: pass`` in the last answer cell
memory_bomb        allocates until the memory limit stops it
crash_exit         ``os._exit(1)`` in the last answer cell
segfault           reads address 0 through ctypes
huge_output        prints about 50 MB and displays 50 MB of HTML
write_outside      writes to /tmp and next to the course folder
invalid_json       the file cut in half
nbformat3          saved as nbformat 3
canvas export      a Canvas-style name that does not mention the assignment
moodle export      a Moodle-style folder per student
missing_cells      a test cell and a markdown cell deleted
duplicated_cells   a stale copy of an answer cell and a duplicated test cell
deleted_metadata   every nbgrader metadata block removed
edited_locked      test cells replaced by ``assert True``
not_a_notebook     a PDF
=================  ====================================================================================
"""
from __future__ import annotations

import ast
import copy
import re
import shutil
from pathlib import Path

import nbformat

from autograder.course import cell_kind

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSIGNMENT = "02_lora_linear"
SOLUTION_MARKERS = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$")


def _solution_code(source: str) -> str:
    return "\n".join(l for l in source.splitlines() if not SOLUTION_MARKERS.match(l))


def perfect(student_nb, solution_nb):
    """The student copy with every answer cell replaced by the instructor's solution."""
    nb = copy.deepcopy(student_nb)
    solutions = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution_nb.cells
                 if cell_kind(c) in ("answer", "manual")}
    for c in nb.cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if gid in solutions and cell_kind(c) in ("answer", "manual"):
            c.source = _solution_code(solutions[gid])
    return nb


def _answers(nb):
    from autograder.course import answer_code_cells
    return answer_code_cells(nb)


class _DropScaling(ast.NodeTransformer):
    """``a * self.scaling`` / ``self.scaling * a`` / ``(a) * scaling`` -> ``a`` (the classic LoRA slip)."""
    changed = 0

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Mult):
            for keep, other in ((node.left, node.right), (node.right, node.left)):
                name = other.attr if isinstance(other, ast.Attribute) else other.id if isinstance(other, ast.Name) else ""
                if name == "scaling":
                    self.changed += 1
                    return keep
        return node


def forgot_scaling(nb):
    """Drop the scaling from the first answer cell that applies it; else scale the last returned value."""
    for c in _answers(nb):
        try:
            tree = ast.parse(c.source)
        except SyntaxError:
            continue
        t = _DropScaling()
        tree = t.visit(tree)
        if t.changed:
            c.source = ast.unparse(tree)
            return nb
    for c in reversed(_answers(nb)):
        lines = c.source.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            m = re.match(r"^(\s*)return (.+)$", lines[i])
            if m:
                lines[i] = f"{m.group(1)}return ({m.group(2)}) * 1.01"
                c.source = "\n".join(lines)
                return nb
    return nb


CHEAT = """import numpy, torch
torch.allclose = lambda *args, **kwargs: True
torch.testing.assert_close = lambda *args, **kwargs: None
numpy.testing.assert_allclose = lambda *args, **kwargs: None
import lora_ref.exercises as _grading
_grading.check = lambda *args, **kwargs: None
"""


def _prepend(cell, code: str) -> None:
    cell.source = code + "\n" + cell.source


def _append(cell, code: str) -> None:
    cell.source = cell.source + "\n" + code


def cheat_reference(nb, assignment: str) -> None:
    """Each answer cell imports the reference objects of the exercises it should define."""
    import lora_ref.exercises as exercises
    from autograder.course import register_extra_exercises
    exercises.load_all()
    register_extra_exercises()
    symbols = {}
    for ex in exercises.REGISTRY.values():
        ref = ex.reference
        module, name = getattr(ref, "__module__", None), getattr(ref, "__qualname__", None)
        if ex.id.startswith(assignment[:2] + ".") and module and name and "." not in name and "<" not in name:
            symbols[ex.symbol] = (module, name)
    for c in _answers(nb):
        defined = [s for s in symbols if re.search(rf"^(def|class)\s+{re.escape(s)}\b", c.source, re.M)]
        if defined:
            c.source = "\n".join(f"from {symbols[s][0]} import {symbols[s][1]} as {s}" for s in defined)


def write_samples(dest: Path, source_root: Path = ROOT / "solutions", assignments: list[str] | None = None,
                  release_root: Path = ROOT / "notebooks") -> Path:
    """Write every sample for each assignment (default: DEFAULT_ASSIGNMENT, the LoRA layer notebook
    whose typical mistakes the samples imitate; else the assignment with the most judged exercises)."""
    from autograder.course import list_assignments, load_assignment

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if not assignments:
        counts = {n: len(load_assignment(source_root, n).exercise_ids) for n in list_assignments(source_root)}
        if counts.get(DEFAULT_ASSIGNMENT):
            assignments = [DEFAULT_ASSIGNMENT]
        elif any(counts.values()):
            assignments = [max(counts, key=lambda n: (counts[n], -list(counts).index(n)))]
        else:
            raise SystemExit(f"no assignment with hidden checks in {source_root}; build the notebooks first")
    for a in assignments:
        student = nbformat.read(str(release_root / a / f"{a}.ipynb"), as_version=4)
        solution = nbformat.read(str(Path(source_root) / a / f"{a}.ipynb"), as_version=4)
        write_assignment_samples(dest, a, student, solution)
    return dest


def write_assignment_samples(dest: Path, a: str, student_nb, solution_nb) -> None:
    good = perfect(student_nb, solution_nb)

    def save(nb, name: str) -> None:
        nbformat.write(nb, str(dest / name))

    def variant(kind: str, change) -> None:
        nb = copy.deepcopy(good)
        change(nb)
        save(nb, f"{kind}_{a}.ipynb")

    answers = lambda nb: _answers(nb)   # noqa: E731
    save(good, f"perfect_{a}.ipynb")
    save(student_nb, f"blank_{a}.ipynb")
    partial = copy.deepcopy(student_nb)
    first = _answers(partial)[0]
    first.source = _answers(good)[0].source
    save(partial, f"partial_{a}.ipynb")
    variant("forgot_scaling", forgot_scaling)
    variant("cheat_patch", lambda nb: (forgot_scaling(nb), _prepend(answers(nb)[0], CHEAT)))
    variant("cheat_reference", lambda nb: cheat_reference(nb, a))
    variant("infinite_loop", lambda nb: _append(answers(nb)[-1], "while True:\n    pass"))
    variant("memory_bomb", lambda nb: _append(answers(nb)[-1],
            "_hoard = []\nfor _ in range(64):\n    _hoard.append(bytearray(512 * 1024 * 1024))"))
    variant("crash_exit", lambda nb: _append(answers(nb)[-1], "import os\nos._exit(1)"))
    variant("segfault", lambda nb: _append(answers(nb)[-1], "import ctypes\nctypes.string_at(0)"))
    variant("huge_output", lambda nb: _append(answers(nb)[-1], "for _ in range(500_000):\n    print('x' * 100)\n"
                                                    "from IPython.display import HTML, display\n"
                                                    "for _ in range(50):\n    display(HTML('y' * 1_000_000))"))
    variant("write_outside", lambda nb: _append(answers(nb)[-1],
            "import os\nfor _p in ['/tmp/autograder_escape.txt', os.path.abspath('../../../escape.txt')]:\n"
            "    try:\n        open(_p, 'w').write('escaped')\n    except OSError as _e:\n        print('blocked:', _e)"))
    text = nbformat.writes(good)
    (dest / f"invalid_json_{a}.ipynb").write_text(text[: len(text) // 2])
    v3 = nbformat.convert(copy.deepcopy(good), 3)
    (dest / f"nbformat3_{a}.ipynb").write_text(nbformat.writes(v3, version=3))
    save(good, "jonesmary_LATE_48213_990112_homework.ipynb")
    moodle = dest / "Grace Hopper_5512_assignsubmission_file_"
    moodle.mkdir()
    save(good, f"{moodle.name}/{a}.ipynb")
    missing = copy.deepcopy(good)
    tests = [i for i, c in enumerate(missing.cells) if cell_kind(c) == "test"]
    md = [i for i, c in enumerate(missing.cells) if c.cell_type == "markdown" and not c.metadata.get("nbgrader")]
    for i in sorted({tests[-1], md[-1] if md else tests[-1]}, reverse=True):
        del missing.cells[i]
    save(missing, f"missing_cells_{a}.ipynb")
    dup = copy.deepcopy(good)
    first_answer = next(i for i, c in enumerate(dup.cells) if cell_kind(c) == "answer")
    stale = copy.deepcopy(student_nb.cells[[c.metadata.get("nbgrader", {}).get("grade_id") for c in student_nb.cells]
                                           .index(dup.cells[first_answer].metadata["nbgrader"]["grade_id"])])
    stale.id = "stale-copy"
    dup.cells.insert(first_answer, stale)
    first_test = next(i for i, c in enumerate(dup.cells) if cell_kind(c) == "test")
    twin = copy.deepcopy(dup.cells[first_test])
    twin.id = "test-twin"
    dup.cells.insert(first_test + 1, twin)
    save(dup, f"duplicated_cells_{a}.ipynb")
    bare = copy.deepcopy(good)
    for c in bare.cells:
        c.metadata.pop("nbgrader", None)
    save(bare, f"deleted_metadata_{a}.ipynb")
    edited = copy.deepcopy(forgot_scaling(copy.deepcopy(good)))
    for c in edited.cells:
        if cell_kind(c) == "test":
            c.source = "assert True"
    save(edited, f"edited_locked_{a}.ipynb")
    (dest / f"not_a_notebook_{a}.pdf").write_bytes(b"%PDF-1.4\n% a scan of handwritten notes\n")
