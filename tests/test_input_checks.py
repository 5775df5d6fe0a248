"""Numbers as sweeps pass them, and clear errors for bad input (issue 13, items 7 and 8)."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from lora_ref._checks import as_int, as_real, check_int, check_real
from lora_ref.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers


@pytest.mark.parametrize("value,expected", [(4, 4), (np.int64(4), 4), (np.int32(4), 4), (np.array(4), 4),
                                            (torch.tensor(4), 4), (torch.tensor(4, dtype=torch.int8), 4)])
def test_integers_of_every_kind(value, expected):
    got = as_int(value)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), 4.0, np.float32(4), "4", None,
                                   torch.tensor([4]), np.array([4])])
def test_not_integers(value):
    assert as_int(value) is None
    with pytest.raises(ValueError, match="must be a positive integer"):
        check_int("r", value, minimum=1)


@pytest.mark.parametrize("value", [16, 16.0, np.float32(16), np.float64(16), np.int64(16), torch.tensor(16.0),
                                   np.array(16.0)])
def test_reals_of_every_kind(value):
    got = as_real(value)
    assert got == 16.0 and type(got) is float


@pytest.mark.parametrize("value", [True, "16", None, complex(1, 0), torch.tensor([1.0])])
def test_not_reals(value):
    assert as_real(value) is None
    with pytest.raises(ValueError, match="alpha=.* must be a positive finite number"):
        check_real("alpha", value, positive=True)
    with pytest.raises(ValueError, match="finite"):
        check_real("alpha", float("nan"))


def test_lora_accepts_numpy_and_tensor_numbers(tiny, tmp_path):
    layer = LoRALinear(nn.Linear(16, 8), r=np.int64(4), alpha=np.float32(16), dropout=np.float32(0.1))
    assert (layer.r, layer.alpha, layer.scaling) == (4, 16.0, 4.0) and type(layer.r) is int
    LoRALinear(nn.Linear(16, 8), r=torch.tensor(4), alpha=torch.tensor(8.0))
    cfg = LoRAConfig(r=np.int64(4), alpha=np.float32(16), dropout=np.float64(0.05))
    assert type(cfg.r) is int and type(cfg.alpha) is float and type(cfg.dropout) is float
    from lora_ref.adapters import load_adapter, save_adapter
    save_adapter(inject_lora(copy.deepcopy(tiny), cfg), tmp_path, cfg)       # json.dumps of the config
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    load_adapter(copy.deepcopy(tiny), tmp_path)


def test_dropout_as_a_string_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dropout='0.1' must be a number in \[0, 1\)"):
        LoRALinear(nn.Linear(4, 4), r=2, dropout="0.1")
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout="0.1")
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, dropout=1.0)


def test_forward_with_a_scalar_or_a_list_is_a_clear_error():
    layer = LoRALinear(nn.Linear(4, 3), r=2)
    with pytest.raises(ValueError, match="0-d tensor"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"expects a torch.Tensor of shape \(\.\.\., 4\), got list"):
        layer([1.0, 2.0, 3.0, 4.0])


def test_injecting_twice_says_already_injected(tiny):
    m = inject_lora(copy.deepcopy(tiny), LoRAConfig(r=2))
    n = len(lora_layers(m))
    with pytest.raises(ValueError, match="already injected"):
        inject_lora(m, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already injected"):
        inject_lora(m, LoRAConfig(r=2, target_modules=["k_proj"]))
    assert len(lora_layers(m)) == n


def test_rank_too_large_for_one_target_leaves_the_model_untouched(tiny):
    m = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="rank r=100 is larger"):
        inject_lora(m, LoRAConfig(r=100, target_modules="all-linear"))
    assert not lora_layers(m) and all(p.requires_grad for p in m.parameters())


# ----------------------------------------------------------------------------- every other validation site
def test_quantisation_accepts_numpy_blocksize_and_refuses_bad_dequantisation():
    from lora_ref import quant
    w = torch.randn(8, 64)
    packed, state = quant.quantize_4bit(w, blocksize=np.int64(64))
    ref_packed, ref_state = quant.quantize_4bit(w, blocksize=64)
    assert torch.equal(packed, ref_packed) and type(state.blocksize) is int
    assert quant.bits_per_parameter(np.int64(64), dq_blocksize=np.int64(256)) == quant.bits_per_parameter(64)
    quant.quantize_8bit(w, blocksize=torch.tensor(256))
    with pytest.raises(TypeError, match="needs the QuantState"):
        quant.dequantize_4bit(packed, None)
    with pytest.raises(ValueError, match="dtype=torch.int8 must be a floating-point"):
        quant.dequantize_4bit(packed, state, dtype=torch.int8)
    q8, s8 = quant.quantize_8bit(w)
    with pytest.raises(ValueError, match="floating-point"):
        quant.dequantize_8bit(q8, s8, dtype=torch.int32)
    with pytest.raises(ValueError, match="blocksize=True must be a positive integer"):
        quant.quantize_4bit(w, blocksize=True)


def test_qlora_layer_with_numpy_blocksize():
    from lora_ref.qlora import Linear4bit
    q = Linear4bit.from_linear(nn.Linear(64, 32), blocksize=np.int64(64))
    assert type(q.blocksize) is int


def test_lowrank_memory_optim_peft_and_data_accept_numpy():
    from lora_ref import data, lowrank, memory
    from lora_ref.optim import AdamW8bit
    W = torch.randn(12, 10)
    assert torch.equal(lowrank.best_rank_r(W, np.int64(3)), lowrank.best_rank_r(W, 3))
    assert lowrank.factorised_size(np.int64(4096), np.int32(4096), np.int64(16)) == 131072
    A = torch.randn(4, 10)
    assert lowrank.subspace_similarity(A, A, np.int64(2), torch.tensor(2)) == pytest.approx(1.0)
    assert memory.lora_param_count("smollm2-135m", np.int64(16)) == memory.lora_param_count("smollm2-135m", 16)
    opt = AdamW8bit([nn.Parameter(torch.zeros(4))], lr=np.float32(1e-3), blocksize=np.int64(256))
    assert type(opt.blocksize) is int
    batch = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}]
    assert data.collate(batch, np.int64(0))["input_ids"].shape == (1, 2)
    with pytest.raises(ValueError, match="pad_id"):
        data.collate(batch, "0")


def test_peft_family_and_exercise_answers_accept_numpy(tiny):
    from lora_ref.exercises.nb09 import _number
    from lora_ref.peft_family import PrefixTuning, PromptTuning
    assert PromptTuning(copy.deepcopy(tiny), np.int64(4)).num_virtual_tokens == 4
    PrefixTuning(copy.deepcopy(tiny), num_virtual_tokens=np.int64(2), reparam_hidden=np.int64(8))
    assert float(_number(np.float32(2.5), None)["value"]) == 2.5
    with pytest.raises(AssertionError, match="finite number"):
        _number("2.5", None)


def test_fast_qlora_layer_accepts_a_numpy_rank():
    from lora_ref import quant
    from lora_ref.kernels import FastQLoRALinear
    packed, state = quant.quantize_4bit(torch.randn(32, 64), blocksize=64)
    layer = FastQLoRALinear(packed, state, r=np.int64(4), alpha=np.float32(8))
    assert type(layer.r) is int and layer.scaling == 2.0
