r"""The optimal EMS of Gaussian data in closed form (the estimator's test oracle).

For data :math:`\mathcal N(\mu, \Sigma)` the exact noise prediction is linear:
with :math:`P = (\alpha^2\Sigma + \sigma^2 I)^{-1}` and :math:`y = x - \alpha\mu \sim
\mathcal N(0, P^{-1})`,

.. math::

    \epsilon(x) = \sigma P y, \qquad
    l^* = \mathrm{diag}(\sigma\nabla_x\epsilon) = \sigma^2\,\mathrm{diag}(P).

Along the ODE (:math:`' = d/d\lambda`, :math:`\kappa = d\log\alpha/d\lambda`) the total
derivative is :math:`\epsilon' = H y` with
:math:`H = \sigma' P + \sigma P' + \sigma P(\kappa I - \sigma^2 P)`,
:math:`P' = -P(2\alpha\alpha'\Sigma + 2\sigma\sigma' I)P`. Then
:math:`f = (\sigma^2 P - \mathrm{diag}\,l)/\alpha\; y - l\odot\mu` and
:math:`f' = [e^{-\lambda}(\mathrm{diag}(l-1)\sigma P + H) - \mathrm{diag}(l')/\alpha]\, y -
l'\odot\mu` are affine in the Gaussian :math:`y`, so per dimension

.. math::

    s^* = \frac{F_d P^{-1} G_d^\top}{F_d P^{-1} F_d^\top}, \qquad
    b^* = \mathbb E f'_d - s^*\,\mathbb E f_d,

with :math:`F_d, G_d` the rows of those matrices and :math:`l'` the exact derivative
:math:`2\sigma\sigma'\mathrm{diag}(P) + \sigma^2\mathrm{diag}(P')`.
"""

from __future__ import annotations

import torch

from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.stats.ems.compute import ems_grid
from diffsolve.stats.ems.statistics import EMS, make_metadata, model_fingerprint
from diffsolve.stats.gaussian.analytic import GaussianModel

_F64 = torch.float64


def gaussian_ems(
    gaussian: GaussianModel,
    schedule: NoiseSchedule,
    grid_size: int = 200,
    t_start: float | None = None,
    t_end: float | None = None,
) -> EMS:
    """Exact optimal :math:`l, s, b` of ``gaussian`` on the logSNR grid :func:`compute_ems`
    uses (same ``grid_size`` and time range give the same λ's)."""
    t_start = schedule.default_range[0] if t_start is None else t_start
    t_end = schedule.default_range[1] if t_end is None else t_end
    grid = ems_grid(schedule, grid_size, t_start, t_end)
    sigma_data = gaussian.covariance()
    mu = gaussian.mean
    eye = torch.eye(mu.numel(), dtype=_F64)
    ls, ss, bs = [], [], []
    for j in range(grid_size + 1):
        lam = float(grid.lambdas[j])
        a, s = float(grid.alpha[j]), float(grid.sigma[j])
        kappa = float(grid.dlog_alpha[j])
        da = a * kappa  # d alpha / d lambda
        ds = s * (kappa - 1.0)  # d sigma / d lambda, from lambda = log alpha - log sigma
        cov = a * a * sigma_data + s * s * eye
        p = torch.linalg.inv(cov)
        dp = -p @ (2 * a * da * sigma_data + 2 * s * ds * eye) @ p
        l = s * s * torch.diagonal(p)
        dl = 2 * s * ds * torch.diagonal(p) + s * s * torch.diagonal(dp)
        h = ds * p + s * dp + s * p @ (kappa * eye - s * s * p)
        f_mat = (s * s * p - torch.diag(l)) / a
        g_mat = torch.exp(torch.tensor(-lam)) * (torch.diag(l - 1) @ (s * p) + h) - torch.diag(
            dl / a
        )
        mean_f, mean_g = -l * mu, -dl * mu
        var = torch.einsum("di,ij,dj->d", f_mat, cov, f_mat)
        covar = torch.einsum("di,ij,dj->d", f_mat, cov, g_mat)
        slope = torch.where(
            var > 0, covar / torch.where(var > 0, var, torch.ones_like(var)), torch.zeros_like(var)
        )
        ls.append(l)
        ss.append(slope)
        bs.append(mean_g - slope * mean_f)
    shape = (grid_size + 1, *gaussian.shape)
    meta = make_metadata(
        schedule,
        t_start,
        t_end,
        gaussian.shape,
        samples=0,
        model=model_fingerprint(gaussian),
        description="exact optimal EMS of a Gaussian (closed form)",
        grid_size=grid_size,
    )
    return EMS(
        grid.lambdas,
        torch.stack(ls).reshape(shape),
        torch.stack(ss).reshape(shape),
        torch.stack(bs).reshape(shape),
        meta,
    )
