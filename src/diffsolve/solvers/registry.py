"""Named solver configurations, set up for a budget of model evaluations (NFE).

The CLI and the bench speak in NFE; :func:`setup_solver` turns a name and a budget into a
solver and a grid that spend exactly that many evaluations (Heun at even budgets: one less).
Every grid ends at clean data (``t = 0``): its last step returns the model's :math:`\\hat x_0`
at the last positive time without an extra evaluation — the convention of diffusers'
``final_sigmas_type="zero"`` — so every contestant of the bench targets the same endpoint.
Grids uniform in ``t`` or :math:`\\sqrt t` run straight to 0 (``nfe`` intervals, as diffusers'
``linspace`` timesteps do); logSNR and Karras grids cannot reach λ = ∞, so they run to the
schedule's ``t_end`` and then take the step to 0.

The default grid is ``time_quadratic``: on the digits demo it gave the lowest error at every
NFE from 5 to 20 for DPM-Solver++, UniPC and DEIS (BENCHMARKS.md, "Step grids"). Heun and the
noise-prediction DPM-Solvers default to ``time_uniform`` (DPM-Solver's own default), which
suits their larger steps near the data better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from diffsolve.ode import grids
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers import (
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverPP,
    Euler,
    Heun,
    Solver,
    UniPC,
    fast_orders,
)
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3

if TYPE_CHECKING:
    from diffsolve.app.loader import LoadedModel


def _v3(nfe: int, model: LoadedModel) -> Solver:
    """DPM-Solver-v3 with the settings measured best on the demo models (BENCHMARKS.md).

    Order-2 predictor with the pseudo-order corrector (order 3) after every evaluation, on the
    time-quadratic grid: on ``digits`` it beat order 3 at every budget but 15 NFE (where the
    two are within 3%), and the time-quadratic grid beat logSNR- and time-uniform grids at
    every budget from 5 to 20 NFE.
    """
    return DPMSolverV3(model.load_ems(), order=2, corrector=True, corrector_pseudo=True)


@dataclass(frozen=True)
class SolverSpec:
    """A named solver configuration.

    Attributes:
        name: Registry key (CLI ``--solver``).
        description: One line for ``diffsolve solvers``.
        build: ``nfe -> Solver`` (single-step methods pick their order mix from the budget);
            with ``needs_model``, ``(nfe, model) -> Solver`` (DPM-Solver-v3 loads the model's EMS).
        steps: ``nfe -> number of grid steps``, including the final step to ``t = 0``.
        grid: Default grid kind (see :data:`diffsolve.ode.grids.GRIDS`), or ``nfe -> kind``.
    """

    name: str
    description: str
    build: Callable[[int], Solver]
    steps: Callable[[int], int]
    grid: str | Callable[[int], str] = "time_quadratic"
    needs_model: bool = False

    def grid_kind(self, nfe: int) -> str:
        """The default grid kind at this budget (:attr:`grid` may depend on ``nfe``)."""
        return self.grid(nfe) if callable(self.grid) else self.grid


def _multistep(
    name: str, description: str, make: Callable[[], Solver], grid: str = "time_quadratic"
) -> SolverSpec:
    return SolverSpec(name, description, lambda nfe: make(), lambda nfe: nfe, grid)


def _singlestep(
    name: str, description: str, cls: type[DPMSolver], order: int, grid: str = "time_quadratic"
) -> SolverSpec:
    def orders(nfe: int) -> tuple[int, ...]:
        return (*fast_orders(nfe - 1, order), 1)  # last: the free step to t = 0

    return SolverSpec(
        name,
        description,
        lambda nfe: cls(order, method="singlestep", orders=orders(nfe)),
        lambda nfe: len(orders(nfe)),
        grid,
    )


SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        _multistep("ddim", "DDIM (eta = 0), first order", DDIM),
        _multistep("euler", "Euler on (x/alpha, sigma/alpha), first order (= DDIM)", Euler),
        SolverSpec(
            "heun",
            "Heun, EDM Algorithm 1, 2 NFE per step, Karras grid",
            lambda nfe: Heun(),
            lambda nfe: (nfe + 1) // 2,
            grid="karras",
        ),
        _multistep(
            "dpm-solver-2m",
            "DPM-Solver multistep, order 2 (noise prediction)",
            lambda: DPMSolver(2),
        ),
        _multistep(
            "dpm-solver-3m",
            "DPM-Solver multistep, order 3 (noise prediction)",
            lambda: DPMSolver(3),
        ),
        _singlestep(
            "dpm-solver-fast", "DPM-Solver-fast: single-step order 3 mix (noise)", DPMSolver, 3
        ),
        _multistep("dpm-solver++-2m", "DPM-Solver++(2M), midpoint form", lambda: DPMSolverPP(2)),
        _multistep(
            "dpm-solver++-3m", "DPM-Solver++(3M), exact third order", lambda: DPMSolverPP(3)
        ),
        _singlestep("dpm-solver++-2s", "DPM-Solver++(2S), single-step", DPMSolverPP, 2),
        _singlestep("dpm-solver++-3s", "DPM-Solver++(3S), single-step", DPMSolverPP, 3),
        _multistep("unipc-bh1-2", "UniPC bh1, order 2 + corrector", lambda: UniPC(2, "bh1")),
        _multistep("unipc-bh1-3", "UniPC bh1, order 3 + corrector", lambda: UniPC(3, "bh1")),
        _multistep("unipc-bh2-2", "UniPC bh2, order 2 + corrector", lambda: UniPC(2, "bh2")),
        _multistep("unipc-bh2-3", "UniPC bh2, order 3 + corrector", lambda: UniPC(3, "bh2")),
        _multistep("deis-2", "DEIS tAB, order 2", lambda: DEIS(2)),
        _multistep("deis-3", "DEIS tAB, order 3", lambda: DEIS(3)),
        SolverSpec(
            "dpm-solver-v3",
            "DPM-Solver-v3 with the model's EMS (order 2 + pseudo-order-3 corrector)",
            _v3,
            lambda nfe: nfe,
            needs_model=True,
        ),  # type: ignore[arg-type]
    )
}


#: Used by :func:`default_solver` for models without EMS: the best of the other solvers at
#: 10 NFE on the demo models (BENCHMARKS.md).
FALLBACK_SOLVER = "unipc-bh2-3"


def default_solver(model: LoadedModel) -> str:
    """The solver ``diffsolve sample`` uses unless told: ``dpm-solver-v3`` where the model
    folder holds EMS (the best solver at 5–20 NFE on every demo model, BENCHMARKS.md), else
    :data:`FALLBACK_SOLVER`."""
    return "dpm-solver-v3" if model.has_ems else FALLBACK_SOLVER


def setup_solver(
    name: str,
    schedule: NoiseSchedule,
    nfe: int,
    grid: str | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    model: LoadedModel | None = None,
) -> tuple[Solver, Tensor]:
    """The solver ``name`` and a grid spending ``nfe`` model evaluations on ``schedule``.

    ``model`` is needed by solvers that use model statistics (DPM-Solver-v3 picks up the
    model's shipped EMS file).
    """
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2, got {nfe!r}")
    spec = SOLVERS[name]
    if spec.needs_model:
        if model is None:
            raise ValueError(f"solver {name!r} needs the model (its statistics); pass model=")
        solver = spec.build(nfe, model)  # type: ignore[call-arg]
    else:
        solver = spec.build(nfe)
    kind = grid or spec.grid_kind(nfe)
    return solver, nfe_grid(schedule, spec.steps(nfe), kind, t_start, t_end)


def nfe_grid(
    schedule: NoiseSchedule,
    steps: int,
    kind: str,
    t_start: float | None = None,
    t_end: float | None = None,
) -> Tensor:
    """A grid of ``steps`` steps whose last point is ``t = 0`` (see the module docstring)."""
    if kind in ("time_uniform", "time_quadratic") and not t_end:
        return grids.make_grid(schedule, steps, kind, t_start, 0.0)
    if steps < 2:
        return grids.custom(schedule, [t_start or schedule.default_range[0], 0.0])
    body = grids.make_grid(schedule, steps - 1, kind, t_start, t_end)
    return grids.append_zero(schedule, body)
