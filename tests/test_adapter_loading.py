"""Loading an adapter as a new user does it (issue 13): the model's mode, all-or-nothing, bad files."""
import copy
import json

import pytest
import torch

from lora_ref.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402


def _saved_adapter(tiny, folder, dropout=0.3, r=4, targets=("q_proj", "v_proj")):
    """An adapter with non-zero B (so dropout on the LoRA branch changes the logits), saved to folder."""
    cfg = LoRAConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=targets)
    m = inject_lora(copy.deepcopy(tiny), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    save_adapter(m, folder, cfg)
    return cfg


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_loaded_adapter_takes_the_eval_mode_of_its_model(tiny, tmp_path):
    _saved_adapter(tiny, tmp_path, dropout=0.3)
    x = torch.randint(0, 256, (2, 12))
    ours = load_adapter(copy.deepcopy(tiny).eval(), tmp_path)
    assert not any(layer.training for layer in lora_layers(ours).values())
    first, second = _logits(ours, x), _logits(ours, x)
    assert torch.equal(first, second), "dropout is on in a model that was put in eval mode"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny).eval(), tmp_path)
    assert (first - _logits(theirs, x)).abs().max() <= 1e-5


def test_inject_into_a_training_model_keeps_training_mode(tiny):
    m = inject_lora(copy.deepcopy(tiny).train(), LoRAConfig(r=2, dropout=0.5))
    assert all(layer.training for layer in lora_layers(m).values())
    m = inject_lora(copy.deepcopy(tiny).eval(), LoRAConfig(r=2, dropout=0.5))
    assert not any(layer.training for layer in lora_layers(m).values())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()]


def test_failed_load_leaves_the_model_untouched(tiny, tmp_path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    _saved_adapter(tiny, good, r=4)
    _saved_adapter(tiny, bad, r=4)
    cfg = json.loads((bad / CONFIG_NAME).read_text())
    cfg["r"] = 8                                   # config says r=8, the tensors are r=4
    (bad / CONFIG_NAME).write_text(json.dumps(cfg))
    model = copy.deepcopy(tiny)
    before, modules = _state(model)
    with pytest.raises(ValueError, match=r"shape \(4, 64\).*\(8, 64\)"):
        load_adapter(model, bad)
    after, modules_after = _state(model)
    assert modules_after == modules and not lora_layers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters()), "a failed load froze the model"
    load_adapter(model, good)                      # the next, correct load works
    assert len(lora_layers(model)) == 2 * tiny.config.num_hidden_layers


def test_adapter_with_nan_does_not_load(tiny, tmp_path):
    _saved_adapter(tiny, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="1 NaN"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_adapter_config_that_is_a_list(tiny, tmp_path):
    _saved_adapter(tiny, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps([{"peft_type": "LORA"}]))
    with pytest.raises(ValueError, match="not a valid adapter config.*JSON object"):
        load_adapter(copy.deepcopy(tiny), tmp_path)


def test_lora_bias_is_named_as_unsupported(tiny, tmp_path):
    _saved_adapter(tiny, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        load_adapter(copy.deepcopy(tiny), tmp_path)


def test_peft_exclude_modules_is_honoured(tiny, tmp_path):
    """PEFT's exclude_modules (a list, or a regex string): the same layers are adapted as in PEFT."""
    for exclude in (["down_proj"], r".*\.layers\.0\..*"):
        pm = peft.get_peft_model(copy.deepcopy(tiny), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=exclude, init_lora_weights=False))
        pm.save_pretrained(tmp_path)
        ours = load_adapter(copy.deepcopy(tiny).eval(), tmp_path)
        theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert set(lora_layers(ours)) == theirs
        x = torch.randint(0, 256, (2, 7))
        assert (_logits(ours, x) - _logits(pm.eval(), x)).abs().max() <= 1e-5


def test_our_exclude_modules_reach_peft(tiny, tmp_path):
    cfg = LoRAConfig(r=2, target_modules="all-linear", exclude_modules=("lm_head", "o_proj"))
    save_adapter(inject_lora(copy.deepcopy(tiny), cfg), tmp_path, cfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path)
    assert not any(n.endswith("o_proj") and isinstance(m, peft.tuners.lora.LoraLayer)
                   for n, m in pm.named_modules())
