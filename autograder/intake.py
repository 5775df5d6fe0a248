"""Turn what an instructor downloads into gradable notebooks, without losing or stopping on any file.

Accepted inputs (:func:`collect`): a folder of notebooks (``student_assignment.ipynb``; Canvas exports
``name[_LATE]_userid_submissionid_file.ipynb``; Moodle ``Full Name_123_assignsubmission_file_/file.ipynb``),
a zip of such a folder, or an nbgrader ``submitted/<student>/<assignment>/`` tree.

Every file becomes one :class:`Submission`. The assignment is recognised from the notebook's nbgrader
cell ids (so a wrong file name still grades), falling back to the file name, then to ``--assignment``.
:func:`repair` then rebuilds the notebook cell by cell against the released copy:

- unreadable JSON, or not a notebook: rejected with the parser's message (the file is kept);
- nbformat 3 or 4.0-4.4: converted to 4.5 (nbformat's converter, then cell ids);
- cells whose nbgrader metadata was deleted: metadata restored when the cell id, or for locked cells the
  exact source, matches the released cell;
- duplicated graded cells: for answer cells the last copy keeps the metadata (it is what the learner
  ran last), for locked and test cells the duplicates are removed;
- locked or test cells whose source or type was edited: noted; nbgrader restores them from the gradebook;
- missing test cells: noted; nbgrader puts them back (``OverwriteCells.add_missing_cells``) and runs them;
- outputs are dropped (autograde clears them anyway), so huge outputs in the file cost nothing.
"""
from __future__ import annotations

import json
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograder.course import Assignment, cell_kind

NOTEBOOK_SUFFIXES = (".ipynb", ".json")
IGNORED = {"timestamp.txt", ".DS_Store", "Thumbs.db"}
CANVAS = re.compile(r"^(?P<student>[A-Za-z][A-Za-z\-]*)(?:_LATE)?_(?P<uid>\d+)_(?P<sid>\d+)_(?P<file>.+)$")
MOODLE = re.compile(r"^(?P<student>[^_]+)_(?P<uid>\d+)_assignsubmission_file_(?P<file>.*)$")


@dataclass
class Submission:
    student: str
    original: Path                    # the file as received
    assignment: str | None = None
    notebook: object | None = None    # nbformat.NotebookNode once read and repaired
    status: str = "ok"                # "ok" | "rejected" | "superseded"
    notes: list[str] = field(default_factory=list)

    def reject(self, why: str) -> "Submission":
        self.status = "rejected"
        self.notes.append(why)
        return self


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s or "unknown"


def _safe_extract(zip_path: Path, dest: Path) -> tuple[Path, list[str]]:
    """Extract a zip, refusing members that would land outside ``dest`` (zip-slip: ``../`` or an
    absolute path) or are links; every other member is extracted. Returns (dest, refused member names)."""
    dest = dest.resolve()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    refused = []
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.infolist():
            target = (dest / member.filename).resolve()
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or not (str(target).startswith(str(dest) + "/") or target == dest):
                refused.append(member.filename)
                continue
            zf.extract(member, dest)
    return dest, refused


def _name_parts(path: Path, known: list[str]) -> tuple[str, str | None, list[str]]:
    """(student, assignment or None, notes) from a file name and its parent folder."""
    stem, notes = path.stem, []
    if stem.endswith(".ipynb"):
        stem = stem[:-6]
    m = MOODLE.match(path.parent.name) or MOODLE.match(stem)
    if m:
        student, rest = slug(m["student"]) + "_" + m["uid"], m["file"] or stem
    elif (m := CANVAS.match(stem)):
        student, rest = slug(m["student"]), m["file"]
    else:
        student, rest = None, stem
    assignment = next((a for a in sorted(known, key=len, reverse=True) if a in rest), None)
    if student is None:
        student = slug(rest.replace(assignment, " ")) if assignment else slug(rest)
        if student in ("unknown", "untitled") or re.fullmatch(r"untitled\d*", student):
            student = slug(path.stem)
    return student, assignment, notes


def collect(inputs: Path, assignments: dict[str, Assignment], hint: str | None, workdir: Path) -> list[Submission]:
    """Find every submitted file under ``inputs`` (folder, zip or nbgrader tree)."""
    inputs = Path(inputs)
    if not inputs.exists():
        raise FileNotFoundError(f"submissions path {inputs} does not exist")
    refused: list[str] = []
    archive = inputs
    if inputs.is_file() and inputs.suffix == ".zip":
        try:
            inputs, refused = _safe_extract(inputs, workdir / "unzipped" / inputs.stem)
        except zipfile.BadZipFile as exc:
            return [Submission(student=slug(inputs.stem), original=inputs).reject(f"not a readable zip file: {exc}")]
    files = [inputs] if inputs.is_file() else sorted(
        p for p in inputs.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts
        and "__MACOSX" not in p.parts and p.name not in IGNORED)
    known = sorted(assignments)
    subs = [Submission(student=slug(Path(name).stem), original=archive).reject(
                f"zip member {name!r} would extract outside the archive's folder (path traversal); refused, "
                "not extracted") for name in refused]
    for f in files:
        rel = f.relative_to(inputs) if f != inputs else Path(f.name)
        if len(rel.parts) == 3 and rel.parts[1] in known:        # nbgrader submitted/<student>/<assignment>/x
            student, name_assignment, notes = slug(rel.parts[0]), rel.parts[1], []
        else:
            student, name_assignment, notes = _name_parts(f, known)
        sub = Submission(student=student, original=f, assignment=name_assignment, notes=notes)
        if f.suffix.lower() not in NOTEBOOK_SUFFIXES:
            subs.append(sub.reject(f"not a notebook ({f.name}); nothing to grade"))
            continue
        read(sub, assignments, hint)
        subs.append(sub)
    _dedupe(subs)
    return subs


def _dedupe(subs: list[Submission]) -> None:
    """Two files for one student and assignment: grade the newest, keep a result for the other."""
    seen: dict[tuple[str, str], Submission] = {}
    for s in sorted((s for s in subs if s.status == "ok"), key=lambda s: (s.original.stat().st_mtime, str(s.original))):
        key = (s.student, s.assignment)
        if key in seen:
            old = seen[key]
            old.status = "superseded"
            old.notes.append(f"superseded by the newer file {s.original.name}")
            s.notes.append(f"newer than {old.original.name}, which is not graded")
        seen[key] = s


def read(sub: Submission, assignments: dict[str, Assignment], hint: str | None) -> Submission:
    raw = sub.original.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8", errors="strict"))
    except UnicodeDecodeError as exc:
        return sub.reject(f"not UTF-8 text ({exc.reason} at byte {exc.start}); is this really a notebook?")
    except json.JSONDecodeError as exc:
        return sub.reject(f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")
    if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
        return sub.reject("valid JSON but not a notebook (no 'cells' list)")
    major = data.get("nbformat")
    if major == 3:
        nb = nbformat.reads(json.dumps(data), as_version=4)
        sub.notes.append("converted from nbformat 3 to 4")
    elif major == 4:
        nb = nbformat.from_dict(data)
    else:
        try:
            nb = nbformat.from_dict({**data, "nbformat": 4, "nbformat_minor": 5})
            sub.notes.append(f"nbformat {major!r} is not supported; read as nbformat 4")
        except Exception as exc:  # noqa: BLE001
            return sub.reject(f"unsupported nbformat {major!r}: {exc}")
    scores = {name: _match_score(nb, a) for name, a in assignments.items()}
    best = max(scores, key=scores.get) if scores else None
    if best and scores[best] > 0:
        if sub.assignment and sub.assignment != best:
            sub.notes.append(f"file name says {sub.assignment} but its cells are those of {best}; graded as {best}")
        elif not sub.assignment:
            sub.notes.append(f"file name {sub.original.name!r} names no assignment; its cells are those of {best}")
        sub.assignment = best
    elif not sub.assignment:
        if hint:
            sub.assignment = hint
            sub.notes.append(f"no nbgrader cells and no assignment in the file name; graded as {hint} (--assignment)")
        else:
            return sub.reject("cannot tell which assignment this is (no nbgrader cells, no assignment in the name); "
                              "pass --assignment")
    if sub.assignment not in assignments:
        return sub.reject(f"unknown assignment {sub.assignment!r}; known: {sorted(assignments)}")
    sub.notebook = repair(nb, assignments[sub.assignment], sub.notes)
    return sub


def _match_score(nb, a: Assignment) -> int:
    """How many cells of ``nb`` belong to assignment ``a``: by nbgrader grade id, by cell id, or by the
    exact source of a locked cell (the last two still work when the learner deleted the metadata)."""
    cells = [c for c in nb.get("cells", []) if isinstance(c, dict)]
    grade_ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in cells} - {None}
    cell_ids = {c.get("id") for c in cells} - {None}
    sources = {str(c.get("source", "")).strip() for c in cells}
    return (len(grade_ids & set(a.by_grade_id()))
            + len(cell_ids & {c.cell_id for c in a.cells if c.grade_id and c.cell_id})
            + len(sources & {c.source.strip() for c in a.cells if c.kind == "locked" and c.source.strip()}))


def _fresh_cell(cell) -> nbformat.NotebookNode:
    ctype = cell.get("cell_type", "code")
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else str(source)
    new = (nbformat.v4.new_code_cell(source) if ctype == "code" else
           nbformat.v4.new_markdown_cell(source) if ctype == "markdown" else nbformat.v4.new_raw_cell(source))
    new.metadata = nbformat.from_dict(dict(cell.get("metadata", {}) or {}))
    if isinstance(cell.get("id"), str) and re.fullmatch(r"[a-zA-Z0-9\-_]{1,64}", cell["id"]):
        new.id = cell["id"]
    return new


def repair(nb, assignment: Assignment, notes: list[str]) -> nbformat.NotebookNode:
    """Rebuild ``nb`` as a valid nbformat 4.5 notebook whose nbgrader cells match the assignment."""
    release = assignment.release_cells
    out = nbformat.v4.new_notebook()
    out.metadata = nbformat.from_dict(dict(nb.get("metadata", {}) or {}))
    cells = [_fresh_cell(c) for c in nb.get("cells", []) if isinstance(c, dict)]
    by_id = {c.get("id"): gid for gid, c in release.items() if c.get("id")}
    by_source = {c["source"].strip(): gid for gid, c in release.items() if cell_kind(c) in ("locked", "test")}
    present = {c.metadata.get("nbgrader", {}).get("grade_id") for c in cells if c.metadata.get("nbgrader")}
    for c in cells:
        if c.metadata.get("nbgrader", {}).get("grade_id"):
            continue
        gid = by_id.get(c.get("id")) or by_source.get(c.source.strip())
        if gid and gid not in present:
            c.metadata["nbgrader"] = nbformat.from_dict(dict(release[gid]["metadata"]["nbgrader"]))
            present.add(gid)
            notes.append(f"cell {gid}: nbgrader metadata was deleted; restored (matched by "
                         f"{'cell id' if by_id.get(c.get('id')) == gid else 'source'})")
    positions: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if gid:
            positions.setdefault(gid, []).append(i)
    drop = set()
    for gid, idx in positions.items():
        if len(idx) < 2:
            continue
        kind = cell_kind(cells[idx[0]])
        if kind in ("answer", "manual"):
            for i in idx[:-1]:
                del cells[i].metadata["nbgrader"]
            notes.append(f"cell {gid} appears {len(idx)} times; the last copy is graded, the others run as plain cells")
        else:
            drop |= set(idx[1:])
            notes.append(f"cell {gid} appears {len(idx)} times; duplicates removed")
    cells = [c for i, c in enumerate(cells) if i not in drop]
    seen_ids: set[str] = set()
    for c in cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if gid in release:
            ref = release[gid]
            if cell_kind(ref) in ("locked", "test"):
                if c.cell_type != ref["cell_type"]:
                    notes.append(f"cell {gid}: type changed to {c.cell_type}; nbgrader restores it")
                elif c.source.strip() != ref["source"].strip():
                    notes.append(f"cell {gid}: locked cell was edited; nbgrader restores the original")
            elif c.cell_type != ref["cell_type"]:
                notes.append(f"cell {gid}: answer cell type changed to {c.cell_type}; restored to {ref['cell_type']}")
                c = _retype(c, ref["cell_type"])
        if c.get("id") in seen_ids or not c.get("id"):
            c.id = nbformat.v4.new_code_cell().id
        seen_ids.add(c.id)
        out.cells.append(c)
    out.cells = [_retype(c, release[c.metadata["nbgrader"]["grade_id"]]["cell_type"])
                 if c.metadata.get("nbgrader", {}).get("grade_id") in release else c for c in out.cells]
    missing = [c.grade_id for c in assignment.cells if c.kind in ("answer", "test", "manual")
               and c.grade_id not in {x.metadata.get("nbgrader", {}).get("grade_id") for x in out.cells}]
    for gid in missing:
        kind = assignment.by_grade_id()[gid].kind
        notes.append(f"{kind} cell {gid} is missing" + ("; nbgrader puts it back and runs it" if kind == "test" else ""))
    nbformat.validate(out)
    return out


def _retype(cell, ctype: str):
    if cell.cell_type == ctype:
        return cell
    new = _fresh_cell({"cell_type": ctype, "source": cell.source, "metadata": cell.metadata, "id": cell.get("id")})
    return new


def store(sub: Submission, course_root: Path, intake_root: Path) -> None:
    """Keep the original file, and write the repaired notebook where nbgrader expects it."""
    keep = intake_root / (sub.assignment or "unknown") / sub.student
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sub.original, keep / sub.original.name)
    if sub.status == "ok":
        dest = course_root / "submitted" / sub.student / sub.assignment
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        nbformat.write(sub.notebook, dest / f"{sub.assignment}.ipynb")
