"""The drill engine both fronts share (terminal: :mod:`.cli`, notebook: :mod:`.widgets`).

A *card* is what is scheduled: a bank item id, or a generator id (a fresh generated question each time).
:class:`Drill` picks the next question, grades an answer, and records the learner's rating:

    drill = Drill(Progress(path), seed=0, topic="qlora")
    item = drill.next_item()
    result = drill.answer(item, "NF4, double quantisation and paged optimizers")
    drill.rate(item, result, rating=result.grade.suggested)

Order: cards due for review (most overdue first), then cards never seen (topics interleaved, shuffled by
the seed), then, when everything is scheduled in the future, the card least likely to be recalled now.
:class:`MockInterview` draws a timed, mixed-topic set.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable

from . import bank, generators
from .grading import Grade, format_quantity, grade
from .items import KINDS, TOPICS, Item
from .progress import Progress, Stats, utcnow


@dataclass(frozen=True)
class Card:
    id: str
    topic: str
    kind: str


def catalogue(topic: str | None = None, kinds: Iterable[str] | None = None) -> list[Card]:
    """Every schedulable card: bank items and generators, filtered by topic and kinds (validated)."""
    if topic is not None and topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; choose from {sorted(TOPICS)}")
    kinds = tuple(kinds) if kinds else KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; choose from {KINDS}")
    cards = [Card(i.id, i.topic, i.kind) for i in bank.ITEMS]
    cards += [Card(g.card, g.topic, g.kind) for g in generators.GENERATORS.values()]
    return [c for c in cards if (topic is None or c.topic == topic) and c.kind in kinds]


def topic_catalogue() -> dict[str, list[str]]:
    """topic -> card ids, for :meth:`Progress.stats`."""
    out: dict[str, list[str]] = {t: [] for t in TOPICS}
    for c in catalogue():
        out[c.topic].append(c.id)
    return out


def resolve(item_id: str, seed: int = 0) -> Item:
    """An item from its id: a bank id, a generated id ``gen.x@seed``, or a generator id (drawn with ``seed``)."""
    if "@" in item_id:
        return generators.from_id(item_id)
    if item_id in generators.GENERATORS:
        return generators.generate(item_id, seed)
    return bank.get_item(item_id)


@dataclass(frozen=True)
class Answered:
    item: Item
    response: str
    grade: Grade
    seconds: float


def model_answer_text(item: Item) -> str:
    """The model answer as shown after answering: the answer, the key points, follow-ups, source."""
    parts = []
    if item.kind == "choice":
        parts.append(f"Answer: ({chr(ord('a') + item.correct)}) {item.choices[item.correct]}")
    if item.kind == "numeric":
        parts.append(f"Answer: {format_quantity(item.value, item.unit, item.answer_unit)}")
    if item.corrects_article:
        parts.append("(This answer corrects the seed article.)")
    parts.append(item.answer)
    if item.kind in ("free", "bug"):
        parts.append("Key points: " + "; ".join(p.text for p in item.key_points) + ".")
    if item.follow_ups:
        parts.append("Follow-ups an interviewer may ask: " + " | ".join(item.follow_ups))
    parts.append(f"Source: {item.source}")
    return "\n".join(parts)


def question_text(item: Item) -> str:
    """The question as shown: prompt, numbered code, lettered options, what kind of answer is expected."""
    parts = [item.prompt]
    if item.code:
        parts.append(item.numbered_code())
    if item.kind == "choice":
        parts += [f"  ({chr(ord('a') + i)}) {c}" for i, c in enumerate(item.choices)]
        parts.append("Answer with a letter.")
    elif item.kind == "numeric":
        unit = f" in {item.answer_unit}" if item.answer_unit else ""
        parts.append(f"Answer with a number{unit} (units like 16.8M, 2 GB, 1.5 GiB, 3e12 are understood).")
    elif item.kind == "bug":
        parts.append("Name the line ('line N') and explain what goes wrong.")
    else:
        parts.append("Answer in a few sentences, as you would in an interview.")
    return "\n".join(parts)


class Drill:
    """Question selection, grading and recording over one :class:`Progress` store."""

    def __init__(self, progress: Progress, *, seed: int | None = None, topic: str | None = None,
                 kinds: Iterable[str] | None = None, clock: Callable[[], datetime] = utcnow):
        self.progress = progress
        self.rng = random.Random(seed)
        self.cards = catalogue(topic, kinds)
        if not self.cards:
            raise ValueError(f"no cards for topic={topic!r}, kinds={kinds!r}")
        self.clock = clock
        self._asked_at: dict[str, float] = {}
        self._recent: list[str] = []

    def _instantiate(self, card: Card) -> Item:
        if card.id in generators.GENERATORS:
            return generators.generate(card.id, self.rng.randrange(10**9))
        return bank.get_item(card.id)

    def next_card(self) -> Card:
        now = self.clock()
        known = self.progress.cards()
        ids = {c.id: c for c in self.cards}
        recent = set(self._recent[-3:])
        due = [ids[c.card] for c in self.progress.due(now) if c.card in ids and c.card not in recent]
        if due:
            return due[0]
        new = [c for c in self.cards if c.id not in known and c.id not in recent]
        if new:
            by_topic: dict[str, list[Card]] = {}
            for c in new:
                by_topic.setdefault(c.topic, []).append(c)
            topic = self.rng.choice(sorted(by_topic))
            return self.rng.choice(by_topic[topic])
        pool = [c for c in self.cards if c.id not in recent] or self.cards
        return min(pool, key=lambda c: (self.progress.retrievability(known[c.id], now) if c.id in known else 0.0,
                                        self.rng.random()))

    def next_item(self) -> Item:
        card = self.next_card()
        item = self._instantiate(card)
        self._recent.append(card.id)
        self._asked_at[item.id] = time.monotonic()
        return item

    def answer(self, item: Item, response: str) -> Answered:
        seconds = time.monotonic() - self._asked_at.get(item.id, time.monotonic())
        return Answered(item, response, grade(item, response), seconds)

    def rate(self, answered: Answered, rating: int | None = None, mode: str = "practice") -> None:
        """Record the review; ``rating`` is the learner's (1-4), else the grader's suggestion."""
        g = answered.grade
        self.progress.record(answered.item.card_id, answered.item.topic, answered.item.kind,
                             item=answered.item.id, rating=rating or g.suggested, suggested=g.suggested,
                             score=g.score, mode=mode, seconds=round(answered.seconds, 1), now=self.clock())

    def stats(self) -> Stats:
        return self.progress.stats(topic_catalogue(), self.clock())


@dataclass
class MockInterview:
    """A timed interview: ``count`` questions over mixed topics (one per topic in turn), ``minutes`` long.

    Topics are visited in a shuffled round-robin so every area comes up; within a topic, cards due or
    weak come first (the :class:`Drill` order). Time is checked between questions: once it is up, the
    interview ends after the current answer.
    """

    drill: Drill
    minutes: float
    count: int | None = None
    results: list[Answered] = field(default_factory=list)

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes!r}")
        self.count = self.count or self.default_count(self.minutes)
        topics = sorted({c.topic for c in self.drill.cards})
        self.drill.rng.shuffle(topics)
        self._topics = topics
        self._start = time.monotonic()

    @staticmethod
    def default_count(minutes: float) -> int:
        """One question per 3 minutes, rounded down, at least 3 (lora-drill mock --help states this)."""
        return max(3, int(minutes / 3))

    def remaining(self) -> float:
        return self.minutes * 60 - (time.monotonic() - self._start)

    def next_item(self) -> Item | None:
        if len(self.results) >= self.count or self.remaining() <= 0:
            return None
        topic = self._topics[len(self.results) % len(self._topics)]
        sub = Drill(self.drill.progress, topic=topic, kinds={c.kind for c in self.drill.cards},
                    clock=self.drill.clock, seed=self.drill.rng.randrange(10**9))
        sub._recent = [r.item.card_id for r in self.results]
        item = sub.next_item()
        self.drill._asked_at[item.id] = time.monotonic()
        return item

    def answer(self, item: Item, response: str, rating: int | None = None) -> Answered:
        """Grade and record in one step (the learner's rating, else the suggestion)."""
        answered = self.drill.answer(item, response)
        self.record(answered, rating)
        return answered

    def record(self, answered: Answered, rating: int | None = None) -> None:
        """Record an answer graded with ``self.drill.answer`` (fronts that show the grade before the rating)."""
        self.drill.rate(answered, rating, mode="mock")
        self.results.append(answered)

    def report(self) -> str:
        """Score per topic, overall, time used."""
        if not self.results:
            return "No questions answered."
        by_topic: dict[str, list[float]] = {}
        for r in self.results:
            by_topic.setdefault(r.item.topic, []).append(r.grade.score)
        used = min(self.minutes * 60, time.monotonic() - self._start)
        n = len(self.results)
        lines = [f"Mock interview: {n} question{'s' if n != 1 else ''} in {used / 60:.1f} of {self.minutes:g} minutes, "
                 f"mean score {sum(r.grade.score for r in self.results) / len(self.results):.0%}"]
        for t, scores in sorted(by_topic.items(), key=lambda kv: sum(kv[1]) / len(kv[1])):
            lines.append(f"  {TOPICS[t]:<52} {sum(scores) / len(scores):>5.0%}  ({len(scores)})")
        if any(r.item.kind == "free" for r in self.results):
            lines.append("Free-text scores count key points mentioned; they cannot judge whether your reasoning "
                         "is right (see the model answers, and your own ratings).")
        return "\n".join(lines)
