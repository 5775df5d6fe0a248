# nbgrader settings for the course as a learner opens it (`make lab` starts JupyterLab in this folder,
# so the Validate button reads this file). The course settings live in autograder/nbgrader_config.py.
import os

load_subconfig("../autograder/nbgrader_config.py")  # noqa: F821 - provided by traitlets
c = get_config()  # noqa: F821

# a busy laptop can take more than nbgrader's default 4 s to answer the first cell that loads the model
c.Execute.iopub_timeout = 60
# the assignment-list extension wants a writable exchange folder (ignored by git)
c.Exchange.root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "exchange")
