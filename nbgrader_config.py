# nbgrader configuration for commands run at the repository root (nbgrader autograde, formgrader, ...).
# The course settings live in autograder/nbgrader_config.py (also used by `python -m autograder grade`).
load_subconfig("autograder/nbgrader_config.py")  # noqa: F821 - provided by traitlets
