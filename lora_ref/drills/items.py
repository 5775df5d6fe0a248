"""What one drill question is: the :class:`Item` dataclass, its kinds and topics, and its checks.

An item is a complete, concrete question: a prompt, a model answer, the key points an answer should
hit, a difficulty, a source (paper section or library behaviour) and follow-ups. Four kinds:

* ``free``    free text, scored by key-point coverage (see :mod:`lora_ref.drills.grading`);
* ``choice``  multiple choice, exactly one correct option;
* ``numeric`` a number with units, graded within a relative tolerance;
* ``bug``     spot-the-bug: numbered code, the learner names the line(s) and what is wrong.

Static items live in :mod:`lora_ref.drills.bank`; generated numeric and bug items come from
:mod:`lora_ref.drills.generators`, which build a fresh :class:`Item` per draw. ``card`` is the key that
spaced repetition schedules: the item id for a static item, the generator id for generated ones (you
practise the *skill* "count LoRA parameters", not one random instance of it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("free", "choice", "numeric", "bug")

#: topic id -> readable name. Every item has one of these topics.
TOPICS: dict[str, str] = {
    "lora-math": "LoRA's math and why low rank works",
    "rank-alpha": "Choosing rank and alpha",
    "qlora": "QLoRA: NF4, double quantisation, paged optimizers",
    "peft-family": "The PEFT family: prompt, prefix, P-tuning, adapters",
    "full-vs-lora": "Full fine-tuning vs LoRA",
    "evaluation": "Evaluating fine-tuned models",
    "deployment": "Merging and deploying adapters",
    "mixed-precision": "Mixed precision: fp16, bf16, loss scaling",
    "implementation": "Implementation details (code-level)",
    "sizing": "Sizing: parameters, bytes, memory, FLOPs",
    "variants": "Beyond plain LoRA: DoRA, PiSSA, LoftQ, LoRA+",
}

#: base units a numeric answer is measured in (the grader converts what the learner types into these)
UNITS = ("params", "bytes", "FLOPs", "bits/param", "x")


@dataclass(frozen=True)
class KeyPoint:
    """One idea an answer should contain.

    ``text`` is shown to the learner; ``any_of`` are phrasings, each a few words that must all appear
    (after normalisation: case, spelling, simple stemming, synonyms) for the point to count as covered.
    """

    text: str
    any_of: tuple[str, ...]

    def __post_init__(self):
        if not self.text or not self.any_of or any(not a.strip() for a in self.any_of):
            raise ValueError(f"key point needs text and non-empty phrasings, got {self!r}")


def kp(text: str, *any_of: str) -> KeyPoint:
    """Short constructor for bank modules: ``kp("B starts at zero", "b zero", "zero init")``."""
    return KeyPoint(text, tuple(any_of))


@dataclass(frozen=True)
class Item:
    id: str
    topic: str
    kind: str
    prompt: str
    answer: str                                  # the model answer, in prose
    key_points: tuple[KeyPoint, ...]
    difficulty: int                              # 1 easy, 2 medium, 3 hard
    source: str                                  # paper section or library behaviour
    follow_ups: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()                # kind "choice"
    correct: int | None = None                   # index into choices
    value: float | None = None                   # kind "numeric": the answer in base units
    unit: str | None = None                      # one of UNITS
    answer_unit: str | None = None               # what the prompt asks for: "GB", "GiB", "M", ...
    rel_tol: float = 0.01                        # relative tolerance for numeric answers
    code: str = ""                               # kind "bug": the code shown (lines numbered on display)
    bug_lines: tuple[int, ...] = ()              # 1-based lines of `code` that hold the bug
    corrects_article: bool = False               # the model answer corrects the seed article
    card: str = ""                               # scheduling key; "" means the item id
    tags: tuple[str, ...] = field(default=())

    @property
    def card_id(self) -> str:
        return self.card or self.id

    def numbered_code(self) -> str:
        """The code with 1-based line numbers, as shown to the learner."""
        lines = self.code.rstrip("\n").split("\n")
        width = len(str(len(lines)))
        return "\n".join(f"{i:>{width}} | {line}" for i, line in enumerate(lines, 1))


def validate_item(item: Item) -> None:
    """Raise ValueError naming the item and the problem if it is not well formed and answerable."""
    where = f"item {item.id!r}"
    if not item.id or " " in item.id:
        raise ValueError(f"{where}: id must be non-empty without spaces")
    if item.topic not in TOPICS:
        raise ValueError(f"{where}: unknown topic {item.topic!r}; expected one of {sorted(TOPICS)}")
    if item.kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {item.kind!r}; expected one of {KINDS}")
    if item.difficulty not in (1, 2, 3):
        raise ValueError(f"{where}: difficulty must be 1, 2 or 3, got {item.difficulty!r}")
    for name in ("prompt", "answer", "source"):
        if len(getattr(item, name).strip()) < 10:
            raise ValueError(f"{where}: {name} is missing or too short")
    if item.kind in ("free", "bug") and len(item.key_points) < 2:
        raise ValueError(f"{where}: a {item.kind} item needs at least 2 key points to score coverage")
    if item.kind == "choice":
        if len(item.choices) < 3 or len(set(item.choices)) != len(item.choices):
            raise ValueError(f"{where}: needs at least 3 distinct choices, got {item.choices!r}")
        if item.correct is None or not 0 <= item.correct < len(item.choices):
            raise ValueError(f"{where}: correct={item.correct!r} is not an index into {len(item.choices)} choices")
    elif item.choices or item.correct is not None:
        raise ValueError(f"{where}: only choice items have choices/correct")
    if item.kind == "numeric":
        if item.value is None or item.unit not in UNITS:
            raise ValueError(f"{where}: numeric needs a value and a unit in {UNITS}, got {item.value!r} {item.unit!r}")
        if not 0 < item.rel_tol < 0.5:
            raise ValueError(f"{where}: rel_tol={item.rel_tol!r} must be in (0, 0.5)")
    if item.kind == "bug":
        n = len(item.code.rstrip("\n").split("\n")) if item.code.strip() else 0
        if n == 0 or not item.bug_lines or any(not 1 <= b <= n for b in item.bug_lines):
            raise ValueError(f"{where}: bug_lines {item.bug_lines!r} must be 1-based lines of its {n}-line code")
