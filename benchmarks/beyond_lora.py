"""Beyond plain LoRA on SmolLM2-135M: LoRA vs DoRA vs PiSSA vs LoRA+, and LoftQ vs plain QLoRA, on the
course dataset; held-out fact accuracy and loss, several seeds (means and standard errors).

Controlled: every run has r=16, alpha=32, all 7 linear projections, the same steps, batch, data order and
(within a seed) the same adapter init where the method keeps LoRA's init. What differs is the method:
  lora      dense base, A kaiming, B = 0, AdamW at lr
  dora      lora_ref.dora (magnitude + direction), same optimizer
  pissa     lora_ref.pissa (A, B from the top-16 singular triplets, residual base)
  loraplus  lora_ref.loraplus: lr_A = lr / 2, lr_B = 16 lr_A (PEFT's advice: halve lr when using LoRA+)
  qlora     NF4 base (blocksize 64, no double quantisation: PEFT's LoftQ setting), A kaiming, B = 0
  loftq     lora_ref.loftq (T iterations) then the same NF4 base
Step 0 (before training) is measured too: PiSSA must equal the base model, LoftQ must start closer to
the 16-bit model than QLoRA. On a GPU the dense bases are bf16 (compute bf16, adapters fp32), as in
quality_qlora.py; on the CPU fp32.

    python benchmarks/beyond_lora.py --device cuda --seeds 0 1 2 --methods lora dora   # one process per method
    python benchmarks/beyond_lora.py --combine results/beyond_lora_*_h200.json          # one table
    python benchmarks/beyond_lora.py --small                                            # CI: tiny model
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from _common import RESULTS, device_info, write_results

from lora_ref import loftq, lora, loraplus, pissa, qlora
from lora_ref.training import evaluate_loss, fact_accuracy, train

METHODS = ("lora", "dora", "pissa", "loraplus", "qlora", "loftq")


def build(method: str, load, args, seed: int, compute_dtype):
    """The model of ``method`` with its adapter initialised (seeded), and its optimizer (or None)."""
    quantised = method in ("qlora", "loftq")
    model = load(torch.float32 if quantised else None)       # LoftQ's SVD and NF4 start from fp32 weights
    cfg = lora.LoRAConfig(r=args.r, alpha=args.alpha, target_modules="all-linear", use_dora=method == "dora")
    torch.manual_seed(seed)
    lora.inject_lora(model, cfg)
    if method == "pissa":
        pissa.apply_pissa(model)
    if method == "loftq":
        loftq.apply_loftq(model, num_iter=args.loftq_iter)
    if quantised:
        qlora.quantize_model(model, "nf4", double_quant=False, compute_dtype=compute_dtype)
    opt = None
    if method == "loraplus":
        opt = loraplus.create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.lr / 2, lr_ratio=16.0)
    return model, opt


def run(method: str, load, tok, train_ex, held, args, seed: int, compute_dtype) -> dict:
    model, opt = build(method, load, args, seed, compute_dtype)
    step0 = evaluate_loss(model, tok, held, batch_size=16)
    res = train(model, tok, train_ex, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                progress=False, optimizer=opt)
    out = {"seed": seed, "step0_heldout_loss": step0, "heldout_loss": evaluate_loss(model, tok, held, 16),
           "fact_accuracy": fact_accuracy(model, tok, held, max_new_tokens=32), "final_train_loss": res.final_loss,
           "seconds": res.seconds, "trainable_params": lora.count_parameters(model).trainable}
    print(f"  {method:9s} seed {seed}: step-0 loss {step0:.4f}  held-out loss {out['heldout_loss']:.4f}  "
          f"fact accuracy {100 * out['fact_accuracy']:.1f}%  ({res.seconds:.0f} s)", flush=True)
    return out


def peft_loftq_parity(load) -> dict:
    """PEFT's own loftq_init (CUDA + bitsandbytes) vs lora_ref.loftq on one real SmolLM2 weight, s = 1."""
    from peft.utils.loftq_utils import loftq_init
    W = load(torch.float32).model.layers[0].self_attn.q_proj.weight.detach().float().cuda()
    Qp, Ap, Bp = loftq_init(W, num_bits=4, reduced_rank=16, num_iter=2)
    Q, A, B = loftq.loftq_factors(W, 16, 1.0, num_iter=2)
    return {"max_abs_Q_diff": float((Q - Qp).abs().max()), "max_abs_BA_diff": float((B @ A - Bp @ Ap).abs().max()),
            "BA_norm": float((Bp @ Ap).norm())}


def summarize(result: dict) -> None:
    """Mean and standard error over seeds, and each method minus LoRA (QLoRA for LoftQ), paired by seed."""
    per = result["per_seed"]
    summary = {}
    for m, runs in per.items():
        accs = [100 * r["fact_accuracy"] for r in runs]
        s = {"n": len(runs), "accuracy_mean": statistics.mean(accs),
             "accuracy_se": statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else None,
             "heldout_loss_mean": statistics.mean(r["heldout_loss"] for r in runs),
             "step0_loss_mean": statistics.mean(r["step0_heldout_loss"] for r in runs),
             "trainable_params": runs[0]["trainable_params"]}
        ref = "qlora" if m == "loftq" else "lora"
        if m != ref and ref in per:
            by_seed = {r["seed"]: r for r in per[ref]}
            d = [100 * (r["fact_accuracy"] - by_seed[r["seed"]]["fact_accuracy"]) for r in runs if r["seed"] in by_seed]
            if d:
                s.update(vs=ref, diff_mean=statistics.mean(d),
                         diff_se=statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None)
        summary[m] = s
    result["summary"] = summary


def markdown(r: dict) -> str:
    s, n = r["settings"], r["heldout_examples"]
    se = lambda v: "-" if v is None else f"{v:.1f}"          # noqa: E731
    lines = ["# Beyond LoRA on SmolLM2-135M-Instruct: DoRA, PiSSA, LoRA+, LoftQ", "",
             f"Measured {r['info']['date']} on {r['info']['gpu']}, torch {r['info']['torch']}. Script: "
             f"benchmarks/beyond_lora.py. {r['train_examples']} training examples, {n} held-out; r={s['r']}, "
             f"alpha={s['alpha']:g}, all 7 projections, {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']:g}, "
             f"LoftQ T={s['loftq_iter']}. Base model without adapter: held-out loss {r['base']['heldout_loss']:.4f}.",
             "", "| method | seeds | fact accuracy, mean (s.e.) | minus reference, paired (s.e.) | held-out loss | "
             "step-0 loss | trainable params |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, v in r["summary"].items():
        diff = f"{v['diff_mean']:+.1f} ({se(v['diff_se'])}) vs {v['vs']}" if "diff_mean" in v else "reference"
        lines.append(f"| {m} | {v['n']} | {v['accuracy_mean']:.1f}% ({se(v['accuracy_se'])}) | {diff} | "
                     f"{v['heldout_loss_mean']:.4f} | {v['step0_loss_mean']:.4f} | {v['trainable_params']:,} |")
    if r.get("peft_loftq_parity"):
        p = r["peft_loftq_parity"]
        lines += ["", f"PEFT's loftq_init on the GPU vs lora_ref.loftq (layer 0 q_proj, r=16, T=2, s=1): "
                  f"max |Q difference| {p['max_abs_Q_diff']:.3g}, max |BA difference| {p['max_abs_BA_diff']:.3g} "
                  f"(||BA|| = {p['BA_norm']:.3g})."]
    return "\n".join(lines) + "\n"


def combine(files, out=None) -> dict:
    parts = [json.loads(Path(f).read_text()) for f in files]
    result = parts[0]
    for p in parts[1:]:
        for k in ("steps", "r", "alpha", "lr", "batch_size", "loftq_iter"):
            if p["settings"][k] != result["settings"][k]:
                raise SystemExit(f"cannot combine: setting {k} differs in {files}")
        for m, runs in p["per_seed"].items():
            result["per_seed"].setdefault(m, []).extend(runs)
        result["peft_loftq_parity"] = result.get("peft_loftq_parity") or p.get("peft_loftq_parity")
    result["per_seed"] = {m: result["per_seed"][m] for m in METHODS if m in result["per_seed"]}
    result["combined_from"] = [Path(f).name for f in files]
    summarize(result)
    path = write_results("beyond_lora", result, out or RESULTS)
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loftq-iter", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="tiny random model and tokenizer, 3 steps (CI)")
    ap.add_argument("--tag", default="", help="file name suffix (one file per parallel process)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--combine", nargs="+", metavar="JSON")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dense_dtype = torch.bfloat16 if on_gpu else torch.float32
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    from lora_ref.data import load_dataset
    splits = load_dataset()
    train_ex, held = list(splits.train), list(splits.heldout)
    if args.small:
        from lora_ref.data import tiny_tokenizer
        from lora_ref.models import tiny_llama
        tok = tiny_tokenizer()
        load = lambda dtype=None: tiny_llama(seed=0, vocab_size=tok.vocab_size).to(device, dtype or dense_dtype)  # noqa: E731
        args.steps, held, args.r, args.alpha = min(args.steps, 3), held[:4], 4, 8.0
    else:
        from lora_ref.models import load_smollm2
        _, tok = load_smollm2()
        load = lambda dtype=None: load_smollm2(dtype=dtype or dense_dtype, device=device)[0]  # noqa: E731
    result = {"info": device_info(device), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "heldout_examples": len(held), "train_examples": len(train_ex), "per_seed": {}}
    result["base"] = {"heldout_loss": evaluate_loss(load(), tok, held, 16)}
    if on_gpu and "loftq" in args.methods:
        try:                                    # needs bitsandbytes on the GPU machine (the CPU test runs PEFT's code)
            result["peft_loftq_parity"] = peft_loftq_parity(load)
        except (ImportError, ValueError, RuntimeError) as e:
            result["peft_loftq_parity_skipped"] = f"{type(e).__name__}: {e}"
        print("PEFT loftq parity:", result.get("peft_loftq_parity") or result["peft_loftq_parity_skipped"], flush=True)
    name = "beyond_lora" + ("_small" if args.small else "") + (f"_{args.tag}" if args.tag else "")
    for method in args.methods:
        for seed in args.seeds:
            result["per_seed"].setdefault(method, []).append(
                run(method, load, tok, train_ex, held, args, seed, compute_dtype))
            summarize(result)
            path = write_results(name, result, args.out or RESULTS)     # after every run: a cut-short job keeps its seeds
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
