"""LoRA layer and injection: hand-worked values, invariants, error paths."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from lora_ref.lora import (LoRAConfig, LoRALinear, count_parameters, inject_lora, linear_module_names,
                           lora_layers, merge_and_unload, set_adapters_enabled)

from lora_ref import lora
from lora_ref.models import tiny_llama

def test_hand_worked_forward():
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    layer = LoRALinear(base, r=1, alpha=2.0)            # scaling 2
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0]]))  # (r, in)
        layer.lora_B.copy_(torch.tensor([[3.0], [4.0]]))  # (out, r)
    x = torch.tensor([[1.0, 1.0]])
    # W x = [1, 1]; A x = 3; B (A x) = [9, 12]; * 2 = [18, 24]; total [19, 25]
    assert torch.equal(layer(x), torch.tensor([[19.0, 25.0]]))
    assert torch.equal(layer.delta_weight(), torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


def test_wraps_without_copying_and_freezes():
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, r=2, alpha=4)
    assert layer.base_layer is base and layer.base_layer.weight.data_ptr() == base.weight.data_ptr()
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (2, 8) and layer.lora_B.shape == (6, 2)


def test_init_zero_update_and_kaiming_bound():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), base(x))               # B = 0: starts at the pretrained model
    bound = 1 / math.sqrt(64)                           # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    assert LoRALinear(nn.Linear(8, 8), r=4, alpha=16, use_rslora=rslora).scaling == expected


def test_gradients_only_into_A_and_B():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_merge_idempotent_unmerge_inverse():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 32)
    y = layer(x)
    layer.merge(); layer.merge()                        # twice: still merged once
    assert torch.allclose(base.weight, w0 + layer.delta_weight(), atol=1e-6)
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge(); layer.unmerge()
    assert torch.allclose(base.weight, w0, atol=1e-6)


def test_merge_half_precision_uses_fp32_delta():
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16)
    assert layer.lora_A.dtype == torch.float32          # adapters train in fp32 over a bf16 base
    nn.init.normal_(layer.lora_B, std=1e-3)
    expected = (base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(base.weight, expected)


def test_merge_refuses_non_finite():
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w) and not layer.merged


def test_disable_adapters():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 8)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapters(True)
    assert not torch.equal(layer(x), layer.base_layer(x))


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer.base_layer(x))   # B = 0: dropout cannot touch the base path
    nn.init.normal_(layer.lora_B)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)                        # the LoRA branch is stochastic in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "rank r=0"), (dict(r=9), r"rank r=9.*\[1, 8\]"), (dict(r=2.5), "rank"),
    (dict(alpha=0), "alpha=0"), (dict(alpha=-1.0), "alpha=-1.0"), (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout=1.0")])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(8, 16), **{"r": 2, "alpha": 4, **kwargs})


def test_bad_inputs():
    layer = LoRALinear(nn.Linear(8, 4), r=2, alpha=4)
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="int64"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)


def test_inject_counts_and_freezes(tiny):
    n_total = count_parameters(tiny).total
    inject_lora(tiny, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    layers = lora_layers(tiny)
    assert len(layers) == 2 * 2                         # 2 layers x (q, v)
    # hidden 64; q: 64->64, v: 64 -> 2 kv heads * 16 = 32. r (in + out) per layer
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    pc = count_parameters(tiny)
    assert pc.trainable == expected and pc.total == n_total + expected
    assert all(("lora_" in n) == p.requires_grad for n, p in tiny.named_parameters())


def test_all_linear_skips_lm_head(tiny):
    inject_lora(tiny, LoRAConfig(r=2, target_modules="all-linear"))
    names = {n.rsplit(".", 1)[-1] for n in lora_layers(tiny)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_target_lists_linear_names(tiny):
    with pytest.raises(ValueError) as e:
        inject_lora(tiny, LoRAConfig(target_modules=["query", "v_proj"]))
    msg = str(e.value)
    assert "['query']" in msg and "q_proj" in msg and "down_proj" in msg


def test_non_linear_target_is_named(tiny):
    with pytest.raises(ValueError, match="not nn.Linear"):
        inject_lora(tiny, LoRAConfig(target_modules=["embed_tokens"]))


def test_merge_and_unload_restores_plain_linear(tiny):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 10))
    inject_lora(tiny, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    for layer in lora_layers(tiny).values():
        nn.init.normal_(layer.lora_B, std=0.02)
    with torch.no_grad():
        want = tiny(x).logits
    merge_and_unload(tiny)
    assert not lora_layers(tiny)
    assert type(tiny.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(tiny(x).logits, want, atol=1e-5)


def test_set_adapters_enabled_restores_base(tiny):
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        base = tiny(x).logits
    inject_lora(tiny, LoRAConfig(r=4, target_modules="all-linear"))
    for layer in lora_layers(tiny).values():
        nn.init.normal_(layer.lora_B)
    set_adapters_enabled(tiny, False)
    with torch.no_grad():
        assert torch.equal(tiny(x).logits, base)


def test_linear_module_names(tiny):
    assert linear_module_names(tiny) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj",
                                         "q_proj", "up_proj", "v_proj"]


def test_float64_merge_keeps_float64_precision():
    torch.manual_seed(0)
    base = nn.Linear(16, 16).double()
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    assert layer.delta_weight().dtype == torch.float64
    layer.merge(); layer.unmerge()
    assert (base.weight - w0).abs().max() < 1e-12     # fp32 arithmetic would leave ~1e-7


def test_lora_scaling_is_the_layers_scaling_and_checks_its_inputs():
    assert lora.lora_scaling(16, 8) == 2.0 and lora.lora_scaling(16, 4, use_rslora=True) == 8.0
    for r, rs in ((1, False), (7, True), (64, False)):
        assert LoRALinear(nn.Linear(64, 64), r=r, alpha=16, use_rslora=rs).scaling == lora.lora_scaling(16, r, rs)
    for bad in (dict(alpha=16, r=0), dict(alpha=0, r=4), dict(alpha=16, r=2.5), dict(alpha=float("nan"), r=2)):
        with pytest.raises(ValueError):
            lora.lora_scaling(**bad)


def test_merged_weight_promotes_checks_and_is_the_layers_merge():
    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64),
               torch.randn(5, 3, generator=g, dtype=torch.float64))
    out = lora.merged_weight(W, A, B, 0.5)
    assert out.dtype == torch.float64 and torch.equal(out, W + 0.5 * (B @ A))     # fp64 is not cast down to fp32
    torch.testing.assert_close(lora.merged_weight(out, A, B, 0.5, sign=-1.0), W, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shapes do not fit"):
        lora.merged_weight(W, A.t(), B, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        lora.merged_weight(W, A, B * float("inf"), 1.0)
    layer = LoRALinear(nn.Linear(7, 5).to(torch.bfloat16), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    want = lora.merged_weight(layer.base_layer.weight.detach().clone(), layer.lora_A, layer.lora_B, layer.scaling)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, want) and want.dtype == torch.bfloat16


def test_select_targets_and_trainable_params_match_injection():
    for targets in (("q_proj", "v_proj"), "all-linear", ("down_proj",)):
        model = tiny_llama(seed=1)
        names, n = lora.select_targets(model, targets), lora.lora_trainable_params(model, targets, 4)
        assert not lora.lora_layers(model)                                  # neither touches the model
        injected = lora.inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
        assert names == sorted(lora.lora_layers(injected)) and n == lora.count_parameters(injected).trainable
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.select_targets(tiny_llama(seed=1), ("query",))


def test_set_submodule_replaces_by_dotted_path():
    model = tiny_llama(seed=1)
    new = nn.Identity()
    lora.set_submodule(model, "model.layers.0.mlp.up_proj", new)
    assert model.get_submodule("model.layers.0.mlp.up_proj") is new
