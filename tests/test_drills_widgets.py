"""The notebook front: the widget runs the same engine and records to the same progress file."""
import pytest

pytest.importorskip("ipywidgets")

from lora_ref.drills import drill_widget as lazy_drill_widget  # noqa: E402
from lora_ref.drills.engine import resolve  # noqa: E402
from lora_ref.drills.progress import Progress  # noqa: E402
from lora_ref.drills.widgets import DrillWidget, drill_widget, mock_widget, stats_widget  # noqa: E402


def test_widget_question_check_rate_next(tmp_path):
    db = tmp_path / "p.sqlite"
    wd = drill_widget(topic="qlora", db=db, seed=0)
    assert isinstance(wd, DrillWidget) and wd.item.topic == "qlora"
    wd.ask(resolve("qlora.not-innovation"))
    assert wd.input.children == (wd.options,) and len(wd.options.options) == 4
    wd.options.value = "d"
    wd.check.click()
    assert "Correct" in wd.feedback.value and "Source:" in wd.feedback.value
    assert wd.rate_box.layout.display == "flex" and wd.rating.value == 3 and wd.check.disabled
    wd.rating.value = 4
    wd.next.click()
    assert wd.item.id != "qlora.not-innovation" and wd.feedback.value == ""
    with Progress(db) as p:
        (rev,) = p.reviews()
    assert rev["item"] == "qlora.not-innovation" and rev["rating"] == 4 and rev["mode"] == "notebook"


def test_widget_free_text_numeric_and_skip():
    wd = drill_widget(db=":memory:", seed=1)
    wd.ask(resolve("bug.labels"))
    assert wd.input.children == (wd.text,) and "4 | " in wd.question.value
    wd.text.value = "line 4: labels=input_ids puts the loss on the prompt and the padding; use -100"
    wd.check.click()
    assert "Right line (4)" in wd.feedback.value and "cannot tell whether your reasoning" in wd.feedback.value
    wd.ask(resolve("gen.memory-lora@2"))
    assert wd.input.children == (wd.line,) and "GB" in wd.line.placeholder
    wd.line.value = "1 GB"
    wd.check.click()
    assert "Not quite" in wd.feedback.value and wd.rating.value == 1
    wd.skip.click()                                             # skip: nothing recorded
    assert wd.drill.progress.reviews() == []
    wd.show_stats.click()
    assert "mastery" in wd.stats.value and "Streak" in wd.stats.value


def test_lazy_import_and_stats_widget(tmp_path):
    wd = lazy_drill_widget(topic="sizing", db=tmp_path / "q.sqlite", seed=3)
    assert wd.item.topic == "sizing"
    assert "<table>" in stats_widget(tmp_path / "q.sqlite").value


def test_grading_run_never_touches_the_progress_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DRILLS_HOME", str(tmp_path))
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    wd = drill_widget(seed=0)
    assert wd.drill.progress.path is None and not (tmp_path / "progress.sqlite").exists()
    monkeypatch.delenv("NBGRADER_EXECUTION")
    assert drill_widget(seed=0).drill.progress.path == tmp_path / "progress.sqlite"


def test_mock_widget_runs_to_its_report(tmp_path):
    wd = mock_widget(minutes=10, count=2, db=tmp_path / "m.sqlite", seed=5, kinds=["choice"])
    topics = []
    for _ in range(2):
        assert "Mock interview: question" in wd.header.value
        topics.append(wd.item.topic)
        wd.options.value = "a"
        wd.check.click()
        wd.next.click()
    assert wd.item is None and "Mock interview: 2 questions" in wd.question.value and wd.check.disabled
    assert len(set(topics)) == 2
    with Progress(tmp_path / "m.sqlite") as p:
        assert [r["mode"] for r in p.reviews()] == ["mock", "mock"]
