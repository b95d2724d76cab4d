"""Small evaluation helpers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frechet_distance"]


def _sqrtm_psd(mat: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (via ``eigh``)."""
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sample sets.

    ``a`` (N, ...) and ``b`` (M, ...) are flattened to (N, D) and (M, D); each set is
    summarised by its mean and unbiased covariance, and the result is
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})``, computed in
    float64 with symmetric eigen-decompositions (exact for singular covariances too).
    """
    x = a.detach().reshape(a.shape[0], -1).to(device="cpu", dtype=torch.float64)
    y = b.detach().reshape(b.shape[0], -1).to(device="cpu", dtype=torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("need at least two samples in each set")
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    cov_y = torch.cov(y.T).reshape(y.shape[1], y.shape[1])
    sqrt_x = _sqrtm_psd(cov_x)
    middle = sqrt_x @ cov_y @ sqrt_x
    middle = 0.5 * (middle + middle.T)
    tr_covmean = torch.linalg.eigvalsh(middle).clamp_min(0.0).sqrt().sum()
    fd = (mu_x - mu_y).pow(2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * tr_covmean
    return float(fd.clamp_min(0.0))
