r"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of
Diffusion Models", arXiv 2309.05019): a stochastic Adams predictor–corrector on the data
prediction, diffusers' ``SASolverScheduler``.

**The SDE family.** For every :math:`\tau \ge 0` the SDE
:math:`dx = [f x - \tfrac{1+\tau^2}{2} g^2 \nabla\log p_t]\,dt + \tau g\, d\bar w` has the
probability-flow ODE's marginals (:math:`\tau = 0`: the ODE; :math:`\tau = 1`: the reverse SDE
of :mod:`~diffsolve.solvers.sde_dpm_solver`). Over a step :math:`s \to t`,
:math:`h = \lambda_t - \lambda_s`, its linear part and its noise integrate exactly:

.. math::

    x_t = \frac{\sigma_t}{\sigma_s} e^{-\tau^2 h} x_s
        + \alpha_t (1+\tau^2) \int_0^h e^{-(1+\tau^2)(h-u)}\, \hat x_0(\lambda_s + u)\, du
        + \sigma_t\sqrt{1 - e^{-2\tau^2 h}}\; z .

With :math:`H = (1+\tau^2) h` the integral is the ODE's exponential integral at step
:math:`H` (:math:`\alpha_t \sum_n H\varphi_{n+1}(-H)\, d_n` in the normalised derivatives), so
the **SA-Predictor** of order :math:`p` integrates the Lagrange polynomial through the last
:math:`p` predictions exactly, and the **SA-Corrector** of order :math:`q`, after the model is
evaluated at the predicted point, recomputes it from the same start with the polynomial
through the new prediction and the last :math:`q - 1` — with the *same* noise :math:`z`
(the engine keeps it in the state). The corrector costs no evaluation. :math:`\tau` is
``tau`` on steps that start inside ``tau_window`` (fractions of the schedule's largest time;
diffusers: timesteps 200–800 of 1000) and 0 outside, as diffusers' default ``tau_func``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffsolve.numerics.expint import taylor_weights
from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    StepPlan,
    Update,
    check_order,
    multistep_orders,
    multistep_plan,
)
from diffsolve.solvers.registry import Preset, register
from diffsolve.solvers.sde_dpm_solver import tau_sde_step


@register
@dataclass(frozen=True)
class SASolver(Solver):
    """SA-Solver: stochastic Adams predictor (order 1–3) and corrector (order 1–4).

    Args:
        order: Predictor order ``p`` (points it interpolates).
        corrector_order: Corrector order ``q`` (the new point and ``q - 1`` earlier ones;
            0: no corrector).
        tau: Noise scale :math:`\\tau` inside ``tau_window`` (0: deterministic).
        tau_window: ``(low, high)``, fractions of the schedule's largest time between which
            a step's start takes ``tau``.
        lower_order_final: Lower the predictor's order on the last steps.
    """

    order: int = 2
    corrector_order: int = 2
    tau: float = 1.0
    tau_window: tuple[float, float] = (0.2, 0.8)
    lower_order_final: bool = True

    stochastic: ClassVar[bool] = True
    name: ClassVar[str] = "sa-solver"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("sa-solver", "SA-Solver, predictor 2 + corrector 2, tau 1 mid-range (stochastic)"),
        Preset("sa-solver-3", "SA-Solver, predictor 3 + corrector 4 (stochastic)",
               {"order": 3, "corrector_order": 4}),
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_order(self.order, (1, 2, 3), "SASolver")
        check_order(self.corrector_order, (0, 1, 2, 3, 4), "SASolver corrector_order")
        low, high = self.tau_window
        if not (math.isfinite(self.tau) and self.tau >= 0 and 0 <= low <= high):
            raise ValueError(
                f"SASolver: tau must be >= 0 and tau_window (low, high) with 0 <= low <= high, "
                f"got tau={self.tau!r}, tau_window={self.tau_window!r}"
            )

    def min_steps(self) -> int:
        return self.order

    def tau_at(self, schedule: NoiseSchedule, t: float) -> float:
        """:math:`\\tau` of a step that starts at ``t``."""
        low, high = self.tau_window
        return self.tau if low <= t / schedule.t_max <= high else 0.0

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        orders = multistep_orders(at, self.order, self.lower_order_final)

        def predictor(i: int, p: int) -> Update:
            step, noise = tau_sde_step(at, i, self.tau_at(schedule, at.t[i]))
            weights = taylor_weights(step, at.nodes(i, range(i, i - p, -1)))
            return Update(step.a, weights, "data", noise=noise)

        def corrector(n: int) -> Update | None:
            """SA-Corrector of the step ``n-1 → n``, after evaluating at point ``n``."""
            i = n - 1
            q = min(self.corrector_order, n + 1 - at.first_usable)
            if i < at.first_usable or q < 1 or at.is_final(i):
                return None
            step, noise = tau_sde_step(at, i, self.tau_at(schedule, at.t[i]))
            if q == 1:  # the new prediction alone (implicit first order)
                return Update(step.a, (step.coef(0),), "data", noise=noise)
            # nodes: the start (0), the new point (1), then earlier points; the history is
            # newest first (new point, start, earlier ...)
            nodes = at.nodes(i, [i, n, *range(i - 1, i - q + 1, -1)])
            points = (1, 0, *range(2, q))
            return Update(step.a, taylor_weights(step, nodes), "data", points=points, noise=noise)

        return multistep_plan(at, orders, predictor, corrector if self.corrector_order else None)
