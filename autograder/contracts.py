"""What crosses the autograder's process boundaries, typed: a :class:`Job` in, a :class:`Result` out.

The pipeline (``python -m autograder grade``)::

    grade.grade (the grading run)  --Job (job.json)-->  worker.grade (one process per submission)
        worker  --HarnessJob (a pipe)-->  harness (learner code, sandboxed; see autograder.harness)
        harness --outputs (the same pipe's other end)-->  worker: compared in the worker's process
    worker  --Result (results/<A>/<student>.json)-->  reports (grades.csv, summary, audit)

Every field is a plain JSON value, so ``to_json``/``from_json`` are ``dataclasses.asdict`` and the
constructor; :meth:`Result.from_json` accepts result files written by older versions (missing fields
take their defaults, unknown ones are dropped). Defaults that the CLI, the grading run and the
sandbox share (memory, timeouts, jobs) are stated once, in :data:`DEFAULTS`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class Defaults:
    """The one place where the grader's default limits are written."""
    jobs: int = 2                      # submissions graded at once (CLI --jobs and grade.Options)
    cell_timeout: int = 120            # seconds per notebook cell, per judged answer cell and per case
    submission_timeout: int = 900      # wall seconds per submission; the watchdog ends its sandboxes then
    memory_mb: int = 4096              # address space of each sandboxed process (CPU torch maps ~650 MB; a CUDA build several GB: sandbox.memory_room)
    cpu_seconds: int = 1800            # RLIMIT_CPU backstop of each sandboxed process
    file_mb: int = 256                 # largest file a sandboxed process may write
    nproc: int = 4096                  # RLIMIT_NPROC backstop, per uid (the PID namespace is the real bound)
    output_bytes: int = 1_000_000      # what one notebook cell may print


DEFAULTS = Defaults()

#: Result.status values: graded by the whole pipeline, or why not.
STATUSES = ("graded", "error", "timeout", "rejected", "superseded", "ok")


def _known(cls, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


class JsonRecord:
    """A dataclass that is one JSON file: ``to_json``/``from_json`` are ``asdict`` and the constructor
    (fields the file lacks take their defaults, fields this version does not know are dropped)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls(**_known(cls, json.loads(text)))

    def write(self, path: Path) -> None:
        """Atomically (a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path):
        return cls.from_json(Path(path).read_text())


@dataclass
class Limits:
    """Per-process limits of a sandboxed process (see :func:`autograder.sandbox.apply_limits`).

    ``memory_mb`` bounds the address space (``RLIMIT_AS``; importing torch needs about 1024 MB),
    ``cpu_seconds`` the CPU time, ``file_mb`` the largest file written, ``nproc`` the processes of the
    sandbox's user (a backstop: the PID namespace dies as a whole at the time limit)."""
    memory_mb: int = DEFAULTS.memory_mb
    cpu_seconds: int = DEFAULTS.cpu_seconds
    file_mb: int = DEFAULTS.file_mb
    nproc: int = DEFAULTS.nproc

    def __post_init__(self) -> None:
        if self.memory_mb < 1024:
            raise ValueError(f"memory_mb={self.memory_mb} is too small: importing torch needs about 1024 MB")
        for name in ("cpu_seconds", "file_mb", "nproc"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    def as_env(self) -> dict[str, str]:
        """The limits as environment variables (the kernel reads them: nbgrader starts it, not we)."""
        return {"AUTOGRADER_MEMORY_MB": str(self.memory_mb), "AUTOGRADER_CPU_S": str(self.cpu_seconds),
                "AUTOGRADER_FILE_MB": str(self.file_mb), "AUTOGRADER_NPROC": str(self.nproc)}

    @classmethod
    def from_env(cls, env=None) -> "Limits":
        env = os.environ if env is None else env
        return cls(int(env.get("AUTOGRADER_MEMORY_MB", DEFAULTS.memory_mb)),
                   int(env.get("AUTOGRADER_CPU_S", DEFAULTS.cpu_seconds)),
                   int(env.get("AUTOGRADER_FILE_MB", DEFAULTS.file_mb)),
                   int(env.get("AUTOGRADER_NPROC", DEFAULTS.nproc)))


@dataclass
class Job(JsonRecord):
    """Everything one worker needs to grade one submission (written by ``grade.grade`` to the worker's
    own folder, which no sandbox can see).

    Paths are absolute strings. ``case_seed`` is the grading run's secret: the judge's hidden cases are
    drawn from it (see :func:`lora_ref.exercises.draw_cases`), so no table of outputs can be prepared.
    ``isolation`` is ``"namespaces"`` (user, mount, PID and network namespaces) or ``"none"`` (only when
    the instructor accepted grading without them; every result then says so)."""
    student: str
    assignment: str
    original: str                      # the file as received (intake/...)
    course_root: str                   # nbgrader course root (gradebook, autograded/, feedback/)
    source_dir: str                    # instructor notebooks
    db_url: str
    out: str                           # the grading output folder (hidden from every sandbox)
    scratch: str                       # this submission's worker folder (see autograder.layout)
    result_path: str
    reference: str                     # reference outputs of the assignment's exercises (safetensors)
    exercises: list[str]               # exercise ids judged for this assignment
    exercises_of: dict[str, list[str]]  # test cell grade_id -> exercise ids its check() calls name
    test_points: dict[str, float]      # test cell grade_id -> points
    max_score: float
    hidden_lines: list[str]            # lines of the hidden tests (feedback is checked for them)
    case_seed: int = 0
    course_id: str = "lora-course"
    notes: list[str] = field(default_factory=list)
    previous_withdrawals: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    cell_timeout: int = DEFAULTS.cell_timeout
    judge_timeout: int = DEFAULTS.submission_timeout // 3
    submission_timeout: int = DEFAULTS.submission_timeout
    threads: int = 1
    output_bytes: int = DEFAULTS.output_bytes
    jupyter_path: str = ""             # where the autograder-sandbox kernelspec lives
    mpl_cache: str | None = None       # read-only matplotlib font cache, exposed to the kernel
    model_cache: str | None = None     # read-only lora_ref model cache, exposed to the kernel
    hidden: list[str] = field(default_factory=list)    # folders every sandbox sees empty
    isolation: str = "namespaces"

    def __post_init__(self) -> None:
        if isinstance(self.limits, dict):
            self.limits = Limits(**_known(Limits, self.limits))



@dataclass
class ExerciseOutcome:
    """The judge's verdict on one exercise: passed when every one of its ``cases`` matched."""
    id: str
    passed: bool
    cases: int = 0
    cases_passed: int = 0
    error: str = ""                    # the first failure, learner-facing (names the case, never hidden code)


@dataclass
class CellScore:
    """One test cell: nbgrader's score after withdrawal, and why it lost points."""
    score: float
    max: float
    error: str = ""
    exercises: list[str] = field(default_factory=list)
    withdrawn: bool = False            # nbgrader gave points, the judge failed one of ``exercises``


@dataclass
class Audit:
    """``flag``: ``ok``, ``review`` (suspicious pattern only) or ``integrity`` (points withdrawn, watched
    attributes replaced, an escape attempt blocked or recorded)."""
    flag: str = "ok"
    static: list[str] = field(default_factory=list)     # findings of autograder.audit.scan
    runtime: list[str] = field(default_factory=list)    # what the sandboxes recorded ("kernel: ...", "judge: ...")
    withdrawn: list[str] = field(default_factory=list)  # evidence for each withdrawn cell


@dataclass
class Result(JsonRecord):
    """One submission's outcome (``results/<assignment>/<student>.json``), filled stage by stage by
    :func:`autograder.worker.grade`: judge (``judge``, ``judge_cells``, ``judge_deaths``, ``patched``),
    autograde (``nbgrader_score``, ``crashes``), withdraw (``cells``, ``withdrawn``, ``score``), audit
    (``audit``), feedback (``feedback``, ``hidden_leaks``). ``notes`` are the lines grades.csv shows."""
    student: str
    assignment: str
    original: str = ""
    status: str = "graded"
    notes: list[str] = field(default_factory=list)
    score: float = 0.0
    max_score: float = 0.0
    nbgrader_score: float = 0.0
    cells: dict[str, CellScore] = field(default_factory=dict)
    judge: dict[str, ExerciseOutcome] = field(default_factory=dict)
    judge_cells: dict[str, str] = field(default_factory=dict)   # answer cell grade_id -> error in the judge
    judge_deaths: list[str] = field(default_factory=list)       # how the judge's process died, per attempt
    patched: list[str] = field(default_factory=list)            # watched attributes the answers replaced
    crashes: list[str] = field(default_factory=list)            # kernel deaths during nbgrader autograde
    withdrawn: list[str] = field(default_factory=list)          # test cells whose points were withdrawn
    manual_pending: list[str] = field(default_factory=list)     # manually graded cells not yet graded
    audit: Audit = field(default_factory=Audit)
    feedback: str = ""
    hidden_leaks: list[str] = field(default_factory=list)
    containment: str = ""              # how learner code was isolated (see autograder.sandbox.Report)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    traceback: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.audit, dict):
            self.audit = Audit(**_known(Audit, self.audit))
        self.cells = {k: CellScore(**_known(CellScore, v)) if isinstance(v, dict) else v
                      for k, v in self.cells.items()}
        self.judge = {k: ExerciseOutcome(**_known(ExerciseOutcome, v)) if isinstance(v, dict) else v
                      for k, v in self.judge.items()}

    @classmethod
    def error(cls, problem: str, *, job: Job | None = None, status: str = "error", student: str = "",
              assignment: str = "", original: str = "", notes: list[str] = (), max_score: float = 0.0,
              traceback: str = "") -> "Result":
        """A submission that got no grade (or a static one): ``problem`` is appended to the notes. With a
        ``job``, its identity, notes, maximum and previous withdrawals are kept (a later run clears them)."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r} is not one of {STATUSES}")
        if job is not None:
            student, assignment, original = job.student, job.assignment, job.original
            notes, max_score = list(job.notes) + list(notes), job.max_score
        result = cls(student=student, assignment=assignment or "unknown", original=str(original), status=status,
                     notes=list(notes) + ([problem] if problem else []), max_score=max_score, traceback=traceback)
        if job is not None:
            result.withdrawn = list(job.previous_withdrawals)
            result.containment = job.isolation
        return result


    def why(self) -> list[str]:
        """Why this submission lost points or was flagged, one line each (grades.csv's notes): the
        notes, then kernel crashes, judge deaths (timeout, memory, signal), withdrawals with their
        evidence (a lack of isolation is already a note: the worker's audit stage adds it)."""
        lines = list(self.notes)
        lines += [f"kernel: {c}" for c in self.crashes]
        lines += [f"judge: {d}" for d in self.judge_deaths]
        lines += [f"withdrawn {w}" for w in self.audit.withdrawn]
        if self.patched:
            lines.append(f"replaced watched attributes: {', '.join(self.patched[:5])}")
        blocked = [r for r in self.audit.runtime if ": blocked_" in r or ": write_outside:" in r]
        if blocked:
            lines.append(f"escape attempts recorded: {len(blocked)} (first: {blocked[0][:120]})")
        return lines
