r"""Euler and Heun, deterministic (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 1 with :math:`S_{churn} = 0`).

Both step the ODE :math:`dy/d\rho = (y - D(y;\rho))/\rho` in the EDM variables
:math:`y = x/\alpha`, :math:`\rho = \sigma/\alpha` (``ρ`` is EDM's σ), for any schedule. Euler is
algebraically DDIM; Heun adds the trapezoidal correction and costs two evaluations per step,
except on a final step to :math:`\rho = 0`, where Algorithm 1 takes the Euler step only,
which returns :math:`\hat x_0` (:data:`~diffsolve.solvers.engine.FINAL`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    StageStep,
    StepPlan,
    Update,
    check_order,
    stage_plan,
)
from diffsolve.solvers.registry import Preset, register


def euler_update(a_i: float, rho_i: float, a_n: float, rho_n: float) -> Update:
    """Euler step (Alg. 1 lines 4–5) from :math:`(\\alpha_i, \\rho_i)` to
    :math:`(\\alpha_n, \\rho_n)`: :math:`d_i = (y_i - D_i)/\\rho_i,\\ y' = y_i +
    (\\rho_n - \\rho_i) d_i`, written on :math:`x = \\alpha y`."""
    return Update(a_n / a_i * rho_n / rho_i, (a_n * (1.0 - rho_n / rho_i),), "data")


def heun_update(a_i: float, rho_i: float, a_n: float, rho_n: float) -> Update:
    """Heun step (Alg. 1 lines 6–8): :math:`y_n = y_i + \\tfrac{\\Delta}{2}(d_i + d')`,
    :math:`d' = (y' - D')/\\rho_n`, :math:`\\Delta = \\rho_n - \\rho_i`, expanded into
    weights on :math:`x_i`, :math:`D_i` and :math:`D' = D(y'; \\rho_n)`."""
    delta = rho_n - rho_i
    w_d = -a_n * 0.5 * delta * (rho_n + delta) / (rho_i * rho_n)
    w_d_prime = -a_n * 0.5 * delta / rho_n
    return Update(a_n / a_i * rho_n / rho_i, (w_d, w_d_prime), "data")


def heun_steps(nfe: int) -> int:
    """Grid steps for a budget of ``nfe`` evaluations of a Heun-type method: two per step,
    one on the last (the Euler step to t = 0); an even budget leaves one unspent."""
    return (nfe + 1) // 2


def edm_values(at: GridValues, i: int) -> tuple[float, float, float, float]:
    """:math:`(\\alpha_i, \\rho_i, \\alpha_{i+1}, \\rho_{i+1})` of grid step ``i``."""
    a_i, a_n = at.alpha[i], at.alpha[i + 1]
    return a_i, at.sigma[i] / a_i, a_n, at.sigma[i + 1] / a_n


def _euler_update(at: GridValues, i: int) -> Update:
    return euler_update(*edm_values(at, i))


def _heun_update(at: GridValues, i: int) -> Update:
    return heun_update(*edm_values(at, i))


@register
@dataclass(frozen=True)
class Euler(Solver):
    """Euler's method on :math:`(x/\\alpha, \\sigma/\\alpha)`; one evaluation per step."""

    order: int = 1

    name: ClassVar[str] = "euler"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("euler", "Euler on (x/alpha, sigma/alpha), first order (= DDIM)"),
    )

    def __post_init__(self) -> None:
        check_order(self.order, (1,), "Euler")

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        return stage_plan(
            at, lambda i: StageStep(at.t[i], at.t[i + 1], (at.t[i],), (_euler_update(at, i),))
        )


@register
@dataclass(frozen=True)
class Heun(Solver):
    """Heun's second-order method (EDM Algorithm 1); two evaluations per step."""

    order: int = 2

    name: ClassVar[str] = "heun"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset(
            "heun",
            "Heun, EDM Algorithm 1, 2 NFE per step, Karras grid",
            steps=heun_steps,
            grid="karras",
            lineup=True,
        ),
    )

    def __post_init__(self) -> None:
        check_order(self.order, (2,), "Heun")

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)

        def step(i: int) -> StageStep:
            times = (at.t[i], at.t[i + 1])
            return StageStep(
                at.t[i], at.t[i + 1], times, (_euler_update(at, i), _heun_update(at, i))
            )

        return stage_plan(at, step)
