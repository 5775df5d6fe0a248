"""Where every file of a grading run lives: the one module that names the scratch layout.

::

    <out>/scratch/<A>/<student>/          a worker's folder (no sandbox sees it)
        job.json                          the Job (contracts.Job)
        worker.log                        the worker's stdout and stderr
        autograde.log                     nbgrader's log of the last autograde attempt
        kernel/                           the notebook kernel's sandbox: the only folder it can write or read
            work/                         its working folder (nbgrader's autograded copy is NOT here)
            home/ tmp/ ipython/ mpl/ cache/ runtime/   HOME, TMPDIR, ...; runtime/ holds the connection file
            progress.json                 the cell that is running (written by the kernel; names a crash)
            containment.json              what the sandbox achieved (written by the kernel; evidence only)
            audit.jsonl                   the kernel's audit records (evidence only)
        judge/                            the judge's folder
            stderr.txt                    the harness's stderr (held by the worker)
            work/                         the harness's sandbox: its only visible folder
                audit.jsonl               the harness's audit records (evidence only)

Files inside a sandbox are written by learner code too: the worker reads them only as evidence, without
following symlinks (:func:`read_small`), and never writes into them after learner code ran.
"""
from __future__ import annotations

import os
from pathlib import Path

KERNEL_SUBDIRS = ("work", "home", "tmp", "ipython", "mpl", "cache", "runtime")


def submission(out: Path, assignment: str, student: str) -> Path:
    return Path(out) / "scratch" / assignment / student


def job_file(scratch: Path) -> Path:
    return Path(scratch) / "job.json"


def worker_log(scratch: Path) -> Path:
    return Path(scratch) / "worker.log"


def autograde_log(scratch: Path) -> Path:
    return Path(scratch) / "autograde.log"


def kernel_dir(scratch: Path) -> Path:
    return Path(scratch) / "kernel"


def kernel_progress(kernel: Path) -> Path:
    return Path(kernel) / "progress.json"


def kernel_containment(kernel: Path) -> Path:
    return Path(kernel) / "containment.json"


def kernel_startup_error(kernel: Path) -> Path:
    """Why the kernel process failed before ipykernel started (its stderr is /dev/null by then)."""
    return Path(kernel) / "startup_error.txt"


def judge_dir(scratch: Path) -> Path:
    return Path(scratch) / "judge"


def judge_work(judge: Path) -> Path:
    return Path(judge) / "work"


def judge_stderr(judge: Path) -> Path:
    return Path(judge) / "stderr.txt"


def audit_folders(scratch: Path) -> dict[str, Path]:
    """Where each sandbox writes its ``audit.jsonl`` (see :func:`autograder.sandbox.read_audit_log`)."""
    return {"kernel": kernel_dir(scratch), "judge": judge_work(judge_dir(scratch))}


def read_small(path: Path, limit: int = 1_000_000) -> str:
    """Text of a file a sandbox may have written: no symlink followed, at most ``limit`` bytes; '' if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not os.path.isfile(f"/proc/self/fd/{f.fileno()}"):
            return ""
        return f.read(limit).decode(errors="replace")
