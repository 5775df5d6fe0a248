"""The notebook front: ipywidgets cells on the same engine as ``lora-drill``.

One call in a notebook cell::

    from lora_ref.drills.widgets import drill_widget
    drill_widget(topic="qlora")            # progress shared with the terminal command by default

shows a question (code numbered, options as radio buttons), an answer box, "Check", the grade with the
model answer and key points, self-rating buttons (Again / Hard / Good / Easy, the suggestion preselected),
"Next", and a statistics table. :func:`mock_widget` runs a timed mock interview the same way;
:func:`stats_widget` shows mastery per topic alone.
"""
from __future__ import annotations

import html
import os

import ipywidgets as w

from .engine import Answered, Drill, MockInterview, model_answer_text
from .grading import FREE_TEXT_LIMITS, RATING_NAMES
from .items import TOPICS, Item
from .progress import Progress, Stats

_RATINGS = [(f"{k} {v}", k) for k, v in RATING_NAMES.items()]


def _pre(text: str) -> str:
    return f"<pre style='white-space:pre-wrap;font-size:90%'>{html.escape(text)}</pre>"


def stats_html(st: Stats) -> str:
    """Mastery per topic, streak and weakest areas as an HTML table."""
    rows = "".join(
        f"<tr><td>{html.escape(TOPICS[t.topic])}</td><td>{t.mastery:.0%}</td><td>{t.seen}/{t.cards}</td>"
        f"<td>{t.due}</td><td>{'-' if t.accuracy is None else f'{t.accuracy:.0%}'}</td></tr>" for t in st.topics)
    weak = ", ".join(TOPICS[t] for t in st.weakest_topics) or "none yet"
    return (f"<p>Reviews: {st.reviews} ({st.reviews_today} today). Streak: {st.streak} day(s). "
            f"Weakest areas: {html.escape(weak)}.</p><table><tr><th>topic</th><th>mastery</th><th>seen</th>"
            f"<th>due</th><th>recent score</th></tr>{rows}</table>"
            "<p><small>Mastery: FSRS probability of recall a week from now, averaged over the topic's cards "
            "(unseen = 0).</small></p>")


class DrillWidget(w.VBox):
    """Question -> answer -> grade and model answer -> self-rating -> next, on a :class:`Drill`.

    With ``mock`` (a :class:`MockInterview` on the same drill) questions come from the mock interview, the
    header shows the time left, and its report replaces the question when time or questions run out.
    """

    def __init__(self, drill: Drill, mock: MockInterview | None = None):
        self.drill = drill
        self.mock = mock
        self.item: Item | None = None
        self.answered: Answered | None = None
        self.header = w.HTML()
        self.question = w.HTML()
        self.text = w.Textarea(placeholder="Your answer", layout=w.Layout(width="100%", height="8em"))
        self.line = w.Text(placeholder="e.g. 16.8M, 2 GB, 1.5 GiB", layout=w.Layout(width="40%"))
        self.options = w.RadioButtons(options=[], layout=w.Layout(width="100%"))
        self.input = w.Box()
        self.check = w.Button(description="Check", button_style="primary")
        self.skip = w.Button(description="Skip")
        self.feedback = w.HTML()
        self.rating = w.ToggleButtons(options=_RATINGS, description="Your rating:", value=3)
        self.next = w.Button(description="Save rating, next", button_style="success")
        self.rate_box = w.VBox([self.rating, self.next], layout=w.Layout(display="none"))
        self.show_stats = w.Button(description="Statistics")
        self.stats = w.HTML()
        self.check.on_click(lambda _b: self.on_check())
        self.skip.on_click(lambda _b: self.ask())
        self.next.on_click(lambda _b: self.on_next())
        self.show_stats.on_click(lambda _b: self.on_stats())
        # grades -> drills: a graded report (autograder result JSON or validate --json) makes the cards of
        # the failed exercises' topics due now (lora_ref.drills.from_grades; `lora-drill from-grades`)
        self.grades_path = w.Text(placeholder="results/<assignment>/<you>.json or validate --json output",
                                  description="My grades:", layout=w.Layout(width="60%"))
        self.from_grades = w.Button(description="Drill what I failed")
        self.grades_note = w.HTML()
        self.from_grades.on_click(lambda _b: self.on_grades())
        super().__init__([self.header, self.question, self.input, w.HBox([self.check, self.skip, self.show_stats]),
                          self.feedback, self.rate_box, self.stats,
                          w.HBox([self.grades_path, self.from_grades]), self.grades_note])
        self.ask()

    def ask(self, item: Item | None = None) -> None:
        """Show the next question (or ``item``); in a mock interview, the report once it is over."""
        if item is None and self.mock is not None:
            item = self.mock.next_item()
            if item is None:
                self.finish()
                return
        self.item = item or self.drill.next_item()
        self.answered = None
        it = self.item
        clock = ""
        if self.mock is not None:
            clock = (f"Mock interview: question {len(self.mock.results) + 1}/{self.mock.count}, "
                     f"{max(0.0, self.mock.remaining()) / 60:.1f} min left<br>")
        self.header.value = (f"{clock}<b>{html.escape(TOPICS[it.topic])}</b> | {it.kind} | difficulty "
                             f"{it.difficulty} | <code>{html.escape(it.id)}</code>")
        body = f"<p>{html.escape(it.prompt)}</p>" + (_pre(it.numbered_code()) if it.code else "")
        self.question.value = body
        if it.kind == "choice":
            self.options.options = [(f"({chr(97 + i)}) {c}", chr(97 + i)) for i, c in enumerate(it.choices)]
            self.options.value = None
            self.input.children = [self.options]
        elif it.kind == "numeric":
            self.line.value = ""
            self.line.placeholder = f"answer in {it.answer_unit}" if it.answer_unit else "e.g. 16.8M, 2 GB, 1.5 GiB"
            self.input.children = [self.line]
        else:
            self.text.value = ""
            self.text.placeholder = "Name the line ('line N') and what goes wrong" if it.kind == "bug" else "Your answer"
            self.input.children = [self.text]
        self.feedback.value = ""
        self.rate_box.layout.display = "none"
        self.check.disabled = False

    def response(self) -> str:
        if self.item.kind == "choice":
            return self.options.value or ""
        return self.line.value if self.item.kind == "numeric" else self.text.value

    def on_check(self) -> None:
        if self.item is None or self.answered is not None:
            return
        answered = self.drill.answer(self.item, self.response())
        g = answered.grade
        if g.unreadable:                                  # ask again: nothing graded, the answer not shown
            self.feedback.value = f"<p><b>{html.escape(g.feedback)}</b></p>"
            return
        self.answered = answered
        color = {"CORRECT": "green", "PARTLY RIGHT": "darkorange"}.get(g.verdict, "firebrick")
        verdict = f"<b style='color:{color}'>{g.verdict.capitalize()}.</b> "
        note = (f"<p><small>{html.escape(FREE_TEXT_LIMITS)}</small></p>" if self.item.kind in ("free", "bug") else "")
        self.feedback.value = (f"<p>{verdict}{html.escape(g.feedback)}</p>" + _pre(model_answer_text(self.item)) + note)
        self.rating.value = g.suggested
        self.rate_box.layout.display = "flex"
        self.check.disabled = True

    def on_next(self) -> None:
        if self.answered is not None:
            if self.mock is not None:
                self.mock.record(self.answered, self.rating.value)
            else:
                self.drill.rate(self.answered, self.rating.value, mode="notebook")
        self.ask()

    def finish(self) -> None:
        """End of a mock interview: show its report, disable the answer controls."""
        self.item = None
        self.header.value = "<b>Mock interview over.</b>"
        self.question.value = _pre(self.mock.report())
        self.input.children = []
        self.feedback.value = ""
        self.rate_box.layout.display = "none"
        self.check.disabled = self.skip.disabled = True

    def on_stats(self) -> None:
        self.stats.value = stats_html(self.drill.stats())

    def on_grades(self, path: str | None = None) -> None:
        """Schedule the failed exercises' topics from the report at ``path`` (default: the text box), then
        ask the first of those cards."""
        from .from_grades import schedule_from_file
        path = (path or self.grades_path.value).strip()
        try:
            done = schedule_from_file(self.drill.progress, path)
        except (OSError, ValueError, KeyError) as err:
            self.grades_note.value = _pre(f"Could not read the grades: {err}")
            return
        if not done.failed:
            self.grades_note.value = _pre(f"{path}: no failed exercise, nothing to schedule.")
            return
        self.grades_note.value = _pre(f"Failed: {', '.join(done.failed)}.\nTopics {', '.join(done.topics)}: "
                                      f"{len(done.cards)} cards are due now; the next question is one of them.")
        self.ask()


def drill_widget(topic: str | None = None, db=None, *, seed: int | None = None, kinds=None,
                 progress: Progress | None = None) -> DrillWidget:
    """A ready drill cell: ``topic`` one of :data:`TOPICS` (None: all); ``db`` the progress file (None:
    the default shared with ``lora-drill``, ``":memory:"`` for a throw-away session).

    While nbgrader executes a notebook (``NBGRADER_EXECUTION`` set) the default is ``":memory:"``, so
    grading never writes into anyone's progress file.
    """
    if db is None and progress is None and os.environ.get("NBGRADER_EXECUTION"):
        db = ":memory:"
    return DrillWidget(Drill(progress or Progress(db), seed=seed, topic=topic, kinds=kinds))


def mock_widget(minutes: float = 20, count: int | None = None, db=None, *, seed: int | None = None,
                kinds=None) -> DrillWidget:
    """A timed mock interview with mixed topics in a notebook cell (same rules as ``lora-drill mock``)."""
    if db is None and os.environ.get("NBGRADER_EXECUTION"):
        db = ":memory:"
    drill = Drill(Progress(db), seed=seed, kinds=kinds)
    return DrillWidget(drill, MockInterview(drill, minutes, count))


def stats_widget(db=None) -> w.HTML:
    """Mastery per topic, streak and weakest areas for the progress file ``db``."""
    with Progress(db) as progress:
        return w.HTML(stats_html(Drill(progress).stats()))
