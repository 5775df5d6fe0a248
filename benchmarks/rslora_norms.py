"""How big does a LoRA update get as the rank r grows, with alpha/r and with rsLoRA's alpha/sqrt(r)?

Notebooks 02 and 04 tell the rsLoRA story from this measurement. Real AdamW steps on a real loss: LoRA on
one real layer of SmolLM2-135M, the MLP down projection of its last decoder layer (1536 -> 576), trained
on Velora Cycles answers (the answer-only language-model loss of notebook 03) with the same seed, batches,
learning rate and alpha for every run. Only r and the scaling rule change.

Why it is cheap and still exact: down_proj is the last matmul before the output head, and it acts on each
token separately. So the hidden state leaving the last layer is ``o + s B A u`` where ``o`` (the frozen
model's last-layer output) and ``u`` (down_proj's input) do not depend on the adapter. We run the frozen
model once, keep ``o`` and ``u`` at the positions that carry loss, and a training step is
``norm(o + s B A u) -> lm_head -> cross-entropy`` (checked against the full model's loss at the start).

Measured at a few checkpoints:

- ``update_fro``: ||s B A||_F, the Frobenius norm of delta W;
- ``output_change``: ||u (s B A)^T|| / ||u|| on held-out inputs u: how much the adapter changes what the
  layer computes on real data;
- ``random_dir_change``: the same on random Gaussian inputs (a typical direction, not the data's);
- ``B_fro``: ||B||_F (B starts at zero);
- the training loss and, at the end, the held-out answer loss.

    .venv/bin/python benchmarks/rslora_norms.py                  # writes benchmarks/results/rslora_norms_cpu.json
    .venv/bin/python benchmarks/rslora_norms.py --steps 20 --ranks 1 8 --out /tmp/x.json   # quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_info  # noqa: E402

from lora_ref import data  # noqa: E402
from lora_ref.lora import LoRALinear  # noqa: E402
from lora_ref.models import configure_cpu_threads, load_smollm2, pick_device  # noqa: E402


@torch.no_grad()
def cache_last_down_proj(model, tok, examples, batch_size: int = 8):
    """Per example: (o, u, targets) at the positions that predict an answer token.

    o: (n, d) output of the last decoder layer (before the final norm); u: (n, 1536) input of its down_proj;
    targets: (n,) the next tokens. A Hugging Face causal LM predicts token t+1 at position t.
    """
    layer = model.model.layers[-1]
    got = {}
    h1 = layer.mlp.down_proj.register_forward_hook(lambda m, a, out: got.__setitem__("u", a[0]))
    h2 = layer.register_forward_hook(lambda m, a, out: got.__setitem__("o", out[0] if isinstance(out, tuple) else out))
    device = next(model.parameters()).device
    rows = []
    try:
        for i in tqdm(range(0, len(examples), batch_size), desc="frozen forward", leave=False):
            enc = [data.encode_example(tok, e) for e in examples[i:i + batch_size]]
            batch = data.collate(enc, tok.pad_token_id)
            model.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            labels = batch["labels"].to(device)
            for j in range(len(enc)):
                keep = labels[j, 1:] != data.IGNORE_INDEX
                rows.append((got["o"][j, :-1][keep].clone(), got["u"][j, :-1][keep].clone(), labels[j, 1:][keep].clone()))
    finally:
        h1.remove()
        h2.remove()
    return rows


def head_loss(model, lora: LoRALinear, o, u, targets) -> torch.Tensor:
    """Cross-entropy of norm(o + s B A u) through the head: the model's loss with LoRA on the last down_proj."""
    delta = lora.scaling * (u @ lora.lora_A.T) @ lora.lora_B.T
    logits = model.lm_head(model.model.norm(o + delta))
    return F.cross_entropy(logits.float(), targets)


def stack(rows, idx):
    return [torch.cat([rows[i][k] for i in idx]) for k in range(3)]


@torch.no_grad()
def measure(lora: LoRALinear, u_held: torch.Tensor) -> dict[str, float]:
    dw = lora.delta_weight().float()                     # s B A, (out, in)
    # a seed no run uses for A (the same stream would correlate z with A's rows)
    z = torch.randn(u_held.shape, generator=torch.Generator().manual_seed(2**31 - 1))
    return {"update_fro": dw.norm().item(),
            "output_change": ((u_held @ dw.T).norm() / u_held.norm()).item(),
            "random_dir_change": ((z @ dw.T).norm() / z.norm()).item(),
            "B_fro": lora.lora_B.float().norm().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[1, 3, 10, 30, 100, 200])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=2, help="examples per step (each ~15 answer positions)")
    ap.add_argument("--facts", type=int, default=6, help="train on this many facts (seeded choice); 41 = all")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    checkpoints = sorted({c for c in args.checkpoints if c <= args.steps} | {args.steps})

    start = time.perf_counter()
    device = pick_device()
    threads = configure_cpu_threads()
    model, tok = load_smollm2(device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    splits = data.load_dataset()
    fact_ids = sorted({e.fact_id for e in splits.train})
    chosen = set(np.random.default_rng(0).choice(fact_ids, size=min(args.facts, len(fact_ids)), replace=False).tolist())
    train = [e for e in splits.train if e.fact_id in chosen]
    held = [e for e in splits.heldout if e.fact_id in chosen]
    train_rows = cache_last_down_proj(model, tok, train)
    held_rows = cache_last_down_proj(model, tok, held)
    o_h, u_h, t_h = stack(held_rows, range(len(held_rows)))

    # exactness: at B = 0 the cached path gives the full model's answer-only loss
    probe = [data.encode_example(tok, e) for e in held[:4]]
    batch = data.collate(probe, tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     labels=batch["labels"].to(device)).loss.item()
        lay0 = LoRALinear(model.model.layers[-1].mlp.down_proj, r=1)
        cached = head_loss(model, lay0, *stack(held_rows, range(4))).item()
    assert abs(full - cached) < 1e-4, f"cached path {cached} != full model loss {full}"
    print(f"cached path = full model's loss at B=0: {cached:.5f} vs {full:.5f}")

    runs = []
    configs = [(r, rs) for r in args.ranks for rs in ((False,) if r == 1 else (False, True))]  # r=1: same s
    for r, rs in tqdm(configs, desc="runs"):
        torch.manual_seed(r)                              # the same A for both scalings at a given rank
        lora = LoRALinear(model.model.layers[-1].mlp.down_proj, r=r, alpha=args.alpha, use_rslora=rs)
        params = [lora.lora_A, lora.lora_B]
        opt = torch.optim.AdamW(params, lr=args.lr)
        rng = random.Random(0)
        order: list[int] = []
        losses: list[float] = []
        row = {"r": r, "rslora": rs, "scaling": lora.scaling, "points": []}
        for step in range(1, args.steps + 1):
            if len(order) < args.batch_size:
                fresh = list(range(len(train_rows)))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[:args.batch_size], order[args.batch_size:]
            loss = head_loss(model, lora, *stack(train_rows, idx))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step in checkpoints:
                point = {"step": step, **measure(lora, u_h), "train_loss": float(np.mean(losses[-10:]))}
                if step == args.steps:
                    with torch.no_grad():
                        point["eval_loss"] = head_loss(model, lora, o_h, u_h, t_h).item()
                row["points"].append(point)
        last = row["points"][-1]
        print(f"r={r:3d} {'rsLoRA ' if rs else 'alpha/r'} s={lora.scaling:7.3f}: ||sBA||_F {last['update_fro']:.4f} "
              f"output change {last['output_change']:.4f} random-dir {last['random_dir_change']:.4f} "
              f"held-out loss {last['eval_loss']:.3f}", flush=True)
        runs.append(row)

    def at(r: int, rs: bool, step: int) -> dict:
        rows = [row for row in runs if row["r"] == r and (row["rslora"] == rs or r == 1)]
        return next(p for p in rows[0]["points"] if p["step"] == step)

    lo, hi = min(args.ranks), max(args.ranks)
    summary = {}
    for step in checkpoints:
        s = summary.setdefault(f"step{step}", {})
        for rs, name in ((False, "alpha_r"), (True, "rslora")):
            for key in ("update_fro", "output_change", "random_dir_change"):
                s[f"{name}_{key}_ratio"] = at(hi, rs, step)[key] / at(lo, rs, step)[key]
    info = device_info(device)
    info["threads"] = threads
    payload = {"info": info, "date": info["date"], "device": info["gpu"], "seconds": time.perf_counter() - start,
               "command": "python benchmarks/rslora_norms.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "model": "SmolLM2-135M-Instruct", "module": f"model.layers.{len(model.model.layers) - 1}.mlp.down_proj",
               "facts": sorted(chosen), "n_train": len(train), "n_heldout": len(held),
               "n_train_positions": sum(len(r[2]) for r in train_rows), "steps": args.steps,
               "checkpoints": checkpoints, "alpha": args.alpha, "lr": args.lr, "batch_size": args.batch_size,
               "ranks": args.ranks, "r_min": lo, "r_max": hi, "rank_ratio": hi / lo,
               "sqrt_rank_ratio": math.sqrt(hi / lo), "summary": summary, "runs": runs}
    out = args.out or RESULTS / ("rslora_norms_" + ("cpu" if device.type == "cpu" else "gpu") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out} ({payload['seconds']:.0f} s)")
    for step in checkpoints:
        print(f"  step {step:3d}, r={hi} vs r={lo}: " + ", ".join(f"{k} {v:.3g}" for k, v in summary[f'step{step}'].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
