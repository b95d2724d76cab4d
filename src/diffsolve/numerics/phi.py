r"""The φ-functions of exponential integrators, in float64.

.. math::

    \varphi_0(z) = e^z, \qquad
    \varphi_k(z) = \int_0^1 e^{(1-\theta) z} \frac{\theta^{k-1}}{(k-1)!}\, d\theta
                 = \sum_{j \ge 0} \frac{z^j}{(j+k)!}, \qquad
    \varphi_{k+1}(z) = \frac{\varphi_k(z) - 1/k!}{z}.

The recurrence loses about ``k`` digits per decade of ``|z|`` below 1, so for ``|z| < 1`` the
power series is summed instead; above it the recurrence starts from ``expm1`` (never
``exp(z) - 1``) and is well conditioned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SERIES_RADIUS = 1.0
_SERIES_TERMS = 24  # 1/24! ~ 1.6e-24: far below float64 resolution for |z| < 1


def phi(k: int, z: float) -> float:
    """Return :math:`\\varphi_k(z)` for ``k >= 0`` in float64."""
    if k < 0:
        raise ValueError(f"phi: k must be >= 0, got {k}")
    z = float(z)
    if k == 0:
        return math.exp(z)
    if abs(z) < _SERIES_RADIUS:
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(_SERIES_TERMS):
            total += term
            term *= z / (j + k + 1)
        return total
    if math.isinf(z):
        # φ_k(-∞) = 0 for k >= 1 (the limit used when a step runs to σ = 0).
        if z < 0:
            return 0.0
        raise ValueError("phi: z = +inf has no finite value")
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def phi_tensor(k: int, z: Tensor) -> Tensor:
    """Elementwise :math:`\\varphi_k(z)` of a float64 tensor (series for ``|z| < 1``)."""
    if k < 1:
        raise ValueError(f"phi_tensor: k must be >= 1, got {k}")
    small = z.abs() < _SERIES_RADIUS
    zs = torch.where(small, z, torch.zeros_like(z))
    series = torch.zeros_like(z)
    term = torch.full_like(z, 1.0 / math.factorial(k))
    for j in range(_SERIES_TERMS):
        series = series + term
        term = term * zs / (j + k + 1)
    zl = torch.where(small, torch.ones_like(z), z)
    closed = torch.expm1(zl) / zl
    for j in range(1, k):
        closed = (closed - 1.0 / math.factorial(j)) / zl
    return torch.where(small, series, closed)
