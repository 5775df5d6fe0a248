"""Low-rank linear algebra behind LoRA: best rank-r approximation, energy spectrum, subspace similarity.

Layer 1 (pure ideas, torch only). Every function takes ordinary tensors and returns ordinary tensors or
numbers; nothing here knows about models or training.

    W (m, n) = U diag(S) V^T          singular value decomposition, S sorted descending
    W_r      = U[:, :r] diag(S[:r]) V[:, :r]^T      best rank-r approximation (Eckart-Young)
    ||W - W_r||_F^2 = sum_{i>r} S_i^2                 the error is the energy left out

LoRA (arXiv 2106.09685, Section 4.1) bets that the *update* Delta W of fine-tuning has a low
"intrinsic rank", so it can be written as B @ A with B (m, r), A (r, n): r (m + n) numbers instead of
m n. Section 7 checks the bet with the subspace similarity of :func:`subspace_similarity`.
"""
from __future__ import annotations

import torch

from ._checks import as_int, check_int

__all__ = [
    "best_rank_r",
    "approximation_error",
    "energy_spectrum",
    "rank_for_energy",
    "factorised_size",
    "subspace_similarity",
]


def _check_matrix(W: torch.Tensor, name: str = "W") -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2 dimensions), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {W.dtype}")


def _check_rank(r: int, W: torch.Tensor) -> None:
    full = min(W.shape)
    if as_int(r) is None or not 1 <= r <= full:
        raise ValueError(f"rank r={r!r} must be an integer in [1, min{tuple(W.shape)} = {full}]")


def best_rank_r(W: torch.Tensor, r: int) -> torch.Tensor:
    """The rank-r matrix closest to W in Frobenius (and spectral) norm: truncated SVD.

    Eckart-Young-Mirsky: W_r = U[:, :r] diag(S[:r]) V^T[:r] minimises ||W - X||_F over rank(X) <= r.

    Shapes: W (m, n) -> (m, n), same dtype as W. The SVD runs in float32 (or float64 when W is
    float64) because torch has no half-precision SVD.
    """
    _check_matrix(W)
    _check_rank(r, W)
    work = W.double() if W.dtype == torch.float64 else W.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(W.dtype)


def approximation_error(W: torch.Tensor, r: int) -> float:
    """Relative error ||W - W_r||_F / ||W||_F of the best rank-r approximation.

    Computed from the singular values alone: sqrt(sum_{i>r} S_i^2 / sum_i S_i^2) = sqrt(1 - energy(r)).
    """
    _check_matrix(W)
    _check_rank(r, W)
    return float((1.0 - energy_spectrum(W)[r - 1]).clamp(min=0.0).sqrt())


def energy_spectrum(W: torch.Tensor) -> torch.Tensor:
    """Cumulative energy E[k] = sum_{i<=k} S_i^2 / sum_i S_i^2, for k = 1 .. min(m, n).

    E[r-1] is the fraction of ||W||_F^2 that the best rank-r approximation keeps. A random Gaussian
    matrix climbs almost linearly (its singular values are spread, Marchenko-Pastur); a low-rank-ish
    matrix reaches 0.9 after a few components. Returns a float64 vector of length min(m, n); a zero
    matrix has no energy and raises.
    """
    _check_matrix(W)
    S = torch.linalg.svdvals(W.double())
    total = (S ** 2).sum()
    if not torch.isfinite(total) or total == 0:
        raise ValueError(f"W has no finite, non-zero energy (sum of squared singular values = {total.item()})")
    return torch.cumsum(S ** 2, 0) / total


def rank_for_energy(W: torch.Tensor, fraction: float) -> int:
    """Smallest r whose best rank-r approximation keeps at least `fraction` of ||W||_F^2.

    A practical "intrinsic rank": rank_for_energy(DeltaW, 0.9) is how many LoRA components would have
    captured 90% of a full fine-tuning update.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    E = energy_spectrum(W)
    # a small tolerance so that fraction=1.0 is reached despite rounding in the cumulative sum
    return int(torch.searchsorted(E, torch.tensor(fraction - 1e-12, dtype=E.dtype, device=E.device)).item()) + 1


def factorised_size(m: int, n: int, r: int) -> int:
    """Numbers stored by a rank-r factorisation B (m, r) @ A (r, n) of an (m, n) matrix: r (m + n).

    Against m n for the full matrix: the ratio m n / (r (m + n)) is d / (2 r) for a square d x d
    matrix (4096 x 4096 at r = 16: 16,777,216 / 131,072 = 128).
    """
    m, n, r = (check_int(name, v, minimum=1) for name, v in (("m", m), ("n", n), ("r", r)))
    if r > min(m, n):
        raise ValueError(f"r={r} exceeds min(m, n) = {min(m, n)}: the factorisation would be larger than needed")
    return r * (m + n)


def _orthonormal_rows(A: torch.Tensor, name: str) -> torch.Tensor:
    """Right singular vectors of A (r, n) as columns, (n, r), ordered by singular value."""
    _check_matrix(A, name)
    _, _, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return Vh.T


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """Grassmann similarity of the top-i and top-j directions of two LoRA A matrices (LoRA, Section 7).

        phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)   in [0, 1]

    where U1, U2 are the right-singular vectors of A1 (r1, n) and A2 (r2, n): the directions of input
    space that each adapter reads. 1 means one subspace contains the other, 0 means orthogonal. The
    paper compares r=8 and r=64 adapters of GPT-3 and finds the top directions shared (phi > 0.5 for
    i = 1) while the rest look like noise.
    """
    U1 = _orthonormal_rows(A1, "A1")
    U2 = _orthonormal_rows(A2, "A2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 must read the same input size, got {A1.shape[1]} and {A2.shape[1]}")
    for name, k, U in (("i", i, U1), ("j", j, U2)):
        if as_int(k) is None or not 1 <= k <= U.shape[1]:
            raise ValueError(f"{name}={k!r} must be an integer in [1, {U.shape[1]}]")
    overlap = U1[:, :i].T @ U2[:, :j]          # (i, j)
    return float((overlap ** 2).sum() / min(i, j))
