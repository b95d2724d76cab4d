"""Run the bench: reference solves, every contestant at every NFE, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from diffsolve.app.bench.peers import Peer, default_peers, null_overhead, stochastic_peers
from diffsolve.app.bench.timing import TimedModel, synchronize
from diffsolve.app.loader import LoadedModel, LoadOptions
from diffsolve.app.metrics import frechet_distance
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode import grids
from diffsolve.ode.plan import Solver
from diffsolve.ode.sampling import sample
from diffsolve.solvers import DPMSolverPP, UniPC
from diffsolve.solvers.registry import (
    PREFIXES,
    SOLVERS,
    SolverContext,
    lineup,
    preset,
    setup_solver,
)

if TYPE_CHECKING:
    from diffsolve.app.bench.same_grid import SameGrid

DEFAULT_NFES = (5, 6, 8, 10, 12, 15, 20)


@dataclass
class Row:
    """One (solver, NFE) result: ``nfe`` is what the run actually spent, ``nfe_budget`` what
    it was given (they differ only for Heun at even budgets)."""

    solver: str
    source: Literal["diffsolve", "diffusers"]
    nfe: int
    nfe_budget: int = 0
    rmse: float | None = None
    median: float | None = None
    fd: float | None = None
    fd_ode: float | None = None
    seconds: float | None = None
    overhead_us: float | None = None
    failed: bool = False
    error: str | None = None


@dataclass
class BenchConfig:
    """What to measure. See ``diffsolve bench --help`` for the meaning of each field.

    ``data``: held-out data in the model's sample space for the Fréchet distance
    (:func:`~diffsolve.app.model_data.model_data`: ``digits``, an array file, an image
    folder); default ``digits`` for 8×8 models, else none (RMSE and median only). ``load``:
    how to load the model (:class:`~diffsolve.app.loader.LoadOptions`). ``check``: refuse a
    clearly wrong declared convention first (:func:`~diffsolve.app.check_model.quick_check`,
    on ``data`` or the model's own samples)."""

    model: str = "digits"
    nfes: Sequence[int] = DEFAULT_NFES
    solvers: Sequence[str] | None = None
    samples: int = 512
    seed: int = 0
    reference_steps: int = 500
    device: str = "cpu"
    overhead: bool = True
    data: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    check: bool = True


@dataclass
class BenchResult:
    """Everything the bench measured (serialised to JSON as is). ``same_grid``: DPM-Solver-v3
    against our other solvers on its own grid (:mod:`diffsolve.app.bench.same_grid`), one
    entry per v3 contestant that has one."""

    model: str
    samples: int
    seed: int
    reference: dict[str, Any]
    reference_agreement: float
    fd_reference: float | None
    fd_train: float | None
    results: list[Row] = field(default_factory=list)
    same_grid: list[SameGrid] = field(default_factory=list)
    overhead: list[dict[str, float]] = field(default_factory=list)
    seconds_total: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["results"] = [asdict(r) for r in self.results]
        return out


@dataclass(frozen=True)
class Contestant:
    """A named way to sample at a given NFE."""

    name: str
    source: Literal["diffsolve", "diffusers"]
    run: Callable[[TimedModel, Tensor, int], tuple[Tensor, int, float]]
    #: Draws fresh noise (an SDE sampler): also measured by its FD to the reference ODE's
    #: samples, where per-sample RMSE does not apply.
    stochastic: bool = False
    #: The only NFE it runs at (a fitted solver schedule); ``None``: every NFE.
    nfe: int | None = None


def _ours(name: str, context: SolverContext, grid_kind: str | None = None) -> Contestant:
    def run(model: TimedModel, x: Tensor, nfe: int) -> tuple[Tensor, int, float]:
        solver, grid = setup_solver(name, model.schedule, nfe, grid_kind, context=context)
        return run_solver(solver, grid, model, x)

    label = name if grid_kind is None else f"{name}@{grid_kind}"
    return Contestant(label, "diffsolve", run, _is_stochastic(name))


def _is_stochastic(name: str) -> bool:
    solver = preset(name).solver
    return bool(solver is not None and solver.stochastic)


def _twin(peer: Peer, context: SolverContext) -> Contestant:
    """The registry solver ``peer.twin`` on the grid of its diffusers peer."""
    twin = SOLVERS[peer.twin or ""]

    def run(model: TimedModel, x: Tensor, nfe: int) -> tuple[Tensor, int, float]:
        return run_solver(twin.build(nfe, context), peer.grid(model.schedule, nfe), model, x)

    return Contestant(f"{twin.name}@diffusers-grid", "diffsolve", run, _is_stochastic(twin.name))


def run_solver(
    solver: Solver, grid: Tensor, model: TimedModel, x: Tensor
) -> tuple[Tensor, int, float]:
    """Sample with ``solver`` on ``grid``; return ``(x, steps, loop seconds)``."""
    plan = solver.plan(model.schedule, grid)
    start = time.perf_counter()
    # a stochastic solver's noise: per sample, from the bench's seeds
    out = sample(model, x, solver, plan=plan, noise=getattr(model, "seeds", None))
    synchronize(out.x)
    return out.x, plan.num_steps or out.nfe, time.perf_counter() - start


def contestants(
    names: Sequence[str] | None, loaded: LoadedModel, context: SolverContext | None = None
) -> list[Contestant]:
    """Resolve contestant names: ``NAME`` (registry), ``NAME@GRID`` (grid override),
    ``NAME@diffusers-grid`` (on its diffusers twin's grid), ``diffusers:PEER``. ``None`` gives
    the default line-up: the registry's line-up (:func:`~diffsolve.solvers.registry.lineup`;
    DPM-Solver-v3 where the model ships EMS), every diffusers peer, and the twins. ``context``
    holds what solvers need from the model (default: every file the model folder ships)."""
    context = context or loaded.solver_context(loaded.available())
    found = (loaded.schedule, bool(loaded.num_classes), loaded.scheduler_config)
    peers = {p.name: p for p in default_peers(*found)}
    twins = {p.twin: p for p in peers.values() if p.twin}
    if names is None:
        names = [*lineup(context.provides()), *peers, *(f"{t}@diffusers-grid" for t in twins)]
    extra = {p.name: p for p in stochastic_peers(*found)}
    peers |= extra
    twins |= {p.twin: p for p in extra.values() if p.twin}
    return [_contestant(name, peers, twins, context) for name in names]


def _contestant(
    name: str, peers: dict[str, Peer], twins: dict[str, Peer], context: SolverContext
) -> Contestant:
    base, _, grid_kind = name.partition("@")
    if name in peers:
        return Contestant(name, "diffusers", peers[name].run, peers[name].stochastic)
    if grid_kind == "diffusers-grid":
        if base not in twins:
            raise ValueError(f"{name}: no diffusers twin for {base!r}; twins: {sorted(twins)}")
        return _twin(twins[base], context)
    fixed = preset(name) if base.partition(":")[0] in PREFIXES else None
    if fixed is not None and fixed.times is not None:  # a solver-schedule file
        nfe = len(fixed.times) - 1 - int(fixed.options_for(0).get("teleport", False))
        return replace(_ours(name, context), nfe=nfe)
    if base in SOLVERS:
        if grid_kind and grid_kind not in grids.GRIDS:
            raise ValueError(f"{name}: grid must be one of {sorted(grids.GRIDS)}")
        return _ours(base, context, grid_kind or None)
    raise ValueError(
        f"unknown contestant {name!r}: use a solver from `diffsolve solvers`, NAME@GRID, "
        f"NAME@diffusers-grid or one of {sorted(peers)}"
    )


def reference_solve(
    model: TimedModel, x: Tensor, steps: int
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Two high-accuracy solves of the same ODE to clean data: DPM-Solver++(3M) and UniPC-bh2
    order 2 with its corrector (order 3), each on ``steps`` logSNR-uniform steps."""
    schedule = model.schedule
    grid = grids.append_zero(schedule, grids.logsnr_uniform(schedule, steps))
    first = sample(model, x, DPMSolverPP(3, lower_order_final=False), grid).x
    second = sample(model, x, UniPC(2, "bh2", lower_order_final=False), grid).x
    info = {
        "method": f"dpm-solver++-3m, {steps} logSNR steps + final x0 step",
        "check": f"unipc-bh2-2 + corrector, {steps} logSNR steps + final x0 step",
    }
    return first, second, info


def rmse(a: Tensor, b: Tensor) -> float:
    """Root mean square difference over all dimensions and samples."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def median_error(a: Tensor, b: Tensor) -> float:
    """The median over samples of the per-sample RMS difference: unlike the RMSE, not
    decided by the few trajectories near a boundary between two modes (BENCHMARKS.md §12)."""
    return float((a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt().median())


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the whole bench for one model: every contestant at every NFE, then the same-grid
    section of each v3 contestant (:mod:`diffsolve.app.bench.same_grid`)."""
    from tqdm.auto import tqdm

    from diffsolve.app.bench.same_grid import RUNS_PER_NFE, run_same_grid, same_grid_contestants
    from diffsolve.app.loader import load_model

    started = time.perf_counter()
    loaded = load_model(config.model, device=config.device, options=config.load)
    seeds = list(range(config.seed, config.seed + config.samples))
    x_start = noise_for_seeds(seeds, loaded.data_shape, device=config.device)
    denoiser = loaded.denoiser
    if loaded.num_classes:
        labels = torch.tensor(seeds, device=config.device) % loaded.num_classes
        denoiser = loaded.conditional(labels)
    model = TimedModel(denoiser)
    model.seeds = seeds
    test, train = _held_out(loaded, config.data)
    say = progress or (lambda message: None)
    if config.check:
        from diffsolve.app.check_model import quick_check

        quick_check(loaded, test, None, config.data or "digits test", say)
    say(f"bench {config.model}: reference solves, 2 x {config.reference_steps} steps ...")
    with torch.inference_mode():
        reference, check, info = reference_solve(model, x_start, config.reference_steps)
    result = BenchResult(
        model=config.model,
        samples=config.samples,
        seed=config.seed,
        reference=info,
        reference_agreement=rmse(reference, check),
        fd_reference=None if test is None else frechet_distance(reference.cpu(), test),
        fd_train=None if train is None else frechet_distance(train, test),
    )
    context = loaded.solver_context(loaded.available())
    runs = contestants(config.solvers, loaded, context)
    v3s = same_grid_contestants(config.solvers, [c.name for c in runs], context)
    total = (len(runs) + len(v3s) * RUNS_PER_NFE) * len(config.nfes)
    bar = tqdm(total=total, desc=f"bench {config.model}", unit="run")

    def measure_at(contestant: Contestant, nfe: int) -> Row:
        row = measure(contestant, model, x_start, nfe, reference, test)
        bar.update(1)
        return row

    for contestant in runs:
        result.results += [
            measure_at(contestant, nfe)
            for nfe in config.nfes
            if contestant.nfe is None or contestant.nfe == nfe
        ]
    for name in v3s:
        section = run_same_grid(name, context, result.results, measure_at, config.nfes, model)
        result.same_grid.append(section)
    bar.close()
    if config.overhead:
        say(f"bench {config.model}: overhead per step (null model) ...")
        result.overhead = [null_overhead(batch) for batch in (1, config.samples)]
    result.seconds_total = time.perf_counter() - started
    return result


def _held_out(loaded: LoadedModel, data: str | None) -> tuple[Tensor | None, Tensor | None]:
    """``(test, train)`` data for the Fréchet distances: the digits' two splits for 8×8
    models by default, ``--data`` (no training split) where given, else none."""
    from diffsolve.app.model_data import model_data

    if data is None and loaded.data_shape != (1, 8, 8):
        return None, None
    source = data or "digits"
    test, _ = model_data(loaded, source, split="test")
    train = model_data(loaded, source, split="train")[0] if source == "digits" else None
    return test, train


def measure(
    contestant: Contestant,
    model: TimedModel,
    x: Tensor,
    nfe: int,
    reference: Tensor,
    test: Tensor | None,
) -> Row:
    """One contestant at one NFE from ``x``: RMSE to ``reference``, FD to ``test`` (where
    given), speed. A contestant that raises or returns non-finite values gives a failed row,
    not an error."""
    row = Row(contestant.name, contestant.source, nfe, nfe_budget=nfe)
    model.reset()
    try:
        with torch.inference_mode():
            out, steps, seconds = contestant.run(model, x, nfe)
    except Exception as err:  # a peer that fails is reported, never crashes the bench
        row.failed, row.error = True, f"{type(err).__name__}: {err}"[:300]
        return row
    row.nfe = model.calls
    if not torch.isfinite(out).all():
        row.failed, row.error = True, "non-finite output (NaN or inf)"
        return row
    row.rmse = rmse(out, reference)
    row.median = median_error(out, reference)
    row.fd = None if test is None else frechet_distance(out.float().cpu(), test)
    if contestant.stochastic and test is not None:
        row.fd_ode = frechet_distance(out.float().cpu(), reference.float().cpu())
    row.seconds = seconds / x.shape[0]
    row.overhead_us = 1e6 * max(seconds - model.seconds, 0.0) / max(steps, 1)
    if not math.isfinite(row.rmse):
        row.failed, row.error = True, "non-finite RMSE"
    return row
