"""The out-of-kernel judge: hidden tests that monkeypatching inside the notebook cannot fake.

In the notebook kernel a hidden test runs ``check("02.lora_linear", LoRALinear)`` next to the learner's
code, so a learner who replaces ``torch.allclose``, ``check`` or the reference passes it. The judge
repeats every such check where the learner's code cannot reach the comparison:

1. **Run** (``python -m autograder.judge run``, one sandboxed process per submission, see
   :mod:`autograder.sandbox`): load the exercises and their deterministic cases *before* any learner
   code, then drop the reference package from ``sys.modules`` and block importing it again (and reading
   its files) with an audit hook; execute only the learner's answer cells (nbgrader ``solution=true,
   grade=false``; self-contained by convention, with ``torch, nn, F, math, np`` predefined), each
   under a time limit; call each exercise's ``run`` on the learner's symbol for every case; save the
   named output tensors with safetensors (raw numbers only cross the process boundary) plus a JSON
   log: per-cell errors, per-case errors, and which watched attributes (``torch.*``, ``torch.Tensor.*``,
   ``numpy.testing.*``, ``builtins.*``, ...) the answer cells replaced.
2. **Reference** (:func:`reference_outputs`, in the grader's own process, which never runs learner
   code): run each exercise's reference on the same cases.
3. **Compare** (:func:`verdicts`, also in the grader's process): ``lora_ref.exercises.compare`` on the
   two sets of tensors. An exercise passes when every case matches.

The safetensors keys are ``"<exercise id>|<case index>|<output name>"``.
"""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import signal
import sys
import time
import traceback
import types
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from autograder import sandbox

SEP = "|"
WATCHED_MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.testing", "torch.linalg", "numpy",
                   "numpy.testing", "math", "builtins", "unittest", "safetensors.torch")
WATCHED_CLASSES = (("torch", "Tensor"), ("torch.nn", "Module"), ("torch.nn", "Linear"), ("torch.nn", "Parameter"))


class CellTimeout(BaseException):
    """Raised by SIGALRM when an answer cell or a case runs past its time limit (a BaseException, so
    a learner's ``except Exception`` cannot swallow it)."""


def _alarm(signum, frame):
    raise CellTimeout()


@dataclass
class ExerciseOutcome:
    id: str
    passed: bool
    cases: int = 0
    cases_passed: int = 0
    error: str = ""


@dataclass
class JudgeResult:
    exercises: dict[str, ExerciseOutcome] = field(default_factory=dict)
    cell_errors: dict[str, str] = field(default_factory=dict)
    patched: list[str] = field(default_factory=list)
    died: str = ""


# -- helpers used on both sides ----------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _learner_traceback(exc: BaseException) -> str:
    """The last frame of the traceback that lies in an answer cell, for the error message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<answer")]
    where = f" (at {frames[-1].filename[1:-1]}, line {frames[-1].lineno})" if frames else ""
    if isinstance(exc, CellTimeout):
        return "CellTimeout: ran past the time limit" + where
    return _first_line(exc) + where


def _learner_made(value) -> bool:
    """Was ``value`` defined by the answer cells (a function or lambda compiled from ``<answer:...>``,
    or a class/object of the ``__main__`` namespace the cells run in)? Libraries patch torch lazily
    too (torch._dynamo wraps torch.manual_seed on first import; transformers adds nn.Module
    methods), so only learner-made replacements count as evidence."""
    code = getattr(value, "__code__", None) or getattr(getattr(value, "__func__", None), "__code__", None)
    if code is not None and str(code.co_filename).startswith("<answer"):
        return True
    try:
        return getattr(value, "__module__", None) == "__main__"
    except Exception:  # noqa: BLE001 - a learner object may raise from __getattr__
        return True


def _snapshot() -> dict[str, tuple[int, bool]]:
    """(id, learner-made) of every public attribute of the watched modules and classes."""
    ids: dict[str, tuple[int, bool]] = {}
    for name in WATCHED_MODULES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if isinstance(value, types.ModuleType):
                continue      # submodules appear lazily as libraries import them
            if not attr.startswith("__") or attr in ("__import__", "__build_class__"):
                ids[f"{name}.{attr}"] = (id(value), _learner_made(value))
    for modname, clsname in WATCHED_CLASSES:
        cls = getattr(sys.modules.get(modname), clsname, None)
        if cls is not None:
            for attr, value in list(vars(cls).items()):
                ids[f"{modname}.{clsname}.{attr}"] = (id(value), _learner_made(value))
    return ids


def _diff(before: dict[str, tuple[int, bool]], after: dict[str, tuple[int, bool]]) -> list[str]:
    """Watched attributes replaced or added by learner-made values, or deleted."""
    changed = [f"replaced {k}" for k, v in after.items() if k in before and before[k][0] != v[0] and v[1]]
    removed = [f"deleted {k}" for k in before if k not in after]
    added = [f"added {k}" for k, v in after.items() if k not in before and v[1]]
    return changed + removed + added


def _restore_builtins(saved: dict, found: list) -> None:
    """Undo changes to ``builtins`` so the harness keeps working; note them in ``found``.

    Uses no builtin names itself (they may be the patched ones) until they are restored."""
    table = builtins.__dict__
    changed = [k for k in table if k not in saved or table[k] is not saved[k]]
    removed = [k for k in saved if k not in table]
    for k in changed:
        if k in saved:
            table[k] = saved[k]
        else:
            del table[k]
    for k in removed:
        table[k] = saved[k]
    found.extend(f"{'replaced' if k in saved else 'added'} builtins.{k}" for k in changed)
    found.extend(f"deleted builtins.{k}" for k in removed)


def _exec_cell(source: str, grade_id: str, namespace: dict, timeout: float) -> str:
    """Execute one answer cell; return '' or a one-line error. IPython magics become no-ops."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        code = compile(TransformerManager().transform_cell(source), f"<answer:{grade_id}>", "exec")
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg} (at answer:{grade_id}, line {exc.lineno})"
    sink = io.StringIO()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with redirect_stdout(sink), redirect_stderr(sink):
            exec(code, namespace)
        return ""
    except BaseException as exc:   # noqa: BLE001 - learner code may raise anything, even SystemExit
        return _learner_traceback(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if sink.tell() > 1_000_000:
            sink.truncate(0)


class _NoMagic:
    def __getattr__(self, name):
        return lambda *a, **k: None


# -- 1. run the learner's answer cells in the sandbox ---------------------------------------------------------

def run_answers(job: dict) -> None:
    """Body of ``python -m autograder.judge run JOB.json`` (see the module docstring)."""
    work, scratch = Path(job["work"]), Path(job["scratch"])
    work.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    blocked_reads = tuple(Path(p) for p in job.get("blocked_reads", []))
    report, auditor = sandbox.enter(work, scratch, sandbox.Limits(**job["limits"]),
                                    blocked_reads=blocked_reads, block_processes=True)
    sandbox.watch_parent()
    os.chdir(work)
    log_path = scratch / "judge.json"
    log: dict = {"containment": report.__dict__, "cells": {}, "cases": {}, "patched": [], "stage": "setup"}

    def save() -> None:
        log_path.write_text(json.dumps(log, indent=1))

    save()
    import math

    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from safetensors.torch import save_file
    import lora_ref.exercises as exercises
    torch.set_num_threads(1)
    plan = []
    for ex_id in job["exercises"]:
        try:
            ex = exercises.get(ex_id)
            plan.append((ex_id, ex.symbol, ex.run, ex.cases()))
        except Exception as exc:  # noqa: BLE001 - a broken exercise module is reported, not fatal
            log["cases"][ex_id] = {"error": f"grader error: could not load exercise: {_first_line(exc)}"}
    blocked = {"lora_ref", "autograder", "nbgrader"}
    blocked |= {sys.modules[f.__module__].__name__.split(".")[0] for _, _, f, _ in plan if f.__module__ in sys.modules}
    for name in list(sys.modules):
        if name.split(".")[0] in blocked and name != __name__ and not name.startswith("autograder.sandbox"):
            del sys.modules[name]
    auditor.blocked_imports = tuple(sorted(blocked))
    auditor.install()

    namespace = {"__name__": "__main__", "__builtins__": builtins, "torch": torch, "nn": nn, "F": F,
                 "math": math, "np": np, "get_ipython": lambda: _NoMagic()}
    signal.signal(signal.SIGALRM, _alarm)
    before = _snapshot()
    saved_builtins = dict(builtins.__dict__)
    patched: list[str] = []

    def note_patches() -> None:
        _restore_builtins(saved_builtins, patched)
        log["patched"] = sorted(set(patched) | set(_diff(before, _snapshot())))

    log["stage"] = "answers"
    auditor.active = True
    for cell in job["answer_cells"]:
        if cell["grade_id"] in job.get("skip_cells", []):
            log["cells"][cell["grade_id"]] = "skipped: it killed the judge process on the previous attempt"
            continue
        log["cells"][cell["grade_id"]] = "running"
        save()
        error = _exec_cell(cell["source"], cell["grade_id"], namespace, job["cell_timeout"])
        note_patches()
        log["cells"][cell["grade_id"]] = error or "ok"
        save()
    log["stage"] = "cases"
    save()

    tensors: dict[str, torch.Tensor] = {}
    for ex_id, symbol, run, cases in plan:
        entry = log["cases"][ex_id] = {"n": len(cases), "errors": {}}
        obj = namespace.get(symbol)
        if obj is None:
            entry["error"] = f"{symbol} is not defined by the answer cells"
            continue
        for i, case in enumerate(cases):
            if i in job.get("skip_cases", {}).get(ex_id, []):
                entry["errors"][str(i)] = "this case killed the judge process on the previous attempt"
                continue
            entry["running"] = i
            save()
            signal.setitimer(signal.ITIMER_REAL, job["case_timeout"])
            try:
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    out = run(obj, case)
                signal.setitimer(signal.ITIMER_REAL, 0)
                if not isinstance(out, dict):
                    raise TypeError(f"run returned {type(out).__name__}, not a dict of tensors")
                for name, value in out.items():
                    if not isinstance(value, torch.Tensor):
                        raise TypeError(f"output {name!r} is {type(value).__name__}, not a tensor")
                    tensors[f"{ex_id}{SEP}{i}{SEP}{name}"] = value.detach().cpu().clone().contiguous()
            except BaseException as exc:  # noqa: BLE001
                signal.setitimer(signal.ITIMER_REAL, 0)
                _restore_builtins(saved_builtins, patched)
                entry["errors"][str(i)] = _learner_traceback(exc)
            _restore_builtins(saved_builtins, patched)
        entry.pop("running", None)
    note_patches()
    save_file(tensors, str(scratch / "outputs.safetensors"))
    log["stage"] = "done"
    save()


# -- 2. reference outputs and 3. verdicts, in the grader's clean process --------------------------------------

def reference_outputs(exercise_ids: list[str], path: Path) -> dict[str, str]:
    """Run every exercise's reference on its cases; save the tensors; return {id: error} for failures."""
    import torch
    from safetensors.torch import save_file
    import lora_ref.exercises as exercises

    tensors, errors = {}, {}
    for ex_id in exercise_ids:
        try:
            ex = exercises.get(ex_id)
            for i, case in enumerate(ex.cases()):
                for name, value in ex.run(ex.reference, case).items():
                    tensors[f"{ex_id}{SEP}{i}{SEP}{name}"] = value.detach().cpu().clone().contiguous()
        except Exception as exc:  # noqa: BLE001
            errors[ex_id] = f"{_first_line(exc)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return errors


def _group(tensors: dict) -> dict[tuple[str, int], dict]:
    out: dict[tuple[str, int], dict] = {}
    for key, value in tensors.items():
        ex_id, i, name = key.split(SEP, 2)
        out.setdefault((ex_id, int(i)), {})[name] = value
    return out


def verdicts(exercise_ids: list[str], log: dict, outputs: Path, reference: Path) -> dict[str, ExerciseOutcome]:
    """Compare the learner's saved outputs with the reference, case by case."""
    from safetensors.torch import load_file
    import lora_ref.exercises as exercises

    want = _group(load_file(str(reference)))
    got = _group(load_file(str(outputs))) if outputs.exists() else {}
    result = {}
    for ex_id in exercise_ids:
        entry = log.get("cases", {}).get(ex_id, {})
        try:
            ex = exercises.get(ex_id)
            cases = ex.cases()
        except Exception as exc:  # noqa: BLE001
            result[ex_id] = ExerciseOutcome(ex_id, False, error=f"grader error: {_first_line(exc)}")
            continue
        outcome = ExerciseOutcome(ex_id, False, cases=len(cases))
        errors = []
        if entry.get("error"):
            errors.append(entry["error"])
        else:
            for i, case in enumerate(cases):
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
        outcome.passed = not errors and outcome.cases_passed == len(cases)
        outcome.error = errors[0] if errors else ""
        result[ex_id] = outcome
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m autograder.judge")
    ap.add_argument("command", choices=["run"])
    ap.add_argument("job", type=Path)
    args = ap.parse_args(argv)
    run_answers(json.loads(args.job.read_text()))
    sys.stdout.flush()
    os._exit(0)   # skip atexit handlers a learner may have registered


if __name__ == "__main__":
    main()
