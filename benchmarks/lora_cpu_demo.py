"""The foundation's claim, measured: LoRA teaches SmolLM2 a company's facts in a few CPU minutes.

Runs `lora-train` (base model evaluated, LoRA r=16 on all linear layers, AdamW, answer-only loss) and
writes results/lora_cpu_demo_<device>.json with the machine, the date and the figures:
held-out fact accuracy and eval loss before and after, training time, trainable parameters.

    .venv/bin/python benchmarks/lora_cpu_demo.py [--steps 120] [--device cpu]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lora_ref import training

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heldout-limit", type=int, default=None)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cli = ["--steps", str(args.steps), "--device", args.device, "--out", tmp]
        if args.heldout_limit:
            cli += ["--heldout-limit", str(args.heldout_limit)]
        training.main(cli)
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
        adapter_bytes = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    out = {
        **metrics,
        "what": "lora-train on the course dataset: base SmolLM2-135M-Instruct vs LoRA (r=16, all linear)",
        "date": dt.date.today().isoformat(),
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "load_average_at_start": round(load_before, 2),
        "wall_seconds_total": round(time.perf_counter() - t0, 1),
        "adapter_file_bytes": adapter_bytes,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "cpu" if args.device == "cpu" else args.device
    path = RESULTS / f"lora_cpu_demo_{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"base fact accuracy {out['base']['fact_accuracy']:.1%} -> LoRA {out['lora']['fact_accuracy']:.1%}; "
          f"eval loss {out['base']['eval_loss']:.2f} -> {out['lora']['eval_loss']:.2f}; "
          f"training {out['train_seconds']:.0f} s; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
