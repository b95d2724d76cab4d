r"""Gaussian data :math:`\mathcal N(\mu, U\Lambda U^\top)`: exact denoiser and exact
probability-flow ODE solution under any schedule.

With :math:`U` a :math:`D\times r` orthonormal basis (:math:`r \le D`; the complement
:math:`P_\perp = I - UU^\top` carries no variance) and
:math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`:

.. math::

    \mathbb E[x_0 \mid x_t] = \mu + U\,\mathrm{diag}\!\Big(\frac{\alpha_t\lambda_k}
        {\alpha_t^2\lambda_k + \sigma_t^2}\Big) U^\top (x_t - \alpha_t\mu),

and the probability-flow ODE from :math:`(x_T, T)` has the closed-form solution
(Wang & Vastola 2023, arXiv 2311.10892; ``reference/accelerations.md`` §1)

.. math::

    x_t = \alpha_t\mu + \sum_k \sqrt{\frac{\alpha_t^2\lambda_k+\sigma_t^2}
        {\alpha_T^2\lambda_k+\sigma_T^2}}\; c_k u_k + \frac{\sigma_t}{\sigma_T} P_\perp
        (x_T - \alpha_T\mu), \qquad c_k = u_k^\top(x_T - \alpha_T\mu).

This is the test oracle for every solver's order and the engine of analytic teleportation.
All linear algebra runs in float64; results come back in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffsolve.ode.model import Prediction
from diffsolve.ode.schedule import NoiseSchedule

_F64 = torch.float64


class GaussianModel:
    """Data distributed as :math:`\\mathcal N(\\mu, U\\,\\mathrm{diag}(\\lambda)\\,U^\\top)`.

    Args:
        mean: :math:`\\mu`, shaped like one sample (any shape; flattened internally).
        eigvals: :math:`\\lambda_k \\ge 0`, shape ``(r,)``.
        eigvecs: :math:`U`, shape ``(D, r)`` with orthonormal columns.
    """

    def __init__(self, mean: Tensor, eigvals: Tensor, eigvecs: Tensor) -> None:
        self.shape = tuple(mean.shape)
        self.mean = mean.detach().to(_F64).flatten()
        self.eigvals = eigvals.detach().to(_F64).flatten()
        self.eigvecs = eigvecs.detach().to(_F64)
        d, r = self.eigvecs.shape if self.eigvecs.ndim == 2 else (-1, -1)
        if d != self.mean.numel() or r != self.eigvals.numel():
            raise ValueError(
                f"GaussianModel: eigvecs must have shape (D, r) = ({self.mean.numel()}, "
                f"{self.eigvals.numel()}), got {tuple(self.eigvecs.shape)}"
            )
        if (self.eigvals < 0).any() or not torch.isfinite(self.eigvals).all():
            raise ValueError("GaussianModel: eigenvalues must be finite and >= 0")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.eigvecs).all()):
            raise ValueError("GaussianModel: the mean and eigenvectors must be finite")
        gram = self.eigvecs.T @ self.eigvecs
        if not torch.allclose(gram, torch.eye(r, dtype=_F64), atol=1e-8):
            raise ValueError("GaussianModel: eigenvector columns must be orthonormal")

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_covariance(cls, mean: Tensor, covariance: Tensor) -> GaussianModel:
        """Full-rank model from a :math:`D\\times D` covariance (eigendecomposed in float64)."""
        cov = covariance.detach().to(_F64)
        eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        return cls(mean, eigvals.clamp(min=0.0), eigvecs)

    @classmethod
    def fit(cls, data: Tensor, rank: int | None = None) -> GaussianModel:
        """Fit mean and top-``rank`` principal components (all if ``None``) to ``data``
        shaped ``(N, *sample_shape)``."""
        x = data.detach().to(_F64).flatten(1)
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / max(x.shape[0] - 1, 1)
        eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        order = torch.argsort(eigvals, descending=True)[: rank or eigvals.numel()]
        return cls(mean.reshape(data.shape[1:]), eigvals[order].clamp(min=0), eigvecs[:, order])

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        rank: int | None = None,
        seed: int = 0,
        eig_range: tuple[float, float] = (0.05, 2.0),
    ) -> GaussianModel:
        """A random test model: mean in [-0.5, 0.5], eigenvalues log-uniform in ``eig_range``."""
        g = torch.Generator().manual_seed(seed)
        d = 1
        for s in shape:
            d *= s
        r = rank or d
        mean = torch.rand(tuple(shape), generator=g, dtype=_F64) - 0.5
        q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=_F64))
        lo, hi = torch.log(torch.tensor(eig_range, dtype=_F64))
        eigvals = torch.exp(lo + (hi - lo) * torch.rand(r, generator=g, dtype=_F64))
        return cls(mean, eigvals, q)

    # ---- quantities --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Data dimension :math:`D`."""
        return self.mean.numel()

    def fingerprint(self) -> str:
        """A hash of the mean and covariance rounded to 6 significant digits (stable across
        BLAS builds, unlike the eigenvectors' signs)."""
        return _round_hash(self.mean, self.covariance())

    def covariance(self) -> Tensor:
        """:math:`U\\Lambda U^\\top` (float64, ``(D, D)``)."""
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples (float64)."""
        z = torch.randn(n, self.eigvals.numel(), generator=generator, dtype=_F64)
        x = self.mean + (z * self.eigvals.sqrt()) @ self.eigvecs.T
        return x.reshape(n, *self.shape)

    def denoise(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Exact posterior mean :math:`\\mathbb E[x_0 \\mid x_t = x]` at
        :math:`(\\alpha, \\sigma)`."""
        y = x.to(_F64).flatten(1) - alpha * self.mean
        gain = alpha * self.eigvals / (alpha**2 * self.eigvals + sigma**2)
        x0 = self.mean + ((y @ self.eigvecs) * gain) @ self.eigvecs.T
        return x0.reshape(x.shape).to(x.dtype)

    def solution(
        self, x_start: Tensor, t_start: float, t_end: float | Tensor, schedule: NoiseSchedule
    ) -> Tensor:
        """Exact probability-flow ODE solution from ``(x_start, t_start)`` to ``t_end``.

        ``t_end`` may be a 1-D tensor of times; the result then has a leading time axis.
        """
        times = torch.as_tensor(t_end, dtype=_F64)
        scalar = times.ndim == 0
        times = times.reshape(-1)
        a_T, s_T = float(schedule.alpha(t_start)), float(schedule.sigma(t_start))
        y = x_start.detach().to(_F64).flatten(1) - a_T * self.mean
        coords = y @ self.eigvecs  # c_k, (B, r)
        perp = y - coords @ self.eigvecs.T  # P_perp (x_T - alpha_T mu)
        a_t, s_t = schedule.alpha(times), schedule.sigma(times)  # (n,)
        var_T = a_T**2 * self.eigvals + s_T**2
        scale = torch.sqrt((a_t[:, None] ** 2 * self.eigvals + s_t[:, None] ** 2) / var_T)
        out = (
            a_t[:, None, None] * self.mean
            + (coords[None] * scale[:, None, :]) @ self.eigvecs.T
            + (s_t / s_T)[:, None, None] * perp[None]
        )
        out = out.reshape(times.numel(), *x_start.shape).to(x_start.dtype)
        return out[0] if scalar else out

    def denoiser(self, schedule: NoiseSchedule) -> GaussianDenoiser:
        """This model as a :class:`~diffsolve.ode.model.Denoiser` under ``schedule``."""
        return GaussianDenoiser(self, schedule)


class GaussianDenoiser:
    """The exact denoiser of an analytic model (anything with ``denoise(x, alpha, sigma)``,
    e.g. :class:`GaussianModel`, :class:`GaussianMixtureModel`), usable by every solver."""

    def __init__(
        self, model: GaussianModel | GaussianMixtureModel, schedule: NoiseSchedule
    ) -> None:
        self.gaussian = model
        self.schedule = schedule
        self._cache: dict[float, tuple[float, float]] = {}
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The analytic model's fingerprint (computed once, then cached)."""
        if self._fingerprint is None:
            self._fingerprint = self.gaussian.fingerprint()
        return self._fingerprint

    def weights_fingerprint(self) -> str:
        """The analytic model's fingerprint (see :attr:`fingerprint`)."""
        return self.fingerprint

    def __call__(self, x: Tensor, t: float) -> Prediction:
        coefficients = self._cache.get(t)
        if coefficients is None:
            coefficients = (float(self.schedule.alpha(t)), float(self.schedule.sigma(t)))
            self._cache[t] = coefficients
        alpha, sigma = coefficients
        return Prediction.from_x0(x, self.gaussian.denoise(x, alpha, sigma), alpha, sigma, t)

    def differentiable_eps(self, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`\hat\epsilon(x, t)`, differentiable in ``x`` and a float64 0-dim ``t``."""
        log_alpha, log_sigma = self.schedule.log_alpha_sigma(t)
        alpha, sigma = torch.exp(log_alpha), torch.exp(log_sigma)
        return (x - alpha * self.gaussian.denoise(x, alpha, sigma)) / sigma


class GaussianMixtureModel:
    r"""A mixture :math:`\sum_c \pi_c\,\mathcal N(\mu_c, \Sigma_c)` with its exact denoiser.

    Under :math:`x_t = \alpha x_0 + \sigma\epsilon` each component is Gaussian with
    :math:`\mathcal N(\alpha\mu_c, \alpha^2\Sigma_c + \sigma^2 I)`, so

    .. math::

        \mathbb E[x_0 \mid x_t] = \sum_c w_c(x_t)\Big(\mu_c + \alpha\Sigma_c(\alpha^2\Sigma_c
            + \sigma^2 I)^{-1}(x_t - \alpha\mu_c)\Big),

    with responsibilities :math:`w_c \propto \pi_c\,\mathcal N(x_t; \alpha\mu_c, \alpha^2\Sigma_c
    + \sigma^2 I)`, evaluated through each component's eigendecomposition in float64. There is
    no closed-form ODE solution for a mixture; it serves as an analytic benchmark model.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        self.shape = tuple(means.shape[1:])
        self.log_weights = torch.log(weights.detach().to(_F64) / weights.sum())
        self.means = means.detach().to(_F64).flatten(1)
        cov = covariances.detach().to(_F64)
        eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
        self.eigvals, self.eigvecs = eigvals.clamp(min=0.0), eigvecs  # (C, D), (C, D, D)

    @classmethod
    def fit(cls, data: Tensor, labels: Tensor, shrinkage: float = 1e-4) -> GaussianMixtureModel:
        """One component per label value (weights = label frequencies), with
        ``shrinkage · I`` added to each covariance."""
        x = data.detach().to(_F64).flatten(1)
        classes = torch.unique(labels)
        weights, means, covs = [], [], []
        for c in classes.tolist():
            xc = x[labels == c]
            weights.append(float(len(xc)))
            means.append(xc.mean(0))
            centred = xc - xc.mean(0)
            covs.append(
                centred.T @ centred / max(len(xc) - 1, 1)
                + shrinkage * torch.eye(x.shape[1], dtype=_F64)
            )
        means_t = torch.stack(means).reshape(len(classes), *data.shape[1:])
        return cls(torch.tensor(weights, dtype=_F64), means_t, torch.stack(covs))

    def fingerprint(self) -> str:
        """A hash of the weights, means and covariances rounded to 6 significant digits."""
        cov = (self.eigvecs * self.eigvals[:, None, :]) @ self.eigvecs.transpose(1, 2)
        return _round_hash(self.log_weights, self.means, cov)

    def denoise(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Exact posterior mean :math:`\\mathbb E[x_0 \\mid x_t = x]`."""
        y = x.to(_F64).flatten(1)  # (B, D)
        var = alpha**2 * self.eigvals + sigma**2  # (C, D)
        centred = y[None] - alpha * self.means[:, None, :]  # (C, B, D)
        coords = centred @ self.eigvecs  # (C, B, D) in each component's eigenbasis
        log_like = -0.5 * ((coords**2) / var[:, None, :]).sum(-1) - 0.5 * torch.log(var).sum(
            -1, keepdim=True
        )
        resp = torch.softmax(self.log_weights[:, None] + log_like, dim=0)  # (C, B)
        gain = alpha * self.eigvals / var  # (C, D)
        posterior = self.means[:, None, :] + (coords * gain[:, None, :]) @ self.eigvecs.transpose(
            1, 2
        )
        x0 = (resp[..., None] * posterior).sum(0)
        return x0.reshape(x.shape).to(x.dtype)

    def denoiser(self, schedule: NoiseSchedule) -> GaussianDenoiser:
        """This mixture as a :class:`~diffsolve.ode.model.Denoiser` under ``schedule``."""
        return GaussianDenoiser(self, schedule)


def _round_hash(*tensors: Tensor) -> str:
    """Hash tensors quantised to 1e-5 of each one's largest magnitude: stable across BLAS
    builds and thread counts, whose rounding noise (e.g. ~1e-18 in the covariance of pixels
    that never vary) a hash of significant digits would see."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        values = tensor.detach().to(_F64).flatten()
        scale = float(values.abs().max()) if values.numel() else 0.0
        digest.update(f"{scale:.5g}".encode())
        if scale > 0:
            digest.update(torch.round(values / scale * 1e5).to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]
