"""Hidden-test machinery of notebooks 03 and 04: the references pass, typical mistakes fail."""
import copy

import pytest
import torch

from lora_ref import data, lowrank
from lora_ref.exercises import check, get


@pytest.mark.parametrize("exercise_id", ["03.answer_only_labels", "03.collate", "03.select_targets",
                                         "03.lora_trainable_params", "04.subspace_similarity",
                                         "04.rank_for_energy"])
def test_reference_passes_its_own_check(exercise_id):
    check(exercise_id, get(exercise_id).reference)


def test_loss_on_the_whole_sequence_fails():
    def seed_style(prompt_ids, completion_ids, eos_id):          # the seed article: labels = input_ids
        ids = torch.tensor(list(prompt_ids) + list(completion_ids))
        return {"input_ids": ids, "labels": ids.clone()}
    with pytest.raises(AssertionError, match="03.answer_only_labels"):
        check("03.answer_only_labels", seed_style)


def test_padding_with_loss_fails():
    def pads_labels_with_pad_id(batch, pad_id):
        out = data.collate(batch, pad_id)
        out["labels"] = torch.where(out["attention_mask"] == 1, out["labels"], torch.full_like(out["labels"], pad_id))
        return out
    with pytest.raises(AssertionError, match="labels"):
        check("03.collate", pads_labels_with_pad_id)


def test_all_linear_including_lm_head_fails():
    def with_head(model, target_modules):
        names = get("03.select_targets").reference(model, target_modules)
        return sorted(names + ["lm_head"]) if target_modules == "all-linear" else names
    with pytest.raises(AssertionError):
        check("03.select_targets", with_head)


def test_count_without_r_fails():
    def forgets_r(model, target_modules, r):
        return get("03.lora_trainable_params").reference(model, target_modules, 1)
    with pytest.raises(AssertionError, match="trainable"):
        check("03.lora_trainable_params", forgets_r)


def test_left_singular_vectors_fail():
    def uses_u(A1, A2, i, j):                                  # columns of U live in R^r, not input space
        U1 = torch.linalg.svd(A1.double(), full_matrices=False)[0]
        U2 = torch.linalg.svd(A2.double(), full_matrices=False)[0]
        if A1.shape[1] != A2.shape[1] or not (1 <= i <= min(A1.shape) and 1 <= j <= min(A2.shape)):
            raise ValueError("bad")
        n = min(U1.shape[0], U2.shape[0])
        return float(((U1[:n, :i].T @ U2[:n, :j]) ** 2).sum() / min(i, j))
    with pytest.raises(AssertionError, match="phi"):
        check("04.subspace_similarity", uses_u)


def test_energy_off_by_one_fails():
    def off_by_one(W, fraction):
        return lowrank.rank_for_energy(W, fraction) - 1 if 0 < fraction <= 1 else lowrank.rank_for_energy(W, fraction)
    with pytest.raises(AssertionError, match="rank"):
        check("04.rank_for_energy", off_by_one)
