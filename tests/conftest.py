import os
import warnings

# setuptools first: its _distutils_hack must run before anything imports the standard library's
# distutils, or every later in-process `import setuptools` (nbgrader.utils does it) fails its
# "'_distutils' in distutils.core.__file__" assertion for the rest of the test process
import setuptools  # noqa: F401,E402

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels-community.*")
# pytest runs with -n 2 on 2 cores: one thread per worker, or the workers oversubscribe the CPU
torch.set_num_threads(1)


@pytest.fixture
def tiny():
    from lora_ref.models import tiny_llama
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real model, loaded once per test process (read-only: tests that train must deep-copy)."""
    from lora_ref.models import load_smollm2
    return load_smollm2()


# -- how `pytest -n 2` (make test) shares the tests between its two processes ------------------------------
#
# A module whose tests share one expensive module-scoped fixture (a whole class graded once) must run in
# one process, its tests one after another: spread over both, or interleaved with other modules, pytest
# builds the fixture again each time (twice 400 s in CI). pytest-xdist's own `--dist loadgroup` cannot do it
# under pytest 9.2 (it renames items through `_nodeid`, which pytest no longer reads), so the scheduler is
# chosen here: these modules are one unit of work each; every other test is its own unit.
SHARED_FIXTURE_MODULES = ("tests/test_autograder_grading.py", "tests/test_adversarial.py")
# the longest units first, so that neither process is left running one of them alone at the end
LONGEST_FIRST = ("tests/test_smollm2.py::test_lora_learns_the_company_facts", *SHARED_FIXTURE_MODULES,
                 "tests/test_notebooks.py::test_solution_full_marks_student_zero")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_FIXTURE_MODULES else nodeid

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        for i, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONGEST_FIRST)
    items.sort(key=rank)          # stable: the same order in every process, as xdist requires
