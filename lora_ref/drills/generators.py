"""Generated questions: numbers computed by lora_ref over real model configurations, and code mutations.

Every numeric answer comes from :mod:`lora_ref.memory` or :mod:`lora_ref.quant` (never typed in), so a
drill can never disagree with the notebooks. Each generator is a pair:

* a *question function* with explicit arguments (``lora_params_item("llama-2-7b", 16, "attention")``),
  which tests call with hand-worked cases;
* a *draw* that picks arguments from a seeded ``random.Random``: endless variety, reproducible from the
  item id ``"gen.lora-params@1234"`` (see :func:`generate`).

The prompt gives every config number needed, so each answer can be worked out by hand, and the model
answer shows the working. Spot-the-bug generators mutate one line of a correct snippet with a mistake
taken from the seed article (or a classic one) and know which line they broke.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable

from .. import memory as mem
from ..quant import bits_per_parameter
from .items import Item, kp, validate_item

#: models the generators draw from (names of lora_ref.memory.PRESETS)
MODELS = ("smollm2-135m", "smollm2-1.7b", "tinyllama-1.1b", "llama-3.2-1b", "llama-2-7b", "llama-2-13b",
          "llama-2-70b", "llama-3-8b", "mistral-7b", "qwen2.5-7b")
RANKS = (4, 8, 16, 32, 64)
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q,v": ("q_proj", "v_proj"),
    "q,k,v,o": mem.ATTENTION_PROJECTIONS,
    "all 7 linear projections": mem.PROJECTIONS,
}
_SOURCE_LORA = "LoRA paper Section 4.1 (A is r x in, B is out x r); computed by lora_ref.memory"


def describe(shape: str) -> str:
    """One line with every config number a hand calculation needs."""
    s = mem.get_shape(shape)
    gqa = f", {s.n_kv_heads} KV heads (GQA: k/v are {s.kv_dim} wide)" if s.n_kv_heads != s.n_heads else ""
    tied = ", tied embeddings" if s.tied_embeddings else ""
    bias = ", q/k/v biases" if s.qkv_bias else ""
    return (f"{s.name}: hidden {s.hidden}, intermediate {s.intermediate}, {s.n_layers} layers, "
            f"{s.n_heads} heads of {s.head_dim}{gqa}, vocab {s.vocab:,}{tied}{bias}")


def _targets_name(targets: tuple[str, ...]) -> str:
    for name, t in TARGET_SETS.items():
        if tuple(targets) == t:
            return name
    return ",".join(t.replace("_proj", "") for t in targets)


def _lora_working(shape: str, r: int, targets: tuple[str, ...]) -> str:
    shapes = mem.linear_shapes(shape)
    s = mem.get_shape(shape)
    terms = [f"{t.replace('_proj', '')}: {r}*({shapes[t][1]}+{shapes[t][0]}) = {r * sum(shapes[t]):,}" for t in targets]
    per_layer = sum(r * sum(shapes[t]) for t in targets)
    return f"per layer {'; '.join(terms)}; sum {per_layer:,} x {s.n_layers} layers = {per_layer * s.n_layers:,}"


# ------------------------------------------------------------------------------- question functions
def lora_params_item(shape: str, r: int, targets: tuple[str, ...]) -> Item:
    n = mem.lora_param_count(shape, r, targets)
    total = mem.param_count(shape)
    return Item(
        id=f"gen.lora-params:{shape}:{r}:{'+'.join(targets)}", card="gen.lora-params", topic="sizing",
        kind="numeric", difficulty=2, unit="params", value=float(n), rel_tol=0.005,
        prompt=(f"{describe(shape)}.\nHow many trainable parameters does LoRA with r={r} on "
                f"{_targets_name(targets)} of every layer add? (Exact, or to 3 significant figures.)"),
        answer=(f"{n:,}. Each adapted (out, in) projection adds A (r, in) and B (out, r): r*(in+out). "
                f"{_lora_working(shape, r, targets)}. That is {n / total:.3%} of the model's {total:,} parameters."),
        key_points=(kp("r * (in + out) per projection", "r in out"), kp("k/v width with GQA", "gqa", "kv")),
        source=_SOURCE_LORA + ".lora_param_count",
        follow_ups=("How does the figure change if k and v were as wide as q?", "What fraction of the model is that?"),
    )


def adapter_size_item(shape: str, r: int, targets: tuple[str, ...], dtype: str) -> Item:
    nbytes = mem.adapter_file_bytes(shape, r, targets, dtype)
    n = mem.lora_param_count(shape, r, targets)
    b = mem.dtype_bytes(dtype)
    return Item(
        id=f"gen.adapter-size:{shape}:{r}:{'+'.join(targets)}:{dtype}", card="gen.adapter-size", topic="deployment",
        kind="numeric", difficulty=2, unit="bytes", answer_unit="MB", value=float(nbytes), rel_tol=0.02,
        prompt=(f"{describe(shape)}.\nA LoRA adapter with r={r} on {_targets_name(targets)} is saved by PEFT as "
                f"adapter_model.safetensors in {dtype}. About how large is the file, in MB (10^6 bytes)?"),
        answer=(f"{nbytes / 1e6:,.2f} MB ({nbytes:,} bytes). Tensor data: {n:,} parameters x {b} bytes = "
                f"{n * b:,} bytes; the rest is the safetensors JSON header (key names and offsets) and its "
                f"8-byte length: {nbytes - n * b:,} bytes. Compare with the base model in bf16: "
                f"{2 * mem.param_count(shape) / 1e9:.1f} GB."),
        key_points=(kp("parameters x bytes per value", "byte"), kp("small header", "header")),
        source="safetensors format (8-byte header length + JSON + raw data); computed by lora_ref.memory.adapter_file_bytes",
        follow_ups=("How many adapters fit in the memory of one copy of the base model?",),
    )


def model_params_item(shape: str) -> Item:
    pb = mem.param_breakdown(shape)
    s = mem.get_shape(shape)
    per_layer = sum(o * i for o, i in mem.linear_shapes(shape).values())
    return Item(
        id=f"gen.model-params:{shape}", card="gen.model-params", topic="sizing", kind="numeric", difficulty=2,
        unit="params", answer_unit="B", value=float(pb.total), rel_tol=0.01,
        prompt=f"{describe(shape)}.\nHow many parameters does the model have in total (in billions, 1% tolerance)?",
        answer=(f"{pb.total:,} ({pb.total / 1e9:.3f}B). Per layer the 7 projections hold {per_layer:,} "
                f"(x {s.n_layers} = {pb.linear:,}); embeddings {pb.embedding:,}; lm_head {pb.lm_head:,}"
                f"{' (tied: shares the embedding)' if s.tied_embeddings else ''}; norms {pb.norm:,}"
                f"{f'; q/k/v biases {pb.bias:,}' if pb.bias else ''}. The article's 4*d^2*L counts only q,k,v,o: "
                f"{4 * s.hidden ** 2 * s.n_layers:,}."),
        key_points=(kp("7 projections per layer", "projection"), kp("embeddings and lm_head", "embedding")),
        source="Hugging Face config.json of the model; computed by lora_ref.memory.param_breakdown",
        follow_ups=("Which share of the parameters is in the MLP?",),
    )


def _resident(m: mem.MemoryBreakdown) -> int:
    return m.weights + m.gradients + m.optimizer


_MEMORY_RULES = {
    "full": ("full fine-tuning in pure bf16: bf16 weights, bf16 gradients and both AdamW moments in bf16 "
             "(torch.optim.AdamW on bf16 parameters), i.e. 8 bytes per parameter"),
    "lora": ("LoRA: frozen base in bf16 (2 bytes per parameter); adapters in fp32 with fp32 gradients and "
             "two fp32 AdamW moments (16 bytes per adapter parameter)"),
    "qlora": ("QLoRA: the 7 projections of every layer in NF4 with blocksize 64 and double quantisation "
              "(4 bits + 8/64 + 32/16384 bits per weight), embeddings, lm_head and norms in bf16; adapters in "
              "fp32 with fp32 gradients and two fp32 AdamW moments (16 bytes per adapter parameter)"),
}


def memory_item(shape: str, method: str, r: int = 16, targets: tuple[str, ...] = mem.PROJECTIONS) -> Item:
    m = mem.training_memory(shape, method, r, targets)
    resident = _resident(m)
    total_params = mem.param_count(shape)
    lora_txt = "" if method == "full" else f" with LoRA r={r} on {_targets_name(targets)}"
    return Item(
        id=f"gen.memory-{method}:{shape}:{r}:{'+'.join(targets)}", card=f"gen.memory-{method}", topic="sizing",
        kind="numeric", difficulty=3 if method == "qlora" else 2, unit="bytes", answer_unit="GB",
        value=float(resident), rel_tol=0.02,
        prompt=(f"{describe(shape)}.\nTraining set-up: {_MEMORY_RULES[method]}{lora_txt}. How many GB (10^9 "
                f"bytes) do weights + gradients + optimizer state take, before activations? (2% tolerance)"),
        answer=(f"{resident / 1e9:.2f} GB: weights {m.weights / 1e9:.3f} GB + gradients {m.gradients / 1e9:.3f} GB "
                f"+ optimizer {m.optimizer / 1e9:.3f} GB ({total_params:,} parameters, {m.n_trainable:,} trainable). "
                f"Activations come on top: lora_ref estimates the peak of a step at batch 4 x 512 tokens with "
                f"gradient checkpointing at {m.total / 1e9:.2f} GB ({m.peak_phase} phase)."),
        key_points=(kp("bytes per parameter by role", "byte"), kp("activations on top", "activation")),
        source="ZeRO arXiv 1910.02054 Section 3.1; QLoRA Section 3; computed by lora_ref.memory.training_memory",
        follow_ups=("What dominates at batch 16 x 2048?", "What changes with mixed-precision fp32 master weights?"),
    )


def bits_item(blocksize: int, double_quant: bool, dq_blocksize: int = 256) -> Item:
    v = bits_per_parameter(blocksize, double_quant, dq_blocksize)
    how = (f"4 + 8/{blocksize} + 32/({blocksize}*{dq_blocksize})" if double_quant else f"4 + 32/{blocksize}")
    dq = f"with double quantisation (8-bit constants, second-level blocks of {dq_blocksize})" if double_quant \
        else "without double quantisation (one fp32 absmax per block)"
    return Item(
        id=f"gen.bits:{blocksize}:{int(double_quant)}:{dq_blocksize}", card="gen.bits", topic="qlora",
        kind="numeric", difficulty=2, unit="bits/param", value=v, rel_tol=0.002,
        prompt=f"NF4 with blocksize {blocksize}, {dq}. How many bits per parameter, codes plus constants?",
        answer=(f"{how} = {v:.4f} bits per parameter. The QLoRA recipe (blocksize 64, double quantisation) gives "
                f"{bits_per_parameter(64, True):.3f}; without double quantisation {bits_per_parameter(64, False):.1f}."),
        key_points=(kp("4 bits of code", "4"), kp("constants amortised over the block", "block")),
        source="QLoRA paper Section 3 (Double Quantization); computed by lora_ref.quant.bits_per_parameter",
        follow_ups=("Why does a smaller block lower the error but raise the bits?",),
    )


def dq_saving_item(shape: str) -> Item:
    linear = mem.param_breakdown(shape).linear
    saved_bits = bits_per_parameter(64, False) - bits_per_parameter(64, True)
    saved = linear * saved_bits / 8
    return Item(
        id=f"gen.dq-saving:{shape}", card="gen.dq-saving", topic="qlora", kind="numeric", difficulty=3,
        unit="bytes", answer_unit="GB", value=saved, rel_tol=0.02,
        prompt=(f"{describe(shape)}.\nQLoRA quantises the 7 projections of every layer to NF4 with blocksize 64. "
                f"How many GB does double quantisation of the constants save?"),
        answer=(f"{saved / 1e9:.3f} GB: the projections hold {linear:,} weights; constants go from 32/64 = 0.5 to "
                f"8/64 + 32/16384 = {bits_per_parameter(64, True) - 4:.4f} bits per weight, saving {saved_bits:.4f} "
                f"bits x {linear:,} / 8."),
        key_points=(kp("0.373 bits per weight saved", "0.373"), kp("only the quantised projections", "projection")),
        source="QLoRA paper Section 3 (about 3 GB on a 65B model); computed by lora_ref.quant.bits_per_parameter and lora_ref.memory.param_breakdown",
        follow_ups=("Why are the embeddings not quantised?",),
    )


def flops_item(shape: str, method: str, tokens: int, seq: int, r: int = 16,
               targets: tuple[str, ...] = mem.PROJECTIONS) -> Item:
    f = mem.training_flops(shape, tokens, method, r, targets, seq)
    s = mem.get_shape(shape)
    n_lora = 0 if method == "full" else mem.lora_param_count(shape, r, targets)
    rule = "6N per token" if method == "full" else f"4N + 6N_lora per token (N_lora = {n_lora:,} for r={r} on {_targets_name(targets)})"
    return Item(
        id=f"gen.flops-{method}:{shape}:{tokens}:{seq}:{r}", card="gen.flops", topic="sizing", kind="numeric",
        difficulty=3, unit="FLOPs", value=f.total, rel_tol=0.03,
        prompt=(f"{describe(shape)}.\nEstimate the training FLOPs of {'full fine-tuning' if method == 'full' else method} "
                f"on {tokens:,} tokens at sequence length {seq}. Use {rule}, with N = weights in matmuls "
                f"(7 projections of every layer + lm_head), plus attention scores 12 * layers * heads * head_dim * seq "
                f"per token. No gradient checkpointing. (3% tolerance; e.g. 1.2e18)"),
        answer=(f"{f.total:.3e} FLOPs = {f.per_token:,.0f} per token x {tokens:,}. N = {f.matmul_params:,}; "
                f"attention {12 * s.n_layers * s.q_dim * seq:,} per token. LoRA skips the weight-gradient matmuls "
                f"of the frozen weights (2N) but still runs the forward and the input gradients."),
        key_points=(kp("6N full, 4N + 6N_lora LoRA", "6n", "4n"), kp("attention scores term", "attention")),
        source="Kaplan et al. arXiv 2001.08361 Section 2.1; PaLM Appendix B; computed by lora_ref.memory.training_flops",
        follow_ups=("How many hours at 40% of an H200's ~790 TFLOP/s bf16?",),
    )


def flop_ratio_item(shape: str, r: int, seq: int) -> Item:
    full = mem.training_flops(shape, 1, "full", seq=seq).per_token
    lora = mem.training_flops(shape, 1, "lora", r, mem.PROJECTIONS, seq).per_token
    ratio = full / lora
    return Item(
        id=f"gen.flop-ratio:{shape}:{r}:{seq}", card="gen.flop-ratio", topic="sizing", kind="numeric",
        difficulty=3, unit="x", value=ratio, rel_tol=0.03,
        prompt=(f"{describe(shape)}.\nThe seed article claims LoRA reduces compute about 128x. Using 6N per token for "
                f"full fine-tuning and 4N + 6N_lora for LoRA (r={r}, all 7 projections), plus attention scores "
                f"12 * layers * heads * head_dim * seq (seq {seq}) in both, by what factor does LoRA reduce "
                f"training FLOPs?"),
        answer=(f"{ratio:.3f}x ({full:,.0f} vs {lora:,.0f} FLOPs per token), about 1.5x at most, not 128x: the frozen "
                f"weights still run forward and pass gradients back; only their weight gradients are skipped."),
        key_points=(kp("about 1.5x", "1.5"), kp("frozen weights still run", "forward")),
        corrects_article=True,
        source="Kaplan et al. 2020 Section 2.1; LoRA paper Section 4.2; computed by lora_ref.memory.training_flops",
        follow_ups=("Why does the ratio fall with longer sequences?",),
    )


# ------------------------------------------------------------------------------- spot-the-bug
@dataclass(frozen=True)
class Mutation:
    line: int                  # 1-based line of the template replaced
    new: str                   # the buggy line
    why: str                   # the model answer
    key_points: tuple          # KeyPoints


_LORA_LAYER = """\
class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base                                  # wrapped, not copied
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += (self.lora_B @ self.lora_A) * self.scaling
            self.merged = True
"""

_LORA_MUTATIONS = (
    Mutation(4, "        self.base_layer = copy.deepcopy(base)                  # wrapped, not copied",
             "Line 4 deep-copies the frozen layer: two copies of every weight in memory, and the model's own "
             "parameter (possibly quantised or shared) is no longer the one used. Wrap: self.base_layer = base.",
             (kp("copies the weight", "copy", "deepcopy"), kp("double memory", "memory", "double"))),
    Mutation(5, "        self.base_layer.weight.requires_grad_(True)",
             "Line 5 leaves the base weight trainable: the optimizer updates W itself (full fine-tuning of the "
             "layer plus optimizer state for it), defeating LoRA. It must be requires_grad_(False).",
             (kp("base weight trainable", "trainable", "requires_grad", "requires grad"), kp("must be frozen", "frozen", "false"))),
    Mutation(7, "        self.lora_B = nn.Parameter(torch.randn(base.out_features, r))",
             "Line 7 initialises B randomly: delta W = B A is non-zero at step 0, so the adapted model no longer "
             "starts as the pretrained model (random noise is added to every output). B must start at zero.",
             (kp("B must be zero", "zero"), kp("model no longer starts as the pretrained one", "start", "pretrain", "noise"))),
    Mutation(8, "        nn.init.zeros_(self.lora_A)",
             "Line 8 makes A zero as well as B: then the gradient of B (upstream x (A x)^T) and of A "
             "(B^T x upstream) are both zero and the adapter never trains. A must be random (kaiming uniform).",
             (kp("A and B both zero", "both zero", "a zero"), kp("zero gradients: never trains", "gradient", "never"))),
    Mutation(9, "        self.scaling = r / alpha",
             "Line 9 inverts the scaling: it must be alpha / r. With alpha=16, r=8 the update is scaled by 0.5 "
             "instead of 2, and raising r now makes updates larger instead of keeping them comparable.",
             (kp("must be alpha / r", "alpha r"), kp("inverted", "invert", "wrong way", "upside"))),
    Mutation(14, "        if self.merged and self.training:",
             "Line 14 only skips the LoRA branch of a merged layer in training mode: in eval mode (serving) the "
             "weight already contains delta W and forward adds the LoRA branch again, counting the update twice.",
             (kp("merged check missing", "merged", "merge"), kp("update counted twice", "twice", "double"))),
    Mutation(16, "        return y + (x @ self.lora_A.T @ self.lora_B.T)",
             "Line 16 forgets the scaling alpha/r in the forward, while merge() applies it: the merged model "
             "differs from the trained one, and the learning rate no longer transfers across r.",
             (kp("scaling missing in forward", "scaling", "alpha"), kp("merge inconsistent with forward", "merge", "differ"))),
    Mutation(21, "            self.base_layer.weight += (self.lora_A.T @ self.lora_B.T) * self.scaling",
             "Line 21 transposes the product: A.T @ B.T is (in, out), the transpose of delta W = B @ A (out, in). "
             "It only runs when in == out, and then adds the wrong matrix (delta W transposed).",
             (kp("shape: (in, out) instead of (out, in)", "in out", "shape", "transpos"), kp("delta W = B @ A", "b a"))),
    Mutation(22, "            pass",
             "Line 22 never sets merged = True: calling merge() twice adds delta W twice, and forward keeps "
             "adding the LoRA branch on top of the merged weight.",
             (kp("flag never set", "flag", "merged"), kp("merge twice / double counting", "twice", "double"))),
)

_QUANTISER = """\
def quantize_nf4(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64):
    blocks = w.reshape(-1, blocksize)                       # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)         # (n_blocks, 1)
    absmax = absmax.clamp_min(torch.finfo(w.dtype).tiny)    # all-zero blocks
    normed = blocks / absmax                                # in [-1, 1]
    mid = (code[1:] + code[:-1]) / 2                        # 15 decision boundaries
    idx = torch.bucketize(normed, mid)                      # nearest code, 0..15
    return idx.to(torch.uint8), absmax.squeeze(1)

def dequantize_nf4(idx, absmax, code, shape):
    blocks = code[idx.long()] * absmax[:, None]
    return blocks.reshape(shape)                            # (out, in), as quantised
"""

_QUANT_MUTATIONS = (
    Mutation(3, "    absmax = blocks.abs().amax(dim=1, keepdim=True) / 7     # (n_blocks, 1)",
             "Line 3 divides absmax by 7 (the int4 range -7..7): normalised values land in [-7, 7] while NF4 "
             "codes are in [-1, 1], so almost every weight saturates at the end codes. The scale is absmax itself.",
             (kp("/7 is int4's range", "7", "int4"), kp("values saturate outside [-1, 1]", "saturat", "outside", "end code"))),
    Mutation(5, "    normed = blocks / absmax.max()                          # in [-1, 1]",
             "Line 5 normalises every block by the absmax of the whole tensor, while the stored constants (and "
             "dequantize) are per block: blocks come back scaled by absmax_block / absmax_tensor, i.e. shrunk. "
             "And a single scale would throw away blockwise quantisation's protection against outliers.",
             (kp("per-tensor scale vs per-block constants", "tensor", "whole"), kp("scales do not match: values shrink", "shrunk", "shrink", "mismatch", "do not match"))),
    Mutation(7, "    idx = torch.searchsorted(code, normed)                 # nearest code, 0..15",
             "Line 7 uses searchsorted on the codes: the insertion index (first code >= value), not the nearest "
             "code, so every value rounds up to the next code (0.01 becomes 0.0796, not 0): a systematic bias. "
             "Bucketize against the midpoints between consecutive codes.",
             (kp("insertion index, not nearest", "insert", "nearest", "round up"), kp("use midpoints", "midpoint"))),
    Mutation(6, "    mid = code[1:]                                          # 15 decision boundaries",
             "Line 6 uses the codes themselves as boundaries instead of the midpoints between consecutive codes: "
             "values are rounded up to the next code rather than to the nearest one.",
             (kp("boundaries must be midpoints", "midpoint"), kp("rounds up instead of nearest", "nearest", "round up"))),
    Mutation(12, "    return blocks.reshape(shape[1], shape[0]).T             # (out, in), as quantised",
             "Line 12 reshapes to (in, out) and transposes: a reshape is not a transpose, so the elements are "
             "scrambled (the quantised order was row-major (out, in)). Reshape straight to the original shape.",
             (kp("reshape/view is not a transpose", "transpos", "reshape", "view"), kp("elements scrambled", "scrambl", "order"))),
    Mutation(2, "    blocks = w.t().reshape(-1, blocksize)                   # (n_blocks, blocksize)",
             "Line 2 transposes before blocking (w.t() of an (out, in) weight, reshape copies it): the blocks run "
             "down columns, but dequantize reshapes row-major to (out, in), so the weight comes back transposed "
             "and scrambled.",
             (kp("transposed before blocking", "transpos", "t()"), kp("dequantise order does not match", "order", "scrambl", "match"))),
)

_TRAIN_STEP = """\
model.train()
for batch in loader:                      # input_ids, attention_mask, labels (-100 on prompt and padding)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

model.eval()
with torch.no_grad():
    nll = sum(model(**b).loss.item() * (b["labels"][:, 1:] != -100).sum().item() for b in eval_loader)
    n = sum((b["labels"][:, 1:] != -100).sum().item() for b in eval_loader)
print("held-out perplexity (lower is better):", math.exp(nll / n))
"""

_TRAIN_MUTATIONS = (
    Mutation(4, '                labels=batch["input_ids"])',
             "Line 4 trains on labels = input_ids: the loss covers the prompt and the padding, not just the answer. "
             "Use the labels with -100 on every non-answer token.",
             (kp("loss on prompt and padding", "prompt", "padding"), kp("labels -100 on non-answer tokens", "100", "answer"))),
    Mutation(8, "",
             "Line 8 no longer zeroes the gradients: they accumulate across steps, so every update uses the sum "
             "of all past gradients. Call optimizer.zero_grad() after each step.",
             (kp("gradients accumulate", "accumulat"), kp("zero_grad missing", "zero_grad", "zero grad"))),
    Mutation(11, "if True:",
             "Line 11 drops torch.no_grad() in evaluation: autograd records a graph for every batch, wasting memory "
             "(and time) during eval.",
             (kp("no_grad missing", "no_grad", "no grad"), kp("graph kept: memory", "memory", "graph"))),
    Mutation(14, 'print("eval score (higher is better):", sum(math.exp(model(**b).loss.item()) for b in eval_loader) / len(eval_loader))',
             "Line 14 averages per-batch perplexities and calls it a score: perplexity is lower-is-better, and "
             "corpus perplexity is exp(total NLL / total tokens), token-weighted, as computed on lines 12-13.",
             (kp("perplexity is lower-is-better, not a score", "lower", "perplexit"), kp("token-weighted", "token", "weight"))),
    Mutation(10, "model.train()",
             "Line 10 evaluates in training mode: dropout (including LoRA dropout) stays active, so held-out loss is "
             "noisy and pessimistic, and an unmerged model differs from its merged export. Use model.eval().",
             (kp("dropout active during eval", "dropout"), kp("use model.eval()", "eval"))),
)

_BUG_TEMPLATES: dict[str, tuple[str, str, str, tuple[Mutation, ...]]] = {
    # card id: (topic, title, template, mutations)
    "gen.bug-lora-layer": ("implementation", "a LoRA layer (PEFT shapes: A (r, in), B (out, r))", _LORA_LAYER, _LORA_MUTATIONS),
    "gen.bug-quantiser": ("qlora", "a blockwise NF4 quantiser (code: the 16 NF4 values, sorted)", _QUANTISER, _QUANT_MUTATIONS),
    "gen.bug-train-step": ("evaluation", "a LoRA training loop and held-out evaluation", _TRAIN_STEP, _TRAIN_MUTATIONS),
}


def bug_item(card: str, which: int) -> Item:
    """The spot-the-bug item of template ``card`` with mutation number ``which`` applied."""
    topic, title, template, mutations = _BUG_TEMPLATES[card]
    if not 0 <= which < len(mutations):
        raise ValueError(f"{card} has mutations 0..{len(mutations) - 1}, got {which}")
    m = mutations[which]
    lines = template.rstrip("\n").split("\n")
    if lines[m.line - 1] == m.new:
        raise ValueError(f"{card} mutation {which} does not change line {m.line}")
    lines[m.line - 1] = m.new
    return Item(
        id=f"{card}:{which}", card=card, topic=topic, kind="bug", difficulty=2,
        prompt=f"One line of {title} has a bug. Which line, and what goes wrong?",
        code="\n".join(lines) + "\n", bug_lines=(m.line,), answer=m.why, key_points=m.key_points,
        source="lora_ref.lora / lora_ref.quant / lora_ref.training (the correct versions); mistakes from the seed article",
        follow_ups=("Which test would catch this bug?",),
    )


def dora_params_item(shape: str, r: int, targets: tuple[str, ...]) -> Item:
    from ..dora import dora_param_count
    n = dora_param_count(shape, r, targets)
    lora_n = mem.lora_param_count(shape, r, targets)
    shapes = mem.linear_shapes(shape)
    outs = " + ".join(f"{shapes[t][0]}" for t in targets)
    return Item(
        id=f"gen.dora-params:{shape}:{r}:{'+'.join(targets)}", card="gen.dora-params", topic="variants",
        kind="numeric", difficulty=2, unit="params", value=float(n), rel_tol=0.005,
        prompt=(f"{describe(shape)}.\nHow many trainable parameters does DoRA with r={r} on "
                f"{_targets_name(targets)} of every layer have? (LoRA's A and B plus DoRA's magnitude vectors.)"),
        answer=(f"{n:,}: LoRA's {lora_n:,} ({_lora_working(shape, r, targets)}) plus one magnitude per output "
                f"unit of each adapted projection: ({outs}) x {mem.get_shape(shape).n_layers} layers = {n - lora_n:,} "
                f"(+{(n - lora_n) / lora_n:.1%})."),
        key_points=(kp("LoRA's r (in + out) per projection", "r in out"), kp("plus out_features per projection", "out")),
        source="DoRA paper Section 4.1 (m has one entry per output unit); computed by lora_ref.dora.dora_param_count",
    )


def loftq_gain_item(diag: tuple[float, ...], step: float) -> Item:
    """LoftQ (r = 1, T = 1) on a diagonal matrix with a round-to-``step`` quantiser: error ratio vs QLoRA."""
    import torch

    from ..loftq import loftq_factors, step0_error
    W = torch.diag(torch.tensor(diag, dtype=torch.float64)).float()
    quantize = lambda M: torch.round(M / step) * step                            # noqa: E731
    Q, A, B = loftq_factors(W, 1, 1.0, 1, quantize)
    plain, loft = step0_error(W, quantize(W)), step0_error(W, Q, A, B, 1.0)
    if plain == 0:
        raise ValueError(f"diag={diag} is exactly representable on a grid of {step}: no quantisation error")
    errs = [d - round(d / step) * step for d in diag]
    return Item(
        id=f"gen.loftq-gain:{':'.join(f'{d:g}' for d in diag)}:{step:g}", card="gen.loftq-gain", topic="variants",
        kind="numeric", difficulty=3, unit="x", value=loft / plain, rel_tol=0.01,
        prompt=(f"W = diag({', '.join(f'{d:g}' for d in diag)}); the quantiser rounds every entry to a multiple of "
                f"{step:g}. LoftQ with r = 1 and one iteration: what is its step-0 error ||W - (Q + sBA)||_F divided "
                f"by plain QLoRA's ||W - Q(W)||_F? (A ratio, 3 significant figures.)"),
        answer=(f"{loft / plain:.3f}. Q = Q(W), so W - Q = diag({', '.join(f'{e:+.3g}' for e in errs)}); the best "
                f"rank-1 approximation of a diagonal matrix keeps its largest |entry|, so the error left is the "
                f"norm of the others: {loft * float(W.norm()):.4g} vs {plain * float(W.norm()):.4g}."),
        key_points=(kp("first iteration quantises W itself", "q w"), kp("rank-1 SVD removes the largest error", "largest")),
        source="LoftQ paper Algorithm 1; computed by lora_ref.loftq.loftq_factors and step0_error",
    )


# ------------------------------------------------------------------------------- registry and draws
@dataclass(frozen=True)
class Generator:
    card: str
    topic: str
    kind: str
    title: str
    draw: Callable[[random.Random], Item]


def _pick_targets(rng: random.Random) -> tuple[str, ...]:
    return TARGET_SETS[rng.choice(list(TARGET_SETS))]


GENERATORS: dict[str, Generator] = {g.card: g for g in (
    Generator("gen.lora-params", "sizing", "numeric", "LoRA trainable parameters",
              lambda rng: lora_params_item(rng.choice(MODELS), rng.choice(RANKS), _pick_targets(rng))),
    Generator("gen.adapter-size", "deployment", "numeric", "adapter file size",
              lambda rng: adapter_size_item(rng.choice(MODELS), rng.choice(RANKS), _pick_targets(rng),
                                            rng.choice(("fp32", "bf16")))),
    Generator("gen.model-params", "sizing", "numeric", "total model parameters",
              lambda rng: model_params_item(rng.choice(MODELS))),
    Generator("gen.memory-full", "sizing", "numeric", "memory of full fine-tuning",
              lambda rng: memory_item(rng.choice(MODELS), "full")),
    Generator("gen.memory-lora", "sizing", "numeric", "memory of LoRA",
              lambda rng: memory_item(rng.choice(MODELS), "lora", rng.choice(RANKS), _pick_targets(rng))),
    Generator("gen.memory-qlora", "sizing", "numeric", "memory of QLoRA",
              lambda rng: memory_item(rng.choice(MODELS), "qlora", rng.choice(RANKS), _pick_targets(rng))),
    Generator("gen.bits", "qlora", "numeric", "bits per parameter (double quantisation)",
              lambda rng: bits_item(rng.choice((32, 64, 128, 256)), rng.random() < 0.6, rng.choice((128, 256)))),
    Generator("gen.dq-saving", "qlora", "numeric", "memory saved by double quantisation",
              lambda rng: dq_saving_item(rng.choice(MODELS))),
    Generator("gen.flops", "sizing", "numeric", "training FLOPs",
              lambda rng: flops_item(rng.choice(MODELS), rng.choice(("full", "lora")), rng.choice((10**6, 10**8, 10**9)),
                                     rng.choice((512, 2048, 4096)), rng.choice(RANKS))),
    Generator("gen.flop-ratio", "sizing", "numeric", "LoRA's real compute saving",
              lambda rng: flop_ratio_item(rng.choice(MODELS), rng.choice(RANKS), rng.choice((512, 2048, 8192)))),
    Generator("gen.dora-params", "variants", "numeric", "DoRA trainable parameters",
              lambda rng: dora_params_item(rng.choice(MODELS), rng.choice(RANKS), _pick_targets(rng))),
    Generator("gen.loftq-gain", "variants", "numeric", "LoftQ's step-0 error against QLoRA's",
              lambda rng: loftq_gain_item(tuple(round(rng.uniform(-3, 3), 2) + 0.003 for _ in range(rng.choice((2, 3, 4)))),
                                          rng.choice((0.25, 0.5, 1.0)))),
    *(Generator(card, topic, "bug", f"spot the bug in {title}",
                (lambda c, n: lambda rng: bug_item(c, rng.randrange(n)))(card, len(muts)))
      for card, (topic, title, _t, muts) in _BUG_TEMPLATES.items()),
)}


def generate(card: str, seed: int) -> Item:
    """A fresh item of generator ``card``, reproducible from ``seed``; its id is ``card@seed``."""
    if card not in GENERATORS:
        raise KeyError(f"no generator {card!r}; generators: {sorted(GENERATORS)}")
    item = GENERATORS[card].draw(random.Random(f"{card}@{seed}"))
    item = replace(item, id=f"{card}@{seed}", tags=item.tags + (item.id,))
    validate_item(item)
    return item


def from_id(item_id: str) -> Item:
    """Rebuild a generated item from its id ``card@seed``."""
    card, sep, seed = item_id.partition("@")
    if not sep or not seed.lstrip("-").isdigit():
        raise KeyError(f"{item_id!r} is not a generated item id (expected 'gen.name@seed')")
    return generate(card, int(seed))
