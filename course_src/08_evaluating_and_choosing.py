# %% [markdown]
# # 08 · Evaluating and choosing: the PEFT family, one controlled experiment, mixed precision
#
# LoRA is one member of a family. Before it came methods that leave every weight alone and learn
# *virtual tokens* instead: prompt tuning, P-tuning and prefix tuning. Interviewers ask how they differ
# (the article's Q on "Prefix vs Prompt vs P-tuning"), when full fine-tuning is the right call, how to
# evaluate fine-tuning methods fairly, and what mixed precision changes. Here each answer is measured.
#
# **By the end of this notebook you will have**
# 1. written prompt tuning's input construction (graded) and seen that only the soft prompt learns;
# 2. written prefix tuning's key/value layout (graded), and **measured** that the prefix really takes
#    part in every layer's attention; contrasted P-tuning's prompt encoder;
# 3. run **one controlled experiment** — same data, steps, seed and evaluation — comparing prompt
#    tuning, P-tuning, prefix tuning, LoRA (q,v and all linear), QLoRA and full fine-tuning: accuracy,
#    generalisation gap, trainable parameters, memory, time, adapter size;
# 4. **measured** when full fine-tuning is the right call;
# 5. fixed the seed article's "eval score" (graded) and seen why perplexity is not task accuracy;
# 6. **measured** fp16 overflow and underflow, loss scaling, and bf16's coarse rounding.
# %% locked id=setup
import copy
import math
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_ref.models import notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads

# %% [markdown]
# ## 1. Prompt tuning: learn the prompt, not the model
#
# Lester et al. (2021, [arXiv 2104.08691](https://arxiv.org/abs/2104.08691)) freeze the whole model and
# learn $n$ embedding vectors $P \in \mathbb{R}^{n \times d}$ that are prepended to every input's
# embeddings:
#
# $$ \text{embeds} = [\,P\,;\,E(x)\,] \in \mathbb{R}^{(n + t) \times d}, \qquad \text{trainable: } n\,d. $$
#
# The model must also *attend* to the virtual tokens (attention mask 1 there) and must not be asked to
# *predict* them (label $-100$ there). For SmolLM2 ($d = 576$) and $n = 20$ that is 11,520 parameters —
# 400 times fewer than LoRA at $r=16$ — and one 46 KB file per task.
#
# ### Exercise 1 — `prepend_virtual_tokens(prompt, inputs_embeds, attention_mask, labels=None)`
#
# `prompt` is `(n, d)`, `inputs_embeds` `(b, t, d)`, `attention_mask` `(b, t)`, `labels` `(b, t)` or
# `None`. Return a tuple `(embeds, mask, labels)`:
# * `embeds` `(b, n + t, d)`: the prompt (cast to `inputs_embeds.dtype`) before every row's embeddings;
# * `mask` `(b, n + t)`: ones (same dtype as `attention_mask`) for the virtual tokens, then the mask;
# * `labels` `(b, n + t)`: $-100$ for the virtual tokens, then the labels — or `None` if `labels` is `None`.
#
# Raise `ValueError` when `prompt` is not 2-D with the embeddings' width $d$.
# %% answer id=prepend_virtual_tokens
def prepend_virtual_tokens(prompt, inputs_embeds, attention_mask, labels=None):
    """[P ; E(x)] with the attention mask and labels extended for the n virtual tokens."""
    ### BEGIN SOLUTION
    if prompt.dim() != 2 or prompt.shape[1] != inputs_embeds.shape[-1]:
        raise ValueError(f"prompt {tuple(prompt.shape)} must be (n, {inputs_embeds.shape[-1]})")
    b, n = inputs_embeds.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(b, -1, -1), inputs_embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
    if labels is None:
        return embeds, mask, None
    return embeds, mask, torch.cat([labels.new_full((b, n), -100), labels], dim=1)
    ### END SOLUTION

# %% test id=test_prepend_virtual_tokens points=3
_P = torch.tensor([[1.0, 2.0], [3.0, 4.0]])                # n = 2 virtual tokens, d = 2
_E = torch.tensor([[[5.0, 6.0]], [[7.0, 8.0]]])            # b = 2 rows, t = 1 token
_M = torch.tensor([[1], [0]])
_L = torch.tensor([[9], [-100]])
_e, _m, _l = prepend_virtual_tokens(_P, _E, _M, _L)
assert _e.shape == (2, 3, 2), f"embeds must be (b, n + t, d) = (2, 3, 2), got {tuple(_e.shape)}"
assert torch.equal(_e[1], torch.tensor([[1.0, 2.0], [3.0, 4.0], [7.0, 8.0]])), "every row: prompt first, then its own embeddings"
assert _m.tolist() == [[1, 1, 1], [1, 1, 0]], f"virtual tokens are always attended: expected [[1,1,1],[1,1,0]], got {_m.tolist()}"
assert _l.tolist() == [[-100, -100, 9], [-100, -100, -100]], "virtual tokens carry no loss (-100)"
assert prepend_virtual_tokens(_P, _E, _M)[2] is None, "labels=None gives None as the third output"
assert prepend_virtual_tokens(_P, _E.to(torch.bfloat16), _M)[0].dtype == torch.bfloat16, "cast the prompt to the embeddings' dtype"
try:
    prepend_virtual_tokens(torch.zeros(2, 3), _E, _M)
except ValueError:
    pass
else:
    raise AssertionError("a prompt of the wrong width must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("08.prepend_virtual_tokens", prepend_virtual_tokens)
### END HIDDEN TESTS

# %% [markdown]
# **Measured: only the prompt learns.** `lora_ref.peft_family.PromptTuning` wraps a frozen model with
# this construction. One training step on a tiny Llama: which parameters got a gradient, and did any
# weight of the model move?
# %%
from lora_ref.models import tiny_llama
from lora_ref.peft_family import PromptTuning, PrefixTuning, PTuning

base = tiny_llama(seed=0)
before = {k: v.clone() for k, v in base.state_dict().items()}
pt = PromptTuning(base, num_virtual_tokens=8)
ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(0))
opt = torch.optim.AdamW(pt.trainable_parameters(), lr=1e-2)
loss = pt(ids, labels=ids).loss
loss.backward()
opt.step()
with_grad = [n for n, p in pt.named_parameters() if p.grad is not None]
moved = [k for k, v in base.state_dict().items() if not torch.equal(v, before[k])]
print(f"parameters with a gradient: {with_grad}")
print(f"model weights that changed: {moved or 'none'}")
print(f"trainable: {pt.num_trainable():,} of {sum(p.numel() for p in pt.parameters()):,}")

# %% [markdown]
# ## 2. Prefix tuning: virtual keys and values in every layer
#
# Prompt tuning only touches the input; deep in the network its influence has to survive every layer.
# Li & Liang (2021, [arXiv 2101.00190](https://arxiv.org/abs/2101.00190)) prepend learned **keys and
# values** to the attention of *every* layer $l$:
#
# $$ \mathrm{head} = \mathrm{softmax}\!\Big(\frac{q\,[K^{(l)}_P ; K^{(l)}]^\top}{\sqrt{d_h}}\Big)\,[V^{(l)}_P ; V^{(l)}],
#    \qquad K^{(l)}_P, V^{(l)}_P \in \mathbb{R}^{n \times d_{kv}}. $$
#
# That is exactly what a KV cache of $n$ earlier tokens looks like, so with transformers 5.x we hand the
# model a pre-filled `DynamicCache` (`cache=`). Trained directly, the prefix is unstable; the paper
# (Section 4.3) **reparameterises** it: $[K_P; V_P] = \mathrm{MLP}(P')$ with a small $P'$ and
# $\mathrm{MLP} = \mathrm{Linear}(d, h) \to \tanh \to \mathrm{Linear}(h, 2 L d_{kv})$; after training only
# the prefix is kept. Under grouped-query attention $d_{kv}$ = kv heads × head dim (SmolLM2: 3 × 64 = 192).
#
# ### Exercise 2 — `prefix_to_key_values(prefix, batch, num_layers, num_kv_heads, head_dim)`
#
# `prefix` is `(n, 2 * L * H * hd)`; its columns are ordered **layer, then key/value, then head, then
# head dim** (PEFT's order): column $((l \cdot 2 + j) H + h)\,hd + c$ holds layer $l$, key ($j=0$) or value
# ($j=1$), head $h$, component $c$. Return a list of $L$ tuples `(key, value)`, each `(batch, H, n, hd)` —
# the layout of a KV cache — the same prefix for every row of the batch. Raise `ValueError` if the
# width is not `2 * L * H * hd`.
# %% answer id=prefix_to_key_values
def prefix_to_key_values(prefix, batch, num_layers, num_kv_heads, head_dim):
    """(n, 2 L H hd) -> [(key (batch, H, n, hd), value (batch, H, n, hd))] * L."""
    ### BEGIN SOLUTION
    n = prefix.shape[0]
    if prefix.dim() != 2 or prefix.shape[1] != 2 * num_layers * num_kv_heads * head_dim:
        raise ValueError(f"prefix {tuple(prefix.shape)} must be (n, {2 * num_layers * num_kv_heads * head_dim})")
    kv = prefix.view(n, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)   # (L, 2, H, n, hd)
    kv = kv.unsqueeze(2).expand(num_layers, 2, batch, num_kv_heads, n, head_dim)
    return [(kv[l, 0], kv[l, 1]) for l in range(num_layers)]
    ### END SOLUTION

# %% test id=test_prefix_to_key_values points=3
_L, _H, _hd, _n = 2, 2, 3, 4
_prefix = torch.arange(_n * 2 * _L * _H * _hd, dtype=torch.float32).view(_n, -1)   # (4, 24)
_kv = prefix_to_key_values(_prefix, 3, _L, _H, _hd)
assert len(_kv) == _L, f"one (key, value) pair per layer: expected {_L}, got {len(_kv)}"
assert _kv[0][0].shape == (3, _H, _n, _hd), f"key must be (batch, H, n, hd) = (3, 2, 4, 3), got {tuple(_kv[0][0].shape)}"
# layer 1, value (j = 1), head 0, virtual token 2, component 1: column ((1*2 + 1)*2 + 0)*3 + 1 = 19, row 2 -> 2*24 + 19 = 67
assert _kv[1][1][0, 0, 2, 1].item() == 67.0, f"layer 1 value, head 0, token 2, comp 1 should be 67, got {_kv[1][1][0, 0, 2, 1].item()}"
assert _kv[0][0][0, 1, 0, 0].item() == 3.0, "layer 0 key, head 1, token 0, comp 0 is column 3"
assert torch.equal(_kv[0][0][0], _kv[0][0][2]), "every row of the batch gets the same prefix"
try:
    prefix_to_key_values(_prefix[:, :-1], 1, _L, _H, _hd)
except ValueError:
    pass
else:
    raise AssertionError("a prefix of the wrong width must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("08.prefix_to_key_values", prefix_to_key_values)
### END HIDDEN TESTS

# %% [markdown]
# **Measured: the prefix is really attended to, in every layer.** With eager attention the model returns
# its attention weights. For each layer we measure the share of attention that the real tokens put on the
# 4 virtual positions — and check that masking the prefix out gives back the base model exactly (the
# prefix acts *only* through attention).
# %%
eager = tiny_llama(seed=0, attn_implementation="eager")
pf = PrefixTuning(eager, num_virtual_tokens=4, reparam_hidden=32)
with torch.no_grad():
    out = eager(input_ids=ids, attention_mask=torch.ones(4, 16, dtype=torch.long), cache=pf.cache(4),
                position_ids=torch.arange(12).expand(4, -1), output_attentions=True)
    share = [att[..., :4].sum(-1).mean().item() for att in out.attentions]
    plain = eager(input_ids=ids).logits
    hidden = pf(ids, prefix_mask=torch.zeros(4, 4, dtype=torch.long)).logits
for l, s in enumerate(share):
    print(f"layer {l}: {100 * s:.1f}% of the attention goes to the prefix")
print(f"prefix masked out vs base model: max |diff| = {(hidden - plain).abs().max():.2e}")
print(f"prefix on vs base model:         max |diff| = {(pf(ids).logits - plain).abs().max():.2e}")

# %% [markdown]
# **P-tuning** (Liu et al. 2021, *GPT Understands, Too*, [arXiv 2103.10385](https://arxiv.org/abs/2103.10385))
# keeps prompt tuning's *place* (input layer only) but produces the virtual tokens with a small trainable
# **prompt encoder** (a bidirectional LSTM + MLP over $n$ trainable embeddings) so that they are
# coupled and easier to optimise; after training its output is cached and served like prompt tuning.
# (P-tuning v2 is essentially prefix tuning at every layer.) Parameter counts on SmolLM2's shapes:
# %%
from lora_ref.memory import PRESETS, lora_param_count
from lora_ref.peft_family import p_tuning_params, prefix_tuning_params, prompt_tuning_params

s = PRESETS["smollm2-135m"]
n = 20
rows = [("prompt tuning (n=20)", prompt_tuning_params(n, s.hidden), prompt_tuning_params(n, s.hidden)),
        ("P-tuning, LSTM h=256", p_tuning_params(n, s.hidden, 256, "lstm"), prompt_tuning_params(n, s.hidden)),
        ("prefix tuning, MLP h=512", *prefix_tuning_params(n, s.n_layers, s.kv_dim, s.hidden, 512)),
        ("LoRA r=16, q,v", lora_param_count(s, 16, ("q_proj", "v_proj")), lora_param_count(s, 16, ("q_proj", "v_proj"))),
        ("LoRA r=16, all linear", lora_param_count(s, 16), lora_param_count(s, 16))]
print(f"{'method':28s} {'trained':>12s} {'shipped':>12s}")
for name, trained, kept in rows:
    print(f"{name:28s} {trained:12,d} {kept:12,d}")

# %% [markdown]
# | | prompt tuning | P-tuning | prefix tuning | LoRA |
# | --- | --- | --- | --- | --- |
# | where | input embeddings | input embeddings | keys/values of every layer | the weights ($W + sBA$) |
# | parameterisation | $P$ directly | encoder(P′) (LSTM/MLP) | MLP(P′) while training | $B A$ |
# | inference cost | $n$ extra positions | $n$ extra positions | $n$ extra KV entries per layer | none once merged |
# | context left for the user | $-n$ | $-n$ | $-n$ | unchanged |
# | mixes tasks in one batch | yes (per-row prompts) | yes | yes | yes, with gather + bmm (notebook 07) |
#
# ## 3. One controlled experiment
#
# The article's Q3 says "design controlled experiments that vary only the fine-tuning method". Here is
# one: every method starts from the **same fresh base**, trains on the **same batches** (same seed) for the
# **same number of steps**, and is evaluated the same way on the held-out questions of the course data
# (`lora_ref.peft_family.compare_methods`). Learning rates differ, because each method needs its own
# (soft prompts need steps a hundred times larger than weights) — that is part of the method.
#
# *Scale.* On a GPU this runs on SmolLM2-135M with fact accuracy by generation. On the shared 2-core CPU
# it runs on the tiny Llama with a small tokenizer trained on the course data, from **random** weights, for
# a few dozen steps — the same code and metrics, at a size that fits the time budget. Read the CPU table
# for the *mechanics* (parameters, memory, adapter bytes are exact; time is relative) and for one
# real lesson: on a base that knows nothing, the methods that change weights (LoRA, QLoRA, full) move,
# while the virtual-token methods barely do — they can only steer what the base already computes
# (section 4). At 150 CPU steps (40 while grading) the losses are still falling: compare methods, not
# absolute numbers.
# %%
from lora_ref import data
from lora_ref.models import load_smollm2
from lora_ref.peft_family import compare_methods

splits = data.load_dataset()
if DEVICE.type == "cuda":
    smol, tok = load_smollm2(device=DEVICE)
    factory, steps, fact_n, heldout = (lambda: copy.deepcopy(smol)), 150, 82, splits.heldout
    scale = "SmolLM2-135M"
else:
    tok = data.tiny_tokenizer()
    factory, fact_n = (lambda: tiny_llama(seed=0).to(DEVICE)), 0
    steps, heldout = (40, splits.heldout[:24]) if GRADING else (150, splits.heldout)
    scale = "tiny Llama, random init"
results = compare_methods(factory, tok, splits.train, heldout, steps=steps, batch_size=8, fact_examples=fact_n,
                          keep=("lora",))
print(f"{scale}, {steps} steps, batch 8; memory {'measured (CUDA peak)' if results[0].memory_measured else 'estimated: weights + grads + AdamW'}")
print(f"{'method':10s} {'trainable':>10s} {'train loss':>10s} {'eval loss':>9s} {'gap':>6s} {'tok acc':>7s} "
      f"{'facts':>6s} {'time s':>7s} {'memory':>9s} {'adapter':>10s}")
for r in results:
    facts = "-" if r.fact_accuracy is None else f"{100 * r.fact_accuracy:.0f}%"
    print(f"{r.method:10s} {r.trainable:10,d} {r.train_loss:10.3f} {r.eval_loss:9.3f} {r.gap:6.3f} "
          f"{100 * r.token_accuracy:6.1f}% {facts:>6s} {r.seconds:7.1f} {r.memory_bytes / 1e6:7.1f}MB "
          f"{r.adapter_bytes / 1e3:8.1f}KB")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for r in results:
    axes[0].plot(np.convolve(r.losses, np.ones(5) / 5, mode="valid"), label=r.method)
axes[0].set_xlabel("step"); axes[0].set_ylabel("training loss (5-step mean)"); axes[0].legend(fontsize=7)
axes[1].scatter([r.trainable for r in results], [r.eval_loss for r in results])
for r in results:
    axes[1].annotate(r.method, (r.trainable, r.eval_loss), fontsize=7)
axes[1].set_xscale("log"); axes[1].set_xlabel("trainable parameters"); axes[1].set_ylabel("held-out loss")
fig.suptitle(f"Same data, same steps, same seed: {scale}"); plt.tight_layout(); plt.show()

# %% [markdown]
# How to read it:
# * **accuracy** (held-out token accuracy; fact accuracy on a GPU) is the task metric; **eval loss** is a
#   proxy (section 5);
# * **gap** = held-out loss − training loss: the methods with the most capacity over-fit first on 410
#   examples;
# * **trainable parameters, memory, adapter size**: the cost side. QLoRA stores its linear layers in about a
#   quarter of their 16-bit bytes (4.127 of 16 bits per weight), but the embeddings, the head and the norms
#   stay 16-bit, so the whole base shrinks less (computed below for SmolLM2 and Llama-2-7B); full
#   fine-tuning ships a whole model per task;
# * **time**: on a CPU, per-step overheads dominate; on a GPU QLoRA is *slower* than LoRA (dequantising
#   in every forward and backward; bitsandbytes#465). This project's H200 run of the usual recipe
#   (transformers + bitsandbytes + PEFT, Llama-2-7B shape, batch 4 x 512) measured QLoRA at
#   {{result:qlora_step_llama-2-7b_h200.json:results.recipe_no_ckpt.tokens_per_s/results.bf16_lora_no_ckpt.tokens_per_s:.2f}}x
#   the tokens/s of bf16 LoRA without gradient checkpointing and
#   {{result:qlora_step_llama-2-7b_h200.json:results.recipe.tokens_per_s/results.bf16_lora.tokens_per_s:.2f}}x with it
#   (`benchmarks/results/qlora_step_llama-2-7b_h200.json`).
# %%
from lora_ref import memory as M

for name in ("smollm2-135m", "llama-2-7b"):
    pb = M.param_breakdown(name)
    shapes = M.linear_shapes(name)
    n_layers = M.get_shape(name).n_layers
    nf4_linear = n_layers * sum(M.quantized_linear_bytes(o * i) for o, i in shapes.values())
    rest = pb.total - pb.linear                         # embeddings, head (if untied), norms: left in 16 bits
    print(f"{name}: linear layers {nf4_linear / (2 * pb.linear):.1%} of their bf16 bytes; whole base "
          f"{(nf4_linear + 2 * rest) / (2 * pb.total):.1%} of the bf16 model ({(nf4_linear + 2 * rest) / 1e9:.2f} "
          f"vs {2 * pb.total / 1e9:.2f} GB; {rest / pb.total:.0%} of the parameters are not in linear layers)")

# %% [markdown]
# SmolLM2 ties a 49,152-token embedding to its head: a fifth of its parameters never shrink, which is why
# its QLoRA base is far from a quarter (the committed H200 run measured the resident weights of the QLoRA
# run at {{result:memory_vs_measured_h200.json:rows.2.measured_weights_gb/rows.1.measured_weights_gb:.0%}} of the LoRA
# run's, adapters included: `benchmarks/results/memory_vs_measured_h200.json`).
#
# ### The same experiment on SmolLM2 (run on an H200, committed)
#
# On a CPU the cell above trains a tiny random model; on a GPU it runs on SmolLM2 with fact accuracy on all
# 82 held-out questions. That GPU run is committed in `benchmarks/results/peft_methods_smollm2_h200.json`:
# %%
from lora_ref.results import load_result

gpu_run = load_result("peft_methods_smollm2_h200.json")
if gpu_run is not None:
    print(f"{gpu_run['gpu']}, {gpu_run['date']}, {gpu_run['steps']} steps of batch {gpu_run['batch_size']} ({gpu_run['note']})")
    print(f"{'method':10s} {'trainable':>11s} {'eval loss':>9s} {'gap':>6s} {'facts':>6s} {'peak MB':>8s} {'adapter':>10s}")
    for m in gpu_run["methods"]:
        print(f"{m['method']:10s} {m['trainable']:11,d} {m['eval_loss']:9.3f} {m['gap']:6.3f} "
              f"{100 * m['fact_accuracy']:5.0f}% {m['memory_mb']:8.0f} {m['adapter_kb'] / 1e3:8.2f}MB")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for m in gpu_run["methods"]:
        ax.scatter(m["trainable"], 100 * m["fact_accuracy"])
        ax.annotate(m["method"], (m["trainable"], 100 * m["fact_accuracy"]), fontsize=7)
    ax.set_xscale("log"); ax.set_xlabel("trainable parameters"); ax.set_ylabel("held-out fact accuracy (%)")
    ax.set_title("SmolLM2-135M on the course data (H200)", fontsize=9); plt.tight_layout(); plt.show()

# %% [markdown]
# On a pretrained model the ordering is clear: the soft-prompt methods (prompt, P-tuning, prefix) end with
# held-out losses of {{result:peft_methods_smollm2_h200.json:methods.2.eval_loss:.1f}} to {{result:peft_methods_smollm2_h200.json:methods.1.eval_loss:.1f}} and teach
# almost no facts in 150 steps (at most {{result:peft_methods_smollm2_h200.json:methods.2.fact_accuracy:.0%}}); LoRA on q,v gets
# {{result:peft_methods_smollm2_h200.json:methods.3.fact_accuracy:.0%}} of the questions, LoRA on all linear layers
# {{result:peft_methods_smollm2_h200.json:methods.4.fact_accuracy:.0%}} and QLoRA {{result:peft_methods_smollm2_h200.json:methods.5.fact_accuracy:.0%}}, level with full
# fine-tuning ({{result:peft_methods_smollm2_h200.json:methods.6.fact_accuracy:.0%}}), which trains
# {{result:peft_methods_smollm2_h200.json:methods.6.trainable/methods.4.trainable:.0f}}x more parameters and ships a whole model. Two things the table does *not* show: QLoRA's peak memory is not
# lower here (at 135M parameters the weights are a small part of the peak, and every run keeps the fp32
# base on the GPU for the next method's copy); notebook 06 measures memory at the 7B shape, where the weights
# dominate. And one seed: `benchmarks/results/quality_qlora_h200.md` repeats LoRA against QLoRA over 5 seeds
# ({{result:quality_qlora_h200.json:per_seed.lora.*.fact_accuracy.@mean:.1%}} vs
# {{result:quality_qlora_h200.json:per_seed.qlora.*.fact_accuracy.@mean:.1%}}).
#
# ## 4. When is full fine-tuning the right call?
#
# LoRA assumes the *update* $\Delta W$ is close to low rank (notebook 01). Two cases where it is not:
# the task needs knowledge or skills the base lacks (the random base above), or a large, different
# domain (new language, code for a model that saw none). By Eckart–Young, a rank-$r$ adapter can reach at
# best the tail energy $\sum_{i>r}\sigma_i^2$ of the update it needs. Measured on two 256×256 "needed
# updates": one of rank 8 and one full-rank:
# %%
torch.manual_seed(0)
d = 256
needed = {"low-rank need (rank 8)": torch.randn(d, 8) @ torch.randn(8, d),
          "full-rank need (random)": torch.randn(d, d)}
ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
fig, ax = plt.subplots(figsize=(5.5, 3.2))
for name, U in needed.items():
    sv = torch.linalg.svdvals(U)
    residual = [(sv[r:] ** 2).sum().sqrt().item() / sv.norm().item() for r in ranks]
    ax.plot(ranks, residual, "o-", label=name)
    print(f"{name:26s} best rank-16 adapter leaves {100 * residual[ranks.index(16)]:.1f}% of the update unexplained")
ax.set_xscale("log", base=2); ax.set_xlabel("LoRA rank r"); ax.set_ylabel("unexplained part of the update")
ax.axvline(d, color="grey", ls=":"); ax.legend(fontsize=8); ax.set_title("full fine-tuning = rank d")
plt.tight_layout(); plt.show()
full = next(r for r in results if r.method == "full")
best_peft = min((r for r in results if r.method != "full"), key=lambda r: r.eval_loss)
print(f"in the experiment above: full FT eval loss {full.eval_loss:.3f} vs best PEFT ({best_peft.method}) {best_peft.eval_loss:.3f}")

# %% [markdown]
# Choose full fine-tuning when: the needed change is large and high-rank (new domain, new language,
# continued pre-training), you have lots of data (hundreds of millions of tokens), you serve one task and
# can afford the memory (weights + gradients + AdamW ≈ 16 bytes/parameter in mixed precision: about 108 GB
# for Llama-2-7B's 6.74B parameters before activations; the article's "84 GB" is 12 bytes x 7B: 16-bit
# weights and gradients and two fp32 Adam moments, without the fp32 master copy, as notebook 00 counts), and
# quality is worth that cost. Choose LoRA/
# QLoRA when the base already can do the task and you adapt its behaviour, data is small (less
# over-fitting), you need many tasks per base, or the memory is not there.
#
# ## 5. Perplexity is not an "eval score"
#
# The seed article's trainer evaluates with
# `total_score += torch.exp(outputs.loss).item()` per batch and returns the mean, calling it an "eval
# score". Three problems: (1) it averages per-*batch* perplexities, so the number changes with the batch
# size and with how many tokens each batch holds (by Jensen's inequality it is $\ge$ the true perplexity
# when every batch holds the same number of tokens, but with unequal batches it can fall on either side:
# both cases are computed below); (2) its labels are the whole input, so it scores how well the model predicts the system
# prompt and the question; (3) perplexity measures the likelihood of the reference wording, not whether
# the answer is right. The fix for (1):
#
# $$ \mathrm{PPL} = \exp\Big( \frac{\sum_b \ell_b\, n_b}{\sum_b n_b} \Big), \qquad \ell_b = \text{mean token loss of batch } b,\; n_b = \text{its loss-carrying tokens}. $$
#
# ### Exercise 3 — `token_weighted_perplexity(batch_losses, batch_tokens)`
#
# Lists of floats and ints of the same length; return the perplexity above as a Python float. Raise
# `ValueError` if the lengths differ, the lists are empty, a count is negative or the total is zero.
# %% answer id=token_weighted_perplexity
def token_weighted_perplexity(batch_losses, batch_tokens):
    """exp(sum_b loss_b * n_b / sum_b n_b)."""
    ### BEGIN SOLUTION
    if len(batch_losses) != len(batch_tokens) or not batch_losses:
        raise ValueError("need one token count per batch loss, and at least one batch")
    if any(n < 0 for n in batch_tokens) or sum(batch_tokens) == 0:
        raise ValueError(f"token counts {batch_tokens} must be >= 0 with a positive total")
    return math.exp(sum(float(l) * n for l, n in zip(batch_losses, batch_tokens)) / sum(batch_tokens))
    ### END SOLUTION

# %% test id=test_token_weighted_perplexity points=2
# hand-worked: batch 1 has 30 tokens at loss 1.0, batch 2 has 10 tokens at loss 3.0
#   token-weighted mean loss = (30 * 1 + 10 * 3) / 40 = 1.5  ->  PPL = e^1.5 = 4.4817
#   the article's mean of per-batch exp: (e^1 + e^3) / 2 = 11.40
assert abs(token_weighted_perplexity([1.0, 3.0], [30, 10]) - math.exp(1.5)) < 1e-9, \
    f"expected e^1.5 = {math.exp(1.5):.4f}, got {token_weighted_perplexity([1.0, 3.0], [30, 10])}"
assert abs(token_weighted_perplexity([2.0], [7]) - math.exp(2.0)) < 1e-9, "one batch: exp(its loss)"
assert isinstance(token_weighted_perplexity([1.0], [1]), float), "return a Python float"
for _bad in [([1.0], [1, 2]), ([], []), ([1.0], [0]), ([1.0, 1.0], [-1, 3])]:
    try:
        token_weighted_perplexity(*_bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"token_weighted_perplexity{_bad} should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("08.token_weighted_perplexity", token_weighted_perplexity)
### END HIDDEN TESTS

# %% [markdown]
# **When is the article's figure too high?** Jensen's inequality (exp is convex) says
# $\frac1B\sum_b e^{\ell_b} \ge e^{\frac1B\sum_b \ell_b}$. The right-hand side is the true perplexity only
# when every batch carries the same number of tokens, because only then is the plain mean of the batch
# losses the token-weighted mean. Both cases, computed (with `lora_ref`'s `token_weighted_perplexity`, the
# reference of your exercise):
# %%
from lora_ref.peft_family import token_weighted_perplexity as ref_ppl

cases = {"equal batches: 100 tokens at loss 1.0, 100 at 3.0": ([1.0, 3.0], [100, 100]),
         "unequal: 1,000 tokens at loss 3.0, 1 token at 0.0": ([3.0, 0.0], [1000, 1])}
for name, (batch_losses, batch_tokens) in cases.items():
    article = sum(math.exp(l) for l in batch_losses) / len(batch_losses)
    true = ref_ppl(batch_losses, batch_tokens)
    print(f"{name}: mean of per-batch exp {article:6.2f} | true perplexity {true:6.2f} | "
          f"{'too high' if article > true else 'too LOW'}")

# %% [markdown]
# **Measured: the article's score depends on the batch size; ours does not.** Per-batch answer-token
# losses of the LoRA model trained in section 3 over the held-out questions, batched three ways:
# %%
from lora_ref.training import evaluate_loss

eval_model = next(r.model for r in results if r.method == "lora")
encoded = [data.encode_example(tok, ex) for ex in heldout]
for bs in (1, 4, 16):
    losses, counts = [], []
    with torch.no_grad():
        for i in range(0, len(encoded), bs):
            b = data.collate(encoded[i:i + bs], tok.pad_token_id)
            logits = eval_model(input_ids=b["input_ids"].to(DEVICE), attention_mask=b["attention_mask"].to(DEVICE)).logits
            lab = b["labels"][:, 1:].to(DEVICE)
            losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lab.reshape(-1),
                                          ignore_index=-100).item())
            counts.append(int((lab != -100).sum()))
    article = sum(math.exp(l) for l in losses) / len(losses)
    print(f"batch size {bs:2d}: article's 'eval score' {article:10.2f} | token-weighted perplexity "
          f"{token_weighted_perplexity(losses, counts):10.2f}")
print(f"lora_ref.training.evaluate_loss -> perplexity {math.exp(evaluate_loss(eval_model, tok, heldout)):.2f}")
by_loss = [r.method for r in sorted(results, key=lambda r: r.eval_loss)]
by_acc = [r.method for r in sorted(results, key=lambda r: -r.token_accuracy)]
print("ranking by held-out loss:    ", by_loss)
print("ranking by held-out accuracy:", by_acc)

# %% [markdown]
# Perplexity and accuracy usually agree on big differences and disagree on small ones: a model can
# become more confident about the reference *wording* without getting more facts right, or state the
# right fact in different words (high loss, correct answer). Report the task metric (fact accuracy here;
# accuracy/F1/exact match, or human/LLM-judge ratings for open answers), with the loss as a diagnostic.
#
# ## 6. Mixed precision: fp16 overflows and underflows, bf16 rounds coarsely
#
# | | bits (exp/mantissa) | max | smallest normal | spacing near 1 (eps) |
# | --- | --- | --- | --- | --- |
# | fp32 | 8 / 23 | 3.4e38 | 1.2e-38 | 1.2e-7 |
# | fp16 | 5 / 10 | 65,504 | 6.1e-5 | 9.8e-4 |
# | bf16 | 8 / 7 | 3.4e38 | 1.2e-38 | 7.8e-3 |
#
# Each row is read off `torch.finfo` below, then each consequence is measured.
# %%
for dt in (torch.float32, torch.float16, torch.bfloat16):
    fi = torch.finfo(dt)
    print(f"{str(dt):15s} max {fi.max:10.3g}  smallest normal {fi.tiny:9.3g}  eps {fi.eps:9.3g}")
act = torch.tensor([300.0, 1000.0])
print("activation 300 and 1000, squared (e.g. inside a norm): fp16", (act.half() ** 2).tolist(),
      "| bf16", (act.bfloat16() ** 2).tolist())
logits = torch.tensor([10.0, 11.0, 12.0])
print("exp of logits 10, 11, 12 (a softmax without max-subtraction): fp16", torch.exp(logits.half()).tolist(),
      "| bf16", torch.exp(logits.bfloat16()).tolist())

# %% [markdown]
# **Gradient underflow and loss scaling.** Real gradients are small: many fall below fp16's smallest
# subnormal ($6 \times 10^{-8}$) and become exactly zero. Mixed-precision training in fp16 multiplies
# the loss by a scale $S$ before backward (gradients scale by $S$ too), unscales in fp32 before the
# optimizer step, and **skips** the step and halves $S$ when any gradient overflowed to Inf
# (`torch.amp.GradScaler`: start at $2^{16}$, double after 2000 clean steps). We take the real
# gradients of a LoRA step on the tiny model and count, for each scale, the share that underflows to
# zero or overflows to Inf in fp16:
# %%
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers

torch.manual_seed(0)
m = inject_lora(tiny_llama(seed=0), LoRAConfig(r=8, target_modules="all-linear"))
with torch.no_grad():
    for layer in lora_layers(m).values():
        layer.lora_B.normal_(0, 0.01)
loss = F.cross_entropy(m(ids).logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)) * 1e-3   # a late-training loss size
loss.backward()
grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
grads = grads[grads != 0]
scales = [2.0 ** k for k in range(0, 41, 4)]
under = [((grads * S).half() == 0).float().mean().item() for S in scales]
over = [torch.isinf((grads * S).half()).float().mean().item() for S in scales]
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.plot([math.log2(S) for S in scales], [100 * u for u in under], "o-", label="underflow to 0")
ax.plot([math.log2(S) for S in scales], [100 * o for o in over], "s-", label="overflow to Inf")
ax.set_xlabel("log2(loss scale S)"); ax.set_ylabel("% of gradient entries"); ax.legend()
ax.set_title("fp16 gradients: the window loss scaling must hit"); plt.tight_layout(); plt.show()
print(f"gradient magnitudes: median {grads.abs().median():.2e}, min {grads.abs().min():.2e}, max {grads.abs().max():.2e}")
print(f"no scaling: {100 * under[0]:.1f}% of gradients vanish in fp16; S = 2^16: {100 * under[4]:.2f}%, "
      f"overflow {100 * over[4]:.2f}%;  bf16 without scaling: {100 * ((grads.bfloat16()) == 0).float().mean():.2f}% vanish")

# %% [markdown]
# **bf16 needs no loss scaling** (same exponent range as fp32), but it keeps only 8 significant bits: an
# update smaller than half the spacing of the weight is lost. With weights *stored* in bf16, an
# AdamW step of size lr ≈ 1e-4 on weights of size ~0.02–1 mostly disappears; that is why mixed precision
# keeps fp32 master weights (and why LoRA keeps $A$, $B$ in fp32 even on a bf16 base):
# %%
w = tiny_llama(seed=0).model.layers[0].self_attn.q_proj.weight.detach()
for lr in (1e-3, 1e-4, 1e-5):
    step = lr * torch.sign(torch.randn_like(w))                 # Adam's step is about lr per entry
    lost = ((w.bfloat16() + step.bfloat16()) == w.bfloat16()).float().mean().item()
    print(f"update of size {lr:g} on bf16 weights (|w| median {w.abs().median():.3f}): {100 * lost:5.1f}% of entries unchanged")
print("1 + 1e-3 in bf16 ->", (torch.tensor(1.0, dtype=torch.bfloat16) + 1e-3).item(),
      "| in fp16 ->", (torch.tensor(1.0, dtype=torch.float16) + 1e-3).item())

# %% [markdown]
# Summary for the interview (article's "considerations for mixed precision"): prefer **bf16** on hardware
# that has it (Ampere and newer): no overflow, no loss scaling; keep master weights, optimizer state and
# LoRA adapters in fp32; with **fp16** use dynamic loss scaling (GradScaler) and watch for Inf/NaN
# (skipped steps); compute softmax/loss/norms in fp32 (autocast does); QLoRA computes in bf16 on top of
# NF4 storage — the storage type and the compute type are different choices.
#
# ## 7. Interview practice
# *"What are the differences among prefix tuning, prompt tuning and P-tuning?"* Answer with the
# parameter counts and the attention measurement above.
# %% [markdown] manual id=q_family points=2
# Prompt tuning learns n input embeddings (n·d parameters; input layer only; Lester et al. 2021).
# P-tuning also works at the input but generates the virtual tokens with a prompt encoder (bi-LSTM/MLP)
# for stabler optimisation; after training the output is cached. Prefix tuning prepends learned keys
# and values in every layer's attention (2·L·n·d_kv parameters kept; MLP reparameterisation while
# training; Li & Liang 2021), so it steers every layer directly — measured above: the real tokens put a
# clear share of their attention on the prefix in every layer, and masking it gives back the base
# model. All three cost n positions of context and attention at inference and cannot be merged; LoRA
# changes the weights and can.
# %% [markdown]
# *"How do you evaluate and compare fine-tuning methods?"* Use your experiment's table.
# %% [markdown] manual id=q_evaluate points=2
# Controlled experiment: same base, data, batches, steps/compute budget and evaluation; vary only the
# method (tune each method's learning rate). Report the task metric on held-out data (fact accuracy,
# exact match/F1), the generalisation gap (held-out vs train), trainable parameters, peak memory, time
# per step, adapter size and inference cost; repeat with several seeds when differences are small.
# Perplexity/eval loss is a diagnostic, computed token-weighted over the whole set on answer tokens only
# — not the article's mean of per-batch exp(loss).
