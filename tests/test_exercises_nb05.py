"""Notebook 05's graded exercises: the references match lora_ref.quant and bitsandbytes, the notebook's own
solutions pass every hidden case, and the article's bugs are caught (so the hidden tests can fail)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_ref import qlora, quant
from lora_ref.exercises import check, get
from lora_ref.exercises import nb05

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def answers(stem: str) -> dict:
    """Execute the answer cells of course_src/<stem>.py alone, as the autograder replays them."""
    import build_notebooks
    nb = build_notebooks.parse((ROOT / "course_src" / f"{stem}.py").read_text(), stem)
    ns = {"torch": torch, "nn": nn, "F": F, "math": math, "np": np}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and not meta.get("grade") and cell.cell_type == "code":
            exec(compile(cell.source, f"<{stem}:{meta['grade_id']}>", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def nb():
    return answers("05_nf4_quantisation")


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_steps_equal_quantize_4bit(qtype, dtype):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(77, 130, generator=g) * 0.3).to(dtype)           # odd count, ragged last block
    packed, state = quant.quantize_4bit(w, 64, qtype)
    code = quant.get_code(qtype)
    codes, absmax = quant.quantize_blockwise(w, code, 64)
    zero = int(quant.quantize_blockwise(torch.zeros(1), code, 64)[0][0])
    assert torch.equal(quant.pack_4bit(codes, zero), packed.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    deq = quant.dequantize_blockwise(codes, absmax, code, w.shape, 64, dtype)
    assert torch.equal(deq, quant.dequantize_4bit(packed, state))
    assert torch.equal(quant.unpack_4bit(packed, w.numel()), codes.long())


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_reference_steps_equal_bitsandbytes(qtype):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 128) * 0.02
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=qtype)
    codes, absmax = quant.quantize_blockwise(w, quant.get_code(qtype), 64)
    assert torch.equal(quant.pack_4bit(codes), packed.reshape(-1))
    assert torch.equal(absmax, state.absmax)


def _codes_by(x, code, blocksize, divide):
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38)
    scaled = (blocks / absmax if divide else blocks * (1.0 / absmax)).clamp(-1, 1).reshape(-1)[:n]
    return quant.nearest_code_index(scaled, code)


def test_hidden_cases_have_no_rounding_ties():
    """A value one ulp from a midpoint would make x/absmax and x*(1/absmax) (and bitsandbytes' tail
    division) round differently; the deterministic hidden cases contain none, so every correct variant
    passes and only real mistakes fail."""
    ex = get("05.quantize_blockwise")
    for case in ex.cases():
        x = nb05._tensor(case)
        code = quant.get_code(case["quant_type"])
        ref = quant.quantize_blockwise(x, code, case["blocksize"])[0].long()
        assert torch.equal(ref, _codes_by(x, code, case["blocksize"], divide=True)), case
        packed, _ = quant.quantize_4bit(x, case["blocksize"], case["quant_type"])
        assert torch.equal(ref, quant.unpack_4bit(packed, x.numel())), case


def test_reference_layer_matches_quant_and_learns_only_adapters():
    torch.manual_seed(0)
    layer = qlora.StandaloneQLoRALinear(128, 64, rank=4, alpha=8)
    w = torch.randn(64, 128) * 0.02
    layer.quantize_weight(w)
    packed, state = quant.quantize_4bit(w, 64, "nf4")
    assert torch.equal(layer.dequantize_weight(), quant.dequantize_4bit(packed, state))
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), x @ quant.dequantize_4bit(packed, state).T, atol=1e-6)   # B = 0
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="quantize_weight"):
        qlora.StandaloneQLoRALinear(8, 8, rank=2)(torch.randn(1, 8))


@pytest.mark.parametrize("exercise", ["05.nf4_code", "05.quantize_blockwise", "05.dequantize_blockwise",
                                      "05.pack_4bit", "05.unpack_4bit", "05.bits_per_parameter",
                                      "05.qlora_linear"])
def test_notebook_solution_passes_hidden_tests(nb, exercise):
    check(exercise, nb[get(exercise).symbol])


# ---- the hidden tests fail on the article's mistakes ---------------------------------------------------

def test_article_table_fails(nb):
    def article_like(offset=0.9677083):              # symmetric: the negative half mirrored, no 0.0796
        neg = nb["nf4_code"](offset)[:8]
        return torch.cat([neg, -neg[:7].flip(0), torch.tensor([1.0])]).sort().values
    with pytest.raises(AssertionError, match="05.nf4_code"):
        check("05.nf4_code", article_like)


def test_searchsorted_rounding_fails(nb):
    def rounds_up(x, code, blocksize=64):
        codes, absmax = nb["quantize_blockwise"](x, code, blocksize)
        flat = x.reshape(-1).float()
        scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
        order = torch.argsort(code, stable=True)
        idx = torch.searchsorted(code[order], (flat / scale.clamp(min=1e-38)).clamp(-1, 1)).clamp(0, 15)
        return order[idx].to(torch.uint8), absmax
    with pytest.raises(AssertionError, match="codes differs"):
        check("05.quantize_blockwise", rounds_up)


def test_scale_over_seven_fails(nb):
    def int4_scale(x, code, blocksize=64):
        codes, absmax = nb["quantize_blockwise"](x, code, blocksize)
        return codes, absmax / 7
    with pytest.raises(AssertionError, match="absmax differs"):
        check("05.quantize_blockwise", int4_scale)


def test_wrong_nibble_order_fails(nb):
    def low_first(codes, pad=0):
        p = nb["pack_4bit"](codes, pad)
        return ((p & 0x0F) << 4) | (p >> 4)
    with pytest.raises(AssertionError, match="05.pack_4bit"):
        check("05.pack_4bit", low_first)


def test_bits_without_double_quant_fails(nb):
    with pytest.raises(AssertionError):
        check("05.bits_per_parameter", lambda blocksize=64, double_quant=True, dq_blocksize=256: 4 + 32 / blocksize)


def test_article_layer_conventions_fail(nb):
    Fixed = nb["QLoRALinear"]

    class GaussianA(Fixed):                              # the article's init: randn * 0.01
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            with torch.no_grad():
                self.lora_A.copy_(torch.randn_like(self.lora_A) * 0.01)

    with pytest.raises(AssertionError, match="init_ok"):
        check("05.qlora_linear", GaussianA)

    class Scrambled(Fixed):                              # view(in, out).T instead of the (out, in) weight
        def dequantize_weight(self, dtype=torch.float32):
            w = super().dequantize_weight(dtype)
            return w.reshape(self.in_features, self.out_features).T

    with pytest.raises(AssertionError, match="05.qlora_linear"):
        check("05.qlora_linear", Scrambled)

    class KeepsFloat(Fixed):                             # keeps a float copy "for speed"
        def quantize_weight(self, weight):
            super().quantize_weight(weight)
            self.register_buffer("weight_cache", weight.clone())

    with pytest.raises(AssertionError, match="no_float_copy"):
        check("05.qlora_linear", KeepsFloat)
