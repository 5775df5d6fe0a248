"""Grade a class of course notebooks with nbgrader: in parallel, sandboxed, and not fooled by monkeypatching.

    python -m autograder grade [SUBMISSIONS] [--assignment A] [--jobs N] [--timeout S] [--memory-mb M] [--out DIR]
    python -m autograder validate NOTEBOOK
    python -m autograder audit NOTEBOOK

See autograder/README.md for the design and the threat model.
"""
import sys

# nbformat imports jsonschema, which imports the optional rfc3987_syntax when it is installed (jupyter-events
# asks for it): that module builds a Lark grammar at import, 3.5-4 s of every grading process (the CLI, each
# worker, each Dask task's process) for an "iri" string format that no notebook schema uses. Marking it
# absent makes jsonschema skip that one checker (its import is guarded by suppress(ImportError)).
# tests/test_autograder.py::test_grading_processes_skip_the_slow_optional_import holds both halves.
sys.modules.setdefault("rfc3987_syntax", None)
