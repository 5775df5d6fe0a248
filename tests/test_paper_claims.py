"""The course's claims that cite a paper are listed in one place (tests/paper_claims.md) for review.

The list is generated from the text (tools/paper_claims.py); this test fails when a citation is added, removed
or reworded in a notebook source, the drill bank, README.md or a lora_ref docstring and the list was not
rewritten, so every change to a cited claim shows up in the diff of tests/paper_claims.md.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import paper_claims as pc  # noqa: E402


@pytest.fixture(scope="module")
def texts():
    return pc.course_texts()


def test_the_list_matches_the_text(texts):
    listed = pc.LIST.read_text()
    found = pc.render(pc.collect(texts))
    if listed != found:
        old, new = set(listed.splitlines()), set(found.splitlines())
        gone = [ln for ln in listed.splitlines() if ln not in new]
        added = [ln for ln in found.splitlines() if ln not in old]
        raise AssertionError(
            "tests/paper_claims.md is out of date with the course text: review the changed claims against the "
            "papers, then run python tools/paper_claims.py --write\n"
            + "\n".join([f"  listed, no longer in the text: {ln[:200]}" for ln in gone]
                        + [f"  in the text, not listed: {ln[:200]}" for ln in added]))


def test_a_citation_is_found_with_its_paper_and_values():
    rows = pc.claims_in("QLoRA's Table 2 gives NF4 + DQ 27.41 and Int4 34.34 (mean perplexity).", "x")
    assert [(r["paper"], r["cites"], r["figures"]) for r in rows] == [
        ("QLoRA (arXiv 2305.14314)", "Table 2", "27.41, 34.34")]
    rows = pc.claims_in("The LoRA paper (Hu et al.) merges W. No latency is added (Section 4.1).", "x")
    assert [(r["paper"], r["cites"]) for r in rows] == [("LoRA (arXiv 2106.09685)", "Section 4.1")]


def test_the_course_s_own_sections_are_not_paper_citations():
    assert pc.claims_in("We measure it in section 8 below, with LoRA on all layers.", "x") == []
    assert len(pc.claims_in("The LoRA paper, section 7, compares subspaces.", "x")) == 1


def test_a_changed_citation_is_caught(texts):
    """Reword one cited claim in the text (its section number): the list no longer matches."""
    rows = pc.collect(texts)
    target = next(r for r in rows if r["where"].startswith("bank "))
    cite = target["cites"].split(", ")[0]
    changed = [(w, t.replace(cite, cite + "9", 1) if w == target["where"] else t) for w, t in texts]
    assert pc.render(pc.collect(changed)) != pc.render(rows)
    dropped = [(w, t) for w, t in texts if w != target["where"]]
    assert pc.render(pc.collect(dropped)) != pc.render(rows)


def test_the_tool_exits_non_zero_when_out_of_date(tmp_path, monkeypatch, texts):
    monkeypatch.setattr(pc, "course_texts", lambda: texts)
    monkeypatch.setattr(pc, "LIST", tmp_path / "paper_claims.md")
    (tmp_path / "paper_claims.md").write_text("| stale |\n")
    assert pc.main([]) == 1
    assert pc.main(["--write"]) == 0 and pc.main([]) == 0
