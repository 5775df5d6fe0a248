# %% [markdown]
# # 06 · QLoRA on a GPU: a 4-bit frozen base, 16-bit adapters, and what it costs
#
# Notebook 05 stored a weight in 4.127 bits. This notebook trains through it. QLoRA (Dettmers et al., 2023,
# arXiv 2305.14314, Section 3) computes
#
# $$ Y = X\,\mathrm{doubleDequant}(c_1, c_2, W^{\text{NF4}})^\top + s\, X A^\top B^\top, \qquad s = \alpha / r, $$
#
# with the base frozen in NF4 and only $A \in \mathbb{R}^{r\times d_{in}}$, $B \in \mathbb{R}^{d_{out}\times r}$
# trained (in 16 or 32 bits). The memory saving is real only if the dequantised 16-bit weight never
# outlives the matrix product, and that needs a custom `torch.autograd.Function`.
#
# **Learning objectives.** After this notebook you can
# - explain why a plain `F.linear(x, dequantize(W))` keeps a 16-bit copy of every weight alive for the
#   backward pass, and measure it;
# - decode a double-quantised NF4 weight and write the autograd `Function` that saves only the 4-bit codes
#   (gradients checked against a dequantised reference);
# - build the QLoRA layer, quantise SmolLM2 with it, and train it;
# - compare QLoRA, 16-bit LoRA and full fine-tuning on memory (measured vs the calculator of
#   `lora_ref.memory`), time and loss; read the committed H200 results for the 7B shape;
# - explain paged and 8-bit optimizer state and measure the 8-bit one;
# - answer "when does QLoRA do poorly?" (the article's Q2) with measurements, not adjectives.
#
# **Graded exercises**: `dequantize_4bit` (3 pts), `Dequantize4bitLinear` (4 pts), `QLoRALinear` (3 pts).
# Answer cells may only use `torch`, `torch.nn as nn`, `torch.nn.functional as F`, `math`, `numpy as np` and
# your earlier answers (the autograder replays them alone).
#
# **CPU or GPU.** Everything runs on a laptop CPU in a few minutes: SmolLM2 is quantised and evaluated,
# and the three-way training comparison runs on a scaled-down model. With a CUDA GPU the comparison trains
# the real SmolLM2 and measures `torch.cuda.max_memory_allocated`. The H200 measurements committed in
# `benchmarks/results/` are shown either way, with their device and date.
# %%
import glob
import json
import math
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_ref.models import notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads
ON_GPU = DEVICE.type == "cuda"
torch.manual_seed(0)

from lora_ref.results import results_dir

RESULTS = results_dir()                         # benchmarks/results: the committed GPU measurements

# %% [markdown]
# ## 1. Why a custom autograd Function? The backward pass of a frozen linear layer
#
# For $y = x W^\top$ with $W$ frozen, the backward pass needs only
#
# $$ \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\, W, \qquad
#    \frac{\partial L}{\partial W} \text{ is never formed.} $$
#
# So backward needs $W$, not $x$. PyTorch's autograd saves whatever the operation's backward *might* need:
# call `F.linear(x, dequantize(W_4bit))` and it saves the freshly dequantised 16/32-bit `W` until backward.
# Do that in every layer and the whole model is back in 16 bits in memory during training, on top of the
# 4-bit copy. The fix (QLoRA's, bitsandbytes' `MatMul4Bit`, torchao's `nf4tensor`): an
# `autograd.Function` that saves the **4-bit codes** (already resident, so free) and dequantises *again*
# in backward: a little more compute for a lot less memory.
#
# Let us measure it with `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd
# keeps for backward. One SmolLM2 MLP weight (1536 x 576), a batch of 8 x 128 tokens:
# %%
from lora_ref import quant, qlora                        # noqa: E402


# saved_for_backward(fn, exclude) runs fn() under torch.autograd.graph.saved_tensors_hooks and adds up the
# bytes of every distinct storage autograd keeps for backward (read it in lora_ref/measure.py: 15 lines)
from lora_ref.measure import saved_for_backward          # noqa: E402


w_mlp = torch.randn(1536, 576) * 0.02
packed_mlp, state_mlp = quant.quantize_4bit(w_mlp, blocksize=64, quant_type="nf4", double_quant=True)
x_demo = torch.randn(8, 128, 576, requires_grad=True)

_, naive_bytes = saved_for_backward(
    lambda: F.linear(x_demo, quant.dequantize_4bit(packed_mlp, state_mlp, torch.float32)))
_, custom_bytes = saved_for_backward(
    lambda: qlora.Dequantize4bitLinear.apply(x_demo, packed_mlp, state_mlp, None), exclude=(packed_mlp,))
print(f"dense weight (fp32):          {w_mlp.numel() * 4 / 2**20:7.2f} MiB")
print(f"4-bit codes + constants:      {quant.quantized_nbytes(packed_mlp, state_mlp) / 2**20:7.2f} MiB")
print(f"saved for backward, F.linear(x, dequantize(W)): {naive_bytes / 2**20:7.2f} MiB  <- the dense weight again")
print(f"saved for backward, custom Function:            {custom_bytes / 2**20:7.2f} MiB")

# %% [markdown]
# ## 2. Exercise: dequantise a (double-quantised) 4-bit weight
#
# `lora_ref.quant.quantize_4bit(W, blocksize, quant_type, double_quant)` returns `(packed, state)` in
# bitsandbytes' layout. The `state` (a frozen dataclass, `lora_ref.quant.QuantState`) has the fields
#
# | field | meaning |
# | --- | --- |
# | `shape`, `dtype` | the original weight's shape and dtype (the default output dtype) |
# | `blocksize`, `code` | values per block; the 16-level codebook (NF4 or FP4), float32 |
# | `absmax` | one float32 absmax per block, **or**, with double quantisation, one uint8 code per block |
# | `state2` | `None`, or the 8-bit state of the absmax values: `state2.code` (256 levels), `state2.absmax` (one float32 per `state2.blocksize` absmax values), `state2.blocksize` (256) |
# | `offset` | with double quantisation: the mean that was subtracted from the absmax values |
#
# Decoding mirrors notebook 05 plus one step (QLoRA Section 3, "Double Quantization"):
#
# $$ \text{absmax}_b = \begin{cases} \texttt{absmax}_b & \text{(plain)} \\
#    \texttt{state2.code}[\texttt{absmax}_b] \cdot \texttt{state2.absmax}_{\lfloor b / 256 \rfloor} + \texttt{offset} & \text{(double quantisation)} \end{cases} $$
#
# $$ \hat w_i = \texttt{code}[q_i] \cdot \text{absmax}_{\lfloor i / B \rfloor}, $$
#
# with the codes $q$ unpacked from `packed` (shape `(ceil(n/2), 1)`, first value in the high nibble).
# Compute in float32 and cast once at the end to `dtype` (default `state.dtype`), then reshape to
# `state.shape`. Vectorised: no Python loop over blocks.
# %% answer id=dequantize_4bit
def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype = None) -> torch.Tensor:
    """packed (ceil(n/2), 1) uint8 + QuantState -> the weight, shape state.shape, in dtype (default state.dtype)."""
    ### BEGIN SOLUTION
    dtype = state.dtype if dtype is None else dtype
    n = math.prod(state.shape)
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)[:n].long()
    values = state.code.to(flat.device)[codes]                                  # (n,) float32
    if state.state2 is None:
        absmax = state.absmax.float()
    else:
        s2 = state.state2
        q2 = state.absmax.long()
        scales2 = s2.absmax.float().repeat_interleave(s2.blocksize)[: q2.numel()]
        absmax = s2.code.to(flat.device)[q2] * scales2 + state.offset
    scales = absmax.to(flat.device).repeat_interleave(state.blocksize)[:n]
    return (values * scales).to(dtype).reshape(state.shape)
    ### END SOLUTION


# %% test id=test_dequantize_4bit points=3
# hand-worked: values that sit exactly on NF4 levels times an absmax of 2 come back exactly
_w = 2 * quant.nf4_code()[[15, 0, 7, 8, 3, 11, 14, 1]].reshape(2, 4)   # one block of 8 (blocksize 32)
_p, _s = quant.quantize_4bit(_w, blocksize=32, quant_type="nf4")
_d = dequantize_4bit(_p, _s)
assert _d.shape == (2, 4) and _d.dtype == torch.float32, f"expected a (2, 4) float32 tensor, got {tuple(_d.shape)} {_d.dtype}"
assert torch.equal(_d, _w), f"levels x absmax must come back exactly: expected {_w}, got {_d}"
assert torch.equal(_p.reshape(-1)[:2], torch.tensor([0xF0, 0x78], dtype=torch.uint8)), "unpack: first value in the high nibble"
_big = torch.randn(300, 64) * 0.02
for _dq in (False, True):
    _p, _s = quant.quantize_4bit(_big, 64, "nf4", double_quant=_dq)
    _mine = dequantize_4bit(_p, _s)
    assert torch.allclose(_mine, quant.dequantize_4bit(_p, _s), atol=1e-7), f"double_quant={_dq}: differs from lora_ref"
assert dequantize_4bit(_p, _s, torch.bfloat16).dtype == torch.bfloat16, "the dtype argument sets the output dtype"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("06.dequantize_4bit", dequantize_4bit)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Exercise: the autograd Function that keeps only the 4-bit weight
#
# Write `Dequantize4bitLinear`, a `torch.autograd.Function` with the signature of `lora_ref.qlora`'s:
#
# * `forward(ctx, x, packed, state, bias)`: dequantise `W` to `x.dtype` with your `dequantize_4bit`,
#   return `F.linear(x, W, bias)`; save **only** `packed` with `ctx.save_for_backward` (the state is a
#   frozen dataclass: keep it as `ctx.state`). Do not keep `W` (not in `save_for_backward`, not as a `ctx`
#   attribute): it must be freed when forward returns.
# * `backward(ctx, grad_out)`: dequantise `W` again (in `grad_out.dtype`) and return
#   `(grad_x, None, None, grad_bias)`: `grad_x = grad_out @ W` when `ctx.needs_input_grad[0]`,
#   `grad_bias` = `grad_out` summed over every dimension but the last when `ctx.needs_input_grad[3]`, else
#   `None`.
#
# Shapes: `x` (..., in), `packed` (ceil(out*in/2), 1) uint8, `bias` (out,) or None, result (..., out).
# %% answer id=dequantize_4bit_linear
class Dequantize4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W kept in 4 bits: dequantised in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        """Dequantise W in x.dtype, return F.linear(x, W, bias); save only ``packed`` (and ctx.state)."""
        ### BEGIN SOLUTION
        weight = dequantize_4bit(packed, state, x.dtype)             # (out, in), transient
        ctx.state = state
        ctx.save_for_backward(packed)
        return F.linear(x, weight, bias)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_out):
        """(grad_x, None, None, grad_bias) with W dequantised again; None where no gradient is needed."""
        ### BEGIN SOLUTION
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_4bit(packed, ctx.state, grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias
        ### END SOLUTION


# %% test id=test_dequantize_4bit_linear points=4
torch.manual_seed(1)
_w = torch.randn(48, 64) * 0.05
_p, _s = quant.quantize_4bit(_w, 64, "nf4", double_quant=True)
_W = quant.dequantize_4bit(_p, _s, torch.float32)                    # the weight the layer computes with
_b = torch.randn(48, requires_grad=True)
_x = torch.randn(2, 5, 64, requires_grad=True)
_y, _saved = saved_for_backward(lambda: Dequantize4bitLinear.apply(_x, _p, _s, _b), exclude=(_p,))
_x2 = _x.detach().clone().requires_grad_(True)
_b2 = _b.detach().clone().requires_grad_(True)
_y2 = F.linear(_x2, _W, _b2)                                           # the dense reference
assert _y.shape == (2, 5, 48), f"output shape should be (2, 5, 48), got {tuple(_y.shape)}"
assert torch.allclose(_y, _y2, atol=1e-5), "forward must equal F.linear(x, dequantize(W), b)"
_g = torch.randn_like(_y)
_y.backward(_g)
_y2.backward(_g)
assert _x.grad is not None and torch.allclose(_x.grad, _x2.grad, atol=1e-5), "dL/dx = dL/dy @ W"
assert _b.grad is not None and torch.allclose(_b.grad, _b2.grad, atol=1e-5), "dL/db = dL/dy summed over batch dims"
assert _saved <= 64, f"autograd saved {_saved} bytes beyond the packed codes: do not save the dequantised weight"
assert not any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() >= _W.numel()
               for v in vars(_y.grad_fn).values()), "do not keep W as a ctx attribute either"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("06.dequantize_4bit_linear", Dequantize4bitLinear)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Exercise: the QLoRA layer
#
# QLoRA = that frozen 4-bit base + LoRA adapters in 16/32 bits. Write `QLoRALinear(base, r=8, alpha=16.0)`
# where `base` is a `lora_ref.qlora.Linear4bit` (it holds `weight`: the packed codes, `quant_state`, `bias`,
# `in_features`, `out_features`, `compute_dtype`). Same conventions as notebook 02's `LoRALinear`:
#
# * keep the base as `self.base_layer` (wrapped, not copied) and freeze its parameters;
# * `lora_A`: (r, in) float32 `nn.Parameter`, `kaiming_uniform_(a=math.sqrt(5))`; `lora_B`: (out, r)
#   float32 zeros; `scaling = alpha / r`;
# * `forward(x)`: base output = `Dequantize4bitLinear.apply(x.to(cd), base.weight, base.quant_state, bias)`
#   with `cd = base.compute_dtype` and `bias` = `base.bias` cast to `cd` (or None), cast back to `x.dtype`;
#   plus `scaling * (x A^T) B^T` computed in float32 and cast to the output's dtype.
# %% answer id=qlora_linear
class QLoRALinear(nn.Module):
    """y = base_4bit(x) + (alpha / r) * x A^T B^T; A (r, in), B (out, r); only A and B train."""

    def __init__(self, base, r: int = 8, alpha: float = 16.0):
        super().__init__()
        ### BEGIN SOLUTION
        if not 1 <= r <= min(base.in_features, base.out_features):
            raise ValueError(f"r={r} must be in [1, min(in, out)]")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, float(alpha), alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        base = self.base_layer
        cd = base.compute_dtype
        bias = None if base.bias is None else base.bias.to(cd)
        out = Dequantize4bitLinear.apply(x.to(cd), base.weight, base.quant_state, bias).to(x.dtype)
        update = (x.float() @ self.lora_A.t()) @ self.lora_B.t()
        return out + (update * self.scaling).to(out.dtype)
        ### END SOLUTION


# %% test id=test_qlora_linear points=3
torch.manual_seed(2)
_lin = nn.Linear(64, 32)
_base = qlora.Linear4bit.from_linear(_lin, "nf4", blocksize=64, double_quant=True)
_layer = QLoRALinear(_base, r=4, alpha=8.0)
assert _layer.base_layer is _base, "wrap the base layer (self.base_layer = base), do not copy it"
assert tuple(_layer.lora_A.shape) == (4, 64) and tuple(_layer.lora_B.shape) == (32, 4), "A is (r, in), B is (out, r)"
assert torch.all(_layer.lora_B == 0) and _layer.scaling == 2.0, "B starts at 0; scaling = alpha / r"
_trainable = sorted(n for n, p in _layer.named_parameters() if p.requires_grad)
assert _trainable == ["lora_A", "lora_B"], f"only the adapters train, got {_trainable}"
_x = torch.randn(3, 64)
assert torch.allclose(_layer(_x), _base(_x), atol=1e-6), "with B = 0 the layer equals its 4-bit base"
with torch.no_grad():
    _layer.lora_B.normal_()
_x.requires_grad_(True)
_out = _layer(_x)
_out.sum().backward()
_ref = _base.dequantize().t() @ torch.ones(32) + 2.0 * (_layer.lora_B @ _layer.lora_A).t() @ torch.ones(32)
assert torch.allclose(_x.grad[0], _ref, atol=1e-4), "dL/dx must flow through the 4-bit base and the adapter"
assert _layer.lora_A.grad is not None and _layer.lora_B.grad is not None, "A and B receive gradients"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("06.qlora_linear", QLoRALinear)
### END HIDDEN TESTS

# %% [markdown]
# ## 5. Quantise SmolLM2
#
# `lora_ref.qlora.quantize_model` replaces every `nn.Linear` by a `Linear4bit` (NF4, double quantisation,
# blocksize 64), in place, and reports the bytes. The output head is left dense (as bitsandbytes and
# transformers do); in SmolLM2 it is tied to the input embedding anyway. Then we check what the 4-bit
# weights do to the model: the held-out answer loss (cross-entropy on answer tokens only) before and after.
#
# (Recall from notebook 05: SmolLM2 ships as a Q4_1 GGUF, so its weights already sit on a 4-bit grid;
# NF4 re-quantises them onto a *different* 4-bit grid.)
# %%
from lora_ref.models import load_smollm2              # noqa: E402
from lora_ref.data import load_dataset                 # noqa: E402
from lora_ref import training                          # noqa: E402

splits = load_dataset()
n_eval = 4 if GRADING else 12
eval_set = splits.heldout[:n_eval]
smol, tok = load_smollm2(device=DEVICE)
t0 = time.perf_counter()
loss_base = training.evaluate_loss(smol, tok, eval_set, batch_size=4)
t_base = time.perf_counter() - t0
W_down10 = smol.model.layers[10].mlp.down_proj.weight.detach().float().cpu().clone()   # kept for section 8b
report = qlora.quantize_model(smol, quant_type="nf4", double_quant=True,
                              compute_dtype=torch.bfloat16 if ON_GPU else torch.float32)
t0 = time.perf_counter()
loss_nf4 = training.evaluate_loss(smol, tok, eval_set, batch_size=4)
t_nf4 = time.perf_counter() - t0
print(report)
print(f"held-out answer loss on {n_eval} questions: 16/32-bit {loss_base:.3f} (perplexity {math.exp(loss_base):.2f}), "
      f"NF4 {loss_nf4:.3f} (perplexity {math.exp(loss_nf4):.2f})")
print(f"evaluation time: {t_base:.1f} s dense, {t_nf4:.1f} s NF4 (every forward dequantises 210 weights)")

# %% [markdown]
# The 4-bit base costs something before any training: the held-out loss above rises when SmolLM2's
# weights go from their Q4_1 grid to NF4 (a small model on a 4-bit grid twice over is a hard case), and each
# forward pass takes longer on a CPU because it dequantises every weight. The adapters will learn the task on
# top of this base, and section 8 measures what they cannot repair.
#
# ## 6. QLoRA vs 16-bit LoRA vs full fine-tuning
#
# One function trains one method and measures it: the same data, steps, batch size and learning rate per
# method (full fine-tuning gets a 10x smaller learning rate, as usual). Memory is measured two ways:
#
# * on a GPU, `torch.cuda.max_memory_allocated` over one steady-state training step (optimizer state
#   already allocated), against `lora_ref.memory.training_memory`;
# * on a CPU, by counting bytes: parameters and buffers, gradients, optimizer state, and the activations
#   autograd saves (the hooks of section 1), against the same calculator's parts.
#
# On a CPU the comparison runs on a **scaled-down** Llama (random weights, SmolLM2's architecture, 4 layers
# of width 128, a 256-token vocabulary trained on the course data): the point there is memory and time,
# not quality. On a GPU it trains the real SmolLM2-135M.
# %%
from lora_ref import memory as M                        # noqa: E402
from lora_ref import optim as course_optim             # noqa: E402
from lora_ref.lora import LoRAConfig, count_parameters   # noqa: E402
from lora_ref.measure import cuda_step_peak, step_bytes   # noqa: E402
from lora_ref.methods import prepare_model             # noqa: E402


def prepare(method, make_model, r):
    """A fresh model for ``method`` ('full', 'lora' or 'qlora'; QLoRA = NF4 with double quantisation, then
    LoRA), adapters on all 7 projections: ``lora_ref.methods.prepare_model``."""
    model = make_model()
    cfg = None if method == "full" else LoRAConfig(r=r, alpha=2 * r, target_modules="all-linear")
    return prepare_model(model, method, cfg, compute_dtype=next(model.parameters()).dtype)


def run_method(method, make_model, tokenizer, steps, batch_size, r, lr):
    """Train ``method`` for ``steps``, then measure one more step: CUDA peak, or bytes by storage on a CPU
    (``lora_ref.measure.step_bytes``: weights, gradients, optimizer state, saved activations)."""
    model = prepare(method, make_model, r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr / 10 if method == "full" else lr)
    res = training.train(model, tokenizer, splits.train, steps=steps, batch_size=batch_size, optimizer=opt,
                         progress=True)
    batch = {k: v.to(DEVICE) for k, v in next(training.batches(splits.train, tokenizer, batch_size, seed=7)).items()}
    row = {"method": method, "params": count_parameters(model), "losses": res.losses,
           "s_per_step": res.seconds / steps, "seq": batch["input_ids"].shape[1],
           "eval_loss": training.evaluate_loss(model, tokenizer, splits.heldout[:n_eval], batch_size=4)}
    row["memory"] = ({"peak": cuda_step_peak(model, opt, batch)} if ON_GPU else step_bytes(model, opt, batch))
    return model, row


if ON_GPU:
    make_model = lambda: load_smollm2(dtype=torch.bfloat16, device=DEVICE)[0]       # noqa: E731
    tokenizer, RANK, STEPS, BATCH, LR = tok, 16, (30 if GRADING else 150), 8, 2e-4
    label = "SmolLM2-135M (real weights), bf16"
    model_config = smol.config
else:
    from lora_ref.data import tiny_tokenizer
    from lora_ref.models import tiny_llama
    tokenizer = tiny_tokenizer()
    make_model = lambda: tiny_llama(seed=0, hidden_size=128, intermediate_size=384, num_hidden_layers=4,  # noqa: E731
                                    num_attention_heads=4, num_key_value_heads=2)
    RANK, STEPS, BATCH, LR = 4, (8 if GRADING else 25), 8, 2e-3
    label = "scaled-down Llama (4 layers x 128, random weights), fp32"
    model_config = make_model().config
shape = M.ModelShape.from_config(model_config, name="this model")

rows, models = {}, {}
for method in tqdm(["full", "lora", "qlora"], desc=f"training 3 methods on {label}"):
    models[method], rows[method] = run_method(method, make_model, tokenizer, STEPS, BATCH, RANK, LR)
for m, r in rows.items():
    print(f"{m:>6}: {r['params']}; {r['s_per_step'] * 1e3:7.1f} ms/step; loss {r['losses'][0]:.2f} -> "
          f"{np.mean(r['losses'][-5:]):.2f}; held-out answer loss {r['eval_loss']:.2f}")

# %%
dtype_name = "bf16" if ON_GPU else "fp32"
calc = {m: M.training_memory(shape, m, r=RANK, targets="all-linear", batch=BATCH, seq=rows[m]["seq"],
                             dtype=dtype_name, adapter_dtype="fp32", grad_checkpointing=False)
        for m in rows}
fig, axes = plt.subplots(1, 3 if not ON_GPU else 2, figsize=(15 if not ON_GPU else 11, 3.6))
for m, r in rows.items():
    axes[0].plot(r["losses"], label=m)
axes[0].set_xlabel("step"); axes[0].set_ylabel("training loss (answer tokens)"); axes[0].legend()
axes[0].set_title(label, fontsize=9)
if ON_GPU:
    print(f"{'method':>6} {'measured peak':>14} {'calculator':>11} {'error':>7}")
    for m, r in rows.items():
        meas, pred = r["memory"]["peak"], calc[m].total
        print(f"{m:>6} {meas / 2**30:11.2f} GiB {pred / 2**30:8.2f} GiB {100 * (pred / meas - 1):+6.1f}%")
    axes[1].bar(list(rows), [rows[m]["memory"]["peak"] / 2**30 for m in rows], label="measured peak")
    axes[1].scatter(list(rows), [calc[m].total / 2**30 for m in rows], color="k", zorder=3, label="calculator")
    axes[1].set_ylabel("GiB")
else:
    parts = ["weights", "gradients", "optimizer", "activations"]
    print(f"{'method':>6} " + " ".join(f"{p:>22}" for p in parts) + "   (measured / calculator, KiB)")
    for m, r in rows.items():
        pred = {"weights": calc[m].weights, "gradients": calc[m].gradients, "optimizer": calc[m].optimizer,
                "activations": shape.n_layers * calc[m].act.layer + calc[m].act.head + calc[m].act.loss_forward}
        print(f"{m:>6} " + " ".join(f"{r['memory'][p] / 1024:10.0f} / {pred[p] / 1024:9.0f}" for p in parts))
    bottom = np.zeros(3)
    for p in parts[:3]:
        vals = np.array([rows[m]["memory"][p] / 2**20 for m in rows])
        axes[1].bar(list(rows), vals, bottom=bottom, label=p)
        bottom += vals
    axes[1].set_ylabel("MiB (counted)"); axes[1].set_title("model state of one training step")
    axes[2].bar(list(rows), [rows[m]["memory"]["activations"] / 2**20 for m in rows], color="tab:red")
    axes[2].set_ylabel("MiB (counted)"); axes[2].set_title("activations saved for backward")
axes[1].legend(fontsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# ### The real model on this machine: a few QLoRA steps on SmolLM2
#
# On a GPU the comparison above already trained SmolLM2. On a CPU, here is the real thing at small scale:
# the NF4 SmolLM2 of section 5 gets rank-16 adapters on all 7 projections and trains for a few steps.
# %%
if ON_GPU:
    print("(on a GPU the comparison above trained the real SmolLM2: nothing to add here)")
else:
    qlora.inject_qlora(smol, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    print(count_parameters(smol))
    real_steps = 2 if GRADING else 6
    res_real = training.train(smol, tok, splits.train, steps=real_steps, batch_size=2, lr=2e-4, progress=True)
    print(f"QLoRA on SmolLM2, {real_steps} steps of 2 examples: loss per step "
          f"{[round(v, 2) for v in res_real.losses]}, {res_real.seconds / real_steps:.1f} s/step on this CPU")

# %% [markdown]
# What to read in these numbers. Weights: QLoRA's linear layers take about a quarter of their 16-bit bytes
# (4.127 of 16 bits per weight), but SmolLM2's tied 49,152 x 576 embedding (a fifth of its parameters) and
# its norms stay 16-bit, so the whole QLoRA base is 41.5% of the 16-bit model, not a quarter (notebook 08
# computes it; the H200 run measured the QLoRA run's resident weights at
# {{result:memory_vs_measured_h200.json:rows.2.measured_weights_gb/rows.1.measured_weights_gb:.0%}} of the LoRA run's,
# adapters included). At the 7B shape, where the linear layers are 96% of the parameters, it is close to a quarter. Gradients and optimizer
# state: full fine-tuning pays for every parameter (gradient 1x, AdamW moments 2x the weights), LoRA and
# QLoRA only for the adapters. Activations are about the same for all three: the base layers of LoRA and
# QLoRA still have to carry gradients back to earlier adapters. On a GPU, the activations and the loss
# buffers (batch x sequence x 49,152 vocabulary logits in fp32) dominate SmolLM2's peak, which is why the
# 7B-shape table below is the interesting one. (The calculator counts a GPU's bf16 kernels with SDPA
# attention; on the CPU in fp32 the activation column is an approximation, the other three are exact counts.)
#
# ### The committed GPU results (benchmarks/results/)
#
# The perf helpers ran `benchmarks/qlora_step.py`, `benchmarks/memory_vs_measured.py` and
# `benchmarks/dequant_speed.py` on an NVIDIA H200: the Llama-2-7B shape (random weights), batch 4 x 512
# tokens, r = 16 on all 7 projections, AdamW, bf16 compute, NF4 + double quantisation, with and without
# gradient checkpointing. The cell reads whatever JSON files are there (benchmarks/README.md discusses them).
# One finding to remember: the anchor's {{result:qlora_step_llama-2-7b_h200.json:anchor.recipe.peak_gb:.2f}} GB for
# the recipe was measured *without* checkpointing (this run reproduces it without checkpointing at
# {{result:qlora_step_llama-2-7b_h200.json:results.recipe_no_ckpt.peak_gb:.2f}} GB, and measures
# {{result:qlora_step_llama-2-7b_h200.json:results.recipe.peak_gb:.2f}} GB with it): a model from `from_pretrained`
# is in eval mode, and transformers only checkpoints layers in training mode.
# %%


def load_results(pattern):
    """[(path, payload)] for the committed benchmark JSON files matching pattern (CPU runs left out)."""
    out = []
    for path in sorted(glob.glob(str(RESULTS / pattern))):
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"could not read {path}: {e}")
            continue
        if not str(payload.get("info", {}).get("gpu", "none")).startswith("none"):
            out.append((Path(path), payload))
    return out


def describe(info):
    return (f"{info.get('gpu', '?')}, {info.get('date', '?')}, torch {info.get('torch', '?')}, "
            f"bitsandbytes {info.get('bitsandbytes', '-')}, transformers {info.get('transformers', '-')}, peft {info.get('peft', '-')}")


step_results = load_results("qlora_step_*.json")
if not step_results:
    print(f"No GPU results in {RESULTS} yet (benchmarks/qlora_step.py writes them on a GPU). "
          "Until then, the anchor figures from ../shared/ANCHORS.md (H200, Transformers + bitsandbytes + PEFT):")
    print("  Llama-2-7B  QLoRA recipe: 25.87 GB peak, 5,060 tokens/s   |  bf16 LoRA: 32.82 GB, 8,088 tokens/s")
for path, payload in step_results:
    print(f"\n{path.name}: shape {payload.get('shape')}, batch {payload.get('batch')} x {payload.get('seq')} tokens")
    print("  measured on", describe(payload.get("info", {})))
    print(f"  {'mode':>17} {'tokens/s':>9} {'step s':>7} {'peak GB':>8}  note")
    notes = {"recipe": "Transformers + bitsandbytes + PEFT (the usual QLoRA recipe)",
             "recipe_no_ckpt": "the recipe without gradient checkpointing (how the anchor was measured)",
             "bf16_lora": "16-bit LoRA, same stack", "bf16_lora_no_ckpt": "16-bit LoRA without checkpointing",
             "lora_ref": "lora_ref.qlora (this course's readable layer)",
             "fast": "lora_ref.kernels (Triton dequant, fused base + adapter, chunked loss)",
             "fast_norm": "fast + fused RMSNorm"}
    for mode, res in payload.get("results", {}).items():
        if "error" in res:
            print(f"  {mode:>17}  error: {str(res['error']).splitlines()[-1][:80]}")
            continue
        print(f"  {mode:>17} {res['tokens_per_s']:9,.0f} {res['step_s']:7.3f} {res.get('peak_gb', float('nan')):8.2f}  "
              f"{notes.get(mode, '')}")
    for mode, pred in payload.get("calculator_peak_gb", {}).items():
        print(f"  calculator ({mode}): {pred:.2f} GB")

mem_results = load_results("memory_vs_measured*.json")
for path, payload in mem_results:
    print(f"\n{path.name}: calculator vs torch.cuda.max_memory_allocated, measured on {describe(payload.get('info', {}))}")
    for row in payload.get("rows", []):
        if "measured_gb" in row:
            print(f"  {row['shape']:>15} {row['method']:>10}: measured {row['measured_gb']:7.2f} GB, "
                  f"calculator {row['predicted_gb']:7.2f} GB ({100 * row['error']:+.1f}%)")
    print(f"  {payload.get('within_10pct')}/{payload.get('n')} configurations within 10%")
if not mem_results:
    print("\nNo memory-vs-measured GPU results yet (benchmarks/memory_vs_measured.py).")

for path, payload in load_results("dequant_speed_*.json"):
    rows_d = payload.get("speed", {}).get("rows", {})
    print(f"\n{path.name}: NF4 dequantise of a {payload.get('shape')} weight, measured on {describe(payload.get('info', {}))}")
    for name, r in rows_d.items():
        if name.startswith(("tiled_", "flat_")):      # the kernel-tuning sweep: see benchmarks/README.md
            continue
        gbps = f"{r['GBps']:7.0f} GB/s" if "GBps" in r else ""
        print(f"  {name:>28}: {r['median_ms']:7.3f} ms {gbps}")
    parity = payload.get("parity", {})
    if parity:
        print(f"  bit parity with bitsandbytes on the GPU: {sum(v for v in parity.values() if isinstance(v, (int, float)))} "
              f"values or bytes differ over {len(parity)} checks")

# %% [markdown]
# ### What each trick bought: the 7B-shape step, and Llama-2-70B on one 48 GB card
#
# `benchmarks/qlora_step.py` ran every way of taking the step twice on one H200, each in its own process,
# with the usual recipe in the same round (the ratio column divides by that round's recipe: speeds move with
# the host CPU between machines, ratios less). A profiled step's CPU and CUDA times say who waits: when the
# CPU needs longer to *launch* the kernels than the GPU needs to *run* them, the GPU idles. That was the
# eager step here (thousands of small launches: dequantise, matmuls, casts, norms, per layer, forward,
# recomputation and backward). `lora_ref.kernels.CUDAGraphStep` records the whole step once and replays it
# with one launch. MFU divides 6 x parameters x tokens by the step time and the matmul rate measured in the
# same run (the definition; QLoRA skips the weight gradients, so it does less work than 6NT).
# %%
from lora_ref.results import load_result      # noqa: E402

TRICKS = [("recipe", "Transformers + bitsandbytes + PEFT (the usual recipe)"),
          ("recipe_liger", "the recipe + Liger's fused Triton kernels"),
          ("lora_ref", "lora_ref.qlora: this notebook's readable layer"),
          ("fast_norm", "lora_ref.kernels: Triton dequantise, base + adapter in one node, chunked loss, fused RMSNorm"),
          ("fast_compile", "the same + torch.compile of every decoder layer"),
          ("lora_ref_graph", "the readable layer, the whole step as one CUDA graph"),
          ("fast_graph", "the fast path, the whole step as one CUDA graph")]
trick_run = load_result("qlora_step_graphs_a_llama-2-7b_h200.json")
if trick_run:
    res, rel = trick_run["results"], trick_run["vs_recipe_same_run"]
    print(f"Llama-2-7B shape, batch {trick_run['batch']} x {trick_run['seq']}, r = {trick_run['r']}, measured on "
          f"{describe(trick_run['info'])}; matmul {trick_run['info']['matmul_tflops']:.0f} TFLOP/s")
    print(f"{'tokens/s (2 rounds)':>21} {'vs recipe':>11} {'peak GB':>8} {'MFU':>5} {'CPU/CUDA ms':>12}  trick")
    for mode, what in TRICKS:
        runs = [k for k in (mode, mode + "#2") if k in res and "error" not in res[k]]
        if not runs:
            continue
        tps = " / ".join(f"{res[k]['tokens_per_s']:,.0f}" for k in runs)
        ratio = " / ".join(f"{rel[k]['speed_vs_recipe']:.2f}" for k in runs if k in rel)
        prof = next((f"{res[k]['cpu_ms']:.0f}/{res[k]['cuda_ms']:.0f}" for k in runs if "cpu_ms" in res[k]), "")
        print(f"{tps:>21} {ratio:>11} {res[runs[0]]['peak_gb']:8.2f} {res[runs[0]]['mfu_6nt']:5.0%} {prof:>12}  {what}")
    # a graph replays the same kernels: its losses (logged from the 3rd step, after 2 eager warm-up steps)
    # continue the eager run's
    eager_l, graph_l = res["fast_norm"]["losses"][2:7], res["fast_graph"]["losses"][:5]
    print("losses, steps 3-7: eager", [round(v, 3) for v in eager_l], " one CUDA graph", [round(v, 3) for v in graph_l])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    shown = [(m, w) for m, w in TRICKS if m in res and "error" not in res[m]]
    names = [m for m, _ in shown]
    axes[0].barh(names, [max(res[k]["tokens_per_s"] for k in (m, m + "#2") if k in res) for m in names], color="#2a6")
    axes[0].set_xlabel("tokens / s (best of 2 rounds)")
    axes[1].barh(names, [res[m]["peak_gb"] for m in names], color="#36a")
    axes[1].set_xlabel("peak GB (torch.cuda.max_memory_allocated)")
    fig.suptitle("One QLoRA step, Llama-2-7B shape, NVIDIA H200")
    fig.tight_layout()
    plt.show()
second = load_result("qlora_step_graphs_b_llama-2-7b_h200.json")
if second:
    r2, rel2 = second["results"], second["vs_recipe_same_run"]
    for mode in ("fast_graph", "lora_ref_graph"):
        print(f"second machine, {mode}: " + " / ".join(
            f"{r2[k]['tokens_per_s']:,.0f} tok/s ({rel2[k]['speed_vs_recipe']:.2f}x its recipe's "
            f"{r2['recipe' + k[len(mode):]]['tokens_per_s']:,.0f})" for k in (mode, mode + "#2") if k in r2)
              + f", peak {r2[mode]['peak_gb']:.2f} GB ({rel2[mode]['peak_vs_recipe']:.2f}x)")

# %% [markdown]
# The second question is QLoRA's headline (arXiv 2305.14314, Section 1): a 65B-class model fine-tuned on one
# 48 GB GPU. The 4-bit weights of Llama-2-70B would fit (the calculator's figure is printed below), but the
# usual recipe first builds the whole 16-bit model and quantises it afterwards. `qlora.build_quantized`
# builds the layers on the `meta` device (shapes, no memory), then allocates, fills and quantises one layer
# at a time, so no more than one 16-bit layer ever exists; `lora_ref.memory.build_memory` predicts both builds.
# %%
big = load_result("qlora_70b_llama-2-70b_h200.json")
plan = M.build_memory("llama-2-70b", streamed=True)
print(f"calculator, Llama-2-70B: 79 of its 80 layers in 4 bits {plan.quantized / 1e9:.1f} GB + the 80th still "
      f"16-bit {plan.dense_layers / 1e9:.2f} GB at the streamed build's peak; the whole 16-bit model "
      f"{M.build_memory('llama-2-70b', streamed=False).total / 1e9:.0f} GB")
if big:
    print(f"Llama-2-70B shape, batch {big['batch']} x {big['seq']}, r = {big['r']}, measured on {describe(big['info'])}")
    print(f"{'mode':>17} {'build GB':>9} {'train GB':>9} {'fits 48 GB':>10} {'step s':>7}  "
          f"{'calculator build / train':>24}")
    for mode in ("recipe", "stream_lora_ref", "stream_fast", "stream_fast_8bit"):
        r, s, p = big["results"][mode], big["summary"][mode], big["predicted"][mode]
        pred = f"{p['build_peak_gb']:.1f} / " + (f"{p['train_peak_gb']:.1f}" if "train_peak_gb" in p else "-")
        print(f"{mode:>17} {r['build_peak_gb']:9.2f} {r['train_peak_gb']:9.2f} {str(s['fits_48gb']):>10} "
              f"{r['step_s']:7.2f}  {pred:>24}")
    print(f"stream_* = built by qlora.build_quantized (one 16-bit layer at a time); _8bit = lora_ref.optim.AdamW8bit. "
          f"The recipe's training peak fits, but it never gets there on a 48 GB card: its build needs "
          f"{big['results']['recipe']['build_peak_gb']:.0f} GB.")

# %% [markdown]
# ### Quality: QLoRA vs 16-bit LoRA on SmolLM2, the full run
#
# Memory and speed are half the story. `benchmarks/quality_qlora.py` trains SmolLM2 with LoRA on the dense
# base, with QLoRA on the NF4 + DQ base, and with QLoRA + 8-bit AdamW (same seed, data order, steps,
# r = 16 on all 7 projections), then measures held-out fact accuracy (the share of the 82 held-out questions
# whose greedy answer states the fact). On a GPU the LoRA base is bf16 and QLoRA computes in bf16, as in the
# QLoRA paper. Two committed runs: 5 seeds on an H200 (minutes), and a cut-down single-seed run on the CPU
# (60 steps, under-trained: it takes half an hour). One seed is noisy: 82 questions, 1.2 points each.
# %%
quality = [(Path(p), json.loads(Path(p).read_text())) for p in sorted(glob.glob(str(RESULTS / "quality_qlora_*.json")))
           if "_small" not in Path(p).name]
if not quality:
    print(f"No quality_qlora results in {RESULTS} yet (python benchmarks/quality_qlora.py writes them).")
for path, q in quality:
    info, n = q.get("info", {}), q.get("heldout_examples", 0)
    print(f"{path.name}: measured {info.get('date', '?')} on {info.get('gpu', '?')}, torch {info.get('torch', '?')}, "
          f"settings {q.get('settings')}")
    base = q.get("base", {})
    if base:
        print(f"  {'base (no adapter)':>18}: fact accuracy {100 * base['fact_accuracy']:5.1f}%, held-out loss {base['heldout_loss']:.3f}")
    for run, v in q.get("runs", {}).items():
        print(f"  {run:>18}: fact accuracy {100 * v['fact_accuracy']:5.1f}% ({round(v['fact_accuracy'] * n)}/{n}), "
              f"held-out loss {v['heldout_loss']:.3f}, optimizer state {v['optimizer_state_bytes'] / 2**20:.1f} MiB")
    seeds = q.get("per_seed", {})
    if len(seeds.get("lora", [])) > 1:
        for k in ("lora", "qlora"):
            accs = [100 * r["fact_accuracy"] for r in seeds[k]]
            print(f"  {k:>18}: over seeds {[r['seed'] for r in seeds[k]]}: " + ", ".join(f"{a:.1f}" for a in accs)
                  + f" -> mean {np.mean(accs):.1f}%")
    if "qlora_gap_points" in q:
        se = q.get("gap_standard_error")
        print(f"  QLoRA - LoRA: {0.0 - q['qlora_gap_points']:+.1f} points of fact accuracy"
              + (f" (mean over seeds, standard error {se:.1f})" if se else " (one seed)"))
    for how, v in q.get("deploy", {}).items():
        print(f"  deploy {how:>12}: fact accuracy {100 * v['fact_accuracy']:5.1f}%, held-out loss {v['heldout_loss']:.3f}")

# %% [markdown]
# ### The 7B shape from the calculator
#
# The calculator needs no GPU. For Llama-2-7B, batch 4 x 512, r = 16 on all linear layers, gradient
# checkpointing, bf16: where does each method's memory go? (The article's "84 GB for full fine-tuning of a 7B
# model" is 12 bytes x 7B parameters: 16-bit weights and gradients plus two fp32 Adam moments, without the
# fp32 master copy, as notebook 00 counts. Its code's "params + grads + Adam states = 4 x fp16 weights" rule
# is a different, smaller figure: 8 bytes per parameter, 56 GB; `lora_ref.memory`'s docstring takes that
# one apart.)
# %%
calc7 = {m: M.training_memory("llama-2-7b", m, r=16, targets="all-linear", batch=4, seq=512, dtype="bf16",
                              grad_checkpointing=True, master_weights=(m == "full"))
         for m in ("full", "lora", "qlora")}
print(f"{'method':>6} {'weights':>8} {'grads':>7} {'optim':>7} {'activ.':>7} {'peak GB':>8}  trainable")
for m, b in calc7.items():
    print(f"{m:>6} {b.gb('weights'):8.2f} {b.gb('gradients'):7.2f} {b.gb('optimizer'):7.2f} {b.gb('activations'):7.2f} "
          f"{b.gb('total'):8.2f}  {b.n_trainable:,}")
print("\nfull fine-tuning here uses mixed-precision AdamW: bf16 weights + fp32 master copy + fp32 gradients + "
      "fp32 moments (18 bytes/param; ZeRO's 16 keeps the gradients in bf16).")

# %% [markdown]
# ## 7. Optimizer state: paged, offloaded, 8-bit
#
# AdamW keeps two moments per trainable parameter. For LoRA/QLoRA they are small (the adapters), but the
# QLoRA paper's third innovation targets them anyway: **paged optimizers** allocate the optimizer state in
# CUDA *unified memory*, which the driver pages out to CPU RAM when the GPU runs short (a long sequence
# makes a memory spike) and back in for the optimizer step. It turns an out-of-memory crash into a slow
# step; it needs CUDA managed memory, so there is nothing to measure on a CPU. Two relatives: **CPU
# offload** (keep the state, and run the update, on the CPU: ZeRO-Offload) and **8-bit state** (Dettmers et
# al. 2022, arXiv 2110.02861): each moment stored with the blockwise *dynamic* 8-bit map of notebook 05's
# double quantisation, 2.03 bytes per parameter instead of 8.
#
# `lora_ref.optim.AdamW8bit` implements the 8-bit one. Measured below on the adapters of the model above:
# the bytes of state, and the training loss with each optimizer from the same start.
# %%
def loss_with(make_opt, steps):
    model = prepare("qlora", make_model, RANK)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params)
    res = training.train(model, tokenizer, splits.train, steps=steps, batch_size=BATCH, optimizer=opt, progress=False)
    return res.losses, course_optim.optimizer_state_nbytes(opt), sum(p.numel() for p in params)

opt_steps = max(4, STEPS // 2)
# bitsandbytes (and lora_ref) keep fp32 state for tensors under 4096 values; the scaled-down model's
# adapters are that small, so the threshold is lowered here to quantise them all (SmolLM2's are 9,216+).
min_size = 4096 if ON_GPU else 256
losses32, bytes32, n_adapter = loss_with(lambda ps: torch.optim.AdamW(ps, lr=LR), opt_steps)
losses8, bytes8, _ = loss_with(lambda ps: course_optim.AdamW8bit(ps, lr=LR, min_8bit_size=min_size), opt_steps)
print(f"adapter parameters: {n_adapter:,}")
print(f"AdamW state:       {bytes32:>10,} bytes = {bytes32 / n_adapter:.2f} bytes/param")
print(f"AdamW8bit state:   {bytes8:>10,} bytes = {bytes8 / n_adapter:.2f} bytes/param "
      f"(formula: {course_optim.adamw_state_bytes_per_param(True):.2f})")
print(f"final loss: AdamW {np.mean(losses32[-3:]):.3f}, AdamW8bit {np.mean(losses8[-3:]):.3f}")
n7 = calc7["qlora"].n_trainable
print(f"for the 7B QLoRA adapters ({n7:,} params): {8 * n7 / 1e9:.2f} GB -> "
      f"{course_optim.adamw_state_bytes_per_param(True) * n7 / 1e9:.2f} GB")
plt.figure(figsize=(6, 3.2))
plt.plot(losses32, label="AdamW (fp32 state)"); plt.plot(losses8, label="AdamW8bit", ls="--")
plt.xlabel("step"); plt.ylabel("training loss"); plt.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 8. When does QLoRA do poorly? (the article's Q2, measured)
#
# The article lists four cases in words. Here is what can be measured.
#
# ### 8a. Outliers: one large weight flattens its block
#
# Blockwise absmax quantisation scales a block by its largest value. One outlier 10x the typical weight
# squeezes the other 63 values of its block onto the few innermost levels. LLM.int8() (Dettmers et al. 2022,
# arXiv 2208.07339) found such outlier *features* emerging in models above ~6.7B parameters; block size 64 is
# QLoRA's defence (an outlier only hurts its own 63 neighbours).
# %%
g = torch.Generator().manual_seed(4)
blocks = torch.randn(4096, 64, generator=g) * 0.02
ratios = [1, 2, 4, 8, 16, 32, 64]
errs = []
for k in ratios:
    w = blocks.clone()
    w[:, 0] = 0.02 * k * 3.0                                        # one outlier per block, k x a 3-sigma value
    p, s = quant.quantize_4bit(w, 64, "nf4")
    w_hat = quant.dequantize_4bit(p, s)
    others = (w_hat[:, 1:] - w[:, 1:]).norm() / w[:, 1:].norm()     # error of the 63 ordinary weights
    errs.append(others.item())
plt.figure(figsize=(6, 3.2))
plt.semilogx(ratios, errs, marker="o", base=2)
plt.xlabel("outlier size / (3 sigma)"); plt.ylabel("relative error of the other 63 weights")
plt.title("NF4, blocksize 64: one outlier per block"); plt.tight_layout(); plt.show()
for k, e in zip(ratios, errs):
    print(f"outlier {k:>2} x 3 sigma: error of the ordinary weights {e:.3f}")

# %% [markdown]
# ### 8b. A low-rank adapter cannot undo quantisation noise
#
# QLoRA's adapters learn the task *on top of* the 4-bit weights; they do not repair them. The quantisation
# error $E = W - \hat W$ is noise spread over all directions: its singular values are flat, unlike a
# fine-tuning update. The best rank-$r$ correction (Eckart-Young, notebook 01) removes only the top-$r$
# part of its energy $\sum_{i \le r} \sigma_i^2 / \sum_i \sigma_i^2$:
# %%
W = W_down10                                                           # (576, 1536), saved before quantising
p, s = quant.quantize_4bit(W, 64, "nf4", double_quant=True)
E = W - quant.dequantize_4bit(p, s)
sv = torch.linalg.svdvals(E.double())
energy = (sv ** 2).cumsum(0) / (sv ** 2).sum()
for r in (1, 4, 16, 64):
    print(f"rank {r:>3}: removes {100 * energy[r - 1]:5.1f}% of the NF4 error energy "
          f"(a random direction set would remove {100 * r / len(sv):4.1f}%)")
plt.figure(figsize=(6, 3.2))
plt.plot(energy.numpy(), label="NF4 error of layer 10 down_proj")
plt.plot(np.arange(1, len(sv) + 1) / len(sv), ls=":", color="gray", label="flat spectrum")
plt.xlabel("rank r"); plt.ylabel("share of error energy removable"); plt.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# So when a task needs precision the 4-bit base has lost (the article's "mathematical computation or code
# generation"), a rank-16 adapter can win back only a small share of it (under 10% of the error energy here). The QLoRA paper still finds NF4 +
# DQ QLoRA matching 16-bit LoRA and full fine-tuning on its benchmarks (Tables 3-4): the base's error is
# small enough there. Measure your task; do not assume.
#
# ### 8c. Speed: QLoRA pays for dequantisation on every forward *and* backward
#
# One SmolLM2 MLP layer (1536 x 576), forward + backward, batch of 8 x 128 tokens: 16-bit LoRA vs QLoRA
# (lora_ref's eager path on the CPU; on a GPU also the fused kernel when `lora_ref.kernels` finds Triton).
# %%
def fwd_bwd_ms(layer, x, reps):
    def run():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    run()
    if ON_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    if ON_GPU:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3

from lora_ref.lora import LoRALinear                  # noqa: E402

dt = torch.bfloat16 if ON_GPU else torch.float32
lin = nn.Linear(576, 1536, bias=False).to(DEVICE, dt)
lora_layer = LoRALinear(lin, r=16, alpha=32)
qlora_layer = qlora.QLoRALinear(qlora.Linear4bit.from_linear(lin, "nf4", 64, True, compute_dtype=dt), r=16, alpha=32)
xb = torch.randn(8, 128, 576, device=DEVICE, dtype=dt)
reps = 3 if GRADING else 10
t_lora, t_qlora = fwd_bwd_ms(lora_layer, xb, reps), fwd_bwd_ms(qlora_layer, xb, reps)
print(f"16-bit LoRA layer: {t_lora:7.2f} ms   QLoRA layer: {t_qlora:7.2f} ms   ({t_qlora / t_lora:.2f}x) on {DEVICE}")
from lora_ref.results import load_result                # noqa: E402

step = load_result("qlora_step_llama-2-7b_h200.json")  # the committed H200 run of benchmarks/qlora_step.py
if step is not None:
    r = step["results"]
    for ckpt, q, b in (("without", "recipe_no_ckpt", "bf16_lora_no_ckpt"), ("with", "recipe", "bf16_lora")):
        print(f"H200, Llama-2-7B step, transformers + bitsandbytes + PEFT, {ckpt} gradient checkpointing: QLoRA "
              f"{r[q]['tokens_per_s']:,.0f} vs bf16 LoRA {r[b]['tokens_per_s']:,.0f} tokens/s "
              f"({r[q]['tokens_per_s'] / r[b]['tokens_per_s']:.2f}x)")
print("bitsandbytes#465 'why is 4-bit slower than 16-bit' is this.")

# %% [markdown]
# ### 8d. Inference latency: the article's "extra de-quantisation overhead", and merging
#
# Serving the 4-bit model with its adapter attached dequantises every weight on every forward and runs the
# adapter branch too. Merging for deployment (`qlora.merge_for_deployment`: dequantise, add $sBA$ in fp32,
# store 16-bit) removes both, at up to 4x the memory of the quantised layers (the cell prints both sizes). Measured on the QLoRA model trained above: one forward
# of a 64-token prompt, unmerged 4-bit + adapter vs merged 16-bit (and the outputs agree).
# %%
import copy                                            # noqa: E402

q_model = models["qlora"]
merged = qlora.merge_for_deployment(copy.deepcopy(q_model), dtype=torch.bfloat16 if ON_GPU else torch.float32)
ids = torch.randint(3, 200, (1, 64), device=DEVICE)


@torch.no_grad()
def latency_ms(model, reps):
    model.eval()
    model(input_ids=ids)
    if ON_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        model(input_ids=ids)
    if ON_GPU:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3

with torch.no_grad():
    diff = (q_model(input_ids=ids).logits.float() - merged(input_ids=ids).logits.float()).abs().max().item()
lat_q, lat_m = latency_ms(q_model, reps), latency_ms(merged, reps)
print(f"4-bit + adapter: {lat_q:.2f} ms/forward;  merged 16-bit: {lat_m:.2f} ms/forward  ({lat_q / lat_m:.2f}x)")
print(f"max |logit difference| merged vs unmerged: {diff:.2e}")
print(f"weights: {qlora.model_nbytes(q_model) / 2**20:.2f} MiB (4-bit + adapters) vs {qlora.model_nbytes(merged) / 2**20:.2f} MiB merged")

# %% [markdown]
# The other two cases of the article's list: **very small datasets** ("quantisation noise can dominate")
# is not specific to QLoRA (any fine-tuning over-fits; notebook 04 measures it), and **GPUs without 4-bit
# kernels** is 8c: dequantisation is then plain PyTorch, as on this CPU.
#
# ## Interview practice
#
# **Q1.** Why does QLoRA need a custom autograd Function rather than `F.linear(x, dequantize(W))`?
#
# <details><summary>Model answer</summary>
#
# Autograd saves what backward may need; for `F.linear` with an input that requires grad that is the weight,
# so the dequantised 16-bit weight of every layer would stay alive until backward: the model in 16 bits again
# during training (section 1 measured it). A custom Function saves only the 4-bit codes (already resident)
# and dequantises again in backward; the weight gradient is never formed because the base is frozen. The
# price is one extra dequantisation per layer per step.
# </details>
#
# **Q2 (the article's Q2).** When might QLoRA perform poorly?
#
# <details><summary>Model answer</summary>
#
# When the 4-bit base has lost information the task needs: the quantisation error is spread over all
# directions (flat spectrum), so a rank-r adapter cannot repair it (8b: rank 16 removes under 10%);
# blocks with outliers lose their small weights (8a). When speed matters: every forward and backward
# dequantises (8c: slower per step; this project's H200 run of the usual recipe measured QLoRA at {{result:qlora_step_llama-2-7b_h200.json:results.recipe_no_ckpt.tokens_per_s/results.bf16_lora_no_ckpt.tokens_per_s:.2f}}x the
# tokens/s of bf16 LoRA without gradient checkpointing and {{result:qlora_step_llama-2-7b_h200.json:results.recipe.tokens_per_s/results.bf16_lora.tokens_per_s:.2f}}x with it). When serving unmerged: dequantisation on every forward (8d); merge into 16-bit for deployment,
# but do not re-quantise the merged weights to 4 bits (notebook 07 measures that error). Mitigations: larger
# rank or all-linear targets, blocksize 32/64, double-check on a held-out metric against 16-bit LoRA.
# </details>
#
# **Q3.** A 7B model: how much GPU memory do the frozen weights take in bf16 and in NF4 with double
# quantisation, and what else is on the GPU during QLoRA training?
#
# <details><summary>Model answer</summary>
#
# Weights: 6.74e9 x 2 bytes = 13.5 GB in bf16; with the 7 projections in NF4 + DQ (4.127 bits) and the
# embeddings, head and norms in bf16, about 3.9 GB (the calculator above). The anchor's H200 recipe run holds
# 4.40 GB because PEFT's `prepare_model_for_kbit_training` casts every parameter that is not 4-bit (here the
# embeddings, the head and the norms, 262M values) from 16 to 32 bits: +0.52 GB (computed below).
# Also: the adapters (40M params at r=16 on all 7 projections), their gradients and AdamW state (8 bytes/param
# = 0.32 GB, or 0.08 GB in 8-bit), the checkpointed activations, the loss buffers (batch x seq x vocab fp32
# logits and gradients: about 0.8 GB at 4 x 512 x 32,000) and one transient dequantised weight.
# </details>
#
# The 3.9 GB and the anchor's 4.40 GB, counted (the 7 projections in NF4 + DQ in bitsandbytes' layout; the
# rest in 16 bits as loaded, then in 32 bits as `prepare_model_for_kbit_training` leaves it: its loop casts
# every fp16/bf16 parameter whose class is not `Params4bit` to float32, src/peft/utils/other.py):
# %%
pb7 = M.param_breakdown("llama-2-7b")
nf4_7b = M.get_shape("llama-2-7b").n_layers * sum(M.quantized_linear_bytes(o * i) for o, i in M.linear_shapes("llama-2-7b").values())
rest7 = pb7.total - pb7.linear                           # embeddings + lm_head + norms
print(f"7 projections, NF4 + DQ: {pb7.linear / 1e9:.2f}B weights -> {nf4_7b / 1e9:.2f} GB")
print(f"embeddings, head, norms: {rest7 / 1e6:.0f}M weights -> {2 * rest7 / 1e9:.2f} GB in bf16, {4 * rest7 / 1e9:.2f} GB in fp32")
print(f"total: {(nf4_7b + 2 * rest7) / 1e9:.2f} GB as loaded; {(nf4_7b + 4 * rest7) / 1e9:.2f} GB after "
      "prepare_model_for_kbit_training (the anchor's 'weights on GPU')")

# %% [markdown]
# **Q4.** What are paged optimizers, and when do they help?
#
# <details><summary>Model answer</summary>
#
# Optimizer state allocated in CUDA unified memory: when a memory spike (a long batch) exhausts the GPU,
# pages of the state are evicted to CPU RAM and brought back for the optimizer step, instead of an
# out-of-memory error. They help with rare spikes; under constant pressure every step pages and training
# slows down. 8-bit optimizer state (2.03 instead of 8 bytes per parameter) shrinks the state itself.
# </details>
