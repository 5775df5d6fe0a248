"""PiSSA (arXiv 2404.02948): factors equal PEFT's init_lora_weights="pissa"; the model is unchanged at step 0."""
import copy

import pytest
import torch
import torch.nn as nn

from lora_ref.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers
from lora_ref.pissa import apply_pissa, pissa_factors, pissa_init

peft = pytest.importorskip("peft")


class _One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("r,alpha,rslora", [(3, 6.0, False), (4, 4.0, True), (2, 1.0, False)])
def test_pissa_equals_peft(r, alpha, rslora):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    ours = pissa_init(LoRALinear(copy.deepcopy(lin), r, alpha, use_rslora=rslora))
    theirs = peft.get_peft_model(_One(copy.deepcopy(lin)), peft.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"],
        init_lora_weights="pissa")).base_model.model.proj
    assert torch.allclose(ours.lora_A, theirs.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(ours.lora_B, theirs.lora_B["default"].weight, atol=1e-6)
    assert torch.allclose(ours.base_layer.weight, theirs.base_layer.weight, atol=1e-6)
    x = torch.randn(5, 16)
    assert (ours(x) - theirs(x)).abs().max() < 1e-5


def test_hand_worked_diagonal():
    """W = diag(4, 1): the top singular pair is (e1, e1) with S=4; s=1 -> A = [2, 0], B = [2, 0]^T, W_res = diag(0, 1)."""
    W = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    A, B, W_res = pissa_factors(W, 1, 1.0)
    assert torch.allclose((B @ A).abs(), torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(W_res, torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    A2, B2, _ = pissa_factors(W, 1, 4.0)            # s = 4 -> s B A is still the top part
    assert torch.allclose(4.0 * B2 @ A2, B @ A, atol=1e-6)


def test_model_equals_original_at_step0_and_differs_from_lora(tiny):
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        want = tiny(x).logits
    model = inject_lora(copy.deepcopy(tiny), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    apply_pissa(model)
    with torch.no_grad():
        got = model(x).logits
    assert (got - want).abs().max() < 1e-4
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_B.abs().max() > 0                      # not LoRA's B = 0
    with torch.no_grad():                                     # the residual alone is a different model
        for l in lora_layers(model).values():
            l.enable_adapters(False)
        assert (model(x).logits - want).abs().max() > 1e-2


def test_refuses_quantised_base():
    from lora_ref.qlora import Linear4bit, QLoRALinear
    q = QLoRALinear(Linear4bit.from_linear(nn.Linear(64, 64)), r=2, alpha=2)
    with pytest.raises(TypeError, match="PiSSA needs a floating-point base"):
        pissa_init(q)
