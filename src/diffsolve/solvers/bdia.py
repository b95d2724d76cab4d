r"""BDIA: exactly invertible DDIM by bi-directional integration approximation (Zhang, Lewis &
Kleijn 2023, arXiv 2307.10829; ``reference/accelerations.md`` §6).

With :math:`\epsilon_k` evaluated at :math:`(z_k, t_k)`, let
:math:`F_k = \mathrm{DDIM}(z_k;\ t_k \to t_{k+1})` (towards data) and
:math:`B_k = \mathrm{DDIM}(z_k;\ t_k \to t_{k-1})` (back towards noise). Sampling is

.. math:: z_{k+1} = F_k + \gamma\,(z_{k-1} - B_k),

with a plain DDIM first step, one model evaluation per step. Given the two latest states the
recurrence inverts exactly: :math:`z_{k-1} = B_k + (z_{k+1} - F_k)/\gamma` — so an inversion
that starts from ``(z_N, z_{N-1})`` and a sampling run that starts from the inversion's last
pair reproduce each other to rounding error (amplified by :math:`1/\gamma` per step: small
:math:`\gamma` is unstable, :math:`\gamma = 0` is DDIM and not invertible). Each DDIM map is
the first-order exponential integrator :math:`z \mapsto a z + c\,\hat x_0` of
:mod:`diffsolve.numerics.expint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from diffsolve.ode.model import Denoiser
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import GridValues, Plan, Solver, State, check_order


@dataclass(frozen=True)
class BDIAState(State):
    """The current state and the one before it (the recurrence's two-step memory)."""

    x_prev: Tensor | None = None


@dataclass(frozen=True)
class _Step:
    t: float
    t_next: float
    forward: tuple[float, float]  # DDIM towards t_next: (a, c)
    backward: tuple[float, float] | None  # DDIM back to the previous time: (a, c)


def _ddim(v: GridValues, i: int, j: int) -> tuple[float, float]:
    e = v.exp_step("data", i, j)
    return e.a, e.coef(0)


@dataclass(frozen=True)
class BDIAPlan(Plan):
    """BDIA on one grid; ``inverse`` runs the exact inverse recurrence."""

    schedule: NoiseSchedule
    grid: Tensor
    steps: tuple[_Step, ...]
    gamma: float
    inverse: bool = False

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        return len(self.steps)

    def init(self, x: Tensor) -> BDIAState:
        return BDIAState(x=x, t=self.steps[0].t)

    def init_pair(self, x_prev: Tensor, x: Tensor) -> BDIAState:
        """Start after the first step, from a known pair (e.g. an inversion's last two states):
        ``x_prev`` at the grid's first time, ``x`` at its second."""
        if len(self.steps) < 2:
            raise ValueError("init_pair: the grid needs at least 2 steps")
        return BDIAState(x=x, t=self.steps[1].t, step=1, x_prev=x_prev)

    def step(self, model: Denoiser, state: State) -> BDIAState:
        assert isinstance(state, BDIAState)
        c = self.steps[state.step]
        x0 = model(state.x, c.t).x0
        (a_f, c_f), back = c.forward, c.backward
        forward = state.x * a_f + x0 * c_f  # F_k (sampling) / F towards the cleaner time
        if state.x_prev is None or back is None:
            x_next = forward  # plain DDIM step (first step / DDIM inversion)
        else:
            backward = state.x * back[0] + x0 * back[1]
            if self.inverse:  # z_{k-1} = B_k + (z_{k+1} - F_k) / gamma
                x_next = backward + (state.x_prev - forward) / self.gamma
            else:  # z_{k+1} = F_k + gamma (z_{k-1} - B_k)
                x_next = forward + self.gamma * (state.x_prev - backward)
        return replace(
            state,
            x=x_next,
            t=c.t_next,
            step=state.step + 1,
            denoised=x0,
            x_prev=state.x,
            done=state.step + 1 == len(self.steps),
        )


@dataclass(frozen=True)
class BDIA(Solver):
    """BDIA-DDIM sampler with exact inversion (see the module docstring).

    Args:
        gamma: :math:`\\gamma \\in (0, 1]` (1: fully symmetric; the paper uses 0.5–1).
            The round trip is exact in exact arithmetic for every γ, but the inverse
            recurrence divides by γ at every step, so rounding errors grow like
            :math:`\\gamma^{-n}`:
            with γ = 0.5 the digits round trip is 2e-7 at 10 steps and diverges at 50
            (BENCHMARKS.md). γ = 1 stays at rounding level (7e-6 at 50 steps).
    """

    gamma: float = 1.0
    order: int = 1
    name: ClassVar[str] = "bdia"

    @property
    def convergence_order(self) -> int:
        r"""2 for the symmetric scheme (:math:`\gamma = 1`, a leapfrog-like two-step method),
        else 1 (measured in ``tests/test_reliability.py``)."""
        return 2 if self.gamma == 1.0 else 1

    def __post_init__(self) -> None:
        check_order(self.order, (1,), "BDIA")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(
                f"gamma must lie in (0, 1] (gamma = 0 is not invertible), got {self.gamma!r}"
            )

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> BDIAPlan:
        v = GridValues.of(schedule, grid)
        inverse = bool(grid[-1] > grid[0])
        steps = []
        for i in range(len(v.t) - 1):
            # sampling: B goes back to the previous (noisier) time; inversion: the roles of
            # the two neighbours swap — "forward" is towards t_{i+1} (noisier), "backward"
            # towards t_{i-1} (cleaner), and the update solves the sampling recurrence
            other = _ddim(v, i, i - 1) if i > 0 else None
            steps.append(_Step(v.t[i], v.t[i + 1], _ddim(v, i, i + 1), other))
        if inverse:  # in the inverse recurrence F is the map to the cleaner neighbour
            steps = [
                replace(s, forward=s.backward or s.forward, backward=s.forward)
                if s.backward is not None
                else s
                for s in steps
            ]
        return BDIAPlan(schedule, grid, tuple(steps), self.gamma, inverse)


def bdia_invert(
    model: Denoiser, x: Tensor, grid: Tensor | Sequence[float], gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Invert data ``x`` (the state at the grid's cleanest time) with BDIA.

    ``grid`` is the sampling grid (decreasing, ending at ``t > 0``). Returns the pair
    ``(x_T, x_next)`` at the grid's first two times; :func:`bdia_reconstruct` maps it back to
    ``x`` exactly (to rounding error). The first inversion step is plain DDIM inversion, as
    in the paper; exactness does not depend on it.
    """
    from diffsolve.ode.sampling import sample

    ts = torch.as_tensor(grid, dtype=torch.float64).flatten().flip(0)
    solver = BDIA(gamma)
    out = sample(
        model,
        x,
        solver,
        plan=solver.plan(model.schedule, ts, inverse=True),
        return_intermediates=True,
    )
    return out.x, out.intermediates[-2].to(out.x.dtype)


def bdia_reconstruct(
    model: Denoiser,
    x_T: Tensor,
    x_next: Tensor,
    grid: Tensor | Sequence[float],
    gamma: float = 1.0,
) -> Tensor:
    """Sample with BDIA from the pair :func:`bdia_invert` returned."""
    from diffsolve.ode.sampling import sample

    solver = BDIA(gamma)
    plan = solver.plan(model.schedule, grid)
    return sample(model, x_T, solver, plan=plan, initial_state=plan.init_pair(x_T, x_next)).x
