"""The out-of-kernel judge, grader side: hidden tests that monkeypatching inside the notebook cannot fake.

In the notebook kernel a hidden test runs ``check("02.lora_linear", LoRALinear)`` next to the learner's
code, so a learner who replaces ``torch.allclose``, ``check`` or the reference passes it there. The judge
repeats every such check where the learner's code cannot reach the cases' answers or the comparison:

1. **Cases and reference** (:func:`reference_outputs`, once per grading run, in the grading run's process):
   draw every exercise's cases from the run's secret seed (``lora_ref.exercises.draw_cases``; exercises
   with fixed cases keep them), make the inputs that need lora_ref (``given``), run the reference, save
   cases, inputs and outputs in ``reference/<A>.safetensors`` (hidden from every sandbox).
2. **Run** (:func:`run_judge`, in the worker): start :mod:`autograder.harness` in fresh namespaces
   (:func:`autograder.sandbox.command`), send it the answer cells and the cases on its stdin, read the
   learner's outputs and progress from its stdout, kill it at its time limit. A process that dies in a
   cell or a case is started again without it (at most ``MAX_CRASHES`` times).
3. **Compare** (:func:`verdicts`, in the worker): ``lora_ref.exercises.compare`` on the learner's outputs
   and the reference outputs, case by case (shape, dtype, values). An exercise passes when every case matches.

What the judge relies on from ``lora_ref.exercises`` (see its ``Exercise``): cases are seeded plain values,
``run`` makes its own inputs; the learner's symbol is defined by the notebook's answer cells alone, with
``torch, nn, F, math, np`` predefined (answer cells are replayed without the rest of the notebook and
without lora_ref importable); a test cell is judged on the exercises of the ``check("NN.name", ...)``
calls in its source, whose ids must be string literals (:func:`autograder.course.check_calls`).
Exercises beyond the course's (the self-test assignment's) come from
:func:`autograder.course.register_extra_exercises`.

The safetensors keys are ``"out|<exercise id>|<case>|<output>"`` (reference outputs) and
``"<exercise id>|<case>#<n>"`` (case inputs); the cases themselves are in the file's metadata.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from autograder import sandbox
from autograder.contracts import ExerciseOutcome, Limits
from autograder.harness import decode_case, encode_case, read_frame, write_frame  # noqa: F401 (decode: tests)

SEP = "|"
MAX_CRASHES = 3
MAX_OUTPUT_BYTES = 512 << 20          # what the harness may send back in all


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


# -- 1. cases and reference outputs, in the grading run's process ------------------------------------------------

def reference_outputs(exercise_ids: list[str], path: Path, secret: int | None = None) -> dict[str, str]:
    """Draw the cases (from ``secret``; None: the fixed ones), run each exercise's reference on them, save
    cases, inputs and outputs to ``path``; return {id: error} for exercises whose reference failed."""
    from safetensors.torch import save_file
    import lora_ref.exercises as exercises

    tensors, errors, cases = {}, {}, {}
    for ex_id in exercise_ids:
        try:
            ex = exercises.get(ex_id)
            drawn = exercises.draw_cases(ex, secret)
            encoded = []
            for i, case in enumerate(drawn):
                for name, value in ex.run(ex.reference, case).items():
                    tensors[f"out{SEP}{ex_id}{SEP}{i}{SEP}{name}"] = value.detach().cpu().clone().contiguous()
                encoded.append(encode_case(case, tensors, f"{ex_id}{SEP}{i}"))
            cases[ex_id] = encoded
        except Exception as exc:  # noqa: BLE001
            errors[ex_id] = _first_line(exc)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the harness's allowed modules need every notebook's exercises imported: worked out once per run, here
    save_file(tensors, str(path), metadata={"cases": json.dumps(cases), "allowed": json.dumps(harmless_modules())})
    return errors


def load_reference(path: Path) -> tuple[dict[str, list], dict, dict[tuple[str, int], dict]]:
    """(encoded cases by exercise, case input tensors, reference outputs by (exercise, case))."""
    from safetensors import safe_open

    inputs, want = {}, {}
    with safe_open(str(path), framework="pt") as f:
        cases = json.loads((f.metadata() or {}).get("cases", "{}"))
        for key in f.keys():
            if key.startswith("out" + SEP):
                _, ex_id, i, name = key.split(SEP, 3)
                want.setdefault((ex_id, int(i)), {})[name] = f.get_tensor(key)
            else:
                inputs[key] = f.get_tensor(key)
    return cases, inputs, want


# -- 2. run the learner's answers in the harness ----------------------------------------------------------------

def _repository() -> Path:
    return Path(__file__).resolve().parents[1]


def judge_plan(work: Path, hidden: list[str]) -> sandbox.Plan:
    """The harness sees its work folder (writable) and the Python installation; the grading folder, the
    instructor's notebooks, the submissions, the repository with the reference package, and
    :data:`~autograder.sandbox.PRIVATE_ROOTS` are hidden."""
    repo = str(_repository())
    expose = [p for p in sandbox.python_paths() if p != repo]
    return sandbox.Plan(writable=[str(work)], hidden=[*hidden, repo, *sandbox.PRIVATE_ROOTS], expose=expose,
                        cwd=str(work))


def run_judge(answers: list[dict], exercise_ids: list[str], reference: Path, judge_dir: Path, *,
              limits: Limits, cell_timeout: float, judge_timeout: float, hidden: list[str] = (),
              isolated: bool = True) -> tuple[dict, list[str]]:
    """Run the learner's ``answers`` (``[{"grade_id", "source"}]``) against the cases saved in ``reference``;
    when the harness dies in an answer cell or a case, run it again without that cell or case.

    Returns (log, deaths): ``log["cells"]`` grade_id -> "ok"/error, ``log["cases"]`` exercise ->
    {"n", "errors": {i: error}, "error"}, ``log["outputs"]`` (exercise, case) -> tensors, ``log["patched"]``,
    ``log["stage"]``, ``log["containment"]``; deaths: how each attempt that died ended."""
    skip_cells: list[str] = []
    skip_cases: dict[str, list[int]] = {}
    deaths: list[str] = []
    patched: set[str] = set()
    cases, inputs, _ = load_reference(reference)
    cases = {k: v for k, v in cases.items() if k in exercise_ids}
    allowed = _allowed_modules(reference)
    log: dict = {}
    for _ in range(MAX_CRASHES + 1):
        log, died = _judge_once(answers, cases, inputs, allowed, judge_dir, limits, cell_timeout, judge_timeout,
                                hidden, isolated, skip_cells, skip_cases)
        patched |= set(log.get("patched", []))          # evidence from attempts that died is kept
        log["patched"] = sorted(patched)
        if not died:
            return log, deaths
        deaths.append(died)
        running = log.get("running")
        if log.get("stage") == "answers" and running and running[0] == "cell":
            skip_cells.append(running[1])
        elif log.get("stage") == "cases" and running and running[0] == "case":
            skip_cases.setdefault(running[1], []).append(running[2])
        else:
            return log, deaths
    return log, deaths


def _allowed_modules(reference: Path) -> list[str]:
    """:func:`harmless_modules` as the grading run saved it beside the cases (else worked out here)."""
    from safetensors import safe_open
    with safe_open(str(reference), framework="pt") as f:
        saved = (f.metadata() or {}).get("allowed")
    return json.loads(saved) if saved else harmless_modules()


def _judge_once(answers, cases, inputs, allowed, judge_dir: Path, limits: Limits, cell_timeout, judge_timeout, hidden,
                isolated, skip_cells, skip_cases) -> tuple[dict, str]:
    from safetensors.torch import load, save

    from autograder import layout
    work = layout.judge_work(judge_dir)
    work.mkdir(parents=True, exist_ok=True)
    modules = sorted({_module_of(ex_id) for ex_id in cases})
    header = {"plan": judge_plan(work, hidden).__dict__, "limits": limits.__dict__, "modules": modules,
              "allowed": allowed,
              "cases": cases, "answer_cells": answers, "cell_timeout": cell_timeout, "case_timeout": cell_timeout,
              "skip_cells": skip_cells, "skip_cases": skip_cases}
    blob = save(inputs) if inputs else b""
    env = dict(os.environ, HOME=str(work), TMPDIR=str(work), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(work / "torchinductor"),
               TRITON_CACHE_DIR=str(work / "triton"), AUTOGRADER_ISOLATION=sandbox.NAMESPACES if isolated else "none",
               # the grader's own PYTHONPATH after the repository: packages installed with pip --target
               PYTHONPATH=os.pathsep.join([str(_repository()), *sandbox.extra_import_paths()]))
    for key in [k for k in env if k.startswith("AUTOGRADER_") and k != "AUTOGRADER_ISOLATION"]:
        del env[key]
    log: dict = {"cells": {}, "cases": {ex_id: {"n": len(cs), "errors": {}} for ex_id, cs in cases.items()},
                 "outputs": {}, "patched": [], "stage": "setup", "running": None, "containment": ""}
    died = ""
    with open(layout.judge_stderr(judge_dir), "wb") as err:
        proc = subprocess.Popen(sandbox.command(["-m", "autograder.harness"], isolated), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(work))
        try:
            write_frame(proc.stdin.fileno(), "J", header, blob)
            proc.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + judge_timeout
        received = 0
        stream = _Reader(proc.stdout.fileno(), deadline)
        try:
            while True:
                frame = read_frame(stream, MAX_OUTPUT_BYTES - received)
                if frame is None:
                    break
                kind, head, data = frame
                received += len(data)
                if received > MAX_OUTPUT_BYTES:
                    raise ValueError("the judge sent more than the output limit")
                _apply(log, kind, head, data, load)
        except TimeoutError:
            died = f"the judge ran past its time limit ({judge_timeout} s)"
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            died = f"the judge's output was garbled ({_first_line(exc)})"
        finally:
            _kill(proc)
        rc = proc.wait()
    if not died and log["stage"] != "done":
        died = f"the judge process died with {_exit_text(rc)}"
    if died:
        run = log.get("running")
        where = (f" while running answer cell {run[1]}" if run and run[0] == "cell" and log["stage"] == "answers" else
                 f" while running {run[1]} case {run[2]}" if run and run[0] == "case" else
                 f" during stage {log['stage']!r}")
        died += where
    return log, died


class _Reader:
    """A file-like view of a pipe that raises TimeoutError past ``deadline``."""

    def __init__(self, fd: int, deadline: float):
        self.fd, self.deadline = fd, deadline

    def read(self, n: int) -> bytes:
        chunks, left = [], n
        while left > 0:
            wait = self.deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _apply(log: dict, kind: str, head: dict, data: bytes, load) -> None:
    """Fold one message of the harness into the log (only for cases and cells the worker sent)."""
    if "containment" in head:
        log["containment"] = str(head["containment"])
        log["stage"] = "answers"
    elif "cell" in head:
        gid = str(head["cell"])
        if head.get("status") == "running":
            log["running"] = ("cell", gid)
            log["cells"][gid] = "running"
        else:
            log["cells"][gid] = str(head.get("error") or "ok")[:2000]
            log["patched"] = [str(p) for p in head.get("patched", [])][:200]
            log["running"] = None
    elif head.get("stage") == "cases":
        log["stage"] = "cases"
    elif head.get("stage") == "done":
        log["stage"] = "done"
        log["patched"] = [str(p) for p in head.get("patched", [])][:200]
    elif "exercise" in head:
        entry = log["cases"].get(str(head["exercise"]))
        if entry is not None:
            entry["error"] = str(head.get("error", ""))[:2000]
    elif "case" in head:
        ex_id, i = str(head["case"][0]), int(head["case"][1])
        entry = log["cases"].get(ex_id)
        if entry is None or not 0 <= i < entry["n"]:
            return
        if head.get("status") == "running":
            log["running"] = ("case", ex_id, i)
        elif kind == "T":
            log["outputs"][(ex_id, i)] = load(data)       # safetensors: tensors only, no code
            log["running"] = None
        else:
            entry["errors"][str(i)] = str(head.get("error", ""))[:2000]
            log["running"] = None


INPUT_MODULES = ("lora_ref.models", "lora_ref._checks")   # what drivers may need beside learner code


def harmless_modules() -> list[str]:
    """The modules of :data:`INPUT_MODULES` (test models, input checks) that hold no exercise's reference
    of any notebook: the harness may load them; every other lora_ref module is sealed there."""
    import importlib
    import pkgutil

    import lora_ref
    import lora_ref.exercises as exercises
    exercises.load_all()
    holders = {getattr(ex.reference, "__module__", None) for ex in exercises.REGISTRY.values()}
    names = [f"lora_ref.{m.name}" for m in pkgutil.iter_modules(lora_ref.__path__)
             if f"lora_ref.{m.name}" in INPUT_MODULES]
    harmless = []
    for name in names:
        if name in holders:
            continue
        module = importlib.import_module(name)
        # a module that re-exports a reference (``from lora_ref.lora import X``) holds it too
        if not any(any(v is ex.reference for ex in exercises.REGISTRY.values()) for v in vars(module).values()):
            harmless.append(name)
    return harmless


def _module_of(ex_id: str) -> str:
    import lora_ref.exercises as exercises
    return exercises.get(ex_id).run.__module__


def _kill(proc: subprocess.Popen) -> None:
    """End the harness and, with it, its whole PID namespace (``--kill-child``): the worker started it."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except OSError:
            pass


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


# -- 3. verdicts, in the worker's process -------------------------------------------------------------------------

def verdicts(exercise_ids: list[str], log: dict, reference: Path) -> dict[str, ExerciseOutcome]:
    """Compare the learner's outputs (``log["outputs"]``) with the reference outputs, case by case."""
    import lora_ref.exercises as exercises

    cases, inputs, want = load_reference(reference)
    got = log.get("outputs", {})
    result = {}
    for ex_id in exercise_ids:
        entry = log.get("cases", {}).get(ex_id, {})
        try:
            ex = exercises.get(ex_id)
            ex_cases = [decode_case(c, inputs) for c in cases[ex_id]]
        except Exception as exc:  # noqa: BLE001
            result[ex_id] = ExerciseOutcome(ex_id, False, error=f"grader error: {_first_line(exc)}")
            continue
        outcome = ExerciseOutcome(ex_id, False, cases=len(ex_cases))
        errors = []
        if entry.get("error"):
            errors.append(entry["error"])
        else:
            for i, case in enumerate(ex_cases):
                if str(i) in entry.get("errors", {}):
                    errors.append(f"case {i} ({exercises.describe(case)}): {entry['errors'][str(i)]}")
                    continue
                if (ex_id, i) not in want:
                    errors.append(f"grader error: no reference output for case {i}")
                    continue
                try:
                    exercises.compare(ex, case, got.get((ex_id, i), {}), want[(ex_id, i)])
                    outcome.cases_passed += 1
                except AssertionError as exc:
                    errors.append(str(exc).splitlines()[0])
            if not entry and not got:
                errors.insert(0, "the judge produced no output for this exercise")
        outcome.passed = not errors and outcome.cases_passed == len(ex_cases)
        outcome.error = errors[0] if errors else ""
        result[ex_id] = outcome
    return result
