r"""Solver schedules searched for the user's model (``diffsolve tune --method
solver-schedule``).

USF (Liu et al., arXiv 2312.07243) shows that below ten evaluations the best sampler takes a
different decision at every step — prediction type, order, derivative estimate, corrector,
step time — and that the best decisions depend on the model. :func:`search_solver_schedule`
searches them, with the times and the teleport start, for one model and NFE:

1. **Targets.** :mod:`diffsolve.app.tune`'s teacher (DPM-Solver++(3M), hundreds of steps)
   gives the clean sample of every *search* seed, and of disjoint *check* seeds.
2. **Starts.** Every fixed solver the model runs (DPM-Solver-v3 where it has EMS, UniPC-bh2/
   bh1-3, DPM-Solver++(2M/3M)) on its default grid, the same after a Gaussian teleport over a
   fifth of the steps where the model has Gaussian statistics, and every tuned step schedule
   kept with the model at this NFE, each copied into step choices
   (:func:`~diffsolve.solvers.solver_schedule.copy_solver`). The best on the search seeds is
   the incumbent.
3. **Evolution** — a (1+1) strategy. A proposal changes one step's decision (order, space,
   predictor rule, corrector and its order), its relaxation, or moves one time (or all) in
   λ; it replaces the incumbent when its RMSE to the teacher on the search seeds is lower.
   The continuous moves' scale follows the one-fifth rule.
4. **Check.** The result and its start on the check seeds; a result that loses there is
   dropped for the start.

**Cost.** A proposal is scored exactly, not by a learned surrogate (S³'s predictor needs a
few hundred scored schedules to train, as many as this search spends): it runs from the
incumbent's state before the first step record it changes (on average half the steps are
reused), and DPM-Solver-v3's per-step integrals are cached per λ pair
(:class:`~diffsolve.solvers.solver_schedule.StepTables`), so a v3 plan is not rebuilt per
candidate. Measured costs: BENCHMARKS.md ("Solver schedules").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from diffsolve.app.conditioning import GuidanceSpec
from diffsolve.app.tune import Meter, Teachers, TuneConfig, rms_error, schedule_fingerprint
from diffsolve.ode.plan import State
from diffsolve.solvers.engine import MultistepStep, StepPlan, Update
from diffsolve.solvers.registry import SolverContext, preset, setup_solver
from diffsolve.solvers.solver_schedule import (
    ScheduledSolver,
    SolverSchedule,
    StepChoice,
    copy_solver,
    ems_digest,
)
from diffsolve.stats.ems import EMS
from diffsolve.stats.gaussian import GaussianModel
from diffsolve.wrappers.teleport import Teleported, teleported_setup

_F64 = torch.float64
#: The fixed solvers a search starts from (those whose needs the model meets).
START_SOLVERS = (
    "dpm-solver-v3",
    "unipc-bh2-3",
    "unipc-bh1-3",
    "dpm-solver++-2m",
    "dpm-solver++-3m",
)
#: Share of the default grid's steps a teleporting start skips.
START_SKIP = 0.2
#: Predictor and corrector rules per space.
RULES = {
    "data": (("taylor", "pseudo", "midpoint", "bh1", "bh2"), ("none", "taylor", "bh1", "bh2")),
    "noise": (("taylor", "pseudo", "midpoint", "bh1", "bh2"), ("none", "taylor", "bh1", "bh2")),
    "f": (("taylor", "pseudo"), ("none", "taylor", "pseudo")),
}


@dataclass(frozen=True)
class SearchConfig:
    """Settings of :func:`search_solver_schedule`.

    Attributes:
        proposals: Schedules proposed after the starts.
        trajectories: Search seeds (and check seeds, disjoint). With 128 a search on
            ``digits`` at 5 NFE lowered the search seeds' RMSE by 27% and the check seeds'
            by 2%; with 512, by 10% and 10%.
        check_trajectories: Check seeds. A result is kept over its start only if it is
            better on them too. With 512, ``digits`` at 10 NFE kept a result 0.78x its
            start on the check seeds and 1.36x on the held-out seeds 10000-10511: a few
            samples near a boundary between two modes change sides under another schedule,
            and they decide the RMSE.
        teacher_steps: DPM-Solver++(3M) steps of the teacher (150 agree with the 500-step
            reference to ~1e-4 RMSE on the demos, far below the errors searched).
        seed: First search seed; the check seeds follow; also seeds the proposals.
        teleport: Let starts begin with a Gaussian teleport (default: where the model has
            Gaussian statistics).
        batch_size: Samples per model call.
        guidance: ``"none"``, or ``"cfg"``/``"apg"`` of a class-conditional model: the
            search runs on the guided denoiser (labels ``seed % classes``), as ``sample
            --guidance`` would sample.
        scale: The guidance scale.
        metric: What the search lowers: ``"rmse"`` to the teacher, or ``"mean"``, the mean
            per-sample RMS error. The RMSE of 512 samples is ruled by the few that change
            mode between two solutions (on ``digits`` at 5 NFE the worst 5% carry 75% of the
            squared error); ``"mean"`` lowered the held-out median by 25% there and raised
            the RMSE by 4% (BENCHMARKS.md §16).
        margin: Relative RMSE improvement a proposal must make to be kept: improvements
            smaller than the seed set's noise are selection bias, not progress.
    """

    proposals: int = 400
    trajectories: int = 512
    check_trajectories: int = 2048
    teacher_steps: int = 150
    seed: int = 0
    teleport: bool | None = None
    batch_size: int = 512
    margin: float = 0.002
    guidance: str = "none"
    scale: float = 1.0
    metric: str = "rmse"

    def __post_init__(self) -> None:
        for name in (
            "proposals",
            "trajectories",
            "check_trajectories",
            "teacher_steps",
            "batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.guidance not in ("none", "cfg", "apg"):
            raise ValueError(f"guidance must be none, cfg or apg, got {self.guidance!r}")
        if self.metric not in ("rmse", "mean"):
            raise ValueError(f"metric must be 'rmse' or 'mean', got {self.metric!r}")
        if self.guidance == "none" and self.scale != 1.0:
            raise ValueError(f"scale {self.scale} needs guidance cfg or apg")


@dataclass
class Candidate:
    """Times, step choices and whether the first interval is a teleport; after scoring,
    its RMSE, plan and the states before each of its step records (for reuse)."""

    times: Tensor
    choices: tuple[StepChoice, ...]
    teleport: bool = False
    score: float = math.inf
    plan: StepPlan | None = field(default=None, repr=False)
    trace: list[State] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------
# Scoring, with the incumbent's states reused
def _same_coef(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    return a == b


def _same_update(u: Update | None, v: Update | None) -> bool:
    if u is None or v is None:
        return u is v
    return (
        (u.feature, u.points, u.prev, u.noise) == (v.feature, v.points, v.prev, v.noise)
        and len(u.w) == len(v.w)
        and all(_same_coef(x, y) for x, y in zip((u.a, u.c, *u.w), (v.a, v.c, *v.w), strict=True))
    )


def _same_step(r: Any, s: Any) -> bool:
    if type(r) is not type(s) or (r.t, r.t_next) != (s.t, s.t_next):
        return False
    if isinstance(r, MultistepStep):
        return (
            _same_update(r.predictor, s.predictor)
            and _same_update(r.corrector, s.corrector)
            and _same_coef(r.f_x, s.f_x)
        )
    return True  # a teleport between the same times


def first_change(old: StepPlan, new: StepPlan) -> int:
    """Index of the first step record in which ``new`` differs from ``old``."""
    for k, (r, s) in enumerate(zip(old.steps, new.steps, strict=False)):
        if not _same_step(r, s):
            return k
    return min(len(old.steps), len(new.steps))


@dataclass
class Scorer:
    """RMSE of candidates to the teacher's clean samples of one seed set."""

    model: Meter
    x: Tensor
    target: Tensor
    ems: EMS | None = None
    gaussian: GaussianModel | None = None
    metric: str = "rmse"
    scored: int = 0

    def error(self, out: Tensor) -> float:
        """``"rmse"``, or ``"mean"``: the mean per-sample RMS error (less ruled by the few
        samples that change mode between the two solutions)."""
        if self.metric == "rmse":
            return rms_error(out, self.target)
        return float((out.double() - self.target.double()).pow(2).flatten(1).mean(1).sqrt().mean())

    def solver(self, c: Candidate) -> ScheduledSolver:
        return ScheduledSolver(c.choices, self.ems, self.gaussian, c.teleport)

    def score(self, c: Candidate, reuse: Candidate | None = None) -> Candidate:
        """``c`` scored (``reuse``: a scored candidate whose unchanged steps are reused)."""
        self.scored += 1
        try:
            plan = self.solver(c).plan(self.model.schedule, c.times)
        except ValueError:
            return replace(c, score=math.inf)
        start = 0
        if reuse is not None and reuse.plan is not None and reuse.plan.memory >= plan.memory:
            start = first_change(reuse.plan, plan)  # (kept histories are long enough)
        trace = list(reuse.trace[: start + 1]) if start else [plan.init(self.x)]
        state = trace[-1]
        with torch.inference_mode():
            while not state.done:  # never in place: the trace's states are reused later
                state = plan.step(self.model, replace(state, owns_x_prev=False))
                trace.append(state)
        err = self.error(state.x)
        return replace(c, score=err if math.isfinite(err) else math.inf, plan=plan, trace=trace)


# ---------------------------------------------------------------------------------------
# Proposals
@dataclass
class Proposer:
    """Random changes of a candidate (module docstring, step 3)."""

    schedule: Any
    generator: torch.Generator
    spaces: tuple[str, ...] = ("data", "noise")
    scale: float = 0.3

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=_F64))

    def _pick(self, values: tuple[Any, ...] | range) -> Any:
        return values[int(torch.randint(len(values), (), generator=self.generator))]

    def propose(self, c: Candidate) -> Candidate | None:
        """A changed copy of ``c`` (``None``: the change drawn is no change)."""
        u = self._uniform()
        if u < 0.35:
            return self._move_times(c)
        i = self._pick(range(len(c.choices)))
        choice = c.choices[i]
        if u < 0.55:
            step = float(torch.randn((), generator=self.generator, dtype=_F64))
            changed = replace(choice, relax=min(2.0, max(0.0, choice.relax + self.scale * step)))
        else:
            changed = self._change_choice(choice)
        if changed is None or changed == choice:
            return None
        choices = (*c.choices[:i], changed, *c.choices[i + 1 :])
        return Candidate(c.times, choices, c.teleport)

    def _change_choice(self, choice: StepChoice) -> StepChoice | None:
        name = self._pick(("order", "space", "predictor", "corrector", "corrector_order"))
        space = self._pick(self.spaces) if name == "space" else choice.space
        predictors, correctors = RULES[space]
        value = {
            "order": lambda: self._pick((1, 2, 3)),
            "space": lambda: space,
            "predictor": lambda: self._pick(predictors),
            "corrector": lambda: self._pick(correctors),
            "corrector_order": lambda: self._pick((0, 2, 3, 4)),
        }[name]()
        fields = {name: value}
        if name == "space":  # keep the rules valid in the new space
            if choice.predictor not in predictors:
                fields["predictor"] = "taylor"
            if choice.corrector not in correctors:
                fields["corrector"] = "taylor"
        try:
            return replace(choice, **fields)
        except ValueError:
            return None

    def _move_times(self, c: Candidate) -> Candidate | None:
        """One free time, or all, moved by Gaussian steps in λ (the start, and the final
        ``t = 0``, stay)."""
        times = c.times
        free = list(range(1, times.numel() - 1))
        if not free:
            return None
        lam = self.schedule.lambda_(times[:-1]).clone()
        finite = lam[torch.isfinite(lam)]
        mean_step = float((finite[-1] - finite[0]) / max(1, finite.numel() - 1))
        moved = free if self._uniform() < 0.3 else [self._pick(free)]
        noise = torch.randn(len(moved), generator=self.generator, dtype=_F64)
        lam[moved] = lam[moved] + self.scale * mean_step * noise
        top = float(
            self.schedule.lambda_(torch.tensor(self.schedule.default_range[1], dtype=_F64))
        )
        lam = lam.clamp(max=top)
        if not bool((lam[1:] > lam[:-1]).all()):
            return None
        new = times.clone()
        new[moved] = self.schedule.t_of_lambda(lam[moved])
        return Candidate(new, c.choices, c.teleport)

    def adapt(self, success: bool) -> None:
        """The one-fifth rule on the continuous moves' scale."""
        self.scale = min(self.scale * 1.5, 2.0) if success else max(self.scale * 0.93, 0.01)


# ---------------------------------------------------------------------------------------
# Starts
def _as_candidate(solver: Any, grid: Tensor, schedule: Any) -> Candidate | None:
    """A fixed solver (teleported or not) on its grid, as step choices (``None``: not a
    solver a schedule can copy)."""
    teleport = isinstance(solver, Teleported)
    inner, inner_grid = (solver.solver, grid[1:]) if teleport else (solver, grid)
    try:
        return Candidate(grid, copy_solver(inner, schedule, inner_grid), teleport)
    except ValueError:
        return None


def search_starts(
    model: Any, nfe: int, context: SolverContext, teleport: bool
) -> dict[str, Candidate]:
    """Every start of the search (module docstring, step 2), by name."""
    from diffsolve.app.schedules import find_tuned_schedule
    from diffsolve.app.tune import schedule_solver

    schedule, provided = model.schedule, context.provides()
    starts: dict[str, Candidate | None] = {}
    for name in START_SOLVERS:
        if not set(preset(name).needs) <= provided:
            continue
        starts[name] = _as_candidate(*setup_solver(name, schedule, nfe, context=context), schedule)
        if teleport:
            jump = teleported_setup(name, schedule, nfe, START_SKIP, None, context)
            starts[f"{name}+teleport"] = _as_candidate(*jump, schedule)
        found = find_tuned_schedule(model, name, nfe, lambda line: None)
        if found is not None and (teleport or not found.schedule.teleport):
            tuned = schedule_solver(found.schedule, model, context)
            starts[f"{name}:{found.relative}"] = _as_candidate(*tuned, schedule)
    return {name: c for name, c in starts.items() if c is not None}


# ---------------------------------------------------------------------------------------
# The search
class GuidedModel:
    """A loaded class-conditional model whose denoiser for a set of labels is the guided
    one (:class:`~diffsolve.app.conditioning.GuidanceSpec`); everything else is the
    model's."""

    def __init__(self, loaded: Any, spec: Any) -> None:
        if not getattr(loaded, "num_classes", None):
            raise ValueError(
                f"guidance {spec.method!r} needs a class-conditional model; "
                f"{getattr(loaded, 'name', 'this model')!r} is not"
            )
        self.loaded, self.spec = loaded, spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loaded, name)

    def conditional(self, class_labels: Tensor) -> Any:
        """The guided denoiser for ``class_labels``."""
        return self.spec.build(self.loaded, class_labels)


def evolve(
    scorer: Scorer,
    start: Candidate,
    proposer: Proposer,
    proposals: int,
    progress: Callable[[int, float], None] | None = None,
    margin: float = 0.0,
) -> Candidate:
    """The (1+1) evolution from a scored ``start`` for ``proposals`` proposals; a proposal
    must lower the incumbent's RMSE by more than ``margin`` (relative) to replace it."""
    best = start
    for k in range(proposals):
        proposal = proposer.propose(best)
        if proposal is None:
            continue
        scored = scorer.score(proposal, reuse=best)
        better = scored.score < best.score * (1.0 - margin)
        proposer.adapt(better)
        if better:
            best = scored
        if progress is not None:
            progress(k + 1, best.score)
    return best


def _context(model: Any, teleport: bool | None) -> tuple[SolverContext, bool]:
    available = set(model.available()) if hasattr(model, "available") else set()
    want = {"ems"} & available
    teleport = ("gaussian" in available) if teleport is None else teleport
    if teleport:
        want.add("gaussian")
    return model.solver_context(frozenset(want)), teleport


def search_solver_schedule(
    model: Any,
    nfe: int,
    config: SearchConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> SolverSchedule:
    """Search a solver schedule of ``nfe`` evaluations for ``model`` (module docstring).

    Args:
        model: A :class:`~diffsolve.app.loader.LoadedModel` (a class-conditional one is
            searched under labels ``seed % classes``; a guided one through its guided
            denoiser).
        nfe: Model evaluations per sample.
        config: Settings (:class:`SearchConfig`).
        progress: Called with one line per stage (and every 50 proposals).

    Returns:
        The :class:`~diffsolve.solvers.solver_schedule.SolverSchedule` (``.to_json()``).
    """
    config = config or SearchConfig()
    say = progress or (lambda line: None)
    began = time.perf_counter()
    if config.guidance != "none":
        model = GuidedModel(model, GuidanceSpec(config.guidance, config.scale))
    context, teleport = _context(model, config.teleport)
    starts = search_starts(model, nfe, context, teleport)
    if not starts:
        raise ValueError(f"no solver of {list(START_SOLVERS)} runs this model at {nfe} NFE")
    teachers = Teachers(
        model, _tune_config(config), float(next(iter(starts.values())).times[0]), say
    )
    scorer = Scorer(*_targets(teachers, "fit"), context.ems, context.gaussian, config.metric)
    scored = {name: scorer.score(c) for name, c in starts.items()}
    first = min(scored, key=lambda name: scored[name].score)
    say(f"tune: {len(scored)} starts; best {first} (RMSE {scored[first].score:.4g})")
    spaces = ("data", "noise", "f") if context.ems is not None else ("data", "noise")
    proposer = Proposer(model.schedule, torch.Generator().manual_seed(config.seed), spaces)

    def report(k: int, score: float) -> None:
        if k % 50 == 0 or k == config.proposals:
            say(f"tune: proposal {k}/{config.proposals}, RMSE {score:.4g}")

    best = evolve(scorer, scored[first], proposer, config.proposals, report, config.margin)
    checker = Scorer(*_targets(teachers, "check"), context.ems, context.gaussian, config.metric)
    check, check_start = checker.score(best).score, checker.score(scored[first]).score
    improved = best is not scored[first] and check <= check_start
    kept, method = (best, "search") if improved else (scored[first], "start")
    if method == "start" and best is not scored[first]:
        say("tune: the search lost to its start on the check seeds, keeping the start")
    fit = {
        "search_rmse": best.score,
        "search_rmse_start": scored[first].score,
        "check_rmse": min(check, check_start),
        "check_rmse_start": check_start,
        "start": first,
        "starts": {name: c.score for name, c in scored.items()},
        "check_seeds": _seed_range(_tune_config(config).seeds("check")),
    }
    cost = {
        "model_evaluations": sum(meter.evaluations for meter in teachers.meters),
        "schedules": scorer.scored + checker.scored,
        "seconds": round(time.perf_counter() - began, 2),
    }
    return _result(model, kept, method, context, fit, cost, config)


def _tune_config(config: SearchConfig) -> TuneConfig:
    return TuneConfig(
        trajectories=config.trajectories,
        holdout=config.check_trajectories,
        teacher_steps=config.teacher_steps,
        seed=config.seed,
        batch_size=config.batch_size,
    )


def _targets(teachers: Teachers, which: Any) -> tuple[Meter, Tensor, Tensor]:
    meter, teacher = teachers(which)
    return meter, teacher.x, teacher.target


def _seed_range(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}"


def _result(
    model: Any,
    c: Candidate,
    method: str,
    context: SolverContext,
    fit: dict[str, Any],
    cost: dict[str, Any],
    config: SearchConfig,
) -> SolverSchedule:
    uses_f = any(choice.space == "f" for choice in c.choices)
    return SolverSchedule(
        times=tuple(float(t) for t in c.times),
        steps=c.choices,
        nfe=len(c.choices),
        noise_schedule=model.schedule.to_config(),
        teleport=c.teleport,
        fingerprint=schedule_fingerprint(model),
        ems=ems_digest(context.ems) if uses_f and context.ems is not None else None,
        gaussian=context.gaussian.fingerprint() if c.teleport and context.gaussian else None,
        model=str(getattr(model, "name", "") or ""),
        method=method,
        cost=cost,
        config=dataclasses.asdict(config),
        fit=fit,
    )
