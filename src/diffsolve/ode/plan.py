"""The contract between the one sampling loop and every method: solver, plan, state.

A :class:`Solver` is a frozen configuration. ``solver.plan(schedule, grid)`` validates the grid
once and computes, in float64, everything the method needs on it: a :class:`Plan`. A plan is
data plus the few lines that apply it: ``plan.init(x)`` gives the initial :class:`State`,
``plan.step(model, state)`` advances one grid interval. :func:`diffsolve.sample` is the only
loop; the coefficient plans of the numerical methods are built by
:mod:`diffsolve.solvers.engine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from torch import Tensor

from diffsolve.ode.grids import validate_grid
from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.ode.noise import NoiseSource
from diffsolve.ode.schedule import NoiseSchedule


@dataclass(frozen=True)
class State:
    """Explicit solver state; a new one per step, nothing carried over between runs.

    Attributes:
        x: Current sample (at time :attr:`t`).
        t: Current solver time.
        step: Number of grid intervals done.
        latest: The latest model evaluation (its :attr:`denoised` :math:`\\hat x_0` is formed
            on demand, for callbacks and previews), or a data prediction as a tensor.
        done: True once the grid's last point is reached.
        history: Earlier model evaluations a multistep method reuses, newest first (the
            items are the plan's own, e.g. :class:`diffsolve.solvers.engine.Point`).
        x_prev: The state before the last step: a corrector's base, BDIA's second memory.
        owns_x_prev: :attr:`x_prev` was made by the plan (a corrector's output, never handed
            out) and may be overwritten by the next corrector.
        noise: Where a stochastic step draws its fresh noise (:mod:`diffsolve.ode.noise`;
            set by :func:`diffsolve.sample`, carried from step to step); ``None``: torch's
            global generator.
        z: The fresh noise the last step added (SA-Solver's corrector reuses it).
    """

    x: Tensor
    t: float
    step: int = 0
    latest: Prediction | Tensor | None = None
    done: bool = False
    history: tuple[Any, ...] = ()
    x_prev: Tensor | None = None
    owns_x_prev: bool = False
    noise: NoiseSource | None = None
    z: Tensor | None = None

    @property
    def denoised(self) -> Tensor | None:
        """The latest data prediction :math:`\\hat x_0`, formed only when read (from the
        latest model evaluation, or as given)."""
        if self.latest is None or isinstance(self.latest, Tensor):
            return self.latest
        return self.latest.x0


S = TypeVar("S", bound=State)


class Plan(ABC, Generic[S]):
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
    def init(self, x: Tensor) -> S:
        """Initial state for a sample ``x`` at the grid's first time."""

    @abstractmethod
    def step(self, model: Denoiser, state: S) -> S:
        """Advance by one grid interval."""


class Solver(ABC):
    """A sampling method: a frozen configuration that builds coefficient plans.

    Subclasses are frozen dataclasses with an ``order`` field (the order a user asks for,
    as in diffusers' ``solver_order``) and a class-level :attr:`name`.
    """

    #: Human-readable name of the method.
    name: ClassVar[str] = ""
    #: Constructor arguments taken from the model (e.g. ``"ems"``), which callers supply
    #: through :class:`diffsolve.solvers.registry.SolverContext`.
    needs: ClassVar[tuple[str, ...]] = ()
    #: Whether the method draws fresh noise (an SDE sampler): its result depends on
    #: :func:`diffsolve.sample`'s ``noise=`` as well as on ``x_start``.
    stochastic: ClassVar[bool] = False
    order: int

    @property
    def convergence_order(self) -> int:
        """Declared order of accuracy: global error :math:`O(h^p)` in the step size. The
        test suite measures it on the Gaussian oracle."""
        return self.order

    @abstractmethod
    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> Plan[Any]:
        """Compute the plan on an already validated grid."""

    def plan(
        self, schedule: NoiseSchedule, grid: Tensor | Sequence[float], *, inverse: bool = False
    ) -> Plan[Any]:
        """Validate ``grid`` once and compute this solver's float64 coefficient plan.

        ``inverse=True`` takes a strictly *increasing* grid (clean to noisy): the same
        coefficients with negative λ-steps integrate the ODE backwards (inversion); a
        stochastic solver refuses it.
        """
        if inverse and self.stochastic:
            raise ValueError(
                f"{type(self).__name__} is a stochastic sampler: it cannot invert (integrate "
                "toward noise); invert with a deterministic solver (e.g. ddim)"
            )
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


def check_steps(grid: Tensor, needed: int, solver: str) -> None:
    """Raise when a grid has fewer steps than a method needs."""
    steps = grid.numel() - 1
    if steps < needed:
        raise ValueError(
            f"{solver}: the grid has {steps} step(s) but this configuration needs "
            f"at least {needed}; pass a grid with more steps or lower the order"
        )
