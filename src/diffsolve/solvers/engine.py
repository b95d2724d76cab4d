"""The solver contract, the coefficient plans solvers build, and the state they carry.

A :class:`Solver` is a frozen configuration. ``solver.plan(schedule, grid)`` computes, once
and in float64, every coefficient the method needs on that grid and returns a :class:`Plan`.
A plan is data — a tuple of per-step coefficient records — plus the few lines that apply one
record: ``plan.init(x)`` gives the initial :class:`State`, ``plan.step(model, state)`` advances
one grid interval. :func:`diffsolve.sample` is the only loop.

Every update in diffsolve has the form :math:`x_{new} = a\\,x_{base} + \\sum_k w_k D_k` with
:math:`D_k` the data or noise predictions of earlier model evaluations (:class:`Update`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor

from diffsolve.numerics.expint import ExpStep
from diffsolve.ode.grids import validate_grid
from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.ode.schedule import NoiseSchedule

PredictionSpace = Literal["x0", "eps"]


@dataclass(frozen=True)
class Update:
    """:math:`x_{new} = a\\,x_{base} + \\sum_k w_k D_k`, with :math:`D_k` read from
    predictions as ``space`` (``"x0"`` or ``"eps"``)."""

    a: float
    w: tuple[float, ...]
    space: PredictionSpace = "x0"

    def apply(self, x: Tensor, predictions: Sequence[Prediction]) -> Tensor:
        """Evaluate the linear combination (``predictions`` aligned with :attr:`w`)."""
        if len(predictions) < len(self.w):
            raise RuntimeError("Update.apply: fewer predictions than weights")
        out = x * self.a if self.a != 0.0 else None
        for w, p in zip(self.w, predictions, strict=False):
            if w == 0.0:
                continue
            d = p.get(self.space)
            out = d * w if out is None else out.add_(d, alpha=w)
        return torch.zeros_like(x) if out is None else out


@dataclass(frozen=True)
class State:
    """Explicit solver state; plans extend it with the history they need.

    Attributes:
        x: Current sample (at time :attr:`t`).
        t: Current solver time.
        step: Number of grid intervals done.
        denoised: The latest data prediction, if any (for callbacks and previews).
        done: True once the grid's last point is reached.
    """

    x: Tensor
    t: float
    step: int = 0
    denoised: Tensor | None = None
    done: bool = False


class Plan(ABC):
    """Coefficients of one solver on one grid, and how to apply them."""

    grid: Tensor
    schedule: NoiseSchedule

    @property
    @abstractmethod
    def num_steps(self) -> int | None:
        """Grid intervals this plan will take (``None`` when adaptive)."""

    @property
    @abstractmethod
    def nfe(self) -> int | None:
        """Model evaluations the plan will spend (``None`` when adaptive)."""

    @abstractmethod
    def init(self, x: Tensor) -> State:
        """Initial state for a sample ``x`` at the grid's first time."""

    @abstractmethod
    def step(self, model: Denoiser, state: State) -> State:
        """Advance by one grid interval."""


class Solver(ABC):
    """A sampling method: a frozen configuration that builds coefficient plans.

    Subclasses are frozen dataclasses with an ``order`` field (the order a user asks for,
    as in diffusers' ``solver_order``) and a class-level :attr:`name`.
    """

    #: Human-readable name used by the CLI and the bench.
    name: ClassVar[str] = ""
    order: int

    @property
    def convergence_order(self) -> int:
        """Declared order of accuracy: global error :math:`O(h^p)` in the step size. The
        test suite measures it on the Gaussian oracle."""
        return self.order

    @abstractmethod
    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> Plan:
        """Compute the plan on an already validated grid."""

    def plan(
        self, schedule: NoiseSchedule, grid: Tensor | Sequence[float], *, inverse: bool = False
    ) -> Plan:
        """Validate ``grid`` once and compute this solver's float64 coefficient plan.

        ``inverse=True`` takes a strictly *increasing* grid (clean to noisy): the same
        coefficients with negative λ-steps integrate the ODE backwards (inversion).
        """
        ts = validate_grid(schedule, grid, allow_increasing=inverse)
        if inverse and not bool(ts[-1] > ts[0]):
            raise ValueError(
                "grid: an inversion grid must be strictly increasing (clean to noisy)"
            )
        check_steps(ts, self.min_steps(), f"{type(self).__name__}(order={self.order})")
        return self.build_plan(schedule, ts)

    def min_steps(self) -> int:
        """Fewest grid steps the configuration needs (a multistep method of order ``p``
        needs ``p`` steps to ever reach that order)."""
        return 1


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MultistepState(State):
    """State of a linear multistep method: past predictions (newest first) and the
    previous sample, which a corrector uses as its base."""

    history: tuple[Prediction, ...] = ()
    x_prev: Tensor | None = None


@dataclass(frozen=True)
class MultistepStep:
    """One interval ``t → t_next`` of a multistep method.

    After evaluating the model at ``(x, t)`` and prepending it to the history:

    1. optional corrector: ``x ← corrector.apply(x_prev, history)`` (UniC-style; the model
       output is kept, so it costs no evaluation);
    2. predictor: ``x_next = predictor.apply(x, history)``.
    """

    t: float
    t_next: float
    predictor: Update
    corrector: Update | None = None


@dataclass(frozen=True)
class MultistepPlan(Plan):
    """Plan of any linear multistep method (one model evaluation per step)."""

    schedule: NoiseSchedule
    grid: Tensor
    steps: tuple[MultistepStep, ...]
    memory: int = field(default=1)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        return len(self.steps)

    def init(self, x: Tensor) -> MultistepState:
        return MultistepState(x=x, t=self.steps[0].t)

    def step(self, model: Denoiser, state: State) -> MultistepState:
        assert isinstance(state, MultistepState)
        c = self.steps[state.step]
        prediction = model(state.x, c.t)
        history = (prediction, *state.history[: self.memory - 1])
        x = state.x
        if c.corrector is not None and state.x_prev is not None:
            x = c.corrector.apply(state.x_prev, history)
        x_next = c.predictor.apply(x, history)
        return MultistepState(
            x=x_next,
            t=c.t_next,
            step=state.step + 1,
            denoised=prediction.x0,
            done=state.step + 1 == len(self.steps),
            history=history,
            x_prev=x,
        )


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SinglestepStep:
    """One interval of a single-step (Runge–Kutta-like) method.

    Stage ``j`` evaluates the model at time ``evals[j]`` on the current stage point (the
    step's start for ``j = 0``); then ``updates[j]`` — applied to the step's start ``x`` and
    the stage predictions so far, oldest first — gives the next stage point, and the last
    update gives ``x_next``.
    """

    t: float
    t_next: float
    evals: tuple[float, ...]
    updates: tuple[Update, ...]


@dataclass(frozen=True)
class SinglestepPlan(Plan):
    """Plan of any single-step method (``len(evals)`` model evaluations per step)."""

    schedule: NoiseSchedule
    grid: Tensor
    steps: tuple[SinglestepStep, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        return sum(len(s.evals) for s in self.steps)

    def init(self, x: Tensor) -> State:
        return State(x=x, t=self.steps[0].t)

    def step(self, model: Denoiser, state: State) -> State:
        c = self.steps[state.step]
        predictions: list[Prediction] = []
        y = state.x
        for t_eval, update in zip(c.evals, c.updates, strict=True):
            predictions.append(model(y, t_eval))
            y = update.apply(state.x, predictions)
        return replace(
            state,
            x=y,
            t=c.t_next,
            step=state.step + 1,
            denoised=predictions[0].x0,
            done=state.step + 1 == len(self.steps),
        )


# ---------------------------------------------------------------------------------------
def check_order(order: int, allowed: Sequence[int], solver: str) -> None:
    """Raise a clear error when ``order`` is not one a solver implements."""
    if not isinstance(order, int) or isinstance(order, bool) or order not in allowed:
        raise ValueError(f"{solver}: order must be one of {list(allowed)}, got {order!r}")


def check_choice(value: object, allowed: Sequence[object], argument: str) -> None:
    """Raise a clear error when an option is not one of its allowed values."""
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {list(allowed)}, got {value!r}")


def check_steps(grid: Tensor, needed: int, solver: str) -> None:
    """Raise when a grid has fewer steps than a method needs."""
    steps = grid.numel() - 1
    if steps < needed:
        raise ValueError(
            f"{solver}: the grid has {steps} step(s) but this configuration needs "
            f"at least {needed}; pass a grid with more steps or lower the order"
        )


def multistep_orders(
    num_steps: int, order: int, lower_order_final: bool, ends_at_zero: bool
) -> list[int]:
    """Per-step orders of a multistep method: warm-up ``1, 2, …``, then ``order``; with
    ``lower_order_final`` the last steps fall back to ``min(order, steps_left)``; a final
    step to ``t = 0`` is always first order (it returns :math:`\\hat x_0`)."""
    orders = []
    for i in range(num_steps):
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, num_steps - i)
        orders.append(p)
    if ends_at_zero:
        orders[-1] = 1
    return orders


@dataclass(frozen=True)
class GridValues:
    """Schedule values at every grid point, as Python floats (float64).

    At ``t = 0`` (clean data): ``alpha = 1``, ``sigma = 0``, ``lam = inf``.
    """

    schedule: NoiseSchedule
    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]

    @classmethod
    def of(cls, schedule: NoiseSchedule, grid: Tensor) -> GridValues:
        """Evaluate ``schedule`` on ``grid``."""
        log_alpha, log_sigma = schedule.log_alpha_sigma(grid)
        return cls(
            schedule=schedule,
            t=tuple(grid.tolist()),
            alpha=tuple(torch.exp(log_alpha).tolist()),
            sigma=tuple(torch.exp(log_sigma).tolist()),
            lam=tuple((log_alpha - log_sigma).tolist()),
        )

    @property
    def ends_at_zero(self) -> bool:
        """True when the grid's last point is clean data."""
        return self.sigma[-1] == 0.0

    def exp_step(self, space: Literal["data", "noise"], i: int, j: int) -> ExpStep:
        """The exponential-integrator step from grid point ``i`` to ``j``."""
        return ExpStep.between(space, self.alpha[i], self.sigma[i], self.alpha[j], self.sigma[j])

    def step_to_lambda(
        self, space: Literal["data", "noise"], i: int, lam: float
    ) -> tuple[float, ExpStep]:
        """Time of log-SNR ``lam`` and the step from grid point ``i`` to it (for stages)."""
        t = float(self.schedule.t_of_lambda(lam))
        log_alpha, log_sigma = (float(x) for x in self.schedule.log_alpha_sigma(t))
        alpha, sigma = math.exp(log_alpha), math.exp(log_sigma)
        return t, ExpStep.between(space, self.alpha[i], self.sigma[i], alpha, sigma)

    def space_of_step(self, space: Literal["data", "noise"], i: int) -> Literal["data", "noise"]:
        """``space``, except that a step to clean data is always taken in data space."""
        return "data" if self.sigma[i + 1] == 0.0 else space

    def nodes(self, i: int, points: Sequence[int]) -> list[float]:
        """Normalised positions :math:`(\\lambda_p - \\lambda_i)/(\\lambda_{i+1}-\\lambda_i)`
        of grid points ``points`` relative to the step ``i → i+1``."""
        h = self.lam[i + 1] - self.lam[i]
        return [(self.lam[p] - self.lam[i]) / h for p in points]
