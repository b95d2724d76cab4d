"""DPM-Solver-v3 against diffsolve's own solvers on v3's own grid: what the EMS earn.

The bench's main table runs every contestant on its own default grid and compares v3 with
diffusers' schedulers on theirs, so a v3 win mixes two things: the statistics and the grid.
This section separates them. At each NFE, on exactly the grid the bench's v3 contestant used
(:func:`~diffsolve.solvers.registry.setup_solver`'s, so ``dpm-solver-v3@GRID`` compares on
``GRID``), it runs

* v3 with *degenerate* statistics (``l = 1, s = b = 0``,
  :meth:`~diffsolve.stats.ems.EMS.degenerate`) over the model EMS's time range and λ grid
  size, every solver option unchanged: the same method without what the EMS know about the
  model (without its corrector it is DPM-Solver++(2M) in Taylor form);
* diffsolve's DPM-Solver++(2M) and UniPC-bh2 of orders 3 and 2 (:data:`RIVALS`);

and reports, beside v3's RMSE (the main table's row, not re-run):

* the *same-grid ratio* — v3 / the lowest RMSE among :data:`RIVALS` on that grid;
* the *degenerate ratio* — v3 / v3 with degenerate statistics;
* the ratio to the best diffusers scheduler at that NFE on its own grid (when the bench ran
  diffusers' schedulers).

Below 1 means v3 is the more accurate. The extra cost is ``1 + len(RIVALS)`` sampling runs
per NFE and v3 contestant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from diffsolve.app.bench.runner import Contestant, Row, run_solver
from diffsolve.app.bench.timing import TimedModel
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.registry import SOLVERS, SolverContext, default_grid_kind, setup_solver
from diffsolve.stats.ems import EMS

#: The registry name of DPM-Solver-v3.
V3 = "dpm-solver-v3"
#: diffsolve's solvers v3 is compared with on its own grid.
RIVALS = ("dpm-solver++-2m", "unipc-bh2-3", "unipc-bh2-2")
#: Row label of v3 with degenerate statistics.
DEGENERATE = f"{V3} (degenerate EMS)"
#: Sampling runs the section adds per NFE and v3 contestant.
RUNS_PER_NFE = 1 + len(RIVALS)


@dataclass
class SameGridRatio:
    """The same-grid comparison at one NFE (RMSEs to the reference; ratios ``v3 / other``,
    ``None`` where a run failed or was not made).

    Attributes:
        nfe: The budget.
        grid: The grid kind v3 ran on at this budget.
        times: The grid itself (solver time, last point 0): every run of the section used it.
        v3: v3 with the model's EMS (the bench's row).
        degenerate: v3 with degenerate statistics.
        best_rival: The most accurate of :data:`RIVALS` on this grid, and its RMSE.
        same_grid_ratio: ``v3 / best_rival_rmse``.
        degenerate_ratio: ``v3 / degenerate``.
        best_diffusers: The most accurate diffusers scheduler (own grid), and its RMSE.
        diffusers_ratio: ``v3 / best_diffusers_rmse``.
        median_ratio: v3's median per-sample error / the lowest median among
            :data:`RIVALS` (the RMSE at high NFE is decided by a few boundary samples).
    """

    nfe: int
    grid: str
    times: list[float]
    v3: float | None
    degenerate: float | None
    best_rival: str | None
    best_rival_rmse: float | None
    same_grid_ratio: float | None
    degenerate_ratio: float | None
    best_diffusers: str | None
    best_diffusers_rmse: float | None
    diffusers_ratio: float | None
    median_ratio: float | None = None


@dataclass
class SameGrid:
    """The same-grid section for one v3 contestant.

    Attributes:
        contestant: The v3 contestant whose grid is used (``dpm-solver-v3[@GRID]``).
        runs: Every run of the section (v3 with degenerate EMS, then :data:`RIVALS`), as
            the main table's rows.
        ratios: One entry per NFE.
    """

    contestant: str
    runs: list[Row] = field(default_factory=list)
    ratios: list[SameGridRatio] = field(default_factory=list)


def same_grid_contestants(
    selected: Sequence[str] | None, ran: Sequence[str], context: SolverContext
) -> list[str]:
    """The v3 contestants that get a same-grid section: with the default line-up
    (``selected=None``) v3 on its default grid only; with named contestants every
    ``dpm-solver-v3[@GRID]`` among them. None where the model has no EMS."""
    if "ems" not in context.provides():
        return []
    if selected is None:
        return [V3] if V3 in ran else []
    return list(dict.fromkeys(n for n in selected if n.partition("@")[0] == V3))


def degenerate_ems(ems: EMS, schedule: NoiseSchedule) -> EMS:
    """Degenerate statistics (``l = 1, s = b = 0``) over ``ems``' time range, with as many
    λ intervals, on its device: covering the same λ range, they let v3 accept the same grids
    and leave out the same too-noisy points as with ``ems``."""
    meta = ems.metadata
    t_start = meta.get("t_start", float(schedule.t_of_lambda(ems.lambda_range[0])))
    t_end = meta.get("t_end", float(schedule.t_of_lambda(ems.lambda_range[1])))
    flat = EMS.degenerate(schedule, ems.data_shape, t_start, t_end, n=ems.num_intervals)
    return flat.to(ems.one_minus_l.device)


def v3_grid(name: str, model: TimedModel, nfe: int, context: SolverContext) -> tuple[str, Tensor]:
    """The grid kind and grid the bench's contestant ``name`` (``dpm-solver-v3[@GRID]``)
    samples on at ``nfe``."""
    base, _, kind = name.partition("@")
    _, grid = setup_solver(base, model.schedule, nfe, kind or None, context=context)
    return kind or default_grid_kind(SOLVERS[base], model.schedule, nfe), grid


def section_runs(name: str, schedule: NoiseSchedule, context: SolverContext) -> list[Contestant]:
    """v3 with degenerate statistics and every rival, each on the grid of contestant
    ``name`` (``context`` holds the model's EMS, ``schedule`` is the model's)."""
    flat = replace(context, ems=degenerate_ems(context.require("ems", V3), schedule))
    entries = [(DEGENERATE, V3, flat), *((rival, rival, context) for rival in RIVALS)]
    return [_on_v3_grid(label, solver, ctx, name, context) for label, solver, ctx in entries]


def _on_v3_grid(
    label: str, solver: str, solver_context: SolverContext, name: str, context: SolverContext
) -> Contestant:
    def run(model: TimedModel, x: Tensor, nfe: int) -> tuple[Tensor, int, float]:
        _, grid = v3_grid(name, model, nfe, context)
        return run_solver(SOLVERS[solver].build(nfe, solver_context), grid, model, x)

    return Contestant(label, "diffsolve", run)


def run_same_grid(
    name: str,
    context: SolverContext,
    main: Sequence[Row],
    measure_at: Callable[[Contestant, int], Row],
    nfes: Sequence[int],
    model: TimedModel,
) -> SameGrid:
    """The section for v3 contestant ``name``: ``measure_at(contestant, nfe)`` runs one
    contestant (as the bench's main loop does); ``main`` holds the main table's rows (v3's
    and diffusers' RMSEs)."""
    section = SameGrid(name)
    runs = section_runs(name, model.schedule, context)
    for nfe in nfes:
        for contestant in runs:
            section.runs.append(measure_at(contestant, nfe))
        kind, grid = v3_grid(name, model, nfe, context)
        section.ratios.append(_ratio(name, nfe, kind, grid, main, section.runs))
    return section


def _ratio(
    name: str, nfe: int, kind: str, grid: Tensor, main: Sequence[Row], runs: Sequence[Row]
) -> SameGridRatio:
    def rmse(rows: Sequence[Row], label: str) -> float | None:
        return next((r.rmse for r in _ok(rows, nfe) if r.solver == label), None)

    v3, degenerate = rmse(main, name), rmse(runs, DEGENERATE)
    rival = _best([r for r in _ok(runs, nfe) if r.solver in RIVALS])
    v3_median = next((r.median for r in _ok(main, nfe) if r.solver == name), None)
    medians = [r.median for r in _ok(runs, nfe) if r.solver in RIVALS and r.median is not None]
    peer = _best([r for r in _ok(main, nfe) if r.source == "diffusers"])
    return SameGridRatio(
        nfe=nfe,
        grid=kind,
        times=[float(t) for t in grid],
        v3=v3,
        degenerate=degenerate,
        best_rival=rival.solver if rival else None,
        best_rival_rmse=rival.rmse if rival else None,
        same_grid_ratio=_div(v3, rival.rmse if rival else None),
        degenerate_ratio=_div(v3, degenerate),
        best_diffusers=peer.solver if peer else None,
        best_diffusers_rmse=peer.rmse if peer else None,
        diffusers_ratio=_div(v3, peer.rmse if peer else None),
        median_ratio=_div(v3_median, min(medians, default=None)),
    )


def _ok(rows: Sequence[Row], nfe: int) -> list[Row]:
    return [r for r in rows if r.nfe_budget == nfe and not r.failed and r.rmse is not None]


def _best(rows: Sequence[Row]) -> Row | None:
    return min(rows, key=lambda r: r.rmse or 0.0, default=None)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
