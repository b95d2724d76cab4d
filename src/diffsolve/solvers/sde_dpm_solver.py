r"""SDE-DPM-Solver and SDE-DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095, §5): exponential
integrators of the reverse-time SDE — diffusers' ``algorithm_type="sde-dpmsolver"`` and
``"sde-dpmsolver++"`` ("DPM++ 2M SDE").

**The SDE.** The reverse-time SDE of the forward process :math:`x_t = \alpha_t x_0 +
\sigma_t\epsilon` (Song et al. 2021, Anderson 1982),
:math:`dx = [f(t)x - g^2(t)\nabla\log p_t(x)]\,dt + g(t)\,d\bar w` with
:math:`f = d\log\alpha/dt`, :math:`g^2 = d\sigma^2/dt - 2f\sigma^2 = -2\sigma^2\,d\lambda/dt`,
has the same marginals as the probability-flow ODE. Written in
:math:`\lambda = \log(\alpha/\sigma)` with :math:`\nabla\log p = -\hat\epsilon/\sigma`, its
linear part and its noise integrate exactly over a step :math:`s \to t`,
:math:`h = \lambda_t - \lambda_s` (Lu et al. 2022b, eqs. (9)–(10)):

* data prediction (``space="data"``, SDE-DPM-Solver++):

  .. math:: x_t = \frac{\sigma_t}{\sigma_s} e^{-h} x_s
            + 2\alpha_t \int_0^h e^{-2(h-u)} \hat x_0(\lambda_s + u)\,du
            + \sigma_t \sqrt{1 - e^{-2h}}\; z;

* noise prediction (``space="noise"``, SDE-DPM-Solver):

  .. math:: x_t = \frac{\alpha_t}{\alpha_s} x_s
            - 2\sigma_t \int_0^h e^{h-u} \hat\epsilon(\lambda_s + u)\,du
            + \sigma_t \sqrt{e^{2h} - 1}\; z,

with :math:`z \sim \mathcal N(0, I)` fresh at every step. The Gaussian term is exact; only the
prediction is interpolated. With its Taylor expansion in normalised derivatives
:math:`d_n = h^n \hat x_0^{(n)}`, the integral is :math:`\alpha_t \sum_n 2h\,\varphi_{n+1}(-2h)
\, d_n` (data; substitute :math:`v = 2u` in the ODE's :math:`h\varphi_{n+1}(-h)`), and
:math:`-\sigma_t \sum_n 2h\,\varphi_{n+1}(h)\, d_n` (noise). So order 1 is
:math:`\alpha_t(1 - e^{-2h})\hat x_0` (data) and :math:`-2\sigma_t(e^h - 1)\hat\epsilon`
(noise); order 2 ``"heun"`` (diffusers' name; the exact integral of the linear interpolant,
as ``"taylor"``) weights :math:`D_1 = (D_0 - D_{-1})/r` by
:math:`\alpha_t\big(\tfrac{1 - e^{-2h}}{-2h} + 1\big)` resp.
:math:`-2\sigma_t\big(\tfrac{e^h - 1}{h} - 1\big)`, and ``"midpoint"`` by half the first-order
weight; order 3 integrates the quadratic interpolant through three points exactly (3M SDE).

A step to clean data (``σ = 0``) returns :math:`\hat x_0` (no noise: :math:`\sigma_t = 0`). A
step from pure noise (``α = 0``, flow matching's σ = 1) is the exact limit
:math:`x_t = \alpha_t\hat x_0 + \sigma_t z`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from diffsolve.numerics.expint import ExpStep, Space
from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.dpm_solver import ei_weights
from diffsolve.solvers.engine import (
    FINAL,
    GridValues,
    MultistepStep,
    StepPlan,
    Update,
    check_options,
    check_order,
    multistep_orders,
)
from diffsolve.solvers.registry import Preset, register

SDESolverType = Literal["midpoint", "heun", "taylor"]


def tau_sde_step(at: GridValues, i: int, tau: float = 1.0) -> tuple[ExpStep, float]:
    """The data-prediction step ``i → i+1`` of the τ-SDE family (SA-Solver's; τ = 1 is the
    reverse SDE, τ = 0 the ODE) as an :class:`ExpStep` whose ``coef(n)`` weight the
    normalised derivatives — the ODE's integral at H = (1 + τ²) h — and the noise's
    standard deviation σ_t √(1 − exp(−2τ² h))."""
    s_s, a_t, s_t = at.sigma[i], at.alpha[i + 1], at.sigma[i + 1]
    h = at.lam[i + 1] - at.lam[i]
    big = (1.0 + tau * tau) * h
    step = ExpStep(a=s_t / s_s * math.exp(-tau * tau * h), c=a_t, h=big, z=-big, space="data")
    return step, s_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))


def sde_step(space: Space, at: GridValues, i: int) -> tuple[ExpStep, float]:
    """The SDE step ``i → i+1`` as an :class:`ExpStep` whose ``coef(n)`` are the weights of
    the normalised derivatives (see the module docstring), and the noise's standard
    deviation."""
    if space == "data":
        return tau_sde_step(at, i)
    a_s, a_t, s_t = at.alpha[i], at.alpha[i + 1], at.sigma[i + 1]
    h = at.lam[i + 1] - at.lam[i]
    step = ExpStep(a=a_t / a_s, c=-2 * s_t, h=h, z=h, space="noise")
    return step, s_t * math.sqrt(math.expm1(2 * h))


@register
@dataclass(frozen=True)
class SDEDPMSolver(Solver):
    """SDE-DPM-Solver, multistep (noise prediction; diffusers' ``sde-dpmsolver``).

    Args:
        order: 1, 2 or 3 (3: exact quadratic interpolant).
        solver_type: ``"midpoint"`` or ``"heun"`` (order 2; see the module docstring;
            ``"taylor"`` is ``"heun"``, as for the ODE solvers).
        lower_order_final: Lower the order on the last steps to ``min(order, steps_left)``.
        euler_at_final: Take the last step at first order (diffusers' option).
    """

    order: int = 2
    solver_type: SDESolverType = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    space: ClassVar[Space] = "noise"
    stochastic: ClassVar[bool] = True
    name: ClassVar[str] = "sde-dpm-solver"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset(
            "sde-dpm-solver-1", "SDE-DPM-Solver-1 (noise prediction, stochastic)", {"order": 1}
        ),
        Preset(
            "sde-dpm-solver-2m", "SDE-DPM-Solver, multistep order 2 (stochastic)", {"order": 2}
        ),
    )

    def __post_init__(self) -> None:
        check_order(self.order, (1, 2, 3), type(self).__name__)
        check_options(self)

    def min_steps(self) -> int:
        return self.order

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        orders = multistep_orders(at, self.order, self.lower_order_final, self.euler_at_final)
        steps = [
            MultistepStep(at.t[i], at.t[i + 1], self._update(at, i, p))
            for i, p in enumerate(orders)
        ]
        return StepPlan(schedule, grid, tuple(steps))

    def _update(self, at: GridValues, i: int, order: int) -> Update:
        """The update of step ``i`` at ``order`` (first order from pure noise)."""
        if at.is_final(i):
            return FINAL
        if at.alpha[i] == 0.0:  # from pure noise: x_t = alpha_t x0 + sigma_t z, exactly
            return Update(0.0, (at.alpha[i + 1],), "data", noise=at.sigma[i + 1])
        step, noise = sde_step(self.space, at, i)
        solver_type = "midpoint" if self.solver_type == "midpoint" else "taylor"
        weights = ei_weights(step, at.nodes(i, range(i, i - order, -1)), solver_type)
        return Update(step.a, weights, self.space, noise=noise)


@register
@dataclass(frozen=True)
class SDEDPMSolverPP(SDEDPMSolver):
    """SDE-DPM-Solver++, multistep (data prediction; diffusers' ``sde-dpmsolver++``, the
    "DPM++ 2M SDE" of Stable Diffusion front ends). Arguments as :class:`SDEDPMSolver`."""

    space: ClassVar[Space] = "data"
    name: ClassVar[str] = "sde-dpm-solver++"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("dpm-solver++-sde", "SDE-DPM-Solver++ order 1 (data prediction, stochastic)",
               {"order": 1}),
        Preset("dpm-solver++-2m-sde", "DPM-Solver++(2M) SDE, midpoint (stochastic)",
               {"order": 2}),
        Preset("dpm-solver++-2m-sde-heun", "DPM-Solver++(2M) SDE, heun (stochastic)",
               {"order": 2, "solver_type": "heun"}),
        Preset("dpm-solver++-3m-sde", "DPM-Solver++(3M) SDE, exact quadratic (stochastic)",
               {"order": 3}),
    )  # fmt: skip
