"""Gaussian data models: closed-form denoisers and ODE solutions (:mod:`.analytic`), and
the statistics files estimated from data for teleportation (:mod:`.estimate`)."""

from diffsolve.stats.gaussian.analytic import (
    GaussianDenoiser,
    GaussianMixtureModel,
    GaussianModel,
)
from diffsolve.stats.gaussian.estimate import (
    GaussianStats,
    compute_gaussian_stats,
    load_gaussian_stats,
)

__all__ = [
    "GaussianDenoiser",
    "GaussianMixtureModel",
    "GaussianModel",
    "GaussianStats",
    "compute_gaussian_stats",
    "load_gaussian_stats",
]
