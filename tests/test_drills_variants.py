"""Drill questions on DoRA, PiSSA, LoftQ, LoRA+: generated numbers are lora_ref's, checked by hand."""
import pytest

from lora_ref.drills import generators as g
from lora_ref.drills.bank import items
from lora_ref.drills.grading import grade


def test_dora_params_hand_worked():
    # SmolLM2-135M: hidden 576, 30 layers, k/v 192 wide. LoRA r=8 on q,v: 8*(576+576) + 8*(576+192) = 15,360
    # per layer -> 460,800; DoRA adds (576 + 192) * 30 = 23,040 magnitudes -> 483,840
    item = g.dora_params_item("smollm2-135m", 8, ("q_proj", "v_proj"))
    assert item.value == 483_840
    assert grade(item, "483840").correct and not grade(item, "460800").correct


def test_loftq_gain_hand_worked():
    # diag(1.1, 2.3) on a grid of 1: Q = diag(1, 2), errors (0.1, 0.3); rank 1 removes 0.3 -> 0.1 / sqrt(0.1)
    item = g.loftq_gain_item((1.1, 2.3), 1.0)
    assert item.value == pytest.approx(0.1 / 0.1 ** 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="exactly representable"):
        g.loftq_gain_item((1.0, 2.0), 1.0)


@pytest.mark.parametrize("card", ["gen.dora-params", "gen.loftq-gain"])
def test_generators_draw_valid_items(card):
    for seed in range(20):
        item = g.generate(card, seed)
        assert item.topic == "variants" and item.value > 0
        assert grade(item, f"{item.value:.6g}").correct


def test_bank_has_the_four_methods():
    ids = {i.id for i in items(topic="variants")}
    assert {"variants.dora", "variants.pissa", "variants.loftq", "variants.loraplus"} <= ids
