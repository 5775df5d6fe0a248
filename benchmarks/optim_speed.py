"""8-bit AdamW (lora_ref.optim_fast.FastAdamW8bit, the fast lora_ref.optim.AdamW8bit) against torch.optim.AdamW on SmolLM2-135M's LoRA adapters.

The adapters of r=16 on all 7 projections of 30 layers: 420 tensors, 4,884,480 values (A is (16, in), B is
(out, 16)), random gradients of size 1e-3. Prints ms per optimizer step for both in the same run, their ratio,
and the bytes of optimizer state.

    python benchmarks/optim_speed.py [--device cuda] [--threads 1] [--small]
"""
from __future__ import annotations

import argparse

import torch

from _common import bench, device_info, write_results

from lora_ref import optim, optim_fast

# SmolLM2-135M: (out, in) of q, k, v, o, gate, up, down
PROJECTIONS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def lora_params(layers: int, r: int, device) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(layers):
        for out_f, in_f in PROJECTIONS:
            for shape in ((r, in_f), (out_f, r)):
                p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.01).to(device))
                p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
                params.append(p)
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="2 layers, 3 repetitions (CI)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.small:
        args.layers, args.reps = 2, 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {}
    for name, make in (("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
                       ("lora_ref AdamW8bit", lambda ps: optim_fast.FastAdamW8bit(ps, lr=1e-3))):
        params = lora_params(args.layers, 16, device)
        opt = make(params)
        rows[name] = {**bench(opt.step, device, warmup=2, reps=args.reps),
                      "state_bytes": optim.optimizer_state_nbytes(opt)}
    n = sum(p.numel() for p in params)
    ratio = rows["lora_ref AdamW8bit"]["median_ms"] / rows["torch.optim.AdamW"]["median_ms"]
    result = {"info": {**device_info(device), "threads": args.threads}, "tensors": len(params), "values": n,
              "rows": rows, "eight_bit_over_torch": ratio}
    for name, r in rows.items():
        print(f"{name:20s} {r['median_ms']:8.2f} ms/step (min {r['min_ms']:.2f})  state {r['state_bytes'] / n:.2f} B/param")
    print(f"{len(params)} tensors, {n:,} values: AdamW8bit takes {ratio:.2f}x the time of torch's AdamW, "
          f"with {rows['lora_ref AdamW8bit']['state_bytes'] / rows['torch.optim.AdamW']['state_bytes']:.2f}x its state")
    write_results("optim_speed" + ("_small" if args.small else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
