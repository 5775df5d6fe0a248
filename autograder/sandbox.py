"""Containment for learner code: resource limits, a read-only file system, and an audit trail.

Learner code runs in two kinds of processes, both set up by :func:`enter`: the notebook kernel that
``nbgrader autograde`` starts (see :mod:`autograder.kernel`) and the judge (see :mod:`autograder.judge`).
Each gets, before any learner code runs:

1. Resource limits (``resource.setrlimit``): address space (``--memory-mb``), CPU seconds (a backstop
   for the wall-time limit the parent enforces), largest file written (``RLIMIT_FSIZE``; SIGXFSZ is
   ignored so an over-large write raises ``OSError(EFBIG)`` instead of killing the process).
2. A private user + mount namespace in which every mount is remounted read-only except the sandbox
   folders (the autograded copy and a scratch folder). Writes anywhere else fail with EROFS, so a
   learner cannot touch the course, the gradebook, other students' files or the reference package.
   Needs unprivileged user namespaces (Linux); where they are missing, :func:`enter` falls back to
   blocking those writes from the audit hook (weaker: ctypes or a C extension can get around it) and
   says so in the returned report.
3. A PEP 578 audit hook, which learner code cannot remove, that records what the process tried:
   writes or deletions outside the sandbox, new processes, ctypes, imports of blocked packages, reads
   of blocked files. Records go to ``<scratch>/audit.jsonl``; the parent turns them into the audit report.
4. Folders the learner has no business reading (the instructor's notebooks, other students' submissions
   and originals) are covered by an empty read-only tmpfs inside the namespace.
5. A watchdog thread that kills the process group when the parent process dies, so no kernel outlives
   the grading run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
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


@dataclass
class Limits:
    """Per-process limits. ``memory_mb`` bounds the address space (torch alone maps about 650 MB)."""
    memory_mb: int = 4096
    cpu_seconds: int = 1800
    file_mb: int = 256

    def __post_init__(self) -> None:
        if self.memory_mb < 1024:
            raise ValueError(f"memory_mb={self.memory_mb} is too small: importing torch needs about 1024 MB")
        if self.cpu_seconds <= 0 or self.file_mb <= 0:
            raise ValueError(f"cpu_seconds={self.cpu_seconds} and file_mb={self.file_mb} must be positive")

    def as_env(self) -> dict[str, str]:
        return {"AUTOGRADER_MEMORY_MB": str(self.memory_mb), "AUTOGRADER_CPU_S": str(self.cpu_seconds),
                "AUTOGRADER_FILE_MB": str(self.file_mb)}

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(int(os.environ.get("AUTOGRADER_MEMORY_MB", 4096)), int(os.environ.get("AUTOGRADER_CPU_S", 1800)),
                   int(os.environ.get("AUTOGRADER_FILE_MB", 256)))


@dataclass
class Report:
    namespace: bool = False
    namespace_error: str = ""
    readonly_mounts: int = 0
    writable: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)


def apply_limits(limits: Limits) -> None:
    mem = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    fsize = limits.file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# -- read-only file system through a user + mount namespace ------------------------------------------

def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _mount(libc, source: str | None, target: str, flags: int) -> None:
    rc = libc.mount(source.encode() if source else None, target.encode(), None, ctypes.c_ulong(flags), None)
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


def readonly_namespace(writable: list[Path], hidden: list[Path] = ()) -> Report:
    """Enter a new user + mount namespace where only ``writable`` folders can be written and the
    ``hidden`` folders look empty (an empty read-only tmpfs is mounted over each: the instructor's
    notebooks, other students' submissions and originals).

    Must run while the process has a single thread (``unshare(CLONE_NEWUSER)`` requires it).
    """
    report = Report(writable=[str(p) for p in writable])
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        report.namespace_error = f"unshare: {os.strerror(ctypes.get_errno())}"
        return report
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    _mount(libc, None, "/", MS_REC | MS_PRIVATE)
    for folder in hidden:
        folder = Path(folder)
        if folder.is_dir() and not any(Path(w).resolve().is_relative_to(folder.resolve()) for w in writable):
            rc = libc.mount(b"tmpfs", str(folder.resolve()).encode(), b"tmpfs", ctypes.c_ulong(MS_RDONLY), b"size=4k")
            if rc == 0:
                report.hidden.append(str(folder))
    keep = set()
    for folder in writable:
        folder = str(Path(folder).resolve())
        _mount(libc, folder, folder, MS_BIND | MS_REC)
        keep.add(folder)
    for target, options in _mount_points():
        if target in keep:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name, bit in _OPTION_FLAGS.items():
            if name in options:
                flags |= bit
        try:
            _mount(libc, None, target, flags)
            report.readonly_mounts += 1
        except OSError:
            pass  # /proc and a few pseudo file systems refuse; nothing there is ours to protect
    report.namespace = True
    # the working directory still points into the old (now read-only) mount: enter it again by path,
    # which resolves through the new writable bind mount when it is one of ``writable``
    os.chdir(os.getcwd())
    return report


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
            self.record("audit_hook", "learner code added an audit hook")
        elif event in ("sys.settrace", "sys.setprofile", "object.__setattr__"):
            where = self._from_learner(depth=1)
            if where:
                kind = "type_patch" if event == "object.__setattr__" else "introspection"
                self.record(kind, f"{event}{_short(args)} from {where}")


def _short(args: tuple) -> str:
    text = repr(args)
    return text if len(text) < 200 else text[:200] + "...)"


# -- watchdog ---------------------------------------------------------------------------------------------

def watch_parent(interval: float = 0.5) -> None:
    """Kill this process group when the parent dies (a daemon thread; survives learner code)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                try:
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                finally:
                    os._exit(137)

    threading.Thread(target=loop, name="autograder-watchdog", daemon=True).start()


def enter(sandbox: Path, scratch: Path, limits: Limits, hidden: list[Path] = (), **auditor_kwargs) -> tuple[Report, Auditor]:
    """Set up containment for the current process (call first thing, single-threaded).

    ``hidden`` defaults to the folders listed (``os.pathsep``-separated) in ``AUTOGRADER_HIDDEN``."""
    writable = [sandbox, scratch]
    if not hidden:
        hidden = [Path(p) for p in os.environ.get("AUTOGRADER_HIDDEN", "").split(os.pathsep) if p]
    report = Report(writable=[str(p) for p in writable])
    if os.environ.get("AUTOGRADER_NO_NAMESPACE") != "1":
        try:
            report = readonly_namespace(writable, hidden)
        except OSError as exc:
            report.namespace_error = str(exc)
    else:
        report.namespace_error = "disabled by AUTOGRADER_NO_NAMESPACE=1"
    auditor = Auditor(scratch / "audit.jsonl", writable, block_writes=not report.namespace, **auditor_kwargs)
    if not report.namespace:
        auditor.record("containment", f"no read-only namespace ({report.namespace_error}); writes blocked by the audit hook only")
    apply_limits(limits)
    return report, auditor


def read_audit_log(scratch: Path) -> list[dict]:
    path = scratch / "audit.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines()[:1000]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"kind": "garbled", "detail": line[:200]})
    return records
