"""Interview drills powered by lora_ref: bank, generated questions, grading, spaced repetition, fronts.

    from lora_ref.drills import Drill, Progress
    drill = Drill(Progress(), topic="qlora")     # progress in ~/.local/share/lora-drills/ by default
    item = drill.next_item()
    answered = drill.answer(item, "NF4, double quantisation, paged optimizers")
    drill.rate(answered)                         # or rate(answered, 1..4): your own rating wins

Terminal: ``lora-drill`` (:mod:`.cli`). Notebook: ``drill_widget()`` and ``mock_widget()`` (:mod:`.widgets`,
needs ipywidgets).
"""
from .bank import ITEMS, get_item, items
from .engine import Answered, Drill, MockInterview, catalogue, model_answer_text, question_text, resolve
from .generators import GENERATORS, generate
from .grading import FREE_TEXT_LIMITS, Grade, grade, parse_quantity
from .items import KINDS, TOPICS, Item, KeyPoint
from .progress import Progress, ProgressError, default_path


def drill_widget(topic: str | None = None, db=None, **kwargs):
    """The notebook front (lazy import so the terminal front never needs ipywidgets)."""
    from .widgets import drill_widget as _drill_widget
    return _drill_widget(topic=topic, db=db, **kwargs)


def mock_widget(minutes: float = 20, count: int | None = None, db=None, **kwargs):
    """A timed mock interview in a notebook cell (lazy import, see :mod:`.widgets`)."""
    from .widgets import mock_widget as _mock_widget
    return _mock_widget(minutes=minutes, count=count, db=db, **kwargs)


__all__ = ["ITEMS", "get_item", "items", "Answered", "Drill", "MockInterview", "catalogue", "model_answer_text",
           "question_text", "resolve", "GENERATORS", "generate", "FREE_TEXT_LIMITS", "Grade", "grade",
           "parse_quantity", "KINDS", "TOPICS", "Item", "KeyPoint", "Progress", "ProgressError", "default_path",
           "drill_widget", "mock_widget"]
