"""NF4 vs FP4 vs int4 on weights that were never 4-bit: a small Llama trained from scratch on the course data.

benchmarks/quality_quant.py measures the held-out loss of SmolLM2 quantised with each 4-bit type, but the
course's SmolLM2 comes from a Q4_1 GGUF: its weights already sit on a 4-bit grid, so what it measures is the
error of *re-quantising* 4-bit weights, and there FP4 came out ahead of NF4 on the model's loss although NF4
has the smaller weight error. This script removes that confound: it trains a scaled-down Llama (SmolLM2's
architecture, random init, fp32, every weight trainable) on the course's training questions until its
held-out answer loss has dropped, so that its weights have never been rounded to any grid, then quantises
every linear layer (blocksize 64, fp32 compute, the tied embedding/head left dense as in the SmolLM2 run) with
each data type and measures the held-out answer loss again. Several seeds, because one small model on 82
questions is a noisy measurement: the ordering is a finding only if it holds in every seed.

QLoRA's Table 2 (arXiv 2305.14314, Section 4) is the published version of this experiment: mean Pile-CC
perplexity of 125M-13B pretrained models quantised without fine-tuning, Int4 34.34 > FP4 (E2M1) 31.07 >
NF4 + DQ 27.41. A model trained for a few minutes on 410 questions is far from those models; this measures
what quantising fresh (never 4-bit) weights does, not a reproduction of the table.

    python benchmarks/quality_quant_fresh.py                  # 3 seeds, ~25 min on a loaded 2-core CPU
    python benchmarks/quality_quant_fresh.py --steps 20 --seeds 0 --out /tmp/q   # a smoke run (tests)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from _common import RESULTS, device_info, write_results
from quality_quant import q4_1_grid_fraction, weight_errors

from lora_ref import qlora
from lora_ref.data import load_dataset, tiny_tokenizer
from lora_ref.models import tiny_llama
from lora_ref.training import evaluate_loss, train

FORMATS = {"nf4+dq": dict(quant_type="nf4", double_quant=True), "nf4": dict(quant_type="nf4", double_quant=False),
           "fp4": dict(quant_type="fp4", double_quant=False), "int4": dict(quant_type="int4", double_quant=False)}
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


def one_seed(seed: int, steps: int, lr: float, batch_size: int, tokenizer, splits) -> dict:
    """Train one model from scratch, then the held-out loss dense and quantised with each format."""
    model = tiny_llama(seed=seed, vocab_size=len(tokenizer), **SHAPE)
    init = linear_weights(model)
    res = train(model, tokenizer, splits.train, steps=steps, lr=lr, batch_size=batch_size, warmup_steps=steps // 10,
                seed=seed, progress=True)
    weights = linear_weights(model)
    moved = sum((weights[n] - init[n]).norm().item() ** 2 for n in weights) ** 0.5 / \
        sum(w.norm().item() ** 2 for w in init.values()) ** 0.5
    out = {"seed": seed, "train_seconds": res.seconds, "final_train_loss": statistics.mean(res.losses[-10:]),
           "params": sum(p.numel() for p in model.parameters()), "relative_change_from_init": moved,
           "q4_1_grid_fraction": q4_1_grid_fraction(weights), "weight_error": weight_errors(weights),
           "heldout_loss": {"fp32": evaluate_loss(model, tokenizer, splits.heldout)}}
    for name, kw in FORMATS.items():
        q = copy.deepcopy(model)
        qlora.quantize_model(q, compute_dtype=torch.float32, **kw)
        out["heldout_loss"][name] = evaluate_loss(q, tokenizer, splits.heldout)
    order = sorted(FORMATS, key=lambda k: out["heldout_loss"][k])
    out["order_by_loss"] = order
    print(f"seed {seed}: train loss {out['final_train_loss']:.3f} after {steps} steps ({res.seconds:.0f} s); "
          f"held-out " + ", ".join(f"{k} {v:.4f}" for k, v in out["heldout_loss"].items()) + f"; order {order}")
    return out


def summarise(runs: list[dict]) -> dict:
    names = ["fp32", *FORMATS]
    mean = {k: statistics.mean(r["heldout_loss"][k] for r in runs) for k in names}
    increase = {k: statistics.mean(r["heldout_loss"][k] - r["heldout_loss"]["fp32"] for r in runs) for k in FORMATS}
    werr = {k: statistics.mean(r["weight_error"][k]["all"] for r in runs) for k in FORMATS}
    orders = [tuple(r["order_by_loss"]) for r in runs]
    return {"mean_heldout_loss": mean, "mean_loss_increase": increase, "mean_weight_error": werr,
            "order_by_mean_loss": sorted(FORMATS, key=lambda k: mean[k]),
            "order_by_weight_error": sorted(FORMATS, key=lambda k: werr[k]),
            "same_order_every_seed": len(set(orders)) == 1,
            "nf4_below_fp4_every_seed": all(r["heldout_loss"]["nf4"] < r["heldout_loss"]["fp4"] for r in runs),
            "nf4_below_int4_every_seed": all(r["heldout_loss"]["nf4"] < r["heldout_loss"]["int4"] for r in runs),
            "fp4_below_int4_every_seed": all(r["heldout_loss"]["fp4"] < r["heldout_loss"]["int4"] for r in runs)}


def markdown(result: dict) -> str:
    s, info = result["summary"], result["info"]
    lines = ["# 4-bit data types on weights that were never 4-bit (a small Llama trained from scratch)", "",
             f"Measured {info['date']} on {info['gpu']}, torch {info['torch']}. Script: benchmarks/quality_quant_fresh.py. "
             f"Model: SmolLM2's architecture scaled down ({result['shape']}), {result['runs'][0]['params']:,} "
             f"parameters, trained from random init for {result['steps']} steps (batch {result['batch_size']}, lr "
             f"{result['lr']}) on the {result['train_examples']} training questions; held-out answer loss on "
             f"{result['heldout_examples']}; every linear but the tied head quantised, blocksize 64, fp32 compute.", "",
             "| seed | fp32 | nf4+dq | nf4 | fp4 | int4 | order (lowest first) | weights on a 4-bit grid |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        h = r["heldout_loss"]
        lines.append(f"| {r['seed']} | {h['fp32']:.4f} | {h['nf4+dq']:.4f} | {h['nf4']:.4f} | {h['fp4']:.4f} | "
                     f"{h['int4']:.4f} | {' < '.join(r['order_by_loss'])} | {r['q4_1_grid_fraction']:.1%} |")
    m = s["mean_heldout_loss"]
    lines += [f"| mean | {m['fp32']:.4f} | {m['nf4+dq']:.4f} | {m['nf4']:.4f} | {m['fp4']:.4f} | {m['int4']:.4f} | "
              f"{' < '.join(s['order_by_mean_loss'])} | |", "",
              "Relative weight error (mean over seeds): " +
              ", ".join(f"{k} {v:.4f}" for k, v in s["mean_weight_error"].items()) +
              f" (order {' < '.join(s['order_by_weight_error'])}).", "",
              f"Same order in every seed: {s['same_order_every_seed']}; NF4 below FP4 in every seed: "
              f"{s['nf4_below_fp4_every_seed']}; NF4 below int4: {s['nf4_below_int4_every_seed']}; FP4 below int4: "
              f"{s['fp4_below_int4_every_seed']}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU more only contend)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, splits = tiny_tokenizer(), load_dataset()
    t0 = time.perf_counter()
    runs = [one_seed(s, args.steps, args.lr, args.batch_size, tokenizer, splits) for s in args.seeds]
    result = {"info": device_info(torch.device("cpu")), "shape": SHAPE, "steps": args.steps, "lr": args.lr,
              "batch_size": args.batch_size, "train_examples": len(splits.train),
              "heldout_examples": len(splits.heldout), "seconds": time.perf_counter() - t0, "runs": runs,
              "summary": summarise(runs)}
    path = write_results("quality_quant_fresh", result, args.out or RESULTS)
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
