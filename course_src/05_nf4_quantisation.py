# %% [markdown]
# # 05 · NF4: 4-bit NormalFloat quantisation, from first principles
#
# QLoRA (Dettmers et al., 2023, arXiv 2305.14314) fine-tunes a 65B model on one 48 GB GPU. Its first two
# innovations are about *storing the frozen weights in 4 bits* without hurting quality:
#
# 1. **4-bit NormalFloat (NF4)**: 16 levels placed at quantiles of a normal distribution (Section 3);
# 2. **double quantisation**: the per-block scales are themselves quantised (Section 3);
# 3. (paged optimizers, the third, comes in notebook 06).
#
# In this notebook you will build NF4 bit for bit the way `bitsandbytes` stores it, and measure every claim.
#
# **Learning objectives.** After this notebook you can
# - derive the 16 NF4 levels from quantiles of N(0, 1), and say why the table is asymmetric, has an exact
#   zero, contains 0.0796 and never contains `inf`;
# - quantise a tensor blockwise with absmax scaling and nearest-level rounding, and dequantise it;
# - pack two 4-bit codes per byte in bitsandbytes' nibble order and prove parity with `bitsandbytes`;
# - measure the error of NF4 vs FP4 vs int4 on real SmolLM2 weights and on N(0, 0.02) weights;
# - account for the bits per parameter with and without double quantisation (4.5 -> 4.127);
# - find and fix the bugs of a plausible-looking `QLoRALinear` (the seed article's).
#
# **Graded exercises** (autograded; visible tests here, hidden tests compare with `lora_ref` on random
# inputs): `nf4_code` (3 pts), `quantize_blockwise` / `dequantize_blockwise` (4 pts), `pack_4bit` /
# `unpack_4bit` (2 pts), `bits_per_parameter` (2 pts), the fixed `QLoRALinear` (5 pts).
#
# Answer cells may only use `torch`, `torch.nn as nn`, `torch.nn.functional as F`, `math`, `numpy as np`
# and your own earlier answers: the autograder replays them alone.
# %%
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
torch.manual_seed(0)

# %% [markdown]
# ## 1. Quantisation is a codebook plus a scale
#
# A 4-bit code can name $2^4 = 16$ values $c_0 < c_1 < \dots < c_{15}$ in $[-1, 1]$: the **codebook**.
# To store a block $x \in \mathbb{R}^{B}$ of $B$ weights, keep one scale, the block's **absmax**
# $s = \max_i |x_i|$, and for each weight the index of the nearest level:
#
# $$ q_i = \arg\min_j \left| \frac{x_i}{s} - c_j \right|, \qquad \hat x_i = s \, c_{q_i}. $$
#
# Everything hinges on *where* the 16 levels sit. Three choices:
#
# | codebook | levels | idea |
# | --- | --- | --- |
# | int4 (symmetric) | $k/7$, $k = -7..7$ | evenly spaced: best for *uniform* data |
# | FP4 (E2M1) | $\pm\{0, \tfrac{1}{192}, \tfrac16, \tfrac14, \tfrac13, \tfrac12, \tfrac23, 1\}$ in bitsandbytes | a tiny float: dense near 0, sparse far out |
# | NF4 | quantiles of $\mathcal N(0,1)$ | each level covers the same share of a normal distribution |
#
# Pretrained weights are close to normal, so NF4 spends its 16 levels where the weights are.
#
# ## 2. From quantiles of N(0, 1) to the NF4 table
#
# The QLoRA paper (Section 3, "4-bit NormalFloat Quantization") wants levels $q_i$ such that each of the
# $2^k$ bins holds the same probability mass of $\mathcal N(0,1)$, via the quantile function
# $Q_X = \Phi^{-1}$. Two details make it usable:
#
# * **No infinities.** $\Phi^{-1}(1) = +\infty$. Taking quantiles all the way to probability 1 puts `inf`
#   in the table. bitsandbytes stops at an offset $\delta = 0.9677083$, the mean of $1 - \frac{1}{2\cdot 15}$
#   and $1 - \frac{1}{2\cdot 16}$ (half a bin short of the tail for 15 and for 16 bins).
# * **An exact zero.** Zero weights (padding, pruned rows) must stay zero, and a symmetric 16-level table
#   cannot contain 0 (it would need an odd number of levels). NF4 is *asymmetric*: 8 positive levels from
#   $p \in \operatorname{linspace}(\delta, \tfrac12, 9)$ without its last point ($p = \tfrac12$ gives 0),
#   7 negative levels from $\operatorname{linspace}(\delta, \tfrac12, 8)$ without its last point, and one
#   exact 0:
#
# $$ \text{pos}_i = \Phi^{-1}(p_i),\; p = \operatorname{linspace}(\delta, \tfrac12, 9)_{0..7}; \quad
#    \text{neg}_i = -\Phi^{-1}(p'_i),\; p' = \operatorname{linspace}(\delta, \tfrac12, 8)_{0..6}; $$
#
# $$ \text{NF4} = \operatorname{sort}(\text{pos} \cup \{0\} \cup \text{neg}) \,/\, \max(\dots). $$
#
# `torch.special.ndtri` is $\Phi^{-1}$. To match bitsandbytes to the last bit, do what it does: make the
# probabilities with `torch.linspace` in **float32**, evaluate $\Phi^{-1}$ in float64, convert the 16
# values to float32, sort, and divide by the maximum in float32.
# %% answer id=nf4_code
def nf4_code(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels, sorted ascending, float32, in [-1, 1] with an exact 0 (QLoRA, Section 3).

    8 positive quantiles Phi^-1(linspace(offset, 0.5, 9)[:-1]), 7 negative ones
    -Phi^-1(linspace(offset, 0.5, 8)[:-1]), and 0; normalised by the maximum.
    """
    ### BEGIN SOLUTION
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset}")
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return values / values.max()
    ### END SOLUTION


# %% test id=test_nf4_code points=3
code = nf4_code()
assert isinstance(code, torch.Tensor) and code.shape == (16,), f"expected a tensor of 16 levels, got {getattr(code, 'shape', code)}"
assert code.dtype == torch.float32, f"store the code in float32 (like bitsandbytes), got {code.dtype}"
assert torch.all(code[1:] > code[:-1]), "levels must be sorted ascending and distinct"
assert code[0] == -1.0 and code[-1] == 1.0, f"the table must span [-1, 1], got {code[0]} .. {code[-1]}"
assert (code == 0).sum() == 1, "NF4 has exactly one exact zero"
assert (code > 0).sum() == 8 and (code < 0).sum() == 7, "8 positive and 7 negative levels (asymmetric)"
assert abs(code[8].item() - 0.07958029955625534) < 1e-6, f"first positive level should be 0.0796, got {code[8]:.4f}"
assert abs(code[1].item() + 0.6961928009986877) < 1e-6, f"second level should be -0.6962, got {code[1]:.4f}"
assert torch.isfinite(code).all(), "no inf in the table"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("05.nf4_code", nf4_code)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured: your table against bitsandbytes, and what goes wrong with the article's
#
# The seed article types this table in its `QLoRALinear`:
#
# ```
# [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
#   0.0911, 0.1848, 0.2844, 0.3949, 0.5251, 0.6962, 1.0, inf]
# ```
#
# The cell below compares it with the real table (the reference `lora_ref.quant`, and bitsandbytes, which runs
# on the CPU too) and shows where each of its three mistakes comes from.
# %%
import logging                                 # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # silence its note about optional CPU kernels
try:
    import bitsandbytes.functional as bnbF    # bitsandbytes' NF4 runs on the CPU as well
except ImportError:                           # `make env` installs it; without it parity checks are skipped
    bnbF = None
    print("bitsandbytes is not installed (pip install -e '.[test]'): the parity checks below are skipped")
from lora_ref import quant                     # noqa: E402

REF_NF4 = quant.nf4_code()
BNB_NF4 = bnbF.get_4bit_type("nf4", device="cpu") if bnbF else REF_NF4
ARTICLE = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                        0.0911, 0.1848, 0.2844, 0.3949, 0.5251, 0.6962, 1.0, float("inf")])
print("lora_ref NF4 == bitsandbytes NF4 (bit for bit):", torch.equal(REF_NF4, BNB_NF4) if bnbF else "(skipped)")
print(f"{'i':>2} {'NF4':>10} {'article':>9}")
for i in range(16):
    print(f"{i:>2} {REF_NF4[i].item():>10.6f} {ARTICLE[i].item():>9.4f}")

# mistake 1: quantiles taken all the way to p = 1 give Phi^-1(1) = inf
naive = torch.special.ndtri(torch.linspace(0.5, 1.0, 9).double())
print("\nquantiles of linspace(0.5, 1, 9):", [round(v, 3) for v in naive.tolist()], "<- the last one is inf")
# mistake 2: mirroring the negative half makes a symmetric table: it has no 0.0796 and only 7 positive levels
print("article's positive levels are the NF4 negative ones mirrored:",
      torch.allclose(ARTICLE[8:15], -REF_NF4[:7].flip(0), atol=1e-4))
# mistake 3 (consequence): with 15 finite levels + inf, one of the 16 codes is wasted, and any value that
# rounds to it becomes inf after dequantisation
print("finite levels in the article's table:", int(torch.isfinite(ARTICLE).sum()), "of 16")

# %% [markdown]
# Why the article's table is wrong, in three points (each printed above):
#
# 1. **It ends in `inf`.** That is $\Phi^{-1}(1)$: quantiles taken up to probability 1 instead of stopping
#    at the offset $\delta$. A level at infinity turns every weight that reaches it into `inf`.
# 2. **It is symmetric.** It is NF4's negative half mirrored. A symmetric table with a zero has an odd
#    number of levels, so one code is left over (the article fills it with `inf`). NF4 instead gives the
#    positive side 8 levels and the negative side 7.
# 3. **It has no 0.0796.** That is the first positive level of the 8-level positive half; the article's
#    0.0911 belongs to the 7-level negative half.
#
# Now the picture: the levels, scaled to standard deviations ($c_j \cdot \Phi^{-1}(\delta)$), against the
# normal density, and the probability mass of $\mathcal N(0,1)$ that each level receives with
# nearest-level rounding.
# %%
scale_sd = float(torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64)))
# E2M1 as the OCP microscaling spec defines it (subnormal 0.5): bitsandbytes' FP4 differs only there (1/192)
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
codes = {"NF4": quant.nf4_code(), "FP4 (bnb)": quant.fp4_code(), "E2M1 (OCP)": torch.cat([E2M1, -E2M1]) / 6,
         "int4": quant.int4_code()}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
xs = torch.linspace(-3, 3, 400)
axes[0].plot(xs, torch.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi), color="gray", label="N(0,1) density")
for k, (name, c) in enumerate(codes.items()):
    levels = c.sort().values.unique() * scale_sd
    axes[0].scatter(levels, torch.full_like(levels, -0.03 - 0.04 * k), s=18, label=name)
axes[0].set_title("16 levels, scaled so that +1 sits at Phi^-1(0.9677) = %.2f sd" % scale_sd)
axes[0].legend(fontsize=8)

def bin_mass(levels_sd):
    """Mass of N(0,1) that nearest rounding sends to each level (bins cut at midpoints)."""
    lv = levels_sd.double().sort().values.unique()
    cuts = torch.cat([torch.tensor([-math.inf]), (lv[1:] + lv[:-1]) / 2, torch.tensor([math.inf])])
    cdf = 0.5 * (1 + torch.erf(cuts / math.sqrt(2)))
    return lv, cdf[1:] - cdf[:-1]

for name, c in codes.items():
    lv, mass = bin_mass(c * scale_sd)
    axes[1].plot(range(len(mass)), mass, marker="o", label=f"{name}: max/min mass {mass.max() / mass.min():.1f}x")
axes[1].axhline(1 / 16, color="gray", ls=":", label="1/16")
axes[1].set_xlabel("level index"); axes[1].set_ylabel("probability mass")
axes[1].set_title("How evenly each codebook uses its levels on normal data"); axes[1].legend(fontsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# NF4's masses stay within 1.3x of each other, close to 1/16 (the two end levels also catch the tails
# beyond $\pm 1.85$ sd); int4 gives its middle levels 3.5x the mass of its outer ones; bitsandbytes' FP4
# has a level at $\pm 1/192$, so close to zero that it receives almost nothing: a wasted code.
#
# ## 3. Blockwise absmax quantisation
#
# One scale for a whole matrix would let a single outlier flatten everything else to zero. QLoRA uses
# **blocks of 64 consecutive values** (of the flattened, row-major weight), each with its own absmax
# (bitsandbytes allows block sizes 32 ... 4096). With $n$ values and block size $B$, there are
# $\lceil n / B \rceil$ blocks; the last one may be shorter.
#
# **Nearest-level rounding, the way bitsandbytes does it.** Sort the codebook, take the 15 midpoints
# $m_j = (c_j + c_{j+1})/2$, and count how many midpoints lie strictly below the value:
# `torch.bucketize(v, midpoints)` (a tie goes to the lower level). For a codebook stored out of order
# (FP4's and int4's tables are listed in bit-pattern order), sort with `order = torch.argsort(code,
# stable=True)` and map the sorted index back with `order[...]` (stable: their +0 and -0 then resolve to
# the first of the two, as in bitsandbytes).
#
# To be bit-exact with bitsandbytes, normalise with the reciprocal, $v = x \cdot (1/s)$, computed in
# float32, and clamp to $[-1, 1]$; an all-zero block has $s = 0$: use $1/\max(s, 10^{-38})$ so that it
# quantises to the code of 0.0 and dequantises to exact zeros. (bitsandbytes divides instead of
# multiplying in a final partial block; the two differ by at most one ulp, which matters only for a value
# sitting exactly on a midpoint: the hidden tests contain no such ties.)
#
# Dequantisation is a gather and a multiply: $\hat x = c[q] \cdot s_{\text{block}}$, then reshape.
# %% answer id=quantize_blockwise
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64):
    """Blockwise absmax quantisation of any float tensor to 4-bit codes (QLoRA, Section 3).

    x: any shape, float. code: (16,) levels in [-1, 1], any order. Flattened row-major, cut into blocks of
    ``blocksize`` (the last may be shorter). Returns
      codes:  (x.numel(),) uint8 in [0, 15], the index into ``code`` of the nearest level to x / absmax;
      absmax: (ceil(numel / blocksize),) float32, max |x| of each block.
    """
    ### BEGIN SOLUTION
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    order = torch.argsort(code)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = order[torch.bucketize(scaled, midpoints)]
    return codes.to(torch.uint8), absmax
    ### END SOLUTION


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape,
                         blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_blockwise: code[codes] * absmax of each value's block, reshaped to ``shape``.

    codes: (n,) uint8; absmax: (ceil(n / blocksize),) float32; returns a tensor of ``shape`` and ``dtype``
    (computed in float32, cast at the end, like bitsandbytes).
    """
    ### BEGIN SOLUTION
    n = codes.numel()
    values = code.float()[codes.long()]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scales).reshape(shape).to(dtype)
    ### END SOLUTION


# %% test id=test_quantize_blockwise points=4
_code = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0] + [1.5 + 0.5 * i for i in range(11)])  # toy: levels > 1 unused
_x = torch.tensor([4.0, -2.0, 1.1, 0.9, 0.0, 0.0, 3.0, -1.0])          # two blocks of 4
_q, _s = quantize_blockwise(_x, _code, blocksize=4)
assert _q.dtype == torch.uint8 and _q.shape == (8,), f"codes: expected (8,) uint8, got {tuple(_q.shape)} {_q.dtype}"
assert torch.equal(_s, torch.tensor([4.0, 3.0])), f"absmax per block should be [4, 3], got {_s}"
# 4/4=1 -> level 1.0 (idx 4); -2/4=-0.5 (idx 1); 1.1/4=0.275 -> 0.5 (idx 3); 0.9/4=0.225 -> 0.0 (idx 2)
assert _q[:4].tolist() == [4, 1, 3, 2], f"nearest levels of block 0 should be [4, 1, 3, 2], got {_q[:4].tolist()}"
assert _q[4:].tolist() == [2, 2, 4, 1], f"nearest levels of block 1 should be [2, 2, 4, 1], got {_q[4:].tolist()}"
_back = dequantize_blockwise(_q, _s, _code, (2, 4), blocksize=4)
assert _back.shape == (2, 4), f"dequantised shape should be (2, 4), got {tuple(_back.shape)}"
assert torch.equal(_back.flatten(), torch.tensor([4.0, -2.0, 2.0, 0.0, 0.0, 0.0, 3.0, -1.5])), _back
_z, _zs = quantize_blockwise(torch.zeros(70), nf4_code(), 64)            # all-zero block, ragged tail
assert torch.equal(dequantize_blockwise(_z, _zs, nf4_code(), (70,)), torch.zeros(70)), "zeros must stay exact zeros"
assert _zs.shape == (2,), f"70 values in blocks of 64 make 2 blocks, got {_zs.shape}"
assert dequantize_blockwise(*quantize_blockwise(_x, _code, 4), _code, (8,), 4, torch.bfloat16).dtype == torch.bfloat16
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("05.quantize_blockwise", quantize_blockwise)
check("05.dequantize_blockwise", dequantize_blockwise)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Two codes per byte
#
# A code needs 4 bits; PyTorch's smallest integer has 8. bitsandbytes packs value $2i$ into the **high**
# nibble and value $2i+1$ into the **low** nibble of byte $i$:
#
# $$ \text{byte}_i = (q_{2i} \ll 4) \;|\; q_{2i+1}. $$
#
# An odd count is padded with one extra code (use `pad`, default 0; bitsandbytes pads with the code of 0.0,
# which is 7 in NF4). `unpack_4bit(packed, n)` returns the first `n` codes.
# %% answer id=pack_4bit
def pack_4bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """(n,) uint8 codes in [0, 15] -> (ceil(n/2),) uint8; first code of each pair in the high nibble."""
    ### BEGIN SOLUTION
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes must be in [0, 15], got a maximum of {int(codes.max())}")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad)])
    return (codes[0::2] << 4) | codes[1::2]
    ### END SOLUTION


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(m,) uint8 -> the first n codes as (n,) int64 (ready to index a codebook); inverse of pack_4bit."""
    ### BEGIN SOLUTION
    packed = packed.reshape(-1)
    if packed.numel() != -(-n // 2):
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} 4-bit codes (need {-(-n // 2)})")
    out = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return out[:n].long()
    ### END SOLUTION


# %% test id=test_pack_4bit points=2
_p = pack_4bit(torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8), pad=7)
assert _p.dtype == torch.uint8 and _p.tolist() == [0x12, 0xF0, 0x77], f"expected [0x12, 0xF0, 0x77], got {[hex(v) for v in _p.tolist()]}"
assert unpack_4bit(_p, 5).tolist() == [1, 2, 15, 0, 7], "unpack must invert pack"
_r = torch.randint(0, 16, (1001,), dtype=torch.uint8)
assert torch.equal(unpack_4bit(pack_4bit(_r), 1001), _r), "round trip failed on random codes"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("05.pack_4bit", pack_4bit)
check("05.unpack_4bit", unpack_4bit)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured: parity with bitsandbytes
#
# bitsandbytes' `quantize_4bit` returns the packed bytes and a `QuantState` (absmax, blocksize, shape, dtype,
# code). Below, the reference `lora_ref.quant` and bitsandbytes quantise the same weights (three dtypes, NF4
# and FP4): the bytes, the absmax and the dequantised values are compared exactly. Your own functions are
# compared too when they are implemented.
# %%
def your_packed(w, code_name):
    """Your functions end to end (None when they are not implemented yet)."""
    try:
        c = nf4_code() if code_name == "nf4" else quant.fp4_code()
        q, s = quantize_blockwise(w, c, 64)
        zero_code = int(quantize_blockwise(torch.zeros(1), c, 64)[0])
        return pack_4bit(q, pad=zero_code), s
    except NotImplementedError:
        return None

rows = []
for dtype in (torch.float32, torch.bfloat16, torch.float16) if bnbF else ():
    for code_name in ("nf4", "fp4"):
        w = (torch.randn(512, 192) * 0.02).to(dtype)
        packed_bnb, state_bnb = bnbF.quantize_4bit(w, blocksize=64, quant_type=code_name)
        packed_ref, state_ref = quant.quantize_4bit(w, blocksize=64, quant_type=code_name)
        deq_bnb = bnbF.dequantize_4bit(packed_bnb, state_bnb)
        deq_ref = quant.dequantize_4bit(packed_ref, state_ref)
        mine = your_packed(w, code_name)
        rows.append((str(dtype).split(".")[1], code_name,
                     torch.equal(packed_ref.flatten(), packed_bnb.flatten()),
                     torch.equal(state_ref.absmax, state_bnb.absmax),
                     torch.equal(deq_ref, deq_bnb),
                     "not yet" if mine is None else torch.equal(mine[0], packed_bnb.flatten())))
print(f"{'dtype':>9} {'code':>5} {'bytes==':>8} {'absmax==':>9} {'dequant==':>10} {'yours==':>8}")
for r in rows:
    print(f"{r[0]:>9} {r[1]:>5} {str(r[2]):>8} {str(r[3]):>9} {str(r[4]):>10} {str(r[5]):>8}")

# %% [markdown]
# ## 5. The error of NF4 vs FP4 vs int4, on N(0, 0.02) weights and on real SmolLM2 weights
#
# We measure the relative error of a round trip, $\lVert W - \hat W \rVert_F / \lVert W \rVert_F$, with
# block size 64. Four codebooks: NF4, bitsandbytes' FP4, the standard E2M1 of the OCP microscaling spec (the
# same float format with the usual subnormal 0.5 instead of bitsandbytes' 0.0625; both normalised by their
# largest value) and int4. First on synthetic weights drawn from $\mathcal N(0, 0.02^2)$ (the initialisation
# scale of many transformers; the anchor measurement for NF4 is 0.092).
# %%
def rel_error(w, code, blocksize=64):
    """||W - deq(q(W))||_F / ||W||_F for any 16-level code (numel a multiple of blocksize)."""
    blocks = w.detach().float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = quant.nearest_code_index((blocks * (1.0 / absmax.clamp(min=1e-38))).clamp(-1, 1), code)
    return ((code[idx] * absmax - blocks).norm() / blocks.norm()).item()

w_check = torch.randn(256, 64)
print("agrees with lora_ref.quant.quantization_error on NF4:",
      math.isclose(rel_error(w_check, quant.nf4_code()), quant.quantization_error(w_check, "nf4")["rel_error"],
                   rel_tol=1e-5))

g = torch.Generator().manual_seed(1)
w_normal = torch.randn(2048, 2048, generator=g) * 0.02
normal_err = {name: rel_error(w_normal, c) for name, c in codes.items()}
for name, e in normal_err.items():
    print(f"N(0, 0.02) 2048x2048, {name:>10}: relative error {e:.4f}")

# %% [markdown]
# ### Real weights: SmolLM2-135M-Instruct
#
# A caveat first: the course's SmolLM2 ships as a **Q4_1 GGUF** file (llama.cpp's format: blocks of 32
# values, each with a scale and a minimum, 4-bit codes). Its weights were already rounded to a 4-bit grid
# *before* we ever see them. Count the distinct values in each block of 32 consecutive weights: at most
# 16. So these are not the original bf16 weights; the comparison below is still fair between codebooks
# (each re-quantises the same matrices), but the absolute errors differ from those of an unquantised model.
# %%
from lora_ref.models import load_smollm2      # noqa: E402

smol, _tok = load_smollm2()
linears = {n: m for n, m in smol.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
w_q = linears["model.layers.0.self_attn.q_proj"].weight.detach()
distinct = torch.tensor([len(torch.unique(b)) for b in w_q.reshape(-1, 32)[:4096]])
print(f"{len(linears)} linear layers; q_proj of layer 0: {tuple(w_q.shape)}, std {w_q.std():.3f}")
print(f"distinct values per block of 32 (first 4096 blocks): max {distinct.max().item()}, "
      f"mean {distinct.float().mean():.1f}  -> the Q4_1 grid of the GGUF file")

# %%
layer_step = 3 if GRADING else 1            # grading: every third layer is enough to see the ordering
errors = {name: [] for name in codes}
peak = []                                    # mean over blocks of absmax / rms: how peaked a block is
names = [n for n in linears if int(n.split(".")[2]) % layer_step == 0]
for n in tqdm(names, desc="quantising SmolLM2 weights with 4 codebooks"):
    w = linears[n].weight.detach()
    blocks = w.reshape(-1, 64)
    peak.append((blocks.abs().amax(1) / blocks.pow(2).mean(1).sqrt()).mean().item())
    for name, c in codes.items():
        errors[name].append(rel_error(w, c))
errors = {k: torch.tensor(v) for k, v in errors.items()}
print(f"{'codebook':>10} {'mean rel. error':>16} {'median':>8} {'max':>8}   (over {len(names)} matrices)")
for k, v in sorted(errors.items(), key=lambda kv: kv[1].mean()):
    print(f"{k:>10} {v.mean():>16.4f} {v.median():>8.4f} {v.max():>8.4f}")
best = torch.stack(list(errors.values())).argmin(0)
print(f"NF4 has the smallest error on {(best == 0).float().mean() * 100:.0f}% of the matrices")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
w_show = linears["model.layers.10.mlp.up_proj"].weight.detach().flatten()
axes[0].hist(w_show.numpy(), bins=200, density=True, color="tab:blue", alpha=0.7)
sd = w_show.std().item()
xx = torch.linspace(-5 * sd, 5 * sd, 300)
axes[0].plot(xx, torch.exp(-xx ** 2 / (2 * sd ** 2)) / (sd * math.sqrt(2 * math.pi)), "k--", label="normal, same std")
axes[0].set_xlim(-5 * sd, 5 * sd); axes[0].set_title("layer 10 up_proj weights"); axes[0].legend(fontsize=8)
for k, v in errors.items():
    axes[1].hist(v.numpy(), bins=30, alpha=0.6, label=f"{k} (mean {v.mean():.3f})")
axes[1].set_xlabel("relative error per matrix"); axes[1].set_title("SmolLM2: round-trip error"); axes[1].legend()
labels = ["N(0,0.02)", "SmolLM2 (mean)"]
for i, k in enumerate(codes):
    axes[2].bar(np.arange(2) + 0.2 * (i - 1.5), [normal_err[k], errors[k].mean().item()], width=0.2, label=k)
axes[2].set_xticks(range(2), labels); axes[2].set_title("relative error, blocksize 64")
axes[2].set_ylim(0.08, None); axes[2].legend(fontsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# What the numbers say:
#
# * **NF4 has the smallest weight error** on both kinds of weights. (QLoRA's Table 2 ranks the same data
#   types by a different measurement: the mean Pile-CC perplexity of pretrained models, 125M to 13B
#   parameters, quantised *without* fine-tuning, Section 4: Int4 34.34, FP4 E2M1 31.07, NF4 + DQ 27.41.
#   Weight error is not perplexity: section 5b below measures the model.)
# * **FP4 vs int4 depends on which FP4.** The standard E2M1 levels beat int4 slightly, but bitsandbytes'
#   FP4 is *worse* than int4 on the weight error: its subnormal level sits at $\pm 1/192$, almost on top of
#   zero, so it wastes one of its 16 codes. The paper's ordering is on the perplexity of quantised models
#   (no fine-tuning), not on weight error; measure before you repeat "FP4 beats int4".
#
# Which matrices lose most? Not a matter of projection type, but of **how peaked each block is**: a block
# whose absmax is large compared with its typical value (its root mean square) squeezes its other values
# onto few levels. For Gaussian blocks of 64, absmax / rms is about 2.6 on average.
# %%
g_blocks = torch.randn(20000, 64, generator=torch.Generator().manual_seed(3))
gauss_peak = (g_blocks.abs().amax(1) / g_blocks.pow(2).mean(1).sqrt()).mean().item()
corr = np.corrcoef(peak, errors["NF4"].numpy())[0, 1]
plt.figure(figsize=(6, 3.6))
plt.scatter(peak, errors["NF4"].numpy(), s=12)
plt.axvline(gauss_peak, color="gray", ls=":", label=f"Gaussian blocks: {gauss_peak:.2f}")
plt.xlabel("mean block absmax / rms"); plt.ylabel("NF4 relative error")
plt.title(f"SmolLM2 matrices: correlation {corr:.2f}"); plt.legend(); plt.tight_layout(); plt.show()
print(f"correlation between block peakedness and NF4 error over {len(peak)} matrices: {corr:.2f}")

# %% [markdown]
# ### 5b. What the error does to the model: held-out loss, on SmolLM2 and on weights that were never 4-bit
#
# Weight error is a proxy; the model's loss is what matters. `benchmarks/quality_quant.py` quantised every
# linear layer of SmolLM2 except the head with each data type (blocksize 64, fp32 compute, **no
# fine-tuning**: the setting of QLoRA's Table 2) and measured the held-out answer loss on
# {{result:quality_quant_cpu.json:model_examples}} course questions. That takes half an hour of CPU, so the cell reads the committed
# result, and, from `benchmarks/quality_quant_fresh.py`, the same measurement on a scaled-down Llama trained
# from scratch on the course data, whose weights were never on a 4-bit grid:
# %%
from lora_ref.results import load_result      # noqa: E402

TYPES = ("nf4+dq", "nf4", "fp4", "int4")
smol_q = load_result("quality_quant_cpu.json")
if smol_q is not None:
    print(f"SmolLM2 (Q4_1 origin), {smol_q['model_examples']} held-out questions, {smol_q['info']['date']}:")
    print(f"  {'':8s} {'held-out loss':>13s} {'weight error':>12s}")
    print(f"  {'fp32':8s} {smol_q['model']['fp32']['heldout_loss']:13.4f}")
    for t in TYPES:
        print(f"  {t:8s} {smol_q['model'][t]['heldout_loss']:13.4f} {smol_q['smollm2']['weight_error'][t]['all']:12.4f}")
fresh = load_result("quality_quant_fresh_cpu.json")
if fresh is not None:
    print(f"\nA {fresh['runs'][0]['params']:,}-parameter Llama trained from scratch ({fresh['steps']} steps); "
          f"weights on a 4-bit grid: {max(r['q4_1_grid_fraction'] for r in fresh['runs']):.1%}; held-out loss by seed:")
    print(f"  {'seed':>4s} {'fp32':>8s} " + " ".join(f"{t:>8s}" for t in TYPES) + "   lowest first")
    for r in fresh["runs"]:
        h = r["heldout_loss"]
        print(f"  {r['seed']:>4d} {h['fp32']:8.4f} " + " ".join(f"{h[t]:8.4f}" for t in TYPES) + "   "
              + " < ".join(r["order_by_loss"]))
    print("  mean weight error: " + ", ".join(f"{t} {v:.4f}" for t, v in fresh["summary"]["mean_weight_error"].items()))

# %% [markdown]
# On SmolLM2 the loss ranks the types differently from the weight error: FP4
# {{result:quality_quant_cpu.json:model.fp4.heldout_loss:.3f}} < NF4 + DQ {{result:quality_quant_cpu.json:model.nf4+dq.heldout_loss:.3f}} = NF4
# {{result:quality_quant_cpu.json:model.nf4.heldout_loss:.3f}} < int4 {{result:quality_quant_cpu.json:model.int4.heldout_loss:.3f}} (fp32:
# {{result:quality_quant_cpu.json:model.fp32.heldout_loss:.3f}}), although NF4 has the smallest weight error. That is no evidence
# that FP4 is the better type: SmolLM2's weights come from a Q4_1 file and already sit on a 4-bit grid
# ({{result:quality_quant_cpu.json:smollm2.q4_1_grid_fraction:.0%}} of its groups of 32, measured above), so this measures *re-quantising*
# 4-bit weights, where which codebook happens to land near the old grid points can matter more than how
# well it fits a normal distribution; and a smaller squared weight error need not mean a smaller loss (the
# errors that matter are those along the directions the next layer reads).
#
# On the Llama trained from scratch (weights never on a 4-bit grid) the weight errors order as on Gaussian
# weights, NF4 {{result:quality_quant_fresh_cpu.json:summary.mean_weight_error.nf4:.3f}} < int4 {{result:quality_quant_fresh_cpu.json:summary.mean_weight_error.int4:.3f}} <
# FP4 {{result:quality_quant_fresh_cpu.json:summary.mean_weight_error.fp4:.3f}}, but the held-out loss does not separate the types:
# quantising adds {{result:quality_quant_fresh_cpu.json:summary.mean_loss_increase.nf4:.4f}} (NF4), {{result:quality_quant_fresh_cpu.json:summary.mean_loss_increase.fp4:.4f}}
# (FP4) and {{result:quality_quant_fresh_cpu.json:summary.mean_loss_increase.int4:.4f}} (int4) to the fp32 loss on average over
# {{result:quality_quant_fresh_cpu.json:runs.@len}} seeds, and the order changes from seed to seed (lowest loss:
# {{result:quality_quant_fresh_cpu.json:runs.0.order_by_loss.0}}, {{result:quality_quant_fresh_cpu.json:runs.1.order_by_loss.0}}, {{result:quality_quant_fresh_cpu.json:runs.2.order_by_loss.0}}; highest:
# {{result:quality_quant_fresh_cpu.json:runs.0.order_by_loss.3}}, {{result:quality_quant_fresh_cpu.json:runs.1.order_by_loss.3}}, {{result:quality_quant_fresh_cpu.json:runs.2.order_by_loss.3}}).
# What these runs support: NF4 has the smallest weight error on weights that are close to normal. What they
# cannot settle: which 4-bit type gives the best *model* at this scale. The differences between types are
# smaller than the differences between seeds, and neither a 135M model re-quantised from Q4_1 nor an
# {{result:quality_quant_fresh_cpu.json:runs.0.params:,d}}-parameter model trained for minutes is the experiment behind QLoRA's Table 2 (perplexity of
# pretrained 125M-13B models); the course quotes that table as the paper's measurement, not as something
# reproduced here.
#
# ## 6. Double quantisation: quantising the quantisation constants
#
# With block size 64, each block stores one float32 absmax: $32/64 = 0.5$ extra bits per parameter, so
# 4.5 bits in all. QLoRA's **double quantisation** (Section 3) quantises the absmax values themselves:
# subtract their mean, then quantise them blockwise with an 8-bit code (block size 256), keeping one float32
# scale per 256 absmax values (and the mean):
#
# $$ \text{bits per parameter} = 4 + \frac{8}{64} + \frac{32}{64 \cdot 256} = 4.127 \quad (\text{vs } 4 + \tfrac{32}{64} = 4.5). $$
#
# For a 7B model that is $7\cdot10^9 \cdot 0.373 / 8 \approx 0.33$ GB saved. Write the accounting as a
# function (ignore the single float32 mean: it is one number per tensor).
# %% answer id=bits_per_parameter
def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256,
                       bits: int = 4, absmax_bits: int = 32, dq_bits: int = 8) -> float:
    """Storage bits per weight of blockwise quantisation (QLoRA, Section 3, "Double Quantization").

    plain:        bits + absmax_bits / blocksize
    double quant: bits + dq_bits / blocksize + absmax_bits / (blocksize * dq_blocksize)
    """
    ### BEGIN SOLUTION
    for name, value in (("blocksize", blocksize), ("dq_blocksize", dq_blocksize)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not double_quant:
        return bits + absmax_bits / blocksize
    return bits + dq_bits / blocksize + absmax_bits / (blocksize * dq_blocksize)
    ### END SOLUTION


# %% test id=test_bits_per_parameter points=2
assert abs(bits_per_parameter(double_quant=False) - 4.5) < 1e-12, f"4 bits + 32/64 = 4.5, got {bits_per_parameter(double_quant=False)}"
assert abs(bits_per_parameter(double_quant=True) - 4.126953125) < 1e-12, f"expected 4 + 8/64 + 32/16384 = 4.12695, got {bits_per_parameter(double_quant=True)}"
assert abs(bits_per_parameter(blocksize=128, double_quant=False) - 4.25) < 1e-12, "blocksize 128: 4 + 32/128 = 4.25"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("05.bits_per_parameter", bits_per_parameter)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured: the bytes of a real quantised weight, and what double quantisation costs in error
#
# The formula is only a claim until we count bytes. Below, one SmolLM2 MLP weight is quantised with and
# without double quantisation by `lora_ref.quant` and by bitsandbytes; we add up the bytes of every tensor
# in the state and divide by the number of weights.
# %%
w = linears["model.layers.5.mlp.gate_proj"].weight.detach()
print(f"weight {tuple(w.shape)}: {w.numel():,} values")
for dq in (False, True):
    packed, state = quant.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=dq)
    measured = quant.quantized_nbytes(packed, state) * 8 / w.numel()
    err = ((quant.dequantize_4bit(packed, state) - w).norm() / w.norm()).item()
    diff = float("nan")
    if bnbF:
        bp, bs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        diff = (quant.dequantize_4bit(packed, state) - bnbF.dequantize_4bit(bp, bs)).abs().max().item()
    try:
        formula = f"{bits_per_parameter(double_quant=dq):.4f}"
    except NotImplementedError:
        formula = "(your bits_per_parameter: not yet)"
    print(f"double quant {str(dq):>5}: {measured:.4f} bits/param measured, {formula} by your formula, "
          f"relative error {err:.5f}, max |difference| from bitsandbytes {diff:.2g}")

# %% [markdown]
# Double quantisation saves 0.37 bits per weight for a small extra error (the absmax values lose a little
# precision). QLoRA's Section 4 reports that double quantisation reduces the memory footprint without
# degrading performance (Figure 3 compares NF4 with and without it by zero-shot accuracy); on SmolLM2's
# held-out loss it changes the fourth decimal (section 5b).
#
# ## 7. Find and fix the bugs: the article's `QLoRALinear`
#
# Here is the seed article's class, unchanged except for the name. Run it and read its symptoms.
# %%
class ArticleQLoRALinear(nn.Module):
    """QLoRA combines 4-bit NF4 quantisation with LoRA (the seed article's code, verbatim)."""
    def __init__(self, in_features, out_features, rank=16, alpha=16.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.base_weight_4bit = None
        self.weight_scales = None
        self.lora_A = nn.Parameter(torch.randn(in_features, rank) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(rank, out_features))
        self.scaling = alpha / rank

    def quantize_weight(self, weight: torch.Tensor):
        nf4_values = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844,
                                   -0.1848, -0.0911, 0.0, 0.0911, 0.1848,
                                   0.2844, 0.3949, 0.5251, 0.6962, 1.0, float('inf')])
        block_size = 64
        weight_flat = weight.view(-1)
        quantized_blocks = []
        scale_blocks = []
        for i in range(0, weight_flat.numel(), block_size):
            block = weight_flat[i:i + block_size]
            scale = block.abs().max() / 7
            scale_blocks.append(scale)
            normalized = block / scale
            quantized = torch.searchsorted(nf4_values, normalized)
            quantized = torch.clamp(quantized, 0, 15)
            quantized_blocks.append(quantized)
        self.base_weight_4bit = torch.cat(quantized_blocks)
        self.weight_scales = torch.stack(scale_blocks)

    def dequantize_weight(self):
        nf4_values = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844,
                                   -0.1848, -0.0911, 0.0, 0.0911, 0.1848,
                                   0.2844, 0.3949, 0.5251, 0.6962, 1.0, float('inf')])
        block_size = 64
        dequantized_blocks = []
        for i, scale in enumerate(self.weight_scales):
            start = i * block_size
            end = min(start + block_size, self.base_weight_4bit.numel())
            quantized_block = self.base_weight_4bit[start:end]
            dequantized_vals = nf4_values[quantized_block]
            dequantized_blocks.append(dequantized_vals * scale)
        dequantized = torch.cat(dequantized_blocks)
        return dequantized.view(self.in_features, self.out_features)

    def forward(self, x):
        base_weight = self.dequantize_weight()
        base_output = F.linear(x, base_weight.T)
        lora_output = (x @ self.lora_A @ self.lora_B) * self.scaling
        return base_output + lora_output


# %%
torch.manual_seed(0)
base = nn.Linear(576, 192, bias=False)                     # an nn.Linear weight is (out, in) = (192, 576)
nn.init.normal_(base.weight, std=0.02)
art = ArticleQLoRALinear(576, 192)
t0 = time.perf_counter(); art.quantize_weight(base.weight.detach()); t_q = time.perf_counter() - t0
t0 = time.perf_counter(); w_art = art.dequantize_weight(); t_d = time.perf_counter() - t0
x = torch.randn(4, 576)
print(f"stored codes: dtype {art.base_weight_4bit.dtype}, {art.base_weight_4bit.element_size() * 8} bits per weight "
      f"(the point was 4)")
print(f"inf in the dequantised weight: {(~torch.isfinite(w_art)).float().mean() * 100:.1f}% of the values")
print(f"outputs finite: {torch.isfinite(art(x)).all().item()}")
print(f"per-block Python loop: quantise {t_q * 1e3:.0f} ms, dequantise {t_d * 1e3:.0f} ms for {base.weight.numel():,} "
      "values (and the dequantise runs on every forward)")
print(f"lora_A: shape {tuple(art.lora_A.shape)} (PEFT stores (r, in)); std {art.lora_A.std():.4f} vs "
      f"kaiming_uniform(a=sqrt(5)) std {1 / math.sqrt(3 * 576):.4f}")

# %% [markdown]
# Now measure what each bug costs. The cell below re-implements the article's quantiser (vectorised, same
# logic) with switches, and fixes one bug at a time on N(0, 0.02) weights.
# %%
def article_like(w, table, divisor, rounding):
    """The article's per-block logic, vectorised: scale = absmax / divisor, searchsorted or nearest."""
    blocks = w.reshape(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True) / divisor
    v = blocks / scale
    if rounding == "searchsorted":
        idx = torch.searchsorted(table, v.contiguous()).clamp(0, 15)
    else:
        idx = (v[..., None] - table).abs().argmin(-1)
    return (table[idx] * scale).reshape(w.shape)

steps = [("article as written", ARTICLE, 7, "searchsorted"),
         ("+ real NF4 table (no inf)", REF_NF4, 7, "searchsorted"),
         ("+ scale = absmax (not /7)", REF_NF4, 1, "searchsorted"),
         ("+ nearest rounding (not searchsorted)", REF_NF4, 1, "nearest")]
w_demo = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
ledger = []
for label, table, div, rnd in steps:
    w_hat = article_like(w_demo, table, div, rnd)
    err = ((w_hat - w_demo).norm() / w_demo.norm()).item()
    bias = (w_hat - w_demo).mean().item() / w_demo.std().item()
    ledger.append((label, err, bias))
    print(f"{label:<40} relative error {err:>8.4f}   mean error {bias:+.4f} sd")
print(f"reference (lora_ref, bitsandbytes-exact):   relative error {rel_error(w_demo, REF_NF4):.4f}")

# %% [markdown]
# The full list of bugs (the first five change the numbers above or crash; the rest cost memory, speed or
# interoperability):
#
# 1. **`inf` in the table**, and a symmetric table without 0.0796 (Section 2 above).
# 2. **`scale = absmax / 7`**: that is int4's scale. NF4 levels live in $[-1, 1]$, so the scale must be the
#    absmax itself; with /7 most normalised values exceed 1 and saturate (or hit `inf`).
# 3. **`searchsorted` is not rounding**: it returns the first level $\ge v$, so every value rounds *up*
#    (a systematic positive bias, printed above). Use nearest-level rounding (midpoints + bucketize).
# 4. **`view(in_features, out_features)` then `.T`**: an `nn.Linear` weight is (out, in). Viewing the
#    flattened (out, in) array as (in, out) scrambles it; it is not a transpose. Keep (out, in) and call
#    `F.linear(x, W)`.
# 5. **Codes stored as int64** (`searchsorted`'s output): 64 bits per weight, 2x fp32's 32, 4x fp16's 16
#    and 16x the promised 4. Pack two codes per byte.
# 6. **A Python loop over blocks**, in quantise *and* in the dequantise that runs on every forward pass
#    (the anchor: about 22 s for one 11008 x 4096 weight on a CPU). Vectorise.
# 7. **Dequantises to fp32 whatever the input dtype**: with bf16 activations `F.linear` fails on the dtype
#    mismatch; the dequantised weight must be in the compute dtype of `x`.
# 8. **The codebook is rebuilt on every call, on the CPU**: on a GPU, indexing a CPU table with CUDA codes
#    fails. Keep the code as a buffer so that `.to(device)` moves it.
# 9. **`lora_A` is (in, r) `randn * 0.01`, `lora_B` is (r, out)**: the reference implementations (and PEFT's
#    file format) use A (r, in) with kaiming_uniform(a=sqrt(5)) and B (out, r) zeros.
# 10. **Forward before `quantize_weight`** fails deep inside with a `NoneType` error; raise a clear error.
# 11. **An all-zero block** divides by zero: $s = 0$, $0/0$ = NaN, `searchsorted` sends NaN past the end of
#     the table (code 15 after the clamp, the `inf` level), and $\infty \cdot 0$ dequantises to NaN: one
#     pruned or padded block of 64 zeros turns into 64 NaNs, which then spread through every output
#     (measured below; bitsandbytes guards with `max(s, 1e-38)`).
# 12. **No dropout** on the LoRA branch: the class has no `lora_dropout`, so the QLoRA recipe's regulariser
#     (dropout 0.1 on the adapter input for models up to 13B, 0.05 for 33B and 65B: QLoRA Appendix B) cannot
#     be set (measured below: two training-mode forward passes give identical outputs).
#
# (One more, fixed in notebook 06: `F.linear` saves the dequantised 16/32-bit weight for backward, so the
# memory the 4-bit storage saved comes back during training. A custom `autograd.Function` fixes it.)
#
# Bugs 11 and 12, measured on the article's class:
# %%
from lora_ref.lora import LoRALinear          # noqa: E402

w_zero = base.weight.detach().clone()
w_zero[0, :64] = 0.0                          # one block of 64 zeros (a pruned or padded stretch)
art_z = ArticleQLoRALinear(576, 192)
art_z.quantize_weight(w_zero)
w_back = art_z.dequantize_weight()
x_z = torch.randn(4, 576)
print(f"bug 11: one all-zero block -> scale {art_z.weight_scales[0].item()}, codes {art_z.base_weight_4bit[:3].tolist()}..., "
      f"{torch.isnan(w_back).sum().item()} NaN values in the dequantised weight; outputs with NaN: "
      f"{torch.isnan(art_z(x_z)).any(dim=0).sum().item()} of {art_z(x_z).shape[1]} features")
art_d = ArticleQLoRALinear(576, 192)          # a fresh one, without the zero block
art_d.quantize_weight(base.weight.detach())
with torch.no_grad():
    art_d.lora_B.normal_(std=0.02)            # a trained-looking B, so the adapter branch is not zero
art_d.train()
x_d = torch.randn(4, 576)
ref_layer = LoRALinear(nn.Linear(576, 192, bias=False), r=16, alpha=16.0, dropout=0.1)
with torch.no_grad():
    ref_layer.lora_B.normal_(std=0.02)
ref_layer.train()
same = torch.allclose(art_d(x_d), art_d(x_d), rtol=0, atol=0, equal_nan=True)   # its inf level (bug 1) gives NaN/inf
print(f"bug 12: article's layer in train mode, two forwards identical: {same} "
      f"(no dropout to set); lora_ref.lora.LoRALinear(dropout=0.1): identical: "
      f"{torch.equal(ref_layer(x_d), ref_layer(x_d))}")

# %% [markdown]
# ### Your turn: write the fixed class
#
# Keep the article's public interface so it is recognisably the same class, with these exact names:
#
# * `QLoRALinear(in_features, out_features, rank=16, alpha=16.0, blocksize=64)`;
#   `lora_A` (rank, in_features) `nn.Parameter`, `nn.init.kaiming_uniform_(a=math.sqrt(5))`;
#   `lora_B` (out_features, rank) zeros; `scaling = alpha / rank`;
# * `quantize_weight(weight)`: `weight` is an `nn.Linear` weight, (out_features, in_features); called once;
#   stores `self.weight_4bit` (packed uint8, `(out*in + 1) // 2` bytes, bitsandbytes' nibble order, NF4
#   codes from your `quantize_blockwise`) and `self.absmax` (float32, one per block) as **buffers**, and the
#   NF4 table as a buffer `self.code`; no float copy of the weight may be kept;
# * `dequantize_weight(dtype=torch.float32)`: the (out_features, in_features) weight in `dtype`, vectorised;
# * `forward(x)`: `F.linear(x, W)` with `W` dequantised in `x.dtype`, plus
#   `scaling * (x @ A^T @ B^T)`; output dtype = `x.dtype`; raise `RuntimeError` if no weight was quantised.
# %% answer id=qlora_linear
class QLoRALinear(nn.Module):
    """A frozen NF4 weight (blockwise absmax, packed 2 per byte) plus a trainable LoRA branch.

    y = x W_nf4^T + (alpha / r) * x A^T B^T, with W_nf4 (out, in) dequantised in x's dtype,
    A (r, in) kaiming-uniform, B (out, r) zeros (LoRA Section 4.1; QLoRA Section 3).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 16, alpha: float = 16.0,
                 blocksize: int = 64):
        super().__init__()
        ### BEGIN SOLUTION
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.blocksize = rank, alpha, blocksize
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("code", nf4_code())
        self.register_buffer("weight_4bit", None)
        self.register_buffer("absmax", None)
        ### END SOLUTION

    @torch.no_grad()
    def quantize_weight(self, weight: torch.Tensor) -> None:
        """Quantise an (out, in) weight once: buffers weight_4bit (packed uint8) and absmax (float32)."""
        ### BEGIN SOLUTION
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be (out, in) = {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        codes, absmax = quantize_blockwise(weight.detach(), self.code, self.blocksize)
        zero_code = int(torch.argmin(self.code.abs()))
        self.weight_4bit = pack_4bit(codes, pad=zero_code).to(weight.device)
        self.absmax = absmax.to(weight.device)
        ### END SOLUTION

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in ``dtype``, vectorised; RuntimeError before quantize_weight."""
        ### BEGIN SOLUTION
        if self.weight_4bit is None:
            raise RuntimeError("no weight quantised yet: call quantize_weight(weight) first")
        n = self.out_features * self.in_features
        codes = unpack_4bit(self.weight_4bit, n)
        return dequantize_blockwise(codes, self.absmax, self.code, (self.out_features, self.in_features),
                                    self.blocksize, dtype)
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, W dequantised in x.dtype) + scaling * x A^T B^T, in x.dtype."""
        ### BEGIN SOLUTION
        base = F.linear(x, self.dequantize_weight(x.dtype))
        lora = (x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T
        return base + self.scaling * lora
        ### END SOLUTION


# %% test id=test_qlora_linear points=5
torch.manual_seed(0)
_lin = nn.Linear(128, 48, bias=False)
_layer = QLoRALinear(128, 48, rank=4, alpha=8.0)
assert tuple(_layer.lora_A.shape) == (4, 128) and tuple(_layer.lora_B.shape) == (48, 4), \
    f"A must be (r, in) = (4, 128) and B (out, r) = (48, 4); got {tuple(_layer.lora_A.shape)}, {tuple(_layer.lora_B.shape)}"
assert torch.all(_layer.lora_B == 0), "B starts at zero, so the adapter starts as a no-op"
assert _layer.lora_A.abs().max() <= 1 / math.sqrt(128) + 1e-6 and _layer.lora_A.std() > 0.03, \
    "A uses kaiming_uniform_(a=sqrt(5)): uniform in [-1/sqrt(in), 1/sqrt(in)]"
try:
    _layer(torch.randn(2, 128))
    raise AssertionError("forward before quantize_weight must raise RuntimeError")
except RuntimeError as e:
    assert "quantize_weight" in str(e) or "quantis" in str(e) or "quantiz" in str(e), e
_layer.quantize_weight(_lin.weight.detach())
_buffers = dict(_layer.named_buffers())
assert {"weight_4bit", "absmax", "code"} <= set(_buffers), f"buffers should include weight_4bit, absmax, code; got {sorted(_buffers)}"
assert _layer.weight_4bit.dtype == torch.uint8 and _layer.weight_4bit.numel() == 48 * 128 // 2, \
    f"two codes per byte: expected {48 * 128 // 2} uint8 values, got {_layer.weight_4bit.numel()} {_layer.weight_4bit.dtype}"
assert all(t.numel() < 48 * 128 for t in _buffers.values() if t.is_floating_point()), "no float copy of the weight may be kept"
_w = _layer.dequantize_weight()
assert _w.shape == (48, 128), f"dequantised weight is (out, in) = (48, 128), got {tuple(_w.shape)}"
_rel = ((_w - _lin.weight).norm() / _lin.weight.norm()).item()
assert _rel < 0.12, f"NF4 round trip of a kaiming-uniform weight should be ~0.1 relative error, got {_rel:.3f}"
_x = torch.randn(3, 5, 128)
assert torch.allclose(_layer(_x), _x @ _w.T, atol=1e-5), "with B = 0 the output is x @ W_nf4^T"
assert _layer(_x.bfloat16()).dtype == torch.bfloat16, "bf16 in, bf16 out: dequantise in the compute dtype"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("05.qlora_linear", QLoRALinear)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured: the fixed class against the article's
#
# Same weight, same input: quantisation error, storage and time per forward pass (CPU or GPU).
# %%
import copy                                   # noqa: E402


def bench(fn, repeat=5):
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat

w_big = linears["model.layers.3.mlp.down_proj"].weight.detach()        # (576, 1536)
out_f, in_f = w_big.shape
art = ArticleQLoRALinear(in_f, out_f)
art.quantize_weight(w_big.t().contiguous())   # the article only works if handed W^T: give it that chance
try:
    fixed = QLoRALinear(in_f, out_f)
    fixed.quantize_weight(w_big)
except (NotImplementedError, NameError):
    fixed = None
    print("(your QLoRALinear is not implemented yet: only the article's version is measured)")
xb = torch.randn(8, in_f)
rows = [("article", art, (art.base_weight_4bit.numel() * art.base_weight_4bit.element_size()
                          + art.weight_scales.numel() * 4), torch.device("cpu"))]   # its CPU table fails on a GPU
if fixed is not None:
    rows.append(("fixed", fixed, sum(b.numel() * b.element_size() for b in fixed.buffers()), torch.device("cpu")))
    if DEVICE.type == "cuda":
        rows.append(("fixed", copy.deepcopy(fixed).to(DEVICE), rows[-1][2], DEVICE))
for label, layer, nbytes, dev in rows:
    x_dev = xb.to(dev)
    t = bench(lambda: layer(x_dev), repeat=3)
    with torch.no_grad():
        w_hat = layer.dequantize_weight().cpu()
        w_hat = w_hat.t() if label == "article" else w_hat
        err = ((w_hat - w_big).norm() / w_big.norm()).item()
    print(f"{label:>8} on {dev.type}: relative error {err:.4f}, storage {nbytes * 8 / w_big.numel():6.2f} bits/weight, "
          f"forward {t * 1e3:8.2f} ms")

# %% [markdown]
# The same comparison at full size, committed from an NVIDIA H200 run of `benchmarks/dequant_speed.py`
# (the 11008 x 4096 MLP weight of a 7B model: the article's loop extrapolated on a CPU, lora_ref's
# vectorised quantiser, and dequantisation speed against bitsandbytes):
# %%
import glob                                    # noqa: E402
import json                                    # noqa: E402
from pathlib import Path                       # noqa: E402

from lora_ref.results import results_dir       # noqa: E402

results_dir = results_dir()
found = sorted(glob.glob(str(results_dir / "dequant_speed_*.json")))
if not found:
    print(f"no dequant_speed results in {results_dir} yet (benchmarks/dequant_speed.py writes them on a GPU)")
for path in found:
    res = json.loads(Path(path).read_text())
    info, loop = res.get("info", {}), res.get("seed_loop", {})
    print(f"{Path(path).name}: {info.get('gpu')}, {info.get('date')}, torch {info.get('torch')}, "
          f"bitsandbytes {info.get('bitsandbytes')}")
    if loop:
        print(f"  article's per-block loop, extrapolated: {loop['seed_extrapolated_s']:.1f} s;  lora_ref vectorised: "
              f"{loop['lora_ref_cpu_s']:.2f} s on the CPU ({loop['speedup_cpu']:.0f}x), "
              f"{loop['lora_ref_gpu_s'] * 1e3:.1f} ms on the GPU ({loop['speedup_gpu']:,.0f}x)")
    for name, r in res.get("speed", {}).get("rows", {}).items():
        if name.startswith(("tiled_", "flat_")):      # the kernel-tuning sweep: see benchmarks/README.md
            continue
        print(f"  {name:>28}: {r['median_ms']:7.3f} ms" + (f", {r['GBps']:6.0f} GB/s" if "GBps" in r else ""))

# %% [markdown]
# ## Interview practice
#
# Say or write each answer first, then open the model answer.
#
# **Q1 (the article's Q3).** What are the three innovations of QLoRA? How does 4-bit quantisation preserve
# training accuracy?
#
# <details><summary>Model answer</summary>
#
# NF4 (a 4-bit data type whose levels are quantiles of N(0,1), so normally distributed weights use all 16
# levels evenly; asymmetric with an exact zero), double quantisation (the per-block absmax constants are
# quantised to 8 bits with a second level of blocks: 4.5 -> 4.127 bits per weight), and paged optimizers
# (optimizer state in unified memory that pages to the CPU during memory spikes). Accuracy is preserved
# because the 4-bit weights are frozen and only used for the forward/backward computation: they are
# dequantised to bf16 for every matmul, gradients flow through them in 16-bit into LoRA adapters kept in 16/32
# bit, and the adapters (on all linear layers) learn to compensate. The paper measures NF4+DQ matching 16-bit
# full fine-tuning and 16-bit LoRA on its benchmarks (Tables 3-4), and, before any fine-tuning, lower
# perplexity of the quantised pretrained models than FP4 and int4 (Table 2: 27.41 vs 31.07 vs 34.34).
# </details>
#
# **Q2.** Why is the NF4 table asymmetric, and why does it not end in infinity?
#
# <details><summary>Model answer</summary>
#
# 16 levels with an exact zero cannot be symmetric (that needs an odd count); zero must be exact so padding
# and zero weights stay zero. NF4 takes 8 quantiles on the positive side and 7 on the negative side plus 0.
# The quantiles stop at probability 0.9677 (the mean of 1 - 1/30 and 1 - 1/32) because Phi^-1(1) is infinite;
# after normalising by the maximum the table spans exactly [-1, 1].
# </details>
#
# **Q3.** Memory of the frozen weights of a 7B model in bf16, in NF4, and in NF4 with double quantisation?
#
# <details><summary>Model answer</summary>
#
# 7e9 x 16 bits = 14.0 GB; x 4.5 bits = 3.94 GB; x 4.127 bits = 3.61 GB (decimal GB). Check it with
# `bits_per_parameter` above. A real 7B model is not all linear layers: Llama-2-7B's 6.48B projection
# weights take 3.34 GB in NF4 + DQ, and its embeddings, head and norms (262M values) stay 16-bit, 0.52 GB:
# about 3.9 GB. The anchor's Llama-2-7B QLoRA run holds 4.40 GB because PEFT's
# `prepare_model_for_kbit_training` casts every parameter that is not 4-bit to fp32, which doubles those
# 0.52 GB (the cell below counts it).
# </details>
# %%
from lora_ref import memory as M              # noqa: E402

pb7 = M.param_breakdown("llama-2-7b")
nf4_7b = M.get_shape("llama-2-7b").n_layers * sum(M.quantized_linear_bytes(o * i) for o, i in M.linear_shapes("llama-2-7b").values())
rest7 = pb7.total - pb7.linear                # embeddings + lm_head + norms: not quantised
print(f"Llama-2-7B: {pb7.linear / 1e9:.2f}B projection weights in NF4 + DQ = {nf4_7b / 1e9:.2f} GB; "
      f"{rest7 / 1e6:.0f}M other weights = {2 * rest7 / 1e9:.2f} GB in bf16")
print(f"as loaded: {(nf4_7b + 2 * rest7) / 1e9:.2f} GB; after prepare_model_for_kbit_training (fp32 for all "
      f"but the 4-bit weights): {(nf4_7b + 4 * rest7) / 1e9:.2f} GB")

# %% [markdown]
#
# **Q4.** A colleague's 4-bit layer gives `inf` outputs on some layers only. What do you check first?
#
# <details><summary>Model answer</summary>
#
# The codebook (a level at infinity, as in the article's table), the scale (absmax vs absmax/7: values
# outside [-1, 1] after normalisation), all-zero blocks (0/0), and the dtype of the dequantised weight
# (fp16 overflow above 65504). Each is one line of measurement: count non-finite values after a round trip.
# </details>
