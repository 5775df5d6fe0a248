"""NF4 dequantise speed and bit parity: bitsandbytes vs lora_ref (eager, torch.compile, Triton).

Weight: 11008 x 4096 (Llama-2-7B's MLP), N(0, 0.02) in bf16, blocksize 64, double quantisation.
Effective bandwidth counts the minimum traffic: the 4-bit codes and constants read plus the 16-bit
weight written (the anchor's convention). Printed as ratios to bitsandbytes measured in the same run.

Also (issue 3, 5th bullet): the seed article's per-block Python loop quantiser, run on a slice and
extrapolated to the whole weight, against lora_ref's vectorised quantiser.

    python benchmarks/dequant_speed.py            # GPU: full size; writes benchmarks/results/
    python benchmarks/dequant_speed.py --small    # CPU-sized check (CI)
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import time

import torch

from _common import RESULTS, bench, device_info, pick_device, sync, write_results

from lora_ref import kernels as K
from lora_ref import quant as Q


def _bnb():
    try:
        import bitsandbytes.functional as BF
        return BF
    except Exception as e:  # pragma: no cover
        print(f"bitsandbytes unavailable: {e}")
        return None


def parity(W, device, BF) -> dict:
    """lora_ref quantise == bitsandbytes quantise (bytes, absmax codes, nested absmax, offset) and equal
    dequantised values, on this device."""
    p_ref, s_ref = Q.quantize_4bit(W, 64, "nf4", double_quant=True)
    out = {}
    if BF is not None:
        p_bnb, s_bnb = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        out["packed_bytes_differing"] = int((p_ref.view(-1) != p_bnb.view(-1)).sum())
        out["absmax_codes_differing"] = int((s_ref.absmax != s_bnb.absmax).sum())
        out["nested_absmax_max_abs_diff"] = float((s_ref.state2.absmax - s_bnb.state2.absmax).abs().max())
        out["offset_diff"] = float(abs(s_ref.offset - float(s_bnb.offset)))
        d_bnb = BF.dequantize_4bit(p_bnb, s_bnb)
    d_eager = Q.dequantize_4bit(p_ref, s_ref, W.dtype)
    for name, backend in (("torch", "torch"), ("triton", "triton"), ("compile", "compile")):
        if backend == "triton" and not K.triton_available(device):
            continue
        if backend == "compile" and device.type != "cuda":
            continue
        d = K.dequantize_4bit(p_ref, s_ref, W.dtype, backend=backend)
        out[f"{name}_vs_eager_values_differing"] = int((d.view(torch.int16) != d_eager.view(torch.int16)).sum())
        if BF is not None:
            d2 = K.dequantize_4bit(p_bnb, s_bnb, W.dtype, backend=backend)
            out[f"{name}_on_bnb_state_vs_bnb_values_differing"] = int(
                (d2.view(torch.int16) != d_bnb.view(torch.int16)).sum())
    if BF is not None:
        out["eager_vs_bnb_values_differing_same_codes"] = int(
            (Q.dequantize_4bit(p_bnb.cpu(), _to_ref_state(s_bnb), W.dtype).to(device).view(torch.int16)
             != d_bnb.view(torch.int16)).sum())
    return out


def _to_ref_state(s_bnb):
    """bitsandbytes' QuantState as lora_ref's (same fields), on the CPU."""
    s2 = s_bnb.state2
    st2 = Q.QuantState(absmax=s2.absmax.cpu(), shape=(s_bnb.absmax.numel(),), dtype=torch.float32,
                       blocksize=s2.blocksize, quant_type="dynamic8", code=s2.code.cpu())
    return Q.QuantState(absmax=s_bnb.absmax.cpu(), shape=tuple(s_bnb.shape), dtype=s_bnb.dtype,
                        blocksize=s_bnb.blocksize, quant_type="nf4", code=s_bnb.code.cpu(),
                        offset=float(s_bnb.offset), state2=st2)


def speed(W, device, BF, reps: int, sweep: bool) -> dict:
    n = W.numel()
    p, s = Q.quantize_4bit(W, 64, "nf4", double_quant=True)
    lay = K.layout_of(s, device)
    moved = n // 2 + s.absmax.numel() + 4 * s.state2.absmax.numel() + 2 * n      # bytes read + written
    rows = {}
    extra = {}

    def add(name, fn):
        t = bench(fn, device, warmup=3, reps=reps)
        t["GBps"] = moved / (t["median_ms"] * 1e-3) / 1e9
        rows[name] = t

    if BF is not None:
        p_b, s_b = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        add("bitsandbytes", lambda: BF.dequantize_4bit(p_b, s_b))
        rows["bitsandbytes_quantize"] = bench(
            lambda: BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4"), device,
            warmup=2, reps=max(3, reps // 4))
    add("lora_ref_eager", lambda: Q.dequantize_4bit(p, s, W.dtype))
    rows["lora_ref_quantize"] = bench(lambda: Q.quantize_4bit(W, 64, "nf4", double_quant=True), device,
                                      warmup=1, reps=max(3, reps // 4))
    if device.type == "cuda":
        add("lora_ref_compile", lambda: K.dequantize_4bit(p, lay, W.dtype, backend="compile"))
    if K.triton_available(device):
        buf = torch.empty(n, dtype=W.dtype, device=device)
        add("lora_ref_triton", lambda: K.dequantize_4bit_triton(p, lay, W.dtype, out=buf))
        if sweep:
            for bytes_, warps, pair in itertools.product((512, 1024, 2048, 4096), (2, 4, 8), (False, True)):
                add(f"tiled_B{bytes_}_w{warps}_{'pair' if pair else 'gather'}",
                    lambda b=bytes_, w=warps, pr=pair: K.dequantize_4bit_triton(
                        p, lay, W.dtype, out=buf, kernel="tiled", BYTES=b, num_warps=w, PAIR=pr))
            for bytes_, warps in itertools.product((512, 1024, 2048, 4096), (2, 4, 8)):
                add(f"outmajor_B{bytes_}_w{warps}",
                    lambda b=bytes_, w=warps: K.dequantize_4bit_triton(
                        p, lay, W.dtype, out=buf, kernel="outmajor", BYTES=b, num_warps=w))
            ref = K.dequantize_4bit_triton(p, lay, W.dtype)
            extra["outmajor_values_differing"] = int((K.dequantize_4bit_triton(
                p, lay, W.dtype, kernel="outmajor").view(-1) != ref.view(-1)).sum())
            for bytes_, warps in itertools.product((512, 1024, 2048), (4, 8)):
                add(f"flat_B{bytes_}_w{warps}_gather",
                    lambda b=bytes_, w=warps: K.dequantize_4bit_triton(
                        p, lay, W.dtype, out=buf, kernel="flat", BYTES=b, num_warps=w))
        # the copy ceiling, same bytes: a device-to-device copy of a tensor of ``moved`` bytes
        src = torch.empty(moved // 2, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        c = bench(lambda: dst.copy_(src), device, warmup=3, reps=reps)
        c["GBps"] = 2 * src.numel() * 2 / (c["median_ms"] * 1e-3) / 1e9
        rows["copy_ceiling_same_bytes_x2"] = c
    return {"numel": n, "bytes_moved": moved, "rows": rows, **extra}


def seed_loop_speedup(W, device, small: bool) -> dict:
    """The article's per-block loop (benchmarks/seed_loop.py, by the quant-core helper) on a slice,
    extrapolated linearly to the whole weight, vs lora_ref.quant.quantize_4bit on the whole weight."""
    path = RESULTS.parent / "seed_loop.py"
    if not path.exists():
        return {"skipped": "benchmarks/seed_loop.py not found"}
    spec = importlib.util.spec_from_file_location("seed_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, "seed_quantize", None) or getattr(mod, "quantize_weight", None)
    if fn is None:
        return {"skipped": f"no seed_quantize() in {path.name}: {sorted(dir(mod))}"}
    rows = 2 if small else 64
    piece = W[:rows].float().cpu()
    t0 = time.perf_counter()
    fn(piece)
    t_slice = time.perf_counter() - t0
    seed_total = t_slice * W.numel() / piece.numel()
    cpu_W = W.cpu()
    t0 = time.perf_counter()
    Q.quantize_4bit(cpu_W, 64, "nf4", double_quant=True)
    t_cpu = time.perf_counter() - t0
    res = {"slice_values": piece.numel(), "slice_s": t_slice, "seed_extrapolated_s": seed_total,
           "lora_ref_cpu_s": t_cpu, "speedup_cpu": seed_total / t_cpu}
    if device.type == "cuda":
        t = bench(lambda: Q.quantize_4bit(W, 64, "nf4", double_quant=True), device, warmup=1, reps=5)
        res["lora_ref_gpu_s"] = t["median_ms"] / 1e3
        res["speedup_gpu"] = seed_total / res["lora_ref_gpu_s"]
    return res


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {k: v for k, v in result["speed"]["rows"].items() if "GBps" in v and not k.startswith(("tiled_B", "flat_B"))}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(rows)
    ax.barh(names, [rows[k]["GBps"] for k in names], color=["#888" if "bits" in k else "#2a6" for k in names])
    ax.set_xlabel("effective GB/s (4-bit read + 16-bit write)")
    ax.set_title(f"NF4 dequantise {result['shape'][0]}x{result['shape'][1]} on {result['info'].get('gpu')}")
    for i, k in enumerate(names):
        ax.text(rows[k]["GBps"], i, f" {rows[k]['median_ms']:.3f} ms", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of Triton launch configs")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    device = pick_device(force_cpu=args.small)
    shape = (128, 256) if args.small else (11008, 4096)
    torch.manual_seed(0)
    W = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)
    BF = _bnb()
    info = device_info(device)
    result = {"info": info, "shape": shape, "parity": parity(W, device, BF),
              "speed": speed(W, device, BF, 5 if args.small else args.reps, args.sweep and not args.small),
              "seed_loop": seed_loop_speedup(W, device, args.small),
              "anchor": {"bitsandbytes_ms": 0.066, "bitsandbytes_GBps": 1705, "eager_ms": 0.62,
                         "compile_ms": 0.083, "seed_loop_s": 22}}
    rows = result["speed"]["rows"]
    base = rows.get("bitsandbytes")
    print(f"\n== NF4 dequantise {shape[0]}x{shape[1]} bf16 on {info.get('gpu')} ==")
    for k, v in sorted(rows.items(), key=lambda kv: kv[1]["median_ms"]):
        ratio = f"  {base['median_ms'] / v['median_ms']:.2f}x bnb speed" if base and "GBps" in v else ""
        gbs = f"{v['GBps']:8.0f} GB/s" if "GBps" in v else " " * 13
        print(f"{k:32s} {v['median_ms']:9.4f} ms {gbs}{ratio}")
    print("parity:", result["parity"], "; outmajor kernel values differing from the default kernel:",
          result["speed"].get("outmajor_values_differing"))
    print("seed loop:", result["seed_loop"])
    path = write_results("dequant_speed", result, args.out)
    try:
        plot(result, path.with_suffix(".png"))
    except Exception as e:  # plotting never fails a benchmark
        print(f"plot skipped: {e}")
    return result


if __name__ == "__main__":
    main()
