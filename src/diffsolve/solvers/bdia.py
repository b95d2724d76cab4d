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
:mod:`diffsolve.numerics.expint`, so both recurrences are one engine
:class:`~diffsolve.solvers.engine.Update` with a coefficient on the state before:
:math:`z_{k+1} = (a_F - \gamma a_B) z_k + \gamma z_{k-1} + (c_F - \gamma c_B)\hat x_0` (and
:math:`1/\gamma` for :math:`\gamma` when inverting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffsolve.ode.model import Denoiser
from diffsolve.ode.plan import Solver, State
from diffsolve.ode.sampling import sample
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import GridValues, StepPlan, Update, check_order, multistep_plan
from diffsolve.solvers.registry import Preset, register


@register
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
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("bdia", "BDIA-DDIM, exactly invertible (gamma = 1)", {"gamma": 1.0}),
        Preset("bdia-0.5", "BDIA-DDIM, exactly invertible (gamma = 0.5)", {"gamma": 0.5}),
    )

    @property
    def convergence_order(self) -> int:
        r"""2 for the symmetric scheme (:math:`\\gamma = 1`, a leapfrog-like two-step method),
        else 1 (measured in ``tests/test_reliability.py``)."""
        return 2 if self.gamma == 1.0 else 1

    def __post_init__(self) -> None:
        check_order(self.order, (1,), "BDIA")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(
                f"gamma must lie in (0, 1] (gamma = 0 is not invertible), got {self.gamma!r}"
            )

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)
        # sampling: z_{k+1} = F_k + γ (z_{k-1} - B_k); inversion (increasing grid), solved for
        # the noisier neighbour: z_{k+1} = F_k + (z_{k-1} - B_k)/γ, where F now maps towards
        # the noisier time t_{k+1} and B back to the cleaner t_{k-1}
        coupling = 1.0 / self.gamma if bool(grid[-1] > grid[0]) else self.gamma

        def ddim(i: int, j: int) -> tuple[float, float]:
            step = at.exp_step("data", i, j)
            return step.a, step.coef(0)

        def predictor(i: int, order: int) -> Update:
            a_f, c_f = ddim(i, i + 1)
            if i == 0:  # plain DDIM (inversion) step
                return Update(a_f, (c_f,), "data")
            a_b, c_b = ddim(i, i - 1)
            return Update(a_f - coupling * a_b, (c_f - coupling * c_b,), "data", prev=coupling)

        return multistep_plan(at, [1] * at.num_steps, predictor)

    def invert(
        self, model: Denoiser, x: Tensor, grid: Tensor | Sequence[float]
    ) -> tuple[Tensor, Tensor]:
        """Invert data ``x`` (the state at the grid's cleanest time) exactly.

        ``grid`` is the sampling grid (decreasing, ending at ``t > 0``). Returns the pair
        ``(x_T, x_next)`` at the grid's first two times; :meth:`reconstruct` maps it back to
        ``x`` exactly (to rounding error). The first inversion step is plain DDIM inversion,
        as in the paper; exactness does not depend on it.
        """
        ts = torch.as_tensor(grid, dtype=torch.float64).flatten().flip(0)
        plan = self.plan(model.schedule, ts, inverse=True)
        out = sample(model, x, self, plan=plan, return_intermediates=True)
        return out.x, out.intermediates[-2].to(out.x.dtype)

    def reconstruct(
        self, model: Denoiser, x_T: Tensor, x_next: Tensor, grid: Tensor | Sequence[float]
    ) -> Tensor:
        """Sample from the pair :meth:`invert` returned (the state after the first step)."""
        plan = self.plan(model.schedule, grid)
        if plan.num_steps < 2:
            raise ValueError("reconstruct: the grid needs at least 2 steps")
        start = State(x=x_next, t=plan.steps[1].t, step=1, x_prev=x_T)
        return sample(model, x_T, self, plan=plan, initial_state=start).x


def bdia_invert(
    model: Denoiser, x: Tensor, grid: Tensor | Sequence[float], gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """:meth:`BDIA.invert` with ``BDIA(gamma)``."""
    return BDIA(gamma).invert(model, x, grid)


def bdia_reconstruct(
    model: Denoiser,
    x_T: Tensor,
    x_next: Tensor,
    grid: Tensor | Sequence[float],
    gamma: float = 1.0,
) -> Tensor:
    """:meth:`BDIA.reconstruct` with ``BDIA(gamma)``."""
    return BDIA(gamma).reconstruct(model, x_T, x_next, grid)
