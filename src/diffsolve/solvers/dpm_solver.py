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
exactly. A step that ends at clean data (``t = 0``) is always the first-order step in data
space, which returns :math:`\hat x_0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from diffsolve.numerics.expint import ExpStep, taylor_weights
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    MultistepPlan,
    MultistepStep,
    Plan,
    SinglestepPlan,
    SinglestepStep,
    Solver,
    Update,
    check_choice,
    check_order,
    multistep_orders,
)

SolverType = Literal["midpoint", "taylor"]
Method = Literal["multistep", "singlestep"]
Space = Literal["data", "noise"]

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


def ei_weights(e: ExpStep, nodes: list[float], solver_type: SolverType) -> tuple[float, ...]:
    """Weights on predictions at normalised ``nodes`` (``nodes[0] = 0``) for one step."""
    if len(nodes) == 2 and solver_type == "midpoint":
        # DPM-Solver-2: the first difference (D_1 - D_0)/tau_1 weighted by c h phi_1 / 2.
        half = 0.5 * e.coef(0) / nodes[1]
        return (e.coef(0) - half, half)
    return taylor_weights(e, nodes)


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
        orders: Single-step only: an explicit order per grid step (e.g.
            :func:`fast_orders`); default ``order`` on every step.
    """

    order: int = 2
    method: Method = "multistep"
    solver_type: SolverType = "midpoint"
    lower_order_final: bool = True
    orders: tuple[int, ...] | None = None

    space: ClassVar[Space] = "noise"
    name: ClassVar[str] = "dpm-solver"

    def __post_init__(self) -> None:
        solver = type(self).__name__
        check_order(self.order, (1, 2, 3), solver)
        check_choice(self.method, ("multistep", "singlestep"), "method")
        check_choice(self.solver_type, ("midpoint", "taylor"), "solver_type")
        if self.orders is not None:
            if self.method != "singlestep":
                raise ValueError("orders: per-step orders apply to method='singlestep' only")
            for o in self.orders:
                check_order(o, (1, 2, 3), f"{solver} orders")
            object.__setattr__(self, "orders", tuple(self.orders))

    def min_steps(self) -> int:
        return self.order if self.method == "multistep" else 1

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> Plan:
        v = GridValues.of(schedule, grid)
        if self.method == "multistep":
            return self._multistep_plan(v, grid)
        return self._singlestep_plan(v, grid)

    def _multistep_plan(self, v: GridValues, grid: Tensor) -> MultistepPlan:
        n = len(v.t) - 1
        orders = multistep_orders(n, self.order, self.lower_order_final, v.ends_at_zero)
        steps = []
        for i, p in enumerate(orders):
            e = v.exp_step(v.space_of_step(self.space, i), i, i + 1)
            weights = ei_weights(e, v.nodes(i, range(i, i - p, -1)), self.solver_type)
            update = Update(e.a, weights, _prediction(e.space))
            steps.append(MultistepStep(v.t[i], v.t[i + 1], update))
        return MultistepPlan(v.schedule, grid, tuple(steps), memory=self.order)

    def _singlestep_plan(self, v: GridValues, grid: Tensor) -> SinglestepPlan:
        n = len(v.t) - 1
        orders = list(self.orders) if self.orders is not None else [self.order] * n
        if len(orders) != n:
            raise ValueError(
                f"orders: got {len(orders)} per-step orders for a grid of {n} "
                "steps; they must match"
            )
        if v.ends_at_zero:
            orders[-1] = 1
        steps = tuple(
            singlestep_step(v, i, p, self.space, self.solver_type) for i, p in enumerate(orders)
        )
        return SinglestepPlan(v.schedule, grid, steps)


def singlestep_step(
    v: GridValues,
    i: int,
    order: int,
    space: Space,
    solver_type: SolverType,
    nodes: tuple[float, ...] | None = None,
) -> SinglestepStep:
    """One single-step DPM-Solver(++) step from grid point ``i`` to ``i + 1``.

    ``nodes`` are the intermediate stage positions as fractions of the λ-step (default
    :data:`SINGLESTEP_NODES`). Stage 1 is a first-order step to :math:`r_1`; stage 2 adds the
    first difference :math:`(D_1 - D_0)`, rescaled from :math:`r_1` to the stage's own length
    :math:`r_2` (Lu et al. 2022, Alg. 3).
    """
    space = v.space_of_step(space, i)
    pred = _prediction(space)
    h = v.lam[i + 1] - v.lam[i]
    r = SINGLESTEP_NODES[order] if nodes is None else nodes
    if len(r) != order - 1:
        raise ValueError(f"nodes: order {order} needs {order - 1} stage positions, got {r}")
    evals, updates = [v.t[i]], []
    for j, r_j in enumerate(r):
        t_j, e = v.step_to_lambda(space, i, v.lam[i] + r_j * h)
        if j == 0:
            w: tuple[float, ...] = (e.coef(0),)
        else:
            d1 = e.coef(1) * r_j / r[0]
            w = (e.coef(0) - d1, d1)
        evals.append(t_j)
        updates.append(Update(e.a, w, pred))
    e = v.exp_step(space, i, i + 1)
    if order == 3 and solver_type == "midpoint":
        # DPM-Solver-3: only the r_2 stage enters the final update.
        d = e.coef(1) / r[1]
        w = (e.coef(0) - d, 0.0, d)
    else:
        w = ei_weights(e, [0.0, *r], solver_type)
    updates.append(Update(e.a, w, pred))
    return SinglestepStep(v.t[i], v.t[i + 1], tuple(evals), tuple(updates))


def _prediction(space: Space) -> Literal["x0", "eps"]:
    return "x0" if space == "data" else "eps"
