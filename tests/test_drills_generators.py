"""Generated questions: answers equal independent hand calculations; seeded variety; every bug is a real bug."""
import math

import pytest
import torch
import torch.nn as nn

from lora_ref.drills import generators as gen
from lora_ref.drills.grading import format_quantity, grade
from lora_ref.drills.items import validate_item
from lora_ref.quant import nearest_code_index, nf4_code

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL7 = QKVO + ("gate_proj", "up_proj", "down_proj")


def _lora_by_hand(d, kv, inter, layers, r, targets):
    dims = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    return layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


@pytest.mark.parametrize("model, r, targets, expected", [
    ("llama-2-7b", 16, QKVO, 16_777_216),              # the brief's example: 4096 wide, 32 layers
    ("llama-2-7b", 16, ALL7, 39_976_960),              # ANCHORS / PEFT
    ("smollm2-135m", 16, ALL7, 4_884_480),             # ANCHORS / PEFT
    ("llama-3-8b", 16, QKVO, _lora_by_hand(4096, 1024, 14336, 32, 16, QKVO)),   # GQA: k, v are 1024 wide
    ("llama-3-8b", 16, ALL7, 41_943_040),
    ("mistral-7b", 8, ("q_proj", "v_proj"), 32 * 8 * (4096 + 4096 + 4096 + 1024)),
    ("llama-2-70b", 64, ALL7, _lora_by_hand(8192, 1024, 28672, 80, 64, ALL7)),
    ("llama-2-13b", 4, QKVO, 40 * 4 * 4 * (5120 + 5120)),
])
def test_lora_params_match_hand_calculation(model, r, targets, expected):
    item = gen.lora_params_item(model, r, targets)
    assert item.value == expected
    assert f"{expected:,}" in item.answer                                 # the working shows the figure
    assert grade(item, f"{expected:,}").correct and grade(item, f"{expected / 1e6:.3g}M").correct
    assert not grade(item, f"{expected * 1.02:.0f}").correct


def test_llama3_gqa_is_not_counted_as_full_width():
    gqa = gen.lora_params_item("llama-3-8b", 16, QKVO).value
    assert gqa == 13_631_488 and gqa < gen.lora_params_item("llama-2-7b", 16, QKVO).value


def test_adapter_size_is_data_plus_header():
    item = gen.adapter_size_item("llama-2-7b", 16, QKVO, "bf16")
    data = 16_777_216 * 2
    header = item.value - data
    assert 0 < header < 64 * 128 * 200          # 128 tensors, well under 200 header bytes each
    assert item.unit == "bytes" and grade(item, "33.6 MB").correct and not grade(item, "67.1 MB").correct
    fp32 = gen.adapter_size_item("llama-2-7b", 16, QKVO, "fp32")
    assert abs((fp32.value - 16_777_216 * 4) - header) <= 8 * 128  # header differs only by dtype names


def test_model_params_hand_calculation():
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    expected = 32 * per_layer + 2 * 32000 * 4096 + 4096
    assert expected == 6_738_415_616
    assert gen.model_params_item("llama-2-7b").value == expected
    assert grade(gen.model_params_item("llama-2-7b"), "6.74").correct     # billions asked


def test_memory_hand_calculations_llama2_7b():
    p, n = 6_738_415_616, 39_976_960
    full = gen.memory_item("llama-2-7b", "full")
    assert full.value == 8 * p                                            # bf16 weights + grads + 2 bf16 moments
    lora = gen.memory_item("llama-2-7b", "lora", 16, ALL7)
    assert lora.value == 2 * p + 16 * n                                   # frozen bf16 + fp32 adapter, grad, m, v
    qlora = gen.memory_item("llama-2-7b", "qlora", 16, ALL7)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    by_hand = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * (p - linear) + 16 * n
    assert qlora.value == pytest.approx(by_hand, rel=2e-3)                # bitsandbytes layout adds tiny extras
    assert qlora.value < lora.value / 2.5
    assert grade(qlora, f"{by_hand / 1e9:.2f} GB").correct


def test_bits_per_parameter_and_dq_saving():
    assert gen.bits_item(64, True).value == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert gen.bits_item(64, False).value == 4.5
    assert gen.bits_item(128, True, 128).value == pytest.approx(4 + 8 / 128 + 32 / (128 * 128))
    assert grade(gen.bits_item(64, True), "4.127").correct and not grade(gen.bits_item(64, True), "4.5").correct
    # QLoRA Section 3: about 3 GB saved on a 65B model; Llama-2-70B's projections hold 68.4B weights
    saving = gen.dq_saving_item("llama-2-70b")
    linear = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672)
    assert saving.value == pytest.approx(linear * (0.5 - 8 / 64 - 32 / 16384) / 8)
    assert 3.0e9 < saving.value < 3.3e9


def test_flops_hand_calculation():
    seq, tokens = 2048, 10**6
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096          # matmul weights incl. lm_head
    attn = 12 * 32 * 4096 * seq
    full = gen.flops_item("llama-2-7b", "full", tokens, seq)
    assert full.value == pytest.approx((6 * n + attn) * tokens)
    lora = gen.flops_item("llama-2-7b", "lora", tokens, seq, 16, ALL7)
    assert lora.value == pytest.approx((4 * n + 6 * 39_976_960 + attn) * tokens)
    ratio = gen.flop_ratio_item("llama-2-7b", 16, 512)
    assert ratio.value == pytest.approx((6 * n + 12 * 32 * 4096 * 512) / (4 * n + 6 * 39_976_960 + 12 * 32 * 4096 * 512))
    assert 1.3 < ratio.value < 1.5 and not grade(ratio, "128x").correct


@pytest.mark.parametrize("card", sorted(gen.GENERATORS))
def test_generators_seeded_varied_and_answerable(card):
    items = [gen.generate(card, seed) for seed in range(25)]
    assert gen.generate(card, 7) == items[7]                              # reproducible
    assert gen.from_id(items[3].id) == items[3]
    assert len({i.tags[0] for i in items}) >= 4                          # variety
    for it in items:
        validate_item(it)
        assert it.card_id == card and it.id.startswith(card + "@")
        if it.kind == "numeric":
            shown = format_quantity(it.value, it.unit, it.answer_unit).split(" (")[0]
            assert grade(it, shown).correct, (it.id, shown)
            assert not grade(it, f"{it.value * (1 + 3 * it.rel_tol):.6g}" + ("" if it.unit != "bytes" else " B")).correct
        else:
            assert grade(it, f"line {it.bug_lines[0]}: " + it.answer).score == 1.0
            assert not grade(it, "line 99: looks fine to me").correct


def test_generator_errors():
    with pytest.raises(KeyError, match="no generator"):
        gen.generate("gen.nope", 1)
    with pytest.raises(KeyError, match="not a generated item id"):
        gen.from_id("gen.lora-params")
    with pytest.raises(ValueError, match="mutations"):
        gen.bug_item("gen.bug-lora-layer", 99)


# --------------------------------------------------------------------------- every mutation is a real bug
def _load(source, name):
    ns = {"torch": torch, "nn": nn, "math": math}
    exec(compile(source, f"<{name}>", "exec"), ns)
    return ns


def _lora_invariants(cls) -> list[str]:
    """Names of LoRA-layer invariants the class breaks (empty for a correct layer)."""
    broken = []
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    x = torch.randn(5, 12)
    try:
        layer = cls(base, r=4, alpha=8.0)
        if layer.base_layer is not base:
            broken.append("wraps")
        if layer.base_layer.weight.requires_grad:
            broken.append("frozen")
        if not torch.allclose(layer(x), base(x)):
            broken.append("starts as base")
        if abs(layer.scaling - 2.0) > 1e-12:
            broken.append("scaling")
        layer(x).pow(2).sum().backward()
        if layer.lora_B.grad is None or layer.lora_B.grad.abs().sum() == 0:
            broken.append("B learns")
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.eval()
        unmerged = layer(x).detach()
        expected = base.weight.detach() + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
        layer.merge()
        if not torch.allclose(layer(x), unmerged, atol=1e-5):
            broken.append("merge keeps outputs")
        layer.merge()
        if not torch.allclose(layer.base_layer.weight, expected, atol=1e-5):
            broken.append("merge idempotent")
    except Exception as err:                     # a crash (shape error, leaf in-place) is a broken invariant too
        broken.append(f"raises {type(err).__name__}")
    return broken


def test_lora_template_is_correct_and_every_mutation_breaks_it():
    template = gen._LORA_LAYER
    assert _lora_invariants(_load(template, "lora")["LoRALinear"]) == []
    for k in range(len(gen._LORA_MUTATIONS)):
        item = gen.bug_item("gen.bug-lora-layer", k)
        diff = [i for i, (a, b) in enumerate(zip(template.split("\n"), item.code.split("\n"))) if a != b]
        assert diff == [item.bug_lines[0] - 1]
        source = item.code.replace("copy.deepcopy", "__import__('copy').deepcopy")
        assert _lora_invariants(_load(source, f"mutation{k}")["LoRALinear"]), f"mutation {k} breaks nothing"


def _quant_roundtrip(ns, w):
    code = nf4_code()
    idx, absmax = ns["quantize_nf4"](w, code)
    return idx, absmax, ns["dequantize_nf4"](idx, absmax, code, w.shape)


def test_quantiser_template_matches_lora_ref_and_every_mutation_differs():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.02
    w[3] = 0.0                                                             # one all-zero block
    code = nf4_code()
    ns = _load(gen._QUANTISER, "quant")
    idx, absmax, back = _quant_roundtrip(ns, w)
    blocks = w.reshape(-1, 64)
    ref_absmax = blocks.abs().amax(1).clamp_min(torch.finfo(w.dtype).tiny)
    ref_idx = nearest_code_index(blocks / ref_absmax[:, None], code)
    assert torch.equal(idx.long(), ref_idx) and torch.equal(absmax, ref_absmax)
    assert torch.allclose(back, code[ref_idx].reshape(w.shape) * ref_absmax.repeat_interleave(64).reshape(w.shape))
    for k in range(len(gen._QUANT_MUTATIONS)):
        item = gen.bug_item("gen.bug-quantiser", k)
        m_back = _quant_roundtrip(_load(item.code, f"q{k}"), w)[2]
        assert not torch.allclose(m_back, back, equal_nan=False), f"mutation {k} gives the right weights"
