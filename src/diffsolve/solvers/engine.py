r"""The plan engine: every solver of diffsolve is data over these few records.

Every update in diffsolve has the form

.. math:: x_{new} = a \odot x_{base} + \sum_k w_k \odot D_k \;(+\, a_{prev}\, x_{prev} + c
    + g\,z),

an :class:`Update`: the coefficients are Python floats or per-dimension tensors (DPM-Solver-v3),
and the :math:`D_k` are one *feature* of earlier model evaluations — the data prediction
:math:`\hat x_0` (``"data"``), the noise prediction :math:`\hat\epsilon` (``"noise"``) or
DPM-Solver-v3's :math:`f = -\hat x_0 + f_x \odot x` (``"f"``); a stochastic sampler's update
adds fresh noise :math:`g\,z`, :math:`z \sim \mathcal N(0, I)` from the state's
:mod:`~diffsolve.ode.noise` source. A step record says when to evaluate the model and which
updates to apply:

* :class:`MultistepStep` — one evaluation, appended to the history; then an optional
  corrector recomputes the current point from the previous one with the new evaluation
  (UniC, v3's corrector; no extra evaluation), and the predictor gives the next point;
* :class:`StageStep` — a single-step (Runge–Kutta-like) interval: stage ``j`` evaluates the
  model, update ``j`` gives the next stage point; the last update gives the next point. An
  optional ``start`` update first moves the step's base (EDM's churn: noise added, to a
  noisier time).

A :class:`StepPlan` is a tuple of such records on a grid. :func:`multistep_plan` and
:func:`stage_plan` build one from a solver's per-step rule and give every step that ends at
clean data (``t = 0``) the one shared final step, :func:`final_update`: return
:math:`\hat x_0`. The coefficients depend on the grid only, never on ``x``: a plan is
computed once, in float64, and stepping it needs no host synchronisation.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

from diffsolve.numerics.expint import ExpStep, Space
from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.ode.noise import GeneratorNoise
from diffsolve.ode.plan import Plan, State
from diffsolve.ode.schedule import NoiseSchedule

#: A coefficient: a float64 scalar or a per-dimension tensor (shape of one sample).
Coef = float | Tensor
#: What an update combines: the data or noise prediction, or DPM-Solver-v3's ``f``.
Feature = Literal["data", "noise", "f"]


class Point:
    """One model evaluation, as updates read it: :meth:`feature` ``"data"``/``"noise"`` come
    from the prediction (formed on first use), ``"f"`` is stored when the step defines
    :math:`f_x` (DPM-Solver-v3). Features are ``(tensor, scale)`` pairs, feature
    :math:`= \\text{scale}\\cdot\\text{tensor}` (see :meth:`Prediction.scaled`)."""

    __slots__ = ("f", "prediction")

    def __init__(self, prediction: Prediction, f: tuple[Tensor, float] | None = None) -> None:
        self.prediction, self.f = prediction, f

    def feature(self, name: Feature) -> tuple[Tensor, float]:
        """The feature ``name`` of this evaluation, as ``(tensor, scale)``."""
        if name == "f":
            if self.f is None:
                raise RuntimeError("an update reads f, but its step defines no f_x")
            return self.f
        return self.prediction.scaled(name)


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    return value.to(device, dtype) if isinstance(value, Tensor) else value


@dataclass(frozen=True, eq=False)
class Update:
    r""":math:`x_{new} = a \odot x_{base} + \sum_k w_k \odot D_k + a_{prev}\,x_{prev} + c
    + g\,z`.

    Attributes:
        a: Coefficient of the base point.
        w: Coefficients of the features, one per entry of :attr:`points`.
        feature: Which feature of the evaluations the update combines.
        points: Indices of the evaluations in the sequence :meth:`apply` receives (the
            history, newest first, or a step's stages, oldest first); default ``0, 1, …``.
        prev: Coefficient of the state before the last step (BDIA's two-step recurrence).
        c: A constant term (v3), or ``None``.
        noise: :math:`g`, the standard deviation of the fresh Gaussian noise the update adds
            (stochastic samplers; 0: none).
    """

    a: Coef
    w: tuple[Coef, ...]
    feature: Feature = "data"
    points: tuple[int, ...] = ()
    prev: float = 0.0
    c: Tensor | None = None
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not self.points:
            object.__setattr__(self, "points", tuple(range(len(self.w))))
        if len(self.points) != len(self.w):
            raise ValueError("Update: one point index per weight")

    @property
    def per_dimension(self) -> bool:
        """Whether any coefficient is a tensor (and must live on the state's device)."""
        return any(isinstance(value, Tensor) for value in (self.a, self.c, *self.w))

    def to(self, device: torch.device, dtype: torch.dtype) -> Update:
        """The update with its tensor coefficients on ``device`` in ``dtype``."""
        return Update(
            _to(self.a, device, dtype),
            tuple(_to(w, device, dtype) for w in self.w),
            self.feature,
            self.points,
            self.prev,
            _to(self.c, device, dtype),
            self.noise,
        )

    def apply(
        self,
        x: Tensor,
        evaluations: Sequence[Point],
        x_prev: Tensor | None = None,
        *,
        in_place: bool = False,
        z: Tensor | None = None,
    ) -> Tensor:
        """Evaluate the combination on base point ``x`` (into ``x`` itself with
        ``in_place``, which must then be a buffer nothing else reads); ``z`` is the fresh
        noise of a stochastic update (:attr:`noise` ≠ 0)."""
        if in_place:
            out: Tensor | None = self._base_in_place(x)
        elif isinstance(self.a, Tensor):
            out = x * self.a if self.c is None else torch.addcmul(self.c, self.a, x)
        else:
            out = x * self.a if self.a != 0.0 else None
        for w, i in zip(self.w, self.points, strict=True):
            d, scale = evaluations[i].feature(self.feature)
            if isinstance(w, Tensor):
                out = (
                    torch.mul(d, w).mul_(scale) if out is None else out.addcmul_(w, d, value=scale)
                )
            elif w != 0.0:
                out = d * (w * scale) if out is None else out.add_(d, alpha=w * scale)
        if out is None:
            out = torch.zeros_like(x)
        if self.prev != 0.0:
            if x_prev is None:
                raise RuntimeError("an update reads the previous state, but there is none")
            out = out.add_(x_prev, alpha=self.prev)
        if self.noise != 0.0:
            if z is None:
                raise RuntimeError("a stochastic update needs its noise z")
            out = out.add_(z, alpha=self.noise)
        return out

    def _base_in_place(self, x: Tensor) -> Tensor:
        """:math:`a \\odot x + c`, written into ``x``."""
        if isinstance(self.a, Tensor):
            return x.mul_(self.a) if self.c is None else torch.addcmul(self.c, self.a, x, out=x)
        return x.mul_(self.a)

    def last_point(self) -> int:
        """Largest evaluation index read (-1 for none)."""
        return max(self.points, default=-1)


#: The shared final step to clean data (``t = 0``, λ = ∞): :math:`x_0 = \hat x_0`. It is the
#: limit :math:`\sigma_t \to 0` of every exponential integrator and of Euler's step.
FINAL = Update(0.0, (1.0,), "data")


def start_update(at: GridValues, i: int) -> Update:
    r"""The first-order data-space step from grid point ``i`` (DDIM): from a pure-noise point
    (α = 0, λ = −∞) it is :math:`x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} x_i +
    \alpha_{i+1}\hat x_0`, the exact limit of every exponential integrator's first-order step
    (and of Euler's step in flow time, which it equals); higher orders are undefined there
    (:meth:`ExpStep.between`)."""
    step = at.exp_step("data", i, i + 1)
    return Update(step.a, (step.coef(0),), "data")


def final_update(f_x: Coef | None = None) -> Update:
    r"""The final step to clean data: :data:`FINAL`; for plans on DPM-Solver-v3's feature
    :math:`f = -\hat x_0 + f_x \odot x`, the same :math:`\hat x_0 = f_x \odot x - f` at the
    current (possibly corrected) state with :math:`f` held fixed, as its corrector does."""
    return FINAL if f_x is None else Update(f_x, (-1.0,), "f")


@dataclass(frozen=True, eq=False)
class MultistepStep:
    """One interval ``t → t_next`` of a multistep method (one model evaluation).

    After evaluating the model at ``(x, t)`` and prepending it to the history:

    1. optional corrector: ``x ← corrector.apply(x_prev, history)`` (the evaluation is kept,
       so correcting costs nothing);
    2. predictor: ``x_next = predictor.apply(x, history, x_prev)``.

    ``f_x`` (DPM-Solver-v3) stores the feature :math:`f = -\\hat x_0 + f_x \\odot x` of the
    evaluation, with :math:`f_x = (1 - l)/\\alpha` at ``t``.
    """

    t: float
    t_next: float
    predictor: Update
    corrector: Update | None = None
    f_x: Coef | None = None

    evals: int = field(default=1, init=False)
    #: :math:`f_x - c_x` per model conversion coefficient :math:`c_x` (see :func:`_feature_f`).
    _shifted_f_x: dict[float, Tensor] = field(default_factory=dict, init=False, repr=False)

    @property
    def updates(self) -> tuple[Update, ...]:
        """Every update the step applies."""
        return (self.predictor,) if self.corrector is None else (self.predictor, self.corrector)

    def _feature_f(self, prediction: Prediction) -> Tensor:
        """DPM-Solver-v3's :math:`f = -\\hat x_0 + f_x \\odot x = (f_x - c_x) \\odot x - c_o
        \\,\\text{out}` from the raw output, with one allocation (:math:`\\hat x_0 = c_x x +
        c_o\\,\\text{out}`); :math:`\\hat x_0` itself is formed only if read."""
        c = prediction.conversion
        shifted = self._shifted_f_x.get(c.px)
        if shifted is None:
            shifted = self._shifted_f_x[c.px] = self.f_x - c.px  # type: ignore[operator]
        return torch.mul(prediction.out, -c.po).addcmul_(shifted, prediction.x)

    def to(self, device: torch.device, dtype: torch.dtype) -> MultistepStep:
        """The step with its tensor coefficients on ``device`` in ``dtype``."""
        corrector = None if self.corrector is None else self.corrector.to(device, dtype)
        return MultistepStep(
            self.t,
            self.t_next,
            self.predictor.to(device, dtype),
            corrector,
            _to(self.f_x, device, dtype),
        )

    def advance(self, model: Denoiser, state: State, memory: int, done: bool) -> State:
        """Take the step from ``state``, keeping ``memory`` evaluations (``done``: it is the
        plan's last)."""
        prediction = model(state.x, self.t)
        f = None if self.f_x is None else (self._feature_f(prediction), 1.0)
        history = (Point(prediction, f), *state.history[: memory - 1])
        x, corrected = state.x, self.corrector is not None and state.x_prev is not None
        if corrected:  # into the previous corrector's output where that is the base
            # a stochastic corrector (SA-Solver's) reuses its predictor's noise
            x = self.corrector.apply(state.x_prev, history, in_place=state.owns_x_prev, z=state.z)  # type: ignore[union-attr]
        z = draw_noise(self.predictor, state, x)
        return State(
            x=self.predictor.apply(x, history, state.x_prev, z=z),
            t=self.t_next,
            step=state.step + 1,
            latest=prediction,
            done=done,
            history=history,
            x_prev=x,
            owns_x_prev=corrected,
            noise=state.noise,
            z=z,
        )


@dataclass(frozen=True, eq=False)
class StageStep:
    """One interval of a single-step (Runge–Kutta-like) method.

    Stage ``j`` evaluates the model at time ``times[j]`` on the current stage point (the
    step's base for ``j = 0``); then ``updates[j]`` — applied to the base and the stage
    evaluations so far, oldest first — gives the next stage point, and the last update gives
    ``x_next``. The base is the step's start ``x``, or ``start.apply(x)`` where a ``start``
    update is given (EDM's churn: :math:`x` moved to the noisier ``times[0]`` with fresh
    noise).
    """

    t: float
    t_next: float
    times: tuple[float, ...]
    updates: tuple[Update, ...]
    start: Update | None = None

    @property
    def evals(self) -> int:
        """Model evaluations of the step."""
        return len(self.times)

    def to(self, device: torch.device, dtype: torch.dtype) -> StageStep:
        """The step with its tensor coefficients on ``device`` in ``dtype``."""
        return StageStep(
            self.t,
            self.t_next,
            self.times,
            tuple(u.to(device, dtype) for u in self.updates),
            None if self.start is None else self.start.to(device, dtype),
        )

    def run(
        self, model: Denoiser, x: Tensor, state: State | None = None
    ) -> tuple[Tensor, list[Point]]:
        """The stages from ``x``: the step's result and every stage evaluation (``state``:
        where stochastic updates draw their noise)."""
        first = 0  # draws are numbered in order: the start's, then the stages'
        if self.start is not None:
            x = self.start.apply(x, (), z=draw_noise(self.start, state, x))
            first = 1
        points: list[Point] = []
        y = x
        for j, (t_eval, update) in enumerate(zip(self.times, self.updates, strict=True)):
            points.append(Point(model(y, t_eval)))
            y = update.apply(x, points, z=draw_noise(update, state, x, first + j))
        return y, points

    def advance(self, model: Denoiser, state: State, memory: int, done: bool) -> State:
        """Take the step from ``state`` (single-step methods keep no history)."""
        y, points = self.run(model, state.x, state)
        latest = points[0].prediction
        return State(
            x=y, t=self.t_next, step=state.step + 1, latest=latest, done=done, noise=state.noise
        )


def draw_noise(update: Update, state: State | None, like: Tensor, draw: int = 0) -> Tensor | None:
    """The fresh noise of a stochastic ``update`` at ``state``'s step (``None`` for a
    deterministic one): from the state's source, else torch's global generator."""
    if update.noise == 0.0:
        return None
    source = GeneratorNoise() if state is None or state.noise is None else state.noise
    return source(0 if state is None else state.step, like, draw)


Step = MultistepStep | StageStep


@dataclass(frozen=True, eq=False)
class StepPlan(Plan[State]):
    """A solver's coefficient plan on one grid: one step record per interval.

    ``memory`` (evaluations kept in the history) is derived from what the updates read.
    Plans with per-dimension coefficients keep one copy of their steps per device and dtype.
    """

    schedule: NoiseSchedule
    grid: Tensor
    steps: tuple[Step, ...]
    memory: int = field(init=False)
    _per_dimension: bool = field(init=False, repr=False)
    _placed: dict[tuple[torch.device, torch.dtype], tuple[Step, ...]] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        updates = [u for s in self.steps for u in s.updates]
        memory = 1 + max((u.last_point() for u in updates), default=0)
        per_dimension = any(u.per_dimension for u in updates) or any(
            isinstance(getattr(s, "f_x", None), Tensor) for s in self.steps
        )
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "_per_dimension", per_dimension)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def stochastic(self) -> bool:
        """Whether any update draws fresh noise."""
        updates = [u for s in self.steps for u in (*s.updates, getattr(s, "start", None)) if u]
        return any(u.noise != 0.0 for u in updates)

    @property
    def nfe(self) -> int:
        return sum(s.evals for s in self.steps)

    def init(self, x: Tensor) -> State:
        return State(x=x, t=self.steps[0].t)

    def steps_for(self, x: Tensor) -> tuple[Step, ...]:
        """The step records with their coefficients on ``x``'s device and dtype."""
        if not self._per_dimension:
            return self.steps
        key = (x.device, x.dtype)
        placed = self._placed.get(key)
        if placed is None:
            placed = self._placed[key] = tuple(s.to(x.device, x.dtype) for s in self.steps)
        return placed

    def step(self, model: Denoiser, state: State) -> State:
        done = state.step + 1 == len(self.steps)
        return self.steps_for(state.x)[state.step].advance(model, state, self.memory, done)


# ---------------------------------------------------------------------------------------
# Building plans
@dataclass(frozen=True, eq=False)
class GridValues:
    """Schedule values at every grid point, as Python floats (float64).

    At ``t = 0`` (clean data): ``alpha = 1``, ``sigma = 0``, ``lam = inf``.

    ``first_usable`` is the first grid point a multistep history may use: 1 when the grid
    starts from pure noise (α = 0, λ = −∞, infinitely far from every other point), else 0;
    a solver may raise it (DPM-Solver-v3: points beyond its statistics' range). The steps
    from the points before it are the exact first-order :func:`start_update`.
    """

    schedule: NoiseSchedule
    grid: Tensor
    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]
    first_usable: int = 0

    @classmethod
    def of(cls, schedule: NoiseSchedule, grid: Tensor) -> GridValues:
        """Evaluate ``schedule`` on ``grid``."""
        log_alpha, log_sigma = schedule.log_alpha_sigma(grid)
        return cls(
            schedule=schedule,
            grid=grid,
            t=tuple(grid.tolist()),
            alpha=tuple(torch.exp(log_alpha).tolist()),
            sigma=tuple(torch.exp(log_sigma).tolist()),
            lam=tuple((log_alpha - log_sigma).tolist()),
            first_usable=int(float(log_alpha[0]) == -math.inf),
        )

    @property
    def num_steps(self) -> int:
        """Intervals of the grid."""
        return len(self.t) - 1

    @property
    def ends_at_zero(self) -> bool:
        """True when the grid's last point is clean data."""
        return self.sigma[-1] == 0.0

    def is_final(self, i: int) -> bool:
        """Whether step ``i`` ends at clean data (and takes :data:`FINAL`)."""
        return self.sigma[i + 1] == 0.0

    def exp_step(self, space: Space, i: int, j: int) -> ExpStep:
        """The exponential-integrator step from grid point ``i`` to ``j``."""
        return ExpStep.between(space, self.alpha[i], self.sigma[i], self.alpha[j], self.sigma[j])

    def step_to_lambda(self, space: Space, i: int, lam: float) -> tuple[float, ExpStep]:
        """Time of log-SNR ``lam`` and the step from grid point ``i`` to it (for stages)."""
        t = float(self.schedule.t_of_lambda(lam))
        log_alpha, log_sigma = (float(x) for x in self.schedule.log_alpha_sigma(t))
        alpha, sigma = math.exp(log_alpha), math.exp(log_sigma)
        return t, ExpStep.between(space, self.alpha[i], self.sigma[i], alpha, sigma)

    def nodes(self, i: int, points: Sequence[int]) -> list[float]:
        """Normalised positions :math:`(\\lambda_p - \\lambda_i)/(\\lambda_{i+1}-\\lambda_i)`
        of grid points ``points`` relative to the step ``i → i+1``."""
        h = self.lam[i + 1] - self.lam[i]
        return [(self.lam[p] - self.lam[i]) / h for p in points]


def multistep_plan(
    at: GridValues,
    orders: Sequence[int],
    predictor: Callable[[int, int], Update],
    corrector: Callable[[int], Update | None] | None = None,
    f_x: Callable[[int], Coef] | None = None,
    extra: Sequence[MultistepStep] = (),
) -> StepPlan:
    """A multistep plan: step ``i`` predicts with ``predictor(i, orders[i])`` (or
    :func:`final_update` when it ends at clean data, :func:`start_update` when it starts
    before ``at.first_usable``), is preceded by ``corrector(i)`` (the corrector of the step
    that ended at point ``i``; none when that step started before ``at.first_usable``) and
    stores ``f_x(i)`` features. ``extra`` steps (e.g. UniPC's final corrector) are appended
    as they are."""
    steps = []
    for i, p in enumerate(orders):
        unused = i < at.first_usable
        feature = None if f_x is None or unused else f_x(i)
        if unused:
            update = start_update(at, i)
        elif at.is_final(i):
            update = final_update(feature)
        else:
            update = predictor(i, p)
        after_unused = 0 < i <= at.first_usable
        fix = None if corrector is None or after_unused else corrector(i)
        steps.append(MultistepStep(at.t[i], at.t[i + 1], update, fix, feature))
    return StepPlan(at.schedule, at.grid, (*steps, *extra))


def stage_plan(at: GridValues, step: Callable[[int], StageStep]) -> StepPlan:
    """A single-step plan: ``step(i)`` for every interval, :data:`FINAL` (one evaluation) for
    an interval that ends at clean data, :func:`start_update` for one that starts from pure
    noise."""

    def single(i: int, update: Update) -> StageStep:
        return StageStep(at.t[i], at.t[i + 1], (at.t[i],), (update,))

    steps = [
        single(i, start_update(at, i))
        if at.alpha[i] == 0.0
        else single(i, FINAL)
        if at.is_final(i)
        else step(i)
        for i in range(at.num_steps)
    ]
    return StepPlan(at.schedule, at.grid, tuple(steps))


def multistep_orders(
    at: GridValues, order: int, lower_order_final: bool, euler_at_final: bool = False
) -> list[int]:
    """Per-step orders of a multistep method: warm-up ``1, 2, …``, then ``order``; with
    ``lower_order_final`` the last steps fall back to ``min(order, steps_left)``; a final
    step to ``t = 0`` is first order (it returns :math:`\\hat x_0`), and so is any last step
    with ``euler_at_final`` (diffusers' option). Points before ``at.first_usable`` (a
    pure-noise start) do not count as history."""
    n = at.num_steps
    orders = []
    for i in range(n):
        p = max(1, min(order, i + 1 - at.first_usable))
        if lower_order_final:
            p = min(p, n - i)
        orders.append(p)
    if at.ends_at_zero or euler_at_final:
        orders[-1] = 1
    return orders


# ---------------------------------------------------------------------------------------
# Option checks shared by the solvers
def check_order(order: int, allowed: Sequence[int], solver: str) -> None:
    """Raise a clear error when ``order`` is not one a solver implements."""
    if not isinstance(order, int) or isinstance(order, bool) or order not in allowed:
        raise ValueError(f"{solver}: order must be one of {list(allowed)}, got {order!r}")


def check_choice(value: object, allowed: Sequence[object], argument: str) -> None:
    """Raise a clear error when an option is not one of its allowed values."""
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {list(allowed)}, got {value!r}")


def check_options(solver: object) -> None:
    """Check every ``Literal``-typed option of a solver dataclass against its values (the
    choices are read from the annotations, so they are declared once)."""
    for name, allowed in _choices(type(solver)):
        check_choice(getattr(solver, name), allowed, name)


@functools.cache
def _choices(cls: type) -> tuple[tuple[str, tuple[object, ...]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, typing.get_args(hints[f.name]))
        for f in fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    )
