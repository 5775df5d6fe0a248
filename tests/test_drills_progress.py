"""Spaced repetition: SQLite progress survives restarts, bad files give clear errors, statistics, selection."""
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from lora_ref.drills import engine
from lora_ref.drills.engine import Drill, MockInterview, catalogue, resolve, topic_catalogue
from lora_ref.drills.progress import Progress, ProgressError, default_path

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def _record(p, card, rating, when, topic="lora-math", kind="free", score=1.0):
    return p.record(card, topic, kind, item=card, rating=rating, suggested=rating, score=score, now=when)


def test_progress_survives_restart(tmp_path):
    db = tmp_path / "p.sqlite"
    with Progress(db, fuzz=False) as p:
        first = _record(p, "lora.init", 3, T0)
        _record(p, "qlora.three", 1, T0, topic="qlora")
    with Progress(db, fuzz=False) as p:                   # a new process would do exactly this
        again = p.card("lora.init")
        assert again.state.due == first.state.due and again.state.stability == first.state.stability
        assert {r["card"] for r in p.reviews()} == {"lora.init", "qlora.three"}
        assert p.card("qlora.three").lapses == 1
        later = _record(p, "lora.init", 3, first.state.due)
        assert later.state.due > first.state.due         # the schedule continues from the saved state


def test_not_a_database_is_a_clear_error(tmp_path):
    db = tmp_path / "progress.sqlite"
    db.write_bytes(b"this is not sqlite\n" * 100)
    with pytest.raises(ProgressError) as err:
        Progress(db)
    msg = str(err.value)
    assert str(db) in msg and "Move it aside" in msg


def test_truncated_database_is_a_clear_error(tmp_path):
    db = tmp_path / "p.sqlite"
    with Progress(db) as p:
        for i in range(30):
            _record(p, f"card{i}", 3, T0 + timedelta(minutes=i))
    data = db.read_bytes()
    db.write_bytes(data[:100] + b"\xff" * (len(data) - 100))     # header kept, pages destroyed
    with pytest.raises(ProgressError, match="unreadable|damaged|another program"):
        Progress(db).reviews()


def test_foreign_database_and_damaged_rows(tmp_path):
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ProgressError, match="another program"):
        Progress(other)
    db = tmp_path / "p.sqlite"
    with Progress(db) as p:
        _record(p, "lora.init", 3, T0)
        p.db.execute("UPDATE cards SET fsrs = '{not json' WHERE card = 'lora.init'")
        p.db.commit()
    with pytest.raises(ProgressError, match="lora.init.*damaged"):
        Progress(db).card("lora.init")
    with Progress(db) as p:
        p.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        p.db.commit()
    with pytest.raises(ProgressError, match="schema"):
        Progress(db)
    with pytest.raises(ProgressError, match="directory"):
        Progress(tmp_path)


def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ProgressError, match="cannot create the folder"):
        Progress(blocker / "sub" / "p.sqlite")


def test_default_path_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DRILLS_HOME", str(tmp_path / "drills"))
    assert default_path() == tmp_path / "drills" / "progress.sqlite"
    monkeypatch.delenv("LORA_DRILLS_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "lora-drills" / "progress.sqlite"
    with Progress(None) as p:
        assert p.path == default_path() and p.path.exists()


def test_rating_validated():
    with Progress(":memory:") as p, pytest.raises(ValueError, match="rating"):
        _record(p, "x", 5, T0)


def test_streak_counts_consecutive_days():
    with Progress(":memory:") as p:
        for day in (0, 1, 2, 4, 5):                      # a gap on day 3
            _record(p, f"c{day}", 3, T0 + timedelta(days=day))
        assert p.streak((T0 + timedelta(days=5)).date()) == 2
        assert p.streak((T0 + timedelta(days=6)).date()) == 2     # nothing yet today: yesterday still counts
        assert p.streak((T0 + timedelta(days=7)).date()) == 0
        assert p.streak((T0 + timedelta(days=2)).date()) == 3


def test_stats_mastery_weakest_and_accuracy():
    cat = {"lora-math": ["a", "b"], "qlora": ["c", "d"], "sizing": ["e"]}
    with Progress(":memory:", fuzz=False) as p:
        assert all(t.mastery == 0 and t.accuracy is None for t in p.stats(cat, T0).topics)
        _record(p, "a", 4, T0, score=1.0)
        _record(p, "b", 3, T0, score=0.8)
        _record(p, "c", 1, T0, topic="qlora", score=0.0)
        st = p.stats(cat, T0 + timedelta(hours=1))
        by = {t.topic: t for t in st.topics}
        assert by["lora-math"].seen == 2 and by["qlora"].seen == 1 and by["sizing"].seen == 0
        assert by["lora-math"].mastery > by["qlora"].mastery > 0 == by["sizing"].mastery
        assert by["lora-math"].accuracy == pytest.approx(0.9) and by["qlora"].accuracy == 0.0
        assert st.weakest_topics[0] == "qlora" and "sizing" not in st.weakest_topics
        assert st.weakest_cards == [("c", 1)] and st.reviews == 3 and st.reviews_today == 3
        # mastery decays as time passes without review
        assert p.stats(cat, T0 + timedelta(days=60)).topics[0].mastery < by["lora-math"].mastery


def test_drill_order_due_then_new_then_weakest():
    clock = [T0]
    with Progress(":memory:", fuzz=False) as p:
        d = Drill(p, seed=1, topic="mixed-precision", clock=lambda: clock[0])
        ids = {c.id for c in d.cards}
        seen = []
        for _ in range(len(ids)):                         # first pass: every card once, all new
            item = d.next_item()
            seen.append(item.card_id)
            d.rate(d.answer(item, "b"), rating=3)
        assert set(seen) == ids and len(seen) == len(ids)
        # a failed card becomes due first once its relearning step has passed
        fail = seen[0]
        p.record(fail, "mixed-precision", "free", item=fail, rating=1, suggested=1, score=0, now=clock[0])
        clock[0] = T0 + timedelta(minutes=30)
        d2 = Drill(p, seed=2, topic="mixed-precision", clock=lambda: clock[0])
        assert d2.next_card().id == fail


def test_catalogue_and_resolve():
    cards = catalogue()
    assert len(cards) >= 75 + 10
    assert {c.kind for c in catalogue(kinds=["numeric"])} == {"numeric"}
    assert all(c.topic == "qlora" for c in catalogue("qlora"))
    with pytest.raises(ValueError, match="unknown topic"):
        catalogue("nope")
    with pytest.raises(ValueError, match="unknown kind"):
        catalogue(kinds=["essay"])
    assert sum(len(v) for v in topic_catalogue().values()) == len(cards)
    assert resolve("lora.init").id == "lora.init"
    assert resolve("gen.bits@5") == resolve("gen.bits@5")
    assert resolve("gen.bits", seed=5).id == "gen.bits@5"


def test_mock_interview_mixes_topics_and_records():
    with Progress(":memory:") as p:
        mock = MockInterview(Drill(p, seed=3), minutes=30, count=6)
        topics = []
        while (item := mock.next_item()) is not None:
            topics.append(item.topic)
            answer = item.answer if item.kind == "free" else "a"
            mock.answer(item, answer)
        assert len(topics) == 6 and len(set(topics)) == 6          # one per topic in turn
        assert all(r["mode"] == "mock" for r in p.reviews())
        report = mock.report()
        assert "6 questions" in report and "mean score" in report
    with pytest.raises(ValueError, match="minutes"):
        MockInterview(Drill(Progress(":memory:")), minutes=0)


def test_mock_interview_stops_when_time_is_up(monkeypatch):
    t = [1000.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: t[0])
    with Progress(":memory:") as p:
        mock = MockInterview(Drill(p, seed=0), minutes=1, count=10)
        item = mock.next_item()
        t[0] += 61
        mock.answer(item, "a")
        assert mock.next_item() is None and len(mock.results) == 1
