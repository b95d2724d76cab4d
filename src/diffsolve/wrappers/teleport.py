r"""Analytic Gaussian teleportation (Wang & Vastola 2023, "The Hidden Linear Structure in
Score-Based Models and its Application", arXiv 2311.10892; ``reference/accelerations.md`` §1).

At high noise a trained diffusion model's denoiser is close to the exact denoiser of a
Gaussian fitted to its training data, :math:`\mathcal N(\mu, U\Lambda U^\top)`, whose
probability-flow ODE has the closed-form solution (:meth:`GaussianModel.solution`)

.. math::

    x_t = \alpha_t\mu + \sum_k \sqrt{\frac{\alpha_t^2\lambda_k+\sigma_t^2}
        {\alpha_T^2\lambda_k+\sigma_T^2}}\; c_k u_k + \frac{\sigma_t}{\sigma_T} P_\perp
        (x_T - \alpha_T\mu), \qquad c_k = u_k^\top(x_T - \alpha_T\mu).

Teleportation replaces the first part of the sampling trajectory, from the noise level
``t_start`` down to ``t_skip``, by this formula: zero model evaluations and
:math:`O(Dr)` work per sample, in float64. A numerical solver takes over at ``t_skip`` on a
*fresh* grid that starts there (the authors' EDM script builds a new Karras grid from
:math:`\sigma_{\text{skip}}`); at a fixed evaluation budget the solver's steps are then spent
on the lower-noise part of the trajectory only.

In diffsolve teleportation wraps a solver: :class:`Teleported` takes any
:class:`~diffsolve.solvers.Solver` and a grid whose **first interval** ``grid[0] → grid[1]``
is the jump and whose remainder ``grid[1:]`` is the inner solver's grid. The reported NFE
counts model calls only. :func:`teleported_setup` builds both for a registry solver at a
given NFE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffsolve.ode.grids import validate_grid
from diffsolve.ode.model import Denoiser
from diffsolve.ode.noise import NoiseSource
from diffsolve.ode.plan import Plan, Solver, State
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.registry import (
    SolverContext,
    default_grid_kind,
    nfe_grid,
    preset,
    setup_solver,
)
from diffsolve.stats.gaussian import GaussianModel

__all__ = [
    "TeleportPlan",
    "TeleportState",
    "Teleported",
    "skip_time",
    "teleport",
    "teleported_setup",
]


def teleport(
    gaussian: GaussianModel,
    x_start: Tensor,
    t_start: float,
    t_skip: float,
    schedule: NoiseSchedule,
) -> Tensor:
    r"""Move ``x_start`` from ``t_start`` to ``t_skip`` along the exact probability-flow ODE
    of the Gaussian data model ``gaussian`` (closed form, float64 inside, no model call).

    Args:
        gaussian: Mean and principal components of the data, in the model's input space.
        x_start: Samples at ``t_start``, shape ``(B, *gaussian.shape)``.
        t_start: Current solver time, in ``(0, t_max]``.
        t_skip: Target time, in ``[0, t_start]`` (``0``: all the way to data).
        schedule: The noise schedule (any kind).

    Returns:
        The samples at ``t_skip``, in ``x_start``'s dtype.
    """
    if not isinstance(gaussian, GaussianModel):
        raise ValueError(f"gaussian must be a GaussianModel, got {type(gaussian).__name__}")
    if tuple(x_start.shape[1:]) != tuple(gaussian.shape):
        raise ValueError(
            f"x_start has sample shape {tuple(x_start.shape[1:])}, but the Gaussian statistics "
            f"are for data of shape {tuple(gaussian.shape)}"
        )
    t_start, t_skip = float(t_start), float(t_skip)
    if not 0.0 < t_start <= schedule.t_max * (1 + 1e-12):
        raise ValueError(f"t_start must lie in (0, {schedule.t_max}], got {t_start}")
    if not 0.0 <= t_skip <= t_start:
        raise ValueError(f"t_skip must lie in [0, t_start={t_start}], got {t_skip}")
    return gaussian.solution(x_start, t_start, t_skip, schedule)


def skip_time(schedule: NoiseSchedule, grid: Tensor, fraction: float) -> float:
    """The time reached after skipping ``fraction`` of the ``N`` steps of ``grid``: grid point
    number ``round(fraction · N)`` (halves rounded up).

    Args:
        schedule: The schedule the grid belongs to (for validation).
        grid: The original, strictly decreasing grid.
        fraction: Share of the steps to skip, in ``[0, 1)``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction!r}")
    ts = validate_grid(schedule, grid)
    steps = ts.numel() - 1
    return float(ts[math.floor(fraction * steps + 0.5)])


@dataclass(frozen=True)
class TeleportState(State):
    """State of a :class:`TeleportPlan`: before the jump (``teleported=False``) or the inner
    solver's state (``inner``) after it; ``step`` counts the jump as one step."""

    teleported: bool = False
    inner: State | None = None


@dataclass(frozen=True)
class TeleportPlan(Plan[TeleportState]):
    """The jump ``grid[0] → grid[1]`` in closed form, then the inner plan on ``grid[1:]``
    (``None`` when the whole range is teleported)."""

    schedule: NoiseSchedule
    grid: Tensor
    gaussian: GaussianModel
    inner: Plan[Any] | None

    @property
    def t_start(self) -> float:
        """Where the samples start."""
        return float(self.grid[0])

    @property
    def t_skip(self) -> float:
        """Where the inner solver takes over."""
        return float(self.grid[1])

    @property
    def num_steps(self) -> int | None:
        if self.inner is None:
            return 1
        steps = self.inner.num_steps
        return None if steps is None else steps + 1

    @property
    def nfe(self) -> int | None:
        return 0 if self.inner is None else self.inner.nfe

    def init(self, x: Tensor) -> TeleportState:
        return TeleportState(x=x, t=self.t_start)

    def step(self, model: Denoiser, state: TeleportState) -> TeleportState:
        if not state.teleported:
            return self._jump(state.x, state.noise)
        assert state.inner is not None and self.inner is not None
        inner = self.inner.step(model, state.inner)
        return TeleportState(
            x=inner.x,
            t=inner.t,
            step=inner.step + 1,
            latest=inner.latest,
            done=inner.done,
            teleported=True,
            inner=inner,
            noise=state.noise,
        )

    def _jump(self, x: Tensor, noise: NoiseSource | None = None) -> TeleportState:
        t_skip = self.t_skip
        x_skip = teleport(self.gaussian, x, self.t_start, t_skip, self.schedule)
        if t_skip > 0.0:  # the Gaussian's own x0 estimate there (free; for callbacks)
            alpha, sigma = float(self.schedule.alpha(t_skip)), float(self.schedule.sigma(t_skip))
            denoised = self.gaussian.denoise(x_skip, alpha, sigma)
        else:
            denoised = x_skip
        inner = None if self.inner is None else replace(self.inner.init(x_skip), noise=noise)
        return TeleportState(
            x=x_skip,
            t=t_skip,
            step=1,
            latest=denoised,
            done=inner is None,
            teleported=True,
            inner=inner,
            noise=noise,
        )


@dataclass(frozen=True)
class Teleported(Solver):
    """Any solver, preceded by analytic Gaussian teleportation (Wang & Vastola 2023).

    The grid's first interval ``grid[0] → grid[1]`` is taken in closed form under the
    Gaussian data model (0 NFE); the wrapped solver runs on ``grid[1:]``, a fresh grid that
    starts at the skip time. A two-point grid teleports the whole range. Samples start at
    ``grid[0]`` as usual (e.g. :func:`diffsolve.sample` with ``x_start`` at ``grid[0]``).

    Args:
        solver: The numerical solver that takes over after the jump.
        gaussian: Gaussian statistics of the data in the model's input space (see
            :mod:`diffsolve.stats.gaussian.estimate`).
    """

    solver: Solver
    gaussian: GaussianModel

    name: ClassVar[str] = "teleported"

    def __post_init__(self) -> None:
        if not isinstance(self.solver, Solver):
            raise ValueError(f"solver must be a Solver, got {type(self.solver).__name__}")
        if not isinstance(self.gaussian, GaussianModel):
            raise ValueError(
                f"gaussian must be a GaussianModel, got {type(self.gaussian).__name__}"
            )

    @property
    def order(self) -> int:  # type: ignore[override]
        """The wrapped solver's order (the jump is exact for Gaussian data)."""
        return self.solver.order

    @property
    def convergence_order(self) -> int:
        return self.solver.convergence_order

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> TeleportPlan:
        if float(grid[0]) == 0.0 or grid.numel() < 2:
            raise ValueError("Teleported: the grid needs a start time > 0 and a skip time")
        inner = self.solver.plan(schedule, grid[1:]) if grid.numel() > 2 else None
        return TeleportPlan(schedule, grid, self.gaussian, inner)


def teleported_setup(
    name: str,
    schedule: NoiseSchedule,
    nfe: int,
    fraction: float,
    grid_kind: str | None = None,
    context: SolverContext | None = None,
) -> tuple[Solver, Tensor]:
    """Registry solver ``name`` with teleportation, spending ``nfe`` model evaluations.

    The skip time is the point reached after ``fraction`` of the steps of the solver's usual
    grid at this budget (:func:`~diffsolve.solvers.registry.setup_solver`, :func:`skip_time`).
    The solver then gets a fresh grid of the same kind from the skip time to ``t = 0`` with
    the whole budget (:func:`~diffsolve.solvers.registry.nfe_grid` with ``t_start = t_skip``),
    so the total NFE is unchanged. ``fraction = 0`` returns the plain solver and its grid.

    Args:
        name: Registry solver name (:data:`diffsolve.solvers.registry.SOLVERS`).
        schedule: The model's noise schedule.
        nfe: Model evaluations to spend (all after the jump).
        fraction: Share of the usual grid's steps to skip, in ``[0, 1)``.
        grid_kind: Grid kind of both grids (default: the solver's registry default).
        context: What the model provides: the Gaussian statistics of its data in its input
            space (``gaussian``), and whatever the solver needs (e.g. ``ems``).

    Returns:
        ``(solver, grid)`` for :func:`diffsolve.sample`; the grid starts at the usual start
        time (where ``x_start`` lives) and its first interval is the jump.
    """
    context = context or SolverContext()
    inner, original = setup_solver(name, schedule, nfe, grid_kind, context=context)
    t_skip = skip_time(schedule, original, fraction)
    if t_skip == float(original[0]):
        return inner, original
    gaussian = context.require("gaussian", f"{name} with teleportation")
    last_positive = float(original[-2]) if float(original[-1]) == 0.0 else float(original[-1])
    if t_skip <= last_positive:
        raise ValueError(
            f"fraction={fraction} skips to t={t_skip:.6g}, at or past the grid's last positive "
            f"time {last_positive:.6g}; nothing is left for the solver — lower the fraction"
        )
    spec = preset(name)
    kind = grid_kind or default_grid_kind(spec, schedule, nfe)
    fresh = nfe_grid(schedule, spec.steps(nfe), kind, t_start=t_skip)
    grid = torch.cat([original[:1], fresh])
    return Teleported(inner, gaussian), grid
