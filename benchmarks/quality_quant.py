"""Quantisation error of NF4 vs FP4 vs int4 (blocksize 64) on SmolLM2-135M's real linear weights and on
N(0, 0.02) weights of the same shapes, plus what it does to the model (held-out answer loss).

QLoRA (arXiv 2305.14314) Table 2 orders the data types by perplexity: Int4 34.34 > FP4 (E2M1) 31.07 >
NF4+DQ 27.41 (lower is better). Here we measure weight-space error (relative Frobenius
||W - deq(q(W))|| / ||W|| over all quantised weights) and the model's held-out answer loss.

Caveat, printed with the results: SmolLM2 comes from a Q4_1 GGUF (blocks of 32, w = d * q + m with
q in 0..15), so its weights already sit on a 4-bit grid; re-quantising them is not the same experiment
as quantising bf16 pretrained weights, hence the Gaussian control. CPU only.

    python benchmarks/quality_quant.py            # SmolLM2 (writes benchmarks/results/quality_quant_cpu.*)
    python benchmarks/quality_quant.py --small    # tiny random model, seconds (CI)
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch
import torch.nn as nn

from _common import RESULTS, device_info, device_tag, write_results

from lora_ref import quant as Q
from lora_ref import qlora

TYPES = ("nf4", "fp4", "int4")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weight_errors(weights: dict[str, torch.Tensor]) -> dict:
    """Global relative Frobenius error per data type (sum of squared errors / sum of squared weights),
    and per projection kind; NF4 also with double quantisation."""
    configs = [(t, False) for t in TYPES] + [("nf4", True)]
    out = {}
    for qt, dq in configs:
        key = qt + ("+dq" if dq else "")
        sse, ssw = defaultdict(float), defaultdict(float)
        for name, w in weights.items():
            packed, state = Q.quantize_4bit(w, 64, qt, dq)
            err = (Q.dequantize_4bit(packed, state, torch.float32) - w.float()).pow(2).sum().item()
            kind = name.rsplit(".", 1)[-1] if name.rsplit(".", 1)[-1] in KINDS else "other"
            for k in ("all", kind):
                sse[k] += err
                ssw[k] += w.float().pow(2).sum().item()
        out[key] = {k: math.sqrt(sse[k] / ssw[k]) for k in sse}
    return out


def q4_1_grid_fraction(weights: dict[str, torch.Tensor], group: int = 32) -> float:
    """Fraction of aligned groups of 32 values holding at most 16 distinct values (the Q4_1 signature)."""
    hits = total = 0
    for w in weights.values():
        g = w.reshape(-1)[: w.numel() // group * group].view(-1, group)
        s = g.sort(dim=1).values
        distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
        hits += int((distinct <= 16).sum())
        total += g.shape[0]
    return hits / total


def seed_article_error(w: torch.Tensor) -> dict:
    """The article's quantiser (benchmarks/seed_loop.py) on the same values, compared flat (so that its
    (in, out) reshape bug is left out and only its table, scale and rounding are measured)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("seed_loop", RESULTS.parent / "seed_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    back = mod.seed_round_trip(w.float()).reshape(-1)
    flat = w.float().reshape(-1)
    finite = torch.isfinite(back)
    rel_finite = float((back[finite] - flat[finite]).norm() / flat[finite].norm()) if finite.any() else float("nan")
    return {"fraction_inf": float((~finite).float().mean()), "rel_error_on_finite": rel_finite,
            "rel_error": float("inf") if (~finite).any() else rel_finite}


def model_losses(load, tokenizer, examples, small: bool) -> dict:
    """Held-out answer loss of the model dense and with every linear (except lm_head) quantised."""
    from lora_ref.training import evaluate_loss
    out = {}
    for name, kw in [("fp32", None), ("nf4+dq", dict(quant_type="nf4", double_quant=True)),
                     ("nf4", dict(quant_type="nf4", double_quant=False)),
                     ("fp4", dict(quant_type="fp4", double_quant=False)),
                     ("int4", dict(quant_type="int4", double_quant=False))]:
        model = load()
        report = None
        if kw is not None:
            report = qlora.quantize_model(model, compute_dtype=torch.float32, **kw)
        t0 = time.perf_counter()
        loss = evaluate_loss(model, tokenizer, examples, batch_size=8)
        out[name] = {"heldout_loss": loss, "seconds": time.perf_counter() - t0,
                     "bytes": report.bytes_after if report else qlora.model_nbytes(model)}
        print(f"  {name:7s} held-out answer loss {loss:.4f}")
    return out


def plot_codebooks(blocksize: int = 64, n_blocks: int = 4096, seed: int = 0):
    """Plot NF4, FP4 and int4 levels over the distribution of normalised N(0, 1) weights (w / block absmax).

    The histogram is what the levels must cover: Gaussian weights divided by their block's absmax
    (``blocksize`` values per block). NF4 puts its levels at equal-probability points of that shape;
    FP4 crowds them near 0; int4 spaces them evenly. Returns the matplotlib Figure (nothing is shown).
    """
    from matplotlib.figure import Figure       # no pyplot: no global state, works headless

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_blocks, blocksize, generator=g)
    normed = (w / w.abs().amax(dim=1, keepdim=True)).reshape(-1)
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    ax.hist(normed.numpy(), bins=200, range=(-1, 1), density=True, color="0.8",
            label=f"N(0,1) weights / block absmax (blocksize {blocksize})")
    # the normal density these values follow, up to the block scale: N(0, 1/E[absmax])
    sigma = float(1.0 / w.abs().amax(dim=1).mean())
    xs = torch.linspace(-1, 1, 400)
    ax.plot(xs, torch.exp(-0.5 * (xs / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)), color="k", lw=1,
            label=f"normal density, sigma = 1/E[absmax] = {sigma:.3f}")
    top = ax.get_ylim()[1]
    for i, (name, color) in enumerate((("nf4", "C0"), ("fp4", "C1"), ("int4", "C2"))):
        levels = Q.get_code(name).unique()
        y = top * (1.05 + 0.08 * i)
        ax.vlines(levels.numpy(), 0, y, colors=color, alpha=0.35, lw=0.8)
        ax.plot(levels.numpy(), [y] * len(levels), "o", color=color, label=f"{name} ({len(levels)} levels)")
    ax.set_xlabel("normalised value (w / absmax of its block)")
    ax.set_ylabel("density")
    ax.set_title("4-bit codebooks against the weights they must represent")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot(result: dict, path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    labels = ["nf4+dq", "nf4", "fp4", "int4"]
    x = torch.arange(len(labels)).float()
    for i, (src, color) in enumerate((("gaussian", "0.6"), ("smollm2", "C0"))):
        if src not in result:
            continue
        vals = [result[src]["weight_error"][k]["all"] for k in labels]
        ax.bar((x + (i - 0.5) * 0.38).numpy(), vals, width=0.38, color=color,
               label=result[src]["label"])
        for xi, v in zip(x + (i - 0.5) * 0.38, vals):
            ax.text(float(xi), v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x.numpy(), labels)
    ax.set_ylabel("relative error ||W - deq(q(W))|| / ||W||")
    ax.set_title(f"4-bit round-trip error, blocksize 64 ({result['info']['date'][:10]}, {result['info']['gpu']})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    lines = [f"# Quantisation error: NF4 vs FP4 vs int4 (blocksize 64)",
             "", f"Measured {result['info']['date']} on {result['info']['gpu']}, torch {result['info']['torch']}, "
             f"bitsandbytes {result['info'].get('bitsandbytes', '-')}. Script: benchmarks/quality_quant.py.", "",
             "| weights | nf4+dq | nf4 | fp4 | int4 |", "| --- | --- | --- | --- | --- |"]
    for src in ("gaussian", "smollm2"):
        if src in result:
            e = result[src]["weight_error"]
            lines.append(f"| {result[src]['label']} | " + " | ".join(f"{e[k]['all']:.4f}" for k in
                                                                    ("nf4+dq", "nf4", "fp4", "int4")) + " |")
    if "smollm2" in result:
        lines += ["", "Per projection (SmolLM2, relative error):", "",
                  "| kind | nf4 | fp4 | int4 |", "| --- | --- | --- | --- |"]
        e = result["smollm2"]["weight_error"]
        for k in KINDS:
            if k in e["nf4"]:
                lines.append(f"| {k} | {e['nf4'][k]:.4f} | {e['fp4'][k]:.4f} | {e['int4'][k]:.4f} |")
    if "model" in result:
        lines += ["", f"Held-out answer loss of the whole model ({result['model_examples']} course examples, "
                  "every linear but lm_head quantised, fp32 compute):", "",
                  "| model | held-out loss | weights+buffers |", "| --- | --- | --- |"]
        for k, v in result["model"].items():
            lines.append(f"| {k} | {v['heldout_loss']:.4f} | {v['bytes'] / 2**20:.1f} MiB |")
    if "seed_article" in result:
        s = result["seed_article"]
        lines += ["", f"The seed article's quantiser on the Gaussian weights: {100 * s['fraction_inf']:.1f}% of "
                  f"values decode to +inf (its table ends in inf and its scale is absmax/7); relative error "
                  f"on the rest {s['rel_error_on_finite']:.3f}."]
    lines += ["", "Findings:", ""] + [f"- {f}" for f in result["findings"]]
    return "\n".join(lines) + "\n"


def findings(result: dict) -> list[str]:
    out = []
    for src in ("gaussian", "smollm2"):
        if src not in result:
            continue
        e = {k: v["all"] for k, v in result[src]["weight_error"].items()}
        order = " < ".join(sorted(("nf4", "fp4", "int4"), key=e.get))
        holds = e["nf4"] < e["fp4"] < e["int4"]
        out.append(f"{result[src]['label']}: {order} "
                   f"({'the paper ordering NF4 < FP4 < int4 holds' if holds else 'NOT the paper ordering NF4 < FP4 < int4'}); "
                   f"double quantisation adds {100 * (e['nf4+dq'] / e['nf4'] - 1):.2f}% to NF4's error.")
    if "gaussian" in result:
        out.append("bitsandbytes' FP4 has no level between 0.0052 and 0.167 (its subnormal is 2^-4/12, not E2M1's "
                   "0.5/6), which is why it can lose to int4 in L2 error even though the paper ranks it above int4 "
                   "by perplexity.")
    if "smollm2" in result:
        out.append(f"SmolLM2's weights come from a Q4_1 GGUF: {100 * result['smollm2']['q4_1_grid_fraction']:.1f}% of "
                   "its groups of 32 hold at most 16 distinct values, i.e. they already sit on a 4-bit grid; "
                   "the errors above are re-quantisation errors of already-quantised weights.")
    if "model" in result:
        m = result["model"]
        order = " < ".join(sorted((k for k in m if k != "fp32"), key=lambda k: m[k]["heldout_loss"]))
        out.append(f"Model held-out loss: fp32 {m['fp32']['heldout_loss']:.4f}; quantised, lowest first: {order}.")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny random model instead of SmolLM2 (CI)")
    ap.add_argument("--examples", type=int, default=48, help="held-out examples for the model loss")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, loaded CPU more threads only contend)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = device_info(torch.device("cpu"))
    result = {"info": info, "blocksize": 64}

    if args.small:
        from lora_ref.models import tiny_llama
        from lora_ref.data import tiny_tokenizer
        load, tokenizer = (lambda: tiny_llama(seed=0)), tiny_tokenizer()
        real_label = None
    else:
        from lora_ref.models import load_smollm2
        _, tokenizer = load_smollm2()
        load = lambda: load_smollm2()[0]     # noqa: E731
        real_label = "SmolLM2-135M-Instruct (from Q4_1 GGUF)"
    model = load()
    weights = {n: m.weight.detach().float() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    del model
    n_params = sum(w.numel() for w in weights.values())
    print(f"{len(weights)} linear weights, {n_params / 1e6:.1f}M values")

    g = torch.Generator().manual_seed(0)
    # the Gaussian control: the shapes of the first three blocks (21 weights) are plenty for the statistic
    first_layers = [n for n in weights if not any(f"layers.{i}." in n for i in range(3, 1000))]
    gauss = {n: torch.randn(weights[n].shape, generator=g) * 0.02 for n in first_layers}
    t0 = time.perf_counter()
    result["gaussian"] = {"label": f"N(0, 0.02), shapes of {len(gauss)} SmolLM2 weights",
                          "weight_error": weight_errors(gauss)}
    print("gaussian:", {k: round(v["all"], 4) for k, v in result["gaussian"]["weight_error"].items()},
          f"({time.perf_counter() - t0:.0f} s)")
    first = next(iter(gauss.values()))
    result["seed_article"] = seed_article_error(first)
    if real_label:
        result["smollm2"] = {"label": real_label, "weight_error": weight_errors(weights),
                             "q4_1_grid_fraction": q4_1_grid_fraction(weights)}
        print("smollm2:", {k: round(v["all"], 4) for k, v in result["smollm2"]["weight_error"].items()})
        from lora_ref.data import load_dataset
        held = list(load_dataset().heldout)[: args.examples]
        result["model_examples"] = len(held)
        result["model"] = model_losses(load, tokenizer, held, args.small)
    result["findings"] = findings(result)
    for f in result["findings"]:
        print("-", f)

    out_dir = args.out or RESULTS
    tag = device_tag(info) + ("_small" if args.small else "")
    path = write_results("quality_quant" + ("_small" if args.small else ""), result, out_dir)
    (path.with_suffix(".md")).write_text(markdown(result))
    plot(result, path.with_suffix(".png"))
    fig = plot_codebooks()
    fig.savefig(path.parent / "codebooks.png", dpi=110)
    print(f"wrote {path.with_suffix('.md')}, {path.with_suffix('.png')}, {path.parent / 'codebooks.png'}")
    return result


if __name__ == "__main__":
    main()
