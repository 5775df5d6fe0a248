"""lora_ref.lowrank: hand-worked values, invariants against the SVD, error paths."""
import math

import pytest
import torch

from lora_ref.lowrank import (approximation_error, best_rank_r, energy_spectrum, factorised_size,
                              rank_for_energy, subspace_similarity)


def test_best_rank_r_of_a_diagonal_matrix_keeps_the_largest_entries():
    W = torch.diag(torch.tensor([5.0, 3.0, 1.0]))
    assert torch.allclose(best_rank_r(W, 2), torch.diag(torch.tensor([5.0, 3.0, 0.0])), atol=1e-6)
    assert torch.allclose(best_rank_r(W, 3), W, atol=1e-6)
    # error = sqrt(1^2 / (25 + 9 + 1))
    assert math.isclose(approximation_error(W, 2), math.sqrt(1 / 35), rel_tol=1e-9)


def test_eckart_young_beats_a_random_rank_r_factorisation():
    torch.manual_seed(0)
    W = torch.randn(40, 30, dtype=torch.float64)
    Wr = best_rank_r(W, 5)
    assert torch.linalg.matrix_rank(Wr).item() == 5
    best = (W - Wr).norm()
    for _ in range(20):
        other = torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, 30, dtype=torch.float64)
        scale = (other * W).sum() / (other * other).sum()      # even optimally scaled
        assert (W - scale * other).norm() > best
    assert math.isclose(best.item() / W.norm().item(), approximation_error(W, 5), rel_tol=1e-9)


def test_best_rank_r_keeps_half_dtype():
    W = torch.randn(8, 6).bfloat16()
    assert best_rank_r(W, 2).dtype == torch.bfloat16


def test_energy_spectrum_of_a_rank_two_matrix():
    u = torch.randn(20, 2, dtype=torch.float64)
    v = torch.randn(2, 10, dtype=torch.float64)
    E = energy_spectrum(u @ v)
    assert E.shape == (10,) and E.dtype == torch.float64
    assert torch.all(E[1:] >= E[:-1] - 1e-12) and abs(E[1].item() - 1.0) < 1e-9
    assert rank_for_energy(u @ v, 0.999999) == 2
    assert rank_for_energy(u @ v, 1.0) <= 2


def test_energy_and_rank_for_energy_hand_worked():
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))          # energies 9, 4, 1 of 14
    assert torch.allclose(energy_spectrum(W), torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64))
    assert rank_for_energy(W, 0.5) == 1
    assert rank_for_energy(W, 0.9) == 2
    assert rank_for_energy(W, 0.95) == 3


def test_factorised_size_is_the_articles_128x():
    assert factorised_size(4096, 4096, 16) == 131_072
    assert 4096 * 4096 / factorised_size(4096, 4096, 16) == 128
    assert factorised_size(576, 192, 8) == 8 * (576 + 192)   # SmolLM2's GQA k/v projection


def test_subspace_similarity_bounds_and_invariance():
    torch.manual_seed(1)
    A = torch.randn(8, 64)
    assert math.isclose(subspace_similarity(A, A, 8, 8), 1.0, rel_tol=1e-9)
    # similarity depends on the row space only: mixing the rows changes nothing
    M = torch.randn(8, 8)
    assert math.isclose(subspace_similarity(A, M @ A, 8, 8), 1.0, rel_tol=1e-6)
    # orthogonal row spaces
    eye = torch.eye(64)
    assert subspace_similarity(eye[:4], eye[4:12], 4, 8) < 1e-12
    # a subspace contained in a larger one
    assert math.isclose(subspace_similarity(eye[:4], eye[:16], 4, 16), 1.0, rel_tol=1e-9)
    # random subspaces of a 64-dim space: about i*j/64 / min(i, j)
    r = subspace_similarity(torch.randn(8, 64), torch.randn(8, 64), 8, 8)
    assert 0.02 < r < 0.4


@pytest.mark.parametrize("call, match", [
    (lambda: best_rank_r(torch.randn(4, 3), 0), "r=0"),
    (lambda: best_rank_r(torch.randn(4, 3), 4), "r=4"),
    (lambda: best_rank_r(torch.randn(4), 1), "shape"),
    (lambda: energy_spectrum(torch.zeros(3, 3)), "energy"),
    (lambda: rank_for_energy(torch.randn(3, 3), 1.5), "fraction=1.5"),
    (lambda: factorised_size(10, 10, 11), "r=11"),
    (lambda: factorised_size(0, 10, 1), "m=0"),
    (lambda: subspace_similarity(torch.randn(4, 10), torch.randn(4, 11), 1, 1), "input size"),
    (lambda: subspace_similarity(torch.randn(4, 10), torch.randn(4, 10), 5, 1), "i=5"),
])
def test_bad_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_matrix_is_refused():
    with pytest.raises(TypeError, match="floating"):
        best_rank_r(torch.ones(3, 3, dtype=torch.int64), 1)
