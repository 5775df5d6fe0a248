"""``lora-drill``: interview drills in the terminal.

    lora-drill                          practise: due cards first, then new ones (Ctrl-D or :q to stop)
    lora-drill practice --topic qlora   only one topic (lora-drill topics lists them)
    lora-drill practice --once --id lora.init --answer "B is zero ..." [--rating 3] [--json]
    lora-drill mock --minutes 20        timed mock interview, mixed topics
    lora-drill stats                    mastery per topic, streak, weakest areas
    lora-drill list [--topic T] [--kind numeric]
    lora-drill show ID                  a question with its model answer
    lora-drill from-grades results/02_lora_linear/ada.json
                                        the topics of the exercises you failed: their cards due now

Answers: numeric and multiple-choice answers are one line; free-text and spot-the-bug answers end with
an empty line (or end of input). ``:skip`` skips a question, ``:q`` quits. After each answer you see the
grade and the model answer and rate yourself (Enter keeps the suggested rating). Progress is kept in
``--db`` (default ``$LORA_DRILLS_HOME/progress.sqlite`` or ``~/.local/share/lora-drills/progress.sqlite``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, TextIO

from .engine import Answered, Drill, MockInterview, catalogue, model_answer_text, question_text, resolve
from .grading import FREE_TEXT_LIMITS, RATING_NAMES, parse_rating
from .items import KINDS, TOPICS, Item
from .progress import Progress, ProgressError, default_path

QUIT, SKIP = ":q", ":skip"


class _Quit(Exception):
    pass


class Console:
    """Line input/output over text streams (stdin/stdout by default, any streams in tests)."""

    def __init__(self, inp: TextIO | None = None, out: TextIO | None = None):
        self.inp, self.out = inp or sys.stdin, out or sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def ask(self, prompt: str) -> str | None:
        """One line, or None at end of input."""
        self.out.write(prompt)
        self.out.flush()
        line = self.inp.readline()
        if line == "":
            self.out.write("\n")
            return None
        return line.rstrip("\n")

    def ask_block(self, prompt: str) -> str | None:
        """Lines until an empty line; None at end of input with nothing typed."""
        self.say(prompt)
        lines: list[str] = []
        while True:
            line = self.inp.readline()
            if line == "":
                return "\n".join(lines) if lines else None
            line = line.rstrip("\n")
            if not line.strip():
                if lines:
                    return "\n".join(lines)
                continue
            if line.strip() in (QUIT, SKIP) and not lines:
                return line.strip()
            lines.append(line)


def read_answer(con: Console, item: Item) -> str | None:
    if item.kind in ("free", "bug"):
        return con.ask_block("Your answer (end with an empty line):")
    return con.ask("Your answer: ")


def show_result(con: Console, answered: Answered) -> None:
    g = answered.grade
    con.say(f"{g.verdict}. {g.feedback}")
    con.say("-" * 72)
    con.say(model_answer_text(answered.item))
    if answered.item.kind in ("free", "bug"):
        con.say("-" * 72)
        con.say("Note: " + FREE_TEXT_LIMITS)
    con.say("-" * 72)


def ask_rating(con: Console, suggested: int) -> int:
    prompt = f"Rate yourself [1 again, 2 hard, 3 good, 4 easy] (Enter = {suggested} {RATING_NAMES[suggested]}): "
    while True:
        line = con.ask(prompt)
        if line is None:
            return suggested
        if line.strip() == QUIT:
            raise _Quit
        try:
            return parse_rating(line, suggested)
        except ValueError as err:
            con.say(str(err))


def ask_one(con: Console, drill: Drill, item: Item, mode: str = "practice",
            record: Callable[[Answered, int], None] | None = None) -> Answered | None:
    """Show ``item``, read, grade, show the model answer, take the rating, record. None if skipped."""
    con.say("=" * 72)
    con.say(f"[{TOPICS[item.topic]} | {item.kind} | difficulty {item.difficulty} | {item.id}]")
    con.say(question_text(item))
    while True:
        response = read_answer(con, item)
        if response is None or response.strip() == QUIT:
            raise _Quit
        if response.strip() == SKIP:
            con.say("Skipped.")
            return None
        answered = drill.answer(item, response)
        if not answered.grade.unreadable:
            break
        con.say(answered.grade.feedback + " (or :skip)")        # no number / option: ask again, reveal nothing
    show_result(con, answered)
    rating = ask_rating(con, answered.grade.suggested)
    (record or (lambda a, r: drill.rate(a, r, mode=mode)))(answered, rating)
    return answered


# ----------------------------------------------------------------------------------------- commands
def cmd_practice(args, con: Console) -> int:
    with Progress(args.db) as progress:
        drill = Drill(progress, seed=args.seed, topic=args.topic, kinds=args.kind)
        if args.once:
            return _once(args, con, drill)
        con.say(f"Drilling {len(drill.cards)} cards. Progress: {progress.path or 'in memory'}. ':q' quits, ':skip' skips.")
        done = 0
        try:
            while args.count is None or done < args.count:
                item = resolve(args.id, args.seed or 0) if args.id and done == 0 else drill.next_item()
                if ask_one(con, drill, item) is not None:
                    done += 1
        except _Quit:
            pass
        con.say(f"Answered {done}. Run 'lora-drill stats' to see your progress.")
    return 0


def _once(args, con: Console, drill: Drill) -> int:
    item = resolve(args.id, args.seed or 0) if args.id else drill.next_item()
    if args.answer is None:
        try:
            answered = ask_one(con, drill, item)
        except _Quit:
            return 0
        if answered is None:
            return 0
        rating = None
    else:
        answered = drill.answer(item, args.answer)
        if answered.grade.unreadable:          # nothing graded, nothing recorded, the answer not shown
            if args.json:
                con.say(json.dumps({"item": item.id, "unreadable": True, "feedback": answered.grade.feedback}))
            print(f"lora-drill: {answered.grade.feedback}", file=sys.stderr)
            return 2
        rating = args.rating
        drill.rate(answered, rating)
        if not args.json:
            con.say(question_text(item))
            show_result(con, answered)
    if args.json:
        g = answered.grade
        con.say(json.dumps({"item": item.id, "card": item.card_id, "topic": item.topic, "kind": item.kind,
                            "score": g.score, "correct": g.correct, "suggested": g.suggested,
                            "rating": rating or g.suggested, "feedback": g.feedback,
                            "covered": list(g.covered), "missed": list(g.missed), "parsed": g.parsed}))
    return 0


def cmd_mock(args, con: Console) -> int:
    with Progress(args.db) as progress:
        drill = Drill(progress, seed=args.seed, kinds=args.kind)
        mock = MockInterview(drill, args.minutes, args.count)
        con.say(f"Mock interview: {mock.count} questions, {args.minutes:g} minutes, mixed topics. ':q' ends early.")
        try:
            while (item := mock.next_item()) is not None:
                con.say(f"[{max(0.0, mock.remaining()) / 60:.1f} min left, question {len(mock.results) + 1}/{mock.count}]")
                ask_one(con, drill, item, record=mock.record)
        except _Quit:
            pass
        if mock.remaining() <= 0:
            con.say("Time is up.")
        con.say(mock.report())
    return 0


def cmd_stats(args, con: Console) -> int:
    with Progress(args.db) as progress:
        st = Drill(progress).stats()
    if args.json:
        con.say(json.dumps({"reviews": st.reviews, "reviews_today": st.reviews_today, "streak": st.streak,
                            "topics": [t.__dict__ for t in st.topics], "weakest_topics": st.weakest_topics,
                            "weakest_cards": st.weakest_cards}))
        return 0
    con.say(f"Reviews: {st.reviews} ({st.reviews_today} today). Streak: {st.streak} day(s).")
    con.say(f"{'topic':<52} {'mastery':>7} {'seen':>9} {'due':>4} {'recent':>7}")
    for t in st.topics:
        acc = f"{t.accuracy:.0%}" if t.accuracy is not None else "-"
        con.say(f"{TOPICS[t.topic]:<52} {t.mastery:>7.0%} {t.seen:>4}/{t.cards:<4} {t.due:>4} {acc:>7}")
    con.say("Mastery = FSRS probability of recall a week from now, averaged over all the topic's cards "
            "(unseen cards count as 0).")
    if st.weakest_topics:
        con.say("Weakest areas: " + ", ".join(TOPICS[t] for t in st.weakest_topics))
    if st.weakest_cards:
        con.say("Most missed: " + ", ".join(f"{c} ({n}x again)" for c, n in st.weakest_cards))
    return 0


def cmd_list(args, con: Console) -> int:
    for c in catalogue(args.topic, args.kind):
        item = resolve(c.id, 0)
        first = item.prompt.split("\n")[-1] if c.id.startswith("gen.") else item.prompt
        con.say(f"{c.id:<28} {c.topic:<16} {c.kind:<8} {first[:90]}")
    return 0


def cmd_show(args, con: Console) -> int:
    item = resolve(args.id, args.seed or 0)
    con.say(question_text(item))
    con.say("-" * 72)
    con.say(model_answer_text(item))
    return 0


def cmd_topics(args, con: Console) -> int:
    for t, name in TOPICS.items():
        con.say(f"{t:<16} {name} ({len(catalogue(t))} cards)")
    return 0


def cmd_from_grades(args, con: Console) -> int:
    from .from_grades import schedule_from_file
    with Progress(args.db) as progress:
        for path in args.reports:
            try:
                done = schedule_from_file(progress, path)
            except FileNotFoundError as err:
                raise ValueError(str(err)) from None
            if not done.failed:
                con.say(f"{path}: no failed exercise; nothing scheduled")
                continue
            con.say(f"{path}: failed {', '.join(done.failed)}")
            con.say(f"  topics {', '.join(done.topics)}: {len(done.cards)} cards due now "
                    f"(lora-drill practice starts with them)")
    return 0


def _help_text(doc: str) -> tuple[str, str]:
    """The module docstring as --help shows it: (description, epilog), each said once, without the
    reStructuredText ``literal`` markup that is for the docs, not the terminal."""
    plain = doc.replace("``", "")
    first, _, rest = plain.strip().partition("\n\n")
    return first, rest


def build_parser() -> argparse.ArgumentParser:
    description, epilog = _help_text(__doc__)
    p = argparse.ArgumentParser(prog="lora-drill", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    p.add_argument("--db", default=None, help=f"progress file (default {default_path()})")
    p.add_argument("--seed", type=int, default=None, help="random seed (question order, generated numbers)")
    sub = p.add_subparsers(dest="command")

    def filters(sp):
        sp.add_argument("--topic", choices=sorted(TOPICS), default=None,
                        help="only this topic (default: all; lora-drill topics lists them)")
        sp.add_argument("--kind", choices=KINDS, action="append", default=None,
                        help="only this kind of question; repeatable (default: all kinds)")

    pr = sub.add_parser("practice", help="spaced-repetition practice (the default)")
    filters(pr)
    pr.add_argument("--count", type=int, default=None, help="stop after this many answers")
    pr.add_argument("--once", action="store_true", help="ask one question and exit")
    pr.add_argument("--id", default=None, help="the question: bank id, generator id, or gen.x@seed")
    pr.add_argument("--answer", default=None, help="with --once: grade this answer without reading input")
    pr.add_argument("--rating", type=int, choices=(1, 2, 3, 4), default=None, help="with --answer: your rating")
    pr.add_argument("--json", action="store_true", help="with --once: print the result as JSON")
    mk = sub.add_parser("mock", help="timed mock interview with mixed topics")
    mk.add_argument("--minutes", type=float, default=20.0, help="length of the interview (default %(default)g)")
    mk.add_argument("--count", type=int, default=None,
                    help=f"number of questions (default: minutes / 3 rounded down, at least 3; "
                         f"{MockInterview.default_count(20.0)} for 20 minutes)")
    mk.add_argument("--kind", choices=KINDS, action="append", default=None, help="repeatable")
    st = sub.add_parser("stats", help="mastery per topic, streak, weakest areas")
    st.add_argument("--json", action="store_true", help="print the statistics as JSON")
    ls = sub.add_parser("list", help="list the cards")
    filters(ls)
    sh = sub.add_parser("show", help="show a question with its model answer")
    sh.add_argument("id", help="bank id, generator id, or gen.x@seed (lora-drill list shows them)")
    sub.add_parser("topics", help="list the topics")
    fg = sub.add_parser("from-grades", help="make the cards of the topics of failed exercises due now")
    fg.add_argument("reports", nargs="+", metavar="REPORT",
                    help="the autograder's results/<assignment>/<student>.json, or the output of "
                         "`python -m autograder validate --json NOTEBOOK` saved to a file")
    return p


COMMANDS = {"practice": cmd_practice, "mock": cmd_mock, "stats": cmd_stats, "list": cmd_list,
            "show": cmd_show, "topics": cmd_topics, "from-grades": cmd_from_grades}


def main(argv: list[str] | None = None, inp: TextIO | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(argv + ["practice"])
    if args.command == "practice":
        if (args.answer is not None or args.json) and not args.once:
            parser.error("--answer and --json need --once")
        if args.rating is not None and args.answer is None:
            parser.error("--rating needs --answer (interactively you are asked for your rating)")
    con = Console(inp, out)
    try:
        return COMMANDS[args.command](args, con)
    except ProgressError as err:
        print(f"lora-drill: {err}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as err:
        print(f"lora-drill: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        con.say("\nStopped.")
        return 130
    except BrokenPipeError:                    # `lora-drill list | head`: the reader left, not an error
        if out is None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
