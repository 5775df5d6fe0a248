"""lora-drill --help as a new user reads it (issue 13, item 13)."""
import re

import pytest

from lora_ref.drills.cli import build_parser, main
from lora_ref.drills.engine import Drill, MockInterview
from lora_ref.drills.progress import Progress


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_main_help_says_its_description_once_without_markup(capsys):
    out = _help(["--help"], capsys)
    assert "``" not in out
    assert out.count("interview drills in the terminal") == 1
    assert out.count("lora-drill show ID") == 1


def test_every_option_has_a_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sp in [("lora-drill", parser), *subparsers.items()]:
        for action in sp._actions:
            if action.dest not in ("help", "command") and not action.help:
                pytest.fail(f"{name} {action.option_strings or action.dest} has no help text")


@pytest.mark.parametrize("minutes", [5, 20, 31])
def test_mock_help_states_the_default_the_code_uses(capsys, minutes):
    out = " ".join(_help(["mock", "--help"], capsys).split())
    m = re.search(r"--minutes MINUTES .*?\(default (\d+)\)", out)
    assert m and float(m.group(1)) == build_parser().parse_args(["mock"]).minutes
    assert "minutes / 3 rounded down, at least 3" in out
    m = re.search(r"(\d+) for 20 minutes", out)
    with Progress(":memory:") as progress:
        assert int(m.group(1)) == MockInterview(Drill(progress, seed=0), 20.0).count
        assert MockInterview(Drill(progress, seed=0), minutes).count == max(3, minutes // 3)
