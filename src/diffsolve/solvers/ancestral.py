r"""Ancestral samplers: DDPM / DDIM with :math:`\eta` (Ho et al. 2020; Song et al. 2021,
"Denoising Diffusion Implicit Models", eq. (16)) and Euler ancestral (k-diffusion's
``sample_euler_ancestral``).

**DDPM / DDIM-η.** A step :math:`s \to t` samples the posterior
:math:`q(x_t \mid x_s, \hat x_0)` of the forward process, its variance scaled by
:math:`\eta^2`: with :math:`h = \lambda_t - \lambda_s`,

.. math::

    \sigma_\eta = \eta\,\sigma_t\sqrt{1 - e^{-2h}}, \qquad
    x_t = \alpha_t\hat x_0 + \sqrt{\sigma_t^2 - \sigma_\eta^2}\;\hat\epsilon + \sigma_\eta z,

(DDIM's :math:`\eta\sqrt{(1-\bar\alpha_t)/(1-\bar\alpha_s)}\sqrt{1-\bar\alpha_s/\bar\alpha_t}`
written for any :math:`\alpha, \sigma`). :math:`\eta = 0` is DDIM; :math:`\eta = 1` is DDPM's
ancestral step, and equals SDE-DPM-Solver++ of order 1 exactly
(:mod:`~diffsolve.solvers.sde_dpm_solver`).

**Euler ancestral.** In EDM's variables :math:`y = x/\alpha`, :math:`\rho = \sigma/\alpha`: split
the next level into :math:`\rho_{up} = \min(\rho_t, \eta\sqrt{\rho_t^2(\rho_s^2 -
\rho_t^2)/\rho_s^2})` and :math:`\rho_{down} = \sqrt{\rho_t^2 - \rho_{up}^2}`, take Euler's
step :math:`\rho_s \to \rho_{down}`, then add :math:`\rho_{up} z`.

Both reach clean data (``σ = 0``) by returning :math:`\hat x_0`, and start from pure noise
(``α = 0``) by their exact limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    FINAL,
    GridValues,
    StageStep,
    StepPlan,
    Update,
)
from diffsolve.solvers.registry import Preset, register


def _check_eta(eta: float, solver: str) -> None:
    if not (isinstance(eta, int | float) and math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"{solver}: eta must be a number in [0, 1], got {eta!r}")


def single_plan(at: GridValues, update: Callable[[GridValues, int], Update]) -> StepPlan:
    """A one-evaluation-per-step plan: ``update(at, i)`` for each step, :data:`FINAL` for a
    step that ends at clean data."""
    steps = tuple(
        StageStep(at.t[i], at.t[i + 1], (at.t[i],), (FINAL if at.is_final(i) else update(at, i),))
        for i in range(at.num_steps)
    )
    return StepPlan(at.schedule, at.grid, steps)


def ddpm_update(at: GridValues, i: int, eta: float) -> Update:
    """The DDIM-η step ``i → i+1`` on the data prediction (see the module docstring):
    :math:`x_t = \\frac{c}{\\sigma_s}x_s + (\\alpha_t - c\\frac{\\alpha_s}{\\sigma_s})\\hat x_0
    + \\sigma_\\eta z`, :math:`c = \\sqrt{\\sigma_t^2 - \\sigma_\\eta^2}`."""
    a_s, s_s, a_t, s_t = at.alpha[i], at.sigma[i], at.alpha[i + 1], at.sigma[i + 1]
    h = at.lam[i + 1] - at.lam[i]
    noise = eta * s_t * math.sqrt(-math.expm1(-2 * h))
    c = math.sqrt(max(s_t * s_t - noise * noise, 0.0))
    return Update(c / s_s, (a_t - c * a_s / s_s,), "data", noise=noise)


def euler_ancestral_update(at: GridValues, i: int, eta: float) -> Update:
    """k-diffusion's ancestral Euler step ``i → i+1`` on :math:`x = \\alpha y`:
    :math:`x_t = \\alpha_t\\big(\\frac{\\rho_{down}}{\\rho_s}\\frac{x_s}{\\alpha_s} +
    (1 - \\frac{\\rho_{down}}{\\rho_s})\\hat x_0 + \\rho_{up} z\\big)`."""
    a_s, s_s, a_t, s_t = at.alpha[i], at.sigma[i], at.alpha[i + 1], at.sigma[i + 1]
    rho_t = s_t / a_t
    # rho_s^2 - rho_t^2 over rho_s^2, written to stay finite from pure noise (alpha_s = 0)
    shrink = 1.0 - (rho_t * a_s / s_s) ** 2
    up = min(rho_t, eta * rho_t * math.sqrt(max(shrink, 0.0)))
    down = math.sqrt(max(rho_t * rho_t - up * up, 0.0))
    return Update(a_t * down / s_s, (a_t * (1.0 - down * a_s / s_s),), "data", noise=a_t * up)


@dataclass(frozen=True)
class _Ancestral(Solver):
    """One evaluation per step, each taking :attr:`step_update` (fresh noise scaled by
    ``eta``); a step to clean data returns :math:`\\hat x_0`."""

    eta: float = 1.0
    order: int = 1

    stochastic: ClassVar[bool] = True
    #: ``(grid values, step index, eta) -> Update`` of the method.
    step_update: ClassVar[Callable[[GridValues, int, float], Update]]

    def __post_init__(self) -> None:
        _check_eta(self.eta, type(self).__name__)

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        update = type(self).step_update
        return single_plan(GridValues.of(schedule, grid), lambda at, i: update(at, i, self.eta))


@register
@dataclass(frozen=True)
class DDPM(_Ancestral):
    """DDPM / DDIM-η ancestral sampling; one evaluation per step.

    Args:
        eta: Posterior noise scale in [0, 1] (1: DDPM; 0: DDIM, deterministic).
    """

    name: ClassVar[str] = "ddpm"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("ddpm", "DDPM ancestral sampling (DDIM with eta = 1; stochastic)"),
    )
    step_update = ddpm_update


@register
@dataclass(frozen=True)
class EulerAncestral(_Ancestral):
    """Euler ancestral (k-diffusion, diffusers' ``EulerAncestralDiscreteScheduler``); one
    evaluation per step.

    Args:
        eta: Share of the step's noise that is fresh (1: k-diffusion's default).
    """

    name: ClassVar[str] = "euler-ancestral"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("euler-ancestral", "Euler ancestral, eta = 1 (k-diffusion; stochastic)"),
    )
    step_update = euler_ancestral_update
