"""The class-scale grading run and its cost model (issue 16): the README paragraph is the committed run's.

`benchmarks/grading_speed.py --class-scale M` writes benchmarks/results/grading_class_cpu.json; `--readme`
renders its paragraph into autograder/README.md. These tests hold the two together and check the model's
arithmetic against a hand computation, so neither the JSON nor the README can drift alone.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "results" / "grading_class_cpu.json"


def _bench():
    spec = importlib.util.spec_from_file_location("grading_speed", ROOT / "benchmarks" / "grading_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run():
    assert RUN.exists(), "run `python benchmarks/grading_speed.py --class-scale 8` and commit its JSON"
    return json.loads(RUN.read_text())


def test_the_committed_run_graded_everything_the_same_way_twice(run):
    assert run["dask_equals_pool"] is True
    assert run["submissions"] == sum(run["mix"].values()) and run["submissions"] >= 4
    assert set(run["mix"]) == set(_bench().MIX)
    assert run["machine"]["cpus"] >= 1 and run["date"][:4].isdigit()
    # the coordinator's phases are the Dask run's that graded the class (an earlier version read those of the
    # up-to-date rerun after it: no payloads and no collecting in the coordinator's cost)
    phases = run["coordinator_phases_dask"]
    assert phases["graded_now"] == run["submissions"] and phases["collect_s"] > 0
    g = _bench()
    assert run["coordinator_seconds_per_submission"] == pytest.approx(
        sum(phases[k] for k in g.PER_SUBMISSION_PHASES) / run["submissions"], abs=0.001)
    split = run["dask_task_split_mean"]
    assert sum(split.values()) == pytest.approx(run["dask_task_seconds_mean"], abs=0.2)


def test_readme_paragraph_is_rendered_from_the_committed_run(run):
    g = _bench()
    text = (ROOT / "autograder" / "README.md").read_text()
    assert g.README_START in text and g.README_END in text, "run `python benchmarks/grading_speed.py --readme`"
    block = text[text.index(g.README_START):text.index(g.README_END) + len(g.README_END)]
    assert block == g.readme_text(run), "README out of date: run `python benchmarks/grading_speed.py --readme`"


def test_cost_model_by_hand(run):
    g = _bench()
    per_notebook = {"a": 100.0, "b": 50.0}
    m = g.cost_model(run, per_notebook=per_notebook, students=1000, machines=(10, 100))
    ratio = run["dask_task_seconds_mean"] / run["seconds_per_submission"]["nbgrader_sequential"]
    worker_s = (100.0 + 50.0) * ratio * 1000
    coordinator_s = run["coordinator_seconds_per_submission"] * 2000
    for n in (10, 100):
        assert m["hours"][str(n)] == pytest.approx((worker_s / (n * run["workers"]) + coordinator_s) / 3600, abs=0.006)
    assert m["hours"]["100"] <= m["hours"]["10"]
    # the committed model is the one the README quotes
    assert run["cost_model"] == g.cost_model(run)


def test_speed_paragraph_is_rendered_from_the_committed_run():
    g = _bench()
    text = (ROOT / "autograder" / "README.md").read_text()
    assert g.SPEED_START in text and g.SPEED_END in text
    block = text[text.index(g.SPEED_START):text.index(g.SPEED_END) + len(g.SPEED_END)]
    assert block == g.speed_text(json.loads(g.SPEED_RESULT.read_text())), \
        "README out of date: run `python benchmarks/grading_speed.py --readme`"


def test_scaling_paragraph_is_rendered_from_the_committed_runs():
    g = _bench()
    runs = [json.loads(p.read_text()) for p in g.SCALING_RESULTS]
    jobs1 = json.loads(g.JOBS1_RESULT.read_text())
    for r in runs + [jobs1]:      # each level graded every solution in full: a timing of a broken set-up is no result
        for n, lv in r["levels"].items():
            assert lv["all_graded"] and len(lv["scores"]) == 1 and lv["submissions"] == int(n) * r["per_job"]
            num, den = lv["scores"][0].split("/")
            assert float(num) == float(den) > 0
            if "speedup_vs_jobs1" in lv:
                assert lv["speedup_vs_jobs1"] == pytest.approx(
                    lv["throughput_per_min"] / r["levels"]["1"]["throughput_per_min"], abs=0.01)
    assert [sorted(map(int, r["levels"])) for r in runs] == [sorted(map(int, runs[0]["levels"]))] * len(runs), \
        "the runs repeat one another: the same levels"
    text = (ROOT / "autograder" / "README.md").read_text()
    assert g.SCALING_START in text and g.SCALING_END in text
    block = text[text.index(g.SCALING_START):text.index(g.SCALING_END) + len(g.SCALING_END)]
    assert block == g.scaling_text(runs, jobs1, json.loads(g.SPEED_RESULT.read_text())), \
        "README out of date: run `python benchmarks/grading_speed.py --readme`"
