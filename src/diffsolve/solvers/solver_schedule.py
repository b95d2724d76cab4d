r"""A solver schedule: a different solving strategy at every step (USF, Liu et al. 2023,
"A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models",
arXiv 2312.07243).

Every multistep method of diffsolve takes, at step :math:`s \to t`, the update

.. math:: x_t = a\,x_s + \sum_j w_j\,D_j,

with :math:`D_j` one feature of earlier evaluations (data or noise prediction, or
DPM-Solver-v3's :math:`f`) and weights from how the feature's derivatives are estimated, and
optionally corrects :math:`x_t` once the model has been evaluated there (UniC, v3's
corrector). A fixed solver makes the same choice at every step; a :class:`StepChoice` makes
it per step:

* ``order`` — evaluations the predictor uses (1–3; fewer where the history is shorter);
* ``space`` — ``"data"``, ``"noise"`` or ``"f"`` (DPM-Solver-v3's feature; needs the EMS);
* ``predictor`` — how the history enters: ``"taylor"`` (the interpolant integrated exactly:
  DPM-Solver(++)'s Taylor form, v3), ``"pseudo"`` (the k-th derivative from the k + 1 newest
  points only: v3's pseudo order, USF's lower-order estimate), ``"midpoint"`` (DPM-Solver-2's
  form, second order), ``"bh1"``/``"bh2"`` (UniP);
* ``relax`` — a factor on every derivative estimate (USF's relaxation; 1 as published):
  :math:`w = c_0 e_0 + r\,(w^{\text{rule}} - c_0 e_0)`, :math:`c_0` the first-order weight;
* ``corrector`` and ``corrector_order`` — after the model is evaluated at this step's end,
  recompute the end point with that evaluation as one more point (``"bh1"``/``"bh2"``: UniC;
  ``"taylor"``/``"pseudo"``: the corrector of v3 in its space), from ``corrector_order``
  points including the new one (0: the predictor's order + 1).

A :class:`ScheduledSolver` compiles the choices into one
:class:`~diffsolve.solvers.engine.StepPlan` with the same engine and weight formulas as the
fixed solvers (:func:`~diffsolve.solvers.engine.multistep_plan`), so the schedule that copies
DPM-Solver++(2M), UniPC or DPM-Solver-v3 (:func:`copy_solver`) reproduces them. With
``teleport`` the grid's first interval is analytic Gaussian teleportation (0 NFE; Wang &
Vastola), as in fitted step schedules.

A :class:`SolverSchedule` is the JSON file ``diffsolve tune --method solver-schedule`` writes:
times, choices, NFE, and what it was fitted to (model fingerprint, noise schedule, EMS hash).
It is a registry solver: ``schedule:FILE`` runs it in ``sample``, the CLI, the diffusers
scheduler and the k-diffusion entry point.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from diffsolve.numerics.expint import ExpStep, taylor_weights
from diffsolve.ode.grids import validate_grid
from diffsolve.ode.model import Denoiser
from diffsolve.ode.plan import Solver, State
from diffsolve.ode.schedule import NoiseSchedule, schedule_from_config
from diffsolve.ode.step_schedule import read_json_format
from diffsolve.solvers.dpm_solver import DPMSolver, ei_weights
from diffsolve.solvers.dpm_solver_v3 import (
    DPMSolverV3,
    EMSPlan,
    derivative_weights,
    ems_grid_values,
    ems_update,
)
from diffsolve.solvers.engine import (
    GridValues,
    StepPlan,
    Update,
    check_choice,
    multistep_orders,
    multistep_plan,
)
from diffsolve.solvers.registry import Preset, register_prefix
from diffsolve.solvers.unipc import UniPC, corrector_weights, predictor_weights
from diffsolve.stats.ems import EMS, EMSTable
from diffsolve.stats.gaussian import GaussianModel

SpaceChoice = Literal["data", "noise", "f"]
PredictorRule = Literal["taylor", "pseudo", "midpoint", "bh1", "bh2"]
CorrectorRule = Literal["none", "taylor", "pseudo", "bh1", "bh2"]

#: The ``format`` field of a solver-schedule file.
SOLVER_SCHEDULE_FORMAT = "diffsolve-solver-schedule-1"
#: The registry prefix of a solver-schedule file: ``schedule:FILE``.
PREFIX = "schedule"


@dataclass(frozen=True)
class StepChoice:
    """How one step is solved (module docstring)."""

    order: int = 2
    space: SpaceChoice = "data"
    predictor: PredictorRule = "taylor"
    relax: float = 1.0
    corrector: CorrectorRule = "none"
    corrector_order: int = 0

    def __post_init__(self) -> None:
        for name in ("space", "predictor", "corrector"):
            hint = {"space": SpaceChoice, "predictor": PredictorRule, "corrector": CorrectorRule}
            check_choice(getattr(self, name), hint[name].__args__, f"step choice {name}")
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"step choice order must be 1, 2 or 3, got {self.order!r}")
        if self.corrector_order not in (0, 2, 3, 4) or isinstance(self.corrector_order, bool):
            raise ValueError(
                f"step choice corrector_order must be 2, 3, 4 or 0 (order + 1), got "
                f"{self.corrector_order!r}"
            )
        if not (isinstance(self.relax, (int, float)) and math.isfinite(self.relax)):
            raise ValueError(f"step choice relax must be a finite number, got {self.relax!r}")
        if self.space == "f" and self.predictor not in ("taylor", "pseudo"):
            raise ValueError(
                f"step choice: space 'f' (DPM-Solver-v3) takes predictor 'taylor' or "
                f"'pseudo', not {self.predictor!r}"
            )
        if self.space == "f" and self.corrector in ("bh1", "bh2"):
            raise ValueError("step choice: space 'f' takes corrector 'taylor' or 'pseudo'")

    @property
    def points_corrected(self) -> int:
        """Points of the corrector (0: none)."""
        if self.corrector == "none":
            return 0
        return self.corrector_order or self.order + 1


def describe_choice(choice: StepChoice) -> str:
    """One line for a step choice, e.g. ``order 2 f-space taylor, pseudo corrector (3
    points), relax 0.92``."""
    text = f"order {choice.order} {choice.space}-space {choice.predictor}"
    if choice.corrector != "none":
        text += f", {choice.corrector} corrector ({choice.points_corrected} points)"
    return text + (f", relax {choice.relax:.3g}" if choice.relax != 1.0 else "")


def _relaxed(w: tuple[float, ...], c0: float, base: int, relax: float) -> tuple[float, ...]:
    """Weights with the derivative part scaled by ``relax`` (``base``: the step's start)."""
    if relax == 1.0:
        return w
    return tuple(c0 + relax * (v - c0) if j == base else relax * v for j, v in enumerate(w))


def ei_rule_weights(step: ExpStep, nodes: Sequence[float], rule: str) -> tuple[float, ...]:
    """Weights on the predictions at normalised ``nodes`` (``nodes[0] = 0``, the start) for
    one exponential-integrator step under ``rule`` (module docstring)."""
    nodes = list(nodes)
    if rule == "midpoint":
        return ei_weights(step, nodes, "midpoint")
    if rule in ("bh1", "bh2"):
        return predictor_weights(step, nodes[1:], rule)  # type: ignore[arg-type]
    if rule == "taylor" or len(nodes) <= 2:
        return taylor_weights(step, nodes)
    rows = derivative_weights(nodes, pseudo=True)  # d_k from the first k + 1 nodes
    return tuple(
        step.coef(0) * (j == 0) + sum(step.coef(k + 1) * row[j] for k, row in enumerate(rows))
        for j in range(len(nodes))
    )


# ---------------------------------------------------------------------------------------
# EMS integrals per step, cached across plans (a search builds thousands)
class StepTables:
    """DPM-Solver-v3's per-step integrals on any grid, from :class:`EMSTable` s of single
    steps kept in the EMS's cache: the plans of a search that moves a few times share every
    other step's integrals. :meth:`on` gives the view for one grid (``point``/``step``)."""

    MOMENTS = 3

    def __init__(self, ems: EMS) -> None:
        self.ems = ems
        dims = math.prod(ems.data_shape)
        self.limit = max(64, (1 << 28) // (8 * (self.MOMENTS + 6) * dims))
        self.tables: OrderedDict[tuple[float, ...], EMSTable] = OrderedDict()

    @classmethod
    def of(cls, ems: EMS) -> StepTables:
        """The cache of ``ems``."""
        tables = ems.cache.get("step_tables")
        if tables is None:
            tables = ems.cache["step_tables"] = cls(ems)
        return tables

    def table(self, lambdas: tuple[float, ...]) -> EMSTable:
        """The table of one step (two λ) or one point."""
        found = self.tables.get(lambdas)
        if found is None:
            self.ems.check_range(lambdas)
            found = self.tables[lambdas] = EMSTable(self.ems, lambdas, self.MOMENTS)
            while len(self.tables) > self.limit:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(lambdas)
        return found

    def on(self, at: GridValues) -> _GridTables:
        """The integrals on the grid ``at`` (its usable, finite points)."""
        return _GridTables(self, at)


@dataclass(frozen=True)
class _GridTables:
    cache: StepTables
    at: GridValues

    def _finite(self, i: int) -> bool:
        return i + 1 <= self.at.num_steps and math.isfinite(self.at.lam[i + 1])

    def point(self, i: int) -> Any:
        lam = self.at.lam
        if self._finite(i):
            return self.cache.table((lam[i], lam[i + 1])).point(0)
        if i > self.at.first_usable:
            return self.cache.table((lam[i - 1], lam[i])).point(1)
        return self.cache.table((lam[i],)).point(0)

    def step(self, i: int) -> Any:
        return self.cache.table((self.at.lam[i], self.at.lam[i + 1])).step(0)


# ---------------------------------------------------------------------------------------
# The jump
@dataclass(frozen=True, eq=False)
class JumpStep:
    """The step ``t → t_next`` by analytic Gaussian teleportation (0 evaluations): the exact
    probability-flow solution under the Gaussian data model."""

    t: float
    t_next: float
    gaussian: GaussianModel
    schedule: NoiseSchedule

    evals: ClassVar[int] = 0
    updates: ClassVar[tuple[Update, ...]] = ()

    def to(self, device: torch.device, dtype: torch.dtype) -> JumpStep:
        return self

    def advance(self, model: Denoiser, state: State, memory: int, done: bool) -> State:
        """Teleport ``state`` (keeps no history)."""
        x = self.gaussian.solution(state.x, self.t, self.t_next, self.schedule).to(state.x.dtype)
        alpha, sigma = (
            float(self.schedule.alpha(self.t_next)),
            float(self.schedule.sigma(self.t_next)),
        )
        latest = self.gaussian.denoise(x, alpha, sigma).to(x.dtype) if sigma > 0 else x
        return State(x=x, t=self.t_next, step=state.step + 1, latest=latest, done=done)


# ---------------------------------------------------------------------------------------
# The solver
@dataclass(frozen=True, eq=False)
class ScheduledSolver(Solver):
    """A multistep solver whose strategy changes per step (module docstring).

    Args:
        choices: One :class:`StepChoice` per evaluating step (the last one, to ``t = 0``,
            returns :math:`\\hat x_0` whatever it says).
        ems: DPM-Solver-v3's statistics, needed where a choice uses ``space="f"``.
        gaussian: Gaussian statistics of the data, needed with ``teleport``.
        teleport: The grid's first interval is a Gaussian teleport (0 NFE); the choices
            apply to the steps after it.
    """

    choices: tuple[StepChoice, ...]
    ems: EMS | None = None
    gaussian: GaussianModel | None = None
    teleport: bool = False

    name: ClassVar[str] = "solver-schedule"

    def __post_init__(self) -> None:
        choices = tuple(c if isinstance(c, StepChoice) else StepChoice(**c) for c in self.choices)
        if not choices:
            raise ValueError("a solver schedule needs at least one step choice")
        object.__setattr__(self, "choices", choices)
        if self.uses_ems and not isinstance(self.ems, EMS):
            raise ValueError(
                "this solver schedule integrates DPM-Solver-v3's feature (space 'f'): pass the "
                "model's EMS (diffsolve.stats.ems.load_ems)"
            )
        if self.teleport and not isinstance(self.gaussian, GaussianModel):
            raise ValueError(
                "this solver schedule starts with a Gaussian teleport: pass the model's "
                "Gaussian statistics (`diffsolve gaussian-stats`)"
            )

    @property
    def order(self) -> int:  # type: ignore[override]
        """The highest predictor order of the schedule."""
        return max(c.order for c in self.choices)

    @property
    def uses_ems(self) -> bool:
        """Whether any step integrates v3's feature."""
        return any(c.space == "f" for c in self.choices)

    @property
    def nfe(self) -> int:
        """Model evaluations: one per choice."""
        return len(self.choices)

    def min_steps(self) -> int:
        return len(self.choices) + int(self.teleport)

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        steps = grid.numel() - 1
        if steps != self.min_steps():
            raise ValueError(
                f"this solver schedule has {len(self.choices)} step choices"
                f"{' after a teleport' if self.teleport else ''}: it runs on a grid of "
                f"{self.min_steps()} steps, not {steps}"
            )
        inner = grid[1:] if self.teleport else grid
        plan = self._multistep(schedule, inner)
        if not self.teleport:
            return plan
        assert self.gaussian is not None
        jump = JumpStep(float(grid[0]), float(grid[1]), self.gaussian, schedule)
        return type(plan)(schedule, grid, (jump, *plan.steps), **_extra(plan))

    def _multistep(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        if self.uses_ems:
            assert self.ems is not None
            at = ems_grid_values(self.ems, schedule, grid)
            table: Any = StepTables.of(self.ems).on(at)
        else:
            at, table = GridValues.of(schedule, grid), None
        orders = [
            max(1, min(c.order, i + 1 - at.first_usable)) for i, c in enumerate(self.choices)
        ]

        def f_x(i: int) -> Tensor:
            return (1.0 - table.point(i).l) / at.alpha[i]

        plan = multistep_plan(
            at,
            orders,
            lambda i, p: _predictor(at, table, i, p, self.choices[i]),
            lambda i: _corrector(at, table, i, self.choices),
            f_x if self.uses_ems else None,
        )
        if self.uses_ems:
            return EMSPlan(plan.schedule, plan.grid, plan.steps, ems=self.ems)
        return plan


def _extra(plan: StepPlan) -> dict[str, Any]:
    return {"ems": plan.ems} if isinstance(plan, EMSPlan) else {}


def _predictor(at: GridValues, table: Any, i: int, p: int, choice: StepChoice) -> Update:
    """Step ``i``'s predictor of order ``p`` under ``choice``."""
    if choice.space == "f":
        extras = [(i - j, j) for j in range(1, p)]  # (grid point, history index)
        return ems_update(table, at, i, 0, extras, choice.predictor == "pseudo", choice.relax)
    step = at.exp_step(choice.space, i, i + 1)
    w = ei_rule_weights(step, at.nodes(i, range(i, i - p, -1)), choice.predictor)
    return Update(step.a, _relaxed(w, step.coef(0), 0, choice.relax), choice.space)


def _corrector(at: GridValues, table: Any, i: int, choices: Sequence[StepChoice]) -> Update | None:
    """The corrector of step ``i - 1 → i`` (applied after evaluating at point ``i``)."""
    if i == 0:
        return None
    choice = choices[i - 1]
    k = min(choice.points_corrected, i + 1 - at.first_usable)
    if k < 2:
        return None
    rule = choice.corrector
    if choice.space == "f":
        extras = [(i, 0)] + [(i - 1 - j, j + 1) for j in range(1, k - 1)]
        return ems_update(table, at, i - 1, 1, extras, rule == "pseudo", choice.relax)
    step = at.exp_step(choice.space, i - 1, i)
    r = at.nodes(i - 1, range(i - 2, i - k, -1))  # the k - 2 points before the base
    if rule in ("bh1", "bh2"):  # weights on (new, base, older…)
        w = corrector_weights(step, r, rule)  # type: ignore[arg-type]
        return Update(step.a, _relaxed(w, step.coef(0), 1, choice.relax), choice.space)
    w = ei_rule_weights(step, [0.0, 1.0, *r], rule)  # on (base, new, older…)
    points = (1, 0, *range(2, k))
    return Update(step.a, _relaxed(w, step.coef(0), 0, choice.relax), choice.space, points)


# ---------------------------------------------------------------------------------------
# Fixed solvers as schedules
def copy_solver(solver: Solver, schedule: NoiseSchedule, grid: Tensor) -> tuple[StepChoice, ...]:
    """The step choices that reproduce a multistep DPM-Solver(++), UniPC or DPM-Solver-v3
    on ``grid`` (their warm-up and final orders, correctors and options included)."""
    ts = validate_grid(schedule, grid)
    if isinstance(solver, DPMSolverV3):
        return _copy_v3(solver, ems_grid_values(solver.ems, schedule, ts))
    at = GridValues.of(schedule, ts)
    if isinstance(solver, DPMSolver) and solver.method == "multistep":
        orders = multistep_orders(
            at, solver.order, solver.lower_order_final, solver.euler_at_final
        )
        return tuple(StepChoice(p, solver.space, solver.solver_type) for p in orders)
    if isinstance(solver, UniPC) and not solver.final_corrector:
        orders = multistep_orders(at, solver.order, solver.lower_order_final)
        return tuple(
            StepChoice(
                p,
                solver.space,
                solver.variant,
                corrector=solver.variant
                if solver.corrector and i not in solver.disable_corrector
                else "none",
                corrector_order=p + 1,
            )
            for i, p in enumerate(orders)
        )
    raise ValueError(f"copy_solver: no step choices for {solver!r}")


def _copy_v3(solver: DPMSolverV3, at: GridValues) -> tuple[StepChoice, ...]:
    orders = multistep_orders(at, solver.order, solver.lower_order_final, solver.euler_at_final)
    rule = "pseudo" if solver.corrector_pseudo else "taylor"
    choices = []
    for i, p in enumerate(orders):
        c_order = p + int(solver.corrector_pseudo)
        t_frac = at.t[i + 1] / at.schedule.t_max
        half = (solver.half_corrector == "low_noise" and t_frac > 0.5) or (
            solver.half_corrector == "high_noise" and t_frac <= 0.5
        )
        on = solver.corrector and c_order > 1 and not half
        choices.append(
            StepChoice(
                p,
                "f",
                "pseudo" if solver.predictor_pseudo else "taylor",
                corrector=rule if on else "none",
                corrector_order=c_order if on else 0,
            )
        )
    return tuple(choices)


# ---------------------------------------------------------------------------------------
# The file
def ems_digest(ems: EMS) -> str:
    """SHA-256 (16 hex digits) of the statistics' arrays: a schedule that integrates v3's
    feature was fitted with these, and is refused with others."""
    digest = ems.cache.get("digest")
    if digest is None:
        h = hashlib.sha256()
        for array in (ems.lambdas, ems.one_minus_l, ems.s, ems.b):
            h.update(array.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        digest = ems.cache["digest"] = h.hexdigest()[:16]
    return digest


@dataclass(frozen=True)
class SolverSchedule:
    """A solver schedule fitted to one model (``diffsolve tune --method solver-schedule``).

    Attributes:
        times: Solver times :math:`t_0 > \\dots > t_N = 0` (with ``teleport`` the first
            interval is the jump).
        steps: One :class:`StepChoice` per evaluating step.
        nfe: Model evaluations per sample.
        noise_schedule: The model's :meth:`~diffsolve.ode.schedule.NoiseSchedule.to_config`.
        teleport: The first interval is analytic Gaussian teleportation.
        fingerprint: The model's fingerprint (``None``: not checked).
        ems: :func:`ems_digest` of the EMS a step in space ``"f"`` was fitted with.
        gaussian: Fingerprint of the Gaussian statistics of a teleport.
        model: The model's name or folder (informative).
        method: How it was found.
        cost, config, fit: The search's cost, settings and measured errors.
    """

    times: tuple[float, ...]
    steps: tuple[StepChoice, ...]
    nfe: int
    noise_schedule: dict[str, Any]
    teleport: bool = False
    fingerprint: str | None = None
    ems: str | None = None
    gaussian: str | None = None
    model: str = ""
    method: str = "search"
    cost: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = tuple(s if isinstance(s, StepChoice) else StepChoice(**s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        if len(self.times) != len(steps) + 1 + int(self.teleport):
            raise ValueError(
                f"{len(self.times)} times for {len(steps)} steps"
                f"{' and a teleport' if self.teleport else ''}: there must be one more time "
                "than intervals"
            )
        if self.nfe != len(steps):
            raise ValueError(f"nfe {self.nfe} is not the number of steps ({len(steps)})")

    @property
    def needs(self) -> tuple[str, ...]:
        """What the schedule takes from the model: ``"ems"``, ``"gaussian"``."""
        uses_f = any(s.space == "f" for s in self.steps)
        return (*(("ems",) if uses_f else ()), *(("gaussian",) if self.teleport else ()))

    def to_json(self) -> str:
        """JSON text (floats written exactly)."""
        data = {"format": SOLVER_SCHEDULE_FORMAT, **asdict(self), "times": list(self.times)}
        data["steps"] = [asdict(s) for s in self.steps]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "solver schedule") -> SolverSchedule:
        """Parse :meth:`to_json` output; a clear ``ValueError`` for anything else."""
        step_schedule = (
            "a step schedule (one solver's times), not a solver schedule: use --schedule"
        )
        data = read_json_format(
            text, source, SOLVER_SCHEDULE_FORMAT, "solver schedule",
            {"diffsolve-step-schedule-1": step_schedule},
        )  # fmt: skip
        try:
            return cls(**data)
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{source}: malformed solver schedule: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> SolverSchedule:
        """Read a solver-schedule file (one-line errors for a missing or foreign file)."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"solver schedule {path}: cannot read it ({err})") from None
        return cls.from_json(text, f"solver schedule {path}")

    def check(
        self, schedule: NoiseSchedule, fingerprint: str | None = None, ems: EMS | None = None
    ) -> None:
        """Raise a one-line ``ValueError`` when this schedule was fitted to another noise
        schedule, model or EMS."""
        config = {k: v for k, v in schedule.to_config().items() if k != "shift"}
        mine = {k: v for k, v in self.noise_schedule.items() if k != "shift"}
        fix = "fit one for this model (`diffsolve tune --method solver-schedule`)"
        if config != mine and not _same_process(self.noise_schedule, schedule):
            raise ValueError(
                f"solver schedule for {self.model or 'another model'} was fitted under the "
                f"noise schedule {_named(self.noise_schedule)}, not {schedule!r}; {fix}"
            )
        if None not in (fingerprint, self.fingerprint) and fingerprint != self.fingerprint:
            raise ValueError(
                f"solver schedule was fitted to model {self.model or '?'} (fingerprint "
                f"{self.fingerprint}), not this one ({fingerprint}); {fix}"
            )
        if ems is not None and self.ems is not None and ems_digest(ems) != self.ems:
            raise ValueError(
                f"solver schedule was fitted with other EMS ({self.ems}) than these "
                f"({ems_digest(ems)}); {fix}"
            )

    def grid(self, schedule: NoiseSchedule) -> Tensor:
        """The times as a validated float64 grid."""
        return validate_grid(schedule, self.times)

    def solver(
        self, ems: EMS | None = None, gaussian: GaussianModel | None = None
    ) -> ScheduledSolver:
        """The :class:`ScheduledSolver` of the file's choices."""
        return ScheduledSolver(self.steps, ems, gaussian, self.teleport)


def _same_process(config: dict[str, Any], schedule: NoiseSchedule) -> bool:
    """Whether the schedule of ``config`` describes the same process as ``schedule``
    (:meth:`~diffsolve.ode.schedule.NoiseSchedule.same_process`: a diffusers scheduler's
    float32 :math:`\\bar\\alpha` for a model's float64 ones, a flow schedule's range)."""
    try:
        return schedule_from_config(config).same_process(schedule)
    except (TypeError, ValueError, KeyError):
        return False


def _named(config: dict[str, Any]) -> str:
    """A schedule config for messages (its ``repr``: no list of 1000 :math:`\\bar\\alpha`)."""
    try:
        return repr(schedule_from_config(config))
    except (TypeError, ValueError, KeyError):
        return str(config)


_LOADED: dict[tuple[str, int, int], SolverSchedule] = {}


def load_solver_schedule(path: str | Path) -> SolverSchedule:
    """:meth:`SolverSchedule.load`, cached per path, size and modification time."""
    resolved = Path(path).expanduser()
    try:
        stat = resolved.stat()
    except OSError:
        raise ValueError(
            f"solver schedule {path}: no such file (make one with `diffsolve tune --method "
            "solver-schedule --out FILE`)"
        ) from None
    key = (str(resolved.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = SolverSchedule.load(resolved)
    return _LOADED[key]


def schedule_preset(path: str) -> Preset:
    """The registry entry ``schedule:FILE``: the file's solver on the file's times."""
    fitted = load_solver_schedule(path)

    def options(nfe: int) -> dict[str, Any]:
        return {"choices": fitted.steps, "teleport": fitted.teleport}

    return Preset(
        f"{PREFIX}:{path}",
        f"solver schedule {path} ({fitted.nfe} NFE, fitted to {fitted.model or '?'})",
        options,
        steps=lambda nfe: len(fitted.times) - 1,
        solver=ScheduledSolver,
        requires=fitted.needs,
        times=fitted.times,
    )


register_prefix(PREFIX, schedule_preset)
