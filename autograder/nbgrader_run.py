"""Run an nbgrader command in a process that starts in seconds: ``python -m autograder.nbgrader_run ARGS``.

The same command as ``python -m nbgrader ARGS``, with two start-up costs removed (measured on the 2-core CI
machine; ``benchmarks/grading_speed.py`` times a whole grading run):

- ``import autograder`` first, so jsonschema skips the optional rfc3987_syntax (see ``autograder/__init__``);
- a new gradebook records nbgrader's alembic head, which nbgrader finds by starting ``alembic heads`` in a
  subprocess (a second Python importing nbgrader: 7-8 s); :func:`alembic_head` reads the same revision from
  nbgrader's migration scripts in this process.
"""
from __future__ import annotations

import sys

import autograder  # noqa: F401  (before nbformat: see the module docstring)


def alembic_head() -> str:
    """The head revision of nbgrader's gradebook migrations (what ``alembic heads`` prints first)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", "nbgrader:alembic")
    return ScriptDirectory.from_config(cfg).get_current_head()


def main(argv: list[str]) -> None:
    import nbgrader.api
    from nbgrader.apps.nbgraderapp import main as nbgrader_main

    nbgrader.api.get_alembic_version = alembic_head
    sys.argv = ["nbgrader", *argv]
    nbgrader_main()


if __name__ == "__main__":
    main(sys.argv[1:])
