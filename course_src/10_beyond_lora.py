# %% [markdown]
# # 10 · Beyond plain LoRA: DoRA, PiSSA, LoftQ and LoRA+
#
# Plain LoRA fixes three choices: the update is $s\,BA$ added to $W$, it starts at zero ($B = 0$), and
# $A$ and $B$ share one learning rate. Each of four well-known variants changes one of them, and all four
# are in Hugging Face PEFT (`use_dora=True`, `init_lora_weights="pissa"` / `"loftq"`,
# `create_loraplus_optimizer`), so interviewers ask about them:
#
# | method | paper | what it changes |
# | --- | --- | --- |
# | DoRA | Liu et al., 2024, [arXiv 2402.09353](https://arxiv.org/abs/2402.09353) | the *form* of the update: a trained magnitude times a LoRA-adapted direction |
# | PiSSA | Meng et al., 2024, [arXiv 2404.02948](https://arxiv.org/abs/2404.02948) | the *init*: $A, B$ from the top singular vectors of $W$, the rest frozen |
# | LoftQ | Li et al., 2023, [arXiv 2310.08659](https://arxiv.org/abs/2310.08659) | the *init* under quantisation: $Q + sBA \approx W$ instead of $Q(W) + 0$ |
# | LoRA+ | Hayou et al., 2024, [arXiv 2402.12354](https://arxiv.org/abs/2402.12354) | the *optimiser*: $\eta_B = \lambda\,\eta_A$ |
#
# **By the end of this notebook you will have** written each one (graded against `lora_ref`, whose
# versions the course's tests check against PEFT's on the same weights), **measured** that PiSSA starts
# exactly at the pretrained model, **measured** how much of QLoRA's step-0 error LoftQ removes on SmolLM2's
# real weights (per layer and on the loss), run a short controlled comparison on the CPU, and read the
# multi-seed GPU comparison with its standard errors — including what it does *not* show.
#
# Graded cells: `dora_forward`, `dora_merged_weight`, `pissa_factors`, `loftq_factors`,
# `loraplus_param_groups`. Answer cells may use only `torch`, `nn`, `F`, `math`, `numpy`.

# %% locked id=setup
import copy
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_ref import data, training
from lora_ref.models import load_smollm2, notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads

# %% [markdown]
# ## 1. DoRA: magnitude and direction
#
# Any weight row is a length times a unit vector. DoRA (Section 3, eq. 2) writes the pretrained weight as
# $W = m \,\frac{W}{\lVert W\rVert_c}$ with $m = \lVert W\rVert_c$, one norm per output unit, and then
# trains $m$ directly while LoRA adapts the direction (Section 4.1, eq. 5):
#
# $$ W' = m \odot \frac{W + sBA}{\lVert W + sBA \rVert_c}. $$
#
# In `nn.Linear`'s convention ($W$ is `(out, in)`, $y = xW^\top$) the paper's *column* norm is the norm of
# each **row** of our $W$: `W.norm(dim=1)`, shape `(out,)` — the paper writes $W \in \mathbb{R}^{d\times k}$
# with $y = Wx$ transposed. At init $B = 0$ and $m = \lVert W\rVert_c$, so $W' = W$.
#
# **The detail that matters (Section 4.3):** the norm $\lVert W + sBA\rVert_c$ is treated as a constant
# in backward (`.detach()`): it still changes in the forward pass as $BA$ changes, but no gradient flows
# through it. That saves the memory of its backward graph; PEFT does the same. Without forming $W'$:
#
# $$ g = \frac{m}{\lVert W + sBA\rVert_c}\ (\text{detached norm}), \qquad
#    y = g \odot (xW^\top + s\,xA^\top B^\top) + b. $$
#
# The bias is not rescaled. PEFT computes it as $xW^\top + b + (g-1)\odot xW^\top + g\odot s\,xA^\top B^\top$
# (the base layer's output plus an extra term); it is the same number.
#
# ### Exercise 1 — `dora_forward(x, W, bias, A, B, magnitude, scaling)`
# `x` `(..., in)`, `W` `(out, in)`, `bias` `(out,)` or `None`, `A` `(r, in)`, `B` `(out, r)`, `magnitude`
# `(out,)`. Return $y$ `(..., out)`. Gradients must reach `A`, `B` and `magnitude` — but not through the
# norm. (The hidden test compares the gradients too.)

# %% answer id=dora_forward
def dora_forward(x, W, bias, A, B, magnitude, scaling):
    """DoRA: y = g * (x W^T + s x A^T B^T) + b, g = m / ||W + s B A||_c with the norm detached."""
    ### BEGIN SOLUTION
    norm = torch.linalg.norm(W + scaling * (B.detach() @ A.detach()).to(W.dtype), dim=1).detach()
    g = (magnitude / norm).view(1, -1)
    base = F.linear(x, W)
    lora = (x @ A.t()) @ B.t()
    out = base + (g - 1) * base + g * lora * scaling
    return out if bias is None else out + bias
    ### END SOLUTION

# %% test id=test_dora_forward points=3
# hand-worked: W = [[3, 4], [0, 2]] has row norms (5, 2); with B = 0, g = m / (5, 2).
# m = (10, 2) -> g = (2, 1); x = [1, 1]: x W^T = (7, 2) -> y = (14, 2) + b (1, -1) = (15, 1)
_W = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
_A, _B = torch.tensor([[1.0, -1.0]]), torch.zeros(2, 1)
_m = torch.tensor([10.0, 2.0], requires_grad=True)
_y = dora_forward(torch.tensor([[1.0, 1.0]]), _W, torch.tensor([1.0, -1.0]), _A, _B, _m, 2.0)
assert _y.shape == (1, 2), f"expected shape (1, 2), got {tuple(_y.shape)}"
assert torch.allclose(_y, torch.tensor([[15.0, 1.0]])), f"expected [[15, 1]], got {_y.tolist()}"
_y.sum().backward()
# dy/dm = (x W^T) / ||W||_c = (7/5, 2/2)
assert _m.grad is not None and torch.allclose(_m.grad, torch.tensor([1.4, 1.0])), \
    f"d(sum y)/dm should be (1.4, 1.0): x W^T / ||W||_c; got {_m.grad}"
_m0 = torch.tensor([5.0, 2.0])                         # m = ||W||_c and B = 0: DoRA = the base layer
assert torch.allclose(dora_forward(torch.eye(2), _W, None, _A, _B, _m0, 2.0), torch.eye(2) @ _W.t()), \
    "with m = ||W||_c and B = 0 the layer must equal x W^T"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("10.dora_forward", dora_forward)
### END HIDDEN TESTS

# %% [markdown]
# ### Exercise 2 — `dora_merged_weight(W, A, B, magnitude, scaling)`
# Merging DoRA for deployment is eq. 5 itself: return $W' = m \odot (W + sBA) / \lVert W + sBA\rVert_c$
# (each row rescaled), shape `(out, in)`, without modifying `W`. Then $xW'^\top + b$ is the adapter's output.

# %% answer id=dora_merge
def dora_merged_weight(W, A, B, magnitude, scaling):
    """W' = m * (W + s B A) / ||W + s B A||_c, rows rescaled; a new tensor."""
    ### BEGIN SOLUTION
    V = W + scaling * (B @ A).to(W.dtype)
    return (magnitude / torch.linalg.norm(V, dim=1)).view(-1, 1) * V
    ### END SOLUTION

# %% test id=test_dora_merge points=2
# hand-worked: W = [[3, 4], [0, 2]], B = 0, m = (10, 2): row 1 doubles, row 2 stays -> [[6, 8], [0, 2]]
_Wm = dora_merged_weight(_W, _A, _B, torch.tensor([10.0, 2.0]), 2.0)
assert torch.allclose(_Wm, torch.tensor([[6.0, 8.0], [0.0, 2.0]])), f"expected [[6, 8], [0, 2]], got {_Wm.tolist()}"
assert torch.equal(_W, torch.tensor([[3.0, 4.0], [0.0, 2.0]])), "do not modify W in place"
_g = torch.Generator().manual_seed(0)
_Wr, _Ar, _Br = torch.randn(5, 4, generator=_g), torch.randn(2, 4, generator=_g), torch.randn(5, 2, generator=_g)
_mr, _x = torch.rand(5, generator=_g) + 0.5, torch.randn(3, 4, generator=_g)
assert torch.allclose(_x @ dora_merged_weight(_Wr, _Ar, _Br, _mr, 0.5).t(),
                      dora_forward(_x, _Wr, None, _Ar, _Br, _mr, 0.5), atol=1e-5), \
    "the merged weight must give the same output as dora_forward"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("10.dora_merge", dora_merged_weight)
### END HIDDEN TESTS

# %% [markdown]
# **Measured: your DoRA equals `lora_ref.dora.DoRALinear`** (which `tests/test_dora.py` checks against
# PEFT's DoRA layer: outputs, gradients of $A$, $B$ and $m$, dropout, merge), on a layer of SmolLM2 with a
# trained-looking adapter; and what DoRA costs in parameters.

# %%
from lora_ref.dora import DoRALinear
from lora_ref.lora import LoRAConfig, count_parameters, inject_lora, lora_layers

model, tok = load_smollm2(device=DEVICE)
q0 = model.model.layers[0].self_attn.q_proj
layer = DoRALinear(copy.deepcopy(q0), r=16, alpha=32)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    layer.lora_magnitude_vector.mul_(1 + 0.05 * torch.randn(layer.out_features, generator=g))
x = torch.randn(4, 7, q0.in_features, generator=g)
y_ref = layer(x)
y_mine = dora_forward(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B,
                      layer.lora_magnitude_vector, layer.scaling)
print(f"max |your dora_forward - DoRALinear| = {(y_mine - y_ref).abs().max():.2e}")
print(f"max |x W'^T - DoRALinear| with your merge = "
      f"{(x @ dora_merged_weight(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling).t() - y_ref).abs().max():.2e}")

counts = {}
for use_dora in (False, True):
    m = inject_lora(copy.deepcopy(model), LoRAConfig(r=16, alpha=32, target_modules="all-linear", use_dora=use_dora))
    counts[use_dora] = count_parameters(m).trainable
    n_layers = len(lora_layers(m))
    del m
extra = counts[True] - counts[False]
print(f"SmolLM2, r=16 on all {n_layers} linear layers: LoRA {counts[False]:,} trainable, DoRA {counts[True]:,} "
      f"(+{extra:,} = one magnitude per output unit, +{100 * extra / counts[False]:.1f}%)")

# %% [markdown]
# DoRA's extra parameters are negligible (one number per output unit), but its compute is not: every
# forward needs $\lVert W + sBA\rVert_c$, i.e. the dense $W$ and $BA$ — on a 4-bit base a dequantisation
# per step that plain LoRA does not need. The CPU comparison and the GPU table at the end report the time.
#
# ## 2. PiSSA: start from the principal components
#
# LoRA trains $BA$ from zero, in a random subspace. PiSSA (Section 3) splits $W$ by its SVD
# $W = U\,\mathrm{diag}(S)\,V^\top$ into the top-$r$ part, which becomes the adapter, and the residual,
# which is frozen:
#
# $$ A = \mathrm{diag}\big(\sqrt{S_{:r}/s}\big)\,V_{:r}^\top,\quad B = U_{:r}\,\mathrm{diag}\big(\sqrt{S_{:r}/s}\big),
#    \quad W_\text{res} = W - sBA. $$
#
# So $W_\text{res} + sBA = W$ at step 0, and training moves the directions that carry most of $W$'s energy.
# Dividing $S$ by the scaling $s$ is PEFT's convention (`init_lora_weights="pissa"`): it makes $sBA$ the
# top-$r$ part whatever $\alpha$ is; the paper's equations have no $s$ (they coincide for $\alpha = r$).
#
# ### Exercise 3 — `pissa_factors(W, r, scaling)`
# Return `(A, B, W_res)`: `A` `(r, in)`, `B` `(out, r)` in float32, `W_res` in `W`'s dtype. Use
# `torch.linalg.svd(W.float(), full_matrices=False)`. (Singular vectors have a free sign per pair; the
# hidden test compares $sBA$, $W_\text{res}$, $AA^\top$ and $B^\top B$, which do not depend on it.)

# %% answer id=pissa_factors
def pissa_factors(W, r, scaling):
    """(A, B, W_res) with W_res + scaling * B @ A = W, A and B from the top-r singular triplets."""
    ### BEGIN SOLUTION
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    A = root.unsqueeze(1) * Vh[:r]
    B = U[:, :r] * root
    return A, B, (W.float() - scaling * B @ A).to(W.dtype)
    ### END SOLUTION

# %% test id=test_pissa_factors points=3
# hand-worked: W = diag(4, 1), r = 1: the top triplet is (e1, 4, e1) -> s B A = [[4, 0], [0, 0]], W_res = diag(0, 1)
_A1, _B1, _R1 = pissa_factors(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), 1, 1.0)
assert _A1.shape == (1, 2) and _B1.shape == (2, 1), f"A must be (r, in) = (1, 2), B (out, r) = (2, 1); got {tuple(_A1.shape)}, {tuple(_B1.shape)}"
assert torch.allclose(_B1 @ _A1, torch.tensor([[4.0, 0.0], [0.0, 0.0]]), atol=1e-6), f"s B A should be [[4, 0], [0, 0]], got {(_B1 @ _A1).tolist()}"
assert torch.allclose(_R1, torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6), f"W_res should be diag(0, 1), got {_R1.tolist()}"
_A4, _B4, _ = pissa_factors(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), 1, 4.0)   # s = 4: S/s = 1 -> A A^T = 1
assert torch.allclose(_A4 @ _A4.t(), torch.ones(1, 1), atol=1e-6), "divide S by the scaling before the square root"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("10.pissa_factors", pissa_factors)
### END HIDDEN TESTS

# %% [markdown]
# **Measured: PiSSA starts at the pretrained model.** We PiSSA-initialise every linear layer of the first
# blocks of SmolLM2 with *your* `pissa_factors` (each SVD takes a moment on a CPU) and compare the logits
# with the original's; then we switch the adapters off, leaving only the residual: that model is far from
# the original, because the adapter holds the principal part of each weight. We also print how much of each
# weight's energy $\lVert W\rVert_F^2$ the top-16 directions hold — what PiSSA trains, against LoRA's random
# start.

# %%
N_BLOCKS = 1 if GRADING else 2
ids = tok(data.prompt_text(tok, "What is Velora's refund window?"), return_tensors="pt").input_ids.to(DEVICE)
with torch.no_grad():
    logits0 = model(ids).logits
pissa_model = copy.deepcopy(model)
inject_lora(pissa_model, LoRAConfig(r=16, alpha=32, target_modules=[rf"model\.layers\.[0-{N_BLOCKS - 1}]\..*_proj"]))
energies = []
with torch.no_grad():
    for name, l in tqdm(lora_layers(pissa_model).items(), desc="PiSSA init (your pissa_factors)"):
        W = l.base_layer.weight
        A, B, W_res = pissa_factors(W, l.r, l.scaling)
        energies.append(float((l.scaling * B @ A).norm() ** 2 / W.norm() ** 2))   # top-16 part: orthogonal to the rest
        l.lora_A.copy_(A), l.lora_B.copy_(B), W.copy_(W_res)
    logits_pissa = pissa_model(ids).logits
    for l in lora_layers(pissa_model).values():
        l.enable_adapters(False)
    logits_res = pissa_model(ids).logits
print(f"{len(energies)} layers: top-16 directions hold {100 * min(energies):.1f}-{100 * max(energies):.1f}% of ||W||_F^2")
print(f"max |logits(PiSSA, step 0) - logits(original)| = {(logits_pissa - logits0).abs().max():.2e}")
print(f"max |logits(residual only)  - logits(original)| = {(logits_res - logits0).abs().max():.2e}")
del pissa_model

# %% [markdown]
# ## 3. LoftQ: an init that knows the base is quantised
#
# QLoRA starts from $Q(W) + sBA$ with $B = 0$: its step-0 model is the quantised one, and the whole
# quantisation error $W - Q(W)$ must be trained away. LoftQ (Section 3, eq. 6) picks $Q$ and the adapter
# together to minimise $\lVert W - Q - sBA\rVert_F$, alternating $T$ times (Algorithm 1):
#
# $$ Q_t = q\big(W - sB_{t-1}A_{t-1}\big), \qquad sB_tA_t = \text{best rank-}r\text{ approximation of } W - Q_t
#    \quad (B_0 = 0). $$
#
# With the SVD $W - Q_t = U\,\mathrm{diag}(S)\,V^\top$: $L = U_{:r}\sqrt{S_{:r}}$, $R = \sqrt{S_{:r}}\,V_{:r}^\top$,
# and $A = R/\sqrt{s}$, $B = L/\sqrt{s}$ so that $sBA = LR$. (PEFT's `loftq_init` puts $L, R$ in $B, A$ as
# they are, which is right only for $s = 1$: peft issue #1982. `lora_ref.loftq` divides by $\sqrt s$, as PiSSA does.)
# After one iteration the error is already $\le$ QLoRA's: the best rank-$r$ approximation of the error is
# subtracted from it.
#
# ### Exercise 4 — `loftq_factors(W, r, scaling, num_iter, quantize)`
# `quantize(M)` returns the de-quantised $q(M)$ (the notebook passes NF4; the hidden test a simpler 4-bit
# quantiser). Return `(Q, A, B)` in float32 after `num_iter` iterations, with `Q` the last $Q_t$.

# %% answer id=loftq_factors
def loftq_factors(W, r, scaling, num_iter, quantize):
    """LoftQ Algorithm 1: (Q, A, B) with Q + scaling * B @ A ~ W, alternating quantisation and rank-r SVD."""
    ### BEGIN SOLUTION
    W = W.float()
    residual = W
    for _ in range(num_iter):
        Q = quantize(residual).float()
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = torch.sqrt(S[:r])
        L, R = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]
        residual = W - L @ R
    return Q, R / math.sqrt(scaling), L / math.sqrt(scaling)
    ### END SOLUTION

# %% test id=test_loftq_factors points=3
# hand-worked with q = round to integers: W = diag(0.4, 2.2) -> Q = diag(0, 2), W - Q = diag(0.4, 0.2);
# rank 1 keeps 0.4: Q + s B A = diag(0.4, 2), error 0.2 (QLoRA's: sqrt(0.4^2 + 0.2^2) = 0.447)
_Wq = torch.tensor([[0.4, 0.0], [0.0, 2.2]])
_Q, _Aq, _Bq = loftq_factors(_Wq, 1, 2.0, 1, torch.round)
assert torch.equal(_Q, torch.tensor([[0.0, 0.0], [0.0, 2.0]])), f"Q_1 = q(W) = diag(0, 2); got {_Q.tolist()}"
assert torch.allclose(2.0 * _Bq @ _Aq, torch.tensor([[0.4, 0.0], [0.0, 0.0]]), atol=1e-6), \
    f"s B A should be diag(0.4, 0) (the rank-1 part of W - Q); got {(2.0 * _Bq @ _Aq).tolist()}"
assert abs(float((_Wq - _Q - 2.0 * _Bq @ _Aq).norm()) - 0.2) < 1e-6, "step-0 error should be 0.2"
_Q2, _, _ = loftq_factors(_Wq, 1, 2.0, 2, torch.round)          # Q_2 = round(W - L R) = round(diag(0, 2.2))
assert torch.equal(_Q2, torch.tensor([[0.0, 0.0], [0.0, 2.0]])), "iteration 2 quantises W - L R"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("10.loftq_factors", loftq_factors)
### END HIDDEN TESTS

# %% [markdown]
# **Measured on SmolLM2's real weights, per layer.** For the seven projections of block 0: the relative
# step-0 error $\lVert W - (Q + sBA)\rVert_F / \lVert W\rVert_F$ of plain QLoRA ($B = 0$) and of LoftQ with
# your function, NF4 blocksize 64 (`lora_ref.loftq.nf4_roundtrip`, byte-identical to bitsandbytes'), $r = 16$.

# %%
from lora_ref.loftq import nf4_roundtrip, step0_error

T_MAX = 2 if GRADING else 3
PER_LAYER = 3 if GRADING else 7                # grading: q, k, v only
rows = []
for name, lin in tqdm([(n, m) for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)][:PER_LAYER],
                      desc="LoftQ per layer"):
    W = lin.weight.detach().float()
    row = {"layer": name, "qlora": step0_error(W, nf4_roundtrip(W))}
    for T in (1, T_MAX):
        Q, A, B = loftq_factors(W, 16, 2.0, T, nf4_roundtrip)
        row[f"T={T}"] = step0_error(W, Q, A, B, 2.0)
    rows.append(row)
print(f"{'layer':22s} {'QLoRA':>8s} {'LoftQ T=1':>10s} {'LoftQ T=' + str(T_MAX):>10s}")
for row in rows:
    print(f"{row['layer']:22s} {row['qlora']:8.4f} {row['T=1']:10.4f} {row[f'T={T_MAX}']:10.4f}")
cut = [1 - row[f"T={T_MAX}"] / row["qlora"] for row in rows]
print(f"LoftQ (T={T_MAX}) removes {100 * min(cut):.0f}-{100 * max(cut):.0f}% of QLoRA's step-0 weight error in these {len(rows)} layers")

# %% [markdown]
# **Measured on the model.** Quantising a whole model and running 210 SVDs takes minutes on a CPU, so here
# the first blocks are quantised (the rest stay dense, the same for both inits). Two step-0 measures on
# held-out answers: the answer loss, and the KL divergence from the original model's next-token
# distribution (how far the quantised model's predictions moved, whatever the labels say). Each layer's
# output error can only shrink: for every input $x$, $\lVert (E - E_r)x\rVert \le \lVert Ex\rVert$ when
# $E_r$ is the top-$r$ SVD part of the quantisation error $E$. What that does to the whole model is measured.
# (The GPU run below quantises all 210 layers: its step-0 losses are in the table.)

# %%
N_Q = 1 if GRADING else 3
splits = data.load_dataset()
held = splits.heldout[:16 if GRADING else 24]
batch = data.collate([data.encode_example(tok, e) for e in held], tok.pad_token_id)
answer = batch["labels"][:, 1:] != -100                     # positions that predict an answer token

def next_token_logprobs(m):
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE)).logits
    return F.log_softmax(logits[:, :-1].float().cpu(), dim=-1)

ref_lp = next_token_logprobs(model)
step0 = {"original": (training.evaluate_loss(model, tok, held), 0.0)}
for init in ("qlora", "loftq"):
    m = inject_lora(copy.deepcopy(model), LoRAConfig(r=16, alpha=32, target_modules=[rf"model\.layers\.[0-{N_Q - 1}]\..*_proj"]))
    with torch.no_grad():
        for l in tqdm(lora_layers(m).values(), desc=f"{init} init, {N_Q} blocks"):
            W = l.base_layer.weight
            if init == "qlora":
                W.copy_(nf4_roundtrip(W))                              # B = 0: the quantised model
            else:
                Q, A, B = loftq_factors(W, l.r, l.scaling, 1, nf4_roundtrip)
                l.lora_A.copy_(A), l.lora_B.copy_(B), W.copy_(Q)
    kl = (ref_lp.exp() * (ref_lp - next_token_logprobs(m))).sum(-1)[answer].mean()
    step0[init] = (training.evaluate_loss(m, tok, held), float(kl))
    del m
for k, (loss, kl) in step0.items():
    print(f"step 0, {k:9s}: held-out loss {loss:.4f} ({loss - step0['original'][0]:+.4f})   KL from the original {kl:.4f}")
print(f"KL: LoftQ is {step0['loftq'][1] / step0['qlora'][1]:.2f}x QLoRA's; "
      f"loss increase: LoftQ {step0['loftq'][0] - step0['original'][0]:+.4f} vs QLoRA {step0['qlora'][0] - step0['original'][0]:+.4f}")

# %% [markdown]
# Read the two numbers separately. The KL says how far each quantised model's predictions moved from the
# original's; the loss on a few dozen answers can move either way, since a perturbation can by chance raise or
# lower the probability of the reference words. The GPU run, with every layer quantised and
# $T = {{result:beyond_lora_h200.json:settings.loftq_iter}}$, is the larger measurement.

# %% [markdown]
# ## 4. LoRA+: a larger learning rate for B
#
# With one learning rate, the LoRA update learns features inefficiently in wide models: Hayou et al. show
# (Section 3, Theorem 1) that $B$'s steps should be larger than $A$'s by a factor that grows with the width,
# and set $\eta_B = \lambda\,\eta_A$ with $\lambda \gg 1$ (they suggest $2^4 = 16$). Nothing in the model
# changes; only the optimiser's parameter groups. PEFT's `create_loraplus_optimizer` makes three (and a
# fourth for LoRA on embeddings, which this course does not adapt):
#
# 1. **A**: every trainable parameter not below, lr $\eta_A$, weight decay `weight_decay`;
# 2. **B**: names containing `lora_B` **and every 1-D parameter** (biases, DoRA's magnitude vector),
#    lr $\lambda\eta_A$, weight decay `weight_decay`;
# 3. **B_no_decay**: those of group 2 that sit in an `nn.LayerNorm` or have "bias" in their name: lr $\lambda\eta_A$,
#    weight decay 0.
#
# ### Exercise 5 — `loraplus_param_groups(model, lr, lr_ratio, weight_decay)`
# Return a list of three dicts in that order, each `{"name": ..., "params": [...], "lr": ..., "weight_decay": ...}`,
# over the parameters with `requires_grad` only.

# %% answer id=loraplus_groups
def loraplus_param_groups(model, lr, lr_ratio, weight_decay=0.0):
    """LoRA+ groups: A (lr), B and 1-D (lr * ratio), B_no_decay (LayerNorm / bias: lr * ratio, no decay)."""
    ### BEGIN SOLUTION
    no_decay = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.LayerNorm) or "bias" in full:
                no_decay.add(full)
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    return [{"name": "A", "params": groups["A"], "lr": lr, "weight_decay": weight_decay},
            {"name": "B", "params": groups["B"], "lr": lr * lr_ratio, "weight_decay": weight_decay},
            {"name": "B_no_decay", "params": groups["B_no_decay"], "lr": lr * lr_ratio, "weight_decay": 0.0}]
    ### END SOLUTION

# %% test id=test_loraplus_groups points=2
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)                           # weight (2-D) -> A; bias (1-D, "bias") -> B_no_decay
        self.lora_A = nn.Parameter(torch.zeros(1, 3))        # -> A
        self.lora_B = nn.Parameter(torch.zeros(2, 1))        # -> B
        self.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)   # not trainable: in no group
_t = _Toy()
_gr = loraplus_param_groups(_t, 1e-3, 16.0, 0.1)
assert [g["name"] for g in _gr] == ["A", "B", "B_no_decay"], "three groups, in the order A, B, B_no_decay"
_ids = [sorted(id(p) for p in g["params"]) for g in _gr]
assert _ids[0] == sorted([id(_t.lin.weight), id(_t.lora_A)]), "group A: lin.weight and lora_A"
assert _ids[1] == [id(_t.lora_B)], "group B: lora_B"
assert _ids[2] == [id(_t.lin.bias)], "group B_no_decay: lin.bias (1-D, and 'bias' in its name)"
assert [g["lr"] for g in _gr] == [1e-3, 1.6e-2, 1.6e-2] and [g["weight_decay"] for g in _gr] == [0.1, 0.1, 0.0], \
    "lr: (lr, lr * ratio, lr * ratio); weight decay: (wd, wd, 0)"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("10.loraplus_groups", loraplus_param_groups)
### END HIDDEN TESTS

# %% [markdown]
# ## 5. A controlled comparison
#
# Same model, data order, rank ($r = 8$, $\alpha = 16$ on `q_proj`, `v_proj`), steps and seed; only the
# method changes. On a CPU this can only be a few steps — enough to see that every method trains and how
# each starts (PiSSA's first loss is the base model's, like LoRA's), not which is better.

# %%
from lora_ref.loraplus import create_loraplus_optimizer
from lora_ref.pissa import apply_pissa

STEPS = 1 if GRADING else 5
curves, secs = {}, {}
METHODS = ["lora", "pissa"] if GRADING else ["lora", "dora", "pissa", "lora+"]     # grading: two, to save time
for method in tqdm(METHODS, desc="methods"):
    m = copy.deepcopy(model)
    torch.manual_seed(0)
    inject_lora(m, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), use_dora=method == "dora"))
    if method == "pissa":
        apply_pissa(m)
    opt = create_loraplus_optimizer(m, torch.optim.AdamW, lr=5e-4, lr_ratio=16.0) if method == "lora+" else None
    res = training.train(m, tok, splits.train, steps=STEPS, lr=1e-3, batch_size=4, seed=0, progress=False, optimizer=opt)
    curves[method], secs[method] = res.losses, res.seconds / STEPS
    del m
plt.figure(figsize=(6, 3.5))
for k, v in curves.items():
    plt.plot(range(1, len(v) + 1), v, marker="o", label=f"{k} ({secs[k]:.1f} s/step)")
plt.xlabel("step"); plt.ylabel("training loss"); plt.title(f"SmolLM2, {STEPS} steps on the CPU"); plt.legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# ### The multi-seed GPU run (committed)
#
# `benchmarks/beyond_lora.py` on an H200: r = 16, α = 32, all 7 projections, 150 steps, batch 8, lr 1e-3
# (LoRA+: $\eta_A$ = 5e-4, λ = 16), the course's {{result:beyond_lora_h200.json:train_examples}} training examples, fact accuracy on the
# {{result:beyond_lora_h200.json:heldout_examples}} held-out questions, {{result:beyond_lora_h200.json:summary.lora.n}} seeds
# (LoftQ {{result:beyond_lora_h200.json:summary.loftq.n}}: its job reached the time limit). Differences are
# paired by seed (same data order and, where the method keeps LoRA's init, the same $A$). The six methods
# ran as six processes sharing one GPU, so the train times (150 steps, mean over seeds) are indicative only.
#
# | method | fact accuracy, mean (s.e.) | vs reference, paired (s.e.) | held-out loss | step-0 loss | trainable | train time |
# | --- | --- | --- | --- | --- | --- | --- |
# | LoRA | {{result:beyond_lora_h200.json:summary.lora.accuracy_mean:.1f}}% ({{result:beyond_lora_h200.json:summary.lora.accuracy_se:.1f}}) | reference | {{result:beyond_lora_h200.json:summary.lora.heldout_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.lora.step0_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.lora.trainable_params:,d}} | {{result:beyond_lora_h200.json:per_seed.lora.*.seconds.@mean:.0f}} s |
# | DoRA | {{result:beyond_lora_h200.json:summary.dora.accuracy_mean:.1f}}% ({{result:beyond_lora_h200.json:summary.dora.accuracy_se:.1f}}) | {{result:beyond_lora_h200.json:summary.dora.diff_mean:+.1f}} ({{result:beyond_lora_h200.json:summary.dora.diff_se:.1f}}) vs LoRA | {{result:beyond_lora_h200.json:summary.dora.heldout_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.dora.step0_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.dora.trainable_params:,d}} | {{result:beyond_lora_h200.json:per_seed.dora.*.seconds.@mean:.0f}} s |
# | PiSSA | {{result:beyond_lora_h200.json:summary.pissa.accuracy_mean:.1f}}% ({{result:beyond_lora_h200.json:summary.pissa.accuracy_se:.1f}}) | {{result:beyond_lora_h200.json:summary.pissa.diff_mean:+.1f}} ({{result:beyond_lora_h200.json:summary.pissa.diff_se:.1f}}) vs LoRA | {{result:beyond_lora_h200.json:summary.pissa.heldout_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.pissa.step0_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.pissa.trainable_params:,d}} | {{result:beyond_lora_h200.json:per_seed.pissa.*.seconds.@mean:.0f}} s |
# | LoRA+ | {{result:beyond_lora_h200.json:summary.loraplus.accuracy_mean:.1f}}% ({{result:beyond_lora_h200.json:summary.loraplus.accuracy_se:.1f}}) | {{result:beyond_lora_h200.json:summary.loraplus.diff_mean:+.1f}} ({{result:beyond_lora_h200.json:summary.loraplus.diff_se:.1f}}) vs LoRA | {{result:beyond_lora_h200.json:summary.loraplus.heldout_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.loraplus.step0_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.loraplus.trainable_params:,d}} | {{result:beyond_lora_h200.json:per_seed.loraplus.*.seconds.@mean:.0f}} s |
# | QLoRA (NF4) | {{result:beyond_lora_h200.json:summary.qlora.accuracy_mean:.1f}}% ({{result:beyond_lora_h200.json:summary.qlora.accuracy_se:.1f}}) | {{result:beyond_lora_h200.json:summary.qlora.diff_mean:+.1f}} ({{result:beyond_lora_h200.json:summary.qlora.diff_se:.1f}}) vs LoRA | {{result:beyond_lora_h200.json:summary.qlora.heldout_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.qlora.step0_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.qlora.trainable_params:,d}} | {{result:beyond_lora_h200.json:per_seed.qlora.*.seconds.@mean:.0f}} s |
# | LoftQ (NF4) | {{result:beyond_lora_h200.json:summary.loftq.accuracy_mean:.1f}}% ({{result:beyond_lora_h200.json:summary.loftq.accuracy_se:.1f}}) | {{result:beyond_lora_h200.json:summary.loftq.diff_mean:+.1f}} ({{result:beyond_lora_h200.json:summary.loftq.diff_se:.1f}}) vs QLoRA | {{result:beyond_lora_h200.json:summary.loftq.heldout_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.loftq.step0_loss_mean:.3f}} | {{result:beyond_lora_h200.json:summary.loftq.trainable_params:,d}} | {{result:beyond_lora_h200.json:per_seed.loftq.*.seconds.@mean:.0f}} s |
#
# The base model without an adapter has held-out loss {{result:beyond_lora_h200.json:base.heldout_loss:.3f}}.
# What the table does and does not say is computed below from the same file: a difference counts only
# when it is larger than twice its standard error, and a few seeds of {{result:beyond_lora_h200.json:heldout_examples}} questions (each question
# is more than a point) resolve only large effects.

# %%
from lora_ref.results import load_result

gpu = load_result("beyond_lora_h200.json")
s = gpu["summary"]
for m in ("dora", "pissa", "loraplus", "qlora", "loftq"):
    d, se = s[m]["diff_mean"], s[m]["diff_se"]
    verdict = "larger than 2 s.e." if abs(d) > 2 * se else "within 2 s.e.: not resolved by this run"
    print(f"{m:9s} - {s[m]['vs']:5s}: {d:+5.1f} points (s.e. {se:.1f}, {s[m]['n']} seeds)  -> {verdict}")
q0, l0, b0 = s["qlora"]["step0_loss_mean"], s["loftq"]["step0_loss_mean"], gpu["base"]["heldout_loss"]
print(f"step 0, all 210 layers in NF4: QLoRA loss {q0:.3f}, LoftQ {l0:.3f}, 16-bit model {b0:.3f}: "
      f"LoftQ removes {100 * (q0 - l0) / (q0 - b0):.0f}% of the quantisation's loss increase")
print(f"step 0, PiSSA: {s['pissa']['step0_loss_mean']:.4f} vs the base model's {b0:.4f} "
      "(not bit-equal on the GPU: the residual W - sBA is stored in bf16)")

# %% [markdown]
# **Reading it honestly.**
#
# * **Step 0 is where the two inits make guarantees**: PiSSA starts at the pretrained model (to the rounding
#   of its residual: compare the step-0 column with the base loss), and LoftQ's weight error is below
#   QLoRA's in every layer (the table in section 3). How much of that reaches the model's predictions is a
#   separate measurement: with every layer quantised (the GPU's step-0 column) LoftQ's loss is closer to the
#   16-bit model's; on the CPU's few quantised blocks the KL and loss differences are small and need not
#   favour LoftQ (see the printout in section 3).
# * **After 150 steps the picture is different.** The printout above says which differences exceed twice
#   their standard error; with so few seeds, "within 2 s.e." means *this run cannot tell*, not "equal".
#   In particular, whether LoftQ's head start still matters after 150 steps is not resolved by this run.
# * **PiSSA at LoRA's learning rate is one point, not a verdict on PiSSA.** Its adapter starts at the top
#   singular directions, so the same lr moves the most important part of each weight (one plausible reason
#   for a gap); a fair comparison sweeps the learning rate for each method, which this run does not.
#   The same holds for LoRA+'s λ and $\eta_A$: one setting is one point of a curve.
# * **DoRA costs more per step** (the norm needs the dense $W + sBA$ each forward): compare the CPU plot's
#   seconds per step.
#
# In an interview: say what each method changes (form, init, init under quantisation, optimiser), what is
# *guaranteed* (step-0 equality for PiSSA, step-0 error $\le$ QLoRA's for LoftQ, one magnitude per output
# unit for DoRA, same model for LoRA+), and that the downstream gains reported in the papers are
# task-, scale- and tuning-dependent — measure on your task, with seeds and standard errors.
