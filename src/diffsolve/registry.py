"""Named solver configurations, set up for a budget of model evaluations (NFE).

The CLI and the bench speak in NFE; :func:`setup_solver` turns a name and a budget into a
solver and a grid that spend exactly that many evaluations (Heun at even budgets: one less).
Every grid runs from the schedule's ``t_start`` to its ``t_end`` and then takes a final step
to clean data (``t = 0``), which returns the model's :math:`\\hat x_0` at ``t_end`` without an
extra evaluation — the convention of diffusers' ``final_sigmas_type="zero"``, so every
contestant of the bench targets the same endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from diffsolve import grids
from diffsolve.schedule import NoiseSchedule
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


@dataclass(frozen=True)
class SolverSpec:
    """A named solver configuration.

    Attributes:
        name: Registry key (CLI ``--solver``).
        description: One line for ``diffsolve solvers``.
        build: ``nfe -> Solver`` (single-step methods pick their order mix from the budget).
        steps: ``nfe -> number of grid steps``, including the final step to ``t = 0``.
        grid: Default grid kind (see :data:`diffsolve.grids.GRIDS`).
    """

    name: str
    description: str
    build: Callable[[int], Solver]
    steps: Callable[[int], int]
    grid: str = "logsnr"


def _multistep(name: str, description: str, make: Callable[[], Solver]) -> SolverSpec:
    return SolverSpec(name, description, lambda nfe: make(), lambda nfe: nfe)


def _singlestep(name: str, description: str, cls: type[DPMSolver], order: int) -> SolverSpec:
    def orders(nfe: int) -> tuple[int, ...]:
        return (*fast_orders(nfe - 1, order), 1)  # last: the free step to t = 0

    return SolverSpec(
        name,
        description,
        lambda nfe: cls(order, method="singlestep", orders=orders(nfe)),
        lambda nfe: len(orders(nfe)),
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
    )
}


def setup_solver(
    name: str,
    schedule: NoiseSchedule,
    nfe: int,
    grid: str | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
) -> tuple[Solver, Tensor]:
    """The solver ``name`` and a grid spending ``nfe`` model evaluations on ``schedule``."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2, got {nfe!r}")
    spec = SOLVERS[name]
    steps = spec.steps(nfe)
    body = grids.make_grid(schedule, steps - 1, grid or spec.grid, t_start, t_end)
    return spec.build(nfe), grids.append_zero(schedule, body)
