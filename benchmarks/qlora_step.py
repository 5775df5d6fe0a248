"""One QLoRA training step on the Llama-2-7B shape: the usual recipe vs lora_ref, same run, same GPU.

Setup (issue 3, section 5): random weights built on the GPU from a LlamaConfig (no hub); batch 4 x 512
tokens; LoRA r=16, alpha=32 on all 7 projections; gradient checkpointing; AdamW; bf16 compute; NF4 with
double quantisation, blocksize 64. Modes, each in its own process (clean peak-memory counters):

- ``recipe``: Transformers + bitsandbytes ``Linear4bit`` + PEFT, as the QLoRA recipe does it
  (``prepare_model_for_kbit_training``, then ``get_peft_model``): the anchor (5,060 tok/s, 25.87 GB).
- ``bf16_lora``: the same with a bf16 base and no quantisation (the stretch reference, 8,088 tok/s).
- ``lora_ref``: ``lora_ref.qlora`` (the course's readable QLoRA) with ``lora_ref.lora`` adapters.
- ``fast``: ``lora_ref.kernels``: Triton dequantisation into a shared scratch buffer, base + LoRA in one
  autograd node that saves only the 16-bit input, and a chunked cross-entropy; ``fast_norm`` adds
  ``fuse_rms_norms`` (one fused RMSNorm kernel instead of transformers' fp32 chain).
- ``fast_compile``: ``fast_norm`` with every decoder layer under ``torch.compile`` (the 4-bit linears opaque).
- ``fast_graph`` / ``lora_ref_graph``: ``fast_norm`` / ``lora_ref`` with the whole step (forward, backward with
  checkpointing, fused AdamW) captured once as a CUDA graph and replayed (``lora_ref.kernels.CUDAGraphStep``):
  one launch per step instead of thousands, so the CPU no longer sets the pace.
- ``recipe_liger``: the recipe with liger-kernel's Llama patches (RMSNorm, RoPE, SwiGLU, fused linear
  cross-entropy): the second anchor.
- ``recipe_no_ckpt`` / ``bf16_lora_no_ckpt``: the same recipes with gradient checkpointing OFF. The
  anchor figures (25.87 GB, 5,060 tok/s; 32.82 GB, 8,088 tok/s) match these, not the checkpointed runs:
  transformers checkpoints a layer only while ``module.training`` is True, and a model fresh from
  ``from_pretrained`` is in eval mode, so a loop that never calls ``model.train()`` trains without it.
  ``lora_ref.memory.training_memory(..., grad_checkpointing=False)`` predicts 32.77 GB for bf16 LoRA.

Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps and the warm-up (optimizer
state included), after the model is built. ``--small`` runs a 2-layer SmolLM2 shape on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

from _common import ROOT, device_info, pick_device, random_llama, scaled_shape, sync, write_results

from lora_ref import memory as M

MODES = ("recipe", "recipe_no_ckpt", "bf16_lora", "bf16_lora_no_ckpt", "lora_ref", "fast", "fast_norm",
         "fast_compile", "fast_graph", "lora_ref_graph", "recipe_liger")
GRAPH_MODES = ("fast_graph", "lora_ref_graph")        # the whole step captured as one CUDA graph
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANCHOR = {"Llama-2-7B": {"recipe": {"tokens_per_s": 5060, "peak_gb": 25.87, "step_s": 0.405},
                         "bf16_lora": {"tokens_per_s": 8088, "peak_gb": 32.82, "step_s": 0.253}},
          "SmolLM2-135M": {"recipe": {"tokens_per_s": 5639, "peak_gb": 5.31, "step_s": 0.363},
                           "bf16_lora": {"tokens_per_s": 8063, "peak_gb": 3.88, "step_s": 0.254}}}


def _quantize_bnb(model, device):
    """Replace the 7 projections by bitsandbytes Linear4bit (NF4, double quant, bf16 compute), as
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` leaves them."""
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", blocksize=64, module=new).to(device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            mod.weight = None
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        try:
            setattr(model, attr, True)
        except Exception:
            pass
    return model


def build(mode: str, shape, device):
    if mode == "recipe_liger":
        # the second anchor: the recipe with Liger's Triton kernels patched into transformers' Llama
        # (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); must run before the model is created
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    model = random_llama(shape, device)
    model.config.use_cache = False
    if mode.startswith(("recipe", "bf16_lora")):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        ckpt = not mode.endswith("_no_ckpt")
        if mode.startswith("recipe"):
            model = _quantize_bnb(model, device)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
        elif ckpt:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        loss_fn = None
    elif mode in ("lora_ref", "lora_ref_graph"):
        from lora_ref.lora import LoRAConfig
        from lora_ref.methods import prepare_model
        prepare_model(model, "qlora", LoRAConfig(r=16, alpha=32, target_modules=TARGETS), compute_dtype=torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "preserve_rng_state": mode not in GRAPH_MODES})
        loss_fn = None
    elif mode in ("fast", "fast_norm", "fast_compile", "fast_graph"):
        from lora_ref import kernels as K
        model = K.quantize_model_fast(model, r=16, alpha=32, targets=TARGETS)
        if mode in ("fast_norm", "fast_compile", "fast_graph"):
            K.fuse_rms_norms(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "preserve_rng_state": mode not in GRAPH_MODES})
        if mode == "fast_compile":
            # torch.compile of each decoder layer: Inductor fuses the glue (norms, RoPE, SwiGLU, residual
            # adds) into a few kernels; the 4-bit linears stay opaque calls into the Triton dequantiser
            import torch._dynamo as dynamo
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            K.FastQLoRALinear.forward = torch.compiler.disable(K.FastQLoRALinear.forward)
            for layer in model.model.layers:
                layer.compile(dynamic=False)

        def loss_fn(m, ids):
            inner = m.model
            h = inner(input_ids=ids).last_hidden_state
            return K.chunked_cross_entropy(h, m.lm_head.weight, ids, chunk=1024)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.train()
    return model, loss_fn


def run_mode(mode: str, shape, device, batch: int, seq: int, steps: int, warmup: int,
             profile: bool = False) -> dict:
    t0 = time.perf_counter()
    model, loss_fn = build(mode, shape, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    fused = device.type == "cuda" and mode.startswith(("lora_ref", "fast"))
    graph = device.type == "cuda" and mode in GRAPH_MODES
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused, capturable=graph) if fused else \
        torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=g).to(device)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    else:
        resident = 0

    def step():
        if loss_fn is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if graph:
        from lora_ref.kernels import CUDAGraphStep

        def eager_step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss if loss_fn is None else loss_fn(model, ids)
            loss.backward()
            opt.step()
            return loss
        step = CUDAGraphStep(eager_step, warmup=2)           # 2 eager steps, then 1 captured
    losses = []
    for _ in range(warmup):
        losses.append(float(step()))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(float(step()))        # .item() syncs each step, as a training loop logging loss does
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step()
            sync(device)
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        ev = p.key_averages()
        prof_ms = {"cpu_ms": sum(e.self_cpu_time_total for e in ev) / 1e3,
                   "cuda_ms": sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                                  for e in ev) / 1e3,
                   "kernel_launches": sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                           "cudaLaunchKernelExC", "cuLaunchKernelEx"))}
    else:
        prof_ms = {}
    out = {"mode": mode, "trainable": n_train, "step_s": step_s, "tokens_per_s": batch * seq / step_s,
           "losses": losses, "build_s": build_s, "resident_gb": resident / 1e9, **prof_ms}
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="2-layer SmolLM2 shape on the CPU (CI)")
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default="", help="modes to profile one step of (comma-separated)")
    ap.add_argument("--repeat", type=int, default=1, help="run every mode this many times (own process each)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one mode, print JSON
    args = ap.parse_args(argv)
    device = pick_device(force_cpu=args.small)
    shape = M.get_shape(args.shape)
    if args.small:
        shape = M.ModelShape("tiny-gqa", 64, 160, 2, 4, 2, 256, tied_embeddings=True)
        args.batch, args.seq, args.steps, args.warmup = 1, 32, 1, 1
    if args.one:
        try:
            res = run_mode(args.one, shape, device, args.batch, args.seq, args.steps, args.warmup,
                           profile=args.one in args.profile.split(","))
        except Exception as e:
            res = {"mode": args.one, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print("@@RESULT " + json.dumps(res))
        return res
    results = {}
    modes = [m for m in args.modes.split(",") if m]
    if args.small:
        modes = [m for m in modes if m not in ("recipe", "recipe_liger", "fast_compile")] \
            if not _bnb_cpu_ok() else [m for m in modes if m not in ("recipe_liger", "fast_compile")]
    runs = [(m, k) for k in range(args.repeat) for m in modes]        # interleaved: 1st of each, then 2nd
    for mode, k in runs:
        key = mode if k == 0 else f"{mode}#{k + 1}"
        cmd = [sys.executable, __file__, "--one", mode, "--shape", args.shape, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
               "--profile", args.profile]
        if args.small:
            cmd.append("--small")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        line = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")]
        res = json.loads(line[-1][9:]) if line else {"mode": mode, "error": proc.stderr[-3000:]}
        res["wall_s"] = time.perf_counter() - t0
        results[key] = res
        msg = res.get("error", "").splitlines()[-1:] if "error" in res else ""
        print(f"{key:18s} " + (f"ERROR {msg}" if "error" in res else
              f"{res['tokens_per_s']:8.0f} tok/s  step {res['step_s']:.3f} s  peak {res.get('peak_gb', 0):6.2f} GB"
              f"  resident {res['resident_gb']:.2f} GB  loss {res['losses'][0]:.3f}->{res['losses'][-1]:.3f}"),
              flush=True)
        if "error" in res and "traceback" in res:
            print(res["traceback"][-1500:])
        prof_lines = [l for l in proc.stdout.splitlines() if not l.startswith("@@RESULT ")]
        if mode in args.profile.split(","):
            print("\n".join(prof_lines[-40:]))
            if "cpu_ms" in res:
                print(f"{key}: profiled step: CPU {res['cpu_ms']:.0f} ms, CUDA {res['cuda_ms']:.0f} ms, "
                      f"{res['kernel_launches']} kernel launches")
    info = device_info(device)
    if device.type == "cuda":
        info["matmul_tflops"] = _matmul_tflops(device)
    flops_6nt = 6 * M.param_breakdown(shape).total * args.batch * args.seq
    lora_flops = M.training_flops(shape, args.batch * args.seq, "qlora", 16, TARGETS, seq=args.seq,
                                  grad_checkpointing=True).total
    for res in results.values():
        if "error" not in res and info.get("matmul_tflops"):
            res["mfu_6nt"] = flops_6nt / res["step_s"] / (info["matmul_tflops"] * 1e12)
            res["hfu_qlora_ckpt"] = lora_flops / res["step_s"] / (info["matmul_tflops"] * 1e12)
    kw = dict(r=16, targets=TARGETS, batch=args.batch, seq=args.seq)
    chunks = -(-args.batch * args.seq // 1024)
    pred = {"bf16_lora": M.training_memory(shape, "lora", **kw).total / 1e9,
            "bf16_lora_no_ckpt": M.training_memory(shape, "lora", grad_checkpointing=False, **kw).total / 1e9,
            "lora_ref": M.training_memory(shape, "qlora", **kw).total / 1e9,
            "fast": M.training_memory(shape, "qlora", adapter_input_copies=False, loss_chunks=chunks, **kw).total / 1e9,
            "qlora_no_ckpt": M.training_memory(shape, "qlora", grad_checkpointing=False, **kw).total / 1e9}
    summary = {}
    for mode, res in results.items():
        rec = results.get("recipe" + (mode[mode.index("#"):] if "#" in mode else ""), {})
        if "error" in res or "error" in rec or not rec:
            continue
        anchor = ANCHOR["Llama-2-7B"]["recipe"]
        summary[mode] = {"speed_vs_recipe": res["tokens_per_s"] / rec["tokens_per_s"],
                         "peak_vs_recipe": res.get("peak_gb", 0) / rec["peak_gb"] if rec.get("peak_gb") else None,
                         "speed_vs_anchor": res["tokens_per_s"] / anchor["tokens_per_s"],
                         "peak_vs_anchor": res.get("peak_gb", 0) / anchor["peak_gb"]}
    payload = {"info": info, "shape": shape.name, "batch": args.batch, "seq": args.seq, "r": 16, "alpha": 32,
               "targets": TARGETS, "results": results, "vs_recipe_same_run": summary,
               "calculator_peak_gb": pred, "anchor": ANCHOR.get("Llama-2-7B")}
    print("\n== QLoRA step, ratios to the recipe measured in this run (repeat #k against recipe #k) ==")
    for mode, s in summary.items():
        pv = f"{s['peak_vs_recipe']:.2f}x" if s["peak_vs_recipe"] else "n/a"
        mfu = results[mode].get("mfu_6nt")
        print(f"{mode:18s} speed {s['speed_vs_recipe']:.2f}x   peak memory {pv}    (vs anchor figures: speed "
              f"{s['speed_vs_anchor']:.2f}x, peak {s['peak_vs_anchor']:.2f}x)"
              + (f"   MFU(6NT) {100 * mfu:.0f}%" if mfu else ""))
    print("calculator peaks (GB):", {k: round(v, 2) for k, v in pred.items()})
    path = write_results(f"qlora_step_{shape.name}" if not args.small else "qlora_step_small", payload, args.out)
    try:
        plot(payload, path.with_suffix(".png"))
    except Exception as e:
        print(f"plot skipped: {e}")
    return payload


def _matmul_tflops(device, n: int = 8192, reps: int = 10) -> float:
    """The bf16 matmul ceiling measured in this run (random data, median of ``reps``): the MFU denominator."""
    from _common import bench
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, device, warmup=3, reps=reps)["median_ms"]
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def _bnb_cpu_ok() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        return True
    except Exception:
        return False


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = {k: v for k, v in payload["results"].items() if "error" not in v}
    if not res:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = list(res)
    axes[0].barh(names, [res[k]["tokens_per_s"] for k in names], color="#2a6")
    axes[0].set_xlabel("tokens / s")
    axes[1].barh(names, [res[k].get("peak_gb", 0) for k in names], color="#36a")
    axes[1].set_xlabel("peak GB (max_memory_allocated)")
    fig.suptitle(f"QLoRA step, {payload['shape']}, {payload['batch']}x{payload['seq']} tokens, "
                 f"{payload['info'].get('gpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
