# %% [markdown]
# # 04 · Rank, alpha and which layers: measured, not guessed
#
# "How do you choose the rank and alpha of LoRA? Any heuristics?" is on every interview list, and the
# seed article answers with rules of thumb: rank 8-16 for simple tasks and 64-128 for complex ones, lower
# rank with little data, and the formula $r \approx \sqrt{\min(d, k)}/4$. Here we test them on SmolLM2
# and the Velora Cycles data.
#
# **By the end of this notebook you will have**
# 1. swept the rank $r$ with the classic scaling $\alpha/r$ and with rsLoRA's $\alpha/\sqrt{r}$, and swept
#    $\alpha$ at fixed $r$;
# 2. compared adapting $W_q, W_v$ (the LoRA paper) with all linear layers (the QLoRA paper);
# 3. written the subspace similarity of the LoRA paper (Section 7) and reproduced its $r=8$ vs $r=64$
#    experiment on SmolLM2;
# 4. measured the effective rank of learned updates and held the $\sqrt{\min(d,k)}/4$ formula against it;
# 5. watched over-fitting happen with little data.
#
# **Grading.** Two exercises (5 points), with visible tests and hidden tests against `lora_ref.lowrank`.
#
# **How the sweeps stay cheap.** A sweep trains many adapters. We adapt only the **top two decoder layers**
# of SmolLM2 (28 and 29 of 30): everything below is frozen and has no dropout, so the hidden states entering
# layer 28 never change. `lora_ref.sweep` computes them once and trains from there, which makes a step about
# ten times cheaper with **exactly** the same loss and gradients (tested in `tests/test_sweep.py`). The price:
# adapters in two layers learn less than adapters everywhere, so compare runs with each other, not with
# notebook 03. A fuller sweep (all facts, more steps, more ranks) is one command away (section 8).
# %% locked id=setup
import copy
import json
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_ref import data, lowrank, sweep
from lora_ref.lora import LoRAConfig, count_parameters, inject_lora, lora_layers
from lora_ref.models import load_smollm2, notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads

# %% [markdown]
# ## 1. What r and alpha control
#
# A LoRA layer adds $\Delta W = s\,BA$ with $A \in \mathbb{R}^{r \times k}$, $B \in \mathbb{R}^{d \times r}$:
# * $r$ bounds the **rank** of the update ($\operatorname{rank}(BA) \le r$) and sets the cost,
#   $r(d + k)$ trainable numbers per layer;
# * $s$ sets its **size**: $s = \alpha/r$ in the paper, $s = \alpha/\sqrt{r}$ in rsLoRA (Kalajdzievski
#   2023), which argues that with $\alpha/r$ large ranks learn too slowly. Notebook 02 (section 2) measured
#   both on a real layer (`benchmarks/rslora_norms.py`): in the first Adam steps the columns of $B$ move
#   independently and $\|BA\|$ grows like $\sqrt{r}$, so $\alpha/r$ starts large ranks slowly; as training
#   goes on they line up on the directions the loss rewards, $BA$ grows like $r$, and $\alpha/r$ keeps the
#   trained update's size nearly independent of $r$ (×{{result:rslora_norms_cpu.json:summary.step200.alpha_r_update_fro_ratio:.2f}} from $r={{result:rslora_norms_cpu.json:r_min:d}}$ to
#   ${{result:rslora_norms_cpu.json:r_max:d}}$ after {{result:rslora_norms_cpu.json:steps:d}} steps) while rsLoRA's grows with $r$ (×{{result:rslora_norms_cpu.json:summary.step200.rslora_update_fro_ratio:.2f}}). Section 2
#   shows what that does to a rank sweep;
# * with Adam, multiplying $\alpha$ by $c$ is close to multiplying the learning rate by $c$ (paper,
#   Section 4.1), which is why the paper fixes $\alpha$ and tunes nothing else.
#
# The data: 8 facts (4 while grading), their 80 training examples and 16 held-out questions; the metric is
# the **held-out answer loss** (cross-entropy on the reference answers of unseen questions) and the
# teacher-forced answer-token accuracy. Both are cheap; notebook 03 measures fact accuracy by generation.
# %%
model, tok = load_smollm2(device=DEVICE)
splits = data.load_dataset()
facts = [f.id for f in data.load_facts()[0]]
rng = np.random.default_rng(0)
subset = set(rng.choice(facts, size=4 if GRADING else 8, replace=False).tolist())
train_ex = [e for e in splits.train if e.fact_id in subset]
held_ex = [e for e in splits.heldout if e.fact_id in subset]
FIRST = len(model.model.layers) - 2                 # adapt layers 28 and 29 only
TOP = rf"model\.layers\.({FIRST}|{FIRST + 1})\.{{}}"  # regex on full module names, filled per target
train_cache = sweep.cache_prefix(model, tok, train_ex, FIRST, progress=True)
held_cache = sweep.cache_prefix(model, tok, held_ex, FIRST)
base_loss, base_acc = sweep.evaluate_top(model, held_cache)
print(f"facts {sorted(subset)}: {len(train_ex)} train, {len(held_ex)} held-out examples")
print(f"base model: held-out answer loss {base_loss:.3f}, answer-token accuracy {base_acc:.1%}")

STEPS = 8 if GRADING else 16
BATCH, LR = 8, 1e-3


def targets_for(names):
    """Full-name regexes for the given projections in the top two layers."""
    return tuple(TOP.format(rf"(self_attn|mlp)\.{n}") for n in names)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fit(r, alpha, names=ALL, rslora=False, examples_cache=None, steps=None, lr=LR, eval_every=None, seed=0):
    """Train one adapter on the cached top layers; return (run, adapted model)."""
    m = copy.deepcopy(model)
    torch.manual_seed(1000 * seed + r)   # each rank its own random A (section 5 compares r=8 with r=64)
    inject_lora(m, LoRAConfig(r=r, alpha=alpha, target_modules=targets_for(names), use_rslora=rslora))
    run = sweep.train_top(m, examples_cache or train_cache, held_cache, steps=steps or STEPS, lr=lr,
                          batch_size=BATCH, seed=seed, eval_every=eval_every)
    run.trainable = count_parameters(m).trainable
    return run, m

# %% [markdown]
# ## 2. Sweep r: alpha/r against rsLoRA
#
# Same data, steps, seed and learning rate; $\alpha = 16$ fixed; only $r$ and the scaling rule change.
# %%
RANKS = [8, 64] if GRADING else [1, 8, 64]
sweep_runs, adapters = {}, {}
for r in tqdm(RANKS, desc="rank sweep (x2 scalings)"):
    for rs in (False, True):
        run, m = fit(r, 16, rslora=rs)
        sweep_runs[(r, rs)] = run
        if not rs:                      # keep A and delta W of the alpha/r adapters for section 5
            adapters[r] = {n: (l.lora_A.detach().clone(), l.delta_weight().detach().clone())
                           for n, l in lora_layers(m).items()}
        del m
print(f"{'r':>3s} {'trainable':>10s} {'alpha/r: loss':>14s} {'acc':>6s} {'rsLoRA: loss':>13s} {'acc':>6s}")
for r in RANKS:
    a, b = sweep_runs[(r, False)], sweep_runs[(r, True)]
    print(f"{r:3d} {a.trainable:10,d} {a.eval_loss:14.3f} {a.eval_token_accuracy:6.1%} {b.eval_loss:13.3f} "
          f"{b.eval_token_accuracy:6.1%}")
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
for rs, name in ((False, "alpha/r"), (True, "alpha/sqrt(r) (rsLoRA)")):
    ax[0].plot(RANKS, [sweep_runs[(r, rs)].eval_loss for r in RANKS], "o-", label=name)
ax[0].axhline(base_loss, color="grey", ls=":", label="base model")
ax[0].set_xscale("log", base=2); ax[0].set_xlabel("rank r"); ax[0].set_ylabel("held-out answer loss")
ax[0].legend(); ax[0].set_title(f"alpha = 16, {STEPS} steps, lr {LR:g}")
for (r, rs), run in sweep_runs.items():
    ax[1].plot(run.losses, ls="--" if rs else "-", label=f"r={r} ({'rsLoRA' if rs else 'alpha/r'})")
ax[1].set_xlabel("step"); ax[1].set_ylabel("training loss"); ax[1].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# What to look for in the table. **With $\alpha/r$ the ranks land close together.** Past the first steps the
# columns of $B$ move in step, $BA$ grows like $r$, and $s = \alpha/r$ cancels it, which is what the paper
# intended ("tuning $\alpha$ is roughly the same as tuning the learning rate"; notebook 02's measurement:
# after {{result:rslora_norms_cpu.json:steps:d}} steps the $\alpha/r$ update at $r={{result:rslora_norms_cpu.json:r_max:d}}$ is ×{{result:rslora_norms_cpu.json:summary.step200.alpha_r_update_fro_ratio:.2f}} the size of $r={{result:rslora_norms_cpu.json:r_min:d}}$'s). **rsLoRA**
# divides by $\sqrt{r}$ only, so at $r = 64$, $\alpha = 16$ its scale is $\sqrt{64} = 8$ times $\alpha/r$'s: it
# behaves like a larger learning rate at larger $r$, faster in a short run like this one (and less stable
# if the rate is already high). rsLoRA's argument ($\alpha/r$ starves large ranks) describes the first
# steps, where $B$'s columns still move independently and $\|BA\|$ grows like $\sqrt{r}$ (notebook 02: the
# $\alpha/r$ update at $r={{result:rslora_norms_cpu.json:r_max:d}}$ is ×{{result:rslora_norms_cpu.json:summary.step1.alpha_r_update_fro_ratio:.3f}} of $r={{result:rslora_norms_cpu.json:r_min:d}}$'s at step 1). Either way:
# **compare ranks at a tuned learning rate**, or the sweep measures the step size, not the rank.
#
# ## 3. Sweep alpha at fixed r
#
# At $r = 8$, $\alpha \in \{2, 16, 128\}$, i.e. $s \in \{0.25, 2, 16\}$ (the $\alpha = 16$ run is section 2's). If $\alpha$ acts like a
# learning-rate multiplier, a larger $\alpha$ with the same lr should look like a larger lr: faster, then
# unstable.
# %%
ALPHAS = [2, 16, 128]
alpha_runs = {a: sweep_runs[(8, False)] if a == 16 else fit(8, a)[0] for a in tqdm(ALPHAS, desc="alpha sweep")}
fig, ax = plt.subplots(figsize=(5.5, 3.2))
for a, run in alpha_runs.items():
    ax.plot(run.losses, label=f"alpha={a} (s={a / 8:g}): held-out {run.eval_loss:.2f}")
ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.legend(fontsize=8); ax.set_title("r = 8")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. Which modules: q, v against all linear layers
#
# The LoRA paper adapted $W_q$ and $W_v$ only (Table 5, with a fixed parameter budget); the QLoRA paper
# found all linear layers necessary to match full fine-tuning. We compare at equal rank ($r=8$,
# $\alpha=16$), and against q,v at $r=64$ (with rsLoRA, so that its update is not scaled down), which has a
# similar parameter count to all-linear at $r=8$.
# %%
module_runs = {"q,v  r=8": fit(8, 16, names=("q_proj", "v_proj"))[0],
               "q,v  r=64": fit(64, 16, names=("q_proj", "v_proj"), rslora=True)[0],
               "all-linear r=8": sweep_runs[(8, False)]}
for label, run in module_runs.items():
    print(f"{label:16s} trainable {run.trainable:9,d}  held-out loss {run.eval_loss:.3f}  "
          f"token acc {run.eval_token_accuracy:.1%}")

# how much of a layer the MLP is: SmolLM2 from the loaded model, Llama-2-7B from lora_ref.memory's shapes
from lora_ref.memory import ATTENTION_PROJECTIONS, linear_shapes

block = model.model.layers[0]
mlp_w = sum(m.weight.numel() for m in block.mlp.modules() if isinstance(m, nn.Linear))
attn_w = sum(m.weight.numel() for m in block.self_attn.modules() if isinstance(m, nn.Linear))
print(f"\nSmolLM2-135M layer: MLP {mlp_w:,} of {mlp_w + attn_w:,} projection weights ({mlp_w / (mlp_w + attn_w):.0%}; "
      f"GQA makes k and v {block.self_attn.k_proj.out_features} wide, q {block.self_attn.q_proj.out_features})")
shapes7 = linear_shapes("llama-2-7b")
mlp7 = sum(o * i for n, (o, i) in shapes7.items() if n not in ATTENTION_PROJECTIONS)
print(f"Llama-2-7B layer (multi-head attention): MLP {mlp7 / sum(o * i for o, i in shapes7.values()):.0%}")

# %% [markdown]
# Compare the held-out losses printed above: they are this short run's. The same comparison on more facts
# and more steps is committed in section 8. Adapting the MLP too spends parameters where most of the
# weights are (the share printed last: more in SmolLM2 than in Llama-2, because grouped-query attention
# shrinks k and v) and where, by the usual account (Geva et al. 2021, "Transformer Feed-Forward Layers Are
# Key-Value Memories", [arXiv 2012.14913](https://arxiv.org/abs/2012.14913)), much of a transformer's factual memory sits.
#
# ## 5. Exercise 1: subspace similarity (3 points)
#
# Are the directions an $r=8$ adapter learns also found by an $r=64$ adapter? The LoRA paper (Section 7)
# compares the **right-singular vectors** of the two $A$ matrices (the input directions each adapter reads):
# with $A = U \Sigma V^\top$, let $V_i$ be the first $i$ right-singular vectors (columns, ordered by
# singular value). Then
#
# $$\phi(A_1, A_2, i, j) = \frac{\| V_{1,i}^\top V_{2,j} \|_F^2}{\min(i, j)} \in [0, 1],$$
#
# 1 when one subspace contains the other, 0 when they are orthogonal. Write
# `subspace_similarity(A1, A2, i, j)` for `A1` $(r_1, k)$, `A2` $(r_2, k)$, returning a Python float.
# Compute the SVD in float64 (`torch.linalg.svd(A.double(), full_matrices=False)` returns $U, S, V^\top$).
# Raise `ValueError` when the two matrices have different widths $k$, or when `i` is not in
# $[1, r_1]$ or `j` not in $[1, r_2]$.
# %% answer id=subspace_similarity
def subspace_similarity(A1, A2, i, j):
    """phi = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j), V = right-singular vectors of A (LoRA Sec. 7)."""
    ### BEGIN SOLUTION
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 must have the same width, got {A1.shape[1]} and {A2.shape[1]}")
    for name, k, A in (("i", i, A1), ("j", j, A2)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(A.shape):
            raise ValueError(f"{name}={k!r} must be an integer in [1, {min(A.shape)}]")
    V1 = torch.linalg.svd(A1.double(), full_matrices=False)[2].T
    V2 = torch.linalg.svd(A2.double(), full_matrices=False)[2].T
    return float(((V1[:, :i].T @ V2[:, :j]) ** 2).sum() / min(i, j))
    ### END SOLUTION

# %% test id=test_subspace_similarity points=3
E = torch.eye(6)
assert abs(subspace_similarity(E[:2] * torch.tensor([[3.0], [1.0]]), E[:3], 1, 3) - 1.0) < 1e-9, \
    "e1 lies inside span(e1, e2, e3): phi = 1"
assert abs(subspace_similarity(E[:2], E[2:5], 2, 3)) < 1e-9, "orthogonal subspaces: phi = 0"
A = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
assert abs(subspace_similarity(A, E[:3, :4], 1, 1) - 0.5) < 1e-9, "cos^2 of 45 degrees = 0.5"
g = torch.Generator().manual_seed(0)
X = torch.randn(5, 40, generator=g)
assert abs(subspace_similarity(X, X, 5, 5) - 1.0) < 1e-9, "a subspace is fully similar to itself"
assert isinstance(subspace_similarity(X, X, 2, 3), float), "return a Python float"
for bad in [(X, torch.randn(3, 41), 1, 1), (X, X, 0, 1), (X, X, 1, 6)]:
    try:
        subspace_similarity(*bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"shapes {tuple(bad[0].shape)}, {tuple(bad[1].shape)} with i={bad[2]}, j={bad[3]} should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("04.subspace_similarity", subspace_similarity)
### END HIDDEN TESTS

# %% [markdown]
# ### Reproducing the paper's Figure 3 on SmolLM2
#
# We take the $r=8$ and $r=64$ adapters of section 2 (same data, same batches, independently initialised
# $A$) and compute $\phi$ between their $A$ matrices for $W_q$ and $W_v$ of
# layer 29. For reference, two **random** subspaces of dimensions $i$ and $j$ in $\mathbb{R}^k$ give
# $\phi \approx \max(i, j)/k$ on average.
#
# A caveat: $A$ starts random, and in a short run most of it stays near its initialisation, so $\phi$
# between two $A$'s partly compares two random inits. What training creates from nothing is $B$ (it starts
# at zero), i.e. the **output directions** of $\Delta W = sBA$ (its left-singular vectors). We compare
# both, and print each $\phi$ as a multiple of the random baseline.
#
# %%
layer, J = f"model.layers.{FIRST + 1}.self_attn", 16       # show j = 1..16 of the r=64 adapter
fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
for col, proj in enumerate(("q_proj", "v_proj")):
    A8, dW8 = adapters[8][f"{layer}.{proj}"]
    A64, dW64 = adapters[64][f"{layer}.{proj}"]
    k = A8.shape[1]
    # what training created: the OUTPUT directions of delta W = s B A (left-singular vectors, the column
    # space of B, which starts at zero), as rows so that subspace_similarity reads them like A's rows
    U8 = torch.linalg.svd(dW8.double(), full_matrices=False)[0][:, :8].T
    U64 = torch.linalg.svd(dW64.double(), full_matrices=False)[0][:, :J].T
    for row, (name, X1, X2) in enumerate((("A (input side)", A8, A64), ("delta W output side", U8, U64))):
        k = X1.shape[1]
        phi = np.array([[lowrank.subspace_similarity(X1, X2, i, j) for j in range(1, J + 1)] for i in range(1, 9)])
        ax = axes[2 * col + row]
        im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", extent=(0.5, J + 0.5, 8.5, 0.5))
        ax.set_title(f"{proj}: {name}, r=8 vs r=64", fontsize=9); ax.set_xlabel("j (r=64)"); ax.set_ylabel("i (r=8)")
        print(f"{proj} {name:20s}: phi(1,1) = {phi[0, 0]:.3f} ({phi[0, 0] * k:5.1f}x random), "
              f"phi(8,8) = {phi[7, 7]:.3f} ({phi[7, 7] * k / 8:5.1f}x random {8 / k:.3f})")
fig.colorbar(im, ax=axes, shrink=0.8); plt.show()

# %% [markdown]
# How to read it: a ratio near 1x means "no more shared than chance"; the paper reports $\phi > 0.5$ for
# the top direction of $A_q$ on GPT-3 after full training, i.e. thousands of times the chance level in its
# 12,288 dimensions. Our runs are a few dozen steps on two layers, and the printout shows two things. On the
# $A$ side the **top** direction is shared hundreds of times above chance: training pushed both adapters'
# $A$ along the same input direction, the one that most reduces the loss on these inputs (Adam moves every
# entry by about the learning rate per step, so a direction shared by all rows' gradients adds up quickly),
# while the rest of $A$ stays near its random start ($\phi(8,8)$ only a few times chance). On the output
# side ($\Delta W$'s left-singular vectors) the top 8 directions of the two ranks overlap well above chance:
# the $r=64$ adapter's extra 56 directions add little that $r=8$ lacks, the paper's point. Longer runs
# (section 8's command) give the learned directions time to separate further from the initialisation.
#
# ## 6. Exercise 2: effective rank (2 points)
#
# How many directions did an update actually use? Write `rank_for_energy(W, fraction)`: the smallest $r$
# such that the best rank-$r$ approximation keeps at least `fraction` of $\|W\|_F^2$, i.e. the smallest
# $r$ with $\sum_{i \le r} \sigma_i^2 \ge \text{fraction} \cdot \sum_i \sigma_i^2$ (singular values in
# float64, `torch.linalg.svdvals`). Raise `ValueError` unless $0 <$ `fraction` $\le 1$. Allow for rounding:
# `fraction=1.0` must return the number of non-zero directions, not fail.
# %% answer id=rank_for_energy
def rank_for_energy(W, fraction):
    """Smallest r whose best rank-r approximation keeps >= fraction of ||W||_F^2."""
    ### BEGIN SOLUTION
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    S = torch.linalg.svdvals(W.double())
    E = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    return int(torch.searchsorted(E, torch.tensor(fraction - 1e-12, dtype=E.dtype, device=E.device)).item()) + 1
    ### END SOLUTION

# %% test id=test_rank_for_energy points=2
D = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))          # energies 9, 4, 1, 0 (total 14)
assert rank_for_energy(D, 0.5) == 1, "9/14 = 0.64 >= 0.5 with one direction"
assert rank_for_energy(D, 0.9) == 2, "(9+4)/14 = 0.93 >= 0.9 needs two"
assert rank_for_energy(D, 1.0) == 3, "all the energy is in three directions (the fourth is zero)"
for bad in (0.0, 1.5, -0.1):
    try:
        rank_for_energy(D, bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"fraction={bad} should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("04.rank_for_energy", rank_for_energy)
### END HIDDEN TESTS

# %% [markdown]
# ## 7. The article's heuristics against the measurements
#
# **"rank ≈ sqrt(min(d, k)) / 4".** For SmolLM2's projections that is:
# %%
for name, (d_out, d_in) in {"q_proj / o_proj": (576, 576), "k_proj / v_proj": (192, 576),
                            "gate / up / down": (1536, 576)}.items():
    print(f"{name:18s} {d_out:5d} x {d_in:<5d} -> sqrt(min)/4 = {math.sqrt(min(d_out, d_in)) / 4:5.2f}")
for name, d in (("Llama-2-7B", 4096), ("GPT-3 175B", 12288)):
    print(f"{name:18s} d = {d:5d}        -> sqrt(d)/4 = {math.sqrt(d) / 4:5.1f}")

print("\neffective rank (90% / 99% of the energy) of the learned updates, by the r=64 adapter (alpha/r):")
eff = {}
for name, (A, dW) in adapters[64].items():
    short = name.split(".")[-1]
    eff.setdefault(short, []).append((rank_for_energy(dW.cpu(), 0.9), rank_for_energy(dW.cpu(), 0.99)))
for short, vals in eff.items():
    print(f"  {short:10s} " + ", ".join(f"layer {FIRST + i}: {a:2d} / {b:2d}" for i, (a, b) in enumerate(vals)))
rand = torch.randn(576, 64) @ torch.randn(64, 576)
print(f"  a random rank-64 product for comparison: {rank_for_energy(rand, 0.9)} / {rank_for_energy(rand, 0.99)}")

# %% [markdown]
# How to read it. For SmolLM2 the formula gives 3.5 to 6. The 90%-energy ranks printed above vary **by
# module** and by layer, for matrices of the same size, which a formula of the matrix size alone cannot
# express; and the 99% ranks are far higher.
# The formula is not in the LoRA paper, whose Table 6 finds $r = 1$ to $8$ competitive on GPT-3 175B
# where the formula says 28, and section 2 showed the loss barely moving with $r$ at a fixed step size. A
# sensible procedure: start at $r = 8$-$16$ on all linear layers with $\alpha = 2r$, tune the learning rate,
# check the effective rank of what was learned, and raise $r$ only while the held-out metric improves.
#
# **"Little data: lower rank."** Below, the $r = 64$ and $r = 4$ adapters train on **one** question per fact
# (8 examples instead of 80) for twice as many steps; we track the held-out loss while they train.
# %%
few = [e for e in train_ex if e.question in {f.train[0] for f in data.load_facts()[0]}]
few_cache = sweep.cache_prefix(model, tok, few, FIRST)
OF_STEPS = 10 if GRADING else 24
of_runs = {}
for r in tqdm([4, 64], desc="little data"):
    of_runs[f"r={r}, {len(few)} examples"] = fit(r, 2 * r, examples_cache=few_cache, steps=OF_STEPS,
                                                 eval_every=max(1, OF_STEPS // 10), lr=3e-3)[0]
of_runs[f"r=4, {len(train_ex)} examples"] = fit(4, 8, steps=OF_STEPS, eval_every=max(1, OF_STEPS // 10), lr=3e-3)[0]
fig, ax = plt.subplots(figsize=(6, 3.3))
for i, (label, run) in enumerate(of_runs.items()):
    ax.plot(run.losses, color=f"C{i}", alpha=0.4)
    steps_, evals = zip(*run.eval_points)
    ax.plot(steps_, evals, "o-", color=f"C{i}", label=f"{label}: held-out (train loss faint)")
ax.axhline(base_loss, color="grey", ls=":"); ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()
for label, run in of_runs.items():
    best = min(e for _, e in run.eval_points)
    final_train = np.mean(run.losses[-3:])
    print(f"{label:22s} final train loss {final_train:.3f}, held-out loss best {best:.3f} -> "
          f"final {run.eval_points[-1][1]:.3f} (gap {run.eval_points[-1][1] - final_train:+.3f})")

# %% [markdown]
# Read the gap between the training loss and the held-out loss: with one example per fact the adapter
# drives the training loss towards zero (it memorises eight sentences) while the held-out loss stays far
# above it, and flattens or turns back up (a held-out metric is how you would stop early). Note that
# the held-out questions are new but their reference answers use the same wording as a training answer,
# so a memorised answer string lowers the held-out loss too; what the held-out set tests is whether a
# *new phrasing* of the question still retrieves the right fact. The remedies are early stopping on a
# held-out metric and more varied data (our paraphrases and greetings); compare the high- and low-rank
# runs to see how much the rank itself matters here.
#
# ## 8. A fuller sweep
#
# The sweeps above use a few facts and a few dozen steps to fit the CPU budget. The same sweep on **all 41
# facts**, ranks 1 to 64 and three scaling rules ($\alpha/r$ with $\alpha=16$, $\alpha = 2r$, rsLoRA) is one
# command; it prints a table and writes a JSON file you can plot like section 2 (minutes on a GPU, about an
# hour on a 2-core CPU):
#
# ```
# .venv/bin/python benchmarks/course_rank_sweep.py --out runs/rank_sweep.json
# ```
#
# It also repeats section 4's comparison of target modules (`--no-modules` skips it; `--facts` and
# `--ranks` shorten the run). When its result is committed in `benchmarks/results/course_rank_sweep.json`
# (with the device, date and command), the cell below shows it:
# %%
from lora_ref.results import load_result

full_sweep = load_result("course_rank_sweep.json")
if full_sweep is not None:
    print(f"{full_sweep['device']}, {full_sweep['date']}: `{full_sweep['command']}`")
    print(f"{full_sweep['n_train']} training / {full_sweep['n_heldout']} held-out examples, {full_sweep['steps']} steps, "
          f"lr {full_sweep['lr']:g}, layers {full_sweep['layers']}; base held-out loss {full_sweep['base_eval_loss']:.3f}")
    rules = list(full_sweep["rank_sweep"])
    print(f"{'r':>3s} " + " ".join(f"{rule:>22s}" for rule in rules))
    for k, row in enumerate(full_sweep["rank_sweep"][rules[0]]):
        print(f"{row['r']:3d} " + " ".join(f"{full_sweep['rank_sweep'][rule][k]['eval_loss']:22.3f}" for rule in rules))
    for label, row in full_sweep.get("modules", {}).items():
        print(f"{label:16s} trainable {row['trainable']:9,d}  held-out loss {row['eval_loss']:.3f}  "
              f"token acc {row['eval_token_accuracy']:.1%}")

# %% [markdown]
#
# ## 9. Interview practice
#
# **Q1. How do you choose r and alpha?**
# <details><summary>answer</summary>
# Start small on all linear layers (r = 8-16), alpha = 2r or rsLoRA, lr around 1e-4 to 1e-3; sweep r on a
# log scale with a held-out task metric and stop raising it when the metric stops improving. Remember that with alpha/r a larger r at fixed alpha shrinks the update, so
# compare ranks with alpha scaled (or rsLoRA), and that alpha acts like a learning-rate multiplier with Adam.
# </details>
#
# **Q2. Is "rank ≈ sqrt(min(d,k))/4" a good rule?**
# <details><summary>answer</summary>
# No evidence for it: it is not in the LoRA paper, whose GPT-3 results show r = 1-8 already competitive
# where the rule says ~28. The useful rank depends on how far the task is from pre-training and on the
# data, not on the width. Measure: the effective rank of learned updates (section 7) and a rank sweep.
# </details>
#
# **Q3. Why does low rank work at all?**
# <details><summary>answer</summary>
# Fine-tuning updates of pretrained models have low intrinsic dimension: their energy sits in a few
# directions (notebook 01), and adapters of different ranks learn overlapping top directions (subspace
# similarity, section 5, paper Section 7).
# </details>
#
# **Q4. Which modules do you adapt?**
# <details><summary>answer</summary>
# All linear layers, attention and MLP: QLoRA (Section 4, Figure 2) found LoRA on all linear layers
# necessary to match full fine-tuning. The LoRA paper adapted attention only (W_q, W_v under a fixed
# parameter budget, Table 5) and left the MLP to future work (Section 4.2). The MLP holds most of a layer's
# weights (section 4 prints the share for SmolLM2 and Llama-2-7B); section 4 compares the choices on this
# small run, and the command of section 8 on more data.
# </details>
#
# **Q5. You have 200 examples. What do you worry about, and what do you do?**
# <details><summary>answer</summary>
# Over-fitting: training loss near zero, held-out loss rising (section 7). Use a held-out set with
# different phrasings, early stopping, fewer epochs, some LoRA dropout, and more varied data (paraphrases);
# a lower rank helps less than those.
# </details>
#
# **Q6. What does rsLoRA change and when does it matter?**
# <details><summary>answer</summary>
# The scale alpha/sqrt(r) instead of alpha/r. In the first Adam steps, when B's columns move
# independently and ||BA|| grows like sqrt(r), it keeps the update level across ranks where alpha/r shrinks
# it; once trained (||BA|| grows like r) alpha/r is the rule that keeps the size level, and rsLoRA makes
# large ranks take larger steps, like a larger learning rate (notebook 02, section 2; section 2 here). It
# matters for large ranks (64+): re-tune the learning rate when you switch.
# </details>
