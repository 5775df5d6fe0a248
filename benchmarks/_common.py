"""Shared helpers of the benchmarks: device description, timing, JSON/PNG output, model building.

Every benchmark prints its figures beside the anchor measured in the same run (ratios), writes
``benchmarks/results/<name>_<device>.json`` (+ a PNG) and runs on the CPU with ``--small``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def pick_device(force_cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not force_cpu else "cpu")


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    gpu_memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda)
        try:
            import triton
            info["triton"] = triton.__version__
        except Exception:
            pass
    else:
        info["gpu"] = "none (CPU: " + (platform.processor() or platform.machine()) + ")"
    for mod in ("bitsandbytes", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, warmup: int = 3, reps: int = 20) -> dict:
    """Median/min/max milliseconds of ``fn()`` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def device_tag(info: dict) -> str:
    g = info.get("gpu", "cpu")
    return "cpu" if g.startswith("none") else g.lower().replace("nvidia ", "").replace(" ", "-")


def write_results(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """JSON to ``<out_dir or benchmarks/results>/<name>_<device>.json``; also copied to $OUT if set."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{device_tag(payload['info'])}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def llama_config(shape, **overrides):
    """A transformers LlamaConfig with the numbers of a ``lora_ref.memory.ModelShape``."""
    from transformers import LlamaConfig
    kw = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.n_layers,
              num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, vocab_size=shape.vocab,
              head_dim=shape.head_dim, tie_word_embeddings=shape.tied_embeddings, max_position_embeddings=4096,
              attention_dropout=0.0, use_cache=False)
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def random_llama(shape, device: torch.device, dtype=torch.bfloat16, seed: int = 0):
    """A LlamaForCausalLM with random weights (std 0.02) built directly on ``device`` (no hub)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype)


def scaled_shape(shape, n_layers: int | None = None, **kw):
    """The same shape with fewer layers (or other changes), for --small runs."""
    from dataclasses import replace
    return replace(shape, name=shape.name + ("" if n_layers is None else f"-{n_layers}L"),
                   n_layers=n_layers or shape.n_layers, **kw)
