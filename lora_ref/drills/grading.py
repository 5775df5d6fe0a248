"""Grading: numbers with units, multiple choice, free text by key-point coverage, spot-the-bug.

Every grader returns a :class:`Grade`: a score in [0, 1], whether it counts as correct, feedback, and a
suggested rating for the scheduler (1 again, 2 hard, 3 good, 4 easy; the learner's own rating wins).

Numbers: :func:`parse_quantity` reads "16.8M", "16,777,216", "7B", "2 GB", "1.5 GiB", "3.2e12 FLOPs",
"16.8 million". Bytes use SI prefixes for kB/MB/GB/TB (10^3k) and IEC for KiB/MiB/GiB/TiB (2^10k);
counts use K/M/B(n)/T. A bare number is read in the unit the question asks for (``answer_unit``).

Free text: the answer and each key point's phrasings are normalised (case, British/American spelling,
hyphens, a few synonyms, crude stemming) and a phrasing counts when all its words occur. The score is
the fraction of key points covered. A key point stated the other way round ("B is not zero" for "B is
zero") is *contradicted*, not covered: within one clause, a negation word ("not", "no", "never",
"nothing", "without", "-n't", ...) just before or among the phrasing's words (:func:`negated`). The
verdict is never CORRECT with a contradicted key point. :data:`FREE_TEXT_LIMITS` says what this cannot
judge.

An answer that cannot be read at all (a numeric question answered "about a third", a choice answered
"maybe") is :attr:`Grade.unreadable`: the fronts ask again instead of grading it and showing the answer.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from .items import Item, KeyPoint

AGAIN, HARD, GOOD, EASY = 1, 2, 3, 4
RATING_NAMES = {AGAIN: "again", HARD: "hard", GOOD: "good", EASY: "easy"}

FREE_TEXT_LIMITS = (
    "Automatic free-text scoring only checks whether the key ideas are *mentioned* (words and synonyms). "
    "It cannot tell whether your reasoning is right; it catches a plain negation of a key point ('B is "
    "not zero') but not every way of saying the opposite; it cannot tell whether numbers you quote are correct, whether an idea phrased in words it does "
    "not know is there, or whether the answer would convince an interviewer. Read the model answer, "
    "then rate yourself: your rating, not the coverage score, is what schedules the card."
)


@dataclass(frozen=True)
class Grade:
    score: float                      # 0..1
    correct: bool
    feedback: str
    suggested: int                    # AGAIN..EASY
    covered: tuple[str, ...] = ()     # key points hit (free text / bug)
    missed: tuple[str, ...] = ()
    parsed: float | None = None       # numeric: what the learner's answer was read as, in base units
    notes: tuple[str, ...] = field(default=())
    contradicted: tuple[str, ...] = ()   # key points the answer states the other way round (free text / bug)
    unreadable: bool = False          # not an answer to grade (no number, no option): ask again, reveal nothing

    @property
    def verdict(self) -> str:
        """One word for the fronts: CORRECT, PARTLY RIGHT, WRONG, or UNREADABLE (ask again)."""
        if self.unreadable:
            return "UNREADABLE"
        if self.correct:
            return "CORRECT"
        return "PARTLY RIGHT" if self.score >= 0.4 and not self.contradicted else "WRONG"


# ----------------------------------------------------------------------------------------- numbers
_BYTE_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_COUNT_SUFFIX = {
    "": 1, "k": 1e3, "thousand": 1e3, "m": 1e6, "mn": 1e6, "million": 1e6, "millions": 1e6,
    "b": 1e9, "bn": 1e9, "g": 1e9, "billion": 1e9, "billions": 1e9, "t": 1e12, "trillion": 1e12,
    "p": 1e15, "e": 1e18,
}
# words that may follow a count and carry no scale ("16.8M params", "1.2 TFLOPs", "4.127 bits")
_COUNT_WORDS = re.compile(r"\s*(parameters?|params?|flops?|bits?(\s*per\s*param(eter)?|/param)?|times|x|×)$")
_NUMBER = re.compile(r"^\s*([-+]?(?:\d[\d,_ ]*\d|\d)?(?:\.\d+)?(?:e[-+]?\d+)?)\s*(.*?)\s*$", re.I)


class QuantityError(ValueError):
    """The learner's answer could not be read as a quantity; the message says why."""


def parse_quantity(text: str, unit: str, answer_unit: str | None = None) -> float:
    """Read ``text`` as a quantity in base ``unit`` ("params", "bytes", "FLOPs", "bits/param", "x").

    >>> parse_quantity("16.8M", "params")
    16800000.0
    >>> parse_quantity("1.5 GiB", "bytes")
    1610612736.0

    A bare number takes ``answer_unit`` (e.g. "GB", "M"). Raises :class:`QuantityError` for text that is
    not a number, for a byte unit on a count question and vice versa.
    """
    raw = text.strip().lower().replace("≈", "").replace("~", "").strip()
    m = _NUMBER.match(raw)
    if not m or not m.group(1) or not re.search(r"\d", m.group(1)):
        raise QuantityError(f"could not read a number in {text!r}")
    number_text = m.group(1).replace(",", "").replace("_", "").replace(" ", "")
    try:
        number = float(number_text)
    except ValueError as err:
        raise QuantityError(f"could not read a number in {text!r}") from err
    rest = m.group(2).strip()
    if not rest and answer_unit:
        rest = answer_unit.lower()
    if unit == "bytes":
        return number * _byte_scale(rest, text)
    return number * _count_scale(rest, text)


def _byte_scale(rest: str, text: str) -> float:
    word = rest.replace(" ", "")
    if word == "":
        return 1.0
    if word in _BYTE_UNITS:
        return float(_BYTE_UNITS[word])
    raise QuantityError(f"{text!r}: {rest!r} is not a byte unit (use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")


def _count_scale(rest: str, text: str) -> float:
    word = _COUNT_WORDS.sub("", rest).strip()
    if word in _COUNT_SUFFIX:
        return _COUNT_SUFFIX[word]
    if word.replace(" ", "") in _BYTE_UNITS:
        raise QuantityError(f"{text!r} is in bytes, but this question asks for a count")
    raise QuantityError(f"{text!r}: {rest!r} is not a unit I know (try 16.8M, 16,777,216, 7B, 3.2e12)")


def format_quantity(value: float, unit: str, answer_unit: str | None = None) -> str:
    """Show ``value`` (base units) the way the question asks: "16,777,216 params (16.8M)", "13.5 GB"."""
    if unit == "bytes":
        u = answer_unit or "GB"
        scale = _BYTE_UNITS[u.lower()]
        return f"{value / scale:,.4g} {u} ({value:,.0f} bytes)"
    if unit in ("bits/param", "x"):
        return f"{value:.4g} {unit}"
    if abs(value) >= 1e15:
        return f"{value:.4g} {unit}"
    exact = f"{value:,.0f}" if value == int(value) else f"{value:.4g}"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{exact} {unit} ({value / scale:.3g}{suffix})"
    return f"{exact} {unit}"


def grade_numeric(item: Item, text: str) -> Grade:
    """Correct when |parsed - value| <= rel_tol * |value|; feedback names unit slips (GB vs GiB, 1000x)."""
    expected = float(item.value)
    shown = format_quantity(expected, item.unit, item.answer_unit)
    try:
        got = parse_quantity(text, item.unit, item.answer_unit)
    except QuantityError as err:      # not a wrong answer, no answer at all: say why, reveal nothing
        example = f"a number in {item.answer_unit}" if item.answer_unit else "a number such as 16.8M, 2 GB or 0.33"
        return Grade(0.0, False, f"{err}. Answer with {example}.", AGAIN, unreadable=True)
    rel = abs(got - expected) / abs(expected) if expected else abs(got)
    if rel <= item.rel_tol:
        return Grade(1.0, True, f"Correct: {shown} (you: {got:,.6g}, within {item.rel_tol:.1%}).", GOOD, parsed=got)
    notes = []
    for factor, why in ((2**30 / 1e9, "GiB vs GB (2^30 vs 10^9 bytes)"), (1e3, "a factor of 1000 (unit prefix)"),
                        (2.0, "a factor of 2 (bytes per value? A and B?)"), (8.0, "a factor of 8 (bits vs bytes?)")):
        for f in (factor, 1 / factor):
            if abs(got * f - expected) <= item.rel_tol * abs(expected):
                notes.append(f"you are off by {why}")
    msg = f"Not quite: expected {shown}, you gave {got:,.6g} ({rel:.1%} off)."
    if notes:
        msg += " Looks like " + notes[0] + "."
    return Grade(0.0, False, msg, AGAIN, parsed=got, notes=tuple(notes))


# ----------------------------------------------------------------------------------------- choice
def parse_choice(text: str, n: int) -> int:
    """Read "b", "B)", "2", "(c)" as a 0-based option index; raise QuantityError naming the bad text."""
    t = text.strip().lower().strip("()[]. )")
    if len(t) == 1 and "a" <= t <= chr(ord("a") + n - 1):
        return ord(t) - ord("a")
    if t.isdigit() and 1 <= int(t) <= n:
        return int(t) - 1
    raise QuantityError(f"{text!r} is not one of the options a-{chr(ord('a') + n - 1)} (or 1-{n})")


def grade_choice(item: Item, text: str) -> Grade:
    right = f"({chr(ord('a') + item.correct)}) {item.choices[item.correct]}"
    try:
        idx = parse_choice(text, len(item.choices))
    except QuantityError as err:
        return Grade(0.0, False, f"{err}.", AGAIN, unreadable=True)
    if idx == item.correct:
        return Grade(1.0, True, f"Correct: {right}.", GOOD)
    return Grade(0.0, False, f"No: the answer is {right}.", AGAIN)


# ----------------------------------------------------------------------------------------- free text
_SPELLING = [
    (r"isation", "ization"), (r"ise\b", "ize"), (r"ised\b", "ized"), (r"ising\b", "izing"),
    (r"optimiser", "optimizer"), (r"behaviour", "behavior"), (r"normalis", "normaliz"),
]
_SYMBOLS = {"α": " alpha ", "δ": " delta ", "Δ": " delta ", "×": " x ", "√": " sqrt ", "≈": " ", "→": " ",
            "½": " half ", "ϕ": " phi ", "φ": " phi "}
_PHRASES = [  # multi-word synonyms, applied after lower-casing, before tokenising
    (r"\bhalf[ -]precision\b", "fp16"), (r"\bfloat16\b", "fp16"), (r"\bbfloat16\b", "bf16"),
    (r"\bfloat32\b|\bsingle[ -]precision\b", "fp32"), (r"\bbrain float\b", "bf16"),
    (r"\bnormal ?float ?4?\b|\bnormalfloat\b", "nf4"), (r"\bdouble[ -]quant\w*", "doublequant"),
    (r"\bdq\b", "doublequant"), (r"\blow[ -]rank\b", "lowrank"), (r"\bfine[ -]tun", "finetun"),
    (r"\bgrad(ient)? checkpoint\w*|\bactivation checkpoint\w*|\brecompute activations\b", "checkpointing"),
    (r"\bunified memory\b", "unifiedmemory"), (r"\bcatastrophic forgetting\b", "forgetting"),
    (r"\bweights\b", "weight"), (r"\bparams\b|\bparameters\b", "parameter"),
    (r"\bper[ -]token\b", "pertoken"), (r"\bloss[ -]scal\w*", "lossscaling"), (r"\bgradscaler\b", "lossscaling"),
    (r"\bq[ _]?proj\b", "wq"), (r"\bk[ _]?proj\b", "wk"), (r"\bv[ _]?proj\b", "wv"), (r"\bo[ _]?proj\b", "wo"),
    (r"\bw_?q\b", "wq"), (r"\bw_?k\b", "wk"), (r"\bw_?v\b", "wv"), (r"\bw_?o\b", "wo"),
    (r"\bzeros\b|\bzeroes\b|\bzeroed\b", "zero"), (r"\b0\b", "zero"),
    (r"\binf(inity)?\b", "inf"), (r"\bnan(s)?\b", "nan"),
]
_STOP = {"the", "a", "an", "of", "to", "is", "are", "be", "and", "or", "in", "on", "for", "it", "its", "that",
         "this", "with", "as", "by", "at", "from", "so", "which", "we", "you"}


def normalise(text: str) -> list[str]:
    """Lower-case, unify spelling and symbols, apply phrase synonyms, tokenise, crudely stem."""
    t = text.lower()
    for sym, rep in _SYMBOLS.items():
        t = t.replace(sym.lower(), rep)
    for pat, rep in _SPELLING:
        t = re.sub(pat, rep, t)
    t = re.sub(r"(?<=[a-z])-(?=[a-z0-9])", " ", t)       # low-rank -> low rank
    for pat, rep in _PHRASES:
        t = re.sub(pat, rep, t)
    tokens = []
    for tok in re.findall(r"[a-z0-9_]+(?:\.[0-9]+)?", t):
        parts = [tok] + ([p for p in tok.split("_") if p] if "_" in tok.strip("_") else [])
        tokens.extend(_stem(p) for p in parts if p not in _STOP)
    return tokens


def _stem(tok: str) -> str:
    for suffix in ("ization", "izing", "ized", "izes", "ize", "iz", "ations", "ation", "ing", "ies", "ed", "es", "s"):
        if tok.endswith(suffix) and len(tok) - len(suffix) >= 3:
            tok = tok[: -len(suffix)] + ("y" if suffix == "ies" else "")
            break
    return tok[:-1] if tok.endswith("e") and len(tok) > 4 else tok


def _has(answer_tokens: set[str], word: str) -> bool:
    """Exact token match; words of 4+ letters also match as a prefix ("merg" ~ "merging", "measur")."""
    if word in answer_tokens:
        return True
    return len(word) >= 4 and not word.isdigit() and any(t.startswith(word) for t in answer_tokens)


def covers(answer_tokens: set[str], point: KeyPoint) -> bool:
    """A key point is covered when all words of at least one of its phrasings occur in the answer."""
    return any(all(_has(answer_tokens, w) for w in _phrase(p)) for p in point.any_of)


@functools.lru_cache(maxsize=4096)
def _phrase(text: str) -> tuple[str, ...]:
    return tuple(normalise(text))


_NEGATORS = frozenset(normalise("not no never nothing none neither nor without cannot non nobody nowhere"))
# clause boundaries: sentence ends (not decimal points), semicolons, commas, contrastive conjunctions
_CLAUSE = re.compile(r"(?<!\d)[.!?](?!\d)|[;\n,]|\b(?:but|while|whereas|however|although|though)\b", re.I)


def _clauses(text: str) -> list[list[str]]:
    expanded = re.sub(r"n['’]t\b", " not", re.sub(r"\bcannot\b", "can not", text, flags=re.I), flags=re.I)
    return [toks for part in _CLAUSE.split(expanded) if (toks := normalise(part))]


def _negated_in(clause: list[str], words: tuple[str, ...]) -> bool | None:
    """None if the clause lacks a word of the phrasing; else whether a negator sits just before the first
    matched word (1 token for a one-word phrasing, 2 for longer ones) or among the matched words."""
    positions = []
    for w in words:
        pos = next((i for i, t in enumerate(clause) if t == w or (len(w) >= 4 and not w.isdigit()
                                                                  and t.startswith(w))), None)
        if pos is None:
            return None
        positions.append(pos)
    first, last = min(positions), max(positions)
    reach = 1 if len(words) == 1 else 2
    return any(t in _NEGATORS and i not in positions for i, t in enumerate(clause)
               if first - reach <= i < last or i == first - 1)


def negated(text: str, point: KeyPoint) -> bool:
    """True when ``text`` mentions ``point`` only the other way round: every clause holding all words of a
    phrasing negates them (see :func:`_negated_in`). Key points that are negative themselves ("no copy",
    "not a score") are never judged this way: "not" there is the point, not its opposite."""
    if _NEGATORS & set(normalise(point.text)):
        return False
    verdicts = [v for p in point.any_of if not (_NEGATORS & set(_phrase(p)))
                for clause in _clauses(text) if (v := _negated_in(clause, _phrase(p))) is not None]
    return bool(verdicts) and all(verdicts)


def _key_points(item: Item, text: str) -> tuple[list[str], list[str], list[str]]:
    """(covered, contradicted, missed) key point texts."""
    tokens = set(normalise(text))
    covered, contradicted, missed = [], [], []
    for p in item.key_points:
        if not covers(tokens, p):
            missed.append(p.text)
        elif negated(text, p):
            contradicted.append(p.text)
        else:
            covered.append(p.text)
    return covered, contradicted, missed


def grade_free(item: Item, text: str) -> Grade:
    """Score = covered key points / all key points (a contradicted one counts as not covered); correct
    from 0.6 with nothing contradicted; rating suggestion from the score."""
    covered, contradicted, missed = _key_points(item, text)
    score = len(covered) / len(item.key_points)
    return Grade(score, score >= 0.6 and not contradicted, _coverage_feedback(covered, missed, contradicted),
                 _suggest(score), tuple(covered), tuple(missed + contradicted), contradicted=tuple(contradicted))


_LINE_REF = re.compile(r"\b(?:lines?|l\.?|ln)\s*(\d+(?:\s*(?:,|and|&|-|to)\s*\d+)*)|^\s*(\d+)\b", re.I)


def cited_lines(text: str) -> set[int]:
    """Line numbers the learner cites: "line 12", "lines 3 and 5", "L7", or a leading "12:"."""
    found: set[int] = set()
    for m in _LINE_REF.finditer(text):
        group = m.group(1) or m.group(2)
        nums = [int(n) for n in re.findall(r"\d+", group)]
        if m.group(1) and re.search(r"-|to", group) and len(nums) == 2:
            nums = list(range(nums[0], nums[1] + 1))
        found.update(nums)
    return found


def grade_bug(item: Item, text: str) -> Grade:
    """Spot-the-bug: one point for citing a buggy line, one per key point explained."""
    lines = cited_lines(text)
    hit_line = bool(lines & set(item.bug_lines))
    covered, contradicted, missed = _key_points(item, text)
    score = (hit_line + len(covered)) / (1 + len(item.key_points))
    where = ", ".join(map(str, item.bug_lines))
    line_msg = (f"Right line ({where})." if hit_line else
                f"The bug is on line {where}" + (f"; you cited {sorted(lines)}." if lines else " (cite it as 'line N')."))
    return Grade(score, hit_line and score >= 0.5 and not contradicted,
                 line_msg + " " + _coverage_feedback(covered, missed, contradicted),
                 _suggest(score), tuple(covered), tuple(missed + contradicted), contradicted=tuple(contradicted))


def _coverage_feedback(covered: list[str], missed: list[str], contradicted: list[str] = ()) -> str:
    n = len(covered) + len(missed) + len(contradicted)
    parts = [f"Key points covered: {len(covered)}/{n}."]
    if contradicted:
        parts.append("You said the opposite of: " + "; ".join(contradicted) + ".")
    if missed:
        parts.append("Missing: " + "; ".join(missed) + ".")
    return " ".join(parts)


def _suggest(score: float) -> int:
    return AGAIN if score < 0.4 else HARD if score < 0.75 else GOOD


def grade(item: Item, text: str) -> Grade:
    """Grade ``text`` against ``item`` with the grader for its kind."""
    return {"numeric": grade_numeric, "choice": grade_choice, "free": grade_free, "bug": grade_bug}[item.kind](item, text)


def parse_rating(text: str, default: int) -> int:
    """Read the learner's self-rating: "" keeps ``default``; 1-4 or again/hard/good/easy."""
    t = text.strip().lower()
    if not t:
        return default
    names = {v: k for k, v in RATING_NAMES.items()}
    if t in names:
        return names[t]
    if t.isdigit() and 1 <= int(t) <= 4:
        return int(t)
    raise ValueError(f"rating {text!r} must be 1-4 or again/hard/good/easy")

