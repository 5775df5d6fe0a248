"""lora_ref.memory.training_memory against torch.cuda.max_memory_allocated (issue 3, section 4).

Three methods x model shapes, batch 4 x 512, r=16 on all 7 projections, gradient checkpointing,
bf16 compute, AdamW (fused: no temporaries), random weights built on the GPU:

- full: every parameter trainable, bf16 weights, gradients and AdamW moments (8 bytes/parameter);
- lora: ``lora_ref.lora.inject_lora`` (fp32 adapters, inputs cast to fp32 per adapter, as PEFT);
- qlora: ``lora_ref.kernels`` NF4 base (4.127 bits) + LoRA computed in bf16 (no fp32 input copies);
- qlora_ref: ``lora_ref.qlora`` when present (the course's readable QLoRA layer + lora_ref adapters).

The peak is read over steps 2-3 (steady state: optimizer state allocated, gradients set to None
between steps), which is what the calculator models. Also compared: resident memory after building
(= calculator ``weights``) and after the first step (+ ``optimizer``).

On the CPU (``--small``) there is no allocator counter: the bytes autograd saves for backward (a
saved-tensor hook, counting each storage once) over one forward pass without checkpointing are held
against the calculator's per-layer activations instead.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback

import torch

from _common import ROOT, device_info, pick_device, random_llama, scaled_shape, sync, write_results

from lora_ref import memory as M

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("full", "lora", "qlora", "qlora_ref")


def calc_kwargs(method: str) -> dict:
    """How each implementation maps onto the calculator's switches."""
    if method == "full":
        return dict(method="full")
    if method == "lora":
        return dict(method="lora", adapter_dtype="fp32")
    if method == "qlora":
        return dict(method="qlora", adapter_dtype="fp32", adapter_input_copies=False)
    return dict(method="qlora", adapter_dtype="fp32")


def build(method: str, shape, device):
    model = random_llama(shape, device)
    model.config.use_cache = False
    from lora_ref.lora import LoRAConfig
    from lora_ref.methods import prepare_model
    if method == "full":
        prepare_model(model, "full")
    elif method in ("lora", "qlora_ref"):                 # the readable lora_ref layers
        prepare_model(model, "lora" if method == "lora" else "qlora",
                      LoRAConfig(r=16, alpha=32, target_modules=TARGETS), compute_dtype=torch.bfloat16)
    elif method == "qlora":                              # the fused path of lora_ref.kernels
        from lora_ref import kernels as K
        K.quantize_model_fast(model, r=16, alpha=32, targets=TARGETS)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def measure_gpu(method: str, shape, device, batch: int, seq: int) -> dict:
    model = build(method, shape, device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()
    sync(device)
    after_first = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    sync(device)
    return {"weights": weights, "after_first_step": after_first,
            "peak": torch.cuda.max_memory_allocated(device), "trainable": sum(p.numel() for p in params)}


def measure_saved_cpu(method: str, shape, batch: int, seq: int) -> dict:
    """Bytes autograd keeps for backward after one forward without checkpointing (each storage once)."""
    model = build(method, shape, torch.device("cpu"))
    model.gradient_checkpointing_disable()
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    del out
    return {"saved_bytes": sum(seen.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU: saved-activation bytes of a tiny model")
    ap.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = pick_device(force_cpu=args.small)
    if args.small:
        args.batch, args.seq = 2, 16
        shapes = [M.ModelShape("tiny-gqa", 64, 160, 2, 4, 2, 128, tied_embeddings=True)]
    else:
        shapes = [M.get_shape(s) for s in args.shapes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if args.one:
        name, method = args.one.split(":")
        shape = next(s for s in shapes if s.name == name)
        try:
            res = measure_gpu(method, shape, device, args.batch, args.seq)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2500:]}
        print("@@RESULT " + json.dumps(res))
        return res
    rows = []
    for shape in shapes:
        for method in methods:
            kw = calc_kwargs(method)
            if method == "qlora_ref":
                try:
                    import lora_ref.qlora  # noqa: F401
                except Exception as e:
                    print(f"qlora_ref skipped: {e}")
                    continue
            if args.small:
                act = M.activation_bytes(shape, args.batch, args.seq, "bf16", kw["method"], 16, TARGETS,
                                         kw.get("adapter_dtype", "fp32"), True, 0, kw.get("adapter_input_copies"))
                meas = measure_saved_cpu(method, shape, args.batch, args.seq)
                pred = shape.n_layers * act.layer + act.head + act.loss_forward
                got = meas["saved_bytes"]
                rows.append({"shape": shape.name, "method": method, "predicted_saved": pred, "measured_saved": got,
                             "error": pred / got - 1})
                print(f"{shape.name:16s} {method:10s} saved activations predicted {pred:>10,d} B  measured "
                      f"{got:>10,d} B  ({100 * (pred / got - 1):+.1f}%)")
                continue
            cmd = [sys.executable, __file__, "--one", f"{shape.name}:{method}", "--shapes", args.shapes,
                   "--batch", str(args.batch), "--seq", str(args.seq)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            line = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")]
            meas = json.loads(line[-1][9:]) if line else {"error": proc.stderr[-2500:]}
            if "error" in meas:
                print(f"{shape.name} {method}: ERROR {meas['error'][-400:]}")
                rows.append({"shape": shape.name, "method": method, **meas})
                continue
            pred = M.training_memory(shape, r=16, targets=TARGETS, batch=args.batch, seq=args.seq, **kw)
            row = {"shape": shape.name, "method": method, "calculator_kwargs": kw,
                   "predicted_gb": pred.total / 1e9, "measured_gb": meas["peak"] / 1e9,
                   "error": pred.total / meas["peak"] - 1, "peak_phase": pred.peak_phase,
                   "predicted_weights_gb": pred.weights / 1e9, "measured_weights_gb": meas["weights"] / 1e9,
                   "predicted_after_first_gb": (pred.weights + pred.optimizer) / 1e9,
                   "measured_after_first_gb": meas["after_first_step"] / 1e9,
                   "predicted_phases_gb": {k: v / 1e9 for k, v in pred.phases.items()},
                   "trainable": meas["trainable"], "predicted_trainable": pred.n_trainable}
            rows.append(row)
            print(f"{shape.name:16s} {method:10s} predicted {row['predicted_gb']:7.3f} GB  measured "
                  f"{row['measured_gb']:7.3f} GB  ({100 * row['error']:+.1f}%)  weights "
                  f"{row['predicted_weights_gb']:.3f}/{row['measured_weights_gb']:.3f}  [{pred.peak_phase}]",
                  flush=True)
    ok = [r for r in rows if "error" in r and isinstance(r["error"], float)]
    within = sum(abs(r["error"]) <= 0.10 for r in ok)
    print(f"\n{within}/{len(ok)} configurations within 10%")
    payload = {"info": device_info(device), "batch": args.batch, "seq": args.seq, "r": 16, "targets": TARGETS,
               "rows": rows, "within_10pct": within, "n": len(ok)}
    path = write_results("memory_vs_measured" + ("_small" if args.small else ""), payload, args.out)
    if not args.small:
        try:
            plot(payload, path.with_suffix(".png"))
        except Exception as e:
            print(f"plot skipped: {e}")
    return payload


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in payload["rows"] if "predicted_gb" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['shape']}\n{r['method']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["predicted_gb"] for r in rows], 0.4, label="lora_ref.memory")
    ax.bar([i + 0.2 for i in x], [r["measured_gb"] for r in rows], 0.4, label="max_memory_allocated")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("peak GB")
    ax.legend()
    ax.set_title(f"training memory: calculator vs measured ({payload['info'].get('gpu')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
