"""Every benchmark script runs end to end on the CPU with --small (tiny sizes), so CI keeps them working.
The GPU figures themselves are committed in benchmarks/results/ (see benchmarks/README.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script, tmp_path, *extra):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--small", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, cwd=str(BENCH), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(tmp_path.glob("*.json"))
    assert files, proc.stdout[-2000:]
    return json.loads(files[0].read_text()), proc.stdout


def test_dequant_speed_small(tmp_path):
    pytest.importorskip("bitsandbytes")
    res, out = _run("dequant_speed.py", tmp_path)
    par = res["parity"]
    assert par["packed_bytes_differing"] == 0 and par["torch_vs_eager_values_differing"] == 0
    assert {"bitsandbytes", "lora_ref_eager"} <= set(res["speed"]["rows"])
    assert res["seed_loop"]["seed_extrapolated_s"] > 0 and res["seed_loop"]["lora_ref_cpu_s"] > 0
    assert "x bnb speed" in out


def test_memory_vs_measured_small(tmp_path):
    res, _ = _run("memory_vs_measured.py", tmp_path, "--methods", "full,lora,qlora")
    assert len(res["rows"]) == 3
    assert all(abs(r["error"]) < 0.05 for r in res["rows"]), res["rows"]


def test_qlora_step_small(tmp_path):
    res, out = _run("qlora_step.py", tmp_path, "--modes", "fast")
    for mode in ("fast",):
        r = res["results"][mode]
        assert "error" not in r, r.get("traceback")
        assert r["trainable"] > 0 and r["tokens_per_s"] > 0 and all(map(lambda x: x == x, r["losses"]))


def test_qlora_70b_small_streams_the_build(tmp_path):
    res, out = _run("qlora_70b.py", tmp_path, "--modes", "stream_fast_8bit,stream_lora_ref")
    for mode in ("stream_fast_8bit", "stream_lora_ref"):
        r = res["results"][mode]
        assert "error" not in r, r.get("traceback")
        assert r["trainable"] > 0 and len(r["step_s_windows"]) == 2 and all(x == x for x in r["losses"])
    assert all(res["predicted"][m]["build_peak_gb"] > 0 for m in ("recipe", "stream_fast", "stream_lora_ref"))


def test_quality_qlora_small_seeds_and_combine(tmp_path):
    """Two seeds in one process, one more in another, merged with --combine: the gap is the mean over seeds."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seeds in ((a, ["0", "1"]), (b, ["2"])):
        out.mkdir()
        _run("quality_qlora.py", out, "--no-8bit", "--seeds", *seeds)
    proc = subprocess.run([sys.executable, str(BENCH / "quality_qlora.py"), "--combine",
                           str(a / "quality_qlora_small_cpu.json"), str(b / "quality_qlora_small_cpu.json"),
                           "--out", str(c)], capture_output=True, text=True, cwd=str(BENCH), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((c / "quality_qlora_small_cpu.json").read_text())
    assert [r["seed"] for r in res["per_seed"]["lora"]] == [0, 1, 2] == res["settings"]["seeds"]
    gaps = [100 * (x["fact_accuracy"] - y["fact_accuracy"])
            for x, y in zip(res["per_seed"]["lora"], res["per_seed"]["qlora"])]
    assert res["gaps_points"] == gaps and abs(res["qlora_gap_points"] - sum(gaps) / 3) < 1e-9
    assert {"adapter", "requant", "orig+adapter", "merged16"} == set(res["deploy"])
    md = (c / "quality_qlora_small_cpu.md").read_text()
    assert "| mean |" in md and "seed 0, 1, 2" in md


def test_quality_qlora_combine_refuses_different_settings(tmp_path):
    src = tmp_path / "a"
    src.mkdir()
    _run("quality_qlora.py", src, "--no-8bit")
    res = json.loads((src / "quality_qlora_small_cpu.json").read_text())
    res["settings"]["lr"] = 123.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, str(BENCH / "quality_qlora.py"), "--combine",
                           str(src / "quality_qlora_small_cpu.json"), str(other), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, cwd=str(BENCH), timeout=120)
    assert proc.returncode != 0 and "lr" in (proc.stderr + proc.stdout)


def test_optim_speed_small_counts_state_by_hand(tmp_path):
    """State bytes against the formula: fp32 AdamW 8 B/value; 8-bit: 2 B/value + two fp32 absmax per 256-value
    block, except tensors under 4,096 values (bitsandbytes' min_8bit_size), which keep 8 B/value."""
    res, out = _run("optim_speed.py", tmp_path)
    shapes = [s for o, i in [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
              for s in ((16, i), (o, 16))] * 2
    sizes = [a * b for a, b in shapes]
    eight = sum(2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes)
    assert res["tensors"] == 28 and res["values"] == sum(sizes)
    assert res["rows"]["torch.optim.AdamW"]["state_bytes"] == 8 * sum(sizes)
    assert res["rows"]["lora_ref AdamW8bit"]["state_bytes"] == eight
    assert res["eight_bit_over_torch"] > 0 and "AdamW8bit takes" in out
