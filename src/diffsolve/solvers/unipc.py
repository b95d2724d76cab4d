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

from diffsolve.numerics.expint import ExpStep, Space, solve_vandermonde
from diffsolve.numerics.phi import phi
from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    MultistepStep,
    StepPlan,
    Update,
    check_options,
    check_order,
    multistep_orders,
    multistep_plan,
)
from diffsolve.solvers.registry import (
    SIBLING_SOLVER_TYPES,
    ConfigKey,
    DiffusersMapping,
    Preset,
    register,
)

Variant = Literal["bh1", "bh2"]


def _b_factor(step: ExpStep, variant: Variant) -> float:
    """:math:`B(h)` in the sign convention of :class:`ExpStep` (``bh1``: h, ``bh2``: hφ₁)."""
    return step.h if variant == "bh1" else step.h * phi(1, step.z)


def _rhs(step: ExpStep, variant: Variant, count: int) -> list[float]:
    """:math:`b_n = n!\\,h\\varphi_{n+1}(z)/B(h)` for ``n = 1..count``."""
    b = step.c * _b_factor(step, variant)
    return [math.factorial(n) * step.coef(n) / b for n in range(1, count + 1)]


def predictor_weights(step: ExpStep, r: list[float], variant: Variant) -> tuple[float, ...]:
    """UniP weights on ``(m_s, m_{s_1}, …)`` for history positions ``r`` (negative):
    :math:`\\sum_k \\rho_k r_k^{n-1} = b_n` (a transposed Vandermonde system)."""
    rho = [0.5] if len(r) == 1 else list(solve_vandermonde(r, _rhs(step, variant, len(r))))
    k = step.c * _b_factor(step, variant)
    w_hist = [k * rho_k / r_k for rho_k, r_k in zip(rho, r, strict=True)]
    return (step.coef(0) - sum(w_hist), *w_hist)


def corrector_weights(step: ExpStep, r: list[float], variant: Variant) -> tuple[float, ...]:
    """UniC weights on ``(m_t, m_s, m_{s_1}, …)``: the new evaluation first, then the
    predictor's points (history positions ``r``)."""
    nodes = [*r, 1.0]
    rho = [0.5] if not r else list(solve_vandermonde(nodes, _rhs(step, variant, len(nodes))))
    k = step.c * _b_factor(step, variant)
    w_hist = [k * rho_k / r_k for rho_k, r_k in zip(rho[:-1], r, strict=True)]
    w_new = k * rho[-1]
    return (w_new, step.coef(0) - sum(w_hist) - w_new, *w_hist)


def _preset(variant: Variant, order: int, lineup: bool = False) -> Preset:
    return Preset(
        f"unipc-{variant}-{order}",
        f"UniPC {variant}, order {order} + corrector",
        {"order": order, "variant": variant},
        lineup=lineup,
    )


@register
@dataclass(frozen=True)
class UniPC(Solver):
    """UniPC multistep predictor–corrector.

    Args:
        order: Predictor order 1, 2 or 3 (the corrector raises the accuracy by one).
        variant: ``"bh1"`` (recommended below 10 steps, unconditional) or ``"bh2"``.
        corrector: Apply UniC after every step but the last.
        final_corrector: Also correct the last step, at the price of one more evaluation.
        space: Integrate the ``"data"`` (default, diffusers' ``predict_x0``) or ``"noise"``
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
    space: Space = "data"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    name: ClassVar[str] = "unipc"
    presets: ClassVar[tuple[Preset, ...]] = (
        _preset("bh1", 2),
        _preset("bh1", 3, lineup=True),
        _preset("bh2", 2),
        _preset("bh2", 3, lineup=True),
    )
    diffusers: ClassVar[DiffusersMapping] = DiffusersMapping(
        "DiffsolveUniPCScheduler",
        "unipc-bh2-2",
        {
            "solver_order": ConfigKey(2, "order"),
            "solver_type": ConfigKey(
                "bh2", "variant", choices=("bh1", "bh2"), siblings=SIBLING_SOLVER_TYPES
            ),
            "predict_x0": ConfigKey(True, "space", lambda x0: "data" if x0 else "noise"),
            "use_corrector": ConfigKey(True, "corrector"),
            "disable_corrector": ConfigKey(None, "disable_corrector", lambda at: tuple(at or ())),
            "lower_order_final": ConfigKey(True, "lower_order_final"),
        },
        sibling="UniPCMultistepScheduler",
    )

    def __post_init__(self) -> None:
        check_order(self.order, (1, 2, 3), "UniPC")
        check_options(self)
        object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))

    @property
    def convergence_order(self) -> int:
        """The predictor's order, plus one with the corrector."""
        return self.order + int(self.corrector)

    def min_steps(self) -> int:
        return self.order

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        if self.final_corrector and at.ends_at_zero:
            raise ValueError(
                "final_corrector: the grid ends at t = 0, where the model cannot "
                "be evaluated; end the grid at t > 0 or disable final_corrector"
            )
        orders = multistep_orders(at, self.order, self.lower_order_final)

        def points(i: int) -> tuple[ExpStep, list[float]]:
            """Step ``i``'s coefficients and its history positions."""
            return at.exp_step(self.space, i, i + 1), at.nodes(i, range(i - 1, i - orders[i], -1))

        def predictor(i: int, p: int) -> Update:
            step, r = points(i)
            return Update(step.a, predictor_weights(step, r, self.variant), self.space)

        def corrector(i: int) -> Update | None:
            """UniC for the step that ended at point ``i`` (applied after evaluating there)."""
            if i == 0 or not self.corrector or (i - 1) in self.disable_corrector:
                return None
            step, r = points(i - 1)
            return Update(step.a, corrector_weights(step, r, self.variant), self.space)

        n = at.num_steps
        extra = ()
        if self.final_corrector:  # evaluate at the grid's end to correct the last step
            extra = (MultistepStep(at.t[n], at.t[n], Update(1.0, ()), corrector(n)),)
        return multistep_plan(at, orders, predictor, corrector, extra=extra)
