# %% [markdown]
# # 01 · Low rank: why a small update can be enough
#
# LoRA rests on one bet (Hu et al., 2021, [arXiv 2106.09685](https://arxiv.org/abs/2106.09685),
# Section 4.1): the change that fine-tuning makes to a weight matrix, $\Delta W$, has a low "intrinsic
# rank", so it can be written as a product $BA$ of two thin matrices. This notebook gives you the linear
# algebra to state that bet precisely and then **measures** it on the real SmolLM2-135M model.
#
# **By the end you will have**
# 1. written the best rank-$r$ approximation of a matrix (Eckart-Young) and its energy spectrum;
# 2. seen what "intrinsic dimension" means on a small network you train in a random subspace;
# 3. fine-tuned a few SmolLM2 weight matrices fully on the course data and measured that the update's
#    singular values fall off far faster than a random matrix's;
# 4. written the parameter count of LoRA for any Llama-family model, including grouped-query attention,
#    and checked the seed article's "about 128x fewer parameters".
# %% locked id=setup
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
# ## 1. Rank and the singular value decomposition
#
# Every real matrix $W \in \mathbb{R}^{m \times n}$ factors as
#
# $$W = U \,\mathrm{diag}(\sigma_1, \dots, \sigma_k)\, V^\top = \sum_{i=1}^{k} \sigma_i\, u_i v_i^\top,
#   \qquad k = \min(m, n),\quad \sigma_1 \ge \sigma_2 \ge \dots \ge 0,$$
#
# with orthonormal columns $u_i$, $v_i$. The **rank** is the number of non-zero $\sigma_i$: how many
# independent directions $W$ maps. A rank-$r$ matrix can be stored as $B (m \times r)$ times
# $A (r \times n)$: $r(m+n)$ numbers instead of $mn$.
#
# $\|W\|_F^2 = \sum_i \sigma_i^2$: the singular values share out the matrix's "energy".
# %%
torch.manual_seed(0)
u, v = torch.randn(6, 2), torch.randn(2, 5)
W_low = u @ v                                   # rank 2 by construction
print("rank of a (6x2)@(2x5) product:", torch.linalg.matrix_rank(W_low).item())
print("its singular values:", [round(s, 4) for s in torch.linalg.svdvals(W_low).tolist()])
print("singular values of a random 6x5 matrix:", [round(s, 3) for s in torch.linalg.svdvals(torch.randn(6, 5)).tolist()])

# %% [markdown]
# ## 2. Exercise 1 — the best rank-$r$ approximation
#
# **Eckart-Young-Mirsky theorem.** Keeping the $r$ largest singular triplets,
#
# $$W_r = \sum_{i=1}^{r} \sigma_i u_i v_i^\top = U_{:, :r}\,\mathrm{diag}(\sigma_{1..r})\,V_{:, :r}^\top,$$
#
# gives the rank-$r$ matrix closest to $W$ in Frobenius (and spectral) norm, and the error is exactly the
# energy left out: $\|W - W_r\|_F^2 = \sum_{i>r} \sigma_i^2$.
#
# Write `best_rank_r(W, r)`:
# - `W` is a 2-D floating tensor `(m, n)`; return `W_r` with the same shape and **the same dtype** as `W`;
# - `torch.linalg.svd(..., full_matrices=False)` has no half-precision kernel: compute in float64 when `W`
#   is float64, otherwise in float32, then cast back;
# - raise `ValueError` (naming the value) when `r` is not an integer in `[1, min(m, n)]`.
# %% answer id=best_rank_r
def best_rank_r(W: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of W (m, n) by truncated SVD (Eckart-Young); same shape and dtype."""
    ### BEGIN SOLUTION
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"rank r={r!r} must be an integer in [1, {min(W.shape)}]")
    work = W.double() if W.dtype == torch.float64 else W.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(W.dtype)
    ### END SOLUTION

# %% test id=test_best_rank_r points=2
_D = torch.diag(torch.tensor([5.0, 3.0, 1.0]))
_W2 = best_rank_r(_D, 2)
assert _W2.shape == (3, 3), f"W_r must have W's shape (3, 3), got {tuple(_W2.shape)}"
assert torch.allclose(_W2, torch.diag(torch.tensor([5.0, 3.0, 0.0])), atol=1e-5), \
    f"the best rank-2 approximation of diag(5, 3, 1) is diag(5, 3, 0), got\n{_W2}"
torch.manual_seed(3)
_W = torch.randn(30, 20)
for _r in (1, 5, 20):
    _S = torch.linalg.svdvals(_W)
    _err = (_W - best_rank_r(_W, _r)).norm()
    assert torch.isclose(_err, _S[_r:].pow(2).sum().sqrt(), atol=1e-3), \
        f"r={_r}: ||W - W_r||_F should be sqrt(sum of the left-out sigma^2) = {_S[_r:].pow(2).sum().sqrt():.4f}, got {_err:.4f}"
    assert torch.linalg.matrix_rank(best_rank_r(_W, _r)).item() == _r, f"W_r must have rank {_r}"
assert best_rank_r(_W.bfloat16(), 3).dtype == torch.bfloat16, "return W's dtype (compute in float32 for bf16)"
for _bad in (0, 21, 2.0):
    try:
        best_rank_r(_W, _bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"best_rank_r(W (30x20), r={_bad!r}) must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("01.best_rank_r", best_rank_r)
check("01.best_rank_r_half", best_rank_r)
### END HIDDEN TESTS

# %% [markdown]
# **A picture.** A smooth 96x128 "image" plus a little noise, approximated at a few ranks with your
# function: a handful of components carry almost everything.
# %%
yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 128), indexing="ij")
image = torch.sin(3 * xx) * torch.cos(2 * yy) + torch.exp(-4 * (xx**2 + yy**2)) + 0.3 * (xx > 0.3).float()
image = image + 0.05 * torch.randn_like(image)
fig, axes = plt.subplots(1, 5, figsize=(12, 2.4))
for ax, r in zip(axes, [1, 2, 4, 8, 96]):
    approx = best_rank_r(image, r)
    ax.imshow(approx, cmap="viridis"); ax.set_axis_off()
    ax.set_title(f"r={r}: error {(image - approx).norm() / image.norm():.1%}", fontsize=9)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 3. Exercise 2 — the energy spectrum
#
# How much of $W$ does rank $r$ keep? The cumulative **energy**
#
# $$E(r) = \frac{\sum_{i \le r} \sigma_i^2}{\sum_i \sigma_i^2} = 1 - \frac{\|W - W_r\|_F^2}{\|W\|_F^2}$$
#
# climbs from $\sigma_1^2/\|W\|_F^2$ to 1. Write `energy_spectrum(W)` returning the vector
# $[E(1), \dots, E(\min(m,n))]$ as a **float64** tensor (compute the singular values in float64 with
# `torch.linalg.svdvals`). Raise `ValueError` when `W` has no energy (all zeros).
# %% answer id=energy_spectrum
def energy_spectrum(W: torch.Tensor) -> torch.Tensor:
    """Cumulative energy E[k] = sum_{i<=k+1} sigma_i^2 / sum_i sigma_i^2, float64, length min(m, n)."""
    ### BEGIN SOLUTION
    S = torch.linalg.svdvals(W.double())
    total = (S ** 2).sum()
    if not torch.isfinite(total) or total == 0:
        raise ValueError(f"W has no finite, non-zero energy (sum of squared singular values = {total.item()})")
    return torch.cumsum(S ** 2, 0) / total
    ### END SOLUTION

# %% test id=test_energy_spectrum points=1
_E = energy_spectrum(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
assert _E.dtype == torch.float64, f"return float64, got {_E.dtype}"
assert torch.allclose(_E, torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64)), \
    f"diag(3, 2, 1) has energies 9, 4, 1 of 14: expected [9/14, 13/14, 1], got {_E.tolist()}"
assert energy_spectrum(torch.randn(7, 4)).shape == (4,), "one entry per singular value: length min(m, n)"
try:
    energy_spectrum(torch.zeros(3, 3))
except ValueError:
    pass
else:
    raise AssertionError("a zero matrix has no energy: raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("01.energy_spectrum", energy_spectrum)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured: random, low-rank-plus-noise, and a real pretrained weight
#
# A random Gaussian matrix spreads its energy over all directions (its singular values follow the
# Marchenko-Pastur law); a low-rank matrix plus noise reaches 90% after a few components. And a
# **pretrained** weight of SmolLM2? Watch it: LoRA's bet is about the *update* $\Delta W$, not about $W$.
# %%
from lora_ref.models import load_smollm2

model, tokenizer = load_smollm2(device=DEVICE)
W_q = model.model.layers[15].self_attn.q_proj.weight.detach().cpu()
torch.manual_seed(0)
examples = {
    "random Gaussian": torch.randn_like(W_q),
    "rank 8 + 10% noise": best_rank_r(torch.randn_like(W_q), 8) + 0.1 * torch.randn_like(W_q) * 8 / W_q.shape[0] ** 0.5,
    "SmolLM2 layer-15 q_proj (pretrained W)": W_q,
}
fig, ax = plt.subplots(figsize=(6, 3.4))
for name, M in examples.items():
    E = energy_spectrum(M)
    r90 = int(torch.searchsorted(E, torch.tensor(0.9, dtype=E.dtype))) + 1
    ax.plot(range(1, len(E) + 1), E, label=f"{name}: 90% at r={r90}")
ax.set_xscale("log"); ax.set_xlabel("rank r"); ax.set_ylabel("energy kept E(r)"); ax.legend(fontsize=8)
ax.set_title(f"energy spectra of {W_q.shape[0]}x{W_q.shape[1]} matrices"); plt.tight_layout(); plt.show()

# %% [markdown]
# The pretrained weight needs hundreds of directions: it is *not* low rank, and LoRA does not
# approximate it. LoRA keeps $W$ exactly and only constrains the change.
#
# ## 4. Intrinsic dimension
#
# Li et al. (2018, [arXiv 1804.08838](https://arxiv.org/abs/1804.08838)) trained networks in a random
# $d$-dimensional subspace of their $D$ parameters, $\theta = \theta_0 + P z$ with a fixed random
# $P \in \mathbb{R}^{D \times d}$ and only $z \in \mathbb{R}^d$ trained, and found that a $d$ far below
# $D$ already reaches 90% of the full solution's quality: the *intrinsic dimension* of the task.
# Aghajanyan et al. (2020, [arXiv 2012.13255](https://arxiv.org/abs/2012.13255)) measured it for
# fine-tuning pretrained language models and found it small — and smaller for larger, better pretrained
# models. LoRA cites both as its motivation.
#
# We reproduce the idea on a small network (a few thousand parameters) learning a teacher's labels:
# %%
torch.manual_seed(0)
X = torch.randn(1024, 16)
teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
with torch.no_grad():
    y = teacher(X).argmax(1)
torch.manual_seed(1)
student = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))
theta0 = nn.utils.parameters_to_vector(student.parameters()).detach()
D = theta0.numel()
shapes = [p.shape for p in student.parameters()]


def functional_forward(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run the student with its parameters taken from one flat vector theta."""
    params, i = [], 0
    for s in shapes:
        params.append(theta[i:i + math.prod(s)].view(s)); i += math.prod(s)
    h = F.relu(F.linear(x, params[0], params[1]))
    h = F.relu(F.linear(h, params[2], params[3]))
    return F.linear(h, params[4], params[5])


def accuracy(theta: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (functional_forward(theta, X).argmax(1) == labels).float().mean().item()


def train_in_subspace(start: torch.Tensor, labels: torch.Tensor, d: int, steps: int) -> float:
    """Train only z in theta = start + P z (P random, D x d, fixed); return training accuracy."""
    g = torch.Generator().manual_seed(d)
    P = torch.randn(D, d, generator=g) / math.sqrt(D)
    z = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(steps):
        loss = F.cross_entropy(functional_forward(start + P @ z, X), labels)
        opt.zero_grad(); loss.backward(); opt.step()
    return accuracy(start + P @ z, labels)


def train_full(start: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(functional_forward(theta, X), labels)
        opt.zero_grad(); loss.backward(); opt.step()
    return theta.detach()


steps = 80 if GRADING else 200
dims = [1, 4, 16, 64, 256]
full_acc = accuracy(train_full(theta0, y, steps), y)
accs = [train_in_subspace(theta0, y, d, steps) for d in tqdm(dims, desc="subspace sizes")]
d90 = next((d for d, a in zip(dims, accs) if a >= 0.9 * full_acc), None)
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.semilogx(dims, accs, "o-", label="train z only (d numbers)")
ax.axhline(full_acc, color="k", ls="--", label=f"all D={D:,} parameters")
ax.axhline(0.9 * full_acc, color="grey", ls=":", label="90% of full")
ax.set_xlabel("subspace dimension d"); ax.set_ylabel("training accuracy"); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()
print(f"full training: {full_acc:.3f}; accuracy by d: {dict(zip(dims, [round(a, 3) for a in accs]))}")
print(f"d90 (smallest d tried reaching 90% of full) = {d90} of D = {D:,} parameters "
      f"({100 * d90 / D:.0f}%)" if d90 else "no d tried reached 90% of full training")
# %% [markdown]
# Even learning *from scratch*, a random subspace with under a tenth of the parameters reaches 90% of full
# training here. Aghajanyan et al. found fine-tuning a *pretrained* language model to be far more
# compressible still: pretraining leaves a model that a few hundred directions can adapt. The
# measurement that matters for LoRA follows: the update of a real fine-tuning.
# %% [markdown]
# ## 5. Measured on SmolLM2: the fine-tuning update is low rank
#
# Now the real test of LoRA's hypothesis. We **fully** fine-tune a few weight matrices of SmolLM2-135M —
# the query and value projections of its last two layers, every entry free — on the course's
# customer-service data (Velora Cycles; loss on the answer tokens only), with AdamW. Then we take
# $\Delta W = W_\text{after} - W_\text{before}$ and compare its energy spectrum with that of a random
# Gaussian matrix of the same shape. If fine-tuning needed all directions, $\Delta W$ would look random.
#
# (Training is short, a demo sized for a CPU; it shrinks further while grading. It runs on the GPU when
# there is one.)
# %%
from lora_ref.data import load_dataset
from lora_ref.training import train

splits = load_dataset()
for p in model.parameters():
    p.requires_grad_(False)
targets = {}
for i in (model.config.num_hidden_layers - 2, model.config.num_hidden_layers - 1):
    for proj in ("q_proj", "v_proj"):
        module = getattr(model.model.layers[i].self_attn, proj)
        module.weight.requires_grad_(True)
        targets[f"layer {i} {proj}"] = module
before = {name: m.weight.detach().clone() for name, m in targets.items()}
n_trained = sum(m.weight.numel() for m in targets.values())
print(f"fully fine-tuning {len(targets)} matrices, {n_trained:,} parameters")
ft_steps = 4 if GRADING else 12
result = train(model, tokenizer, splits.train, steps=ft_steps, lr=1e-4, batch_size=4, progress=True)
print(f"{ft_steps} AdamW steps in {result.seconds:.0f} s; batch losses {[round(l, 2) for l in result.losses]}")
print("(batches of 4 differ a lot: the loss barely moves in so few steps; what we study is the shape of the update)")

# %%
torch.manual_seed(0)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
rows, random_shown = [], set()


def rank_for_90(E: torch.Tensor) -> int:
    return int(torch.searchsorted(E, torch.tensor(0.9, dtype=E.dtype))) + 1


for name, m in targets.items():
    delta = (m.weight.detach() - before[name]).float().cpu()
    noise = torch.randn_like(delta)                       # same shape, no structure
    curves = [(name + " update", delta, "-")]
    if tuple(delta.shape) not in random_shown:            # one random reference per shape
        random_shown.add(tuple(delta.shape))
        curves.append((f"random {tuple(delta.shape)}", noise, "k:" if len(random_shown) == 1 else "k--"))
    for label, M, style in curves:
        S = torch.linalg.svdvals(M.double())
        axes[0].semilogy(range(1, len(S) + 1), (S / S[0]).numpy(), style, label=label)
        axes[1].plot(range(1, len(S) + 1), energy_spectrum(M).numpy(), style, label=label)
    E_d, E_n = energy_spectrum(delta), energy_spectrum(noise)
    rows.append((name, tuple(delta.shape), E_d[7].item(), E_n[7].item(), rank_for_90(E_d), rank_for_90(E_n),
                 (delta.norm() / before[name].float().cpu().norm()).item()))
axes[0].set_xlabel("index i"); axes[0].set_ylabel("sigma_i / sigma_1"); axes[0].set_title("singular values")
axes[1].set_xlabel("rank r"); axes[1].set_ylabel("energy kept E(r)"); axes[1].set_xscale("log")
axes[1].set_title("energy spectrum"); axes[1].legend(fontsize=7)
plt.tight_layout(); plt.show()
print(f"{'matrix':22s} {'shape':>11s} {'E(8) update':>12s} {'E(8) random':>12s} {'r90 update':>11s} {'r90 random':>11s} {'|dW|/|W|':>9s}")
for name, shape, e8, e8n, r90d, r90n, rel in rows:
    print(f"{name:22s} {str(shape):>11s} {e8:12.3f} {e8n:12.3f} {r90d:11d} {r90n:11d} {rel:9.4f}")

# %% [markdown]
# Read the table: the top 8 directions of the update carry many times the energy that 8 directions of a
# random matrix of the same shape carry, and 90% of the update's energy needs far fewer directions.
# The update is also tiny relative to $W$ (last column). That is the regularity LoRA exploits: restrict
# $\Delta W$ to rank $r$ from the start, $\Delta W = BA$, and train only $r(m+n)$ numbers.
# (With longer training the top directions dominate even more; notebook 04 compares the subspaces that
# LoRA adapters of different ranks learn.)
#
# ## 6. Exercise 3 — counting LoRA's parameters (and grouped-query attention)
#
# A LoRA adapter on a linear layer with `in` inputs and `out` outputs trains $r(\text{in} + \text{out})$
# numbers. In a Llama-family decoder layer (hidden size $h$, $n_h$ query heads, $n_{kv}$ key/value heads,
# head size $h/n_h$, MLP width $i$) the seven projections have (out, in):
#
# | projection | out | in |
# | --- | --- | --- |
# | `q_proj` | $n_h \cdot h/n_h = h$ | $h$ |
# | `k_proj`, `v_proj` | $n_{kv} \cdot h/n_h$ | $h$ |
# | `o_proj` | $h$ | $h$ |
# | `gate_proj`, `up_proj` | $i$ | $h$ |
# | `down_proj` | $h$ | $i$ |
#
# With **grouped-query attention** (GQA: $n_{kv} < n_h$, e.g. SmolLM2 9/3, Llama-3-8B 32/8) the k and v
# projections are narrower than q. Write
# `lora_param_count(hidden, intermediate, n_layers, n_heads, n_kv_heads, r, targets=("q_proj", "v_proj"))`:
# the number of LoRA parameters over all layers for the projections named in `targets`.
# %% answer id=lora_param_count
def lora_param_count(hidden: int, intermediate: int, n_layers: int, n_heads: int, n_kv_heads: int,
                     r: int, targets=("q_proj", "v_proj")) -> int:
    """n_layers * sum over targets of r * (in + out), with GQA-sized k/v projections."""
    ### BEGIN SOLUTION
    head_dim = hidden // n_heads
    kv = n_kv_heads * head_dim
    shapes = {"q_proj": (n_heads * head_dim, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
              "o_proj": (hidden, n_heads * head_dim), "gate_proj": (intermediate, hidden),
              "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; choose from {sorted(shapes)}")
    return n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    ### END SOLUTION

# %% test id=test_lora_param_count points=2
# the article's example: one 4096 x 4096 projection, r = 16 -> 16 * (4096 + 4096) = 131,072
assert lora_param_count(4096, 11008, 1, 32, 32, 16, ("q_proj",)) == 131_072, \
    f"one 4096x4096 projection at r=16 has 131,072 LoRA parameters, got {lora_param_count(4096, 11008, 1, 32, 32, 16, ('q_proj',))}"
# Llama-2-7B (multi-head attention), q,k,v,o, r = 16: 32 layers * 4 * 131,072
assert lora_param_count(4096, 11008, 32, 32, 32, 16, ("q_proj", "k_proj", "v_proj", "o_proj")) == 16_777_216
# Llama-3-8B has 8 key/value heads of size 128: k_proj is (1024, 4096) -> 16 * (4096 + 1024) per layer
assert lora_param_count(4096, 14336, 32, 32, 8, 16, ("k_proj",)) == 32 * 16 * (4096 + 1024), \
    "with GQA, k_proj has n_kv_heads * head_dim = 8 * 128 = 1024 outputs"
# SmolLM2-135M, all seven projections, r = 16 (the figure PEFT prints)
_all7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
assert lora_param_count(576, 1536, 30, 9, 3, 16, _all7) == 4_884_480
assert isinstance(lora_param_count(576, 1536, 30, 9, 3, 8), int), "return a Python int"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("01.lora_param_count", lora_param_count)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured: where the article's "about 128x" comes from, and where it does not hold
#
# For one square $d \times d$ matrix the ratio is $d^2 / (r \cdot 2d) = d / 2r$: $4096 / 32 = 128$. That is
# the article's number, and it is right for that one matrix. For whole models the ratio depends on which
# projections are adapted and on GQA, which makes k and v smaller (their LoRA factors shrink less than the
# matrices do). Below, the weights those projections hold divided by their LoRA parameters, at r = 16:
# %%
from lora_ref.memory import PRESETS, linear_shapes

all7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
print(f"{'model':16s} {'heads q/kv':>10s} {'q,v: W / LoRA':>14s} {'all 7: W / LoRA':>16s} {'LoRA all 7':>12s}")
for name in ("smollm2-135m", "llama-2-7b", "llama-3-8b", "mistral-7b", "llama-2-70b"):
    s = PRESETS[name]
    shapes = linear_shapes(s)
    ratios = []
    for targets in (("q_proj", "v_proj"), all7):
        frozen = s.n_layers * sum(shapes[t][0] * shapes[t][1] for t in targets)
        lora = lora_param_count(s.hidden, s.intermediate, s.n_layers, s.n_heads, s.n_kv_heads, 16, targets)
        ratios.append(frozen / lora)
    lora_all = lora_param_count(s.hidden, s.intermediate, s.n_layers, s.n_heads, s.n_kv_heads, 16, all7)
    print(f"{name:16s} {s.n_heads:>4d}/{s.n_kv_heads:<5d} {ratios[0]:14.1f} {ratios[1]:16.1f} {lora_all:12,d}")

# %% [markdown]
# With GQA (Llama-3-8B, Mistral-7B, SmolLM2) the q,v ratio drops below $d/2r$ because $v$ is narrow; with
# the wide MLP projections included the ratio rises above it. And against the *whole* model (embeddings
# included) LoRA's share is smaller still: SmolLM2 at r = 16 on all linear layers trains 4.9M of 134.5M
# parameters.
#
# ## 7. Interview practice
#
# **Q1. What is the mathematical principle behind LoRA, and why does a low-rank update work?**
# <details><summary>answer</summary>
# Freeze $W$ and learn $\Delta W = BA$ with $B \in \mathbb{R}^{m\times r}$, $A \in \mathbb{R}^{r\times n}$,
# $r \ll \min(m,n)$. It works because fine-tuning updates have low intrinsic rank: measured here, the top
# few singular directions of a full fine-tuning update carry most of its energy, unlike a random matrix;
# pretrained models adapt in a low intrinsic dimension (Aghajanyan et al.). The pretrained $W$ itself is
# not low rank.
# </details>
#
# **Q2. The article writes $\Delta W \in \mathbb{R}^{d\times k}$ as $A (d \times r) \cdot B (r \times k)$.
# Anything wrong?**
# <details><summary>answer</summary>
# The maths is the same, but the convention is transposed relative to `nn.Linear` and PEFT, where
# $\Delta W = BA$ with `lora_A` $(r, \text{in})$ and `lora_B` $(\text{out}, r)$; following it leads to
# transposes on merge/export and (notebook 02) a kaiming init that reads the wrong fan-in.
# </details>
#
# **Q3. How many parameters does LoRA train on one 4096 × 4096 matrix at r = 16, and what is the
# reduction? Does that hold for a GQA model with all projections adapted?**
# <details><summary>answer</summary>
# $16 \cdot 8192 = 131{,}072$ vs $16{,}777{,}216$: $d/2r = 128\times$. Not in general: with GQA, k/v are
# $n_{kv} \cdot d_\text{head}$ wide so their ratio is lower; MLP projections are larger so theirs is higher;
# measured in section 6.
# </details>
#
# **Q4. What does the Eckart-Young theorem say, and how would you pick r from a spectrum?**
# <details><summary>answer</summary>
# Truncated SVD gives the best rank-$r$ approximation in Frobenius/spectral norm, with error
# $\sqrt{\sum_{i>r}\sigma_i^2}$. Pick the smallest $r$ whose energy $E(r)$ passes a threshold (e.g. 90%),
# and confirm with a validation metric, since energy is a proxy for task quality.
# </details>
