"""The fuller rank sweep behind notebook 04 (section 8): all 41 facts, more ranks, more steps.

Same method as the notebook: LoRA on every linear layer of SmolLM2's top two decoder layers, the frozen
bottom computed once (lora_ref.sweep), AdamW, batch 8, the same seed for every run; for each rank r the
scaling alpha/r with alpha=16, alpha/r with alpha=2r, and rsLoRA alpha/sqrt(r) with alpha=16. Metric: the
held-out answer loss and teacher-forced answer-token accuracy on the 82 held-out questions.

With ``--modules`` (on by default) it also compares which layers to adapt, as notebook 04 section 4 does:
q,v at r=8, q,v at r=64 (alpha/r and rsLoRA) and all linear layers at r=8, alpha=16, same steps and seed.

    .venv/bin/python benchmarks/course_rank_sweep.py            # writes benchmarks/results/course_rank_sweep.json
    .venv/bin/python benchmarks/course_rank_sweep.py --steps 20 --ranks 1 8 --out /tmp/x.json   # quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lora_ref import data, sweep
from lora_ref.lora import LoRAConfig, count_parameters, inject_lora
from lora_ref.models import load_smollm2, pick_device

OUT = Path(__file__).resolve().parent / "results" / "course_rank_sweep.json"
RULES = {"alpha/r, alpha=16": lambda r: (16.0, False),
         "alpha/r, alpha=2r": lambda r: (2.0 * r, False),
         "rsLoRA, alpha=16": lambda r: (16.0, True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--top-layers", type=int, default=2)
    ap.add_argument("--facts", type=int, default=41, help="use this many facts (seeded choice); 41 = all")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-modules", dest="modules", action="store_false",
                    help="skip the q,v vs all-linear comparison")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    device = pick_device()
    torch.manual_seed(0)
    model, tok = load_smollm2(device=device)
    splits = data.load_dataset()
    fact_ids = sorted({e.fact_id for e in splits.train})
    chosen = set(np.random.default_rng(0).choice(fact_ids, size=min(args.facts, len(fact_ids)), replace=False).tolist())
    splits = data.Splits(train=tuple(e for e in splits.train if e.fact_id in chosen),
                         heldout=tuple(e for e in splits.heldout if e.fact_id in chosen))
    first = len(model.model.layers) - args.top_layers
    layers = list(range(first, len(model.model.layers)))
    pattern = r"model\.layers\.(" + "|".join(map(str, layers)) + r")\..*"
    train_cache = sweep.cache_prefix(model, tok, splits.train, first, progress=True)
    held_cache = sweep.cache_prefix(model, tok, splits.heldout, first, progress=True)
    base_loss, base_acc = sweep.evaluate_top(model, held_cache)
    print(f"base: held-out loss {base_loss:.3f}, token accuracy {base_acc:.1%}", flush=True)

    results: dict[str, list[dict]] = {name: [] for name in RULES}
    for r in args.ranks:
        for name, rule in RULES.items():
            alpha, rs = rule(r)
            m = copy.deepcopy(model)
            inject_lora(m, LoRAConfig(r=r, alpha=alpha, target_modules=(pattern,), use_rslora=rs))
            run = sweep.train_top(m, train_cache, held_cache, steps=args.steps, lr=args.lr, batch_size=8, seed=0)
            row = {"r": r, "alpha": alpha, "rslora": rs, "trainable": count_parameters(m).trainable,
                   "eval_loss": run.eval_loss, "eval_token_accuracy": run.eval_token_accuracy,
                   "final_train_loss": sum(run.losses[-5:]) / len(run.losses[-5:]), "seconds": run.seconds}
            results[name].append(row)
            print(f"r={r:3d} {name:20s} held-out loss {run.eval_loss:.3f} acc {run.eval_token_accuracy:.1%} "
                  f"({run.seconds:.0f} s)", flush=True)
            del m

    module_runs = []
    if args.modules:
        for label, names, r, rs in (("q,v r=8", ("q_proj", "v_proj"), 8, False),
                                    ("q,v r=64", ("q_proj", "v_proj"), 64, False),
                                    ("q,v r=64 rsLoRA", ("q_proj", "v_proj"), 64, True),
                                    ("all-linear r=8", None, 8, False)):
            m = copy.deepcopy(model)
            pat = pattern if names is None else (
                r"model\.layers\.(" + "|".join(map(str, layers)) + r")\.self_attn\.(" + "|".join(names) + ")")
            inject_lora(m, LoRAConfig(r=r, alpha=16.0, target_modules=(pat,), use_rslora=rs))
            run = sweep.train_top(m, train_cache, held_cache, steps=args.steps, lr=args.lr, batch_size=8, seed=0)
            module_runs.append({"label": label, "r": r, "alpha": 16.0, "rslora": rs,
                                "trainable": count_parameters(m).trainable, "eval_loss": run.eval_loss,
                                "eval_token_accuracy": run.eval_token_accuracy, "seconds": run.seconds})
            print(f"{label:16s} trainable {module_runs[-1]['trainable']:9,d} held-out loss {run.eval_loss:.3f} "
                  f"acc {run.eval_token_accuracy:.1%}", flush=True)
            del m

    out = {"device": f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
           "command": "python benchmarks/course_rank_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "facts": sorted(chosen), "n_train": len(splits.train), "n_heldout": len(splits.heldout), "layers": layers,
           "targets": "all linear layers of the listed decoder layers", "steps": args.steps, "lr": args.lr,
           "batch_size": 8, "base_eval_loss": base_loss, "base_eval_token_accuracy": base_acc,
           "rank_sweep": results, "modules": {row["label"]: row for row in module_runs}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
