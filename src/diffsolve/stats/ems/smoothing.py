r"""Smoothing the estimator's moments in λ: local polynomial regression.

The EMS estimator (:mod:`.compute`) measures per-dimension moments at every point of a
logSNR grid from a few samples each. Their true values are smooth functions of λ, the
estimates are not: each point carries its own Monte-Carlo error. A local polynomial
regression pools neighbouring points,

.. math::

    \hat y(u) = e_0^\top (X_u^\top W_u X_u)^{-1} X_u^\top W_u\, y, \qquad
    (X_u)_{jk} = (\lambda_j - u)^k,\quad (W_u)_{jj} = e^{-(\lambda_j - u)^2 / 2h^2},

and its linear coefficient :math:`e_1^\top(\cdot)` is the derivative :math:`\hat y'(u)` — the
:math:`l'` that DPM-Solver-v3's :math:`f'` needs, without a separate finite difference. With
degree 2 the fit is unbiased for quadratics, also at the ends of the grid where a moving
average is not (Fan & Gijbels, *Local Polynomial Modelling and Its Applications*, 1996).

Why smooth moments rather than average more samples per point: on a network trained at
discrete timesteps, :math:`\partial_t\epsilon_\theta` oscillates in λ on the scale of the
timestep spacing, and only integrals of the statistics enter the solver. A coarse λ grid with
many samples per point aliases that oscillation into a bias no sample count removes; a fine
grid with few samples per point, smoothed at a bandwidth of a few grid spacings, averages it
(measured in BENCHMARKS.md §11). Everything here is a fixed linear map per grid
(an ``(n, n)`` matrix), applied to all dimensions at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

_F64 = torch.float64


def local_polynomial(
    lam_in: Tensor, lam_out: Tensor, bandwidth: float, degree: int = 2
) -> tuple[Tensor, Tensor]:
    """Matrices ``(value, derivative)``, each ``(len(lam_out), len(lam_in))``: row ``i`` maps
    samples at ``lam_in`` to the local polynomial fit's value and first derivative at
    ``lam_out[i]`` (Gaussian kernel of standard deviation ``bandwidth``). Degree 0 is the
    Nadaraya–Watson average: positive weights, so it keeps variances positive (its
    derivative matrix is zero)."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    if lam_in.numel() <= degree:
        raise ValueError(f"need more than {degree} points for a degree-{degree} fit")
    lam_in, lam_out = lam_in.to(_F64), lam_out.to(_F64)
    offsets = lam_in[None, :] - lam_out[:, None]
    weights = torch.exp(-0.5 * (offsets / bandwidth) ** 2)
    # powers of the offset in bandwidth units keep the normal equations well conditioned
    scaled = offsets / bandwidth
    design = torch.stack([scaled**k for k in range(degree + 1)], -1)  # (out, in, p + 1)
    weighted = design.transpose(1, 2) * weights[:, None, :]
    coefficients = torch.linalg.solve(weighted @ design, weighted)  # (out, p + 1, in)
    slope = coefficients[:, 1, :] / bandwidth if degree else torch.zeros_like(weights)
    return coefficients[:, 0, :], slope


def smooth(values: Tensor, matrix: Tensor) -> Tensor:
    """Apply a ``(m, n)`` smoothing matrix along axis 0 of ``values`` ``(n, *shape)``."""
    flat = values.reshape(values.shape[0], -1).to(_F64)
    return (matrix @ flat).reshape(matrix.shape[0], *values.shape[1:])


__all__ = ["local_polynomial", "smooth"]
