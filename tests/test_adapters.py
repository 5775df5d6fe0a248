"""Adapters in PEFT's format: interoperability both ways, round trips, bad files."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from lora_ref.adapters import load_adapter, peft_key, save_adapter
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers

peft = pytest.importorskip("peft")


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("targets,rslora", [(("q_proj", "v_proj"), False), ("all-linear", True)])
def test_ours_loads_in_peft(tiny, tmp_path, targets, rslora):
    base = copy.deepcopy(tiny)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=targets, use_rslora=rslora)
    inject_lora(tiny, cfg)
    _randomise(tiny)
    x = torch.randint(0, 256, (2, 12))
    ours = _logits(tiny, x)
    save_adapter(tiny, tmp_path, cfg)
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    theirs = _logits(pm, x)
    assert (ours - theirs).abs().max() <= 1e-5
    with pm.disable_adapter():                          # the adapter really changes the outputs
        assert (_logits(pm, x) - ours).abs().max() > 1e-3


def test_peft_adapter_loads_in_ours(tiny, tmp_path):
    ours_base = copy.deepcopy(tiny)
    pm = peft.get_peft_model(tiny, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                        "down_proj"]))
    g = torch.Generator().manual_seed(3)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randint(0, 256, (3, 9))
    theirs = _logits(pm, x)
    pm.save_pretrained(tmp_path)
    load_adapter(ours_base, tmp_path)
    ours = _logits(ours_base, x)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - _logits(pm.get_base_model(), x)).abs().max() <= 1e-5


def test_file_uses_peft_key_names_and_shapes(tiny, tmp_path):
    from safetensors.torch import load_file
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["v_proj"])
    inject_lora(tiny, cfg)
    save_adapter(tiny, tmp_path, cfg)
    t = load_file(tmp_path / "adapter_model.safetensors")
    k = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    assert k == peft_key("model.layers.0.self_attn.v_proj", "A") and t[k].shape == (4, 64)
    assert t[k.replace("lora_A", "lora_B")].shape == (32, 4)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8


def test_round_trip(tiny, tmp_path):
    fresh = copy.deepcopy(tiny)
    cfg = LoRAConfig(r=2, alpha=4, target_modules="all-linear")
    inject_lora(tiny, cfg)
    _randomise(tiny, 5)
    save_adapter(tiny, tmp_path, cfg)
    load_adapter(fresh, tmp_path)
    x = torch.randint(0, 256, (1, 7))
    assert torch.equal(_logits(fresh, x), _logits(tiny, x))


def test_missing_files_and_corrupt_weights(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny, tmp_path)
    cfg = LoRAConfig(r=2, alpha=4)
    m = copy.deepcopy(tiny)
    inject_lora(m, cfg)
    save_adapter(m, tmp_path, cfg)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_adapter(copy.deepcopy(tiny), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid adapter config"):
        load_adapter(copy.deepcopy(tiny), tmp_path)


def test_mismatched_adapter(tiny, tmp_path):
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])
    m = copy.deepcopy(tiny)
    inject_lora(m, cfg)
    save_adapter(m, tmp_path, cfg)
    other = copy.deepcopy(tiny)
    inject_lora(other, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="4 missing keys"):
        load_adapter(other, tmp_path)
    wrong_rank = copy.deepcopy(tiny)
    inject_lora(wrong_rank, LoRAConfig(r=3, alpha=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"shape \(2, 64\).*\(3, 64\)"):
        load_adapter(wrong_rank, tmp_path)
    # an adapter for another model (hidden 32) fails on shapes, not silently
    from lora_ref.models import tiny_llama
    small = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(small, tmp_path)


def test_parse_peft_key_inverts_peft_key():
    from lora_ref.adapters import parse_peft_key, peft_key
    for path, m in (("model.layers.0.self_attn.q_proj", "A"), ("model.layers.11.mlp.down_proj", "B")):
        assert parse_peft_key(peft_key(path, m)) == (path, m)
    assert parse_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight") == \
        ("model.layers.0.self_attn.q_proj", "B")
    with pytest.raises(ValueError, match="not a LoRA tensor key"):
        parse_peft_key("base_model.model.model.layers.0.self_attn.q_proj.weight")
