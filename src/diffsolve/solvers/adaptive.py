r"""Adaptive step size: DPM-Solver-12 and DPM-Solver-23 (Lu et al. 2022, §5 and Alg. 4).

Each attempt from :math:`\lambda_s` with step :math:`h` computes a lower-order solution
:math:`x_l` and a higher-order one :math:`x_h` that share their model evaluations
(12: DPM-Solver-1 and -2 with :math:`r_1 = 1/2`, 2 evaluations; 23: DPM-Solver-2 and -3 with
:math:`r_1 = 1/3, r_2 = 2/3`, 3 evaluations), and accepts :math:`x_h` when

.. math::

    E = \big\| (x_h - x_l) / \delta \big\|_{\mathrm{RMS}} \le 1, \qquad
    \delta = \max\big(\mathrm{atol},\ \mathrm{rtol}\cdot\max(|x_l|, |x_{prev}|)\big),

(the RMS per sample, the worst sample decides). Either way the next step is
:math:`h \leftarrow \min(\theta h E^{-1/k}, \lambda_{end} - \lambda_s)` with ``k`` the higher
order. The NFE spent is known only afterwards: :func:`diffsolve.sample` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from diffsolve.numerics.expint import Space
from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.ode.plan import Plan, Solver, State
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.dpm_solver import SolverType, ei_weights, singlestep_step
from diffsolve.solvers.engine import GridValues, Update, check_options, check_order

_NODES = {2: (0.5,), 3: (1 / 3, 2 / 3)}


class AdaptiveLimitError(RuntimeError):
    """:class:`DPMSolverAdaptive` would exceed its ``max_steps`` or ``max_nfe`` (the
    tolerances ask for more steps than allowed)."""


@dataclass(frozen=True)
class AdaptiveState(State):
    """Adds the current λ, the proposed step and the last lower-order solution."""

    lam: float = 0.0
    h: float = 0.0
    x_lower: Tensor | None = None
    attempts: int = 0


@dataclass(frozen=True)
class AdaptivePlan(Plan[AdaptiveState]):
    """Plan of the adaptive solver: the range and the controller's settings; each attempt
    is one single-step stage step of the engine, built for the proposed interval."""

    schedule: NoiseSchedule
    grid: Tensor
    solver: DPMSolverAdaptive

    @property
    def num_steps(self) -> None:
        return None

    @property
    def nfe(self) -> None:
        return None

    def init(self, x: Tensor) -> AdaptiveState:
        t0 = float(self.grid[0])
        lam = float(self.schedule.lambda_(t0))
        return AdaptiveState(x=x, t=t0, lam=lam, h=self.solver.h_init, x_lower=x)

    def step(self, model: Denoiser, state: AdaptiveState) -> AdaptiveState:
        cfg = self.solver
        t_end = float(self.grid[-1])
        lam_end = float(self.schedule.lambda_(t_end))
        # h is the step's length in λ; the sign of the range gives the direction (inversion)
        sign = 1.0 if lam_end >= state.lam else -1.0
        h, attempts = min(state.h, sign * (lam_end - state.lam)), state.attempts
        while True:
            self._check_limits(state, attempts)
            attempts += 1
            if attempts > cfg.max_attempts:
                raise RuntimeError(
                    f"DPMSolverAdaptive: no convergence after {cfg.max_attempts} attempts at "
                    f"t={state.t:.6g}; loosen rtol/atol or raise max_attempts"
                )
            last = h >= sign * (lam_end - state.lam)
            t_next = t_end if last else float(self.schedule.t_of_lambda(state.lam + sign * h))
            x_low, x_high, prediction = self._attempt(model, state.x, state.t, t_next)
            error = self._error(x_low, x_high, state)
            h_new = cfg.theta * h * max(error, 1e-10) ** (-1.0 / cfg.order)
            if error <= 1.0:
                return replace(
                    state,
                    x=x_high,
                    t=t_next,
                    step=state.step + 1,
                    lam=lam_end if last else state.lam + sign * h,
                    x_lower=x_low,
                    h=h_new,
                    attempts=attempts,
                    latest=prediction,
                    done=last,
                )
            h = min(h_new, sign * (lam_end - state.lam))

    def _check_limits(self, state: AdaptiveState, attempts: int) -> None:
        """Raise :class:`AdaptiveLimitError` before an attempt that would exceed
        ``max_steps`` accepted steps or ``max_nfe`` model evaluations."""
        cfg = self.solver
        nfe = attempts * cfg.order  # every attempt, rejected ones too, costs `order` calls
        if state.step >= cfg.max_steps:
            reached = f"max_steps={cfg.max_steps} accepted steps"
        elif nfe + cfg.order > cfg.max_nfe:
            reached = f"max_nfe={cfg.max_nfe} model evaluations ({nfe} spent)"
        else:
            return
        option = "max_steps" if state.step >= cfg.max_steps else "max_nfe"
        raise AdaptiveLimitError(
            f"DPMSolverAdaptive: {reached} reached at t={state.t:.6g} before the end "
            f"t={float(self.grid[-1]):.6g}: the tolerances rtol={cfg.rtol:g}, atol={cfg.atol:g} "
            f"ask for tiny steps; use a looser rtol/atol (defaults 0.05, 0.0078) or raise "
            f"{option}"
        )

    def _error(self, x_low: Tensor, x_high: Tensor, state: AdaptiveState) -> float:
        """:math:`E`, the worst sample's RMS of the scaled difference (module docstring)."""
        cfg = self.solver
        assert state.x_lower is not None
        delta = torch.clamp(
            cfg.rtol * torch.maximum(x_low.abs(), state.x_lower.abs()), min=cfg.atol
        )
        error = float(((x_high - x_low) / delta).flatten(1).pow(2).mean(1).sqrt().max())
        if not error == error:  # NaN
            raise FloatingPointError(
                f"DPMSolverAdaptive: non-finite error estimate at t={state.t:.6g}"
            )
        return error

    def _attempt(
        self, model: Denoiser, x: Tensor, t: float, t_next: float
    ) -> tuple[Tensor, Tensor, Prediction]:
        cfg = self.solver
        at = GridValues.of(self.schedule, torch.tensor([t, t_next], dtype=torch.float64))
        nodes = _NODES[cfg.order]
        high = singlestep_step(at, 0, cfg.order, cfg.space, cfg.solver_type, nodes)
        x_high, points = high.run(model, x)
        step = at.exp_step(cfg.space, 0, 1)
        low_nodes = [0.0, *nodes[: cfg.order - 2]]
        low = Update(step.a, ei_weights(step, low_nodes, cfg.solver_type), cfg.space)
        return low.apply(x, points), x_high, points[0].prediction


@dataclass(frozen=True)
class DPMSolverAdaptive(Solver):
    """DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``) with step-size control.

    The grid only gives the range: its first and last time. Defaults follow the official
    code: ``h_init = 0.05``, ``atol = 0.0078``, ``rtol = 0.05``, ``theta = 0.9``.

    The run is capped, since tight tolerances (``atol`` and ``rtol`` near 0) ask for
    practically endless tiny steps: ``max_steps`` (default 5,000) accepted steps and
    ``max_nfe`` (default 10,000) model evaluations, rejected attempts included; the attempt
    that would exceed either raises :class:`AdaptiveLimitError`, before evaluating the model.
    (The digits demo needs ~50 evaluations at the defaults, ~3,500 at ``rtol = 1e-5,
    atol = 1e-6``.) ``max_attempts`` caps the attempts, accepted or not.
    """

    order: int = 3
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    theta: float = 0.9
    space: Space = "data"
    solver_type: SolverType = "midpoint"
    max_attempts: int = 100_000
    max_steps: int = 5_000
    max_nfe: int = 10_000

    name: ClassVar[str] = "dpm-solver-adaptive"

    def __post_init__(self) -> None:
        check_order(self.order, (2, 3), "DPMSolverAdaptive")
        check_options(self)
        for name, low in (("max_attempts", 1), ("max_steps", 1), ("max_nfe", self.order)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("rtol", "atol", "h_init"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.theta <= 1:
            raise ValueError(f"theta must lie in (0, 1], got {self.theta!r}")

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> AdaptivePlan:
        if float(grid[-1]) == 0.0:
            raise ValueError("DPMSolverAdaptive: the range must end at t > 0")
        return AdaptivePlan(schedule, grid[[0, -1]], self)
