"""Containment for learner code: namespaces, a file system that shows only the submission's own folders,
resource limits, and an audit trail.

Learner code runs in two kinds of processes: the notebook kernel that ``nbgrader autograde`` starts (see
:mod:`autograder.kernel`) and the judge's harness (see :mod:`autograder.harness`). Both are started
through :func:`command`, which puts them in fresh namespaces in one ``unshare`` call:

- **user** (the process is root only inside; outside it has the grader's uid and nothing more);
- **PID** (it sees only its own processes, is pid 1 of its namespace, and every process it starts dies
  with it: ``--kill-child`` and ``setpriv --pdeathsig`` tie its life to the process that started it, so
  the worker ends the whole namespace by killing the one child it started);
- **network** (no interface but a loopback that is down: nothing leaves, nothing on the host is reached);
- **mount**, in which :func:`enter` then, before any learner code runs:

  1. covers every folder of :attr:`Plan.hidden` (the grading output folder with its gradebook, reference
     outputs, autograded copies, other submissions' scratch; the instructor's notebooks; the
     submissions; :data:`PRIVATE_ROOTS`, ``/tmp`` and the home folders; for the judge also the repository
     and the reference package) with an empty tmpfs, and binds back the few folders of
     :attr:`Plan.expose` that the process needs (its own scratch, read-only caches, the Python
     installation), shortest path first so that either may lie inside the other; the symlinks of
     :attr:`Plan.links` (the kernel's short socket path in ``/tmp``) are made again inside the covers;
  2. remounts every mount read-only except the folders of :attr:`Plan.writable`;
  3. enters a second, nested user + mount namespace, in which the kernel locks every mount (``MNT_LOCKED``:
     a process that is root there cannot unmount a cover or remount a read-only mount writable), and
     sets ``PR_SET_NO_NEW_PRIVS``;
  4. applies the resource limits (:func:`apply_limits`): address space, CPU seconds, largest file,
     processes (``RLIMIT_NPROC``, a backstop), no core files;
  5. installs a PEP 578 audit hook (:class:`Auditor`) that records what learner code tries (evidence for
     the audit report; integrity does not depend on it).

Where user namespaces are unavailable (:func:`available` says why), nothing of this holds but the limits
and the audit hook: the grading run refuses to start unless the instructor accepts it explicitly, and every
result says so (``Result.containment``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autograder.contracts import Limits

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
O_PATH = getattr(os, "O_PATH", 0o10000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.symlink",
               "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "pty.spawn"}
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "--mount-proc",
           "--kill-child"]
NAMESPACES = "namespaces"      # Job.isolation / Report.isolation when all of the above holds
NO_ISOLATION = "none: learner code ran WITHOUT namespaces (no PID, network or file-system isolation)"


@dataclass
class Plan:
    """What a sandboxed process may see and write (absolute paths; see the module docstring)."""
    writable: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    cwd: str = ""
    links: dict[str, str] = field(default_factory=dict)   # symlink -> target, recreated inside a cover

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str) -> "Plan":
        return cls(**json.loads(text))


@dataclass
class Report:
    """What :func:`enter` achieved; ``isolation`` is :data:`NAMESPACES` only when everything held."""
    namespace: bool = False
    namespace_error: str = ""
    pid_namespace: bool = False
    net_namespace: bool = False
    locked: bool = False
    readonly_mounts: int = 0
    writable: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)

    @property
    def isolation(self) -> str:
        ok = self.namespace and self.pid_namespace and self.net_namespace and self.locked
        return NAMESPACES if ok else f"{NO_ISOLATION} ({self.namespace_error or 'incomplete'})"


def command(argv: list[str], isolated: bool = True) -> list[str]:
    """The argv that runs ``python <argv>`` in fresh user, mount, PID and network namespaces, dying with
    the process that starts it (``setpriv --pdeathsig``: even a SIGKILLed worker takes its sandboxes along)."""
    if not isolated:
        return [sys.executable, *argv]
    return ["setpriv", "--pdeathsig", "KILL", *UNSHARE, "--", sys.executable, *argv]


def available() -> str:
    """'' when :func:`command` works here, else why not (checked by running it once)."""
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = "import os,socket; assert os.getpid() == 1; socket.create_connection(('127.0.0.1', 9), 1)"
    try:
        proc = subprocess.run(command(["-c", f"import os\ntry:\n {probe}\nexcept OSError: os._exit(0)\nos._exit(3)"]),
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if proc.returncode != 0:
        return f"unshare failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}"
    return ""


#: Address space learner code needs beyond what its imports map: its tensors, threads' stacks, buffers.
HEADROOM_MB = 1024


def mapped_mb() -> int:
    """The address space this process has mapped (``VmSize``, MB): what ``RLIMIT_AS`` counts."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) // 1024
    raise OSError("no VmSize in /proc/self/status")


@functools.lru_cache(maxsize=None)
def torch_mapped_mb(python: str = sys.executable) -> int | None:
    """What a fresh ``python`` maps once it has imported torch (MB; None where it cannot be measured).
    A CPU build maps about 600 MB; a CUDA build maps its GPU libraries too, several GB, all of which
    count against the sandbox's ``RLIMIT_AS`` although little of it is ever resident."""
    code = "import torch, autograder.sandbox as s; print(s.mapped_mb())"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)))
        return int(proc.stdout.split()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def memory_room(memory_mb: int, mapped: int | None) -> str:
    """'' when an address-space limit of ``memory_mb`` leaves learner code :data:`HEADROOM_MB` beyond
    ``mapped`` (what importing torch maps here), else a one-line reason and the limit to use. Without
    this check a limit below torch's own mappings fails every cell that imports torch, and a whole class
    scores zero with nothing but ImportErrors in its feedback."""
    if mapped is None or memory_mb >= mapped + HEADROOM_MB:
        return ""
    suggest = -(-(mapped + 3072) // 1024) * 1024
    return (f"a memory limit of {memory_mb} MB leaves learner code no room: importing torch alone maps {mapped} MB "
            f"of address space in this Python (a CUDA build maps its GPU libraries), so every cell that imports "
            f"torch would fail; grade with --memory-mb {suggest} or more (torch's mappings plus 3 GB of work)")


def apply_limits(limits: Limits) -> None:
    mem = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    fsize = limits.file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc, limits.nproc))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# -- the file system: hide, expose, read-only, lock ------------------------------------------------------

def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _mount(libc, source, target: str, flags: int, fstype: bytes | None = None, data: bytes | None = None) -> None:
    src = source.encode() if isinstance(source, str) else source
    rc = libc.mount(src, target.encode(), fstype, ctypes.c_ulong(flags), data)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount_points() -> list[tuple[str, set[str]]]:
    points = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            target = parts[1].encode().decode("unicode_escape")
            points.append((target, set(parts[3].split(","))))
    return points


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _new_userns(libc) -> None:
    """unshare a user + mount namespace mapping our uid and gid to themselves (0 inside -> 0)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        threads = len(os.listdir("/proc/self/task"))
        why = (f" (this process has {threads} threads; a new user namespace needs a single-threaded one: "
               "enter the sandbox before importing torch)") if err == 22 and threads > 1 else ""
        raise OSError(err, f"unshare: {os.strerror(err)}{why}")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


PRIVATE_ROOTS = ("/tmp", "/var/tmp", "/home", "/root")
"""Folders every sandbox sees empty but for what its plan exposes: other users' and the grader's own files
(a classmate's kernel socket link, the instructor's home with the course, pytest's temporary folders)."""


def python_paths() -> list[str]:
    """The Python installation a sandboxed interpreter needs: prefixes, its executable's folder, site dirs
    (also the user's, ``~/.local``: with :data:`PRIVATE_ROOTS` hidden they must be exposed by name), and
    the folders on ``PYTHONPATH`` (packages installed with ``pip --target``, as on a machine where nothing
    can be installed into the interpreter: without them the kernel and the judge lack nbgrader's and
    IPython's modules). A folder that must stay hidden inside one of these is covered again."""
    import site
    paths = [sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parents[1]),
             *site.getsitepackages(), site.getusersitepackages(), *extra_import_paths()]
    return [p for p in dict.fromkeys(str(Path(p).resolve()) for p in paths) if os.path.isdir(p)]


def extra_import_paths() -> list[str]:
    """The folders named on ``PYTHONPATH`` that exist (in order)."""
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isdir(p)]


def extra_jupyter_paths() -> list[str]:
    """The Jupyter data folders (``share/jupyter``) of packages installed with ``pip install --target DIR``
    and found through ``PYTHONPATH``: pip puts their data files (nbconvert's HTML templates, which the
    feedback pages extend) in ``DIR/share/jupyter``, where Jupyter does not look unless told."""
    return [str(Path(p) / "share" / "jupyter") for p in extra_import_paths() if (Path(p) / "share" / "jupyter").is_dir()]


def _enclosing(path: str, done: list[tuple[str, str]]) -> str | None:
    """'cover' or 'expose': the kind of the deepest mount of ``done`` that ``path`` is inside."""
    best = None
    for kind, where in done:
        if _inside(path, where) and (best is None or len(where) >= len(best[1])):
            best = (kind, where)
    return best[0] if best else None


def build_mounts(plan: Plan, report: Report) -> None:
    """Steps 1-3 of the module docstring, in the mount namespace ``unshare`` gave this process.

    Covers and exposures are mounted shortest path first, so that they nest either way: a hidden folder
    inside an exposed one is covered again (the grading folder inside a course that lives in ``/home``),
    an exposed folder inside a cover is bound back (the submission's scratch folder inside ``/tmp``)."""
    libc = _libc()
    keep = [str(Path(p).resolve()) for p in plan.writable]
    show = [str(Path(p).resolve()) for p in plan.expose] + keep
    show = [p for p in dict.fromkeys(show) if os.path.isdir(p)]
    fds = {p: os.open(p, O_PATH | os.O_DIRECTORY) for p in show}     # reach them once they are covered
    hidden = [h for h in dict.fromkeys(str(Path(p).resolve()) for p in plan.hidden) if os.path.isdir(h)]
    steps = sorted([("cover", h) for h in hidden if h not in show] + [("expose", p) for p in show],
                   key=lambda step: (len(step[1]), step[0]))
    done: list[tuple[str, str]] = []
    for kind, path in steps:
        around = _enclosing(path, done)
        if kind == "cover":
            if around == "cover":
                continue                                  # already out of sight
            _mount(libc, b"tmpfs", path, MS_NOSUID | MS_NODEV, b"tmpfs", b"size=64k,mode=755")
            report.hidden.append(path)
        elif around == "cover":
            os.makedirs(path, exist_ok=True)              # a mount point inside the cover
            _mount(libc, f"/proc/self/fd/{fds[path]}", path, MS_BIND | MS_REC)
            report.exposed.append(path)
        elif path in keep:
            _mount(libc, path, path, MS_BIND | MS_REC)    # its own mount, so it stays writable
        else:
            continue
        done.append((kind, path))
    for fd in fds.values():
        os.close(fd)
    for link, target in plan.links.items():
        if _enclosing(str(Path(link).parent), done) == "cover":    # else the host's own link is visible
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(target, link)
    for target, options in _mount_points():
        if target in keep or _inside(target, "/proc"):
            continue      # /proc: this PID namespace's own (``--mount-proc``); the uid map is written there
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name, bit in _OPTION_FLAGS.items():
            if name in options:
                flags |= bit
        try:
            _mount(libc, None, target, flags)
            report.readonly_mounts += 1
        except OSError:
            pass  # /proc and a few pseudo file systems refuse; nothing there is ours to protect
    _new_userns(libc)              # every mount above is now locked (MNT_LOCKED, MNT_LOCK_READONLY)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    report.locked = True
    report.writable = keep
    os.chdir(plan.cwd or os.getcwd())


def _in_fresh_namespaces(report: Report) -> None:
    """Did ``unshare`` start us? (pid 1 of a PID namespace; no network interface up)."""
    report.pid_namespace = os.getpid() == 1
    try:
        with open("/proc/net/dev") as f:
            others = [l for l in f.read().splitlines()[2:] if l.split(":")[0].strip() != "lo"]
        import socket
        probe = socket.socket()
        probe.settimeout(1)
        try:
            probe.connect(("127.0.0.1", 9))
            lo_down = False
        except OSError as exc:
            lo_down = exc.errno == 101       # ENETUNREACH: loopback down, not merely a closed port
        finally:
            probe.close()
        report.net_namespace = not others and lo_down
    except OSError:
        report.net_namespace = False


# -- audit hook -----------------------------------------------------------------------------------------

class Auditor:
    """A PEP 578 audit hook: records (and, without a namespace, blocks) what learner code attempts.

    ``blocked_imports``: top-level package names that learner code may not import (the judge blocks
    ``lora_ref``); ``blocked_reads``: folders whose files learner code may not open (both apply only
    when a learner frame, a code object whose file name contains one of ``learner_files``, is on the
    stack, so the grader's own lazy imports still work); ``block_processes``: refuse new processes;
    ``block_writes``: refuse writes outside ``writable`` (only needed when no namespace is available).
    """

    def __init__(self, log_path: Path, writable: list[Path], *, blocked_imports: tuple[str, ...] = (),
                 blocked_reads: tuple[Path, ...] = (), block_processes: bool = False,
                 block_writes: bool = False, max_records: int = 500,
                 learner_files: tuple[str, ...] = ("<answer", "ipykernel_")):
        self.writable = tuple(str(Path(p).resolve()) for p in writable) + ("/dev/null", "/dev/tty", "/proc/self")
        self.blocked_imports = blocked_imports
        self.blocked_reads = tuple(str(Path(p).resolve()) for p in blocked_reads)
        self.block_processes = block_processes
        self.block_writes = block_writes
        self.max_records = max_records
        self.learner_files = learner_files
        self.active = False     # set once learner code may run; earlier events are the runtime starting up
        self.count = 0
        self._busy = False
        self._log = open(log_path, "a", buffering=1)

    def install(self) -> None:
        sys.addaudithook(self)

    def _inside(self, path: str, roots: tuple[str, ...]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def _abspath(self, path) -> str | None:
        if isinstance(path, int):
            return None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        return os.path.abspath(os.fspath(path))

    def record(self, kind: str, detail: str) -> None:
        if self.count >= self.max_records:
            return
        self.count += 1
        try:
            self._log.write(json.dumps({"kind": kind, "detail": detail[:300], "t": round(time.time(), 3)}) + "\n")
        except Exception:
            pass

    def __call__(self, event: str, args: tuple) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self._check(event, args)
        finally:
            self._busy = False

    def _from_learner(self, depth: int = 40) -> str | None:
        """Filename of the nearest learner frame within ``depth`` frames of the code that raised the
        event (answer cell or notebook cell), if any. ``depth=1``: the event was raised by learner code
        itself, not by a library it called (importing a library from a cell sets type attributes)."""
        frame = sys._getframe(3)
        while frame is not None and depth > 0:
            name = frame.f_code.co_filename
            if any(marker in name for marker in self.learner_files):
                return name
            frame, depth = frame.f_back, depth - 1
        return None

    def _check(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            path = self._abspath(args[0])
            if path is None:
                return
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writing and not self._inside(path, self.writable):
                self.record("write_outside", f"open({path!r}, {mode or flags})")
                if self.block_writes:
                    raise PermissionError(f"autograder sandbox: writing {path} is not allowed")
            elif (not writing and self.blocked_reads and self._inside(path, self.blocked_reads)
                  and self._from_learner()):
                self.record("blocked_read", path)
                raise PermissionError(f"autograder sandbox: reading {path} is not allowed")
        elif event in PATH_EVENTS:
            paths = [self._abspath(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if event == "os.mkdir":     # makedirs(exist_ok=True) on a folder that exists writes nothing
                paths = [p for p in paths if p and not os.path.isdir(p)]
            outside = [p for p in paths if p and not self._inside(p, self.writable)]
            if outside:
                self.record("write_outside", f"{event}({', '.join(outside)})")
                if self.block_writes:
                    raise PermissionError(f"autograder sandbox: {event} on {outside[0]} is not allowed")
        elif event in PROCESS_EVENTS:
            # libraries start helpers too (matplotlib runs fc-list): count calls from near learner code
            if self.block_processes or self._from_learner(depth=4):
                self.record("process", f"{event}{_short(args)}")
            if self.block_processes:
                raise PermissionError(f"autograder sandbox: {event} is not allowed here")
        elif event == "import":
            name = str(args[0])
            if self.blocked_imports and name.split(".")[0] in self.blocked_imports and self._from_learner():
                self.record("blocked_import", name)
                raise ImportError(f"autograder sandbox: importing {name} is not allowed in answer cells")
        elif event in ("ctypes.dlopen", "ctypes.dlsym", "ctypes.addressof", "ctypes.string_at"):
            where = self._from_learner(depth=1)
            if where:
                self.record("ctypes", f"{event}{_short(args)} from {where}")
        elif event == "sys.addaudithook":
            # only learner code's own call: libraries add hooks as they are imported (filelock 4 does, to
            # follow forks, and torch's CUDA build imports it), which flagged every submission on such a machine
            where = self._from_learner(depth=1)
            if where:
                self.record("audit_hook", f"learner code added an audit hook ({where})")
        elif event in ("sys.settrace", "sys.setprofile", "object.__setattr__"):
            where = self._from_learner(depth=1)
            if where:
                kind = "type_patch" if event == "object.__setattr__" else "introspection"
                self.record(kind, f"{event}{_short(args)} from {where}")


def _short(args: tuple) -> str:
    text = repr(args)
    return text if len(text) < 200 else text[:200] + "...)"


def enter(plan: Plan, limits: Limits, log_path: Path, **auditor_kwargs) -> tuple[Report, Auditor]:
    """Set up containment for the current process (call it single-threaded, before any learner code).

    In namespaces (the process was started through :func:`command`), a failure to build the file
    system raises: learner code must not run half-isolated. Without them (``AUTOGRADER_ISOLATION=none``,
    the instructor's explicit choice) the audit hook blocks writes outside ``plan.writable`` instead
    (weak: ctypes gets around it) and the report says so."""
    report = Report(writable=list(plan.writable))
    _in_fresh_namespaces(report)
    if os.environ.get("AUTOGRADER_ISOLATION", NAMESPACES) == NAMESPACES:
        if not report.pid_namespace:
            raise RuntimeError("autograder sandbox: not started in a PID namespace (use sandbox.command)")
        build_mounts(plan, report)
        report.namespace = True
    else:
        report.namespace_error = "the instructor chose to grade without namespaces"
        if plan.cwd:
            os.chdir(plan.cwd)
    auditor = Auditor(log_path, [Path(p) for p in plan.writable], block_writes=not report.namespace, **auditor_kwargs)
    if report.isolation != NAMESPACES:
        auditor.record("containment", report.isolation)
    apply_limits(limits)
    return report, auditor


def read_audit_log(folder: Path, limit: int = 1000) -> list[dict]:
    """The records of ``<folder>/audit.jsonl``, opened without following a symlink the learner may have
    put there (and read at most 1 MB)."""
    try:
        fd = os.open(Path(folder) / "audit.jsonl", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        text = f.read(1_000_000).decode(errors="replace")
    records = []
    for line in text.splitlines()[:limit]:
        try:
            rec = json.loads(line)
            records.append(rec if isinstance(rec, dict) else {"kind": "garbled", "detail": line[:200]})
        except json.JSONDecodeError:
            records.append({"kind": "garbled", "detail": line[:200]})
    return records
