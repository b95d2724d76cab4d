r"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927): exponential integrators on the noise
prediction, single-step orders 1–3 (with the "DPM-Solver-fast" order mix) and multistep
orders 1–3.

In noise space a step :math:`s \to t` (:math:`h = \lambda_t - \lambda_s`) reads

.. math::

    x_t = \frac{\alpha_t}{\alpha_s} x_s - \sigma_t \sum_{n} h^{n+1}\varphi_{n+1}(h)\,
          \hat\epsilon^{(n)}(\lambda_s),

truncated after the order's terms; the derivatives come from earlier steps (multistep) or
from intermediate stages (single-step). :class:`~diffsolve.solvers.dpm_solver_pp.DPMSolverPP`
is the same integrator in data space, selected by the class attribute :attr:`space`.

``solver_type`` selects how the first derivative enters a second-order update: ``"taylor"``
integrates the interpolating polynomial exactly (:math:`h\varphi_2`); ``"midpoint"`` is the
paper's DPM-Solver-2 form, weighting the first difference by :math:`h\varphi_1/2`. Both are
second order and differ at :math:`O(h^3)`. For order 3, single-step ``"midpoint"`` is the
paper's DPM-Solver-3 (Alg. 3) and everything else integrates the quadratic interpolant
exactly. A step that ends at clean data (``t = 0``) returns :math:`\hat x_0`
(:data:`~diffsolve.solvers.engine.FINAL`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from diffsolve.numerics.expint import ExpStep, Space, taylor_weights
from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    StageStep,
    StepPlan,
    Update,
    check_options,
    check_order,
    multistep_orders,
    multistep_plan,
    stage_plan,
)
from diffsolve.solvers.registry import Preset, register

SolverType = Literal["midpoint", "taylor"]
Method = Literal["multistep", "singlestep"]

#: Intermediate stage positions (fractions of the λ-step) of the single-step methods.
SINGLESTEP_NODES: dict[int, tuple[float, ...]] = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def fast_orders(nfe: int, order: int = 3) -> tuple[int, ...]:
    """The "DPM-Solver-fast" order mix for a budget of ``nfe`` evaluations (Lu et al. 2022,
    §3.4): order-``order`` steps, with lower orders absorbing the remainder, e.g.
    ``nfe = 10, order = 3 → (3, 3, 3, 1)``; budgets below ``order`` use order ``nfe``.
    Build the grid with ``len(orders)`` steps."""
    check_order(order, (1, 2, 3), "fast_orders")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    order = min(order, nfe)
    if order == 1:
        return (1,) * nfe
    if order == 2:
        return (2,) * (nfe // 2) + ((1,) if nfe % 2 else ())
    tail = {0: (2, 1), 1: (1,), 2: (2,)}[nfe % 3]
    return (3,) * ((nfe - sum(tail)) // 3) + tail


def singlestep_preset(name: str, description: str, order: int, **extra: object) -> Preset:
    """A single-step preset: the DPM-Solver-fast order mix on ``nfe - 1`` evaluations, then
    the final step to ``t = 0`` (one more)."""

    def orders(nfe: int) -> tuple[int, ...]:
        return (*fast_orders(nfe - 1, order), 1)

    return Preset(
        name,
        description,
        lambda nfe: {"order": order, "method": "singlestep", "orders": orders(nfe)},
        steps=lambda nfe: len(orders(nfe)),
        **extra,  # type: ignore[arg-type]
    )


def ei_weights(step: ExpStep, nodes: list[float], solver_type: SolverType) -> tuple[float, ...]:
    """Weights on predictions at normalised ``nodes`` (``nodes[0] = 0``) for one step."""
    if len(nodes) == 2 and solver_type == "midpoint":
        # DPM-Solver-2: the first difference (D_1 - D_0)/tau_1 weighted by c h phi_1 / 2.
        half = 0.5 * step.coef(0) / nodes[1]
        return (step.coef(0) - half, half)
    return taylor_weights(step, nodes)


@register
@dataclass(frozen=True)
class DPMSolver(Solver):
    """DPM-Solver (noise prediction).

    Args:
        order: 1, 2 or 3.
        method: ``"multistep"`` (one evaluation per step, reusing past predictions;
            Lu et al. 2022b §4) or ``"singlestep"`` (``order`` evaluations per step at
            intermediate λ; Lu et al. 2022, Alg. 1–3).
        solver_type: ``"midpoint"`` or ``"taylor"`` (see the module docstring).
        lower_order_final: Multistep only: lower the order on the last steps to
            ``min(order, steps_left)``, which stabilises very few steps.
        euler_at_final: Multistep only: take the last step at first order (diffusers'
            option of the same name).
        orders: Single-step only: an explicit order per grid step (e.g.
            :func:`fast_orders`); default ``order`` on every step.
    """

    order: int = 2
    method: Method = "multistep"
    solver_type: SolverType = "midpoint"
    lower_order_final: bool = True
    orders: tuple[int, ...] | None = None
    euler_at_final: bool = False

    #: The prediction the method integrates (DPM-Solver: noise; DPM-Solver++: data).
    space: ClassVar[Space] = "noise"
    name: ClassVar[str] = "dpm-solver"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("dpm-solver-2m", "DPM-Solver multistep, order 2 (noise prediction)", {"order": 2}),
        Preset("dpm-solver-3m", "DPM-Solver multistep, order 3 (noise prediction)", {"order": 3}),
        singlestep_preset(
            "dpm-solver-fast", "DPM-Solver-fast: single-step order 3 mix (noise)", 3, lineup=True
        ),
    )

    def __post_init__(self) -> None:
        solver = type(self).__name__
        check_order(self.order, (1, 2, 3), solver)
        check_options(self)
        if self.orders is not None:
            if self.method != "singlestep":
                raise ValueError("orders: per-step orders apply to method='singlestep' only")
            for o in self.orders:
                check_order(o, (1, 2, 3), f"{solver} orders")
            object.__setattr__(self, "orders", tuple(self.orders))

    def min_steps(self) -> int:
        return self.order if self.method == "multistep" else 1

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        if self.method == "multistep":
            return self._multistep_plan(at)
        return self._singlestep_plan(at)

    def _multistep_plan(self, at: GridValues) -> StepPlan:
        def predictor(i: int, p: int) -> Update:
            step = at.exp_step(self.space, i, i + 1)
            weights = ei_weights(step, at.nodes(i, range(i, i - p, -1)), self.solver_type)
            return Update(step.a, weights, self.space)

        orders = multistep_orders(at, self.order, self.lower_order_final, self.euler_at_final)
        return multistep_plan(at, orders, predictor)

    def _singlestep_plan(self, at: GridValues) -> StepPlan:
        orders = list(self.orders) if self.orders is not None else [self.order] * at.num_steps
        if len(orders) != at.num_steps:
            raise ValueError(
                f"orders: got {len(orders)} per-step orders for a grid of {at.num_steps} "
                "steps; they must match"
            )
        return stage_plan(
            at, lambda i: singlestep_step(at, i, orders[i], self.space, self.solver_type)
        )


def singlestep_step(
    at: GridValues,
    i: int,
    order: int,
    space: Space,
    solver_type: SolverType,
    nodes: tuple[float, ...] | None = None,
) -> StageStep:
    """One single-step DPM-Solver(++) step from grid point ``i`` to ``i + 1``.

    ``nodes`` are the intermediate stage positions as fractions of the λ-step (default
    :data:`SINGLESTEP_NODES`). Stage 1 is a first-order step to :math:`r_1`; stage 2 adds the
    first difference :math:`(D_1 - D_0)`, rescaled from :math:`r_1` to the stage's own length
    :math:`r_2` (Lu et al. 2022, Alg. 3).
    """
    h = at.lam[i + 1] - at.lam[i]
    r = SINGLESTEP_NODES[order] if nodes is None else nodes
    if len(r) != order - 1:
        raise ValueError(f"nodes: order {order} needs {order - 1} stage positions, got {r}")
    times, updates = [at.t[i]], []
    for j, r_j in enumerate(r):
        t_j, step = at.step_to_lambda(space, i, at.lam[i] + r_j * h)
        if j == 0:
            w: tuple[float, ...] = (step.coef(0),)
        else:
            d1 = step.coef(1) * r_j / r[0]
            w = (step.coef(0) - d1, d1)
        times.append(t_j)
        updates.append(Update(step.a, w, space))
    step = at.exp_step(space, i, i + 1)
    if order == 3 and solver_type == "midpoint":
        # DPM-Solver-3: only the r_2 stage enters the final update.
        d = step.coef(1) / r[1]
        w = (step.coef(0) - d, 0.0, d)
    else:
        w = ei_weights(step, [0.0, *r], solver_type)
    updates.append(Update(step.a, w, space))
    return StageStep(at.t[i], at.t[i + 1], tuple(times), tuple(updates))
