"""Parameters, FLOPs and training memory of Llama-family models, for full fine-tuning, LoRA and QLoRA.

Every figure is a short function with named intermediates and a cited formula, so that a learner can
redo it by hand and an interviewer can ask for it. ``benchmarks/memory_vs_measured.py`` holds
:func:`training_memory` against ``torch.cuda.max_memory_allocated`` on a GPU.

Shapes follow ``nn.Linear``: a projection is (out_features, in_features); a LoRA adapter on it adds
A (r, in) and B (out, r), i.e. r * (in + out) parameters (LoRA, arXiv 2106.09685, Section 4.1).

What the seed article's ``analyze_lora_complexity`` / ``analyze_qlora_memory`` get wrong, and what this
module does instead:

1. *Only attention is counted.* ``4 * d_model * d_model`` per layer is q, k, v, o of a model without
   grouped-query attention. It drops the MLP (gate, up, down: 3 * hidden * intermediate, two thirds of
   a Llama layer), the embeddings and the norms, so "Llama-2-7B" comes out at 2.1B parameters instead of
   6.74B. :func:`param_count` counts every tensor; :func:`linear_shapes` is GQA-aware (k and v are
   n_kv_heads * head_dim wide: 1024, not 4096, in Llama-3-8B).
2. *"params + grads + Adam states = 4 x weights".* That is 2 + 2 + 2 + 2 bytes per parameter: pure
   fp16 weights, gradients AND Adam moments. Nobody trains like that (fp16 second moments underflow,
   small updates vanish below fp16 resolution). Mixed-precision Adam keeps fp32 master weights and fp32
   moments: 2 (fp16/bf16 weights) + 2 (grads) + 4 (master) + 4 (m) + 4 (v) = 16 bytes per parameter
   (ZeRO, arXiv 1910.02054, Section 3.1), i.e. 8 x the fp16 weights, not 4 x. Pure-bf16 training with a
   bf16 AdamW (what ``torch.optim.AdamW`` does on bf16 parameters) is 8 bytes; both are options here
   (``master_weights``). With ``master_weights=True`` :func:`training_memory` counts 18, not 16: it keeps
   the gradients in fp32, on the master copy (as when the optimizer owns fp32 parameters and the bf16
   weights are a cast of them), where ZeRO's 16 assumes 16-bit gradients.
3. *No activations.* At the article's batch 32 x 2048 tokens, Llama-2-7B keeps 17 GB of layer inputs
   even with gradient checkpointing, and about 374 GB of activations without it (11.7 GB per layer):
   they, not the adapter, decide whether LoRA fits. :func:`activation_bytes` counts them op by op.
4. *QLoRA weights = 0.5 byte per parameter.* NF4 also stores one absmax per 64-value block: 32 bits /
   64 = 0.5 bit per parameter, 0.127 with double quantisation (QLoRA, arXiv 2305.14314, Section 3).
   And the embeddings, the lm_head and the norms stay 16-bit (262M parameters = 0.52 GB in Llama-2-7B).
   The article then compares QLoRA *training* memory with fp16 *inference weights*: apples and oranges.
5. *"Compute reduction: 128x".* Its FLOPs count only multiply-accumulates of the attention projections
   in the forward pass (a MAC is 2 FLOPs; the backward pass is twice the forward), and its "LoRA FLOPs"
   are only the adapters' own matmuls. But LoRA still runs the frozen W forward and back-propagates
   through it; it saves only the weight gradients, one third of the 6N training FLOPs per token
   (Kaplan et al., arXiv 2001.08361, Section 2.1). :func:`training_flops` gives 4N + 6 N_lora for LoRA:
   about 1.5x less compute than full fine-tuning, consistent with the LoRA paper's "25% speedup during
   training on GPT-3 175B" (Section 4.2), not 128x.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ._checks import as_int, check_choice, check_int

PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS: tuple[str, ...] = PROJECTIONS[:4]
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "sgd")

_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family decoder that decide its size (a Hugging Face ``config.json`` subset).

    ``head_dim`` defaults to ``hidden // n_heads``; k and v projections are ``n_kv_heads * head_dim``
    wide (grouped-query attention, Ainslie et al., arXiv 2305.13245). ``qkv_bias``: Qwen2 adds biases to
    q, k and v. ``tied_embeddings``: lm_head shares the input embedding matrix (SmolLM2, Qwen2.5-0.5B).
    """

    name: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    head_dim: int | None = None
    tied_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for f in ("hidden", "intermediate", "n_layers", "n_heads", "n_kv_heads", "vocab"):
            v = getattr(self, f)
            if as_int(v) is None or v <= 0:
                raise ValueError(f"ModelShape.{f} must be a positive int, got {v!r}")
            object.__setattr__(self, f, as_int(v))         # plain int (np.int64 from a sweep is fine)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.hidden % self.n_heads:
                raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        elif self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelShape":
        """Read a transformers ``LlamaConfig``-like object (or a dict of config.json)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
            lambda k, d=None: getattr(config, k, d))
        n_heads = get("num_attention_heads")
        return cls(
            name=name or get("_name_or_path") or get("model_type") or "model",
            hidden=get("hidden_size"), intermediate=get("intermediate_size"),
            n_layers=get("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads") or n_heads, vocab=get("vocab_size"),
            head_dim=get("head_dim"), tied_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=bool(get("attention_bias", False)) or get("model_type") == "qwen2",
        )


# Values from each model's config.json on the Hugging Face hub (hidden_size, intermediate_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings).
PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tied_embeddings=True),
    ModelShape("smollm2-360m", 960, 2560, 32, 15, 5, 49152, tied_embeddings=True),
    ModelShape("smollm2-1.7b", 2048, 8192, 24, 32, 32, 49152, tied_embeddings=True),
    ModelShape("tinyllama-1.1b", 2048, 5632, 22, 32, 4, 32000),
    ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, head_dim=64, tied_embeddings=True),
    ModelShape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    ModelShape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    ModelShape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    ModelShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    ModelShape("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
    ModelShape("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    ModelShape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied_embeddings=True, qkv_bias=True),
    ModelShape("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
)}


def get_shape(shape: ModelShape | str) -> ModelShape:
    """A preset by name, or the shape itself."""
    if isinstance(shape, ModelShape):
        return shape
    if shape not in PRESETS:
        raise KeyError(f"unknown model shape {shape!r}; presets: {sorted(PRESETS)}")
    return PRESETS[shape]


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of "fp32" / "bf16" / "fp16" or a torch floating dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"expected a floating dtype, got {dtype}")
        return torch.finfo(dtype).bits // 8
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)} or a torch dtype")
    return _DTYPE_BYTES[dtype]


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """``"all-linear"``/``"all"`` -> the 7 projections; ``"attention"`` -> q,k,v,o; else validate names."""
    if isinstance(targets, str):
        if targets in ("all-linear", "all"):
            return PROJECTIONS
        if targets == "attention":
            return ATTENTION_PROJECTIONS
        targets = (targets,)
    out = tuple(dict.fromkeys(targets))
    bad = [t for t in out if t not in PROJECTIONS]
    if bad or not out:
        raise ValueError(f"unknown LoRA target(s) {bad or out!r}; choose from {PROJECTIONS} or 'all-linear'")
    return out


def linear_shapes(shape: ModelShape | str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the 7 projections of ONE decoder layer, GQA-aware.

    q: (n_heads*head_dim, hidden); k, v: (n_kv_heads*head_dim, hidden); o: (hidden, n_heads*head_dim);
    gate, up: (intermediate, hidden); down: (hidden, intermediate).
    """
    s = get_shape(shape)
    return {
        "q_proj": (s.q_dim, s.hidden), "k_proj": (s.kv_dim, s.hidden), "v_proj": (s.kv_dim, s.hidden),
        "o_proj": (s.hidden, s.q_dim),
        "gate_proj": (s.intermediate, s.hidden), "up_proj": (s.intermediate, s.hidden),
        "down_proj": (s.hidden, s.intermediate),
    }


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts by role; ``total`` equals ``sum(p.numel() for p in model.parameters())``."""

    embedding: int       # vocab * hidden
    lm_head: int         # vocab * hidden, 0 when tied
    linear: int          # the 7 projections of all layers (what QLoRA quantises)
    bias: int            # q/k/v biases (Qwen2)
    norm: int            # 2 RMSNorm weights per layer + the final norm
    total: int


def param_breakdown(shape: ModelShape | str) -> ParamBreakdown:
    s = get_shape(shape)
    per_layer_linear = sum(o * i for o, i in linear_shapes(s).values())
    embedding = s.vocab * s.hidden
    lm_head = 0 if s.tied_embeddings else s.vocab * s.hidden
    linear = s.n_layers * per_layer_linear
    bias = s.n_layers * (s.q_dim + 2 * s.kv_dim) if s.qkv_bias else 0
    norm = s.n_layers * 2 * s.hidden + s.hidden
    return ParamBreakdown(embedding, lm_head, linear, bias, norm, embedding + lm_head + linear + bias + norm)


def param_count(shape: ModelShape | str) -> int:
    """All parameters: embeddings + lm_head (unless tied) + L * (7 projections + biases + 2 norms) + final norm.

    Llama-2-7B: 131,072,000 + 131,072,000 + 32 * 202,383,360 + 4,096 = 6,738,415,616.
    """
    return param_breakdown(shape).total


def lora_param_count(shape: ModelShape | str, r: int, targets: str | Iterable[str] = "all-linear") -> int:
    """Trainable LoRA parameters: n_layers * sum over targets of r * (in + out)  (LoRA, Section 4.1).

    Llama-2-7B, r=16, q,k,v,o: 32 * 4 * 16 * (4096 + 4096) = 16,777,216; all 7: 39,976,960.
    SmolLM2-135M, r=16, all 7: 30 * 16 * (2*1152 + 2*768 + 3*2112) = 4,884,480.
    """
    if as_int(r) is None or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    r = as_int(r)
    s = get_shape(shape)
    shapes = linear_shapes(s)
    return s.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in resolve_targets(targets))


def lora_param_count_for_dims(hidden: int, intermediate: int, n_layers: int, n_heads: int, n_kv_heads: int,
                              r: int, targets: str | Iterable[str] = ("q_proj", "v_proj")) -> int:
    """:func:`lora_param_count` for a Llama-family model given by its config numbers (vocab plays no part);
    notebook 01's ``lora_param_count``. Grouped-query attention: k and v are n_kv_heads * head_dim wide."""
    shape = ModelShape("custom", hidden, intermediate, n_layers, n_heads, n_kv_heads, vocab=1)
    return lora_param_count(shape, r, targets if isinstance(targets, str) else tuple(targets))


def _peft_key_names(shape: ModelShape, targets: tuple[str, ...]) -> list[tuple[str, tuple[int, int]]]:
    from .adapters import peft_key          # PEFT's key format has one home (adapters.py), both directions
    group = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    shapes = linear_shapes(shape)
    out = []
    for layer in range(shape.n_layers):
        for t in targets:
            o, i = shapes[t]
            path = f"model.layers.{layer}.{group[t]}.{t}"
            out.append((peft_key(path, "A"), (0, i)))       # (r, in); r filled in below
            out.append((peft_key(path, "B"), (o, 0)))       # (out, r)
    return out


def adapter_file_bytes(shape: ModelShape | str, r: int, targets: str | Iterable[str] = "all-linear",
                       dtype: str | torch.dtype = "fp32") -> int:
    """Exact size of PEFT's ``adapter_model.safetensors`` for a LoRA adapter on a Llama-family model.

    safetensors layout: 8-byte little-endian header length, a JSON header padded with spaces to a
    multiple of 8, then the raw tensors. PEFT saves ``{"format": "pt"}`` metadata and keys like
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; the library writes tensors sorted
    by (dtype, name), offsets in that order. Data bytes = lora_param_count * dtype bytes.
    """
    s = get_shape(shape)
    nbytes = dtype_bytes(dtype)
    dt = {4: "F32", 2: "BF16" if str(dtype) in ("bf16", "bfloat16", "torch.bfloat16") else "F16"}[nbytes]
    entries = []
    for key, (o, i) in _peft_key_names(s, resolve_targets(targets)):
        entries.append((key, [r, i] if o == 0 else [o, r]))
    entries.sort(key=lambda e: e[0])
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shp in entries:
        n = shp[0] * shp[1] * nbytes
        header[key] = {"dtype": dt, "shape": shp, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


# --------------------------------------------------------------------------------------------- FLOPs

@dataclass(frozen=True)
class FlopBreakdown:
    """Training FLOPs for ``tokens`` tokens (one FLOP = one multiply or one add; a MAC is 2)."""

    forward: float
    backward: float
    recompute: float      # the extra forward of gradient checkpointing
    total: float
    per_token: float
    matmul_params: int    # N: weights that take part in a matmul per token (7 projections + lm_head)
    trainable: int


def training_flops(shape: ModelShape | str, tokens: int, method: str = "full", r: int = 16,
                   targets: str | Iterable[str] = "all-linear", seq: int = 2048,
                   grad_checkpointing: bool = False) -> FlopBreakdown:
    """FLOPs of training on ``tokens`` tokens: 6N per token for full fine-tuning, 4N + 6N_lora for LoRA.

    Per token and per weight of a matmul: forward 2 FLOPs (one MAC), backward 4: 2 for the gradient of
    the input (needed by every layer below) and 2 for the gradient of the weight (Kaplan et al., arXiv
    2001.08361, Section 2.1: C = 6N per token). Attention scores add 12 * L * n_heads * head_dim * seq
    per token (PaLM, arXiv 2204.02311, Appendix B), unchanged by LoRA.

    LoRA freezes W: its weight gradient (2N) is skipped, the input gradient is not. Each adapter adds
    r*(in+out) weights to the forward (2), input-gradient (2) and weight-gradient (2) matmuls, so
    LoRA = 4N + 6 N_lora per token. QLoRA does the same matmuls (plus dequantisation, which is memory
    traffic, not FLOPs). Gradient checkpointing recomputes the forward once more (+2N + 2N_lora + 4LHQT).
    N counts the lm_head matmul but not the embedding lookup.
    """
    check_choice("method", method, METHODS)
    check_int("tokens", tokens, minimum=1)
    check_int("seq", seq, minimum=1)
    s = get_shape(shape)
    pb = param_breakdown(s)
    n = pb.linear + s.vocab * s.hidden                  # matmul weights per token
    # per token, forward: QK^T and AV are each seq * n_heads * head_dim MACs per layer = 4 * L * H * Q * T FLOPs
    attn_fwd = 4 * s.n_layers * s.q_dim * seq
    n_lora = 0 if method == "full" else lora_param_count(s, r, targets)
    fwd = 2 * n + 2 * n_lora + attn_fwd
    if method == "full":
        bwd = 4 * n + 2 * attn_fwd
        trainable = pb.total
    else:
        bwd = 2 * n + 4 * n_lora + 2 * attn_fwd
        trainable = n_lora
    rec = fwd if grad_checkpointing else 0
    per_tok = fwd + bwd + rec
    return FlopBreakdown(fwd * tokens, bwd * tokens, rec * tokens, per_tok * tokens, per_tok, n, trainable)


# -------------------------------------------------------------------------------------------- memory

def quantized_linear_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
                           dq_blocksize: int = 256) -> int:
    """Bytes of one NF4 weight in bitsandbytes' layout.

    packed codes: ceil(numel/2) bytes (two 4-bit codes per byte); absmax: one per block of ``blocksize``:
    fp32 (4 bytes) without double quantisation, or uint8 codes + one fp32 absmax per ``dq_blocksize``
    blocks + the 256-entry fp32 dynamic map + an fp32 offset with it (QLoRA, Section 3: 0.5 -> 0.127
    bits per parameter at blocksize 64).
    """
    if blocksize <= 0 or numel < 0:
        raise ValueError(f"bad numel={numel} or blocksize={blocksize}")
    n_blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * n_blocks
    return packed + n_blocks + 4 * math.ceil(n_blocks / dq_blocksize) + 4 * 256 + 4


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes of activations kept for backward, for one training step of ``batch x seq`` tokens."""

    layer: int          # everything one decoder layer saves for backward (recomputed with checkpointing)
    layer_backward: int  # transient gradient buffers while back-propagating through one layer
    checkpoints: int    # what gradient checkpointing keeps: each layer's input, L * b*s*hidden
    head: int           # final RMSNorm saved for backward
    loss_forward: int   # logits and loss buffers alive at the end of the forward pass
    loss_backward: int  # logits and loss buffers at their peak during backward


def activation_bytes(shape: ModelShape | str, batch: int, seq: int, dtype: str | torch.dtype = "bf16",
                     method: str = "full", r: int = 16, targets: str | Iterable[str] = "all-linear",
                     adapter_dtype: str | torch.dtype = "fp32", dequant_buffer: bool = True,
                     loss_chunks: int = 0, adapter_input_copies: bool | None = None) -> ActivationBytes:
    """Activations saved by a Hugging Face Llama layer with SDPA (flash) attention, counted op by op.

    With t = batch*seq tokens, h = hidden, I = intermediate, kv = n_kv_heads*head_dim, c = bytes of the
    compute dtype (2 for bf16). Per layer (cf. Korthikanti et al., arXiv 2205.05198, Section 4.1, which
    gives s*b*h*(34 + 5*a*s/h) for GPT; here no dropout, flash attention keeps no s^2 scores, SwiGLU):

    - each RMSNorm saves its fp32 upcast input (4th) and the rsqrt (4t); with a trainable norm weight
      (full fine-tuning) also the 16-bit normalised value before the weight (c*t*h);
    - a linear layer saves its input only when its weight is trainable (PyTorch saves what the requested
      gradients need): full fine-tuning saves the norm outputs and the MLP product (c*t*h twice, c*t*I);
      a frozen base with fp32 adapters saves the adapters' fp32 copies of x instead (PEFT and
      ``lora_ref.lora`` cast x per adapter: q, k and v make three copies); ``adapter_input_copies=False``
      describes a kernel that computes the adapter in the compute dtype and saves x once
      (``lora_ref.kernels``);
    - attention: q and k after RoPE, v, and the SDPA output (c*t*(2*q_dim + 2*kv); the output is laid out
      (b, s, heads, d), so o_proj reads it without a copy), plus the fp32 logsumexp (4*t*n_heads);
    - MLP: gate output, up output, SiLU output (3*c*t*I);
    - LoRA: the rank-r product A x per adapted linear (adapter dtype, or c with the kernel).

    Backward through one layer holds up to 2 extra (t, I) gradients (the SiLU-gate product rule) and,
    for QLoRA, one dequantised weight of the largest projection.

    Loss (transformers' ``ForCausalLMLoss``): bf16 logits (c*t*V) are upcast to fp32 (4tV) and
    log_softmax saves its fp32 output (4tV): 10tV bytes at the end of the forward, 4tV of which survive
    (the 16-bit logits are freed once the output object is dropped); backward holds the saved output,
    the fp32 gradient of it and the fp32 gradient of the logits: 12tV. With ``loss_chunks`` > 0 the loss
    is computed chunk by chunk and only one chunk's buffers exist at a time.
    """
    s = get_shape(shape)
    check_choice("method", method, METHODS)
    c = dtype_bytes(dtype)
    t = batch * seq
    h, I, kv = s.hidden, s.intermediate, s.kv_dim
    full = method == "full"
    tg = () if full else resolve_targets(targets)
    a = dtype_bytes(adapter_dtype)
    copies = (a != c) if adapter_input_copies is None else adapter_input_copies
    lora_saves_x = not copies                       # the kernel keeps the c-byte input itself

    def input_saved(names: tuple[str, ...]) -> bool:  # is this c-byte linear input kept for backward?
        return full or (lora_saves_x and any(n in tg for n in names))

    norm = 4 * t * h + 4 * t + (c * t * h if full else 0)
    layer = 2 * norm
    layer += c * t * h * (input_saved(("q_proj", "k_proj", "v_proj")) + input_saved(("gate_proj", "up_proj")))
    layer += c * t * (2 * s.q_dim + 2 * kv) + 4 * t * s.n_heads
    layer += 3 * c * t * I + (c * t * I if input_saved(("down_proj",)) else 0)
    shapes = linear_shapes(s)
    for tgt in tg:
        layer += (a if copies else c) * t * r
        if copies:
            layer += a * t * shapes[tgt][1]
    layer_backward = 2 * c * t * I
    if method == "qlora" and dequant_buffer:
        layer_backward += c * max(o * i for o, i in linear_shapes(s).values())
    checkpoints = s.n_layers * c * t * h
    # final norm; its output is kept by a trainable lm_head (full) or by the chunked loss
    head = norm + (c * t * h if full or (loss_chunks and loss_chunks > 0) else 0)
    tv = t * s.vocab
    if loss_chunks and loss_chunks > 0:
        tv = math.ceil(t / loss_chunks) * s.vocab
        loss_fwd, loss_bwd = 0, (4 + 4 + c) * tv
    else:
        loss_fwd, loss_bwd = 4 * tv, 12 * tv
    return ActivationBytes(layer, layer_backward, checkpoints, head, loss_fwd, loss_bwd)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak GPU memory of one steady-state training step, in bytes, with its named parts.

    ``weights``: resident model (frozen base, 4-bit codes and constants, trainable parameters, fp32
    master copies); ``gradients``: all gradients of trainable parameters; ``optimizer``: optimizer state;
    ``activations``: activations at the peak phase. ``total`` is the peak over the phases of a step
    (``phases``), NOT the plain sum: the loss buffers peak at the start of backward, before most
    gradients exist, and with checkpointing the layer activations exist one layer at a time.
    """

    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    n_params: int = 0
    n_trainable: int = 0
    act: ActivationBytes | None = None

    def gb(self, what: str = "total") -> float:
        return getattr(self, what) / GB

    def __str__(self) -> str:
        return (f"{self.method}: weights {self.weights / GB:.2f} GB + gradients {self.gradients / GB:.2f} GB"
                f" + optimizer {self.optimizer / GB:.2f} GB + activations {self.activations / GB:.2f} GB"
                f" -> peak {self.total / GB:.2f} GB ({self.peak_phase})")


def optimizer_state_bytes(n_trainable: int, param_bytes: int, optimizer: str = "adamw") -> int:
    """AdamW: two moments in the parameter dtype (torch.optim.AdamW; 8 bytes/param for fp32 params,
    ZeRO Section 3.1); 8-bit AdamW (bitsandbytes): 2 bytes + one fp32 absmax per 256-value block per
    moment (Dettmers et al., arXiv 2110.02861); SGD without momentum: nothing."""
    if optimizer == "adamw":
        return 2 * n_trainable * param_bytes
    if optimizer == "adamw8bit":
        return 2 * (n_trainable + 4 * math.ceil(n_trainable / 256))
    if optimizer == "sgd":
        return 0
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def training_memory(shape: ModelShape | str, method: str = "qlora", r: int = 16,
                    targets: str | Iterable[str] = "all-linear", batch: int = 4, seq: int = 512,
                    dtype: str | torch.dtype = "bf16", optimizer: str = "adamw",
                    grad_checkpointing: bool = True, adapter_dtype: str | torch.dtype = "fp32",
                    master_weights: bool = False, blocksize: int = 64, double_quant: bool = True,
                    loss_chunks: int = 0, dequant_buffer: bool = True,
                    adapter_input_copies: bool | None = None) -> MemoryBreakdown:
    """Peak memory of a training step (steady state: optimizer state allocated, grads set to None).

    Resident: weights + optimizer. On top, the peak of these phases (t = batch*seq, L = n_layers):

    - ``loss``: start of backward: checkpoints (or all layers' activations) + head + 12tV loss buffers;
    - ``backward_top``: backward of the last layer: all checkpoints + one layer recomputed + its
      gradient buffers + gradients of the lm_head / final norm (full fine-tuning);
    - ``backward_bottom``: backward of the first layer: one checkpoint + one layer + all gradients;
    - ``step``: optimizer step: all gradients (fused AdamW allocates no temporaries).

    full: weights c*P (+4P fp32 master weights, gradients then fp32, if ``master_weights``); gradients
    c*P; AdamW 2 moments per parameter. lora: frozen c*P + adapters in ``adapter_dtype`` with their
    gradients and moments. qlora: the 7 projections in NF4 (:func:`quantized_linear_bytes`), embeddings,
    lm_head and norms in c bytes, adapters as in lora.

    Held against ``torch.cuda.max_memory_allocated`` on an H200 (benchmarks/README.md): 8 of 8
    configurations within 10% (SmolLM2-135M and TinyLlama-1.1B; full, LoRA, QLoRA). Llama-2-7B bf16
    LoRA without checkpointing: 32.77 GB predicted, 32.83 GB measured.
    """
    check_choice("method", method, METHODS)
    check_int("batch", batch, minimum=1)
    check_int("seq", seq, minimum=1)
    s = get_shape(shape)
    c = dtype_bytes(dtype)
    pb = param_breakdown(s)
    if method == "full":
        n_train = pb.total
        grad_b = 4 if master_weights else c
        weights = c * pb.total + (4 * pb.total if master_weights else 0)
        gradients = grad_b * n_train
        optim = optimizer_state_bytes(n_train, 4 if master_weights else c, optimizer)
        top_grads = grad_b * ((0 if s.tied_embeddings else pb.lm_head) + s.hidden)
    else:
        a = dtype_bytes(adapter_dtype)
        n_train = lora_param_count(s, r, targets)
        if method == "lora":
            base = c * pb.total
        else:
            per_layer = sum(quantized_linear_bytes(o * i, blocksize, double_quant)
                            for o, i in linear_shapes(s).values())
            base = s.n_layers * per_layer + c * (pb.total - pb.linear)
        weights = base + a * n_train
        gradients = a * n_train
        optim = optimizer_state_bytes(n_train, a, optimizer)
        top_grads = 0
    act = activation_bytes(s, batch, seq, dtype, method, r, targets, adapter_dtype, dequant_buffer,
                           loss_chunks, adapter_input_copies)
    if grad_checkpointing:
        stored, one_layer = act.checkpoints, act.layer
        bottom_stored = act.checkpoints // s.n_layers
    else:
        stored, one_layer = s.n_layers * act.layer, 0
        bottom_stored = act.layer
    phase_act = {
        "loss": stored + act.head + act.loss_backward,
        "backward_top": stored + one_layer + act.layer_backward,
        "backward_bottom": bottom_stored + one_layer + act.layer_backward,
        "step": 0,
    }
    phase_grads = {"loss": 0, "backward_top": top_grads, "backward_bottom": gradients, "step": gradients}
    phases = {k: weights + optim + phase_act[k] + phase_grads[k] for k in phase_act}
    peak = max(phases, key=phases.get)
    return MemoryBreakdown(method, weights, gradients, optim, phase_act[peak], phases[peak], peak, phases,
                           pb.total, n_train, act)


# ----------------------------------------------------------------------------------------------------
# Building the model: the peak before the first training step (why a 70B model needs a streamed build)
# ----------------------------------------------------------------------------------------------------

QUANT_WORKSPACE_BYTES_PER_VALUE = 25
"""Temporaries of ``lora_ref.quant.quantize_4bit`` per value quantised at once: an fp32 copy (4), the
scaled values (4), the level bins (1) and their int64 index and gathered code index (8 + 8)."""


@dataclass(frozen=True)
class BuildMemory:
    """Peak memory while a QLoRA model is built, in bytes, with its parts (see :func:`build_memory`)."""

    streamed: bool
    dense_rest: int          # embeddings, lm_head, norms in the 16-bit dtype
    quantized: int           # the 4-bit layers present at the peak
    dense_layers: int        # 16-bit linear weights alive at the peak: ALL of them, or one layer's
    adapters: int            # LoRA parameters created with the layers (fast path) or after them
    workspace: int           # the quantiser's temporaries for one chunk
    total: int

    def gb(self, what: str = "total") -> float:
        return getattr(self, what) / GB

    def __str__(self) -> str:
        how = "streamed (one 16-bit layer at a time)" if self.streamed else "whole 16-bit model first"
        return (f"build, {how}: 16-bit rest {self.dense_rest / GB:.2f} GB + 4-bit {self.quantized / GB:.2f} GB"
                f" + 16-bit linears {self.dense_layers / GB:.2f} GB + adapters {self.adapters / GB:.2f} GB"
                f" + quantiser workspace {self.workspace / GB:.2f} GB -> peak {self.total / GB:.2f} GB")


def build_memory(shape: ModelShape | str, method: str = "qlora", streamed: bool = True, r: int = 16,
                 targets: str | Iterable[str] = "all-linear", dtype: str | torch.dtype = "bf16",
                 adapter_dtype: str | torch.dtype = "fp32", blocksize: int = 64, double_quant: bool = True,
                 quant_chunk: int = 1 << 24) -> BuildMemory:
    """Peak GPU memory of building a QLoRA model, before training starts.

    ``streamed=False`` (``from_pretrained`` of a 16-bit checkpoint, then quantise): the whole model in c
    bytes per parameter exists first, c * P (138 GB for Llama-2-70B in bf16); layers are then quantised one
    by one, each 16-bit weight freed as its 4-bit copy appears, so the peak is c * P + one weight's codes.

    ``streamed=True`` (``lora_ref.qlora.build_quantized``): the peak is at the last layer::

        c * (P - P_linear)  +  (L - 1) * q_layer  +  c * P_layer_linear  +  24..25 B * chunk  +  adapters

    with q_layer the 4-bit bytes of one layer (:func:`quantized_linear_bytes`) and the quantiser's
    workspace bounded by quantising ``quant_chunk`` values at a time (``qlora.quantize_4bit_in_chunks``).
    """
    if method != "qlora":
        raise ValueError(f"build_memory models a QLoRA build; method={method!r}")
    s = get_shape(shape)
    c = dtype_bytes(dtype)
    pb = param_breakdown(s)
    mats = list(linear_shapes(s).values())
    q_layer = sum(quantized_linear_bytes(o * i, blocksize, double_quant) for o, i in mats)
    dense_layer = c * sum(o * i for o, i in mats)
    largest = max(o * i for o, i in mats)
    rest = c * (pb.total - pb.linear)
    adapters = dtype_bytes(adapter_dtype) * lora_param_count(s, r, targets)
    if streamed:
        workspace = QUANT_WORKSPACE_BYTES_PER_VALUE * min(quant_chunk, largest)
        quantized, dense = (s.n_layers - 1) * q_layer, dense_layer
        total = rest + quantized + dense + workspace + adapters
    else:
        workspace = quantized_linear_bytes(largest, blocksize, double_quant)
        quantized, dense = 0, c * pb.linear
        total = rest + dense + workspace
        adapters = 0                                    # added after the build, once the 16-bit weights are gone
    return BuildMemory(streamed, rest, quantized, dense, adapters, workspace, total)
