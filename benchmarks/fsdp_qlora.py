"""QLoRA with FSDP2 (lora_ref.fsdp) across N GPUs: tokens/s, scaling efficiency, per-GPU peak memory.

Runs under torchrun (one process per GPU); without torchrun it runs as world size 1. JSON on stdout and
in --out, with device, torch version and date. The GPU runs of issue 18 (need 1, 2 GPUs of one host):

    # 7B shape, 1 GPU (baseline), then 2 GPUs with the scaling efficiency against it
    torchrun --nproc_per_node 1 benchmarks/fsdp_qlora.py --shape llama-2-7b --out benchmarks/results/fsdp_7b_x1.json
    torchrun --nproc_per_node 2 benchmarks/fsdp_qlora.py --shape llama-2-7b --baseline benchmarks/results/fsdp_7b_x1.json \\
        --out benchmarks/results/fsdp_7b_x2.json
    # 70B shape on 2 GPUs: per-GPU training peak (the claim: at most 24 GB)
    torchrun --nproc_per_node 2 benchmarks/fsdp_qlora.py --shape llama-2-70b --batch 1 --seq 512 --checkpointing \\
        --out benchmarks/results/fsdp_70b_x2.json

CPU check (tiny model, gloo): ``python benchmarks/fsdp_qlora.py --shape tiny --steps 2 --warmup 1``.

Method: random weights of the shape (``lora_ref.qlora.build_quantized``: NF4 + double quantisation, bf16
compute, built one layer at a time), LoRA r=16 on all linears, AdamW, bf16 mixed precision, random tokens.
Each rank builds the whole 4-bit model on its own GPU and then shards it, so the *build* peak is one
full 4-bit model per GPU (fine on an H200, not on a 24 GB card; fsdp_qlora loads on rank 0 and
broadcasts instead); the reported ``peak_gb`` is the training peak, measured after
``torch.cuda.reset_peak_memory_stats()`` once the model is sharded. ``predicted_gb`` is
``lora_ref.fsdp.per_gpu_memory`` for the same configuration.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from lora_ref import fsdp, memory


def _llama_config(shape: memory.ModelShape):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                       num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                       tie_word_embeddings=shape.tied_embeddings, max_position_embeddings=4096)


def build(shape_name: str, r: int, device: torch.device):
    """(model, LoRAConfig): the tiny test model, or a preset shape built quantised with random weights."""
    from lora_ref.lora import LoRAConfig
    from lora_ref.qlora import build_quantized, inject_qlora

    if shape_name == "tiny":
        model, config = fsdp.build_tiny_qlora(r=r, compute_dtype=torch.bfloat16 if device.type == "cuda" else None)
        return model.to(device), config
    shape = memory.get_shape(shape_name)
    model = build_quantized(_llama_config(shape), device=device, dtype=torch.bfloat16,
                            progress=int(os.environ.get("RANK", 0)) == 0)
    config = LoRAConfig(r=r, alpha=2.0 * r, target_modules="all-linear")
    inject_qlora(model, config)
    return model, config


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", help=f"'tiny' or a lora_ref.memory preset: {sorted(memory.PRESETS)}")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--baseline", help="JSON of the same run on 1 GPU: adds scaling_efficiency")
    p.add_argument("--out", help="write the JSON here (rank 0)")
    args = p.parse_args(argv)
    if args.shape != "tiny" and args.shape not in memory.PRESETS:
        p.error(f"unknown --shape {args.shape!r}")
    if min(args.batch, args.seq - 1, args.steps, args.r) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --r must be >= 1, --seq >= 2, --warmup >= 0")
    from tqdm.auto import tqdm

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:                       # plain python: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, config = build(args.shape, args.r, device)
    model.train()
    fsdp.shard_qlora_model(model, mixed_precision="bf16" if cuda else None,
                           activation_checkpointing=args.checkpointing)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=cuda)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for step in tqdm(range(args.warmup + args.steps), desc=f"{args.shape} FSDP x{world}", disable=rank != 0):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
        tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        loss = fsdp.causal_lm_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / memory.GB if cuda else None
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    result = {
        "benchmark": "fsdp_qlora", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "world_size": world, "shape": args.shape, "batch_per_gpu": args.batch,
        "seq": args.seq, "r": args.r, "checkpointing": args.checkpointing, "steps": args.steps,
        "warmup": args.warmup, "mixed_precision": "bf16" if cuda else "fp32",
        "tokens_per_s": args.steps * world * args.batch * args.seq / seconds, "seconds": seconds,
        "peak_gb_per_rank": peaks, "peak_gb": max(peaks) if cuda else None,
        "losses": losses,
    }
    if args.shape != "tiny":
        result["predicted_gb"] = fsdp.per_gpu_memory(args.shape, world, r=args.r, batch=args.batch, seq=args.seq,
                                                     grad_checkpointing=args.checkpointing).gb()
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        if base.get("world_size") != 1 or base.get("shape") != args.shape:
            raise SystemExit(f"--baseline {args.baseline} is not a world-size-1 run of {args.shape}")
        result["baseline_tokens_per_s"] = base["tokens_per_s"]
        result["scaling_efficiency"] = result["tokens_per_s"] / (world * base["tokens_per_s"])
    if rank == 0:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
