"""benchmarks/beyond_lora.py: the committed GPU comparison is what the script computes from its per-seed
runs, and the script runs end to end on the tiny model (CI)."""
import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import beyond_lora  # noqa: E402

COMMITTED = BENCH / "results" / "beyond_lora_h200.json"


def test_committed_summary_recomputes_from_per_seed_runs():
    r = json.loads(COMMITTED.read_text())
    again = copy.deepcopy(r)
    beyond_lora.summarize(again)
    assert again["summary"] == r["summary"]
    assert set(r["per_seed"]) == set(beyond_lora.METHODS)
    assert all(len(v) >= 2 for v in r["per_seed"].values())          # a standard error needs two seeds
    assert (BENCH / "results" / "beyond_lora_h200.md").read_text() == beyond_lora.markdown(r)
    # paired by seed: DoRA minus LoRA is the mean of the per-seed differences
    lora = {x["seed"]: x["fact_accuracy"] for x in r["per_seed"]["lora"]}
    d = [100 * (x["fact_accuracy"] - lora[x["seed"]]) for x in r["per_seed"]["dora"]]
    assert r["summary"]["dora"]["diff_mean"] == pytest.approx(sum(d) / len(d))


def test_small_run_pissa_starts_at_the_base(tmp_path):
    """(LoftQ's step-0 advantage is tested on weights in test_loftq.py: on a random tiny model the loss of a
    near-uniform predictor does not follow the weight error.)"""
    res = beyond_lora.main(["--small", "--methods", "pissa", "qlora", "loftq", "--seeds", "0", "--steps", "1",
                            "--loftq-iter", "2", "--out", str(tmp_path)])
    base = res["base"]["heldout_loss"]
    s = res["summary"]
    assert s["pissa"]["step0_loss_mean"] == pytest.approx(base, abs=1e-4)
    assert s["qlora"]["step0_loss_mean"] != base and s["loftq"]["n"] == 1    # quantised: another start
    assert (tmp_path / "beyond_lora_small_cpu.json").exists()
