r"""QLoRA across several GPUs with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP (ZeRO stage 3, Rajbhandari et al., arXiv 1910.02054, Section 5) splits every parameter along dim 0
into N equal shards, one per rank; before a module's forward (and again before its backward) its shards
are all-gathered into the full tensor, used, and freed; gradients are reduce-scattered (averaged) so each
rank keeps only the gradient shard of its parameter shard, and the optimizer, built over the sharded
parameters (DTensors), keeps only its shard of the AdamW moments.

What is sharded, what is replicated, and why (:func:`shard_qlora_model`):

- **sharded (1/N per GPU)**: the 4-bit base (the packed NF4 codes ``weight`` and the block scales
  ``absmax`` / ``nested_absmax``: ~99.9% of the 4-bit bytes), the adapters A and B, their gradients and
  their AdamW moments, the embeddings, norms and lm_head (frozen, in the root group).
- **replicated (full copy per GPU)**: the 16-entry NF4 code book, the 256-entry double-quantisation map
  and its offset (a few KB per layer, buffers: FSDP never shards buffers, and all-gathering 1 KB costs
  more than it saves); the activations of each rank's own micro-batch; and, transiently, the all-gathered
  (unsharded) layer being computed, plus the one prefetched after it.

The trick that makes 4-bit weights shardable (Answer.AI's fsdp_qlora, bitsandbytes ``quant_storage``):
FSDP only shards *parameters*, and with mixed precision it casts every floating-point parameter to
``param_dtype`` before the all-gather. ``lora_ref.qlora.Linear4bit`` holds its codes in uint8 *buffers*
(FSDP would replicate them). :class:`ShardableLinear4bit` re-registers them as frozen
(``requires_grad=False``) parameters whose bytes are *viewed* in a storage dtype equal to the
mixed-precision ``param_dtype`` (bf16): the cast is then a no-op, no bit changes, and all parameters of a
layer flatten into one all-gather. Forward views the gathered bytes back as uint8 codes / fp32 scales and
runs the unchanged ``Linear4bit.forward`` (dequantise, matmul, dequantise again in backward).

Paper/library anchors: QLoRA (arXiv 2305.14314) Section 3; FSDP2 design (PyTorch RFC #114299, per-parameter
dim-0 sharding with DTensor); Answer.AI, "You can now train a 70b language model at home" (2024).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_ref import memory
from lora_ref.qlora import Linear4bit, decoder_layers

_SHARDED_STATE = ("weight", "absmax", "nested_absmax")      # big tensors: become frozen, sharded parameters
_REPLICATED_STATE = ("code", "nested_code", "offset")        # code books and offset: tiny, stay buffers


class ShardableLinear4bit(Linear4bit):
    """A :class:`Linear4bit` whose packed codes and block scales are frozen ``nn.Parameter`` s holding
    their *bytes* in a storage dtype (see the module docstring), so FSDP can shard them.

    The parameters are named ``weight_bytes``, ``absmax_bytes``, ``nested_absmax_bytes`` (FSDP looks
    them up by name); ``self.weight`` / ``self.absmax`` / ``self.nested_absmax`` are properties that view
    the (gathered) parameter's bytes back as the original dtype and shape, so ``Linear4bit``'s forward, dequantise and
    storage report run unchanged. Build it with :func:`make_shardable`, never directly.
    """

    def _original(self, name: str) -> torch.Tensor:
        dtype, shape, numel = self._stored[name]
        raw = self._parameters[name + "_bytes"].reshape(-1).view(torch.uint8)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return raw[:nbytes].view(dtype).view(shape)

    weight = property(lambda self: self._original("weight"))
    absmax = property(lambda self: self._original("absmax"))
    nested_absmax = property(lambda self: self._original("nested_absmax"))

    @property
    def double_quant(self) -> bool:
        return "nested_absmax" in self._stored

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the stored bytes; ``.to(dtype)`` never casts them (that would change the bits)."""
        held = {k: self._buffers.pop(k) for k in _REPLICATED_STATE if k in self._buffers}
        stored = {k: self._parameters.pop(k + "_bytes") for k in self._stored}
        nn.Module._apply(self, fn, recurse)
        device = fn(torch.zeros(1, device=stored["weight"].device)).device
        for k, t in held.items():
            self._buffers[k] = t.to(device)
        for k, p in stored.items():
            self._parameters[k + "_bytes"] = nn.Parameter(p.detach().to(device), requires_grad=False)
        return self

    def requantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError("merge a sharded QLoRA model after gathering its adapter: save it from rank 0 "
                                  "(save_sharded_adapter) and merge it into an unsharded model")


def make_shardable(layer: Linear4bit, storage_dtype: torch.dtype = torch.uint8) -> ShardableLinear4bit:
    """Turn ``layer`` into a :class:`ShardableLinear4bit` in place (no copy of the codes' values beyond a
    pad of at most ``itemsize - 1`` bytes): each tensor of ``_SHARDED_STATE`` is flattened to bytes,
    padded to a whole number of ``storage_dtype`` elements and re-registered as a frozen parameter
    ``<name>_bytes``."""
    if isinstance(layer, ShardableLinear4bit):
        return layer
    if not isinstance(layer, Linear4bit):
        raise TypeError(f"make_shardable expects a Linear4bit, got {type(layer).__name__}")
    item = torch.empty((), dtype=storage_dtype).element_size()
    layer._stored = {}
    for name in _SHARDED_STATE:
        if name not in layer._buffers:
            continue
        t = layer._buffers.pop(name)
        layer._stored[name] = (t.dtype, tuple(t.shape), t.numel())
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % item
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        layer._parameters[name + "_bytes"] = nn.Parameter(raw.view(storage_dtype), requires_grad=False)
    layer.__class__ = ShardableLinear4bit
    return layer


def default_mesh():
    """A 1-D device mesh over all ranks: CUDA (NCCL) when available, else CPU (gloo)."""
    from torch.distributed.device_mesh import init_device_mesh
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def bf16_policy():
    """QLoRA's mixed precision: compute in bf16 (params gathered in bf16), reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_qlora_model(model: nn.Module, mesh=None, mixed_precision="bf16", reshard_after_forward: bool = True,
                      activation_checkpointing: bool = False) -> nn.Module:
    """Shard a QLoRA model (``quantize_model`` + ``inject_qlora`` done) with FSDP2, in place.

    Steps: (1) every :class:`Linear4bit` becomes a :class:`ShardableLinear4bit` whose storage dtype is the
    policy's ``param_dtype`` (uint8 without mixed precision); (2) everything but the adapters is frozen;
    (3) ``fully_shard`` on each decoder layer (one all-gather per layer, freed after use), then on the
    root (embeddings, final norm, lm_head). ``mixed_precision``: ``"bf16"`` (:func:`bf16_policy`), None
    (compute in the parameters' own dtype) or a ``MixedPrecisionPolicy``. Optionally Hugging Face's
    non-reentrant activation checkpointing per layer. Afterwards every parameter is a DTensor
    ``Shard(0)`` over ``mesh``; build the optimizer over ``model.parameters()`` after this call.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group (torchrun does "
                           "the environment) before shard_qlora_model")
    if mixed_precision == "bf16":
        mixed_precision = bf16_policy()
    elif mixed_precision is None:
        mixed_precision = MixedPrecisionPolicy()
    elif not isinstance(mixed_precision, MixedPrecisionPolicy):
        raise TypeError(f"mixed_precision must be 'bf16', None or a MixedPrecisionPolicy, got {mixed_precision!r}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in trainable):
        raise ValueError("shard_qlora_model expects only LoRA adapters trainable (call inject_qlora first); "
                         f"trainable: {trainable[:4]}")
    storage = mixed_precision.param_dtype or torch.uint8
    for m in list(model.modules()):
        if isinstance(m, Linear4bit):
            make_shardable(m, storage)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = mesh if mesh is not None else default_mesh()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mixed_precision, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision, reshard_after_forward=reshard_after_forward)
    return model


def full_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> full (unsharded) adapter tensor on the CPU. A collective: every rank must call it."""
    from lora_ref.adapters import peft_key
    from lora_ref.lora import lora_layers

    out = {}
    for path, layer in lora_layers(model).items():
        for matrix in ("A", "B"):
            p = getattr(layer, f"lora_{matrix}").detach()
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[peft_key(path, matrix)] = full.to("cpu", torch.float32).contiguous()
    return out


def save_sharded_adapter(model: nn.Module, folder: str | Path, config, rank: int | None = None) -> Path | None:
    """Gather the adapter (all ranks) and write one PEFT-format folder from rank 0 (the same two files
    as ``lora_ref.adapters.save_adapter``); returns the folder on rank 0, None elsewhere."""
    from safetensors.torch import save_file
    from lora_ref.adapters import CONFIG_NAME, WEIGHTS_NAME, config_to_peft

    tensors = full_adapter_tensors(model)
    rank = dist.get_rank() if rank is None else rank
    if rank != 0:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    base = type(model).__name__.removeprefix("FSDP")        # fully_shard renames the class FSDP<Name>
    (folder / CONFIG_NAME).write_text(json.dumps(config_to_peft(config, base), indent=2, sort_keys=True) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------
# Memory per GPU for N-way sharding
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardedMemory:
    """Peak memory per GPU of a training step under N-way FSDP, in bytes (see :func:`per_gpu_memory`)."""
    n_gpus: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int
    total: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    single: memory.MemoryBreakdown | None = None

    def gb(self, what: str = "total") -> float:
        return getattr(self, what) / memory.GB

    def __str__(self) -> str:
        return (f"{self.n_gpus}-way FSDP, per GPU: weights {self.gb('weights'):.2f} + gradients "
                f"{self.gb('gradients'):.2f} + optimizer {self.gb('optimizer'):.2f} + activations "
                f"{self.gb('activations'):.2f} + gathered layers {self.gb('gathered'):.2f} -> peak "
                f"{self.gb():.2f} GB ({self.peak_phase})")


def per_gpu_memory(shape, n_gpus: int, method: str = "qlora", r: int = 16, targets="all-linear",
                   batch: int = 4, seq: int = 512, prefetch: int = 1, **kwargs) -> ShardedMemory:
    """Per-GPU peak of one step with N-way FSDP, from ``lora_ref.memory.training_memory`` (one GPU):

        phase_k / GPU = ceil(W/N) + ceil(O/N) + act_k + ceil(G_k/N) + gathered
        gathered      = (1 + prefetch) * one unsharded layer + the root's non-layer parameters  (N > 1)

    W, O: resident weights and optimizer state; G_k: gradients alive in phase k (0 at the loss and top
    of backward, all of them at the bottom and at the step, as in ``training_memory``); act_k: the
    activations of phase k for this GPU's micro-batch (``batch`` is per GPU, so activations do not
    shrink with N). One layer = its 4-bit projections (``memory.quantized_linear_bytes``) + its adapters.
    With N = 1 nothing is gathered and the figure equals ``training_memory``'s. An estimate: not yet held
    against a measured multi-GPU peak (benchmarks/fsdp_qlora.py measures it). lora/qlora only.
    """
    if method not in ("lora", "qlora"):
        raise ValueError(f"per_gpu_memory covers method 'lora' or 'qlora' (adapters on a frozen base), got {method!r}")
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n_gpus must be a positive int, got {n_gpus!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
    s = memory.get_shape(shape)
    one = memory.training_memory(s, method, r, targets, batch, seq, **kwargs)
    w, o, g = one.weights, one.optimizer, one.gradients
    grads_in = {"loss": 0, "backward_top": 0, "backward_bottom": g, "step": g}
    act = {k: v - w - o - grads_in[k] for k, v in one.phases.items()}
    c = memory.dtype_bytes(kwargs.get("dtype", "bf16"))
    a = memory.dtype_bytes(kwargs.get("adapter_dtype", "fp32"))
    pb = memory.param_breakdown(s)
    if method == "qlora":
        layer = sum(memory.quantized_linear_bytes(out * inp, kwargs.get("blocksize", 64), kwargs.get("double_quant", True))
                    for out, inp in memory.linear_shapes(s).values())
    else:
        layer = c * pb.linear // s.n_layers
    layer += a * memory.lora_param_count(s, r, targets) // s.n_layers
    gathered = 0 if n_gpus == 1 else (1 + prefetch) * layer + c * (pb.total - pb.linear)

    def shard(x: int) -> int:
        return math.ceil(x / n_gpus)

    phases = {k: shard(w) + shard(o) + act[k] + shard(grads_in[k]) + (gathered if k != "step" else 0)
              for k in one.phases}
    peak = max(phases, key=phases.get)
    return ShardedMemory(n_gpus, shard(w), shard(g), shard(o), act[peak], gathered if peak != "step" else 0,
                         phases[peak], peak, phases, one)


# ----------------------------------------------------------------------------------------------------
# torchrun entry point: python -m torch.distributed.run --nproc_per_node N -m lora_ref.fsdp ...
# ----------------------------------------------------------------------------------------------------

def build_tiny_qlora(seed: int = 0, r: int = 4, compute_dtype: torch.dtype | None = None, **overrides):
    """The tiny random Llama (``lora_ref.models.tiny_llama``), quantised to NF4 + DQ, adapters on all
    linears with B random (not zero) so that A's gradient is not zero in the first step. Identical on
    every rank for the same seed. Returns (model, LoRAConfig)."""
    from lora_ref.lora import LoRAConfig, lora_layers
    from lora_ref.models import tiny_llama
    from lora_ref.qlora import inject_qlora, quantize_model

    model = tiny_llama(seed, **overrides)
    quantize_model(model, compute_dtype=compute_dtype)
    config = LoRAConfig(r=r, alpha=2.0 * r, target_modules="all-linear")
    inject_qlora(model, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=g))
    return model, config


def causal_lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` (batch, seq) under ``model``."""
    logits = model(input_ids=tokens).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def main(argv: Iterable[str] | None = None) -> dict:
    """Train the tiny QLoRA model a few steps with N-way FSDP and save its adapter from rank 0.

    ``torchrun --nproc_per_node 2 -m lora_ref.fsdp --steps 5 --out /tmp/fsdp_adapter`` (gloo on CPU,
    NCCL on GPUs). Each rank takes ``--batch`` sequences of the global batch (a fixed random token set,
    memorised step by step); prints the rank-averaged loss per step.
    """
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="lora_ref.fsdp", description=main.__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default fp32: exact on CPU)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--out", default="fsdp_adapter", help="adapter folder written by rank 0")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        p.error("--steps and --batch must be >= 1 and --seq >= 2")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, config = build_tiny_qlora(r=args.r)
    model.to(device).train()
    shard_qlora_model(model, mixed_precision="bf16" if args.bf16 else None,
                      activation_checkpointing=args.checkpointing)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    tokens = torch.randint(0, model.config.vocab_size, (world * args.batch, args.seq),
                           generator=torch.Generator().manual_seed(1234)).to(device)
    mine = tokens[rank * args.batch:(rank + 1) * args.batch]
    losses, t0 = [], time.perf_counter()
    for _ in tqdm(range(args.steps), desc=f"FSDP x{world}", disable=rank != 0):
        loss = causal_lm_loss(model, mine)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().clone()
        dist.all_reduce(avg, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)
        losses.append(float(avg) / (1 if cuda else world))
    seconds = time.perf_counter() - t0
    folder = save_sharded_adapter(model, args.out, config, rank)
    result = {"world_size": world, "losses": losses, "seconds": seconds, "adapter": str(folder) if folder else None,
              "tokens_per_s": args.steps * world * args.batch * args.seq / seconds}
    if rank == 0:
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
