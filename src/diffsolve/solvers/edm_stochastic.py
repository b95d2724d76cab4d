r"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2), on any schedule.

In EDM's variables :math:`y = x/\alpha`, :math:`\rho = \sigma/\alpha`, step :math:`i` of
:math:`N` first *churns*: with :math:`\gamma_i = \min(S_{churn}/N, \sqrt2 - 1)` where
:math:`\rho_i \in [S_{tmin}, S_{tmax}]` (else 0) it raises the noise level to
:math:`\hat\rho_i = (1 + \gamma_i)\rho_i` by adding fresh noise,

.. math:: \hat y_i = y_i + \sqrt{\hat\rho_i^2 - \rho_i^2}\; S_{noise}\, z,

then takes Heun's step of the probability-flow ODE from :math:`\hat\rho_i` to
:math:`\rho_{i+1}` (Euler's, which returns :math:`\hat x_0`, on a step to :math:`\rho = 0`).
The churn is the engine's ``start`` update of a :class:`~diffsolve.solvers.engine.StageStep`
(:math:`\hat x = \frac{\hat\alpha}{\alpha_i} x + \hat\alpha\sqrt{\hat\rho^2 - \rho^2}\,S_{noise}
z` at the churned time :math:`\hat t`); the ODE steps are
:func:`~diffsolve.solvers.euler_heun.heun_update`'s. :math:`\hat\rho` is capped at the
schedule's largest level. Defaults: the paper's ImageNet-64 settings (Table 5:
:math:`S_{churn} = 40, S_{tmin} = 0.05, S_{tmax} = 50, S_{noise} = 1.003`); ``s_churn=0`` is
Algorithm 1 (:class:`~diffsolve.solvers.euler_heun.Heun`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import GridValues, StageStep, StepPlan, Update
from diffsolve.solvers.euler_heun import edm_values, euler_update, heun_steps, heun_update
from diffsolve.solvers.registry import Preset, register


@register
@dataclass(frozen=True)
class EDMStochastic(Solver):
    """EDM Algorithm 2: churn, then Heun; two evaluations per step (one on the last).

    Args:
        s_churn: Total churn :math:`S_{churn}` (spread over the grid's steps).
        s_tmin, s_tmax: The EDM noise levels :math:`\\rho` between which steps churn.
        s_noise: Scale of the added noise (slightly above 1 offsets over-denoising).
    """

    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003
    order: int = 2

    stochastic: ClassVar[bool] = True
    name: ClassVar[str] = "edm-stochastic"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset(
            "edm-sde",
            "EDM Algorithm 2: churn (S_churn 40, ImageNet-64 settings) + Heun; stochastic",
            steps=heun_steps,
            grid="karras",
        ),
    )

    def __post_init__(self) -> None:
        values = (self.s_churn, self.s_tmin, self.s_tmax, self.s_noise)
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(
                f"EDMStochastic: s_churn, s_tmin, s_tmax, s_noise must be finite numbers "
                f">= 0, got {values}"
            )

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        rho_max = float(schedule.edm_sigma(schedule.t_max))
        steps = tuple(self._step(at, i, rho_max) for i in range(at.num_steps))
        return StepPlan(schedule, grid, steps)

    def _step(self, at: GridValues, i: int, rho_max: float) -> StageStep:
        """Churn from grid point ``i`` to :math:`\\hat t`, then Heun (Euler to ρ = 0)."""
        if at.alpha[i] == 0.0:  # from pure noise: Euler's exact limit x = alpha_n x0 + ...
            first = Update(at.sigma[i + 1] / at.sigma[i], (at.alpha[i + 1],), "data")
            return StageStep(at.t[i], at.t[i + 1], (at.t[i],), (first,))
        a_i, rho_i, a_n, rho_n = edm_values(at, i)
        gamma = 0.0
        if self.s_tmin <= rho_i <= self.s_tmax:
            gamma = min(self.s_churn / at.num_steps, math.sqrt(2.0) - 1.0)
        t_hat, start = at.t[i], None
        if gamma > 0 and rho_i < rho_max:
            rho_hat = min(rho_i * (1.0 + gamma), rho_max)
            t_hat = float(at.schedule.t_of_edm_sigma(torch.tensor(rho_hat, dtype=torch.float64)))
            a_hat = float(at.schedule.alpha(t_hat))
            jitter = a_hat * math.sqrt(rho_hat**2 - rho_i**2) * self.s_noise
            start = Update(a_hat / a_i, (), "data", noise=jitter)
            a_i, rho_i = a_hat, rho_hat
        euler = euler_update(a_i, rho_i, a_n, rho_n)
        if at.is_final(i):
            return StageStep(at.t[i], at.t[i + 1], (t_hat,), (euler,), start)
        heun = heun_update(a_i, rho_i, a_n, rho_n)
        return StageStep(at.t[i], at.t[i + 1], (t_hat, at.t[i + 1]), (euler, heun), start)
