"""QLoRA vs 16-bit LoRA on SmolLM2-135M: held-out fact accuracy on the course dataset, same steps and seed;
then what each way of deploying the QLoRA adapter costs (the PEFT merge questions, answered with numbers).

Runs (all with r=16, alpha=32, all 7 linear projections, the same adapter init, data order and steps):
  lora       dense fp32 base (the CPU stand-in for 16-bit), AdamW
  qlora      NF4 + double quantisation base (lora_ref.qlora), AdamW
  qlora-8bit the same with 8-bit AdamW state (lora_ref.optim.AdamW8bit)
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
import time

import torch
import torch.nn as nn

from _common import RESULTS, device_info, write_results

from lora_ref import lora, optim, qlora
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


def _train(model, tok, train_ex, args, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer else None
    res = train(model, tok, train_ex, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=0,
                progress=False, optimizer=opt)
    state_bytes = optim.optimizer_state_nbytes(opt) if opt is not None else 8 * sum(p.numel() for p in params)
    return {"final_train_loss": res.final_loss, "seconds": res.seconds, "optimizer_state_bytes": state_bytes,
            "trainable_params": sum(p.numel() for p in params)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="tiny random model, tiny tokenizer, 5 steps (CI)")
    ap.add_argument("--no-8bit", action="store_true", help="skip the 8-bit optimizer run")
    ap.add_argument("--fast", action="store_true",
                    help="generate (fact accuracy) only for the lora and qlora runs; loss elsewhere")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, loaded CPU more threads only contend)")
    ap.add_argument("--examples", type=int, default=None, help="use only the first N held-out examples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lora_ref.data import load_dataset
    splits = load_dataset()
    train_ex, held = list(splits.train), list(splits.heldout)[: args.examples]
    if args.small:
        from lora_ref.data import tiny_tokenizer
        from lora_ref.models import tiny_llama
        tok = tiny_tokenizer()
        load = lambda: tiny_llama(seed=0, vocab_size=tok.vocab_size if hasattr(tok, "vocab_size") else 256)  # noqa
        args.steps, held = min(args.steps, 5), held[:8]
    else:
        from lora_ref.models import load_smollm2
        _, tok = load_smollm2()
        load = lambda: load_smollm2()[0]          # noqa: E731
    info = device_info(torch.device("cpu"))
    result = {"info": info, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "heldout_examples": len(held), "train_examples": len(train_ex)}
    runs, deploy = {}, {}
    result["runs"], result["deploy"] = runs, deploy
    name = "quality_qlora" + ("_small" if args.small else "")
    partial = lambda: write_results(name + "_partial", result, args.out or RESULTS)   # noqa: E731  (if cut short)

    print("base model (no adapter)")
    base = load()
    result["base"] = _evaluate(base, tok, held, "base", accuracy=not args.fast)
    del base

    print("LoRA on the dense base")
    model = load()
    torch.manual_seed(0)
    lora.inject_lora(model, _config(args))
    runs["lora"] = {**_train(model, tok, train_ex, args), **_evaluate(model, tok, held, "lora")}
    del model
    partial()

    print("QLoRA: NF4 + double quant base")
    model = load()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    report = qlora.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
    result["quant_report"] = str(report)
    torch.manual_seed(0)
    qlora.inject_qlora(model, _config(args))
    runs["qlora"] = {**_train(model, tok, train_ex, args), **_evaluate(model, tok, held, "qlora")}
    partial()

    print("deploying the QLoRA adapter")
    deploy["adapter"] = runs["qlora"]
    errors = qlora.requantization_error(model, torch.bfloat16, original=originals)
    result["merge_weight_error"] = qlora.summarize_merge_errors(errors)
    requant = copy.deepcopy(model)
    for layer in lora.lora_layers(requant).values():
        layer.merge()                                   # QLoRALinear.merge: re-quantises to NF4
    deploy["requant"] = _evaluate(requant, tok, held, "requant", accuracy=not args.fast)
    del requant
    into_orig = load()
    with torch.no_grad():
        for layer_name, layer in lora.lora_layers(model).items():
            into_orig.get_submodule(layer_name).weight.add_(layer.delta_weight())
    deploy["orig+adapter"] = _evaluate(into_orig, tok, held, "orig+adapter", accuracy=not args.fast)
    del into_orig
    qlora.merge_for_deployment(model, torch.bfloat16)
    model.float()                                         # evaluate the bf16-rounded weights in fp32 on CPU
    deploy["merged16"] = _evaluate(model, tok, held, "merged16", accuracy=not args.fast)
    del model

    if not args.no_8bit:
        print("QLoRA with 8-bit AdamW state")
        model = load()
        qlora.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
        torch.manual_seed(0)
        qlora.inject_qlora(model, _config(args))
        runs["qlora-8bit"] = {**_train(model, tok, train_ex, args,
                                       optimizer=lambda ps: optim.AdamW8bit(ps, lr=args.lr, weight_decay=0.0)),
                              **_evaluate(model, tok, held, "qlora-8bit", accuracy=not args.fast)}
        del model

    gap = 100 * (runs["lora"]["fact_accuracy"] - runs["qlora"]["fact_accuracy"])
    result["qlora_gap_points"] = gap
    result["within_2_points"] = abs(gap) <= 2.0 or runs["qlora"]["fact_accuracy"] >= runs["lora"]["fact_accuracy"]
    path = write_results(name, result, args.out or RESULTS)
    path.with_name(path.name.replace(".json", "").replace(name, name + "_partial") + ".json").unlink(missing_ok=True)
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
             f"r={s['r']}, alpha={s['alpha']:g}, all 7 projections, {s['steps']} steps, batch {s['batch_size']}, "
             f"lr {s['lr']:g}, seed 0, same adapter init and data order in every run.", "",
             f"Base model without adapter: fact accuracy {_pct(r['base']['fact_accuracy'])}, "
             f"held-out loss {r['base']['heldout_loss']:.4f}.", "",
             "| run | fact accuracy | held-out loss | final train loss | optimizer state | train time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k, v in r["runs"].items():
        lines.append(f"| {k} | {_pct(v['fact_accuracy'], n)} | "
                     f"{v['heldout_loss']:.4f} | {v['final_train_loss']:.4f} | "
                     f"{v['optimizer_state_bytes'] / 2**20:.1f} MiB | {v['seconds']:.0f} s |")
    lines += ["", f"QLoRA - LoRA: {-r['qlora_gap_points']:+.1f} points "
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
