# %% [markdown]
# # 02 · Build the LoRA layer
#
# In notebook 01 you measured that a fine-tuning update $\Delta W$ has most of its energy in a few
# directions. LoRA (Hu et al., 2021, [arXiv 2106.09685](https://arxiv.org/abs/2106.09685)) turns that
# observation into a layer: keep the pretrained weight $W$ frozen and learn only a rank-$r$ update.
#
# **By the end of this notebook you will have**
# 1. written the scaling rule $s = \alpha / r$ and its rsLoRA variant $s = \alpha/\sqrt{r}$;
# 2. written a `LoRALinear` layer (init, forward with dropout on the LoRA branch) with the same
#    interface as `lora_ref.lora.LoRALinear` and as PEFT's layers;
# 3. written `delta_weight`, `merge` and `unmerge` (idempotent, exact inverse, fp32 arithmetic);
# 4. **measured** that the layer starts exactly at the pretrained model, that gradients reach only
#    $A$ and $B$, why $B$ (and not $A$) starts at zero, and what rsLoRA changes;
# 5. found and measured the mistakes in the seed article's `LoRALinear`;
# 6. put your layer into the real SmolLM2-135M model.
#
# **How grading works.** Cells that say `# YOUR CODE HERE` are yours. The cell after each answer holds
# visible tests (run it: it tells you what is wrong) and, at grading time, hidden tests that compare
# your layer with `lora_ref`'s on random shapes and dtypes. Validate before you submit (notebook 00).
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
# ## 1. The layer on one page
#
# A linear layer computes $h = W x + b$ with $W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$.
# LoRA adds a trainable low-rank branch (Section 4.1, eq. 3 of the paper):
#
# $$h = W x + b + s \, B A \, \mathrm{dropout}(x), \qquad A \in \mathbb{R}^{r \times d_\text{in}},\;
#   B \in \mathbb{R}^{d_\text{out} \times r},\; s = \frac{\alpha}{r}.$$
#
# ```
#     x ───────────────► W x + b ──────────────┐       frozen, wrapped (never copied)
#     │                                          (+) ──► h
#     └─► dropout ─► A (r × in) ─► B (out × r) ─► × s ┘   trainable: r·(in + out) numbers
# ```
#
# **Shape convention.** We follow `nn.Linear` and PEFT's adapter files: `lora_A` is `(r, in_features)`,
# `lora_B` is `(out_features, r)`, and $\Delta W = s\,BA$ has the shape of $W$. For a batch of row
# vectors `x` of shape `(..., in)`, the branch is `x @ A.T @ B.T` — two thin products, never the full
# `(out, in)` matrix.
#
# **Init.** $A$ is drawn like an `nn.Linear` weight, `kaiming_uniform_(a=sqrt(5))`, i.e. uniform in
# $\pm 1/\sqrt{d_\text{in}}$; $B = 0$. So $BA = 0$ and the adapted model *starts exactly at the
# pretrained one*. (The paper says "random Gaussian" for $A$; PEFT, litgpt and `lora_ref` use the
# kaiming-uniform init. Either way the point is $B = 0$; you will measure why in section 4.)
# %% [markdown]
# ## 2. Exercise 1 — the scaling $s$
#
# Why scale at all? The paper (Section 4.1): "we scale $\Delta W x$ by $\alpha/r$ … when optimizing with
# Adam, tuning $\alpha$ is roughly the same as tuning the learning rate … so we simply set $\alpha$ to
# the first $r$ we try and do not tune it." With $s = \alpha / r$ you can change $r$ without re-tuning
# the learning rate — at least for small $r$.
#
# Kalajdzievski (2023, *rsLoRA*, [arXiv 2312.03732](https://arxiv.org/abs/2312.03732)) argues that
# $\alpha/r$ scales the update down too much as $r$ grows, so that large ranks learn no better than small
# ones, and proposes $s = \alpha/\sqrt{r}$ ("rank-stabilised"); PEFT exposes it as
# `LoraConfig(use_rslora=True)`. Which rule keeps the update's size independent of $r$ is a question of
# how Adam moves $B$; after the exercise we measure it on a real layer.
#
# Write `lora_scaling(alpha, r, use_rslora=False)`. Raise `ValueError` (naming the bad value) when
# `r` is not a positive integer or `alpha` is not positive.
# %% answer id=lora_scaling
def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    ### BEGIN SOLUTION
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r={r!r} must be a positive integer")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a positive number")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)
    ### END SOLUTION

# %% test id=test_lora_scaling points=1
assert lora_scaling(16, 8) == 2.0, f"alpha=16, r=8 gives s = 16/8 = 2, you returned {lora_scaling(16, 8)}"
assert lora_scaling(8, 16) == 0.5, "alpha=8, r=16 gives s = 0.5 (s may be below 1)"
assert lora_scaling(16, 4, use_rslora=True) == 8.0, "rsLoRA: alpha=16, r=4 gives 16/sqrt(4) = 8"
assert math.isclose(lora_scaling(1, 2, use_rslora=True), 1 / math.sqrt(2)), "rsLoRA divides by sqrt(r)"
for bad in [dict(alpha=16, r=0), dict(alpha=0, r=8), dict(alpha=-1.0, r=8)]:
    try:
        lora_scaling(**bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"lora_scaling({bad}) should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("02.lora_scaling", lora_scaling)
### END HIDDEN TESTS

# %% [markdown]
# **Measured: what $s$ does to the update as $r$ grows.** `benchmarks/rslora_norms.py` trains LoRA on one
# real layer of SmolLM2 (the MLP down projection of its last decoder layer) with real AdamW steps on the
# course's answer loss, for several ranks and both rules, with the same seed, batches, learning rate and
# $\alpha$; only $r$ and the rule change. It records $\|s\,BA\|_F$ and how much the adapter changes the
# layer's output on held-out inputs $u$, $\|s\,BA\,u\|/\|u\|$, during training. Its committed result
# (a CPU run; rerun it with the command it prints):
# %%
from lora_ref.results import load_result

rs_run = load_result("rslora_norms_cpu.json")
if rs_run is not None:
    print(f"{rs_run['module']}, {rs_run['n_train']} training examples, alpha={rs_run['alpha']:g}, lr={rs_run['lr']:g}, "
          f"batch {rs_run['batch_size']}; {rs_run['device']}, {rs_run['date'][:10]}; `{rs_run['command']}`")
    rules = {"alpha / r": False, "alpha / sqrt(r) (rsLoRA)": True}
    series = {name: [row for row in rs_run["runs"] if row["rslora"] == rs or row["r"] == 1] for name, rs in rules.items()}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    for ax, key, title in ((axes[0], "update_fro", "||s B A||_F"),
                           (axes[1], "output_change", "||s B A u|| / ||u||, held-out inputs")):
        for name, rows in series.items():
            for k, step in enumerate((rs_run["checkpoints"][1], rs_run["steps"])):
                vals = [next(p for p in row["points"] if p["step"] == step)[key] for row in rows]
                ax.loglog([row["r"] for row in rows], vals, "o-" if k else "o:", color="C0" if "rsLoRA" in name else "C1",
                          label=f"{name}, step {step}")
        ax.set_xlabel("rank r"); ax.set_title(title); ax.legend(fontsize=7)
    plt.tight_layout(); plt.show()
    lo, hi = rs_run["r_min"], rs_run["r_max"]
    print(f"growth from r={lo} to r={hi} (x{hi // lo} in rank, x{math.sqrt(hi / lo):g} in sqrt(rank)):")
    for step in rs_run["checkpoints"]:
        sm = rs_run["summary"][f"step{step}"]
        print(f"  step {step:3d}: ||sBA||_F  alpha/r x{sm['alpha_r_update_fro_ratio']:.3f}, rsLoRA x{sm['rslora_update_fro_ratio']:.2f}"
              f" | output change  alpha/r x{sm['alpha_r_output_change_ratio']:.3f}, rsLoRA x{sm['rslora_output_change_ratio']:.2f}")

# %% [markdown]
# **What the measurement says** (from $r = {{result:rslora_norms_cpu.json:r_min:d}}$ to $r = {{result:rslora_norms_cpu.json:r_max:d}}$):
#
# - **At the first step** the update's Frobenius norm with $\alpha/r$ shrinks to
#   ×{{result:rslora_norms_cpu.json:summary.step1.alpha_r_update_fro_ratio:.3f}} (close to $1/\sqrt{{{result:rslora_norms_cpu.json:rank_ratio:g}}}$: $\|BA\|_F$ grows like
#   $\sqrt{r}$) and with rsLoRA it stays flat (×{{result:rslora_norms_cpu.json:summary.step1.rslora_update_fro_ratio:.2f}}). Adam moves every
#   entry of $B$ by about the learning rate, and the $r$ columns of $B$ start out moving in unrelated
#   directions (each sees the gradient through its own random row of $A$): $BA$ adds up $r$ independent
#   pieces. That is rsLoRA's argument.
# - **On the inputs the data uses** the columns already agree in part: the output change grows faster than
#   $\sqrt r$ (×{{result:rslora_norms_cpu.json:summary.step1.alpha_r_output_change_ratio:.2f}} with $\alpha/r$ at step 1, not ×{{result:rslora_norms_cpu.json:summary.step1.alpha_r_update_fro_ratio:.3f}}).
# - **As training goes on** the columns of $B$ line up on the few directions the loss rewards, $BA$ grows
#   like $r$, and by step {{result:rslora_norms_cpu.json:steps:d}} $\alpha/r$ keeps the update about the same size at every rank
#   (Frobenius norm ×{{result:rslora_norms_cpu.json:summary.step200.alpha_r_update_fro_ratio:.2f}}, output change ×{{result:rslora_norms_cpu.json:summary.step200.alpha_r_output_change_ratio:.2f}}), while rsLoRA's
#   is ×{{result:rslora_norms_cpu.json:summary.step200.rslora_update_fro_ratio:.2f}} (output change ×{{result:rslora_norms_cpu.json:summary.step200.rslora_output_change_ratio:.2f}}) larger at the top rank.
#
# So $\alpha/r$ does what the LoRA paper wanted for a trained adapter: its size barely depends on $r$, so
# you can change $r$ without re-tuning the learning rate; it starts large ranks slowly, for the first few
# dozen steps. rsLoRA gives large ranks larger changes of the layer's output throughout, like a learning rate that grows with
# $r$: faster at the start and at large $r$, and a reason to re-tune the learning rate when you switch.
# Notebook 04 shows the same thing in a rank sweep.
#
# ## 3. Exercise 2 — `LoRALinear`: init and forward
#
# Write the class with exactly this interface (the hidden tests drive your class and `lora_ref`'s the
# same way):
#
# | attribute | what |
# | --- | --- |
# | `LoRALinear(base, r=8, alpha=16.0, dropout=0.0, use_rslora=False)` | `base`: an `nn.Linear` (anything with `in_features`, `out_features`, `weight`) |
# | `.base_layer` | **the very `base` object** (wrapped, not copied), with all its parameters frozen (`requires_grad=False`) |
# | `.in_features`, `.out_features`, `.r`, `.alpha`, `.scaling` | ints / floats; `scaling` from your `lora_scaling` |
# | `.lora_A` | `nn.Parameter` `(r, in_features)`, `kaiming_uniform_(a=math.sqrt(5))` |
# | `.lora_B` | `nn.Parameter` `(out_features, r)`, zeros |
# | `.dropout` | `nn.Dropout(dropout)` if `dropout > 0`, else `nn.Identity()` |
# | `.merged`, `.disabled` | `False` at init (used by `merge` and by `forward`) |
#
# Details that matter:
# - **Create `lora_A` with `torch.empty(r, in_features, ...)` and then call `nn.init.kaiming_uniform_` on
#   it** (the hidden tests seed the random generator and expect the same draw as the reference). Create
#   `lora_B` with zeros; no other random calls in `__init__`.
# - **dtype/device:** put $A$, $B$ on the base weight's device. If the base weight is float32 or float64,
#   use its dtype; if it is half precision (bfloat16/float16), keep $A$ and $B$ in **float32** (PEFT does
#   the same by default: `get_peft_model(..., autocast_adapter_dtype=True)` upcasts bf16/fp16 adapter
#   weights to float32, since tiny adapter updates vanish in bf16 rounding).
# - **Validation:** `ValueError` naming the value when `r` is not an integer in `[1, min(in, out)]`, when
#   `alpha <= 0`, or when `dropout` is not in `[0, 1)`; `TypeError` when `base` has no `weight`.
# - **forward(x):** `x` has shape `(..., in_features)` (raise `ValueError` otherwise). Return
#   `base_layer(x)` plus, unless `merged` or `disabled`, `scaling * (dropout(x) @ A.T) @ B.T`.
#   Dropout acts on the LoRA branch's input only. Compute the branch in $A$'s dtype (cast `dropout(x)`
#   to it) and cast the branch back to the base output's dtype before adding.
# %% answer id=lora_linear
class LoRALinear(nn.Module):
    """Frozen linear layer + trainable rank-r update: h = W x + b + s * B A dropout(x).

    Shapes: base.weight (out, in), lora_A (r, in), lora_B (out, r); x (..., in) -> h (..., out).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        ### BEGIN SOLUTION
        if not hasattr(base, "weight") or not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"LoRALinear wraps a linear layer; got {type(base).__name__}")
        in_f, out_f = int(base.in_features), int(base.out_features)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(in_f, out_f):
            raise ValueError(f"rank r={r!r} must be an integer in [1, {min(in_f, out_f)}]")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)       # raises for alpha <= 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.disabled = False
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input shape {tuple(x.shape)}: last dimension must be in_features={self.in_features}")
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        h = self.dropout(x).to(self.lora_A.dtype)
        update = (h @ self.lora_A.T) @ self.lora_B.T
        return out + (self.scaling * update).to(out.dtype)
        ### END SOLUTION

# %% test id=test_lora_init points=2
torch.manual_seed(0)
_base = nn.Linear(64, 32)
_layer = LoRALinear(_base, r=4, alpha=8)
assert _layer.base_layer is _base, "base_layer must be the layer you were given (wrap it; do not copy it)"
assert _layer.lora_A.shape == (4, 64), f"lora_A must be (r, in) = (4, 64), got {tuple(_layer.lora_A.shape)}"
assert _layer.lora_B.shape == (32, 4), f"lora_B must be (out, r) = (32, 4), got {tuple(_layer.lora_B.shape)}"
assert isinstance(_layer.lora_A, nn.Parameter) and isinstance(_layer.lora_B, nn.Parameter), \
    "lora_A and lora_B must be nn.Parameter so that optimizers and state_dict see them"
assert torch.all(_layer.lora_B == 0), "lora_B must start at zero"
_bound = 1 / math.sqrt(64)
assert _layer.lora_A.abs().max() <= _bound, \
    f"kaiming_uniform_(a=sqrt(5)) on a (4, 64) tensor draws from U(-1/8, 1/8); max |A| = {_layer.lora_A.abs().max():.3f}"
assert _layer.lora_A.abs().max() > 0.5 * _bound, "lora_A looks too small for kaiming_uniform_(a=sqrt(5))"
assert not _base.weight.requires_grad and not _base.bias.requires_grad, "the base layer must be frozen"
assert _layer.lora_A.requires_grad and _layer.lora_B.requires_grad, "lora_A and lora_B must be trainable"
assert _layer.scaling == 2.0 and _layer.r == 4, "alpha=8, r=4: scaling 2"
assert _layer.merged is False and _layer.disabled is False, "merged and disabled start False"
assert LoRALinear(nn.Linear(8, 8), r=4, alpha=8, use_rslora=True).scaling == 4.0, "rsLoRA: 8/sqrt(4) = 4"
_half = LoRALinear(nn.Linear(8, 6).to(torch.bfloat16), r=2)
assert _half.lora_A.dtype == torch.float32 and _half.lora_B.dtype == torch.float32, \
    "for a bfloat16 base, keep lora_A and lora_B in float32"
for _bad in [dict(r=0), dict(r=33), dict(r=2.5), dict(alpha=0.0), dict(dropout=1.0)]:
    try:
        LoRALinear(nn.Linear(64, 32), **{"r": 4, **_bad})
    except ValueError:
        pass
    else:
        raise AssertionError(f"LoRALinear(nn.Linear(64, 32), {_bad}) should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("02.lora_init", LoRALinear)
### END HIDDEN TESTS

# %% test id=test_lora_forward points=3
# hand-worked: W = I, b = 0, A = [[1, 1]], B = [[1], [2]], s = 2/1 = 2, x = [1, 3]
#   W x = [1, 3];  A x = 4;  B (A x) = [4, 8];  s * ... = [8, 16];  h = [9, 19]
_base = nn.Linear(2, 2, bias=False)
with torch.no_grad():
    _base.weight.copy_(torch.eye(2))
_layer = LoRALinear(_base, r=1, alpha=2)
with torch.no_grad():
    _layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
    _layer.lora_B.copy_(torch.tensor([[1.0], [2.0]]))
_h = _layer(torch.tensor([[1.0, 3.0]]))
assert torch.allclose(_h, torch.tensor([[9.0, 19.0]])), f"expected [[9, 19]], got {_h.tolist()}"
assert _layer(torch.ones(5, 7, 2)).shape == (5, 7, 2), "forward must accept any leading dimensions (..., in)"
# at init (B = 0) the layer equals its base layer exactly
torch.manual_seed(1)
_base = nn.Linear(16, 8)
_x = torch.randn(4, 16)
_layer = LoRALinear(_base, r=4, alpha=16)
assert torch.equal(_layer(_x), _base(_x)), "with B = 0 the output must equal the base layer's output exactly"
# gradients reach A and B only
with torch.no_grad():
    _layer.lora_B.normal_()
_layer(_x).pow(2).sum().backward()
assert _base.weight.grad is None and _base.bias.grad is None, "the frozen base must get no gradient"
assert _layer.lora_A.grad is not None and _layer.lora_B.grad is not None, "A and B must get gradients"
# dropout acts on the LoRA branch only: with B = 0 even a training-mode layer with dropout equals the base
_d = LoRALinear(_base, r=4, alpha=16, dropout=0.5).train()
assert torch.equal(_d(_x), _base(_x)), "dropout must not touch the base path"
with torch.no_grad():
    _d.lora_B.normal_()
assert torch.equal(_d.eval()(_x), _d.eval()(_x)), "in eval mode dropout is off: two calls agree"
assert not torch.equal(_d.train()(_x), _d.train()(_x)), "in train mode dropout must drop a random part of the LoRA input"
try:
    _layer(torch.randn(4, 15))
except ValueError:
    pass
else:
    raise AssertionError("an input whose last dimension is not in_features must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("02.lora_forward", LoRALinear)
check("02.lora_forward_half", LoRALinear)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Measured: the layer starts at the pretrained model, and only $A$, $B$ learn
#
# Three claims to check with your own layer, not to take on trust:
# 1. at step 0 the output is *exactly* the base output (max abs difference 0, not "small");
# 2. gradients reach only $A$ and $B$; the base weight does not change during training;
# 3. at step 0, $\partial L / \partial A = s\,B^\top (\partial L/\partial h)\, x^\top = 0$ because
#    $B = 0$, while $\partial L / \partial B = s\,(\partial L/\partial h)(Ax)^\top \neq 0$: $B$ moves
#    first, then $A$ follows.
# %%
torch.manual_seed(0)
base = nn.Linear(128, 96)
layer = LoRALinear(base, r=8, alpha=16)
x = torch.randn(32, 128)
print("step 0, max |LoRA output - base output| =", (layer(x) - base(x)).abs().max().item())

target = torch.randn(32, 96)
loss = F.mse_loss(layer(x), target)
loss.backward()
for name, p in layer.named_parameters():
    grad = "None (frozen)" if p.grad is None else f"norm {p.grad.norm():.4g}"
    print(f"  {name:18s} requires_grad={p.requires_grad!s:5s} grad: {grad}")

w_before = base.weight.detach().clone()
opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
for _ in range(20):
    opt.zero_grad()
    F.mse_loss(layer(x), target).backward()
    opt.step()
print("after 20 AdamW steps: base weight changed by", (base.weight - w_before).abs().max().item(),
      "| ||B|| =", round(layer.lora_B.norm().item(), 4))

# %% [markdown]
# ### Why $B = 0$ and not something else? Four inits, measured
#
# A teacher layer $y = (W + \Delta W^\star) x$ with a rank-4 $\Delta W^\star$; a student LoRA layer on
# the frozen $W$ learns it. We try four inits of $(A, B)$ and record the loss curve and how far the
# output at step 0 is from the pretrained output.
# %%
def init_experiment(init: str, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    d_in, d_out, true_rank = 64, 48, 4
    base = nn.Linear(d_in, d_out)
    delta_star = 0.3 * torch.randn(d_out, true_rank) @ torch.randn(true_rank, d_in) / math.sqrt(d_in)
    X = torch.randn(512, d_in)
    Y = (base(X) + X @ delta_star.T).detach()
    layer = LoRALinear(base, r=8, alpha=8)
    with torch.no_grad():
        if init == "A random, B zero (LoRA)":
            pass
        elif init == "A zero, B random":
            layer.lora_A.zero_(); nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
        elif init == "both random":
            nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
        elif init == "both zero":
            layer.lora_A.zero_()
    step0_change = (layer(X) - base(X)).abs().max().item()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(layer(X), Y)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return step0_change, losses


inits = ["A random, B zero (LoRA)", "A zero, B random", "both random", "both zero"]
steps = 100 if GRADING else 300
results = {name: init_experiment(name, steps) for name in tqdm(inits, desc="inits")}
fig, ax = plt.subplots(figsize=(6, 3.4))
for name, (change, losses) in results.items():
    ax.semilogy(losses, label=f"{name}: step-0 change {change:.2g}")
    print(f"{name:26s} step-0 output change {change:8.4f}   loss {losses[0]:.4f} -> {losses[-1]:.5f}")
ax.set_xlabel("Adam step"); ax.set_ylabel("MSE to teacher"); ax.legend(fontsize=7); plt.tight_layout(); plt.show()

# %% [markdown]
# What the measurement says:
# - **Both zero** never learns: both gradients are zero forever ($\partial L/\partial A \propto B$,
#   $\partial L/\partial B \propto A$) — a saddle point.
# - **Both random** starts away from the pretrained model (the step-0 change is not zero): the first
#   steps are spent undoing a random perturbation of a model that already worked.
# - **One of them zero** starts exactly at the pretrained model and learns. LoRA zeroes $B$ and draws
#   $A$; the reverse also works on this toy, and PEFT's `init_lora_weights` offers variants. With $A$ drawn
#   like an `nn.Linear` weight, $Ax$ has a sensible scale from the first step, so $B$'s first update is
#   well-conditioned.
#
# ## 5. Exercise 3 — `delta_weight`, `merge`, `unmerge`
#
# After training, the branch can be folded into the weight: $W \leftarrow W + s\,BA$. The merged layer
# is a plain linear layer again, so **inference costs nothing extra** (Section 4.1: "no additional
# inference latency"). Requirements:
# - `delta_weight()` returns $s\,BA$, shape `(out, in)`, computed in **at least float32** (float32 for
#   float32/half weights, float64 for float64 weights): half-precision products lose the small update
#   (PEFT issue #1388).
# - `merge()`: $W \leftarrow W + \Delta W$ computed in at least float32 and rounded once to $W$'s dtype,
#   written **into the base weight in place** (the layer keeps working, no new module). Refuse
#   (`ValueError`) to write non-finite values. Set `merged = True`; a second `merge()` does nothing.
# - `unmerge()`: the exact inverse, $W \leftarrow W - \Delta W$, only if merged; then `merged = False`.
# - Your `forward` already skips the branch when `merged` is true, so the output does not change.
#
# The methods are written as functions and attached to your class at the end of the cell.
# %% answer id=lora_merge
def delta_weight(self) -> torch.Tensor:
    """s * B @ A, shape (out, in), in float32 (float64 for float64 adapters)."""
    ### BEGIN SOLUTION
    dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
    return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
    ### END SOLUTION


def merge(self) -> None:
    """W <- W + s B A, in place; idempotent."""
    ### BEGIN SOLUTION
    if self.merged:
        return
    w = self.base_layer.weight
    work = torch.promote_types(w.dtype, torch.float32)          # never add in half precision
    new = w.detach().to(work) + self.delta_weight().detach().to(work)
    if not torch.isfinite(new).all():
        raise ValueError("merge would write non-finite values (NaN/Inf) into the weight; left unchanged")
    with torch.no_grad():
        w.copy_(new.to(w.dtype))                                 # in place: one rounding, same tensor
    self.merged = True
    ### END SOLUTION


def unmerge(self) -> None:
    """W <- W - s B A, in place; only when merged."""
    ### BEGIN SOLUTION
    if not self.merged:
        return
    w = self.base_layer.weight
    work = torch.promote_types(w.dtype, torch.float32)
    with torch.no_grad():
        w.copy_((w.detach().to(work) - self.delta_weight().detach().to(work)).to(w.dtype))
    self.merged = False
    ### END SOLUTION


LoRALinear.delta_weight = delta_weight
LoRALinear.merge = merge
LoRALinear.unmerge = unmerge

# %% test id=test_lora_merge points=3
# hand-worked: W = I, A = [[1, 1]], B = [[1], [2]], s = 2  ->  delta W = 2 [[1, 1], [2, 2]] = [[2, 2], [4, 4]]
_base = nn.Linear(2, 2, bias=False)
with torch.no_grad():
    _base.weight.copy_(torch.eye(2))
_layer = LoRALinear(_base, r=1, alpha=2)
with torch.no_grad():
    _layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
    _layer.lora_B.copy_(torch.tensor([[1.0], [2.0]]))
_dw = _layer.delta_weight()
assert _dw.shape == (2, 2), f"delta_weight must have the weight's shape (out, in), got {tuple(_dw.shape)}"
assert torch.allclose(_dw, torch.tensor([[2.0, 2.0], [4.0, 4.0]])), f"expected [[2, 2], [4, 4]], got {_dw.tolist()}"
_x = torch.tensor([[1.0, 3.0]])
_before = _layer(_x)
_layer.merge()
assert _layer.base_layer is _base and _layer.merged, "merge writes into the wrapped layer and sets merged"
assert torch.allclose(_base.weight, torch.tensor([[3.0, 2.0], [4.0, 5.0]])), f"W + delta W = [[3, 2], [4, 5]], got {_base.weight.tolist()}"
assert torch.allclose(_layer(_x), _before), "after merge the output must not change (do not add the update twice)"
_layer.merge()
assert torch.allclose(_base.weight, torch.tensor([[3.0, 2.0], [4.0, 5.0]])), "merge must be idempotent"
_layer.unmerge()
assert torch.allclose(_base.weight, torch.eye(2)) and not _layer.merged, "unmerge must restore W exactly"
_layer.unmerge()
assert torch.allclose(_base.weight, torch.eye(2)), "unmerging an unmerged layer must do nothing"
_h = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2)
assert _h.delta_weight().dtype == torch.float32, "compute delta_weight in float32 for half-precision layers"
with torch.no_grad():
    _layer.lora_B.fill_(float("inf"))
try:
    _layer.merge()
except ValueError:
    assert torch.allclose(_base.weight, torch.eye(2)) and not _layer.merged, "a refused merge must leave W unchanged"
else:
    raise AssertionError("merging an adapter with non-finite values must raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("02.lora_merge", LoRALinear)
check("02.lora_merge_half", LoRALinear)
### END HIDDEN TESTS

# %% [markdown]
# ## 6. Measured: merging into a bfloat16 weight
#
# Models are often served in bfloat16, which keeps 8 significand bits (7 stored, one implicit): a weight
# near 0.02 is stored to a step of $2^{-13} \approx 1.2 \cdot 10^{-4}$. A trained update $\Delta W$ is small
# next to $W$ (notebook 01 measured $\|\Delta W\|/\|W\|$ for a real fine-tuning; the cell below prints the
# mean entry of both), so part of it is lost to rounding when it is added to a bf16 weight. We merge an
# adapter of that size three ways and measure the share of $\Delta W$ lost, against the exact (float64) sum.
# %%
torch.manual_seed(0)
base16 = nn.Linear(512, 512).to(torch.bfloat16)
w64 = base16.weight.double().clone()
lay = LoRALinear(base16, r=16, alpha=32)
with torch.no_grad():
    lay.lora_B.normal_(0, 2e-3)
dw = lay.delta_weight().double()


def lost(merged_weight: torch.Tensor) -> str:
    return f"{((merged_weight.double() - w64) - dw).norm() / dw.norm():6.2%} of the update lost"


naive = base16.weight + (lay.lora_B.bfloat16() @ lay.lora_A.bfloat16()) * lay.scaling   # all in bf16
into_fp32 = base16.weight.float() + lay.delta_weight()                                  # a float32 copy
lay.merge()                                                                              # fp32 sum, one rounding to bf16
print(f"|delta W| mean {dw.abs().mean():.2e} vs |W| mean {w64.abs().mean():.2e}")
print("bf16 weight, delta in bf16            :", lost(naive))
print("bf16 weight, delta in fp32, one round :", lost(base16.weight))
print("merged into a float32 copy of W       :", lost(into_fp32))
lay.unmerge()
print(f"after unmerge, max |W - W_original| = {(base16.weight.double() - w64).abs().max():.2e} "
      "(a bf16 merge does not round-trip exactly)")
# %% [markdown]
# Computing the delta in float32 avoids the error of a bf16 product (small here: compare the first two
# lines), but the final rounding to bfloat16 drops a visible share of a small update whichever way: a merged bf16 model is not bit-identical to the adapter model (PEFT
# issue #1388, "merge_and_unload() raises the loss", is this effect on a bf16 Llama). Merge into a float32 copy when you can,
# keep the adapter file, and re-measure quality after merging.
#
# ## 7. Measured: dropout, merging and train/eval mode
#
# Dropout multiplies the LoRA input by a random mask, so a merged layer (which has no branch to drop)
# equals the unmerged one only in eval mode.
# %%
torch.manual_seed(0)
lay = LoRALinear(nn.Linear(64, 64), r=8, alpha=16, dropout=0.1)
with torch.no_grad():
    lay.lora_B.normal_()
x = torch.randn(8, 64)
unmerged_eval = lay.eval()(x)
unmerged_train = lay.train()(x)
lay.merge()
merged = lay(x)
print("eval mode : max |merged - unmerged| =", (merged - unmerged_eval).abs().max().item())
print("train mode: max |merged - unmerged| =", (merged - unmerged_train).abs().max().item())
lay.unmerge()

# %% [markdown]
# ## 8. The seed article's `LoRALinear`, measured
#
# The article this course started from writes (abridged):
#
# ```python
# self.linear = nn.Linear(in_features, out_features, bias=bias)       # a new, random layer
# self.lora_A = nn.Parameter(torch.zeros(in_features, rank))          # A: (in, r)
# self.lora_B = nn.Parameter(torch.zeros(rank, out_features))         # B: (r, out)
# nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
# ...
# lora_output = self.dropout(x) @ self.lora_A @ self.lora_B * self.scaling
# ...
# def merge_weights(self):
#     if not self.linear.weight.requires_grad:
#         merged_weight = self.linear.weight.data + (self.lora_A @ self.lora_B * self.scaling).T
#         merged_linear = nn.Linear(self.in_features, self.out_features, ...)
#         merged_linear.weight.data = merged_weight
#         return merged_linear
#     else:
#         raise ValueError("Original weight not frozen, cannot merge")
# ...
# # apply_lora_to_model:
# lora_layer.linear.weight.data = module.weight.data.clone()
# ```
#
# Its forward maths is right (dropout sits on the branch input, as it should). What goes wrong:
#
# 1. **Transposed shapes, and therefore the wrong init.** With `A` of shape `(in, r)`,
#    `kaiming_uniform_` reads `fan_in = r` (the second dimension), so $A$ is drawn from
#    $\pm 1/\sqrt{r}$ instead of $\pm 1/\sqrt{d_\text{in}}$: 16x too large at $d=4096, r=16$. The
#    convention also needs `.T` on every merge and export (PEFT files store `lora_A` as `(r, in)`).
# 2. **It copies the frozen weight.** `apply_lora_to_model` builds a fresh random `nn.Linear` (time spent
#    on an init that is thrown away), then `clone()`s the pretrained weight into it: two copies exist
#    while the swap happens, and a module that was shared (one module used under two names) stops being
#    shared (measured on a model in section 9).
# 3. **`merge_weights` returns a new `nn.Linear` and leaves the model as it was.** Used as written
#    (`merged = layer.merge_weights()`, then serve `merged`), the update is applied *once*: the LoRA module
#    itself is not changed. What does go wrong, each measured below:
#    - nothing puts the merged layer into the model: the article has no `merge_and_unload`, so a model
#      "merged" with it still runs every LoRA branch, unless the caller writes the swap walk;
#    - the returned layer is a fresh `nn.Linear`: its weight is **trainable again**
#      (`requires_grad=True`), so the next optimizer built on `model.parameters()` trains every merged weight;
#    - the product and the sum are computed in the weight's dtype: after `model.to(torch.bfloat16)` both are
#      bf16, and there is no way to merge into a float32 copy. It loses the share of the update that
#      section 6 measured for any merge into bf16 weights (the bf16 product adds little on top: compare
#      the last two printed lines);
#    - there is no `unmerge`, and it refuses to merge when the weight is trainable, a condition unrelated to
#      merging;
#    - the update is applied twice only if a caller puts the merged layer back *inside* the LoRA module
#      (`layer.linear = layer.merge_weights()`), which the article does not do but its API leaves open.
# 4. Smaller points: `dropout=0.1` by default (PEFT's default is 0.0); no input validation.
#
# The measurements (the article's class, verbatim apart from formatting, is `ArticleLoRALinear`):
# %%
def article_init_bound(d_in: int, r: int) -> float:
    A = torch.zeros(d_in, r)                     # the article's (in, r) shape
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A.abs().max().item()


torch.manual_seed(0)
ours = LoRALinear(nn.Linear(4096, 64), r=16)
print(f"max |A| at d_in=4096, r=16: article {article_init_bound(4096, 16):.4f} (bound 1/sqrt(16) = 0.25), "
      f"ours {ours.lora_A.abs().max():.4f} (bound 1/sqrt(4096) = {1 / 64:.4f})")

# wrapping vs cloning: who holds the pretrained numbers?
big = nn.Linear(2048, 2048)
t0 = time.perf_counter()
wrapped = LoRALinear(big, r=16)
t_wrap = time.perf_counter() - t0
t0 = time.perf_counter()
fresh = nn.Linear(2048, 2048)                   # the article: a new random layer ...
fresh.weight.data = big.weight.data.clone()     # ... then a copy of the pretrained weight
t_clone = time.perf_counter() - t0
print(f"wrap : shares storage with the original: {wrapped.base_layer.weight.data_ptr() == big.weight.data_ptr()}, "
      f"{t_wrap * 1e3:.1f} ms, extra bytes 0")
print(f"clone: shares storage with the original: {fresh.weight.data_ptr() == big.weight.data_ptr()}, "
      f"{t_clone * 1e3:.1f} ms, extra bytes {big.weight.numel() * big.weight.element_size():,} while both live")

# the same maths in the article's convention: A_article = A.T, B_article = B.T
with torch.no_grad():
    wrapped.lora_B.normal_()
x = torch.randn(4, 2048)
article_branch = x @ wrapped.lora_A.T @ wrapped.lora_B.T * wrapped.scaling
print("same output as ours once transposed:",
      torch.allclose(big(x) + article_branch, wrapped(x), atol=1e-4))


# %%
import copy


class ArticleLoRALinear(nn.Module):
    """The seed article's LoRALinear (its code, formatting aside): A (in, r), B (r, out), a new inner Linear."""

    def __init__(self, in_features, out_features, rank=16, alpha=16.0, dropout=0.1, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.linear.weight.requires_grad = False
        if bias:
            self.linear.bias.requires_grad = False
        self.lora_A = nn.Parameter(torch.zeros(in_features, rank))
        self.lora_B = nn.Parameter(torch.zeros(rank, out_features))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        return self.linear(x) + self.dropout(x) @ self.lora_A @ self.lora_B * self.scaling

    def merge_weights(self):
        if not self.linear.weight.requires_grad:
            merged_weight = self.linear.weight.data + (self.lora_A @ self.lora_B * self.scaling).T
            merged_linear = nn.Linear(self.in_features, self.out_features, bias=self.linear.bias is not None)
            merged_linear.weight.data = merged_weight
            if self.linear.bias is not None:
                merged_linear.bias.data = self.linear.bias.data
            return merged_linear
        else:
            raise ValueError("Original weight not frozen, cannot merge")


torch.manual_seed(0)
art = ArticleLoRALinear(256, 256, rank=8, alpha=16, dropout=0.0)
with torch.no_grad():
    art.lora_B.normal_(0, 0.02)                              # pretend we trained
x = torch.randn(4, 256)
served = art.merge_weights()
once = art.linear(x) + x @ art.lora_A @ art.lora_B * art.scaling
print(f"served as written: max |merged(x) - LoRA layer(x)| = {(served(x) - art(x)).abs().max():.1e}  (update applied once)")
print(f"the LoRA module is unchanged: still a {type(art).__name__} adding its branch; merge_weights returned a "
      f"separate {type(served).__name__} that nothing puts into a model")
print("the returned layer's weight requires_grad:", served.weight.requires_grad,
      "(the frozen weight is trainable again)")
art_twice = copy.deepcopy(art)
art_twice.linear = art_twice.merge_weights()                 # the misuse the API leaves open
print(f"merged layer put back inside the LoRA module: max |output - once| = {(art_twice(x) - once).abs().max():.3f}, "
      f"the update's own size is {(once - art.linear(x)).abs().max():.3f} (applied twice)")
art.linear.weight.requires_grad_(True)
try:
    art.merge_weights()
except ValueError as err:
    print("with a trainable weight it refuses to merge:", err)

# the article's merge on a bf16 model: section 6's weight and adapter (same seed), in the article's layout
torch.manual_seed(0)
base16 = nn.Linear(512, 512).to(torch.bfloat16)
ours16 = LoRALinear(base16, r=16, alpha=32)
with torch.no_grad():
    ours16.lora_B.normal_(0, 2e-3)
w_exact, dw_exact = base16.weight.double().clone(), ours16.delta_weight().double()
art16 = ArticleLoRALinear(512, 512, rank=16, alpha=32, dropout=0.0)
with torch.no_grad():
    art16.linear.weight.copy_(base16.weight.float())
    art16.linear.bias.copy_(base16.bias.float())
    art16.lora_A.copy_(ours16.lora_A.detach().T)             # A_article = A.T, B_article = B.T
    art16.lora_B.copy_(ours16.lora_B.detach().T)
art16.to(torch.bfloat16)                                     # what model.to(torch.bfloat16) does to it
ours16.merge()
for name, merged_w in (("article's merge_weights (bf16 product and sum)", art16.merge_weights().weight),
                       ("your merge (fp32 delta, one rounding)          ", base16.weight)):
    err = ((merged_w.double() - w_exact) - dw_exact).norm() / dw_exact.norm()
    print(f"{name}: {err:.2%} of the update lost")

# %% [markdown]
# ## 9. Your layer inside SmolLM2-135M
#
# Put your class on the query and value projections of the real model's first layer and check the three
# promises on a real forward pass: identical output at step 0, a tiny number of trainable parameters, and
# a merge that changes nothing.
# %%
from lora_ref.models import load_smollm2

model, tok = load_smollm2(device=DEVICE)
attn = model.model.layers[0].self_attn
print("layer 0 q_proj:", attn.q_proj, "| v_proj:", attn.v_proj, "(grouped-query attention: v is smaller)")
ids = tok("Our store opens at 9am on Saturdays.", return_tensors="pt").input_ids.to(DEVICE)
with torch.no_grad():
    logits_base = model(ids).logits
for p in model.parameters():
    p.requires_grad_(False)
attn.q_proj = LoRALinear(attn.q_proj, r=8, alpha=16)
attn.v_proj = LoRALinear(attn.v_proj, r=8, alpha=16)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
with torch.no_grad():
    logits_lora = model(ids).logits
    print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.4f}%)")
    print("step 0: max |logits difference| =", (logits_lora - logits_base).abs().max().item())
    for proj in (attn.q_proj, attn.v_proj):
        proj.lora_B.normal_(0, 0.02)               # pretend we trained
    logits_trained = model(ids).logits
    attn.q_proj.merge(); attn.v_proj.merge()
    logits_merged = model(ids).logits
print("after 'training': logits moved by", round((logits_trained - logits_base).abs().max().item(), 4),
      "| merged vs unmerged max difference:", (logits_merged - logits_trained).abs().max().item())

# %% [markdown]
# ## 10. The seed article's `apply_lora_to_model`, measured
#
# The article puts its layer into a model like this (its code, formatting aside):
# %%
def article_apply_lora_to_model(model, target_modules, rank=16, alpha=16.0, dropout=0.1):
    """The article's apply_lora_to_model (its LoRAConfig's fields as arguments)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parent_name = name.split(".")[-1]
            if parent_name in target_modules:
                lora_layer = ArticleLoRALinear(module.in_features, module.out_features, rank=rank, alpha=alpha,
                                               dropout=dropout, bias=module.bias is not None)
                lora_layer.linear.weight.data = module.weight.data.clone()
                if module.bias is not None:
                    lora_layer.linear.bias.data = module.bias.data.clone()
                parent = model
                for atom in name.split(".")[:-1]:
                    parent = getattr(parent, atom)
                setattr(parent, parent_name, lora_layer)      # replaces modules while named_modules() iterates

# %% [markdown]
# **1. It replaces modules while iterating `named_modules()`.** That does not crash: `setattr` changes the
# value of a key the parent's module dict already has (a dict may change values, not size, while it is
# iterated), and the generator has already handed out the old module. But `named_modules()` yields each
# module *object* once. A module registered under two names is visited under the first only:
# %%
from lora_ref.lora import LoRAConfig, inject_lora

for how in ("article", "lora_ref.inject_lora"):
    shared = nn.Linear(8, 8)
    net = nn.ModuleDict({"encoder": nn.ModuleDict({"proj": shared}), "decoder": nn.ModuleDict({"proj": shared})})
    if how == "article":
        article_apply_lora_to_model(net, ["proj"], rank=2)
        first, second = net["encoder"]["proj"], net["decoder"]["proj"]
        print(f"{how:21s}: encoder.proj is a {type(first).__name__} holding a *copy* of the weight, decoder.proj is "
              f"the original {type(second).__name__} (trainable: {second.weight.requires_grad}); shared storage: "
              f"{first.linear.weight.data_ptr() == second.weight.data_ptr()}")
    else:
        inject_lora(net, LoRAConfig(r=2, target_modules=("proj",)))
        first, second = net["encoder"]["proj"], net["decoder"]["proj"]
        print(f"{how:21s}: encoder.proj is a {type(first).__name__} wrapping the original, decoder.proj is "
              f"{type(second).__name__}; shared storage: {first.base_layer.weight.data_ptr() == second.weight.data_ptr()}")

# %% [markdown]
# Both skip the second name (so shared modules need care in any injector), but the article's copy also
# splits one weight into two that training then moves apart. Collecting the targets first and wrapping by
# reference keeps the base weight shared.
#
# **2. Its fresh layers lose the model's dtype and device.** `ArticleLoRALinear(...)` is built with
# PyTorch's defaults (float32, CPU); only the frozen weight is then swapped for the model's tensor. On a
# bfloat16 model (a tiny Llama with SmolLM2's architecture):
# %%
from lora_ref.models import tiny_llama

bf16_model = tiny_llama().to(torch.bfloat16)
article_apply_lora_to_model(bf16_model, ["q_proj", "v_proj"])
q = bf16_model.model.layers[0].self_attn.q_proj
print(f"frozen weight {q.linear.weight.dtype} on {q.linear.weight.device}; "
      f"lora_A {q.lora_A.dtype} on {q.lora_A.device} (a GPU model would leave them on the CPU too)")
try:
    bf16_model(torch.tensor([[1, 2, 3]]))
except RuntimeError as err:
    print("forward pass:", type(err).__name__, "-", err)

# %% [markdown]
# **3. Nothing outside the adapters is frozen, so its "trainable ratio" is wrong.** The article's trainer
# calls `apply_lora_to_model` on the pretrained model (all seven projections, rank 16, alpha 32) and prints
# its ratio of trainable parameters. Its layers freeze their own inner weight, but the embeddings, the
# norms and every layer it does not wrap keep `requires_grad=True`, and its optimizer takes every parameter
# that requires a gradient. On SmolLM2:
# %%
art_model, _ = load_smollm2(device=DEVICE)
article_apply_lora_to_model(art_model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            rank=16, alpha=32.0)
total_params = sum(p.numel() for p in art_model.parameters())
trainable_params = sum(p.numel() for p in art_model.parameters() if p.requires_grad)
lora_params = sum(p.numel() for n, p in art_model.named_parameters() if "lora_" in n)
print(f"the article's print: Trainable ratio: {100 * trainable_params / total_params:.2f}%  "
      f"({trainable_params:,} of {total_params:,})")
print(f"LoRA's own parameters: {lora_params:,} = {100 * lora_params / total_params:.2f}% of the model")
others = {}
for n, p in art_model.named_parameters():
    if p.requires_grad and "lora_" not in n:
        kind = "embed_tokens (tied lm_head)" if "embed_tokens" in n else n.rsplit(".", 1)[0].split(".")[-1]
        others[kind] = others.get(kind, 0) + p.numel()
print("also trainable, and trained by its optimizer:", {k: f"{v:,}" for k, v in others.items()})
del art_model

# %% [markdown]
# So the article's "LoRA" fine-tunes the token embeddings (and output head, tied to them) and every norm
# too: a different method from the one it describes, with an optimizer state to match. Freeze everything
# first, then add adapters (section 9 above, `lora_ref.inject_lora`, PEFT's `get_peft_model`).
#
# ## 11. Interview practice
#
# Answer out loud first, then open the answer.
#
# **Q1. Why is $B$ initialised to zero, and what happens if both $A$ and $B$ are random? Both zero?**
# <details><summary>answer</summary>
# $B=0$ makes $\Delta W = 0$, so training starts exactly at the pretrained model (measured: output change
# 0). Both random: the model starts perturbed and the first steps undo noise. Both zero: every gradient is
# zero ($\partial L/\partial A \propto B$, $\partial L/\partial B \propto A$), nothing ever learns.
# </details>
#
# **Q2. What does $\alpha$ do, why divide by $r$, and what does rsLoRA change?**
# <details><summary>answer</summary>
# $s=\alpha/r$ scales the update; with Adam, tuning $\alpha$ is like tuning the learning rate, and dividing
# by $r$ lets you change $r$ without re-tuning (paper, 4.1). Measured in section 2 on a real layer: in the
# first Adam steps $BA$ grows like $\sqrt r$ ($B$'s columns move independently), so $\alpha/r$ starts large
# ranks slowly and rsLoRA's $\alpha/\sqrt r$ keeps them level; once trained, $BA$ grows like $r$ (the
# columns agree), $\alpha/r$ keeps the update's size nearly independent of $r$, and rsLoRA makes large ranks
# take larger steps, like a larger learning rate.
# </details>
#
# **Q3. How many trainable parameters does LoRA add to one 4096 × 4096 projection at r = 16?**
# <details><summary>answer</summary>
# $r(d_\text{in}+d_\text{out}) = 16 \cdot 8192 = 131{,}072$, against $16{,}777{,}216$: 128x fewer
# ($d/2r$ for a square matrix).
# </details>
#
# **Q4. Is there any inference latency after merging? When would you not merge?**
# <details><summary>answer</summary>
# None: the merged layer is a plain linear layer of the same shape. Keep adapters separate to serve many
# tasks on one base model (switch adapters per request), or to keep the exact adapter model (bf16 merges
# lose part of the update, measured in section 6). Do not merge into a quantised base and re-quantise:
# notebook 07 measures that re-quantising to NF4 erases a trained QLoRA adapter (held-out fact accuracy
# {{result:quality_qlora_h200.json:deploy.requant.fact_accuracy:.1%}} after re-quantising, against
# {{result:quality_qlora_h200.json:deploy.adapter.fact_accuracy:.1%}} with the adapter and
# {{result:quality_qlora_h200.json:base.fact_accuracy:.1%}} for the base model), because the update is smaller than a
# 4-bit rounding step; dequantise, merge and export in 16 bits instead.
# </details>
#
# **Q5. Where does dropout go in LoRA, and what does it mean for merging?**
# <details><summary>answer</summary>
# On the LoRA branch's input only; the frozen path is untouched. A merged layer has no branch, so it
# equals the unmerged one only in eval mode (measured in section 7).
# </details>
#
# **Q6. Name three mistakes in the article's `LoRALinear`.**
# <details><summary>answer</summary>
# A stored as (in, r) so kaiming's fan-in is r (init 16x too large at d=4096, r=16) and every export needs
# transposes; the pretrained weight is cloned into a freshly initialised Linear instead of wrapped (its
# adapters then get float32 CPU tensors on a bf16 or GPU model); merge returns a new layer that nothing
# puts into the model, trainable again, with no unmerge and no float32 option; and nothing
# outside the adapters is frozen, so it trains embeddings and norms too (sections 8 and 10).
# </details>
