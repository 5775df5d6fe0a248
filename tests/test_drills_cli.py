"""The terminal front: `lora-drill` driven through stdin, in a subprocess and in-process."""
import io
import json
import os
import subprocess
import sys

import pytest

from lora_ref.drills.cli import main
from lora_ref.drills.progress import Progress


def run_cli(args, stdin="", env_home=None, timeout=120):
    env = dict(os.environ)
    if env_home is not None:
        env["LORA_DRILLS_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "lora_ref.drills.cli", *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=timeout)


def call(args, stdin=""):
    out = io.StringIO()
    rc = main(args, io.StringIO(stdin), out)
    return rc, out.getvalue()


def test_subprocess_practice_through_stdin_and_progress_persists(tmp_path):
    # numeric answer, Enter keeps the suggested rating
    r = run_cli(["practice", "--once", "--id", "gen.lora-params@3"], "45.1M\n\n", env_home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Correct" in r.stdout and "45,088,768" in r.stdout
    # free text over several lines, ended by an empty line, then an explicit rating
    r = run_cli(["practice", "--once", "--id", "lora.init"],
                "B is initialised to zero and A is random (kaiming),\nso delta W is zero at the start.\n\n2\n",
                env_home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Key points covered: 3/4" in r.stdout and "cannot tell whether your reasoning is right" in r.stdout
    # a second process sees both reviews, with the learner's rating kept
    r = run_cli(["stats", "--json"], env_home=tmp_path)
    st = json.loads(r.stdout)
    assert st["reviews"] == 2 and st["streak"] == 1
    with Progress(tmp_path / "progress.sqlite") as p:
        ratings = {x["item"]: (x["rating"], x["suggested"]) for x in p.reviews()}
    assert ratings["lora.init"] == (2, 3) and ratings["gen.lora-params@3"] == (3, 3)


def test_subprocess_corrupt_progress_file_gives_clear_error(tmp_path):
    (tmp_path / "progress.sqlite").write_text("not a database, just text\n" * 50)
    r = run_cli(["stats"], env_home=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "progress.sqlite is unreadable" in r.stderr and "Move it aside" in r.stderr


def test_interactive_session_quits_and_skips(tmp_path):
    db = str(tmp_path / "p.sqlite")
    rc, out = call(["--db", db, "--seed", "4", "practice", "--topic", "mixed-precision", "--kind", "choice"],
                   ":skip\nb\n\n:q\n")
    assert rc == 0 and "Skipped." in out and "Answered 1." in out
    with Progress(db) as p:
        assert len(p.reviews()) == 1


def test_interactive_session_ends_at_end_of_input(tmp_path):
    db = str(tmp_path / "p.sqlite")
    rc, out = call(["--db", db, "--seed", "1", "practice", "--count", "5", "--kind", "choice"], "a\n3\nb\n")
    assert rc == 0 and "Answered 2." in out


def test_once_with_answer_and_json(tmp_path):
    db = str(tmp_path / "p.sqlite")
    rc, out = call(["--db", db, "practice", "--once", "--id", "qlora.bnb-defaults", "--answer", "b", "--json"])
    res = json.loads(out)
    assert rc == 0 and res["correct"] and res["rating"] == 3
    rc, out = call(["--db", db, "practice", "--once", "--id", "bug.scale-7", "--rating", "1",
                    "--answer", "line 3: /7 is the int4 range, values saturate; the scale should be absmax"])
    assert rc == 0 and "Right line (3)" in out
    with Progress(db) as p:
        assert [r["rating"] for r in p.reviews()] == [1, 3]


def test_bad_input_messages(tmp_path, capsys):
    rc, out = call(["--db", str(tmp_path / "p.sqlite"), "practice", "--once", "--id", "gen.bits@1", "--answer",
                    "lots", "--json"])
    # an unreadable answer is not graded or recorded (issue 13): exit 2, the answer not revealed
    assert rc == 2 and json.loads(out)["unreadable"] and "could not read a number" in json.loads(out)["feedback"]
    with Progress(tmp_path / "p.sqlite") as p:
        assert p.reviews() == []
    rc, _ = call(["show", "lora.nope"])
    assert rc == 2 and "no bank item" in capsys.readouterr().err
    rc, out = call(["--db", str(tmp_path / "p.sqlite"), "practice", "--once", "--id", "lora.init"], "x\n\nseven\n4\n")
    assert rc == 0 and "must be 1-4" in out


def test_mock_through_stdin(tmp_path):
    db = str(tmp_path / "p.sqlite")
    rc, out = call(["--db", db, "--seed", "2", "mock", "--minutes", "10", "--count", "2", "--kind", "choice"],
                   "a\n\nb\n\n")
    assert rc == 0 and "Mock interview: 2 questions" in out and "mean score" in out
    with Progress(db) as p:
        assert [r["mode"] for r in p.reviews()] == ["mock", "mock"]


def test_list_show_topics_stats(tmp_path):
    rc, out = call(["list", "--topic", "qlora"])
    assert rc == 0 and "qlora.three" in out and "gen.bits" in out and "lora.init" not in out
    rc, out = call(["show", "bug.nf4-table"])
    assert rc == 0 and "1 | nf4_values" in out and "0.0796" in out
    rc, out = call(["topics"])
    assert rc == 0 and "sizing" in out
    rc, out = call(["--db", str(tmp_path / "p.sqlite"), "stats"])
    assert rc == 0 and "Streak: 0" in out and "Mastery" in out


def test_parser_rejects_unknown_topic_and_inconsistent_options(capsys):
    for bad in (["practice", "--topic", "astrology"], ["practice", "--answer", "b"],
                ["practice", "--once", "--rating", "3"]):
        with pytest.raises(SystemExit):
            call(bad)
    assert "--rating needs --answer" in capsys.readouterr().err


def test_console_entry_point_reads_sys_argv(monkeypatch, tmp_path):
    # pyproject: lora-drill = "lora_ref.drills.cli:main" calls main() with no arguments
    monkeypatch.setattr(sys, "argv", ["lora-drill", "--db", str(tmp_path / "p.sqlite"), "stats", "--json"])
    out = io.StringIO()
    assert main(inp=io.StringIO(), out=out) == 0
    assert json.loads(out.getvalue())["reviews"] == 0
