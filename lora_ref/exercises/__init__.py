"""What grading needs from lora_ref, in one explicit place.

The reference package never knows it is used for grading; this subpackage is the only bridge. Each
graded exercise of a notebook is described by an :class:`Exercise`: the name the learner defines in
the notebook, the lora_ref object with the same interface, a list of deterministic cases (random
shapes, dtypes, seeds) and a ``run`` function that exercises an object on one case and returns named
tensors. A hidden test in a notebook is then one line::

    from lora_ref.exercises import check
    check("02.lora_linear", LoRALinear)

and the autograder can replay the very same cases in a clean process (see autograder/), where a
learner's monkeypatching inside the notebook kernel cannot reach the comparison.

Per-notebook exercises live in ``nbNN.py`` modules beside this file; they register themselves on import.

What an exercise promises (``cases`` seeded, ``run`` self-contained) is stated on :class:`Exercise`;
what the autograder's judge builds on it is described in autograder/judge.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Case = dict[str, Any]


@dataclass(frozen=True)
class Exercise:
    """One graded exercise. ``cases()`` returns the same list of plain values in every process (seeded);
    ``run(obj, case)`` builds its inputs itself (seeded; those that need lora_ref through :func:`given`)
    and returns a dict of tensors, raising AssertionError with a learner-facing message for a structural
    problem (a wrong shape, a missing attribute)."""
    id: str                                   # "02.lora_linear": notebook number . short name
    symbol: str                               # what the learner defines in the notebook
    reference: Any                            # the lora_ref object with the same interface
    cases: Callable[[], list[Case]]           # deterministic: same list in every process
    run: Callable[[Any, Case], dict[str, torch.Tensor]]   # exercise obj on a case -> named outputs
    atol: float = 1e-5
    rtol: float = 1e-4
    notebook: str = field(default="")         # "02_lora_linear"; filled from id when empty
    topics: tuple[str, ...] = ()              # drill topics (lora_ref.drills.items.TOPICS) a failure sends the
                                              # learner to practise; () means the notebook's (NOTEBOOK_TOPICS)


REGISTRY: dict[str, Exercise] = {}

#: the drill topics of each notebook's exercises, for exercises that name none themselves
NOTEBOOK_TOPICS: dict[str, tuple[str, ...]] = {
    "00": ("lora-math",), "01": ("lora-math",), "02": ("lora-math", "implementation"),
    "03": ("implementation", "evaluation"), "04": ("rank-alpha",), "05": ("qlora",), "06": ("qlora", "sizing"),
    "07": ("deployment",), "08": ("peft-family", "full-vs-lora", "evaluation"), "09": ("sizing",),
    "10": ("variants",),
}


def topics_of(exercise_id: str) -> tuple[str, ...]:
    """The drill topics of an exercise: its own ``topics``, else its notebook's."""
    ex = get(exercise_id)
    return ex.topics or NOTEBOOK_TOPICS.get(ex.id.split(".")[0], ())


def register(ex: Exercise) -> Exercise:
    if ex.id in REGISTRY:
        raise ValueError(f"exercise {ex.id!r} registered twice")
    REGISTRY[ex.id] = ex
    return ex


def load_all() -> None:
    """Import every ``nbNN`` module beside this file (each registers its exercises)."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("nb"):
            importlib.import_module(f"{__name__}.{mod.name}")


def get(exercise_id: str) -> Exercise:
    """The registered exercise ``"NN.name"``: its notebook's module is imported first (``nbNN``), all of
    them only if that does not register it."""
    if exercise_id not in REGISTRY:
        notebook = f"{__name__}.nb{exercise_id.split('.')[0]}"
        if importlib.util.find_spec(notebook) is not None:
            importlib.import_module(notebook)
    if exercise_id not in REGISTRY:
        load_all()
    try:
        return REGISTRY[exercise_id]
    except KeyError:
        raise KeyError(f"no exercise {exercise_id!r}; known: {sorted(REGISTRY)}") from None


def describe(case: Case) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items() if not k.startswith("_"))


GIVEN_ONLY = False     # set by the judge's harness, where lora_ref is sealed off: inputs must come in the case


def given_only() -> bool:
    """True in the judge's harness: inputs come from the grader (:func:`given`), lora_ref is sealed off."""
    return GIVEN_ONLY


def given(case: Case, name: str, make: Callable[[], Any]) -> Any:
    """An input of a ``run`` that needs lora_ref to make (a codebook, packed codes): ``make()`` here, but
    in the judge it was made in the grader's process and travels in ``case["_given"]`` (the process that
    runs learner code holds nothing of lora_ref). :func:`draw_cases` fills ``_given`` by running the
    reference once."""
    store = case.get("_given")
    if store is not None and name in store:
        value = store[name]
        return value.clone() if isinstance(value, torch.Tensor) else value
    if GIVEN_ONLY:
        raise RuntimeError(f"input {name!r} was not made by the grader")
    value = make()
    if store is not None:
        store[name] = value
    return value


def draw_cases(ex: Exercise, secret: int | None = None) -> list[Case]:
    """The judge's cases: with a ``secret`` (drawn per grading run), exercises whose ``cases`` take a
    ``seed`` draw new ones from it, so no table of outputs can be prepared; without, the fixed cases the
    notebook's hidden test uses. Each case gets ``_given``, filled by running the reference on it."""
    import hashlib
    import inspect

    if secret is not None and "seed" in inspect.signature(ex.cases).parameters:
        seed = int.from_bytes(hashlib.sha256(f"{secret}:{ex.id}".encode()).digest()[:4], "little")
        cases = ex.cases(seed=seed)
    else:
        cases = ex.cases()
    out = []
    for case in cases:
        case = dict(case, _given={})
        ex.run(ex.reference, case)
        out.append(case)
    return out


def compare(ex: Exercise, case: Case, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Raise AssertionError naming the case and the first output that differs."""
    for name, w in want.items():
        if name not in got:
            raise AssertionError(f"[{ex.id}] case ({describe(case)}): output {name!r} missing")
        g = got[name]
        if not isinstance(g, torch.Tensor):
            raise AssertionError(f"[{ex.id}] case ({describe(case)}): {name} should be a tensor, got {type(g).__name__}")
        if g.shape != w.shape:
            raise AssertionError(f"[{ex.id}] case ({describe(case)}): {name} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        if g.dtype != w.dtype:
            raise AssertionError(f"[{ex.id}] case ({describe(case)}): {name} has dtype {g.dtype}, expected {w.dtype}")
        g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
        if not torch.allclose(g64, w64, atol=ex.atol, rtol=ex.rtol, equal_nan=True):
            diff = (g64 - w64).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(
                f"[{ex.id}] case ({describe(case)}): {name} differs from the reference "
                f"(max abs difference {diff:.3g}, tolerance atol={ex.atol}, rtol={ex.rtol})")


def check(exercise_id: str, obj: Any) -> None:
    """Hidden-test entry point: run ``obj`` and the reference on every case and compare."""
    ex = get(exercise_id)
    for case in ex.cases():
        want = ex.run(ex.reference, case)
        got = ex.run(obj, case)
        compare(ex, case, got, want)
