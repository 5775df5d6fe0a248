"""A fork server for the local pool's workers: the imports every worker needs are paid once per run.

A grading worker (:mod:`autograder.worker`) imports nbgrader, nbconvert, jupyter_client, torch,
safetensors and the notebook's exercises before it grades anything: about 7 s on one core of the 2-core
CI machine, for every submission, where plain nbgrader pays them once for the whole class. This
process imports them once (:data:`PRELOAD`) and then forks one child per submission: the child is a
fresh worker (its own process, session, environment, working folder and log; nothing of one submission
is left in the next, since every child starts from the same parent state) whose imports are done.

The server never runs learner code and starts no thread: learner code runs in the sandboxed kernel and
harness that the *child* starts, exactly as from a worker started by ``python -m autograder.worker``.

Protocol, one JSON object per line (``python -m autograder.forkserver``; :class:`ForkServer` speaks it):

    -> {"job": JOB.json, "log": worker.log, "cwd": folder, "env": {...}, "script": false}   fork a worker
    <- {"job": JOB.json, "pid": n}                                             forked (its session id is n)
    <- {"pid": n, "rc": code}                                                  it ended (-N: killed by signal N)

The server exits when its stdin closes (after its children end) or when the grading run dies
(``PR_SET_PDEATHSIG``); each child dies with the server the same way.
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import traceback

import autograder  # noqa: F401  (before nbformat: see autograder/__init__)

#: What a worker imports on its way (nbgrader's autograde and feedback apps, the kernel client, the
#: judge's tensors). A module that fails to import is skipped: the child imports it itself, or fails
#: exactly as a worker started on its own would.
PRELOAD = (
    "autograder.worker", "autograder.judge", "autograder.audit", "autograder.course",
    "traitlets.config.loader", "nbconvert.preprocessors", "nbconvert.exporters.html",
    "nbgrader.preprocessors", "nbgrader.apps", "nbgrader.converters", "nbgrader.api",
    "nbclient", "jupyter_client", "safetensors.torch", "torch", "lora_ref.exercises",
)


def preload(modules=PRELOAD) -> list[str]:
    """Import ``modules``; return those that failed (``name: error``)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


def _child(request: dict) -> None:
    """In the forked child: become a worker started by ``python -m autograder.worker JOB`` and exit."""
    code = 1
    try:
        os.setsid()
        from autograder.grade import _set_pdeathsig
        _set_pdeathsig()                        # die with the server (which dies with the grading run)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request.get("script"):                # tests: any Python file, run as its __main__
            import runpy
            sys.argv = [request["job"]]
            runpy.run_path(request["job"], run_name="__main__")
        else:
            sys.argv = ["autograder.worker", request["job"]]
            from autograder import worker
            worker.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the log says why; the grading run writes the error result
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    from autograder.grade import _set_pdeathsig
    _set_pdeathsig()
    failed = preload()
    from autograder.sandbox import mapped_mb
    out = sys.stdout
    # what a process that imported torch and the rest maps: the sandbox's memory limit must exceed it
    out.write(json.dumps({"ready": True, "preload_failed": failed, "mapped_mb": mapped_mb()}) + "\n")
    out.flush()
    fd = sys.stdin.fileno()
    pending = b""
    children = 0
    open_input = True
    while open_input or children:
        # raw reads, not readline: a line left in a file object's buffer would never wake select()
        ready, _, _ = select.select([fd] if open_input else [], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 1 << 16)
            open_input = bool(chunk)
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)                  # never returns
            children += 1
            out.write(json.dumps({"job": request["job"], "pid": pid}) + "\n")
            out.flush()
        children -= _reap(out)


def _reap(out) -> int:
    """Collect the children that ended, report each; return how many."""
    n = 0
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"pid": pid, "rc": rc}) + "\n")
        out.flush()
        n += 1


class ForkServer:
    """The grading run's end of the protocol: :meth:`run` grades one job in a forked worker and returns
    its exit code, or None past ``wall`` seconds (its session is then killed). Thread-safe: the local
    pool's threads call it at once. The constructor returns at once (the server imports meanwhile). A
    server that cannot start or dies before a worker is forked makes :meth:`run` raise
    :class:`ForkServerError` (the caller starts that worker as a plain process instead)."""

    def __init__(self, env: dict, preexec_fn=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "autograder.forkserver"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     preexec_fn=preexec_fn)
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._ready: bool | None = None               # None until the server says it is ready (or dies)
        self._pids: dict[str, int] = {}
        self._rcs: dict[int, int] = {}
        self._alive = True
        self.preload_failed: list[str] = []
        self._mapped_mb: int | None = None
        # the reader waits for the server's "ready" (its imports, seconds): the grading run goes on with
        # its own set-up meanwhile, and the first run() waits for it
        threading.Thread(target=self._read, name="autograder-forkserver", daemon=True).start()

    def _read(self) -> None:
        hello = self.proc.stdout.readline()
        try:
            ready = json.loads(hello) if hello else {}
        except json.JSONDecodeError:
            ready = {}
        with self._cond:
            self.preload_failed = list(ready.get("preload_failed", []))
            self._mapped_mb = ready.get("mapped_mb")
            self._ready = bool(ready.get("ready"))
            self._alive = self._ready
            self._cond.notify_all()
        if not self._ready:
            return
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "job" in msg:
                    self._pids[msg["job"]] = msg["pid"]
                else:
                    self._rcs[msg["pid"]] = msg["rc"]
                self._cond.notify_all()
        with self._cond:
            self._alive = False
            self._cond.notify_all()

    def _wait(self, table: dict, key, timeout: float | None):
        """Take ``table[key]`` once the reader has put it there; None past ``timeout``; ForkServerError
        if the server dies first."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in table or not self._alive, timeout):
                return None
            if key not in table:
                raise ForkServerError("the fork server died")
            return table.pop(key)

    def run(self, job: str, log: str, cwd: str, env: dict, wall: float, script: bool = False) -> int | None:
        """Grade ``job`` (a job.json; with ``script``, run that Python file instead) in a forked worker
        whose output goes to ``log``; its exit code (-N: signal N), or None if it ran past ``wall``."""
        request = {"job": job, "log": log, "cwd": cwd, "env": env, "script": script}
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready is not None, 300) or not self._ready:
                raise ForkServerError("the fork server did not start")
        with self._lock:
            if not self._alive or self.proc.poll() is not None:
                raise ForkServerError("the fork server is not running")
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:              # ValueError: its stdin was closed (detach)
                raise ForkServerError(f"the fork server is not reachable ({exc})") from None
        pid = self._wait(self._pids, job, 60)
        if pid is None:
            raise ForkServerError("the fork server did not fork the worker within 60 s")
        # forked: from here on the worker exists, so no error may lead the caller to start it again
        try:
            rc = self._wait(self._rcs, pid, wall)
            timed_out = rc is None
        except ForkServerError:
            rc, timed_out = -signal.SIGKILL, False   # the server died; its children die with it (PDEATHSIG)
        try:
            os.killpg(pid, signal.SIGKILL)            # the worker's session: its kernel and judge, if left
        except OSError:
            pass
        if timed_out:
            try:
                self._wait(self._rcs, pid, 60)
            except ForkServerError:
                pass
            return None
        return rc

    def mapped_mb(self, timeout: float = 300) -> int | None:
        """The address space (MB) the server maps once its imports are done (torch among them), waiting
        for them; None if it never became ready."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready is not None, timeout)
            return self._mapped_mb if self._ready else None

    def alive(self) -> bool:
        """False once the server is known to have died (a server still importing counts as alive)."""
        return self._alive and self.proc.poll() is None

    def detach(self) -> None:
        """Send it no more work without waiting: it exits once the workers it forked have ended (a
        Dask worker whose code changed on disk starts a new server beside the old one's last workers)."""
        with self._lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close its stdin: the server exits once its workers have ended (called again: nothing more)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ForkServerError(RuntimeError):
    pass


if __name__ == "__main__":
    serve()
