"""Progress in a local SQLite file, scheduled with FSRS (the `fsrs` package: Anki's modern scheduler).

One row per *card* (a bank item, or a generator such as "gen.lora-params": you practise the skill, a
fresh instance each time) holding the FSRS card state as JSON, and one row per review. The file lives at
``$LORA_DRILLS_HOME/progress.sqlite`` if that variable is set, else
``$XDG_DATA_HOME/lora-drills/progress.sqlite`` (default ``~/.local/share/lora-drills/progress.sqlite``).

A file that is not a SQLite database, or not one of ours, or whose rows do not parse, raises
:class:`ProgressError` with the path and what to do, never a bare traceback.

Statistics (:meth:`Progress.stats`):

* mastery of a topic = mean FSRS retrievability one week ahead (the scheduler's probability that you
  would still recall the card in an interview a week from now) over *all* the topic's cards, counting
  never-reviewed cards as 0: it rises as you cover a topic and answer well, and falls as you forget;
* accuracy = mean automatic score of the topic's last 20 reviews;
* streak = consecutive (UTC) days, ending today (or yesterday, if nothing yet today), with at least one review;
* weakest areas = reviewed topics with the lowest mastery, and cards with the most "again" ratings.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

import fsrs

SCHEMA_VERSION = "1"
MASTERY_HORIZON = timedelta(days=7)
APP = "lora-drills"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    card TEXT PRIMARY KEY, topic TEXT NOT NULL, kind TEXT NOT NULL, fsrs TEXT NOT NULL, lapses INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT, card TEXT NOT NULL, item TEXT NOT NULL, topic TEXT NOT NULL,
    kind TEXT NOT NULL, ts TEXT NOT NULL, rating INTEGER NOT NULL, suggested INTEGER NOT NULL,
    score REAL NOT NULL, mode TEXT NOT NULL, seconds REAL
);
CREATE INDEX IF NOT EXISTS reviews_ts ON reviews (ts);
"""


class ProgressError(RuntimeError):
    """The progress file cannot be used; the message names the file and the way out."""


def default_path() -> Path:
    """``$LORA_DRILLS_HOME/progress.sqlite``, else under ``$XDG_DATA_HOME`` or ``~/.local/share``."""
    home = os.environ.get("LORA_DRILLS_HOME")
    if home:
        return Path(home).expanduser() / "progress.sqlite"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / APP / "progress.sqlite"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class CardInfo:
    card: str
    topic: str
    kind: str
    state: fsrs.Card
    lapses: int


@dataclass(frozen=True)
class TopicStats:
    topic: str
    cards: int            # cards the topic has (bank items + generators)
    seen: int             # cards reviewed at least once
    due: int              # reviewed cards due now
    mastery: float        # mean retrievability a week ahead over all cards, unseen = 0
    accuracy: float | None  # mean score of the last 20 reviews, None if none


@dataclass(frozen=True)
class Stats:
    reviews: int
    reviews_today: int
    streak: int
    topics: list[TopicStats]
    weakest_topics: list[str]
    weakest_cards: list[tuple[str, int]]   # (card, again count)


class Progress:
    """The SQLite progress store plus its FSRS scheduler.

    >>> p = Progress(":memory:")
    >>> p.record("lora.init", "lora-math", "free", item="lora.init", rating=3, suggested=3, score=0.75)
    """

    def __init__(self, path: str | os.PathLike | None = None, *, desired_retention: float = 0.9,
                 fuzz: bool = True):
        self.path = Path(path) if path not in (None, ":memory:") else (default_path() if path is None else None)
        self.scheduler = fsrs.Scheduler(desired_retention=desired_retention, enable_fuzzing=fuzz)
        target = ":memory:" if self.path is None else str(self.path)
        if self.path is not None:
            if self.path.is_dir():
                raise ProgressError(f"progress path {self.path} is a directory; give a file path (--db FILE)")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ProgressError(f"cannot create the folder for progress file {self.path}: {err}. "
                                    f"Set $LORA_DRILLS_HOME or --db to a writable place.") from None
        try:
            self.db = sqlite3.connect(target)
            self._check_and_create()
        except sqlite3.OperationalError as err:
            if "unable to open" in str(err) or "readonly" in str(err):
                raise ProgressError(f"cannot open or write progress file {self.path}: {err}. Set "
                                    f"$LORA_DRILLS_HOME or --db to a writable place.") from None
            raise ProgressError(self._corrupt(err)) from None
        except sqlite3.DatabaseError as err:
            raise ProgressError(self._corrupt(err)) from None

    # ------------------------------------------------------------------ file checks
    def _corrupt(self, err: Exception) -> str:
        return (f"progress file {self.path} is unreadable ({err}). It is not a lora-drills SQLite database or "
                f"it is damaged. Move it aside (mv {self.path} {self.path}.bak) to start fresh, or point "
                f"--db / $LORA_DRILLS_HOME elsewhere.")

    def _check_and_create(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise ProgressError(f"{self.path} is a SQLite database of another program (tables: {sorted(tables)}); "
                                f"refusing to write into it. Use another --db path.")
        with self.db:
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP,))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if meta.get("app") != APP:
            raise ProgressError(f"{self.path} belongs to {meta.get('app')!r}, not {APP}; use another --db path")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ProgressError(f"{self.path} has progress schema {meta.get('schema_version')!r}; this version "
                                f"reads {SCHEMA_VERSION!r}. Move the file aside to start fresh.")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as err:
            raise ProgressError(self._corrupt(err)) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ cards
    def card(self, card: str) -> CardInfo | None:
        rows = self._query("SELECT card, topic, kind, fsrs, lapses FROM cards WHERE card = ?", (card,))
        return self._parse(rows[0]) if rows else None

    def cards(self) -> dict[str, CardInfo]:
        return {r[0]: self._parse(r) for r in self._query("SELECT card, topic, kind, fsrs, lapses FROM cards")}

    def _parse(self, row: tuple) -> CardInfo:
        try:
            state = fsrs.Card.from_json(row[3])
        except (ValueError, KeyError, TypeError) as err:
            raise ProgressError(f"progress file {self.path}: the saved state of card {row[0]!r} is damaged "
                                f"({type(err).__name__}: {err}). Move the file aside to start fresh.") from None
        return CardInfo(row[0], row[1], row[2], state, int(row[4]))

    def retrievability(self, info: CardInfo, now: datetime | None = None) -> float:
        """Probability of recall now (FSRS); 0 for a card never reviewed."""
        if info.state.last_review is None:
            return 0.0
        return float(self.scheduler.get_card_retrievability(info.state, now or utcnow()))

    def due(self, now: datetime | None = None) -> list[CardInfo]:
        """Reviewed cards whose due time has passed, most overdue first."""
        now = now or utcnow()
        return sorted((c for c in self.cards().values() if c.state.due <= now), key=lambda c: c.state.due)

    def record(self, card: str, topic: str, kind: str, *, item: str, rating: int, suggested: int, score: float,
               mode: str = "practice", seconds: float | None = None, now: datetime | None = None) -> CardInfo:
        """Schedule ``card`` with the learner's ``rating`` (1 again .. 4 easy) and log the review."""
        if rating not in (1, 2, 3, 4):
            raise ValueError(f"rating must be 1 (again), 2 (hard), 3 (good) or 4 (easy), got {rating!r}")
        now = now or utcnow()
        info = self.card(card)
        state = info.state if info else fsrs.Card()
        state, _log = self.scheduler.review_card(state, fsrs.Rating(rating), now)
        lapses = (info.lapses if info else 0) + (rating == 1)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO cards VALUES (?, ?, ?, ?, ?)",
                            (card, topic, kind, state.to_json(), lapses))
            self.db.execute("INSERT INTO reviews (card, item, topic, kind, ts, rating, suggested, score, mode, seconds)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (card, item, topic, kind, now.isoformat(), rating, suggested, float(score), mode, seconds))
        return CardInfo(card, topic, kind, state, lapses)

    def make_due(self, card: str, topic: str, kind: str, now: datetime | None = None) -> CardInfo:
        """Schedule ``card`` as due ``now`` without logging a review (a failed graded exercise sends the
        learner back to its topic): a new card gets a fresh FSRS state due now; a known one keeps its
        memory state (stability, difficulty, lapses) and only its due time moves, never later."""
        now = now or utcnow()
        info = self.card(card)
        state = info.state if info else fsrs.Card(due=now)
        if state.due > now:
            state.due = now
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO cards VALUES (?, ?, ?, ?, ?)",
                            (card, topic, kind, state.to_json(), info.lapses if info else 0))
        return CardInfo(card, topic, kind, state, info.lapses if info else 0)

    def reviews(self, limit: int | None = None) -> list[dict]:
        sql = "SELECT card, item, topic, kind, ts, rating, suggested, score, mode, seconds FROM reviews ORDER BY id DESC"
        rows = self._query(sql + (f" LIMIT {int(limit)}" if limit else ""))
        keys = ("card", "item", "topic", "kind", "ts", "rating", "suggested", "score", "mode", "seconds")
        return [dict(zip(keys, r)) for r in rows]

    # ------------------------------------------------------------------ statistics
    def streak(self, today: date | None = None) -> int:
        """Consecutive days with a review, ending today, or yesterday if there is none yet today."""
        days = {datetime.fromisoformat(r[0]).date() for r in self._query("SELECT ts FROM reviews")}
        day = today or utcnow().date()
        if day not in days:
            day -= timedelta(days=1)
        n = 0
        while day in days:
            n += 1
            day -= timedelta(days=1)
        return n

    def stats(self, catalogue: dict[str, Iterable[str]], now: datetime | None = None) -> Stats:
        """Statistics over ``catalogue`` (topic -> the card ids it has), see the module docstring."""
        now = now or utcnow()
        cards = self.cards()
        topics = []
        for topic, ids in catalogue.items():
            ids = list(ids)
            seen = [cards[c] for c in ids if c in cards]
            ahead = now + MASTERY_HORIZON
            mastery = sum(self.retrievability(c, ahead) for c in seen) / len(ids) if ids else 0.0
            recent = self._query("SELECT score FROM reviews WHERE topic = ? ORDER BY id DESC LIMIT 20", (topic,))
            acc = sum(r[0] for r in recent) / len(recent) if recent else None
            topics.append(TopicStats(topic, len(ids), len(seen), sum(c.state.due <= now for c in seen), mastery, acc))
        reviewed = sorted((t for t in topics if t.seen), key=lambda t: t.mastery)
        again = self._query("SELECT card, COUNT(*) FROM reviews WHERE rating = 1 GROUP BY card "
                            "ORDER BY COUNT(*) DESC, card LIMIT 5")
        total = self._query("SELECT COUNT(*) FROM reviews")[0][0]
        today = self._query("SELECT COUNT(*) FROM reviews WHERE substr(ts, 1, 10) = ?", (now.date().isoformat(),))[0][0]
        return Stats(total, today, self.streak(now.date()), topics, [t.topic for t in reviewed[:3]],
                     [(c, int(n)) for c, n in again])
