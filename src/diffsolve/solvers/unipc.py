r"""UniPC (Zhao et al. 2023, arXiv 2302.04867): unified predictor (UniP) and corrector (UniC).

For a step :math:`s \to t` with the exponential-integrator coefficients
:math:`x_t = a x_s + c\sum_n h\varphi_{n+1}(z) d_n` (see :mod:`diffsolve.numerics.expint`), history
points at :math:`r_k = (\lambda_{s_k} - \lambda_s)/h` and differences
:math:`D_k = (m_{s_k} - m_s)/r_k`:

.. math::

    \tilde x_t = a\,x_s + c\,h\varphi_1(z)\,m_s, \qquad
    x_t = \tilde x_t + c\,B(h) \sum_k \rho_k D_k, \qquad
    \sum_k \rho_k r_k^{\,n-1} = b_n = \frac{n!\,h\varphi_{n+1}(z)}{B(h)},

with :math:`B(h) = h` (``bh1``) or :math:`B(h) = h\varphi_1(z)` (``bh2``). The predictor UniP-p
uses the ``p - 1`` previous points (:math:`\rho = 1/2` for ``p = 2``, as in the paper's code);
the corrector UniC-p adds the new evaluation at :math:`r = 1` (:math:`\rho = 1/2` for
``p = 1``) and reuses that evaluation for the next predictor, so it costs no extra model call
and raises the order by one. The corrector is not applied after the final step unless
``final_corrector`` is set, which spends one more evaluation at the grid's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from diffsolve.numerics.expint import ExpStep, solve_vandermonde
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    MultistepPlan,
    MultistepStep,
    Solver,
    Update,
    check_choice,
    check_order,
    multistep_orders,
)

Variant = Literal["bh1", "bh2"]


def _b_factor(e: ExpStep, variant: Variant) -> float:
    """:math:`B(h)` in the sign convention of :class:`ExpStep` (``bh1``: h, ``bh2``: hφ₁)."""
    return e.h if variant == "bh1" else e.h * _phi1(e.z)


def _phi1(z: float) -> float:
    return math.expm1(z) / z if abs(z) > 1e-8 else 1.0 + 0.5 * z


def _rhs(e: ExpStep, variant: Variant, count: int) -> list[float]:
    """:math:`b_n = n!\\,h\\varphi_{n+1}(z)/B(h)` for ``n = 1..count``."""
    b = e.c * _b_factor(e, variant)
    return [math.factorial(n) * e.coef(n) / b for n in range(1, count + 1)]


def predictor_weights(e: ExpStep, r: list[float], variant: Variant) -> tuple[float, ...]:
    """UniP weights on ``(m_s, m_{s_1}, …)`` for history positions ``r`` (negative)."""
    rho = [0.5] if len(r) == 1 else list(_solve(r, _rhs(e, variant, len(r))))
    k = e.c * _b_factor(e, variant)
    w_hist = [k * rho_k / r_k for rho_k, r_k in zip(rho, r, strict=True)]
    return (e.coef(0) - sum(w_hist), *w_hist)


def corrector_weights(e: ExpStep, r: list[float], variant: Variant) -> tuple[float, ...]:
    """UniC weights on ``(m_t, m_s, m_{s_1}, …)``: the new evaluation first, then the
    predictor's points (history positions ``r``)."""
    nodes = [*r, 1.0]
    rho = [0.5] if not r else list(_solve(nodes, _rhs(e, variant, len(nodes))))
    k = e.c * _b_factor(e, variant)
    w_hist = [k * rho_k / r_k for rho_k, r_k in zip(rho[:-1], r, strict=True)]
    w_new = k * rho[-1]
    return (w_new, e.coef(0) - sum(w_hist) - w_new, *w_hist)


def _solve(r: list[float], b: list[float]) -> tuple[float, ...]:
    # sum_k rho_k r_k^(n-1) = b_n, n = 1..len(r): the transposed Vandermonde system.
    return solve_vandermonde(r, b)


@dataclass(frozen=True)
class UniPC(Solver):
    """UniPC multistep predictor–corrector.

    Args:
        order: Predictor order 1, 2 or 3 (the corrector raises the accuracy by one).
        variant: ``"bh1"`` (recommended below 10 steps, unconditional) or ``"bh2"``.
        corrector: Apply UniC after every step but the last.
        final_corrector: Also correct the last step, at the price of one more evaluation.
        predict: Integrate the ``"data"`` (default, diffusers' ``predict_x0``) or ``"noise"``
            prediction.
        lower_order_final: Lower the predictor order on the last steps to
            ``min(order, steps_left)``.
        disable_corrector: Step indices whose corrector is skipped (diffusers' option; helps
            at large guidance scales).
    """

    order: int = 2
    variant: Variant = "bh2"
    corrector: bool = True
    final_corrector: bool = False
    predict: Literal["data", "noise"] = "data"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    name: ClassVar[str] = "unipc"

    def __post_init__(self) -> None:
        check_order(self.order, (1, 2, 3), "UniPC")
        check_choice(self.variant, ("bh1", "bh2"), "variant")
        check_choice(self.predict, ("data", "noise"), "predict")
        object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))

    @property
    def convergence_order(self) -> int:
        """The predictor's order, plus one with the corrector."""
        return self.order + int(self.corrector)

    def min_steps(self) -> int:
        return self.order

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> MultistepPlan:
        v = GridValues.of(schedule, grid)
        n = len(v.t) - 1
        if self.final_corrector and v.ends_at_zero:
            raise ValueError(
                "final_corrector: the grid ends at t = 0, where the model cannot "
                "be evaluated; end the grid at t > 0 or disable final_corrector"
            )
        orders = multistep_orders(n, self.order, self.lower_order_final, v.ends_at_zero)
        steps, previous = [], None
        for i, p in enumerate(orders):
            space = v.space_of_step(self.predict, i)
            e = v.exp_step(space, i, i + 1)
            r = v.nodes(i, range(i - 1, i - p, -1))
            predictor = Update(e.a, predictor_weights(e, r, self.variant), _pred(space))
            steps.append(
                MultistepStep(v.t[i], v.t[i + 1], predictor, self._corrector(previous, i))
            )
            previous = (e, r, space)
        if self.final_corrector:
            identity = Update(1.0, (), "x0")
            steps.append(MultistepStep(v.t[n], v.t[n], identity, self._corrector(previous, n)))
        return MultistepPlan(schedule, grid, tuple(steps), memory=self.order + 1)

    def _corrector(
        self, previous: tuple[ExpStep, list[float], str] | None, i: int
    ) -> Update | None:
        """UniC for the step that ended at grid point ``i`` (applied after evaluating there)."""
        if previous is None or not self.corrector or (i - 1) in self.disable_corrector:
            return None
        e, r, space = previous
        return Update(e.a, corrector_weights(e, r, self.variant), _pred(space))  # type: ignore[arg-type]


def _pred(space: str) -> Literal["x0", "eps"]:
    return "x0" if space == "data" else "eps"
