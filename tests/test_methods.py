"""lora_ref.methods.prepare_model: the one setup of full fine-tuning, LoRA and QLoRA."""
import pytest

from lora_ref import lora, qlora
from lora_ref.lora import LoRAConfig, count_parameters
from lora_ref.methods import prepare_model
from lora_ref.models import tiny_llama


def test_full_unfreezes_everything():
    model = tiny_llama(seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_model(model, "full")
    assert all(p.requires_grad for p in model.parameters()) and not lora.lora_layers(model)


def test_lora_and_qlora_train_the_same_adapters():
    cfg = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    lo, ql = prepare_model(tiny_llama(seed=0), "lora", cfg), prepare_model(tiny_llama(seed=0), "qlora", cfg)
    want = lora.lora_trainable_params(tiny_llama(seed=0), "all-linear", 4)
    assert count_parameters(lo).trainable == count_parameters(ql).trainable == want
    layers = lora.lora_layers(ql)
    assert layers and all(isinstance(m, qlora.QLoRALinear) and isinstance(m.base_layer, qlora.Linear4bit)
                          for m in layers.values())
    assert not any(isinstance(m, qlora.Linear4bit) for m in lo.modules())


def test_bad_method_and_full_with_config_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        prepare_model(tiny_llama(seed=0), "dora")
    with pytest.raises(ValueError, match="no LoRA config"):
        prepare_model(tiny_llama(seed=0), "full", LoRAConfig())
