"""Grades feed the drills: the topics of failed exercises become cards due now (CLI, widget, both report formats)."""
import io
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from autograder.contracts import CellScore, ExerciseOutcome, Result
from lora_ref.drills import cli
from lora_ref.drills.engine import Drill, catalogue
from lora_ref.drills.from_grades import exercises_of_cells, failed_exercises, schedule_failed
from lora_ref.drills.items import TOPICS
from lora_ref.drills.progress import Progress
from lora_ref.exercises import REGISTRY, load_all, topics_of

ROOT = Path(__file__).resolve().parents[1]
MERGE_CARDS = {"deploy.merge-vs-separate", "deploy.qlora-merge", "bug.merge-weights"}


def _failed_merge_result() -> Result:
    return Result(student="ada", assignment="02_lora_linear", score=6, max_score=9,
                  judge={"02.lora_merge": ExerciseOutcome("02.lora_merge", False, 10, 3, "weight_merged differs"),
                         "02.lora_forward": ExerciseOutcome("02.lora_forward", True, 16, 16)},
                  cells={"test_lora_merge": CellScore(0, 3, "failed", ["02.lora_merge", "02.lora_merge_half"]),
                         "test_lora_forward": CellScore(3, 3, "", ["02.lora_forward"])})


def test_every_exercise_names_known_topics():
    load_all()
    for ex_id in REGISTRY:
        assert topics_of(ex_id), ex_id
        assert set(topics_of(ex_id)) <= set(TOPICS), (ex_id, topics_of(ex_id))


def test_failed_merge_in_an_autograder_result_makes_merge_cards_due(tmp_path):
    report = json.loads(_failed_merge_result().to_json())
    assert failed_exercises(report) == ["02.lora_merge", "02.lora_merge_half"]
    now = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    with Progress(tmp_path / "p.sqlite") as p:
        # a merge card reviewed well yesterday is not due for days; the failure brings it back now
        p.record("deploy.merge-vs-separate", "deployment", "free", item="deploy.merge-vs-separate", rating=4,
                 suggested=4, score=1.0, now=now - timedelta(days=1))
        assert "deploy.merge-vs-separate" not in {c.card for c in p.due(now)}
        done = schedule_failed(p, report, now=now)
        assert "deployment" in done.topics and "lora-math" not in done.topics     # forward passed
        due = {c.card for c in p.due(now)}
        assert MERGE_CARDS <= due
        assert due == {c.id for c in catalogue() if c.topic in done.topics}
        assert p.card("deploy.merge-vs-separate").state.stability is not None        # memory kept
        first = Drill(p, seed=0, clock=lambda: now).next_card()
        assert first.topic in done.topics


def test_passing_result_schedules_nothing(tmp_path):
    r = _failed_merge_result()
    r.judge["02.lora_merge"] = ExerciseOutcome("02.lora_merge", True, 10, 10)
    r.cells["test_lora_merge"] = CellScore(3, 3, "", ["02.lora_merge"])
    with Progress(tmp_path / "p.sqlite") as p:
        assert schedule_failed(p, json.loads(r.to_json())).cards == ()
        assert p.due() == []


def test_validate_report_maps_cells_through_the_solution():
    assert "02.lora_merge" in exercises_of_cells("02_lora_linear")["test_lora_merge"]
    report = {"notebook": "notebooks/02_lora_linear/02_lora_linear.ipynb", "passed": False,
              "failed": [{"cell": "test_lora_merge", "error": "AssertionError"}], "changed": [], "type_changed": []}
    assert "02.lora_merge" in failed_exercises(report)
    with pytest.raises(ValueError, match="not a grade report"):
        failed_exercises({"score": 3})


def test_cli_from_grades(tmp_path):
    path = tmp_path / "ada.json"
    path.write_text(_failed_merge_result().to_json())
    out = io.StringIO()
    assert cli.main(["--db", str(tmp_path / "p.sqlite"), "from-grades", str(path)], out=out) == 0
    assert "02.lora_merge" in out.getvalue() and "cards due now" in out.getvalue()
    with Progress(tmp_path / "p.sqlite") as p:
        assert MERGE_CARDS <= {c.card for c in p.due()}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert cli.main(["--db", str(tmp_path / "p.sqlite"), "from-grades", str(bad)], out=io.StringIO()) == 2


@pytest.mark.slow
def test_end_to_end_validate_a_broken_merge_then_drill(tmp_path):
    """A real notebook 02 whose merge adds nothing, validated by the autograder CLI, fed to lora-drill."""
    nb = json.loads((ROOT / "solutions/02_lora_linear/02_lora_linear.ipynb").read_text())
    hits = 0
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == "lora_merge":
            assert "+ self.delta_weight()" in src
            cell["source"] = src.replace("+ self.delta_weight()", "+ 0 * self.delta_weight()")
            hits += 1
    assert hits == 1
    target = tmp_path / "02_lora_linear.ipynb"
    target.write_text(json.dumps(nb))
    proc = subprocess.run([sys.executable, "-m", "autograder", "validate", "--json", str(target)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert any(f["cell"] == "test_lora_merge" for f in report["failed"]), report
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert cli.main(["--db", str(tmp_path / "p.sqlite"), "from-grades", str(tmp_path / "report.json")],
                    out=io.StringIO()) == 0
    with Progress(tmp_path / "p.sqlite") as p:
        assert MERGE_CARDS <= {c.card for c in p.due()}


def test_widget_offers_the_same(tmp_path):
    from lora_ref.drills.widgets import drill_widget
    path = tmp_path / "ada.json"
    path.write_text(_failed_merge_result().to_json())
    wdg = drill_widget(db=str(tmp_path / "p.sqlite"), seed=0)
    wdg.grades_path.value = str(path)
    wdg.from_grades.click()
    assert "02.lora_merge" in wdg.grades_note.value and "cards are due now" in wdg.grades_note.value
    assert wdg.item.topic in topics_of("02.lora_merge")
    assert MERGE_CARDS <= {c.card for c in wdg.drill.progress.due()}
    wdg.on_grades(str(tmp_path / "missing.json"))
    assert "Could not read" in wdg.grades_note.value


def test_help_shows_an_example_of_every_command():
    """`lora-drill --help` is where a candidate looks first: each subcommand has a worked example there."""
    text = cli.build_parser().format_help()
    for name in cli.COMMANDS:
        assert f"lora-drill {name}" in text, name
