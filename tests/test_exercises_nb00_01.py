"""Hidden checks of notebooks 00 and 01 accept lora_ref and reject the usual wrong answers."""
import pytest
import torch

from lora_ref import lowrank
from lora_ref.exercises import check, get
from lora_ref.memory import lora_param_count_for_dims as reference_lora_param_count
from lora_ref.lora import count_parameters


def test_references_pass():
    check("00.count_params", count_parameters)
    check("01.best_rank_r", lowrank.best_rank_r)
    check("01.best_rank_r_half", lowrank.best_rank_r)
    check("01.energy_spectrum", lowrank.energy_spectrum)
    check("01.lora_param_count", reference_lora_param_count)


def test_reference_count_matches_the_published_figures():
    all7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert reference_lora_param_count(576, 1536, 30, 9, 3, 16, all7) == 4_884_480      # ANCHORS.md
    assert reference_lora_param_count(4096, 11008, 32, 32, 32, 16, all7) == 39_976_960


def test_count_params_via_state_dict_is_caught():
    def via_state_dict(model):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return trainable, sum(v.numel() for v in model.state_dict().values())
    with pytest.raises(AssertionError, match="00.count_params"):
        check("00.count_params", via_state_dict)


def test_count_params_counting_duplicates_is_caught():
    def with_duplicates(model):
        ps = list(model.named_parameters(remove_duplicate=False))
        return sum(p.numel() for _, p in ps if p.requires_grad), sum(p.numel() for _, p in ps)
    with pytest.raises(AssertionError, match="00.count_params"):
        check("00.count_params", with_duplicates)


@pytest.mark.parametrize("wrong", [
    lambda W, r: lowrank.best_rank_r(W, r).float(),                       # loses the dtype
    lambda W, r: lowrank.best_rank_r(W, max(1, r - 1)) if min(W.shape) > 1 else W * 0,   # off by one
    lambda W, r: (torch.linalg.svd(W.double(), full_matrices=False)[0][:, :r]
                  @ torch.linalg.svd(W.double(), full_matrices=False)[2][:r]).to(W.dtype),  # forgets sigma
])
def test_best_rank_r_mistakes_are_caught(wrong):
    with pytest.raises(AssertionError):
        check("01.best_rank_r", wrong)
        check("01.best_rank_r_half", wrong)


def test_energy_without_squares_is_caught():
    def no_squares(W):
        S = torch.linalg.svdvals(W.double())
        return torch.cumsum(S, 0) / S.sum()
    with pytest.raises(AssertionError, match="01.energy_spectrum"):
        check("01.energy_spectrum", no_squares)


def test_param_count_ignoring_gqa_is_caught():
    def no_gqa(hidden, intermediate, n_layers, n_heads, n_kv_heads, r, targets=("q_proj", "v_proj")):
        return reference_lora_param_count(hidden, intermediate, n_layers, n_heads, n_heads, r, targets)
    with pytest.raises(AssertionError, match="01.lora_param_count"):
        check("01.lora_param_count", no_gqa)


def test_cases_are_deterministic():
    for ex in ("00.count_params", "01.best_rank_r", "01.energy_spectrum", "01.lora_param_count"):
        assert get(ex).cases() == get(ex).cases()
