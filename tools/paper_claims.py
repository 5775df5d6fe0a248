"""List every claim of the course that cites a paper (a section, table, figure, appendix or equation).

    python tools/paper_claims.py           # exit 1 if tests/paper_claims.md is out of date (what the test runs)
    python tools/paper_claims.py --write   # rewrite tests/paper_claims.md from the course text

The list is for a reviewer: each row is one sentence of the course that cites a paper, with where it is
(notebook source, drill bank item, README, or a lora_ref docstring/comment), the paper it names, the part of
the paper it cites, and the figures it quotes, so every claim can be checked against the papers in one place.
tests/test_paper_claims.py fails when a citation is added, removed or reworded in the text and the list was
not rewritten: a changed claim is then seen by whoever reviews the diff of tests/paper_claims.md.

What counts as a citation: "Section 4.1", "Sec. 7", "Table 2", "Figure 3", "Appendix B", "Eq. 5" in a
sentence that names a paper (QLoRA, LoRA, DoRA, rsLoRA, ..., an arXiv id, or "the paper"). A lower-case
"section 8" without a paper is the course's own cross-reference and is left out.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "paper_claims.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))

CITE = re.compile(r"\b(?P<kind>Sections?|Sec\.|§|Tables?|Figures?|Fig\.|Appendix|Appendices|Eqs?\.|Equations?)"
                  r"\s*(?P<num>(?:[0-9]+(?:\.[0-9]+)*|[A-H](?:\.[0-9]+)?)(?:\s*[-–]\s*[0-9]+(?:\.[0-9]+)*)?)\b",
                  re.IGNORECASE)
# Paper names, most specific first; (pattern, name as listed)
PAPERS = [
    (r"2305\.14314|\bQLoRA\b|Dettmers", "QLoRA (arXiv 2305.14314)"),
    (r"2106\.09685|\bLoRA paper\b|Hu et al", "LoRA (arXiv 2106.09685)"),
    (r"2402\.09353|\bDoRA\b", "DoRA (arXiv 2402.09353)"),
    (r"2312\.03732|\brs-?LoRA\b|Kalajdzievski", "rsLoRA (arXiv 2312.03732)"),
    (r"2404\.02948|\bPiSSA\b", "PiSSA (arXiv 2404.02948)"),
    (r"2310\.08659|\bLoftQ\b", "LoftQ (arXiv 2310.08659)"),
    (r"2402\.12354|\bLoRA\+", "LoRA+ (arXiv 2402.12354)"),
    (r"\bZeRO\b|1910\.02054", "ZeRO (arXiv 1910.02054)"),
    (r"2012\.13255|Aghajanyan", "Intrinsic dimensionality (arXiv 2012.13255)"),
    (r"2101\.00190|[Pp]refix[- ][Tt]uning paper|Li (?:and|&) Liang", "Prefix-Tuning (arXiv 2101.00190)"),
    (r"2104\.08691|Lester", "Prompt Tuning (arXiv 2104.08691)"),
    (r"2103\.10385|P-[Tt]uning paper|Liu et al", "P-Tuning (arXiv 2103.10385)"),
    (r"1711\.05101|Loshchilov|\bAdamW\b", "AdamW (arXiv 1711.05101)"),
    (r"1412\.6980|Kingma|Adam paper", "Adam (arXiv 1412.6980)"),
    (r"2205\.05198|Korthikanti", "Reducing activation recomputation (arXiv 2205.05198)"),
    (r"1710\.03740|Micikevicius|mixed[- ]precision paper", "Mixed Precision Training (arXiv 1710.03740)"),
]
# A bare method name ("LoRA", "Adam") is the weakest evidence of which paper is meant (see paper_of).
WEAK = [(re.compile(r"\bLoRA\b"), "LoRA (arXiv 2106.09685)"), (re.compile(r"\bAdam\b"), "Adam (arXiv 1412.6980)")]
PAPER_RES = [(re.compile(p), name) for p, name in PAPERS]
THE_PAPER = re.compile(r"\b(?:the|its|this) paper\b|\bpaper'?s?\b|arXiv", re.IGNORECASE)
FIGURE = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?\s*(?:%|x\b|GB|GiB|MB|bits?\b)?")
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(*`'\"])")


def sentences(text: str) -> list[str]:
    """Paragraphs of text, flattened to one line each, split into sentences (a table row is one sentence)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        rows = [ln for ln in lines if ln.startswith("|")]
        out += rows
        flat = " ".join(ln for ln in lines if not ln.startswith("|"))
        out += [s.strip() for s in SENTENCE_END.split(flat) if s.strip()]
    return out


def paper_of(sentence: str, start: int, before_text: str = "", lower_case: bool = False) -> str | None:
    """The paper a citation at ``start`` of ``sentence`` belongs to: the nearest paper named before it in the
    sentence, else the last one named earlier in the same text (``before_text``: a docstring, a cell, an
    item), else the first one named after it in the sentence. A lower-case "section 3" is the course's own
    cross-reference unless a paper (or "paper") is named just before it."""
    def named(text, patterns=PAPER_RES):
        return sorted((m.start(), name) for rx, name in patterns for m in rx.finditer(text))

    if lower_case:
        near = sentence[max(0, start - 30):start]
        if not (THE_PAPER.search(near) or re.search(r"(QLoRA|LoRA|DoRA|rsLoRA|PiSSA|LoftQ|ZeRO)(?:'s)?[\s,(]*$", near)):
            return None
    for text, patterns in ((sentence[:start], PAPER_RES), (before_text, PAPER_RES),
                           (sentence[:start], WEAK), (before_text, WEAK)):
        hits = named(text, patterns)
        if hits:
            return hits[-1][1]
    later = named(sentence[start:]) or named(sentence[start:], WEAK)
    if later:
        return later[0][1]
    return "a paper not named in the text"


def claims_in(text: str, where: str) -> list[dict]:
    """Rows for every sentence of ``text`` that cites part of a paper."""
    rows = []
    done = ""
    for s in sentences(text):
        cites, papers = [], []
        for m in CITE.finditer(s):
            paper = paper_of(s, m.start(), done, lower_case=m["kind"][0].islower())
            if paper is None:
                continue                         # the course's own "section 8": not a paper citation
            cites.append(f"{m['kind']} {m['num']}")
            papers.append(paper)
        done += " " + s
        if not cites:
            continue
        spans = [m.span() for m in CITE.finditer(s)]
        figures = [f.group(0).strip().rstrip(",") for f in FIGURE.finditer(s)
                   if not any(a <= f.start() < b for a, b in spans)]
        figures = [f for f in figures if len(f) > 1 and not re.fullmatch(r"(19|20)\d\d|\d{4}\.\d{4,5}", f)]
        rows.append(dict(where=where, paper="; ".join(dict.fromkeys(papers)), cites=", ".join(dict.fromkeys(cites)),
                         figures=", ".join(dict.fromkeys(figures)), text=s))
    return rows


def _python_texts(src: str, rel: str) -> list[tuple[str, str]]:
    """(where, text) of a module's docstrings (module, classes, functions) and its comment blocks."""
    out = []
    try:
        tree = ast.parse(src)
    except SyntaxError:                                   # a cell with IPython magics: its comments only
        tree = ast.parse("")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                name = getattr(node, "name", "module docstring")
                out.append((f"{rel}: {name}", doc))
    comments, last = [], -2
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError):
        tokens = []
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if comments and line == last + 1:
                comments[-1] = (comments[-1][0], comments[-1][1] + " " + text)
            else:
                comments.append((line, text))
            last = line
    out += [(f"{rel}: comment", text) for _, text in comments]
    return out


def course_texts() -> list[tuple[str, str]]:
    """(where, text) of everything the course says: notebook sources (every cell), the drill bank, README.md,
    the README Results template and lora_ref's docstrings and comments."""
    import build_notebooks as bn
    from lora_ref.drills.bank import ITEMS

    out = []
    for src in sorted((ROOT / "course_src").glob("[0-9][0-9]_*.py")):
        nb = bn.parse(bn.PLACEHOLDER.sub("<figure>", src.read_text()), src.stem)
        for cell in nb.cells:
            if cell.cell_type == "code":                  # a code cell's docstrings and comments
                out += [(f"course_src/{src.name}", t) for _, t in _python_texts(cell.source, "")]
            else:
                out.append((f"course_src/{src.name}", cell.source))
    for item in ITEMS:                                   # one text per item: the answer may cite "the paper"
        out.append((f"bank {item.id}", "\n\n".join([item.prompt, *item.choices, item.answer, item.source])))
    out.append(("course_src/readme_results.md", (ROOT / "course_src" / "readme_results.md").read_text()))
    readme = (ROOT / "README.md").read_text()
    readme = readme.split(bn.README_BEGIN)[0] + readme.split(bn.README_END)[-1]   # the generated part: above
    out.append(("README.md", readme))
    for path in sorted((ROOT / "lora_ref").rglob("*.py")):
        if "bank" not in path.parts:
            out += _python_texts(path.read_text(), str(path.relative_to(ROOT)))
    return out


def collect(texts: list[tuple[str, str]] | None = None) -> list[dict]:
    return [row for where, text in (course_texts() if texts is None else texts) for row in claims_in(text, where)]


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict]) -> str:
    head = [
        "# The course's claims that cite a paper",
        "",
        "Generated by `python tools/paper_claims.py --write` from the notebook sources, the drill bank, README.md",
        "and lora_ref's docstrings and comments; `tests/test_paper_claims.py` fails when the text and this list",
        "differ. Review each row against the paper it names (LoRA: arXiv 2106.09685, QLoRA: arXiv 2305.14314).",
        "The paper column is read off the text (the nearest paper named before the citation, in the sentence or",
        "earlier in the same cell, item or docstring): a wrong or 'not named' paper there means the sentence",
        "itself does not say clearly which paper it cites.",
        "",
        f"{len(rows)} claims.",
        "",
        "| where | paper | cites | figures quoted | claim |",
        "| --- | --- | --- | --- | --- |",
    ]
    body = [f"| {_cell(r['where'])} | {_cell(r['paper'])} | {_cell(r['cites'])} | {_cell(r['figures'])} | "
            f"{_cell(r['text'])} |" for r in rows]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite tests/paper_claims.md")
    args = ap.parse_args(argv)
    new = render(collect())
    if args.write:
        LIST.write_text(new)
        print(f"wrote {LIST} ({new.count(chr(10)) - 10} claims)")
        return 0
    old = LIST.read_text() if LIST.exists() else ""
    if old == new:
        return 0
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), "listed", "in the text", lineterm="", n=0):
        print(line)
    print("tests/paper_claims.md is out of date: check the changed claims, then run python tools/paper_claims.py --write")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
