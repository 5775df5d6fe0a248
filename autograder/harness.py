"""The learner's side of the judge: ``python -m autograder.harness``, started by :func:`autograder.judge.run_judge`
through :func:`autograder.sandbox.command` (fresh user, mount, PID and network namespaces).

This process runs the learner's answer cells and calls each exercise's ``run`` (generic tensor plumbing)
on the learner's symbol. It holds nothing of the reference:

- the exercise modules are imported behind an import firewall: every ``lora_ref`` module that holds an
  exercise's reference is replaced by a :class:`Sealed` stand-in (an attribute of it is a stand-in
  too; calling one raises), so no reference object, function or class is ever loaded here; names bound
  to a reference in the modules that are loaded (``lora_ref.exercises``, modules of no reference such as
  the tiny test models) are deleted;
- the cases, with every input that needs lora_ref to make (``lora_ref.exercises.given``), were made in
  the grader's process from the grading run's secret seed and arrive on stdin;
- then the repository and the reference package are hidden (:func:`autograder.sandbox.enter`).

Only the learner's outputs go back, as framed messages on the pipe the worker holds (the original stdout,
moved to a private descriptor; fd 1 is /dev/null so ``print`` cannot corrupt the stream): progress
(``{"cell": id, "status": "running"}``, ``{"case": [ex, i]}``), errors, and one safetensors frame per
case. The worker compares them with the reference in its own process. Learner code can write to that
descriptor too, but only values it computed itself: the cases are secret until they arrive here.
"""
from __future__ import annotations

import builtins
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import os
import signal
import struct
import sys
import traceback
import types
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from autograder import sandbox
from autograder.contracts import Limits
from autograder.course import answer_namespace

WATCHED_MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.testing", "torch.linalg", "numpy",
                   "numpy.testing", "math", "builtins", "unittest", "safetensors.torch")
WATCHED_CLASSES = (("torch", "Tensor"), ("torch.nn", "Module"), ("torch.nn", "Linear"), ("torch.nn", "Parameter"))
ALLOWED = ("lora_ref.exercises",)      # the only lora_ref modules loaded for real here


# -- the pipe ----------------------------------------------------------------------------------------------

def read_frame(f, max_blob: int = 1 << 31) -> tuple[str, dict, bytes] | None:
    """(kind, header, blob) from a binary stream; None at its end. Kind ``J``: header only, ``T``: a blob.
    A frame larger than the limits raises ValueError before it is read."""
    head = f.read(13)
    if len(head) < 13:
        return None
    kind, hlen, blen = head[:1].decode(), *struct.unpack("<IQ", head[1:])
    if hlen > 64 << 20 or blen > max_blob:
        raise ValueError(f"frame too large ({hlen}, {blen})")
    header = json.loads(f.read(hlen))
    return kind, header, f.read(blen)


def write_frame(fd: int, kind: str, header: dict, blob: bytes = b"") -> None:
    data = json.dumps(header).encode()
    buf = kind.encode() + struct.pack("<IQ", len(data), len(blob)) + data + blob
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- cases over the pipe -------------------------------------------------------------------------------------

def encode_case(case, tensors: dict, prefix: str):
    """Plain JSON with tensors as ``{"__tensor__": key}`` (their bytes go to ``tensors``), tuples, dtypes and
    dataclass instances kept (a dataclass arrives as a plain namespace of its fields: the harness has no
    lora_ref class to rebuild, and a learner reads attributes)."""
    import dataclasses

    import torch
    if isinstance(case, torch.dtype):
        return {"__dtype__": str(case).removeprefix("torch.")}
    if dataclasses.is_dataclass(case) and not isinstance(case, type):
        return {"__object__": {f.name: encode_case(getattr(case, f.name), tensors, prefix)
                               for f in dataclasses.fields(case)}}
    if isinstance(case, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = case.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(case, tuple):
        return {"__tuple__": [encode_case(v, tensors, prefix) for v in case]}
    if isinstance(case, list):
        return [encode_case(v, tensors, prefix) for v in case]
    if isinstance(case, dict):
        return {str(k): encode_case(v, tensors, prefix) for k, v in case.items()}
    return case


def decode_case(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]].clone()
        if set(value) == {"__dtype__"}:
            import torch
            dtype = getattr(torch, value["__dtype__"])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"not a dtype: {value['__dtype__']!r}")
            return dtype
        if set(value) == {"__object__"}:
            return types.SimpleNamespace(**{k: decode_case(v, tensors) for k, v in value["__object__"].items()})
        if set(value) == {"__tuple__"}:
            return tuple(decode_case(v, tensors) for v in value["__tuple__"])
        return {k: decode_case(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_case(v, tensors) for v in value]
    return value


# -- the import firewall --------------------------------------------------------------------------------------

class Sealed(types.ModuleType):
    """Stands in for a lora_ref module (and any attribute of one) in the harness: nothing of it exists here."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []        # so ``import lora_ref.x.y`` resolves through the firewall too

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Sealed(f"{self.__name__}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is not available in the judge: the grader must make this input "
                           "(lora_ref.exercises.given)")

    def __mro_entries__(self, bases):
        return (object,)


class Firewall(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every ``lora_ref`` module outside :data:`ALLOWED` and ``allowed`` (modules that hold no exercise's
    reference, such as the tiny test models; the grader computes the list) imports as a :class:`Sealed`."""

    def __init__(self, allowed: tuple[str, ...] = ()):
        self.allowed = ALLOWED + tuple(allowed)

    def find_spec(self, name, path=None, target=None):
        if name == "lora_ref" or name.split(".")[0] != "lora_ref" or name in self.allowed or any(
                name.startswith(a + ".") for a in ALLOWED):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return Sealed(spec.name)

    def exec_module(self, module):
        pass


def load_drivers(modules: list[str], allowed: list[str] = ()) -> dict:
    """Import the exercise modules behind the firewall; return {exercise id: (symbol, run)}; drop everything
    else the registry held, and every name of a loaded lora_ref module bound to an exercise's reference
    (a reference defined in an exercise module itself is then gone too)."""
    sys.meta_path.insert(0, Firewall(tuple(allowed)))
    for name in [m for m in sys.modules if m.split(".")[0] == "lora_ref"]:
        del sys.modules[name]
    import lora_ref.exercises as exercises
    exercises.REGISTRY.clear()
    exercises.GIVEN_ONLY = True           # lora_ref.exercises.given must find every input in the case
    for m in [*allowed, *modules]:    # now: lora_ref's folder is hidden once learner code runs
        importlib.import_module(m)
    drivers = {ex.id: (ex.symbol, ex.run) for ex in exercises.REGISTRY.values()}
    refs = [ex.reference for ex in exercises.REGISTRY.values() if not isinstance(ex.reference, Sealed)]
    exercises.REGISTRY.clear()
    for name, mod in list(sys.modules.items()):
        if (name.split(".")[0] == "lora_ref" or name in modules) and not isinstance(mod, Sealed):
            for attr, value in list(vars(mod).items()):
                if any(value is r for r in refs):
                    delattr(mod, attr)
    del refs
    for name in [m for m in sys.modules if m == "lora_ref" or m.startswith("lora_ref.exercises") or m in modules]:
        del sys.modules[name]     # the drivers keep what they use; a learner's import meets the audit hook
    gc.collect()
    return drivers


def reference_folders() -> list[str]:
    """Folders that hold lora_ref and the autograder on disk (hidden once the drivers are loaded)."""
    folders = []
    for name in ("lora_ref", "autograder"):
        spec = importlib.machinery.PathFinder.find_spec(name)
        for loc in (spec.submodule_search_locations if spec else None) or []:
            folders.append(str(Path(loc).resolve()))
    return folders


# -- learner code --------------------------------------------------------------------------------------------

class CellTimeout(BaseException):
    """Raised by SIGALRM when an answer cell or a case runs past its time limit (a BaseException, so a
    learner's ``except Exception`` cannot swallow it)."""


def _alarm(signum, frame):
    raise CellTimeout()


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:2000] if text else type(exc).__name__


def _learner_traceback(exc: BaseException) -> str:
    """The last frame of the traceback that lies in an answer cell, for the error message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<answer")]
    where = f" (at {frames[-1].filename[1:-1]}, line {frames[-1].lineno})" if frames else ""
    if isinstance(exc, CellTimeout):
        return "CellTimeout: ran past the time limit" + where
    return _first_line(exc) + where


def _learner_made(value) -> bool:
    """Was ``value`` defined by the answer cells (a function compiled from ``<answer:...>`` or an object of
    the ``__main__`` namespace they run in)? Libraries patch torch lazily too, so only those count."""
    code = getattr(value, "__code__", None) or getattr(getattr(value, "__func__", None), "__code__", None)
    if code is not None and str(code.co_filename).startswith("<answer"):
        return True
    try:
        return getattr(value, "__module__", None) == "__main__"
    except Exception:  # noqa: BLE001 - a learner object may raise from __getattr__
        return True


def _snapshot() -> dict[str, tuple[int, bool]]:
    ids: dict[str, tuple[int, bool]] = {}
    for name in WATCHED_MODULES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if isinstance(value, types.ModuleType):
                continue
            if not attr.startswith("__") or attr in ("__import__", "__build_class__"):
                ids[f"{name}.{attr}"] = (id(value), _learner_made(value))
    for modname, clsname in WATCHED_CLASSES:
        cls = getattr(sys.modules.get(modname), clsname, None)
        if cls is not None:
            for attr, value in list(vars(cls).items()):
                ids[f"{modname}.{clsname}.{attr}"] = (id(value), _learner_made(value))
    return ids


def _diff(before, after) -> list[str]:
    changed = [f"replaced {k}" for k, v in after.items() if k in before and before[k][0] != v[0] and v[1]]
    removed = [f"deleted {k}" for k in before if k not in after]
    added = [f"added {k}" for k, v in after.items() if k not in before and v[1]]
    return changed + removed + added


def _restore_builtins(saved: dict, found: list) -> None:
    """Undo changes to ``builtins`` so the harness keeps working (uses no builtin until restored)."""
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
    from IPython.core.inputtransformer2 import TransformerManager   # imported by main() before learner code
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


def main() -> None:
    stdin = os.fdopen(0, "rb", closefd=False)
    kind, job, blob = read_frame(stdin)
    out = os.dup(1)                              # the worker's pipe, on a descriptor of our own
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.set_inheritable(out, False)

    me = os.getpid()

    def send(header: dict, blob: bytes = b"", kind: str = "J") -> None:
        if os.getpid() != me:
            # a process that learner code forked (ctypes' fork gets past the audit hook) carries on
            # as a twin of this harness; its frames would interleave with ours on the worker's pipe
            os._exit(0)
        try:
            write_frame(out, kind, header, blob)
        except OSError:
            pass

    import torch
    from safetensors.torch import load, save
    # before learner code runs: a failure to import it then would kill the harness at every answer cell
    import IPython.core.inputtransformer2  # noqa: F401
    torch.set_num_threads(1)
    case_tensors = load(blob) if blob else {}
    drivers = load_drivers(job["modules"], job.get("allowed", []))
    cases = {ex_id: [decode_case(c, case_tensors) for c in cs] for ex_id, cs in job["cases"].items()}
    del case_tensors, blob
    plan = sandbox.Plan(**job["plan"])
    plan.hidden = plan.hidden + reference_folders()
    report, auditor = sandbox.enter(plan, Limits(**job["limits"]), Path(plan.writable[0]) / "audit.jsonl",
                                    blocked_imports=("lora_ref", "autograder", "nbgrader"), block_processes=True)
    send({"containment": report.isolation, "report": report.__dict__})
    auditor.install()
    namespace = answer_namespace()      # autograder.course: the one definition of what answer cells see
    signal.signal(signal.SIGALRM, _alarm)
    before = _snapshot()
    saved_builtins = dict(builtins.__dict__)
    patched: list[str] = []

    def note_patches() -> list[str]:
        _restore_builtins(saved_builtins, patched)
        return sorted(set(patched) | set(_diff(before, _snapshot())))

    auditor.active = True
    for cell in job["answer_cells"]:
        gid = cell["grade_id"]
        if gid in job.get("skip_cells", []):
            send({"cell": gid, "error": "skipped: it killed the judge process on the previous attempt"})
            continue
        send({"cell": gid, "status": "running"})
        error = _exec_cell(cell["source"], gid, namespace, job["cell_timeout"])
        send({"cell": gid, "error": error, "patched": note_patches()})
    send({"stage": "cases"})
    for ex_id, (symbol, run) in drivers.items():
        if ex_id not in cases:
            continue
        obj = namespace.get(symbol)
        if obj is None:
            send({"exercise": ex_id, "error": f"{symbol} is not defined by the answer cells"})
            continue
        for i, case in enumerate(cases[ex_id]):
            if i in job.get("skip_cases", {}).get(ex_id, []):
                send({"case": [ex_id, i], "error": "this case killed the judge process on the previous attempt"})
                continue
            send({"case": [ex_id, i], "status": "running"})
            signal.setitimer(signal.ITIMER_REAL, job["case_timeout"])
            try:
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    outputs = run(obj, case)
                signal.setitimer(signal.ITIMER_REAL, 0)
                if not isinstance(outputs, dict):
                    raise TypeError(f"run returned {type(outputs).__name__}, not a dict of tensors")
                tensors = {}
                for name, value in outputs.items():
                    if not isinstance(value, torch.Tensor):
                        raise TypeError(f"output {name!r} is {type(value).__name__}, not a tensor")
                    tensors[str(name)] = value.detach().cpu().clone().contiguous()
                _restore_builtins(saved_builtins, patched)
                send({"case": [ex_id, i], "outputs": sorted(tensors)}, save(tensors), kind="T")
            except BaseException as exc:  # noqa: BLE001
                signal.setitimer(signal.ITIMER_REAL, 0)
                _restore_builtins(saved_builtins, patched)
                send({"case": [ex_id, i], "error": _learner_traceback(exc)})
    send({"stage": "done", "patched": note_patches()})
    os._exit(0)   # skip atexit handlers a learner may have registered


if __name__ == "__main__":
    main()
