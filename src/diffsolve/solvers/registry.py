"""The solver registry: every solver file describes itself, this module only collects.

A solver class declares, next to its options and its plan:

* ``presets`` — named configurations (:class:`Preset`): registry name, one-line description,
  options (fixed or chosen from the NFE budget), grid steps per budget, default grid kind,
  and whether the bench's default line-up runs it;
* ``needs`` — constructor arguments taken from the model (``"ems"``: DPM-Solver-v3's
  statistics), supplied by a :class:`SolverContext` that the caller resolves once;
* ``diffusers`` — how a diffusers scheduler config maps onto its options
  (:class:`DiffusersMapping`), from which :mod:`diffsolve.integrations.diffusers` generates a
  drop-in scheduler class;

and is decorated with :func:`register`. The CLI (``diffsolve solvers``, ``--solver``), the
bench line-up and its diffusers twins, the k-diffusion entry point and the diffusers
schedulers are all derived from what is registered here.

**NFE budgets.** The CLI and the bench speak in model evaluations; :func:`setup_solver` turns
a name and a budget into a solver and a grid that spend exactly that many (Heun at even
budgets: one less). Every grid ends at clean data (``t = 0``): its last step returns the
model's :math:`\\hat x_0` at the last positive time without an extra evaluation — diffusers'
``final_sigmas_type="zero"`` — so every contestant of the bench targets the same endpoint.
Grids uniform in ``t`` or :math:`\\sqrt t` run straight to 0 (``nfe`` intervals, as diffusers'
``linspace`` timesteps do); logSNR and Karras grids cannot reach λ = ∞, so they run to the
schedule's ``t_end`` and then take the step to 0.

The default grid is ``time_quadratic``: on the digits demo it gave the lowest error at every
NFE from 5 to 20 for DPM-Solver++, UniPC and DEIS (BENCHMARKS.md, "Step grids").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

from diffsolve.ode import grids
from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule, RectifiedFlow, VPDiscrete
from diffsolve.stats.ems import EMS, load_ems
from diffsolve.stats.gaussian import GaussianModel, load_gaussian_stats

SolverType = TypeVar("SolverType", bound=type[Solver])

#: The grid a preset declares when it has none of its own: the schedule's rule decides.
STANDARD_GRID = "time_quadratic"


def _same(nfe: int) -> int:
    return nfe


@dataclass(frozen=True)
class Preset:
    """A named solver configuration, set up for a budget of model evaluations.

    Attributes:
        name: Registry key (CLI ``--solver``).
        description: One line for ``diffsolve solvers``.
        options: Constructor options, or ``nfe -> options`` (single-step methods choose their
            order mix from the budget).
        steps: ``nfe -> number of grid steps``, including the final step to ``t = 0``.
        grid: Default grid kind (see :data:`diffsolve.ode.grids.GRIDS`), or ``nfe -> kind``.
        lineup: Run in the bench's default line-up.
        lineup_grids: Grid kinds the line-up also runs it on (``NAME@GRID``).
        requires: What this configuration takes from the model, where it is not the
            solver class's ``needs`` (a solver-schedule file: its EMS and teleport).
        times: The grid itself, where the configuration comes with one (a fitted schedule
            file); ``grid`` is then not used.
    """

    name: str
    description: str
    options: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] = field(default_factory=dict)
    steps: Callable[[int], int] = _same
    grid: str | Callable[[int], str] = STANDARD_GRID
    lineup: bool = False
    lineup_grids: tuple[str, ...] = ()
    solver: type[Solver] | None = field(default=None, compare=False)
    requires: tuple[str, ...] | None = None
    times: tuple[float, ...] | None = None

    def grid_kind(self, nfe: int) -> str:
        """The default grid kind at this budget (:attr:`grid` may depend on ``nfe``)."""
        return self.grid(nfe) if callable(self.grid) else self.grid

    def options_for(self, nfe: int) -> dict[str, Any]:
        """The constructor options at this budget."""
        return dict(self.options(nfe) if callable(self.options) else self.options)

    @property
    def needs(self) -> tuple[str, ...]:
        """What the solver takes from the model (see :class:`SolverContext`)."""
        if self.requires is not None:
            return self.requires
        return () if self.solver is None else self.solver.needs

    def build(self, nfe: int, context: SolverContext | None = None) -> Solver:
        """The solver for a budget of ``nfe`` evaluations, its needs read from ``context``."""
        assert self.solver is not None, "a preset is bound to its solver by @register"
        context = context or SolverContext()
        needed = {need: context.require(need, self.name) for need in self.needs}
        return self.solver(**needed, **self.options_for(nfe))


# ---------------------------------------------------------------------------------------
# What solvers need from the model
@dataclass(frozen=True)
class Need:
    """Something a solver takes from the model: how to name it, load it, check it."""

    what: str
    hint: str
    load: Callable[[str], Any]
    check: Callable[[Any, NoiseSchedule], None] = lambda value, schedule: None


def _check_ems(ems: EMS, schedule: NoiseSchedule) -> None:
    ems.check_compatible(schedule)


NEEDS: dict[str, Need] = {
    "ems": Need(
        "the model's empirical model statistics (EMS)",
        "compute them with `diffsolve ems --model MODEL --out ems.safetensors`",
        load_ems,
        _check_ems,
    ),
    "gaussian": Need(
        "Gaussian statistics of the data",
        "compute them with `diffsolve gaussian-stats`",
        load_gaussian_stats,
    ),
}


@dataclass(frozen=True)
class SolverContext:
    """What solvers (and wrappers) may need from the model, resolved once by the caller.

    Attributes:
        ems: DPM-Solver-v3's empirical model statistics (:func:`~diffsolve.stats.ems.load_ems`).
        gaussian: Gaussian statistics of the data (teleportation).
    """

    ems: EMS | None = None
    gaussian: GaussianModel | None = None

    def provides(self) -> frozenset[str]:
        """The needs this context can satisfy."""
        return frozenset(name for name in NEEDS if getattr(self, name) is not None)

    def require(self, need: str, solver: str) -> Any:
        """The value of ``need``, or a clear error naming what is missing and the fix."""
        value = getattr(self, need, None)
        if value is None:
            spec = NEEDS[need]
            raise ValueError(f"solver {solver!r} needs {spec.what}; {spec.hint}")
        return value


# ---------------------------------------------------------------------------------------
# How diffusers scheduler configs map onto a solver
#: ``solver_type`` values of diffusers' and diffsolve's multistep schedulers: a value that
#: belongs to a sibling scheduler (a config taken over with ``from_config``) becomes the
#: default, as diffusers does.
SIBLING_SOLVER_TYPES = ("midpoint", "heun", "taylor", "logrho", "bh1", "bh2")


@dataclass(frozen=True)
class ConfigKey:
    """One diffusers config key of a solver's scheduler.

    Attributes:
        default: The key's default in the scheduler's config.
        option: The solver constructor argument it sets.
        convert: Config value -> option value.
        choices: Allowed config values (``None``: any).
        siblings: Values of other schedulers for the same key, replaced by ``default``.
    """

    default: Any
    option: str
    convert: Callable[[Any], Any] = lambda value: value
    choices: tuple[Any, ...] | None = None
    siblings: tuple[Any, ...] = ()


@dataclass(frozen=True)
class DiffusersMapping:
    """A solver's drop-in diffusers scheduler.

    Attributes:
        scheduler: The generated class's name.
        preset: The registry preset the adapter runs by default (its name in docs and
            the bench).
        keys: The solver's config keys (beyond the schedule and grid keys the adapter
            handles itself, see :mod:`diffsolve.integrations.diffusers`).
        sibling: The diffusers scheduler the adapter replaces: its config keys are the
            adapter's, its ``set_timesteps`` places the steps, and its outputs are matched.
        algorithms: ``algorithm_type`` values and the registry solver ``name`` each runs
            (empty: the key is not the adapter's).
        lower_order_final_below: diffusers lowers the final steps' orders only on grids of
            fewer steps than this (DPM-Solver, DEIS: 15); ``None``: on every grid (UniPC).
    """

    scheduler: str
    preset: str
    keys: Mapping[str, ConfigKey] = field(default_factory=dict)
    sibling: str = "DPMSolverMultistepScheduler"
    algorithms: Mapping[str, str] = field(default_factory=dict)
    lower_order_final_below: int | None = None

    def options(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Solver options from a scheduler config (keys not given take their default)."""
        return {
            key.option: key.convert(config.get(name, key.default))
            for name, key in self.keys.items()
        }


# ---------------------------------------------------------------------------------------
# The registry
SOLVERS: dict[str, Preset] = {}
_CLASSES: list[type[Solver]] = []


def register(cls: SolverType) -> SolverType:
    """Class decorator: add a solver's presets to :data:`SOLVERS` (names must be new)."""
    presets = cls.__dict__.get("presets", ())
    taken = [p.name for p in presets if p.name in SOLVERS]
    if taken:
        raise ValueError(f"{cls.__name__}: solver names {taken} are registered already")
    for preset in presets:
        SOLVERS[preset.name] = replace(preset, solver=cls)
    _CLASSES.append(cls)
    return cls


def unregister(cls: type[Solver]) -> None:
    """Remove a solver class and its presets (tests that register a solver of their own)."""
    for name in [n for n, p in SOLVERS.items() if p.solver is cls]:
        del SOLVERS[name]
    if cls in _CLASSES:
        _CLASSES.remove(cls)


def solver_classes() -> tuple[type[Solver], ...]:
    """Every registered solver class, in registration order."""
    return tuple(_CLASSES)


#: Registry names ``PREFIX:ARGUMENT`` resolved by a function of the argument (a solver
#: schedule file: ``schedule:FILE``), registered by the solver file that reads them.
PREFIXES: dict[str, Callable[[str], Preset]] = {}


def register_prefix(prefix: str, resolve: Callable[[str], Preset]) -> None:
    """Resolve registry names ``prefix:ARGUMENT`` with ``resolve(ARGUMENT)``."""
    PREFIXES[prefix] = resolve


def preset(name: str) -> Preset:
    """The preset ``name`` (or ``PREFIX:ARGUMENT``, :data:`PREFIXES`), or a clear error
    listing the names."""
    prefix, _, argument = name.partition(":") if isinstance(name, str) else ("", "", "")
    if argument and prefix in PREFIXES:
        return PREFIXES[prefix](argument)
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


#: Preference of :func:`default_solver`: DPM-Solver-v3 where the model ships EMS (the best
#: solver at 5–20 NFE on every demo model), else the best of the others at 10 NFE
#: (BENCHMARKS.md).
DEFAULT_ORDER = ("dpm-solver-v3", "unipc-bh2-3")


def default_solver(available: Collection[str]) -> str:
    """The first solver of :data:`DEFAULT_ORDER` whose needs are all ``available``."""
    for name in DEFAULT_ORDER:
        if set(preset(name).needs) <= set(available):
            return name
    raise ValueError(f"no default solver runs with {sorted(available)}")


def lineup(available: Collection[str]) -> list[str]:
    """The bench's default contestants among our solvers: every line-up preset whose needs
    are ``available`` (by name), then their extra grids as ``NAME@GRID``."""
    presets = [
        p for _, p in sorted(SOLVERS.items()) if p.lineup and set(p.needs) <= set(available)
    ]
    return [p.name for p in presets] + [
        f"{p.name}@{kind}" for p in presets for kind in p.lineup_grids
    ]


def setup_solver(
    name: str,
    schedule: NoiseSchedule,
    nfe: int,
    grid: str | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    context: SolverContext | None = None,
) -> tuple[Solver, Tensor]:
    """The solver ``name`` and a grid spending ``nfe`` model evaluations on ``schedule``;
    what the solver needs from the model comes from ``context``."""
    spec = preset(name)
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2, got {nfe!r}")
    solver = spec.build(nfe, context)
    if spec.times is not None:
        return solver, _fixed_grid(spec, schedule, nfe, grid, solver)
    kind = grid or default_grid_kind(spec, schedule, nfe)
    return solver, nfe_grid(schedule, spec.steps(nfe), kind, t_start, t_end)


def _fixed_grid(
    spec: Preset, schedule: NoiseSchedule, nfe: int, grid: str | None, solver: Solver
) -> Tensor:
    """The grid a configuration comes with (a fitted schedule file), checked against the
    budget asked for; a grid kind cannot replace it."""
    assert spec.times is not None
    spent = getattr(solver, "nfe", None)
    if spent is not None and spent != nfe:
        raise ValueError(
            f"{spec.name} spends {spent} model evaluations, not {nfe}; use nfe {spent}"
        )
    if grid is not None:
        raise ValueError(f"{spec.name} comes with its own times: it takes no grid ({grid!r})")
    return grids.custom(schedule, list(spec.times))


#: Where the signal-to-noise ratio 1 (λ = 0) sits in a schedule's sampling range (0: the
#: clean end, 1: the noisy end) below which steps are packed toward the clean end.
SNR_ONE_SPLIT = 0.4


def snr_one_position(schedule: NoiseSchedule) -> float:
    """Where λ = 0 (SNR 1) sits in the schedule's sampling range, as a fraction from the
    clean end: DDPM's linear and SD's scaled-linear betas 0.33-0.36 (a linear-β process
    spends its noisy half of time at λ < -1), cosine and rectified flow 0.5."""
    high, low = schedule.default_range
    t = float(schedule.t_of_lambda(torch.tensor(0.0, dtype=torch.float64)))
    return min(max((t - low) / (high - low), 0.0), 1.0)


def schedule_grid_kind(schedule: NoiseSchedule, order: int = 2) -> str:
    """The default grid of a schedule (for solvers without one of their own): a rule of
    where its λ(t) sits, measured on exact oracles under every schedule family
    (BENCHMARKS.md, "Defaults on every schedule"):

    * a flow model with its own shift (diffusers' ``shift``): ``time_shifted`` with it;
    * EDM / VE (time is σ, over orders of magnitude): ``karras`` (ρ = 7) for solvers of
      ``order`` ≤ 2; its λ-steps grow toward the data, which third-order extrapolation
      amplifies (1.2x diffusers' DPM-Solver++(3M) there), so ``logsnr`` from order 3;
    * a discrete schedule whose start was clipped for a noise-predicting model
      (:meth:`~diffsolve.ode.schedule.VPDiscrete.for_prediction`: cosine betas, from
      λ = -5.1): the same as EDM. There x̂₀ = (x − σε̂)/α
      amplifies the network's error up to 164-fold, which a time grid's first step
      (λ -5.1 → -2.5) integrates in one piece: 6-18x the error of a σ-spaced grid at
      10-20 NFE on a cosine ε-prediction UNet;
    * otherwise time-based: ``time_quadratic`` where SNR 1 sits in the clean 40% of the time
      range (:func:`snr_one_position`: linear-β VP, zero terminal SNR), packing steps
      where the data emerges; ``time_uniform`` where it sits mid-range (cosine, rectified
      flow), as diffusers places them — there a quadratic grid was 1.3-1.5x worse."""
    if isinstance(schedule, RectifiedFlow) and schedule.shift not in (None, 1.0):
        return "time_shifted"
    clipped = isinstance(schedule, VPDiscrete) and schedule.t_max < 1.0
    if schedule.kind == "edm" or clipped:
        return "karras" if order <= 2 else "logsnr"
    return "time_quadratic" if snr_one_position(schedule) < SNR_ONE_SPLIT else "time_uniform"


def default_grid_kind(spec: Preset, schedule: NoiseSchedule, nfe: int) -> str:
    """The preset's own grid where it declares one (Heun: Karras, as EDM's Algorithm 1),
    except on rectified flow; otherwise the schedule's rule (:func:`schedule_grid_kind`)."""
    own = spec.grid_kind(nfe)
    if own != STANDARD_GRID and not isinstance(schedule, RectifiedFlow):
        return own
    return schedule_grid_kind(schedule, int(spec.options_for(nfe).get("order", 2)))


def nfe_grid(
    schedule: NoiseSchedule,
    steps: int,
    kind: str,
    t_start: float | None = None,
    t_end: float | None = None,
) -> Tensor:
    """A grid of ``steps`` steps whose last point is ``t = 0`` (see the module docstring).

    The model is never evaluated below the schedule's conventional end
    ``default_range[1]`` (a discrete model's first training step, ``t = 1/N``): when a
    time-uniform or time-quadratic grid to ``t = 0`` would place its last evaluation there
    (from about 36 steps on a 1000-step model), the grid is rebuilt as ``steps - 1`` steps to
    that end plus the free step to ``t = 0``."""
    if kind in ("time_uniform", "time_quadratic", "time_shifted", "flow_shifted") and not t_end:
        grid = grids.make_grid(schedule, steps, kind, t_start, 0.0)
        if steps < 2 or float(grid[-2]) >= schedule.default_range[1]:
            return grid
    if steps < 2:
        return grids.custom(schedule, [t_start or schedule.default_range[0], 0.0])
    body = grids.make_grid(schedule, steps - 1, kind, t_start, t_end)
    return grids.append_zero(schedule, body)
