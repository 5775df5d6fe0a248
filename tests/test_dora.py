"""DoRA (arXiv 2402.09353) against PEFT's DoRA layer: same weights -> same outputs, gradients, merge."""
import copy

import pytest
import torch
import torch.nn as nn

from lora_ref.dora import DoRALinear, column_norm, dora_forward, dora_merged_weight
from lora_ref.lora import LoRAConfig, count_parameters, inject_lora, lora_layers

peft = pytest.importorskip("peft")


class _One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _pair(in_f=12, out_f=10, r=3, alpha=6.0, bias=True, dropout=0.0, rslora=False, seed=0):
    """Our DoRALinear and PEFT's DoRA layer over copies of one nn.Linear, with identical A, B, m."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    ours = DoRALinear(copy.deepcopy(lin), r, alpha, dropout=dropout, use_rslora=rslora)
    pm = peft.get_peft_model(_One(copy.deepcopy(lin)), peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], use_dora=True, use_rslora=rslora))
    theirs = pm.base_model.model.proj
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        ours.lora_B.copy_(torch.randn(out_f, r, generator=g) * 0.3)     # trained-looking B
        ours.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(out_f, generator=g))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return ours, theirs


def test_init_magnitude_is_row_norm_and_output_unchanged():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    layer = DoRALinear(lin, r=2, alpha=4)
    assert torch.allclose(layer.lora_magnitude_vector, lin.weight.norm(dim=1))
    x = torch.randn(3, 7)
    assert torch.allclose(layer(x), lin(x), atol=1e-6)
    # hand-worked norm: rows (3, 4) and (1, 0) -> 5 and 1
    assert column_norm(torch.tensor([[3.0, 4.0], [1.0, 0.0]])).tolist() == [5.0, 1.0]


def test_magnitude_initialised_like_peft():
    ours, theirs = _pair()
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    fresh = peft.get_peft_model(_One(copy.deepcopy(lin)), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"],
                                                                       use_dora=True)).base_model.model.proj
    assert torch.allclose(DoRALinear(copy.deepcopy(lin), 3, 6).lora_magnitude_vector,
                          fresh.lora_magnitude_vector["default"].weight, atol=1e-6)


@pytest.mark.parametrize("bias,rslora", [(True, False), (False, True)])
def test_outputs_and_gradients_equal_peft(bias, rslora):
    ours, theirs = _pair(bias=bias, rslora=rslora)
    x = torch.randn(2, 4, 12)
    yo, yt = ours(x), theirs(x)
    assert (yo - yt).abs().max() < 1e-6
    w = torch.randn_like(yo)
    (yo * w).sum().backward()
    (yt * w).sum().backward()
    for mine, peft_p in ((ours.lora_A, theirs.lora_A["default"].weight), (ours.lora_B, theirs.lora_B["default"].weight),
                         (ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
        assert mine.grad is not None and mine.grad.abs().max() > 0
        assert (mine.grad - peft_p.grad).abs().max() < 1e-5
    assert ours.base_layer.weight.grad is None


def test_training_with_dropout_equals_peft():
    ours, theirs = _pair(dropout=0.3)
    ours.train(), theirs.train()
    x = torch.randn(3, 12)
    torch.manual_seed(5)
    yo = ours(x)
    torch.manual_seed(5)
    yt = theirs(x)
    assert (yo - yt).abs().max() < 1e-6


def test_norm_is_detached():
    """Section 4.3: no gradient through ||W + sBA||_c. With it attached, A's gradient would differ."""
    ours, _ = _pair(bias=False)
    x = torch.randn(5, 12)
    ours(x).sum().backward()
    A = ours.lora_A.detach().clone().requires_grad_(True)
    W, B, m, s = ours.base_layer.weight, ours.lora_B.detach(), ours.lora_magnitude_vector.detach(), ours.scaling
    V = W + s * B @ A
    (x @ (m.view(-1, 1) * V / V.norm(dim=1, keepdim=True)).t()).sum().backward()   # attached norm
    assert (A.grad - ours.lora_A.grad).abs().max() > 1e-4


def test_merge_equals_peft_and_forward_and_unmerges():
    ours, theirs = _pair()
    x = torch.randn(4, 12)
    before = ours(x).detach()
    w0 = ours.base_layer.weight.detach().clone()
    ours.merge()
    theirs.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() < 1e-6
    assert (ours(x) - before).abs().max() < 1e-5
    direct = dora_merged_weight(w0, ours.lora_A, ours.lora_B, ours.lora_magnitude_vector, ours.scaling)
    assert torch.allclose(direct, ours.base_layer.weight, atol=1e-6)
    ours.unmerge()
    assert (ours.base_layer.weight - w0).abs().max() < 1e-5


def test_merge_refuses_what_it_cannot_undo():
    """A merge that would write NaN/Inf, or into an integer weight, raises and leaves the layer as it was
    (the checks are lora.merged_weight's and LoRALinear's, shared by DoRA)."""
    ours, _ = _pair()
    w0 = ours.base_layer.weight.detach().clone()
    with torch.no_grad():
        ours.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        ours.merge()
    assert not ours.merged and torch.equal(ours.base_layer.weight, w0)
    ours, _ = _pair()
    with torch.no_grad():                 # W + s B A with a zero row: its norm is 0, g = m / 0 = inf
        ours.lora_B.zero_()
        ours.base_layer.weight[2] = 0.0
    w0 = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        ours.merge()
    assert not ours.merged and torch.equal(ours.base_layer.weight, w0)
    ours, _ = _pair()
    ours.base_layer.weight = nn.Parameter(torch.zeros(10, 12, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="cannot merge"):
        ours.merge()


def test_functional_forward_is_the_layer():
    ours, _ = _pair()
    x = torch.randn(6, 12)
    y = dora_forward(x, ours.base_layer.weight, ours.base_layer.bias, ours.lora_A, ours.lora_B,
                     ours.lora_magnitude_vector, ours.scaling)
    assert (y - ours(x)).abs().max() < 1e-6


def test_inject_dora_on_tiny_model_equals_peft(tiny):
    base = copy.deepcopy(tiny)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_dora=True)
    inject_lora(tiny, cfg)
    layers = lora_layers(tiny)
    assert layers and all(isinstance(l, DoRALinear) for l in layers.values())
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   use_dora=True))
    assert count_parameters(tiny).trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    extra = sum(l.out_features for l in layers.values())
    assert count_parameters(tiny).trainable == sum(l.r * (l.in_features + l.out_features) for l in layers.values()) + extra


def _peft_dora_adapter(tiny, folder, rslora=False):
    pm = peft.get_peft_model(tiny, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   use_dora=True, use_rslora=rslora))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder)
    return pm


def test_peft_dora_adapter_is_never_loaded_as_plain_lora(tiny, tmp_path):
    """A DoRA adapter read as plain LoRA would drop the magnitudes and give other outputs, silently."""
    from lora_ref.adapters import load_adapter
    base = copy.deepcopy(tiny)
    _peft_dora_adapter(tiny, tmp_path)
    plain = copy.deepcopy(base)
    inject_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(plain, tmp_path)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_dora_adapter_loads_in_ours(tiny, tmp_path, rslora):
    from lora_ref.adapters import load_adapter
    base = copy.deepcopy(tiny)
    pm = _peft_dora_adapter(tiny, tmp_path, rslora=rslora)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        theirs = pm(x).logits
    load_adapter(base, tmp_path)
    assert all(isinstance(l, DoRALinear) and l.use_rslora == rslora for l in lora_layers(base).values())
    with torch.no_grad():
        assert (base(x).logits - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_our_dora_adapter_loads_in_peft(tiny, tmp_path, rslora):
    from lora_ref.adapters import magnitude_key, save_adapter
    from safetensors.torch import load_file
    base = copy.deepcopy(tiny)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_dora=True, use_rslora=rslora)
    inject_lora(tiny, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l in lora_layers(tiny).values():
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=g) * 0.05)
            l.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(l.out_features, generator=g))
    save_adapter(tiny, tmp_path, cfg)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert magnitude_key("model.layers.0.self_attn.q_proj") in keys
    x = torch.randint(0, 256, (2, 9))
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert (pm(x).logits - tiny(x).logits).abs().max() < 1e-5
        with pm.disable_adapter():
            assert (pm(x).logits - tiny(x).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="use_dora"):
        save_adapter(tiny, tmp_path / "wrong", LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
