"""LoRA+ (arXiv 2402.12354): the same parameter groups, learning rates and weight decays as PEFT."""
import copy

import pytest
import torch
import torch.nn as nn

from lora_ref.lora import LoRAConfig, inject_lora
from lora_ref.loraplus import create_loraplus_optimizer, loraplus_param_groups

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402


def _ours_name(peft_name: str) -> str:
    """base_model.model.X.lora_A.default.weight -> X.lora_A; ...lora_magnitude_vector.default.weight -> X.lora_magnitude_vector."""
    n = peft_name.removeprefix("base_model.model.")
    for suffix in (".default.weight", ".default"):
        n = n.replace(suffix, "")
    return n


@pytest.mark.parametrize("dora,norm", [(False, False), (True, True)])
def test_groups_equal_peft(tiny, dora, norm):
    base = copy.deepcopy(tiny)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_dora=dora)
    inject_lora(tiny, cfg)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   use_dora=dora))
    if norm:                                       # a trainable RMSNorm weight (1-D, decayed) and a LayerNorm
        for m in (tiny, pm):
            m.get_submodule("model.norm" if m is tiny else "base_model.model.model.norm").weight.requires_grad_(True)
    opt = peft_loraplus(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.1)
    name_of = {id(p): n for n, p in pm.named_parameters()}
    theirs = [(g["lr"], g["weight_decay"], sorted(_ours_name(name_of[id(p)]) for p in g["params"]))
              for g in opt.param_groups if g["params"]]
    ours_groups = loraplus_param_groups(tiny, lr=1e-3, lr_ratio=8.0, weight_decay=0.1)
    mine_of = {id(p): n for n, p in tiny.named_parameters()}
    ours = [(g["lr"], g["weight_decay"], sorted(mine_of[id(p)] for p in g["params"])) for g in ours_groups if g["params"]]
    assert ours == theirs
    assert any("lora_B" in n for _, _, names in ours for n in names)


def test_layernorm_and_bias_get_no_decay():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)
    m = M()
    groups = {g["name"]: g for g in loraplus_param_groups(m, lr=0.01, lr_ratio=4.0, weight_decay=0.5)}
    assert groups["A"]["params"] == [m.lin.weight] and groups["A"]["lr"] == 0.01
    assert {id(p) for p in groups["B_no_decay"]["params"]} == {id(m.lin.bias), id(m.ln.weight), id(m.ln.bias)}
    assert groups["B_no_decay"]["weight_decay"] == 0.0 and groups["B"]["lr"] == 0.04


def test_optimizer_steps_b_faster(tiny):
    inject_lora(tiny, LoRAConfig(r=4, alpha=8))
    opt = create_loraplus_optimizer(tiny, torch.optim.SGD, lr=0.1, lr_ratio=16.0)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.1, 1.6]
    with pytest.raises(ValueError, match="lr_ratio"):
        loraplus_param_groups(tiny, lr=0.1, lr_ratio=0)
