"""Figures come from their source (issue 12, section 3).

- tools/build_notebooks.py fills `{{result:FILE:KEY.PATH[:FORMAT]}}` placeholders from benchmarks/results/ when
  it builds the notebooks and README's Results section; a wrong file or key stops the build.
- No hand-typed copy of a committed measurement stays in the course text (course_src/ markdown), the drill
  bank or README.md: every number there that equals a committed figure is either a placeholder, a figure
  this file checks against its result (CHECKED), or a listed coincidence (COINCIDENCES, with the reason).
"""
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks as bn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- the resolver, on hand-made results

@pytest.fixture
def fake_results(tmp_path, monkeypatch):
    """A course folder in tmp with one result file; lora_ref.results finds it from the working directory."""
    (tmp_path / "lora_ref").mkdir()
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    (res / "run_cpu.json").write_text(json.dumps({
        "model": {"nf4+dq": {"loss": 3.29012}, "fp4": {"loss": 3.1674}},
        "rows": [{"tok_s": 5112.2, "peak_gb": 5.5}, {"tok_s": 6282.0, "peak_gb": 5.4}],
        "trainable": 4884480, "accuracy": 0.5121951, "0.5": "dotted key", "date": "2026-11-28",
    }))
    monkeypatch.chdir(tmp_path)
    return res


def test_placeholders_are_filled_from_the_result(fake_results):
    text = ("loss {{result:run_cpu.json:model.nf4+dq.loss:.3f}}, {{result:run_cpu.json:trainable:,d}} params, "
            "{{result:run_cpu.json:accuracy:.1%}}, {{result:run_cpu.json:rows.1.tok_s:,.0f}} tok/s, "
            "{{result:run_cpu.json:date}}, {{result:run_cpu.json:0.5}}")
    assert bn.fill_results(text) == ("loss 3.290, 4,884,480 params, 51.2%, 6,282 tok/s, 2026-11-28, dotted key")


def test_reductions_and_ratios(fake_results):
    assert bn.fill_results("{{result:run_cpu.json:rows.*.tok_s.@mean:.1f}}") == f"{(5112.2 + 6282.0) / 2:.1f}"
    assert bn.fill_results("{{result:run_cpu.json:rows.*.peak_gb.@min}}") == "5.4"
    assert bn.fill_results("{{result:run_cpu.json:rows.@len}}") == "2"
    assert bn.fill_results("{{result:run_cpu.json:rows.0.tok_s/rows.1.tok_s:.3f}}") == f"{5112.2 / 6282.0:.3f}"
    assert bn.fill_results("{{result:run_cpu.json:trainable/1e6:.2f}}") == "4.88"


def test_a_changed_result_changes_the_text(fake_results):
    before = bn.fill_results("{{result:run_cpu.json:model.fp4.loss:.3f}}")
    data = json.loads((fake_results / "run_cpu.json").read_text())
    data["model"]["fp4"]["loss"] = 3.5
    (fake_results / "run_cpu.json").write_text(json.dumps(data))
    assert (before, bn.fill_results("{{result:run_cpu.json:model.fp4.loss:.3f}}")) == ("3.167", "3.500")


@pytest.mark.parametrize("placeholder, message", [
    ("{{result:run_cpu.json:model.nf5.loss}}", "no key 'nf5' at model"),
    ("{{result:run_cpu.json:rows.7.tok_s}}", "not an index of the list of 2"),
    ("{{result:run_cpu.json:trainable.x}}", "is a int"),
    ("{{result:missing_cpu.json:a}}", "does not exist"),
    ("{{result:run_cpu.json:model}}", "not a single figure"),
    ("{{result:run_cpu.json:date:.2f}}", "cannot format"),
    ("{{result:run_cpu.json:rows.*.tok_s.@median}}", "unknown reduction"),
    ("{{result:run_cpu.json:rows.0.tok_s/model.fp4}}", "A/B needs two numbers"),
    ("{{result:run_cpu.yaml:a}}", ".json file"),
    ("{{result:run_cpu.json}}", "malformed placeholder"),
])
def test_an_unknown_file_or_key_fails_naming_the_placeholder(fake_results, placeholder, message):
    with pytest.raises(bn.PlaceholderError) as e:
        bn.fill_results(f"text {placeholder} text", "07_merge:07-cell-003")
    assert message in str(e.value) and "07_merge:07-cell-003" in str(e.value)
    if "malformed" not in message:
        assert placeholder in str(e.value)


def test_the_build_fills_markdown_and_manual_cells_but_not_code(fake_results):
    src = ("# %% [markdown]\n# The loss is {{result:run_cpu.json:model.fp4.loss:.2f}}.\n"
           "# %% [markdown] manual id=q1 points=1\n# Answer ({{result:run_cpu.json:trainable:,d}}).\n"
           "# %%\ntext = '{{result:run_cpu.json:trainable}}'\n")
    nb = bn.parse(src, "99_demo")
    assert [c.source for c in nb.cells] == ["The loss is 3.17.", "Answer (4,884,480).",
                                            "text = '{{result:run_cpu.json:trainable}}'"]


def test_the_build_stops_on_a_bad_key(fake_results):
    src = "# %% [markdown]\n# The loss is {{result:run_cpu.json:model.fp8.loss:.2f}}.\n"
    with pytest.raises(bn.PlaceholderError, match=r"99_demo:99-cell-000: \{\{result:run_cpu.json:model.fp8.loss:.2f\}\}"):
        bn.parse(src, "99_demo")


# ---------------------------------------------------------------- README's Results section

def test_readme_results_section_is_built_from_the_results():
    """README.md is not built by nbgrader, so this is its --check: the section between the RESULTS markers is
    exactly course_src/readme_results.md with today's committed results filled in."""
    readme = (ROOT / "README.md").read_text()
    assert readme == bn.render_readme(readme), (
        "README.md's Results section is out of date with course_src/readme_results.md or benchmarks/results/: "
        "run python tools/build_notebooks.py --readme")


def test_readme_render_needs_its_markers():
    with pytest.raises(ValueError, match="exactly one"):
        bn.render_readme("# README without markers\n")


# ---------------------------------------------------------------- no hand-typed copies of committed figures

# A figure typed in text that this test checks against its committed result: (where, text as typed, file,
# key, format). Used where a placeholder cannot go (the drill bank is Python data read at run time).
STEP = "qlora_step_llama-2-7b_h200.json"
QLORA_SPEED_NO_CKPT = "results.recipe_no_ckpt.tokens_per_s/results.bf16_lora_no_ckpt.tokens_per_s"
QLORA_SPEED_CKPT = "results.recipe.tokens_per_s/results.bf16_lora.tokens_per_s"
CHECKED: list[tuple[str, str, str, str, str]] = [
    ("bank:qlora.poor", "0.80x", STEP, QLORA_SPEED_NO_CKPT, ".2f"),
    ("bank:qlora.poor", "0.93x", STEP, QLORA_SPEED_CKPT, ".2f"),
    ("bank:qlora.speed-tradeoff", "0.80x", STEP, QLORA_SPEED_NO_CKPT, ".2f"),
    ("bank:qlora.speed-tradeoff", "0.93x", STEP, QLORA_SPEED_CKPT, ".2f"),
    ("bank:qlora.peak-memory", "25.90 GB", STEP, "results.recipe_no_ckpt.peak_gb", ".2f"),
    ("bank:qlora.peak-memory", "6.86 GB", STEP, "results.recipe.peak_gb", ".2f"),
]

# Numbers that equal some committed figure by coincidence, with why they are not copies: (where, text, why).
COINCIDENCES: list[tuple[str, str, str]] = [
    ("bank:impl.param-count-check", "39,976,960", "a parameter count (Llama-2-7B, r=16, 7 projections; ANCHORS.md)"),
    ("bank:mp.bf16-eps", "1.001", "arithmetic: a number near 1 that bf16 cannot hold"),
    ("bank:qlora.speed-tradeoff", "16.2 GiB", "torchtune's published figure for Llama-3.1-8B on an RTX 4090"),
    ("05_nf4_quantisation:05-cell-046", "3.34 GB", "Llama-2-7B's projections in NF4 + DQ, computed by lora_ref.memory below"),
    ("06_qlora_on_a_gpu:06-cell-020", "41.5%", "SmolLM2's NF4 base / bf16 model, computed by lora_ref.memory in notebook 08"),
]

NUMBER = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?:\s*(%|GB|GiB|MiB|MB|ms|s)|(x))?(?![\w])")
SCALES = {None: (1,), "%": (100, 1), "GB": (1, 1e-9), "GiB": (1, 2 ** -30), "MiB": (1, 2 ** -20), "MB": (1, 1e-6),
          "s": (1,), "ms": (1,)}
TIMING = re.compile(r"(seconds|_s|_ms)(_mean\w*)?($|\.)")    # a timing (also a mean of stages: stage_seconds_mean.judge) is only compared with a number in s or ms


def _leaves(data, key=""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{key}.{k}" if key else k)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{key}.{i}")
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data) and data:
        yield key, float(data)


SETTINGS = {"r", "alpha", "batch", "seq", "blocksize", "reps", "index", "n", "jobs", "cpus", "cpu_count", "min_ms",
            "max_ms", "submissions", "cell_timeout", "budget_seconds", "steps", "batch_size", "seed", "students",
            "notebooks", "workers", "workers_per_machine"}


def committed_figures() -> list[tuple[str, str, float]]:
    """Every measured number of every result file. Anchors (other people's figures kept beside ours for the
    ratios), the run's settings and inputs copied from another result file (the cost model's per-notebook
    seconds) are not measurements of that file."""
    out = []
    for path in sorted(RESULTS.glob("*.json")) + [ROOT / "benchmarks" / "grading_speed.json"]:
        if path.exists():
            for key, v in _leaves(json.loads(path.read_text())):
                if not (re.search(r"(^|\.)(anchor|info|args|settings|shape|predicted_phases_gb|nbgrader_seconds_per_notebook)(\.|$)", key)
                        or key.rsplit(".", 1)[-1] in SETTINGS):
                    out.append((path.name, key, v))
    return out


def course_texts() -> list[tuple[str, str]]:
    """(where, text) of everything a learner reads as prose: markdown cells of course_src/ (placeholders
    removed), every drill bank item, and README.md outside its generated Results section."""
    from lora_ref.drills.bank import ITEMS

    out = []
    for src in sorted((ROOT / "course_src").glob("[0-9][0-9]_*.py")):
        nb = bn.parse(bn.PLACEHOLDER.sub("<figure>", src.read_text()), src.stem)
        out += [(f"{src.stem}:{c.id}", c.source) for c in nb.cells if c.cell_type == "markdown"]
    for it in ITEMS:
        out.append((f"bank:{it.id}", "\n".join([it.prompt, it.answer, it.source, *it.choices, *it.follow_ups])))
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(bn.README_BEGIN, 1)
    out.append(("README.md", head + rest.split(bn.README_END, 1)[1]))
    return out


def copies_of_committed_figures() -> list[tuple[str, str, str]]:
    """(where, number as typed, the committed figure it equals) for every number in the course's prose that
    equals a committed figure at the precision it is typed with: 3+ significant digits with a unit (%, GB,
    GiB, MiB, MB, s, ms, x), 4+ without one (fewer match some figure by chance)."""
    figures = committed_figures()
    hits = []
    for where, text in course_texts():
        for m in NUMBER.finditer(text):
            token, unit = m.group(1), m.group(2)      # group 3: an "x" ratio, compared as it is
            digits = token.replace(",", "").replace(".", "").lstrip("0")
            if len(digits) < (3 if unit or m.group(3) else 4):   # a bare 3-digit number matches too much by chance
                continue
            x = float(token.replace(",", ""))
            half = 0.5 * 10 ** -(len(token.split(".")[1]) if "." in token else 0)
            same = [f"{f}:{k}" for f, k, v in figures for s in SCALES[unit]
                    if abs(v * s - x) <= half * (1 + 1e-9) and (unit in ("s", "ms")) == bool(TIMING.search(k))]
            if same:
                hits.append((where, m.group(0), same[0]))
    return hits


def test_no_hand_typed_copy_of_a_committed_figure():
    known = {(w, t) for w, t, *_ in CHECKED} | {(w, t) for w, t, _ in COINCIDENCES}
    new = [h for h in copies_of_committed_figures() if (h[0], h[1]) not in known]
    assert not new, ("these numbers in the course text equal a committed result: write them as "
                     "{{result:FILE:KEY:FORMAT}} placeholders (notebooks, README), add them to CHECKED (bank), "
                     "or to COINCIDENCES with the reason:\n" + "\n".join(f"  {w}: {t!r} = {s}" for w, t, s in new))


def test_checked_figures_match_their_results():
    texts = dict(course_texts())
    for where, typed, file, key, fmt in CHECKED:
        assert where in texts, f"CHECKED names {where!r}, which is no longer in the course"
        value = bn.resolve(file, key, fmt)
        assert typed.startswith(value) or typed == value, f"{where}: text says {typed!r}, {file}:{key} gives {value!r}"
        assert typed in texts[where], f"{where}: {typed!r} is no longer in the text; update CHECKED"


def test_the_scan_finds_a_hand_typed_copy(monkeypatch):
    """The scan must be able to fail: a README line with a committed figure typed by hand is caught."""
    loss = json.loads((RESULTS / "quality_quant_cpu.json").read_text())["model"]["fp4"]["heldout_loss"]
    real = course_texts
    monkeypatch.setattr(sys.modules[__name__], "course_texts",
                        lambda: real() + [("README.md", f"FP4 reaches a held-out loss of {loss:.3f}.")])
    assert ("README.md", f"{loss:.3f}") in {(w, t) for w, t, _ in copies_of_committed_figures()}


def test_every_listed_coincidence_is_still_found():
    """The allow-list stays short: an entry that no longer matches anything is removed."""
    hits = {(w, t) for w, t, _ in copies_of_committed_figures()}
    stale = [(w, t) for w, t, _ in COINCIDENCES if (w, t) not in hits]
    assert not stale, f"COINCIDENCES entries no longer found in the text (remove them): {stale}"
