r"""Euler and Heun, deterministic (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 1 with :math:`S_{churn} = 0`).

Both step the ODE :math:`dy/d\rho = (y - D(y;\rho))/\rho` in the EDM variables
:math:`y = x/\alpha`, :math:`\rho = \sigma/\alpha` (``ρ`` is EDM's σ), for any schedule. Euler is
algebraically DDIM; Heun adds the trapezoidal correction and costs two evaluations per step,
except on a final step to :math:`\rho = 0`, where Algorithm 1 takes the Euler step only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    SinglestepPlan,
    SinglestepStep,
    Solver,
    Update,
    check_order,
)


def _euler_update(v: GridValues, i: int) -> Update:
    """Euler step (Alg. 1 lines 4–5): :math:`d_i = (y_i - D_i)/\\rho_i,\\ y' = y_i +
    (\\rho_{i+1} - \\rho_i) d_i`, written on :math:`x = \\alpha y`."""
    a_i, a_n = v.alpha[i], v.alpha[i + 1]
    rho_i, rho_n = v.sigma[i] / a_i, v.sigma[i + 1] / a_n
    return Update(a_n / a_i * rho_n / rho_i, (a_n * (1.0 - rho_n / rho_i),), "x0")


def _heun_update(v: GridValues, i: int) -> Update:
    """Heun step (Alg. 1 lines 6–8): :math:`y_{i+1} = y_i + \\tfrac{\\Delta}{2}(d_i + d')`,
    :math:`d' = (y' - D')/\\rho_{i+1}`, :math:`\\Delta = \\rho_{i+1} - \\rho_i`, expanded into
    weights on :math:`x_i`, :math:`D_i` and :math:`D' = D(y'; \\rho_{i+1})`."""
    a_i, a_n = v.alpha[i], v.alpha[i + 1]
    rho_i, rho_n = v.sigma[i] / a_i, v.sigma[i + 1] / a_n
    delta = rho_n - rho_i
    w_d = -a_n * 0.5 * delta * (rho_n + delta) / (rho_i * rho_n)
    w_d_prime = -a_n * 0.5 * delta / rho_n
    return Update(a_n / a_i * rho_n / rho_i, (w_d, w_d_prime), "x0")


@dataclass(frozen=True)
class Euler(Solver):
    """Euler's method on :math:`(x/\\alpha, \\sigma/\\alpha)`; one evaluation per step."""

    order: int = 1
    name: ClassVar[str] = "euler"

    def __post_init__(self) -> None:
        check_order(self.order, (1,), "Euler")

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> SinglestepPlan:
        v = GridValues.of(schedule, grid)
        steps = tuple(
            SinglestepStep(v.t[i], v.t[i + 1], (v.t[i],), (_euler_update(v, i),))
            for i in range(len(v.t) - 1)
        )
        return SinglestepPlan(schedule, grid, steps)


@dataclass(frozen=True)
class Heun(Solver):
    """Heun's second-order method (EDM Algorithm 1); two evaluations per step."""

    order: int = 2
    name: ClassVar[str] = "heun"

    def __post_init__(self) -> None:
        check_order(self.order, (2,), "Heun")

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> SinglestepPlan:
        v = GridValues.of(schedule, grid)
        steps = []
        for i in range(len(v.t) - 1):
            euler = _euler_update(v, i)
            if v.sigma[i + 1] == 0.0:  # Alg. 1 line 6: no correction when sigma_{i+1} = 0
                steps.append(SinglestepStep(v.t[i], v.t[i + 1], (v.t[i],), (euler,)))
            else:
                stages = (v.t[i], v.t[i + 1])
                steps.append(
                    SinglestepStep(v.t[i], v.t[i + 1], stages, (euler, _heun_update(v, i)))
                )
        return SinglestepPlan(schedule, grid, tuple(steps))
