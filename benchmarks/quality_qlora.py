"""QLoRA vs 16-bit LoRA on SmolLM2-135M: held-out fact accuracy on the course dataset, same steps and seed;
then what each way of deploying the QLoRA adapter costs (the PEFT merge questions, answered with numbers).

Runs (all with r=16, alpha=32, all 7 linear projections, the same adapter init, data order and steps):
  lora       dense fp32 base (the CPU stand-in for 16-bit), AdamW
  qlora      NF4 + double quantisation base (lora_ref.qlora), AdamW
  qlora-8bit the same with 8-bit AdamW state (lora_ref.optim_fast.FastAdamW8bit)
Deployment of the trained qlora adapter:
  adapter    kept separate on the 4-bit base (what was trained)
  merged16   dequantise, merge in fp32, export bf16 (lora_ref.qlora.merge_for_deployment)
  requant    merge then re-quantise to NF4 (what merging into a 4-bit model does)
  orig+adapter  the adapter merged into the ORIGINAL (pre-quantisation) weights
Issue 3's bar: QLoRA within 2 points of LoRA. CPU; about half an hour on two cores.

    python benchmarks/quality_qlora.py [--steps 150] [--small]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from _common import RESULTS, device_info, write_results

from lora_ref import lora, optim, optim_fast, qlora
from lora_ref.training import evaluate_loss, fact_accuracy, train


def _config(args):
    return lora.LoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules="all-linear")


def _evaluate(model, tok, held, label, accuracy: bool = True) -> dict:
    """Held-out answer loss (one forward pass) and, unless ``accuracy`` is False, greedy fact accuracy."""
    t0 = time.perf_counter()
    loss = evaluate_loss(model, tok, held, batch_size=16)
    acc = fact_accuracy(model, tok, held, max_new_tokens=32) if accuracy else float("nan")
    print(f"  {label:14s} held-out loss {loss:.4f}  fact accuracy {100 * acc:.1f}%  ({time.perf_counter() - t0:.0f} s)")
    return {"heldout_loss": loss, "fact_accuracy": acc}


def _train(model, tok, train_ex, args, seed: int = 0, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer else None
    res = train(model, tok, train_ex, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                progress=False, optimizer=opt)
    state_bytes = optim.optimizer_state_nbytes(opt) if opt is not None else 8 * sum(p.numel() for p in params)
    out = {"final_train_loss": res.final_loss, "seconds": res.seconds, "optimizer_state_bytes": state_bytes,
           "trainable_params": sum(p.numel() for p in params), "seed": seed}
    if res.peak_memory_bytes:
        out["peak_memory_bytes"] = res.peak_memory_bytes
    return out


def _quantize(model, compute_dtype):
    """NF4 + double quantisation of every linear layer but lm_head; returns the originals and the report."""
    # kept on the CPU: a GPU copy would add the dense weights to the QLoRA run's peak memory
    originals = {n: m.weight.detach().to("cpu", copy=True) for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    report = qlora.quantize_model(model, "nf4", double_quant=True, compute_dtype=compute_dtype)
    return originals, report


def _deployments(model, originals, load, tok, held, args, on_gpu: bool) -> tuple[dict, dict]:
    """The four ways to deploy a trained QLoRA adapter, evaluated; and their weight-space errors."""
    deploy = {}
    errors = qlora.summarize_merge_errors(qlora.requantization_error(model, torch.bfloat16, original=originals))
    requant = copy.deepcopy(model)
    for layer in lora.lora_layers(requant).values():
        layer.merge()                                   # QLoRALinear.merge: re-quantises to NF4
    deploy["requant"] = _evaluate(requant, tok, held, "requant", accuracy=not args.fast)
    del requant
    into_orig = load()
    with torch.no_grad():
        for layer_name, layer in lora.lora_layers(model).items():
            w = into_orig.get_submodule(layer_name).weight
            w.add_(layer.delta_weight().to(w.dtype))
    deploy["orig+adapter"] = _evaluate(into_orig, tok, held, "orig+adapter", accuracy=not args.fast)
    del into_orig
    qlora.merge_for_deployment(model, torch.bfloat16)
    if not on_gpu:
        model.float()                                     # evaluate the bf16-rounded weights in fp32 on CPU
    deploy["merged16"] = _evaluate(model, tok, held, "merged16", accuracy=not args.fast)
    return deploy, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="repeat the lora and qlora runs with each seed (adapter init and data order) and "
                         "report the mean gap: one run of 82 questions has a standard error of ~5 points")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 base for LoRA, bf16 compute "
                                                    "for QLoRA, as in the QLoRA paper)")
    ap.add_argument("--small", action="store_true", help="tiny random model, tiny tokenizer, 5 steps (CI)")
    ap.add_argument("--no-8bit", action="store_true", help="skip the 8-bit optimizer run")
    ap.add_argument("--fast", action="store_true",
                    help="generate (fact accuracy) only for the lora and qlora runs; loss elsewhere")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, loaded CPU more threads only contend)")
    ap.add_argument("--examples", type=int, default=None, help="use only the first N held-out examples")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="no training: merge the per-seed runs of several result files (runs made in parallel, "
                         "the first file's headline runs and deployments kept) and write the combined result")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    # 16-bit LoRA on a GPU: bf16 frozen weights (adapters stay fp32, bf16 autocast); the CPU stand-in is fp32
    base_dtype = torch.bfloat16 if on_gpu else torch.float32
    from lora_ref.data import load_dataset
    splits = load_dataset()
    train_ex, held = list(splits.train), list(splits.heldout)[: args.examples]
    if args.small:
        from lora_ref.data import tiny_tokenizer
        from lora_ref.models import tiny_llama
        tok = tiny_tokenizer()
        vocab = tok.vocab_size if hasattr(tok, "vocab_size") else 256
        load = lambda: tiny_llama(seed=0, vocab_size=vocab).to(device=device, dtype=base_dtype)  # noqa: E731
        args.steps, held = min(args.steps, 5), held[:8]
    else:
        from lora_ref.models import load_smollm2
        _, tok = load_smollm2()
        load = lambda: load_smollm2(dtype=base_dtype, device=device)[0]          # noqa: E731
    info = device_info(device)
    result = {"info": info, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "heldout_examples": len(held), "train_examples": len(train_ex),
              "base_dtype": str(base_dtype).replace("torch.", "")}
    runs, deploy, per_seed = {}, {}, {"lora": [], "qlora": []}
    result["runs"], result["deploy"], result["per_seed"] = runs, deploy, per_seed
    name = "quality_qlora" + ("_small" if args.small else "")
    partial = lambda: write_results(name + "_partial", result, args.out or RESULTS)   # noqa: E731  (if cut short)

    print("base model (no adapter)")
    base = load()
    result["base"] = _evaluate(base, tok, held, "base", accuracy=not args.fast)
    del base

    for i, seed in enumerate(args.seeds):
        print(f"seed {seed}: LoRA on the dense {result['base_dtype']} base")
        model = load()
        torch.manual_seed(seed)
        lora.inject_lora(model, _config(args))
        per_seed["lora"].append({**_train(model, tok, train_ex, args, seed), **_evaluate(model, tok, held, "lora")})
        del model

        print(f"seed {seed}: QLoRA on the NF4 + double quant base")
        model = load()
        originals, report = _quantize(model, torch.bfloat16 if on_gpu else torch.float32)
        result["quant_report"] = str(report)
        torch.manual_seed(seed)
        qlora.inject_qlora(model, _config(args))
        per_seed["qlora"].append({**_train(model, tok, train_ex, args, seed), **_evaluate(model, tok, held, "qlora")})
        partial()
        if i == 0:                                       # the first seed's runs are the headline rows
            runs["lora"], runs["qlora"] = per_seed["lora"][0], per_seed["qlora"][0]
            print("deploying the QLoRA adapter")
            deploy["adapter"] = runs["qlora"]
            more, result["merge_weight_error"] = _deployments(model, originals, load, tok, held, args, on_gpu)
            deploy.update(more)
        del model, originals

    if not args.no_8bit:
        print("QLoRA with 8-bit AdamW state")
        model = load()
        _quantize(model, torch.bfloat16 if on_gpu else torch.float32)
        torch.manual_seed(args.seeds[0])
        qlora.inject_qlora(model, _config(args))
        runs["qlora-8bit"] = {**_train(model, tok, train_ex, args, args.seeds[0],
                                       optimizer=lambda ps: optim_fast.FastAdamW8bit(ps, lr=args.lr, weight_decay=0.0)),
                              **_evaluate(model, tok, held, "qlora-8bit", accuracy=not args.fast)}
        del model

    _summarize(result)
    path = write_results(name, result, args.out or RESULTS)
    path.with_name(path.name.replace(".json", "").replace(name, name + "_partial") + ".json").unlink(missing_ok=True)
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def _summarize(result: dict) -> None:
    """The bar: the mean over seeds of LoRA - QLoRA fact accuracy, in points, at most 2."""
    per_seed = result["per_seed"]
    gaps = [100 * (a["fact_accuracy"] - b["fact_accuracy"]) for a, b in zip(per_seed["lora"], per_seed["qlora"])]
    result["gaps_points"] = gaps
    result["qlora_gap_points"] = gap = statistics.mean(gaps)     # LoRA - QLoRA, mean over seeds
    result["gap_standard_error"] = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None
    result["within_2_points"] = gap <= 2.0           # QLoRA at most 2 points below LoRA (above is fine)


def combine(files, out=None) -> dict:
    """Merge result files of the same settings but different seeds into one result (JSON + markdown)."""
    import json
    from pathlib import Path
    parts = [json.loads(Path(f).read_text()) for f in files]
    result = parts[0]
    keys = ("steps", "r", "alpha", "lr", "batch_size", "device")
    for p in parts[1:]:
        differ = [k for k in keys if p["settings"].get(k) != result["settings"].get(k)]
        if differ:
            raise SystemExit(f"cannot combine: settings {differ} differ between {files[0]} and another file")
        seen = {r["seed"] for r in result["per_seed"]["lora"]}
        for k in ("lora", "qlora"):
            result["per_seed"][k] += [r for r in p["per_seed"][k] if r["seed"] not in seen]
        for k, v in p["runs"].items():
            result["runs"].setdefault(k, v)                 # e.g. the 8-bit run, made in another process
    result["settings"]["seeds"] = [r["seed"] for r in result["per_seed"]["lora"]]
    result["combined_from"] = [Path(f).name for f in files]
    _summarize(result)
    name = "quality_qlora" + ("_small" if result["settings"].get("small") else "")
    path = write_results(name, result, out or RESULTS)
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def _pct(acc: float, n: int | None = None) -> str:
    if acc != acc:                                   # nan: not measured (--fast)
        return "not measured"
    return f"{100 * acc:.1f}%" + (f" ({round(acc * n)}/{n})" if n else "")


def markdown(r: dict) -> str:
    n = r["heldout_examples"]
    s = r["settings"]
    lines = ["# QLoRA vs LoRA on SmolLM2-135M-Instruct: held-out fact accuracy", "",
             f"Measured {r['info']['date']} on {r['info']['gpu']}, torch {r['info']['torch']}. "
             f"Script: benchmarks/quality_qlora.py. {r['train_examples']} training examples, {n} held-out; "
             f"base {r.get('base_dtype', 'float32')}, r={s['r']}, alpha={s['alpha']:g}, all 7 projections, {s['steps']} steps, batch {s['batch_size']}, "
             f"lr {s['lr']:g}, seed {', '.join(str(x) for x in s.get('seeds', [0]))}; within a seed, the same adapter init "
             "and data order in every run.", "",
             f"Base model without adapter: fact accuracy {_pct(r['base']['fact_accuracy'])}, "
             f"held-out loss {r['base']['heldout_loss']:.4f}.", "",
             "| run | fact accuracy | held-out loss | final train loss | optimizer state | peak memory | train time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, v in r["runs"].items():
        peak = f"{v['peak_memory_bytes'] / 2**30:.2f} GiB" if v.get("peak_memory_bytes") else "-"
        lines.append(f"| {k} | {_pct(v['fact_accuracy'], n)} | "
                     f"{v['heldout_loss']:.4f} | {v['final_train_loss']:.4f} | "
                     f"{v['optimizer_state_bytes'] / 2**20:.1f} MiB | {peak} | {v['seconds']:.0f} s |")
    ps = r.get("per_seed", {})
    if len(ps.get("lora", [])) > 1:
        lines += ["", "Every seed (adapter init and data order), fact accuracy:", "",
                  "| seed | lora | qlora | qlora - lora |", "| --- | --- | --- | --- |"]
        for a, b in zip(ps["lora"], ps["qlora"]):
            lines.append(f"| {a['seed']} | {_pct(a['fact_accuracy'], n)} | {_pct(b['fact_accuracy'], n)} | "
                         f"{100 * (b['fact_accuracy'] - a['fact_accuracy']):+.1f} |")
        m = lambda k: sum(x["fact_accuracy"] for x in ps[k]) / len(ps[k])     # noqa: E731
        lines.append(f"| mean | {_pct(m('lora'))} | {_pct(m('qlora'))} | {0.0 - r['qlora_gap_points']:+.1f} "
                     f"(standard error {r['gap_standard_error']:.1f}) |")
    lines += ["", f"QLoRA - LoRA: {0.0 - r['qlora_gap_points']:+.1f} points "
              f"({'within' if r['within_2_points'] else 'NOT within'} the 2-point bar). {r.get('quant_report', '')}",
              "", "Deploying the trained QLoRA adapter:", "",
              "| deployment | fact accuracy | held-out loss |", "| --- | --- | --- |"]
    for k, v in r["deploy"].items():
        lines.append(f"| {k} | {_pct(v['fact_accuracy'], n)} | {v['heldout_loss']:.4f} |")
    e = r["merge_weight_error"]
    lines += ["", "Weight-space cost of each deployment, as a fraction of the adapter's update ||s B A|| "
              "(mean over layers): "
              f"bf16 merge {e['merged_16bit']:.3f}, re-quantised merge {e['requantized']:.3f}, "
              f"merge into the original weights {e['merged_into_original']:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
