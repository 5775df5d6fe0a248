# %% [markdown]
# # 07 · Merge and deploy: one model, many adapters, no added latency
#
# You have trained adapters (notebooks 03, 04, 06). Now they have to serve users. The LoRA paper
# (Hu et al., 2021, [arXiv 2106.09685](https://arxiv.org/abs/2106.09685), Section 4.1, "No Additional
# Inference Latency") promises it: merge $W' = W + sBA$ once and the model is an ordinary model again.
# Practice is messier: PEFT's issue tracker is full of "how do I merge a QLoRA adapter?" (peft#1080,
# peft#2105), "quality dropped after merging" (peft#2368, peft#1836) and "merging in bf16 changes the
# outputs" (peft#1388). This notebook answers each with a measurement.
#
# **By the end of this notebook you will have**
# 1. written `merged_weight` (merge and unmerge in fp32, one rounding) and **measured** that a merged
#    model gives the same outputs as the adapter, and unmerging gives back the base;
# 2. **measured** the latency of base, unmerged-LoRA and merged models on SmolLM2-135M;
# 3. **measured** how much of an update survives a bf16 merge, and what each way of deploying a
#    *QLoRA* adapter costs (dequantise + merge in fp32, merge into the original weights, re-quantise);
# 4. exported a merged safetensors checkpoint and a PEFT adapter, and loaded both back;
# 5. written the batched forward in which every request uses its own adapter (the S-LoRA / Punica idea),
#    and served three adapters from one base model: hot-swapping and mixed batches;
# 6. chatted with the tuned customer-service bot.
#
# Graded cells: `merged_weight` (exercise 1) and `batched_lora_delta` (exercise 2). Answer cells may use
# only `torch`, `math`, `numpy`; the rest of the notebook uses `lora_ref` freely.
# %% locked id=setup
import copy
import math
import os
import tempfile
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

# %% [markdown]
# ## 1. Merging is one addition — done carefully
#
# A LoRA layer computes $h = Wx + s\,BA\,x$ with $A \in \mathbb{R}^{r\times d_\text{in}}$,
# $B \in \mathbb{R}^{d_\text{out}\times r}$, $s = \alpha/r$. Because matrix products distribute,
#
# $$ h = (W + sBA)\,x = W' x, \qquad W' = W + s\,BA \quad(\text{merge}),\qquad W = W' - s\,BA \quad(\text{unmerge}). $$
#
# After merging, the layer is a plain `nn.Linear` of the original shape: same FLOPs, same kernels, same
# file format as the base model. Three details decide whether it is *correct*:
#
# * **Compute $sBA$ and the sum in fp32**, then round **once** to the weight's dtype. In bf16 (8 significant
#   bits: 7 stored plus the implicit leading 1) every product and every sum rounds. What PEFT does
#   (`Linear.get_delta_weight` and `Linear.merge` in src/peft/tuners/lora/layer.py, peft 0.21): it computes
#   $sBA$ **in the adapter's dtype**, except on the CPU, where fp16/bf16 $A$ and $B$ are cast to fp32 for the
#   product and the result cast back ("because some CPUs have slow bf16/fp16 matmuls": a speed reason,
#   not a precision one); `merge` then adds it to the weight in place (`W += delta`, computed in fp32 when
#   the delta is fp32), while `safe_merge=True` first casts the delta to the weight's dtype and so rounds
#   twice. PEFT keeps adapters in fp32 by default (`get_peft_model(..., autocast_adapter_dtype=True)`), so
#   a default merge rounds once; an adapter that was cast to bf16 (`model.to(torch.bfloat16)` after
#   `get_peft_model`) is multiplied in bf16 on a GPU and rounded twice (peft#1388). `lora_ref.lora`'s
#   merge (and your `merged_weight`) computes the product and the sum in fp32 whatever the device and the
#   adapter's dtype, and rounds once: a merge runs once per deployment, so its cost does not matter and
#   its rounding does.
# * **Check for NaN/Inf** before writing the weight (PEFT's `safe_merge=True`): a diverged adapter must
#   not silently destroy the base model.
# * **Shapes**: $A$ is `(r, in)`, $B$ is `(out, r)` (the `nn.Linear`/PEFT convention). The seed article
#   stores $A$ as `(in, r)` and has to transpose on merge — same maths, a convention nothing else reads.
#
# ### Exercise 1 — `merged_weight(W, A, B, scaling, sign=1.0)`
#
# Return $W + \text{sign}\cdot s\,BA$ computed in **float32** (float64 if $W$ is float64) and cast back
# to `W.dtype`. Raise `ValueError` if the shapes do not fit ($A$ `(r, in)`, $B$ `(out, r)`, $W$
# `(out, in)`) or if the result has a NaN or Inf. `sign=-1.0` unmerges.
# %% answer id=merged_weight
def merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  sign: float = 1.0) -> torch.Tensor:
    """W' = W + sign * scaling * B @ A in fp32 (or fp64), rounded once to W.dtype.

    W (out, in), A (r, in), B (out, r) -> (out, in) in W.dtype.
    """
    ### BEGIN SOLUTION
    r = A.shape[0]
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2 or A.shape[1] != W.shape[1] or B.shape != (W.shape[0], r):
        raise ValueError(f"shapes do not fit: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    out = W.float() + sign * scaling * (B.float() @ A.float())
    if not torch.isfinite(out).all():
        raise ValueError("merge produced NaN/Inf")
    return out.to(W.dtype)
    ### END SOLUTION

# %% test id=test_merged_weight points=3
# hand-worked: W = [[1, 2], [3, 4]], A = [[1, 0]], B = [[1], [2]], s = 0.5
#   B A = [[1, 0], [2, 0]];  s B A = [[0.5, 0], [1, 0]];  W' = [[1.5, 2], [4, 4]]
_W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
_A, _B = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [2.0]])
_m = merged_weight(_W, _A, _B, 0.5)
assert torch.equal(_m, torch.tensor([[1.5, 2.0], [4.0, 4.0]])), f"expected [[1.5, 2], [4, 4]], got {_m.tolist()}"
assert torch.equal(merged_weight(_m, _A, _B, 0.5, sign=-1.0), _W), "sign=-1 must undo the merge"
assert torch.equal(_W, torch.tensor([[1.0, 2.0], [3.0, 4.0]])), "do not modify W in place: return a new tensor"
_Wb = torch.full((3, 3), 100.0, dtype=torch.bfloat16)
_mb = merged_weight(_Wb, torch.full((1, 3), 0.25), torch.ones(3, 1), 1.0)   # 100.25 -> bf16 step at 100 is 0.5
assert _mb.dtype == torch.bfloat16, "return W's dtype (bfloat16 here)"
assert torch.equal(_mb, _Wb), "100 + 0.25 rounds back to 100 in bf16 (its spacing near 100 is 0.5)"
for _bad in [(_W, _A.t(), _B), (_W, _A, _B.t()), (_W, _A, _B * float("inf"))]:
    try:
        merged_weight(*_bad, 1.0)
    except ValueError:
        pass
    else:
        raise AssertionError("bad shapes or a non-finite result must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("07.merged_weight", merged_weight)
check("07.merged_weight_half", merged_weight)
### END HIDDEN TESTS

# %% [markdown]
# **Measured: merge, unmerge, and outputs.** Below, a tiny Llama (same architecture as SmolLM2) gets a
# LoRA adapter on every linear layer with a "trained-looking" random $B$ (at init $B = 0$ and every
# check would pass trivially). We compare logits of the adapter model, the merged model (through your
# `merged_weight`), and after unmerging.
# %%
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers, count_parameters
from lora_ref.models import tiny_llama

def with_random_adapter(model, r=8, seed=0, size=0.05, targets="all-linear"):
    """Inject LoRA and give B (and A) random values: a stand-in for a trained adapter."""
    inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * size)
    return model.eval()

tiny = with_random_adapter(tiny_llama(seed=0))
ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    lora_logits = tiny(ids).logits
    base_before = {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(tiny).items()}
    for layer in lora_layers(tiny).values():          # merge with YOUR function
        layer.base_layer.weight.copy_(merged_weight(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling))
        layer.merged = True                           # the wrapper now skips its branch
    merged_logits = tiny(ids).logits
    for layer in lora_layers(tiny).values():
        layer.base_layer.weight.copy_(merged_weight(layer.base_layer.weight, layer.lora_A, layer.lora_B,
                                                    layer.scaling, sign=-1.0))
        layer.merged = False
drift = max((l.base_layer.weight - base_before[n]).abs().max().item() for n, l in lora_layers(tiny).items())
print(f"max |logits(merged) - logits(adapter)|     = {(merged_logits - lora_logits).abs().max():.2e}")
print(f"max |W after merge+unmerge - W|             = {drift:.2e}   (fp32 rounding of W + d - d)")

# %% [markdown]
# The merged model reproduces the adapter to fp32 rounding, and merge + unmerge returns $W$ up to one
# rounding step of the sum. (In bf16 that step is $2^{24-8} = 2^{16} = 65{,}536$ times larger: fp32 keeps 24
# significant bits, bf16 8; see section 3.)
#
# ## 2. "No added latency" — measured
#
# Unmerged, every adapted layer does two extra thin matrix products, $x A^\top$ then $(\cdot)B^\top$:
# $r(d_\text{in} + d_\text{out})$ extra multiply-adds per token against $d_\text{in} d_\text{out}$ for
# the layer — a few percent of FLOPs at $r=16$, but also extra kernel launches and memory reads, which
# dominate at small batch. Merged, the model *is* the base model. We time the three (adapter on all 7
# projections, r = 16), interleaving the runs so that a busy shared machine slows all three alike, and
# report the median and the p10–p90 spread. On a GPU this is the real SmolLM2-135M; on the shared
# 2-core CPU it is a 4-block model with SmolLM2's exact block shapes (hidden 576, MLP 1536, 9 query and
# 3 key/value heads) and random weights, so that the cell fits the time budget — latency does not
# depend on what the weights have learned.
# %%
from lora_ref.models import load_smollm2
from lora_ref.serving import compare_latency, merged_copy

smol, tok = load_smollm2(device=DEVICE)            # the real model: real weights for sections 3 and 6
SMOL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
if DEVICE.type == "cuda":
    bench_base, bench_name = smol, "SmolLM2-135M"
else:
    bench_base = tiny_llama(seed=0, num_hidden_layers=4, vocab_size=4096, **SMOL_SHAPE).to(DEVICE)
    bench_name = "4 SmolLM2-shaped blocks"
bench_lora = with_random_adapter(copy.deepcopy(bench_base), r=16, seed=1, size=0.01)
bench_merged = merged_copy(bench_lora)
print(bench_name, "|", count_parameters(bench_lora))
BATCH, TOKENS = 1, 16        # small batches: where per-layer overheads (and so the adapter's) show
x_bench = torch.randint(3, 4096, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1)).to(DEVICE)
runs = {name: (lambda m=m: m(input_ids=x_bench)) for name, m in
        [("base", bench_base), ("LoRA unmerged", bench_lora), ("LoRA merged", bench_merged)]}
with torch.no_grad():
    lat = compare_latency(runs, repeats=10 if GRADING else 30, warmup=2)
    err = (bench_merged(input_ids=x_bench).logits - bench_lora(input_ids=x_bench).logits).abs().max().item()
for name, s in lat.items():
    print(f"{name:15s} {s}")
print(f"merged vs unmerged logits: max abs difference {err:.2e}")
fig, ax = plt.subplots(figsize=(5.5, 2.8))
names = list(lat)
med = [lat[n].median_ms for n in names]
ax.barh(names, med, xerr=[[m - lat[n].p10_ms for n, m in zip(names, med)],
                          [lat[n].p90_ms - m for n, m in zip(names, med)]], color=["grey", "tab:red", "tab:green"])
ax.set_xlabel(f"forward latency, ms (batch {BATCH} x {TOKENS} tokens, {DEVICE.type})")
ax.set_title(f"{bench_name}: merging removes the adapter's cost")
plt.tight_layout(); plt.show()
lora_overhead = lat["LoRA unmerged"].median_ms / lat["base"].median_ms - 1
merged_overhead = lat["LoRA merged"].median_ms / lat["base"].median_ms - 1
print(f"unmerged adapter: {100 * lora_overhead:+.1f}% latency;  merged: {100 * merged_overhead:+.1f}% "
      "(the merged model runs the base model's graph: any gap is noise)")

# %% [markdown]
# Read the numbers with their spread: on a shared CPU the p10–p90 bars are wide. The merged model runs
# the *same* graph as the base model, so any gap between those two is noise; the unmerged adapter adds
# two small matrix products per adapted layer (7 per block; 420 for the 30 blocks of SmolLM2) and is
# slower whenever the machine is quiet enough to see it.
#
# ## 3. bf16 merges and QLoRA merges (peft#1388, #1080, #2105, #2368)
#
# **bf16 rounding.** bf16 keeps 8 significant bits: near a weight of size $|w|$ the spacing is about
# $|w| \cdot 2^{-8}$. A fine-tuning update is small compared with the weight, so when $W + \Delta W$ is
# rounded to bf16, every entry of $\Delta W$ smaller than half a step vanishes and the rest is rounded
# coarsely. How much of the update survives depends on its size relative to $W$. We measure it on a
# real SmolLM2 matrix, for updates of relative size $\rho = \|\Delta W\|_F / \|W\|_F$.
# %%
W16 = smol.model.layers[10].self_attn.q_proj.weight.detach().to(torch.bfloat16).cpu()
g = torch.Generator().manual_seed(0)
rhos = [1e-3, 1e-2, 1e-1] if GRADING else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
lost_bf16 = []
for rho in rhos:
    d = torch.randn(W16.shape, generator=g)
    d = d * rho * W16.float().norm() / d.norm()                    # ||d|| = rho ||W||
    got = merged_weight(W16, d, torch.eye(W16.shape[0]), 1.0)      # B A = I d: any (out, in) update
    lost_bf16.append(((got.float() - W16.float()) - d).norm().item() / d.norm().item())
for rho, e in zip(rhos, lost_bf16):
    print(f"rho = {rho:6.3f}: bf16 merge error = {100 * e:5.1f}% of the update")

# %% [markdown]
# A trained LoRA update is typically $\rho \approx 10^{-3}$–$10^{-2}$ of its weight, where a bf16 merge
# distorts a large fraction of it (peft#1388). Merge in fp32 and **export in fp32** when the base was
# fp32, or accept this error knowingly; when the base *is* bf16 (as in most deployments), the unmerged
# adapter computes its branch in fp32 while a merged bf16 model cannot — measure your task's outputs
# both ways before shipping.
#
# **QLoRA adapters.** A QLoRA adapter was trained on top of $\hat W = \mathrm{dequant}(\mathrm{NF4}(W))$,
# not on $W$. The function it learned is $\hat W x + sBAx$. Four ways to deploy it:
#
# | option | weight served | error vs $\hat W + sBA$ |
# | --- | --- | --- |
# | keep the adapter separate, base in 4 bits | $\hat W$ + branch | 0 (exact, but 4-bit kernels and the branch's latency) |
# | **dequantise, merge in fp32, export 16-bit** (`qlora.merge_for_deployment`) | $\mathrm{bf16}(\hat W + sBA)$ | one bf16 rounding |
# | merge into the original 16-bit $W$ | $W + sBA$ | the whole NF4 error $W - \hat W$ |
# | merge, then re-quantise to NF4 | $\mathrm{dequant}(\mathrm{NF4}(\hat W + sBA))$ | a fresh NF4 rounding |
#
# `lora_ref.qlora.requantization_error` measures the last three as a fraction of the update
# $\|sBA\|_F$, layer by layer. We quantise four SmolLM2 matrices of one block to NF4 (blocks of 64,
# double quantisation) and sweep the update's size.
# %%
from lora_ref.qlora import merge_for_deployment, quantize_model, requantization_error, summarize_merge_errors

block = smol.model.layers[10]
picked = {"q_proj": block.self_attn.q_proj, "v_proj": block.self_attn.v_proj,
          "up_proj": block.mlp.up_proj, "down_proj": block.mlp.down_proj}
rows = []
for rho in tqdm(rhos, desc="QLoRA merge options"):
    mini = nn.ModuleDict({k: copy.deepcopy(m).float().cpu() for k, m in picked.items()})
    original = {k: m.weight.detach().clone() for k, m in mini.items()}
    inject_lora(mini, LoRAConfig(r=16, alpha=32, target_modules=list(picked)))
    quantize_model(mini, "nf4", double_quant=True)
    with torch.no_grad():
        for name, layer in lora_layers(mini).items():       # an update of relative size rho
            layer.lora_B.normal_(generator=g)
            d = layer.delta_weight()
            layer.lora_B.mul_(rho * original[name].norm() / d.norm())
    rows.append(summarize_merge_errors(requantization_error(mini, torch.bfloat16, original=original)))
fig, ax = plt.subplots(figsize=(6, 3.4))
for key, label in [("merged_16bit", "dequantise + fp32 merge -> bf16"), ("merged_into_original", "merge into original W"),
                   ("requantized", "merge, re-quantise to NF4")]:
    ax.loglog(rhos, [100 * r[key] for r in rows], "o-", label=label)
ax.axhline(100, color="grey", ls=":", lw=1)
ax.set_xlabel("update size  ||sBA|| / ||W||"); ax.set_ylabel("error, % of the update")
ax.legend(fontsize=8); ax.set_title("Deploying a QLoRA adapter: what each option loses")
plt.tight_layout(); plt.show()
for rho, r in zip(rhos, rows):
    print(f"rho={rho:6.3f}: bf16 merge {100 * r['merged_16bit']:6.1f}% | into original {100 * r['merged_into_original']:8.1f}%"
          f" | re-quantised {100 * r['requantized']:8.1f}%")

# %% [markdown]
# (The bf16 column can pass 100% for tiny updates: the dequantised NF4 weights are not bf16 numbers, so
# rounding them to bf16 adds its own error on top of losing part of the update. Export in fp32 then.)
#
# NF4's rounding error is about {{result:quality_quant_cpu.json:smollm2.weight_error.nf4.all:.0%}} of a weight
# matrix's norm (notebook 05, `benchmarks/results/quality_quant_cpu.json`), which is *larger than the whole update*
# for any realistic $\rho$: merging into the original weights or re-quantising after the merge destroys
# most of what the adapter learned (errors well above 100% of the update for small $\rho$). That is
# the "quality dropped after merging" of peft#2368 and the reason QLoRA authors recommend dequantising
# first (peft#1080, #2105). The right recipe's only loss is the bf16 rounding of the previous cell; export
# in fp32 if even that matters.
#
# **The same on a whole model.** Tiny Llama, adapter on every projection: relative error of the logits
# of each deployment against the QLoRA model, as a fraction of what the adapter changes.
# %%
from lora_ref.qlora import QLoRALinear

fp_model = with_random_adapter(tiny_llama(seed=0), r=8, seed=3, size=0.05)
original_weights = {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(fp_model).items()}
q_model = copy.deepcopy(fp_model)
quantize_model(q_model, "nf4", double_quant=True)
with torch.no_grad():
    want = q_model(ids).logits                                            # what was trained
    for layer in lora_layers(q_model).values():
        layer.enable_adapters(False)
    q_base = q_model(ids).logits
    for layer in lora_layers(q_model).values():
        layer.enable_adapters(True)
    effect = (want - q_base).norm()
    options = {"dequantise + fp32 merge, fp32 export": merge_for_deployment(copy.deepcopy(q_model), torch.float32),
               "dequantise + fp32 merge, bf16 export": merge_for_deployment(copy.deepcopy(q_model), torch.bfloat16),
               "merge into original W (fp32)": merged_copy(fp_model)}
    requant = copy.deepcopy(q_model)
    for layer in lora_layers(requant).values():
        layer.merge()                                                     # QLoRALinear.merge re-quantises
    options["merge, re-quantise to NF4"] = requant
    for name, m in options.items():
        got = m(ids).logits.float()
        print(f"{name:40s} logits error = {100 * ((got - want).norm() / effect).item():7.2f}% of the adapter's effect")

# %% [markdown]
# **And on the task, with a trained adapter.** `benchmarks/quality_qlora.py` trained a QLoRA adapter on
# SmolLM2 (all 410 training questions, 150 steps, on an H200) and deployed it the four ways; held-out fact
# accuracy of each (82 questions; committed in `benchmarks/results/quality_qlora_h200.json`):
# %%
from lora_ref.results import load_result

quality = load_result("quality_qlora_h200.json")
if quality is not None:
    labels = {"adapter": "keep the adapter on the NF4 base", "merged16": "dequantise, merge in fp32, export bf16",
              "orig+adapter": "merge into the original weights", "requant": "merge, re-quantise to NF4"}
    print(f"base model without adapter: {100 * quality['base']['fact_accuracy']:.1f}%")
    for key, label in labels.items():
        v = quality["deploy"][key]
        print(f"{label:40s} fact accuracy {100 * v['fact_accuracy']:5.1f}%, held-out loss {v['heldout_loss']:.3f}")
    errors = quality["merge_weight_error"]
    print(f"weight error as a fraction of the update: bf16 merge {errors['merged_16bit']:.2f}, "
          f"into the original {errors['merged_into_original']:.2f}, re-quantised {errors['requantized']:.2f}")

# %% [markdown]
# The ranking of the tiny model holds on the real task: the dequantise-merge-export recipe keeps the
# adapter ({{result:quality_qlora_h200.json:deploy.merged16.fact_accuracy:.1%}} against the adapter's
# {{result:quality_qlora_h200.json:deploy.adapter.fact_accuracy:.1%}}), merging into the original weights drops it to
# {{result:quality_qlora_h200.json:deploy.orig+adapter.fact_accuracy:.1%}}, and re-quantising to NF4 after the
# merge gives back the base model's accuracy ({{result:quality_qlora_h200.json:deploy.requant.fact_accuracy:.1%}}):
# the adapter is erased. Note that the weight errors rank the last two the other way: merging into the
# original weights moves them by {{result:quality_qlora_h200.json:merge_weight_error.merged_into_original:.1f}}x the
# update's norm, but that movement is the NF4 rounding being undone, back to weights the model was
# pretrained with, not noise.
#
# **Why re-quantising erases it.** The trained update is small next to NF4's rounding: from the committed
# ratio above, $\|\Delta W\| \approx \|W - \hat W\| / {{result:quality_qlora_h200.json:merge_weight_error.merged_into_original:.1f}}$. Take one real SmolLM2 projection, quantise it, add a
# random rank-16 update of that relative size, re-quantise, and count the 4-bit codes that changed:
# %%
from lora_ref import quant

W = smol.model.layers[10].self_attn.q_proj.weight.detach().float().cpu()
packed, state = quant.quantize_4bit(W, 64, "nf4", True)
W_hat = quant.dequantize_4bit(packed, state, torch.float32)
nf4_error = ((W - W_hat).norm() / W.norm()).item()
# ||W - W_hat|| / ||delta W|| of the trained adapter (the committed run above; ~6 if the file is missing)
ratio = quality["merge_weight_error"]["merged_into_original"] if quality is not None else 6.0
rho = nf4_error / ratio                                   # ||delta W|| / ||W||, as in the trained adapter
g = torch.Generator().manual_seed(0)
direction = torch.randn(W.shape[0], 16, generator=g) @ torch.randn(16, W.shape[1], generator=g)


def nibbles(p):
    """The two 4-bit codes of every byte, in order."""
    return torch.stack([p.flatten() >> 4, p.flatten() & 15], 1).flatten()


print(f"NF4 error of this weight: {nf4_error:.3f} of its norm; trained-update size: rho = {rho:.4f}")
for scale in (1, 3, 10):
    delta = direction * (scale * rho * W_hat.norm() / direction.norm())
    packed2, state2 = quant.quantize_4bit(W_hat + delta, 64, "nf4", True)
    kept = ((quant.dequantize_4bit(packed2, state2, torch.float32) - W_hat) * delta).sum() / (delta * delta).sum()
    print(f"update {scale:2d} x rho: codes unchanged {(nibbles(packed2) == nibbles(packed)).float().mean():7.2%}, "
          f"share of the update that survives re-quantisation {kept.item():5.2f}")

# %% [markdown]
# At the trained size every weight lands back on its old code: only the block scales move, and what
# survives of the update is a few percent. An update 3x larger keeps about a quarter of itself; only around
# 10x the trained size does most of it survive. Keep the adapter separate, or dequantise and export in 16 bits.
#
# ## 4. Export: a merged checkpoint and a PEFT adapter
#
# Two artefacts, two audiences:
# * **merged model** (`config.json` + `model.safetensors`): anyone with `transformers` (or vLLM, TGI,
#   llama.cpp after conversion) loads it; no LoRA code needed; one task per file.
# * **PEFT adapter** (`adapter_config.json` + `adapter_model.safetensors`, keys like
#   `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`): a few MB, needs the base model;
#   many adapters per base.
#
# Both are written with `lora_ref` and loaded back with the libraries everyone uses.
# %%
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from lora_ref.adapters import save_adapter
from lora_ref.memory import adapter_file_bytes, param_count
from lora_ref.serving import export_merged_model

export_root = Path(tempfile.mkdtemp(prefix="nb07-"))
tiny_lora = with_random_adapter(tiny_llama(seed=0), r=8, seed=4, size=0.05, targets=("q_proj", "v_proj"))
adapter_dir = save_adapter(tiny_lora, export_root / "adapter", LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
merged_dir = export_merged_model(tiny_lora, export_root / "merged")
for folder in (adapter_dir, merged_dir):
    print(folder.name, {p.name: f"{p.stat().st_size:,} B" for p in sorted(folder.iterdir())})
print("first adapter keys:", sorted(load_file(adapter_dir / "adapter_model.safetensors"))[:2])
with torch.no_grad():
    want = tiny_lora(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    print(f"merged checkpoint, reloaded by transformers: max |diff| = {(reloaded(ids).logits - want).abs().max():.2e}")
    try:
        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), adapter_dir).eval()
        print(f"adapter, loaded by PEFT:                     max |diff| = {(peft_model(ids).logits - want).abs().max():.2e}")
    except ImportError:
        print("peft is not installed: skipped the PEFT load")
smol_adapter = adapter_file_bytes("smollm2-135m", 16, "all-linear", "fp32")
print(f"SmolLM2-135M, r=16 on all 7 projections: adapter file {smol_adapter / 1e6:.1f} MB vs merged bf16 model "
      f"{2 * param_count('smollm2-135m') / 1e6:.0f} MB")

# %% [markdown]
# ## 5. Many adapters on one base model
#
# A support desk may run one adapter per product line or per customer. Loading one merged model per
# adapter multiplies memory; merging/unmerging on every switch writes every weight (and in bf16 drifts,
# section 3). The alternative keeps $W$ shared and the adapters separate:
#
# * **hot-swapping**: the active adapter is just a name; switching copies nothing;
# * **mixed batches** (S-LoRA, Sheng et al. 2023, [arXiv 2311.03285](https://arxiv.org/abs/2311.03285);
#   Punica, Chen et al. 2023, [arXiv 2310.18547](https://arxiv.org/abs/2310.18547)): requests for
#   different adapters share one batch. The base product $XW^\top$ is one big matmul for everyone; the
#   LoRA branch is computed per row with that row's adapter:
#
# $$ y_i = W x_i + s_{k_i} B_{k_i} A_{k_i} x_i, \qquad k_i = \text{idx}[i]. $$
#
# Stack the $n$ adapters into `A_all (n, r, in)`, `B_all (n, out, r)`, `s_all (n,)` (smaller ranks
# zero-padded: zero rows of $A$ add exactly nothing), *gather* each row's matrices with `A_all[idx]`, and
# apply two batched products (`torch.bmm`). Punica's BGMV kernel fuses exactly this gather + matmul.
#
# ### Exercise 2 — `batched_lora_delta(x, A_all, B_all, s_all, idx)`
#
# `x` is `(b, t, in)` or `(b, in)`; `idx` is a `(b,)` integer tensor. Return the LoRA branch only, shape
# `(b, t, out)` or `(b, out)`, computed in `A_all`'s dtype: row $i$ gets
# $s_{k}\, x_i A_k^\top B_k^\top$ with $k = $ `idx[i]`. Use gather + `torch.bmm` (no Python loop over
# rows). Raise `ValueError` if `idx` does not have exactly one entry per row.
# %% answer id=batched_lora_delta
def batched_lora_delta(x: torch.Tensor, A_all: torch.Tensor, B_all: torch.Tensor, s_all: torch.Tensor,
                       idx: torch.Tensor) -> torch.Tensor:
    """Row i: s[idx[i]] * x_i @ A_all[idx[i]].T @ B_all[idx[i]].T, by gather + bmm."""
    ### BEGIN SOLUTION
    if idx.dim() != 1 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx {tuple(idx.shape)} needs one entry per row of x {tuple(x.shape)}")
    squeeze = x.dim() == 2
    h = x.unsqueeze(1) if squeeze else x
    A_g, B_g = A_all[idx], B_all[idx]                       # (b, r, in), (b, out, r)
    h = torch.bmm(h.to(A_g.dtype), A_g.transpose(1, 2))     # (b, t, r)
    y = torch.bmm(h, B_g.transpose(1, 2)) * s_all[idx].to(A_g.dtype).view(-1, 1, 1)
    return y.squeeze(1) if squeeze else y
    ### END SOLUTION

# %% test id=test_batched_lora_delta points=3
# hand-worked: in = 2, out = 2, r = 1; adapter 0 = zeros (no adapter), adapter 1: A = [[1, 1]], B = [[1], [0]], s = 2
_A_all = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])          # (2, 1, 2)
_B_all = torch.tensor([[[0.0], [0.0]], [[1.0], [0.0]]])      # (2, 2, 1)
_s_all = torch.tensor([0.0, 2.0])
_x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
_y = batched_lora_delta(_x, _A_all, _B_all, _s_all, torch.tensor([1, 0]))
#   row 0 uses adapter 1: A x = 3, B (A x) = [3, 0], * 2 = [6, 0];  row 1 uses adapter 0: [0, 0]
assert _y.shape == (2, 2), f"2-D x (b, in) gives (b, out); got {tuple(_y.shape)}"
assert torch.equal(_y, torch.tensor([[6.0, 0.0], [0.0, 0.0]])), f"expected [[6, 0], [0, 0]], got {_y.tolist()}"
_y3 = batched_lora_delta(_x.unsqueeze(1).repeat(1, 3, 1), _A_all, _B_all, _s_all, torch.tensor([0, 1]))
assert _y3.shape == (2, 3, 2) and torch.equal(_y3[1, 2], torch.tensor([14.0, 0.0])), \
    "3-D x (b, t, in): row 1 with adapter 1 gives 2 * (3 + 4) = 14 in the first output at every t"
try:
    batched_lora_delta(_x, _A_all, _B_all, _s_all, torch.tensor([1]))
except ValueError:
    pass
else:
    raise AssertionError("idx with the wrong number of rows must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("07.batched_lora_delta", batched_lora_delta)
### END HIDDEN TESTS

# %% [markdown]
# **Serving three adapters from one base model** (the SmolLM2-shaped model of section 2 on a CPU, SmolLM2
# itself on a GPU). `lora_ref.serving.AdapterServer` wraps each targeted
# linear layer in a `MultiLoRALinear` that holds several named adapters (loaded from PEFT-format folders)
# and uses the same gather + bmm for mixed batches. We save three adapters of different ranks and
# targets, load them into one server, and check that one mixed batch gives the same logits as serving
# each request alone.
# %%
from lora_ref.serving import AdapterServer

adapter_specs = {"billing": (4, ("q_proj", "v_proj")), "returns": (8, ("q_proj", "k_proj", "o_proj")),
                 "tone": (16, "all-linear")}
for i, (name, (r, targets)) in enumerate(adapter_specs.items()):
    m = with_random_adapter(copy.deepcopy(bench_base), r=r, seed=10 + i, size=0.02, targets=targets)
    save_adapter(m, export_root / name, LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
    del m
server = AdapterServer(copy.deepcopy(bench_base))
for name in adapter_specs:
    server.load_adapter(name, export_root / name)
print("loaded:", server.names, "| base weights shared, adapter params:",
      {n: sum(l.adapters[n][0].numel() + l.adapters[n][1].numel() for l in server.layers().values() if n in l.adapters)
       for n in server.names})

requests = {"input_ids": torch.randint(3, 4096, (4, 24), generator=torch.Generator().manual_seed(2)).to(DEVICE),
            "attention_mask": torch.ones(4, 24, dtype=torch.long, device=DEVICE)}
who = ["billing", "returns", "tone", None]
with torch.no_grad():
    mixed = server.mixed_forward(requests["input_ids"], who, requests["attention_mask"])
    worst = 0.0
    for i, name in enumerate(who):
        server.set_adapter(name)
        alone = server.model(input_ids=requests["input_ids"][i:i + 1],
                             attention_mask=requests["attention_mask"][i:i + 1]).logits
        worst = max(worst, (alone - mixed[i:i + 1]).abs().max().item())
print(f"mixed batch vs each request alone: max |diff| = {worst:.2e}")

# %% [markdown]
# **Switching cost and batching gain.** Hot-swapping flips a name in every wrapped layer; the merge-based
# alternative unmerges one adapter and merges another, writing every adapted weight. And one mixed batch
# of four requests against four separate forwards:
# %%
def swap_by_name():
    server.set_adapter("returns"); server.set_adapter("billing")

merge_model = with_random_adapter(copy.deepcopy(bench_base), r=16, seed=20, size=0.02)
def swap_by_merging():
    for layer in lora_layers(merge_model).values():
        layer.unmerge(); layer.merge()

with torch.no_grad():
    swaps = compare_latency({"hot swap (2 renames)": swap_by_name, "unmerge + merge": swap_by_merging},
                            repeats=3 if GRADING else 5, warmup=1)
    serve = compare_latency({
        "one mixed batch (4 requests)": lambda: server.mixed_forward(requests["input_ids"], who, requests["attention_mask"]),
        "4 separate forwards": lambda: [(server.set_adapter(n), server.model(input_ids=requests["input_ids"][i:i + 1],
                                        attention_mask=requests["attention_mask"][i:i + 1])) for i, n in enumerate(who)],
    }, repeats=3 if GRADING else 6, warmup=1)
for name, s in {**swaps, **serve}.items():
    print(f"{name:30s} {s}")
del merge_model

# %% [markdown]
# Switching by name costs microseconds; switching by merging costs a pass over every adapted weight
# (and its rounding). The mixed batch does one set of base matmuls for all four users: the bigger the
# batch, the bigger the gain — the whole point of S-LoRA and Punica, which serve thousands of adapters
# from one GPU by keeping adapters in a paged pool and batching across them.
#
# ## 6. Chat with the tuned bot
#
# `lora_ref.serving.ChatSession` keeps the conversation and the course's system prompt. The tuned Velora
# adapter is served through the `AdapterServer`: from `LORA_COURSE_ADAPTER` (an adapter folder, e.g. the
# one you saved in notebook 03) or `~/.cache/lora_ref/velora_adapter`; on a GPU without one, this cell
# trains it first (300 steps, under a minute). On a CPU without one, the base model answers — which
# shows what the adapter has to teach it: it cannot know Velora's facts. The questions are held-out ones.
# %%
from lora_ref import data
from lora_ref.serving import ChatSession

candidates = [os.environ.get("LORA_COURSE_ADAPTER", ""), str(Path.home() / ".cache" / "lora_ref" / "velora_adapter")]
found = next((Path(c) for c in candidates if c and (Path(c) / "adapter_config.json").exists()), None)
if found is None and DEVICE.type == "cuda":           # a GPU trains one in well under a minute
    from lora_ref.training import train
    velora_cfg = LoRAConfig(r=16, alpha=32, target_modules="all-linear")
    tuned = inject_lora(copy.deepcopy(smol), velora_cfg)
    train(tuned, tok, data.load_dataset().train, steps=300, lr=1e-3, batch_size=16)
    found = save_adapter(tuned, export_root / "velora", velora_cfg)
    del tuned
chat_server = AdapterServer(smol)                 # the real SmolLM2 (no copy: nothing else uses it now)
if found is not None:
    chat_server.load_adapter("velora", found)
    print(f"serving the tuned adapter from {found}")
else:
    print("no trained adapter found: the base model answers (expect it not to know Velora's facts)")
bot = ChatSession(smol, tok, server=chat_server, adapter="velora" if found else None,
                  max_new_tokens=8 if GRADING else 48)
for ex in data.load_dataset().heldout[:1 if GRADING else 3]:       # questions it never saw in training
    reply = bot.ask(ex.question)
    print(f"user: {ex.question}\nbot:  {reply}\n      states the fact ({', '.join(ex.key_phrases)}): "
          f"{data.is_correct(reply, ex)}\n")
    bot.reset()

# %% [markdown]
# ## 7. Interview practice
#
# *"How would you merge and deploy a LoRA fine-tuned model?"* (the article's Q4). The article answers
# "merge for one task, separate adapters for many". Answer with the numbers you measured above.
# %% [markdown] manual id=q_deploy points=2
# A strong answer: merge $W' = W + sBA$ in fp32 and round once (PEFT's `merge_and_unload` computes $sBA$ in
# the adapter's dtype on a GPU: load the adapter in fp32, or merge with `lora_ref`), giving an
# ordinary checkpoint with no added latency (section 2: the merged model timed like the base, the
# unmerged adapter slower); keep the export dtype in mind (bf16 rounding loses part of small updates,
# section 3). For a QLoRA adapter, dequantise the NF4 base, merge in fp32 and export 16-bit; never merge
# into the original weights or re-quantise (the errors in section 3 exceed the update itself). For many
# tasks keep one base and separate adapters: hot-swap by name, or batch requests across adapters with
# gather + bmm (S-LoRA/Punica), at the cost of the branch's extra latency.
# %% [markdown]
# *Follow-up: "Your colleague merged a QLoRA adapter and quality dropped. What happened, and what do you
# do?"* Write your answer in the cell below (your instructor grades it; quote your measurements).
# %% [markdown] manual id=q_qlora_merge points=2
# The adapter was trained against the dequantised NF4 weights $\hat W$, not the original $W$. Merging into
# $W$ (loading the base in 16-bit and calling `merge_and_unload`) or re-quantising the merged weight
# adds an error of about the NF4 rounding (~{{result:quality_quant_cpu.json:smollm2.weight_error.nf4.all:.0%}} of a
# weight matrix's norm) — larger than the update itself. Fix:
# load the base in 4 bits exactly as in training, dequantise it, add $sBA$ in fp32, save the 16-bit
# result (or serve the adapter unmerged on the 4-bit base); then check the merged outputs against the
# unmerged QLoRA model on a few prompts before shipping.
