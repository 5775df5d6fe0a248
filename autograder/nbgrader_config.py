# nbgrader configuration of the course (loaded by the root nbgrader_config.py and by `python -m autograder`).
# Grading-run settings (course root, sandbox kernel, limits) are added on the command line of the
# grader, not here, so plain `nbgrader ...` commands in the repository keep working.
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import ClearHiddenTests, GetGrades

from autograder.preprocessors import SanitizeTestErrors

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file

c.CourseDirectory.course_id = "lora-course"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"

# nbgrader's default is 30 s per cell; course notebooks run in at most 3 minutes in total.
c.Execute.timeout = 120
c.Execute.kernel_name = "python3"
# a deleted test cell is put back (and scores 0) instead of leaving the notebook "needs manual grading"
c.OverwriteCells.add_missing_cells = True
c.LimitOutput.max_lines = 300
c.LimitOutput.max_traceback = 60

# Feedback must not show hidden tests: nbgrader's default feedback HTML includes them.
# SanitizeTestErrors also cuts tracebacks of failing test cells to their last line, because the
# traceback of a failing hidden test quotes the hidden line (and frames of lora_ref) that failed.
c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests, SanitizeTestErrors]
