"""Grade a class of course notebooks with nbgrader: in parallel, sandboxed, and not fooled by monkeypatching.

    python -m autograder grade [SUBMISSIONS] [--assignment A] [--jobs N] [--timeout S] [--memory-mb M] [--out DIR]
    python -m autograder validate NOTEBOOK
    python -m autograder audit NOTEBOOK

See autograder/README.md for the design and the threat model.
"""
