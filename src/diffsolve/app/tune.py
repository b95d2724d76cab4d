r"""Step schedules fitted to the model, training-free (``diffsolve tune``).

A solver's default grid (time-quadratic, logSNR, …) is one guess for every model. Below ten
model evaluations where the steps sit matters as much as the solver, and the best placement
depends on the model. :func:`tune_schedule` fits it from the model's own teacher trajectories:

1. **Teacher.** Noise for ``trajectories`` fit seeds is solved by DPM-Solver++(3M) on a fine
   grid: ``candidates + 1`` candidate times (uniform in :math:`\lambda` by default, from the
   schedule's start to its end), each interval refined to ``teacher_steps`` steps in all, plus
   the final step to clean data. Its states at the candidate times and its final
   :math:`x_0` are the targets.
2. **``dp``** — dynamic programming over the candidate times, the path starting at the first
   candidate, visiting ``N`` evaluation points and ending with the step to ``t = 0``. With
   ``teleport`` (Wang & Vastola's analytic Gaussian jump, 0 NFE) a path may instead start at
   any candidate within ``max_skip`` of the intervals, from the noise teleported there, so the
   skip is fitted with the steps. Two costs of a jump:

   * ``"student"`` (default; the rollout of OSS, Pei, Hu & Gu 2025, arXiv 2503.21774, run
     with the student solver itself): round ``k`` evaluates the model once at every state
     reached in round ``k − 1`` and takes the *student's own* step (its multistep history,
     warm-up and final orders and corrector included) from there to every later candidate
     ``j``; per ``j`` the path arriving closest to the teacher's state is kept. The last
     round takes the student's final step and keeps the path closest to the teacher's
     :math:`x_0`. Cost: at most ``candidates`` evaluations per round.
   * ``"euler"`` (GITS, Chen et al., ICML 2024, arXiv 2405.11326): the cost of a jump
     ``i → j`` is the RMSE of one DDIM step from the teacher's state at ``i`` to the
     teacher's state at ``j``, the step to ``t = 0`` that of the teacher's :math:`\hat x_0`
     at ``i``; the GITS recursion :math:`V_k(j) = \min_{i>j} C(j,i) + c\,V_{k-1}(i)`,
     :math:`c` = ``coeff`` (1.15), gives the path. Cost: ``candidates`` evaluations.

   The path found is compared with the solver's default grid on the *search* seeds (not the
   fit seeds, on which the path always looks better: at 6 NFE on ``digits`` that choice was
   1.22× worse held out) and the better one is kept (the file's ``method`` says
   ``"default"`` when the default won).
3. **``search``** (USF / S³-like, Liu et al., arXiv 2312.07243): a (1+1) evolution strategy
   from the ``dp`` result (or the default grid): a proposal moves the free times by Gaussian
   steps in :math:`\lambda` (scaled by the mean step, adapted by the one-fifth rule) or flips
   one solver option that keeps the NFE (booleans and ``Literal`` options: order, corrector,
   prediction space, …), scored by the RMSE to the teacher on *search* seeds disjoint from the
   fit seeds, within ``budget`` model evaluations.

The errors of the result and of the default grid are finally measured on ``check`` seeds
disjoint from both (``StepSchedule.fit``); a ``search`` result that loses there to the
default grid is dropped for it (on ``digits-flow`` the search overfitted its 128 seeds at 5–6
NFE), which makes the reported check errors of a ``search`` slightly optimistic. Everything
is deterministic for a seed. The result is a
:class:`~diffsolve.ode.step_schedule.StepSchedule` with the model's fingerprint and noise
schedule; ``diffsolve sample --schedule FILE`` and :func:`diffsolve.ode.grids.from_file` use
it. Measured defaults and results: BENCHMARKS.md ("Fitted step schedules") and
``scripts/tune_study.py``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode import grids
from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.ode.plan import Solver, State
from diffsolve.ode.sampling import sample
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.ode.step_schedule import StepSchedule
from diffsolve.solvers.dpm_solver_pp import DPMSolverPP
from diffsolve.solvers.registry import SolverContext, preset, setup_solver
from diffsolve.stats.ems import model_fingerprint
from diffsolve.stats.gaussian import GaussianModel
from diffsolve.wrappers.teleport import Teleported, teleport

Method = Literal["dp", "search"]
Cost = Literal["student", "euler"]
_F64 = torch.float64


@dataclass(frozen=True)
class TuneConfig:
    """Settings of :func:`tune_schedule` (defaults measured on ``digits``, BENCHMARKS.md).

    Attributes:
        cost: Jump cost of ``dp``: ``"student"`` (the student's own steps, rolled out) or
            ``"euler"`` (GITS' DDIM jumps from teacher states).
        candidates: Candidate intervals: ``candidates + 1`` candidate times.
        candidate_grid: Their spacing, a grid kind of :data:`diffsolve.ode.grids.GRIDS`.
        teacher_steps: DPM-Solver++(3M) steps of the teacher (at least; rounded up to a
            multiple of ``candidates``).
        trajectories: Fit seeds (teacher trajectories).
        holdout: Seeds of each held-out set (search seeds and check seeds).
        seed: First fit seed; the search seeds follow the fit seeds, the check seeds follow
            the search seeds.
        coeff: GITS' weight of the remaining cost (``cost="euler"``).
        max_jump: ``cost="student"``: a step spans at most ``max_jump`` times the mean
            step (``candidates / (N - 1)`` candidate intervals), to bound the rollout's work.
        budget: Model evaluations (per-sample evaluations, summed) the search may spend;
            ``None``: 60 candidate schedules.
        batch_size: Samples per model call.
        trim: Share of the worst trajectories left out of every score (``dp`` costs, the
            fit comparison, ``search``): per-trajectory errors are heavy-tailed (a few
            samples near a boundary between two modes decide the RMSE), and a score that
            follows them fits the fit seeds' outliers instead of the model.
        teleport: Let the schedule start with analytic Gaussian teleportation
            (:mod:`diffsolve.wrappers.teleport`, 0 NFE) from the schedule's start to any
            candidate within ``max_skip`` of the candidate intervals: ``dp`` starts its
            paths there too and keeps what measures best against the teacher. Needs the
            model's Gaussian statistics.
        max_skip: Largest share of the candidate intervals a teleport may skip.
    """

    cost: Cost = "student"
    candidates: int = 60
    candidate_grid: str = "logsnr"
    teacher_steps: int = 300
    trajectories: int = 128
    holdout: int = 128
    seed: int = 0
    coeff: float = 1.15
    max_jump: float = 3.0
    budget: int | None = None
    batch_size: int = 512
    trim: float = 0.0
    teleport: bool = False
    max_skip: float = 0.5

    def __post_init__(self) -> None:
        if self.cost not in typing.get_args(Cost):
            raise ValueError(f"cost must be 'student' or 'euler', got {self.cost!r}")
        if self.candidate_grid not in grids.GRIDS:
            raise ValueError(f"candidate_grid must be one of {sorted(grids.GRIDS)}")
        for name in ("candidates", "teacher_steps", "trajectories", "holdout", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"trim must lie in [0, 0.5), got {self.trim}")
        if not 0.0 <= self.max_skip < 1.0:
            raise ValueError(f"max_skip must lie in [0, 1), got {self.max_skip}")

    def seeds(self, which: Literal["fit", "search", "check"]) -> list[int]:
        """The seeds of one of the three disjoint sets."""
        first = self.seed + {"fit": 0, "search": 1, "check": 2}[which] * self.trajectories
        if which == "check":
            first = self.seed + self.trajectories + self.holdout
        size = self.trajectories if which == "fit" else self.holdout
        return list(range(first, first + size))


class Meter:
    """A denoiser that counts per-sample model evaluations."""

    def __init__(self, model: Denoiser) -> None:
        self.model, self.schedule = model, model.schedule
        self.evaluations = 0

    def __call__(self, x: Tensor, t: float) -> Prediction:
        self.evaluations += int(x.shape[0])
        return self.model(x, t)


class _Replay:
    """Returns a known evaluation at ``(x, t)``, evaluates anything else."""

    def __init__(self, model: Meter, x: Tensor, t: float, prediction: Prediction) -> None:
        self.model, self.schedule = model, model.schedule
        self.x, self.t, self.prediction = x, t, prediction

    def __call__(self, x: Tensor, t: float) -> Prediction:
        if x is self.x and t == self.t:
            return self.prediction
        return self.model(x, t)


@dataclass
class Teacher:
    """Teacher trajectories: states at the candidate times and the final :math:`x_0`."""

    x: Tensor
    times: Tensor
    states: list[Tensor]
    target: Tensor


def rms_error(a: Tensor, b: Tensor, trim: float = 0.0) -> float:
    """RMSE of ``a`` to ``b``; ``trim``: without that share of the worst samples."""
    per = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    if trim > 0.0:
        per = per.sort().values[: max(1, per.numel() - math.floor(trim * per.numel()))]
    return float(per.mean().sqrt())


def _candidates(schedule: NoiseSchedule, config: TuneConfig, t_start: float) -> Tensor:
    """Positive candidate times from ``t_start`` to the schedule's end."""
    return grids.make_grid(schedule, config.candidates, config.candidate_grid, t_start)


def run_teacher(model: Meter, x: Tensor, times: Tensor, steps: int) -> Teacher:
    """DPM-Solver++(3M) from ``x`` at ``times[0]`` through every candidate time (each
    interval split uniformly in λ) to clean data."""
    schedule = model.schedule
    refine = max(1, math.ceil(steps / (times.numel() - 1)))
    lam = schedule.lambda_(times)
    parts = [times[:1]]
    for i in range(times.numel() - 1):
        sub = torch.linspace(float(lam[i]), float(lam[i + 1]), refine + 1, dtype=_F64)[1:]
        inner = schedule.t_of_lambda(sub[:-1])
        parts += [inner, times[i + 1 : i + 2]]
    grid = torch.cat([*parts, torch.zeros(1, dtype=_F64)])
    states = [x]

    def keep(info: Any) -> None:
        if info.step % refine == 0 and info.step // refine < times.numel():
            states.append(info.x)

    out = sample(model, x, DPMSolverPP(3, lower_order_final=False), grid, callback=keep)
    return Teacher(x, times, states, out.x)


# ---------------------------------------------------------------------------------------
# dp: the student rollout (OSS) and the GITS recursion with DDIM jumps
def _path_grid(times: Tensor, path: Sequence[int], positives: int) -> Tensor:
    """The grid through ``path``, filled with the next candidates up to ``positives``
    positive times, then ``t = 0`` (the filler only shapes later steps' orders)."""
    last = path[-1]
    idx = [*path, *range(last + 1, last + 1 + positives - len(path))]
    return torch.cat([times[idx], torch.zeros(1, dtype=_F64)])


def dp_student(
    model: Meter,
    solver: Solver,
    teacher: Teacher,
    steps: int,
    max_jump: float = math.inf,
    *,
    starts: dict[int, Tensor] | None = None,
    trim: float = 0.0,
) -> list[int]:
    """The OSS rollout with the student's own steps: candidate indices of the best path
    (``steps`` positive times).

    ``starts`` maps the candidates a path may start at to the samples there (default: the
    first candidate and the teacher's noise; teleportation adds later candidates and the
    teleported noise). Errors are :func:`rms_error` with ``trim``."""
    times, last = teacher.times, teacher.times.numel() - 1
    span = max(1, math.ceil(max_jump * last / max(1, steps - 1)))
    schedule = model.schedule
    starts = starts if starts is not None else {0: teacher.x}
    # a path needs `steps` positive candidate times: a start too late cannot complete one
    starts = {s: x for s, x in starts.items() if s + steps - 1 <= last} or {0: teacher.x}
    frontier: dict[int, tuple[list[int], State]] = {
        s: ([s], solver.plan(schedule, _path_grid(times, [s], steps)).init(x))
        for s, x in starts.items()
    }
    for k in range(1, steps):
        best: dict[int, tuple[float, list[int], State]] = {}
        for i, (path, state) in frontier.items():
            t = float(times[i])
            replay = _Replay(model, state.x, t, model(state.x, t))
            for j in range(i + 1, min(i + span, last - (steps - 1 - k)) + 1):
                plan = solver.plan(schedule, _path_grid(times, [*path, j], steps))
                moved = plan.step(replay, replace(state, owns_x_prev=False))
                err = rms_error(moved.x, teacher.states[j], trim)
                if j not in best or err < best[j][0]:
                    best[j] = (err, [*path, j], moved)
        frontier = {j: (path, state) for j, (_, path, state) in best.items()}
    final: tuple[float, list[int]] | None = None
    for path, state in frontier.values():
        plan = solver.plan(schedule, _path_grid(times, path, steps))
        while not state.done:
            state = plan.step(model, replace(state, owns_x_prev=False))
        err = rms_error(state.x, teacher.target, trim)
        if final is None or err < final[0]:
            final = (err, path)
    assert final is not None
    return final[1]


def dp_euler(model: Meter, teacher: Teacher, steps: int, coeff: float) -> list[int]:
    """GITS: DDIM-jump costs between teacher states and the weighted recursion."""
    schedule, times = model.schedule, teacher.times
    m = times.numel()
    alpha, sigma, lam = schedule.alpha(times), schedule.sigma(times), schedule.lambda_(times)
    x0 = [model(x, float(t)).x0 for x, t in zip(teacher.states, times, strict=True)]
    cost = torch.full((m, m), math.inf, dtype=_F64)
    for i in range(m):
        for j in range(i + 1, m):
            a = float(sigma[j] / sigma[i])
            b = -float(alpha[j]) * math.expm1(-float(lam[j] - lam[i]))
            cost[i, j] = rms_error(a * teacher.states[i] + b * x0[i], teacher.states[j])
    end = torch.tensor([rms_error(x, teacher.target) for x in x0], dtype=_F64)
    value, choice = [end], [torch.full((m,), -1, dtype=torch.long)]
    for _ in range(1, steps):  # value[k][j]: best cost from j with k + 1 evaluations left
        total = cost + coeff * value[-1][None, :]
        best, arg = total.min(dim=1)
        value.append(best)
        choice.append(arg)
    path = [0]
    for k in range(steps - 1, 0, -1):
        path.append(int(choice[k][path[-1]]))
    return path


# ---------------------------------------------------------------------------------------
# search: a (1+1) evolution strategy over times and solver options
def option_space(solver: Solver) -> dict[str, tuple[Any, ...]]:
    """The solver's options a search may flip: booleans, ``Literal`` choices and ``order``
    (1–3)."""
    hints = typing.get_type_hints(type(solver))
    space: dict[str, tuple[Any, ...]] = {}
    for f in dataclasses.fields(solver):  # type: ignore[arg-type]
        hint = hints.get(f.name)
        if hint is bool:
            space[f.name] = (False, True)
        elif typing.get_origin(hint) is Literal:
            space[f.name] = typing.get_args(hint)
        elif f.name == "order":
            space[f.name] = (1, 2, 3)
    return space


@dataclass
class _Candidate:
    """A grid and solver; ``teleport``: the grid's first interval is a Gaussian jump."""

    times: Tensor
    solver: Solver
    teleport: bool = False
    score: float = math.inf


@dataclass
class _Search:
    model: Meter
    x: Tensor
    target: Tensor
    nfe: int
    generator: torch.Generator
    space: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    gaussian: GaussianModel | None = None
    trim: float = 0.0

    def method(self, c: _Candidate) -> Solver:
        """The candidate's solver, with teleportation when it starts with a jump."""
        if not c.teleport:
            return c.solver
        assert self.gaussian is not None
        return Teleported(c.solver, self.gaussian)

    def score(self, c: _Candidate) -> float:
        method = self.method(c)
        try:
            plan = method.plan(self.model.schedule, c.times)
        except ValueError:
            return math.inf
        if plan.nfe != self.nfe:
            return math.inf
        out = sample(self.model, self.x, method, plan=plan, check_finite=False).x
        err = rms_error(out, self.target, self.trim)
        return err if math.isfinite(err) else math.inf

    def propose(self, c: _Candidate, scale: float) -> _Candidate | None:
        g = self.generator
        if self.space and float(torch.rand((), generator=g)) < 0.25:
            names = sorted(self.space)
            name = names[int(torch.randint(len(names), (), generator=g))]
            values = self.space[name]
            value = values[int(torch.randint(len(values), (), generator=g))]
            if value == getattr(c.solver, name):
                return None
            try:
                solver = replace(c.solver, **{name: value})  # type: ignore[type-var]
                return _Candidate(c.times, solver, c.teleport)
            except (ValueError, TypeError):
                return None
        schedule = self.model.schedule
        positive = c.times[:-1]
        lam = schedule.lambda_(positive)
        lo, hi = float(lam[0]), float(schedule.lambda_(schedule.default_range[1]))
        free = lam[1:] + scale * (hi - lo) / max(1, lam.numel()) * torch.randn(
            lam.numel() - 1, generator=g, dtype=_F64
        )
        free = free.clamp(lo, hi).sort().values
        lam = torch.cat([lam[:1], free])
        if bool(((lam[1:] - lam[:-1]) <= 1e-6).any()):
            return None
        times = torch.cat([positive[:1], schedule.t_of_lambda(free), c.times[-1:]])
        return _Candidate(times, c.solver, c.teleport)


def search(state: _Search, start: _Candidate, budget: int) -> _Candidate:
    """(1+1)-ES with the one-fifth rule on the step size, until ``budget`` evaluations."""
    best = replace(start, score=state.score(start))
    cost, scale, spent = state.nfe * state.x.shape[0], 0.3, 0
    while spent + cost <= budget:
        proposal = state.propose(best, scale)
        if proposal is None:
            continue
        proposal.score = state.score(proposal)
        spent += cost
        if proposal.score < best.score:
            best, scale = proposal, min(scale * 1.5, 2.0)
        else:
            scale = max(scale * 0.9, 0.01)
    return best


# ---------------------------------------------------------------------------------------
# The entry point
def _denoiser(model: Any, seeds: Sequence[int]) -> Denoiser:
    """The model's denoiser for these seeds (class-conditional: label = seed % classes,
    as the bench)."""
    if hasattr(model, "denoiser"):
        if getattr(model, "num_classes", None):
            return model.conditional(torch.tensor(list(seeds)) % model.num_classes)
        return model.denoiser
    return model


def _gaussian(model: Any) -> GaussianModel:
    """The model's Gaussian statistics (teleportation), or a one-line error."""
    if not hasattr(model, "load_gaussian"):
        raise ValueError(
            "teleport: pass a LoadedModel whose folder has gaussian_stats.safetensors"
        )
    return model.load_gaussian()


def schedule_fingerprint(model: Any) -> str | None:
    """The fingerprint a step schedule records and is checked against: the model's
    (a :class:`~diffsolve.app.loader.LoadedModel`'s denoiser, or a denoiser itself;
    ``None`` where it has none)."""
    target = model.denoiser if hasattr(model, "denoiser") else model
    try:
        return model_fingerprint(target)
    except (AttributeError, TypeError, RuntimeError):
        return None


def _solver(
    model: Any, solver: str, nfe: int, context: SolverContext | None
) -> tuple[Solver, Tensor]:
    spec = preset(solver)
    if spec.times is not None:
        raise ValueError(
            f"tune fits the step times of a registry solver; {solver} is a fitted solver "
            "schedule with its own times: tune a new one with --method solver-schedule"
        )
    if spec.solver is not None and spec.solver.stochastic:
        raise ValueError(
            f"tune fits step schedules of deterministic solvers to their ODE solution; "
            f"{solver} is stochastic (a sample is not a function of its start): tune its "
            "deterministic counterpart (e.g. dpm-solver++-2m) and compare FD with `bench`"
        )
    if context is None and hasattr(model, "solver_context"):
        context = model.solver_context(spec.needs)
    return setup_solver(solver, model.schedule, nfe, context=context)


def _check_budget(solver: str, default: Tensor, nfe: int, config: TuneConfig) -> None:
    """A one-evaluation-per-step solver, and enough candidate times for its path."""
    steps = default.numel() - 1
    if float(default[-1]) != 0.0 or steps != nfe:
        raise ValueError(f"tune: {solver} is not a one-evaluation-per-step solver")
    if config.candidates < steps:
        raise ValueError(
            f"tune: --candidates {config.candidates} gives {config.candidates + 1} candidate "
            f"times, too few for a path of {steps} steps (--nfe {nfe}); use --candidates >= "
            f"{steps} (default {TuneConfig.candidates})"
        )


def _noise(model: Any, seeds: Sequence[int], t_start: float) -> Tensor:
    schedule: NoiseSchedule = model.schedule
    shape = model.data_shape if hasattr(model, "data_shape") else None
    if shape is None:
        raise ValueError("tune_schedule: pass a LoadedModel, or a denoiser with data_shape")
    device = getattr(model, "device", "cpu")
    return noise_for_seeds(seeds, shape, schedule.init_noise_sigma(t_start), device=device)


def _teleport_starts(
    fit: Teacher, gaussian: GaussianModel, schedule: NoiseSchedule, config: TuneConfig
) -> dict[int, Tensor]:
    """Where a teleported path may start: candidate 0 with the noise itself, and every
    candidate within ``max_skip`` of the intervals with the noise teleported there."""
    t0, skips = float(fit.times[0]), math.floor(config.max_skip * (fit.times.numel() - 1))
    starts = {0: fit.x}
    for s in range(1, skips + 1):
        starts[s] = teleport(gaussian, fit.x, t0, float(fit.times[s]), schedule).to(fit.x.dtype)
    return starts


def _fit_dp(
    model: Meter,
    fit: Teacher,
    base: Solver,
    default: Tensor,
    config: TuneConfig,
    gaussian: GaussianModel | None = None,
) -> tuple[_Candidate, _Candidate]:
    """The dp path and the default grid, each scored on the fit seeds (``gaussian``: paths
    may start with a teleport)."""
    steps = default.numel() - 1
    with torch.inference_mode():
        starts = (
            None if gaussian is None else _teleport_starts(fit, gaussian, model.schedule, config)
        )
        path = (
            dp_student(model, base, fit, steps, config.max_jump, starts=starts, trim=config.trim)
            if config.cost == "student"
            else dp_euler(model, fit, steps, config.coeff)
        )
        jump = path[0] > 0
        head = fit.times[: 1 if jump else 0]  # the start time before a teleport
        found = torch.cat([head, fit.times[path], torch.zeros(1, dtype=_F64)])
        tuned, default_fit = _Candidate(found, base, jump), _Candidate(default, base)
        fitter = _Search(
            model, fit.x, fit.target, steps, torch.Generator(), gaussian=gaussian, trim=config.trim
        )
        tuned.score, default_fit.score = fitter.score(tuned), fitter.score(default_fit)
    return tuned, default_fit


def _scores(
    model: Meter,
    teacher: Teacher,
    nfe: int,
    gaussian: GaussianModel | None,
    *candidates: _Candidate,
) -> list[float]:
    """RMSE of each candidate to the teacher's :math:`x_0` on the teacher's seeds."""
    scorer = _Search(model, teacher.x, teacher.target, nfe, torch.Generator(), gaussian=gaussian)
    with torch.inference_mode():
        return [scorer.score(c) for c in candidates]


class Teachers:
    """Teacher trajectories of the fit, search and check seeds (counting evaluations)."""

    def __init__(
        self, model: Any, config: TuneConfig, t_start: float, say: Callable[[str], None]
    ) -> None:
        self.model, self.config, self.t_start, self.say = model, config, t_start, say
        self.times = _candidates(model.schedule, config, t_start)
        self.meters: list[Meter] = []

    def __call__(self, which: Literal["fit", "search", "check"]) -> tuple[Meter, Teacher]:
        seeds, steps = self.config.seeds(which), self.config.teacher_steps
        meter = Meter(_denoiser(self.model, seeds))
        self.meters.append(meter)
        self.say(f"tune: teacher on {len(seeds)} {which} seeds, {steps} steps")
        with torch.inference_mode():
            x = _noise(self.model, seeds, self.t_start)
            return meter, run_teacher(meter, x, self.times, steps)


def _select(state: _Search, tuned: _Candidate, default: _Candidate) -> tuple[_Candidate, str]:
    """The dp path or the default grid, whichever scores better on the search seeds
    (not the fit seeds the path was fitted to: on those it always looks better)."""
    with torch.inference_mode():
        scored = [replace(c, score=state.score(c)) for c in (tuned, default)]
    return (scored[0], "dp") if scored[0].score <= scored[1].score else (scored[1], "default")


def _changed_options(solver: Solver, base: Solver) -> dict[str, Any]:
    """The searchable options in which ``solver`` differs from ``base``."""
    space = option_space(base)
    return {
        name: getattr(solver, name)
        for name in space
        if getattr(solver, name) != getattr(base, name)
    }


def tune_schedule(
    model: Any,
    solver: str,
    nfe: int,
    method: Method = "dp",
    config: TuneConfig | None = None,
    *,
    context: SolverContext | None = None,
    start: Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> StepSchedule:
    """Fit a step schedule for ``solver`` at ``nfe`` model evaluations to ``model``.

    Args:
        model: A :class:`~diffsolve.app.loader.LoadedModel` (a class-conditional one is
            tuned under labels ``seed % classes``), or a denoiser with a ``data_shape``.
        solver: Registry name (``diffsolve solvers``).
        nfe: Model evaluations per sample.
        method: ``"dp"`` (dynamic programming over candidate times) or ``"search"`` (``dp``,
            then the evolutionary search from it).
        config: Settings (:class:`TuneConfig`).
        context: What the solver needs from the model (default: the loaded model's).
        start: ``search`` only: start from this grid instead of the ``dp`` result.
        progress: Called with one line per stage.

    Returns:
        The :class:`~diffsolve.ode.step_schedule.StepSchedule` (save it with ``.save``).
    """
    if method not in ("dp", "search"):
        raise ValueError(f"method must be 'dp' or 'search', got {method!r}")
    config = config or TuneConfig()
    say = progress or (lambda line: None)
    began = time.perf_counter()
    base, default = _solver(model, solver, nfe, context)
    _check_budget(solver, default, nfe, config)
    schedule: NoiseSchedule = model.schedule
    teacher = Teachers(model, config, float(default[0]), say)
    gaussian = _gaussian(model) if config.teleport else None
    fit_model, fit = teacher("fit")
    say(f"tune: dp ({config.cost} cost) over {config.candidates + 1} candidate times")
    tuned, default_fit = _fit_dp(fit_model, fit, base, default, config, gaussian)
    say(f"tune: dp fit RMSE {tuned.score:.4g} (default grid {default_fit.score:.4g})")
    held_model, held = teacher("search")
    state = _Search(
        held_model, held.x, held.target, nfe, torch.Generator().manual_seed(config.seed),
        option_space(base), gaussian, config.trim,
    )  # fmt: skip
    best, chosen = _select(state, tuned, _Candidate(default, base))
    if method == "search":
        budget = config.budget or 60 * nfe * config.holdout
        say(f"tune: search, budget {budget} model evaluations")
        with torch.inference_mode():
            best = search(state, best if start is None else _Candidate(start, base), budget)
        chosen = "search"
    check_tuned, check_default = _scores(
        *teacher("check"), nfe, gaussian, best, _Candidate(default, base)
    )
    if chosen == "search" and check_tuned > check_default:  # it overfitted its seeds
        say("tune: search lost to the default grid on the check seeds, keeping the default")
        best, chosen, check_tuned = _Candidate(default, base), "default", check_default
    evaluations = sum(meter.evaluations for meter in teacher.meters)
    options = _changed_options(best.solver, base)
    name = getattr(model, "name", "") or ""
    return StepSchedule(
        times=tuple(float(t) for t in best.times),
        solver=solver,
        nfe=nfe,
        method=chosen,
        teleport=best.teleport,
        noise_schedule=schedule.to_config(),
        fingerprint=schedule_fingerprint(model),
        options=options,
        model=str(name),
        cost={"model_evaluations": evaluations, "seconds": round(time.perf_counter() - began, 2)},
        config={**dataclasses.asdict(config), "method": method},
        fit={
            "fit_rmse": tuned.score,
            "fit_rmse_default": default_fit.score,
            "check_rmse": check_tuned,
            "check_rmse_default": check_default,
            "check_seeds": f"{config.seeds('check')[0]}-{config.seeds('check')[-1]}",
        },
    )


def schedule_needs(schedule_file: StepSchedule) -> frozenset[str]:
    """What a fitted schedule needs from the model: its solver's needs, and the Gaussian
    statistics when it starts with a teleport."""
    needs = set(preset(schedule_file.solver).needs)
    return frozenset(needs | {"gaussian"} if schedule_file.teleport else needs)


def schedule_solver(
    schedule_file: StepSchedule, model: Any, context: SolverContext | None = None
) -> tuple[Solver, Tensor]:
    """The solver (with the schedule's options, teleportation wrapped around it where the
    schedule starts with a jump) and grid of a fitted schedule, checked against ``model``
    (its noise schedule and fingerprint). ``context``: what the model provides (default:
    loaded from a :class:`~diffsolve.app.loader.LoadedModel` by :func:`schedule_needs`)."""
    grid = schedule_file.grid(model.schedule, schedule_fingerprint(model))
    if context is None and hasattr(model, "solver_context"):
        context = model.solver_context(schedule_needs(schedule_file))
    solver, _ = _solver(model, schedule_file.solver, schedule_file.nfe, context)
    solver = replace(solver, **schedule_file.options)  # type: ignore[type-var]
    if not schedule_file.teleport:
        return solver, grid
    gaussian = context.gaussian if context is not None else None
    return Teleported(solver, gaussian or _gaussian(model)), grid
