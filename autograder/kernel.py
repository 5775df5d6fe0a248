"""The grading kernel: ipykernel, started inside the sandbox.

``nbgrader autograde`` starts kernels from a kernelspec; the grading run writes one named
``autograder-sandbox`` whose argv is ``python -m autograder.kernel -f {connection_file}``. This module
then, before ipykernel exists (the process is still single-threaded):

- it was started through :func:`autograder.sandbox.command` (the kernelspec's argv): fresh user, mount,
  PID and network namespaces (it talks to nbgrader over unix sockets in its runtime folder);
- enters the sandbox (:func:`autograder.sandbox.enter`) with the plan the worker put in
  ``AUTOGRADER_PLAN``: only its own scratch folder visible and writable (its working folder is there; the
  autograded copy with the hidden tests is not visible), caches read-only, limits, audit hook. The worker
  owns this process (its launcher is the worker's child): no pid file;
- caps what one cell may print and display (``AUTOGRADER_OUTPUT_BYTES``, default 1 MB each for printed
  text and rich outputs; the rest is replaced by one line), so a cell printing or displaying in a loop
  cannot exhaust the grader's memory;
- records which cell starts (``<scratch>/progress.json``), so a cell that kills the kernel (``os._exit``,
  a segfault) can be named in the result; on the retry, cells whose source hash is listed in
  ``<scratch>/skip.json`` are replaced by a ``raise`` before they run (an input transformer), so the rest
  of the notebook is graded and the crashing cell scores zero (the list comes in ``AUTOGRADER_SKIP``). Test cells cannot be edited by the learner
  (nbgrader restores them), so this is the only way to get past a test cell that calls a crashing answer.

Configuration comes from the environment of the grading worker: ``AUTOGRADER_SCRATCH`` (required),
``AUTOGRADER_MEMORY_MB``, ``AUTOGRADER_CPU_S``, ``AUTOGRADER_FILE_MB``, ``AUTOGRADER_OUTPUT_BYTES``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from autograder import sandbox


class CappedStream:
    """Forward writes to ``stream`` until ``cap`` characters were written in the current cell."""

    def __init__(self, stream, cap: int):
        self._stream, self._cap, self.written, self.truncated = stream, cap, 0, False

    def reset(self) -> None:
        self.written, self.truncated = 0, False

    def write(self, text):
        if self.written >= self._cap:
            if not self.truncated:
                self.truncated = True
                self._stream.write(f"\n[autograder: output of this cell truncated after {self._cap} characters]\n")
            return len(text)
        self.written += len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class CappedDisplay:
    """Rich outputs (``display(...)``, a cell's result) of one cell past ``cap`` characters are replaced by
    one line, as :class:`CappedStream` does for printed text: wraps the shell's display publisher and
    display hook. Protection against a runaway loop, not against code that talks to the kernel's session."""

    NOTE = "[autograder: rich output of this cell dropped after {cap} characters]"

    def __init__(self, shell, cap: int):
        self._cap, self.used, self.dropped = cap, 0, False
        self._publish = shell.display_pub.publish
        self._write = shell.displayhook.write_format_data
        shell.display_pub.publish = self.publish
        shell.displayhook.write_format_data = self.write_format_data

    def reset(self) -> None:
        self.used, self.dropped = 0, False

    def _admit(self, data) -> bool:
        size = sum(len(v) if isinstance(v, (str, bytes)) else len(json.dumps(v, default=str))
                   for v in (data or {}).values())
        if self.used + size > self._cap:
            return False
        self.used += size
        return True

    def _note(self) -> dict | None:
        if self.dropped:
            return None
        self.dropped = True
        return {"text/plain": self.NOTE.format(cap=self._cap)}

    def publish(self, data, metadata=None, *args, **kwargs):
        if self._admit(data):
            return self._publish(data, metadata, *args, **kwargs)
        note = self._note()
        if note:
            return self._publish(note, {}, *args, **kwargs)

    def write_format_data(self, format_dict, md_dict=None):
        if self._admit(format_dict):
            return self._write(format_dict, md_dict)
        return self._write(self._note() or {"text/plain": ""}, {})


def main() -> None:
    from autograder import layout
    from autograder.contracts import Limits
    from autograder.course import register_extra_exercises

    scratch = Path(os.environ["AUTOGRADER_SCRATCH"]).resolve()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):          # inherited from the worker (its log): learner code could reopen them
        os.dup2(null, fd)
    try:
        plan = sandbox.Plan.from_env(os.environ.get("AUTOGRADER_PLAN") or json.dumps({"writable": [str(scratch)]}))
        report, auditor = sandbox.enter(plan, Limits.from_env(), scratch / "audit.jsonl")
        # after the sandbox: importing torch starts threads, and the kernel refuses unshare to a threaded process
        register_extra_exercises()
    except BaseException as exc:
        layout.kernel_startup_error(scratch).write_text(f"{type(exc).__name__}: {exc}"[:2000])
        raise
    layout.kernel_containment(scratch).write_text(json.dumps({"isolation": report.isolation, **report.__dict__}))
    auditor.install()

    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(sys.argv[1:])
    cap = int(os.environ.get("AUTOGRADER_OUTPUT_BYTES", 1_000_000))
    streams = [CappedStream(sys.stdout, cap), CappedStream(sys.stderr, cap)]
    sys.stdout, sys.stderr = streams
    streams.append(CappedDisplay(app.shell, cap))
    progress = layout.kernel_progress(scratch)
    skip = set(json.loads(os.environ.get("AUTOGRADER_SKIP") or "[]"))

    def pre_run_cell(info) -> None:
        auditor.active = True
        for s in streams:
            s.reset()
        try:
            progress.write_text(json.dumps({"cell_id": getattr(info, "cell_id", None),
                                            "sha": source_hash(info.raw_cell or ""),
                                            "source": (info.raw_cell or "")[:2000]}))
        except OSError:
            pass

    def skip_crashed(lines: list[str]) -> list[str]:
        if skip and source_hash("".join(lines)) in skip:
            return ["raise RuntimeError('autograder: this cell was skipped because it crashed the kernel "
                    "(the process died) on the previous grading attempt')\n"]
        return lines

    app.shell.events.register("pre_run_cell", pre_run_cell)
    app.shell.input_transformers_cleanup.insert(0, skip_crashed)
    app.start()


def source_hash(source: str) -> str:
    return hashlib.sha256(source.strip().encode()).hexdigest()[:20]


if __name__ == "__main__":
    main()
