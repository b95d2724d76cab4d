"""The one sampling loop that drives every solver."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.ode.noise import NoiseSource, as_noise_source
from diffsolve.ode.plan import Plan, Solver, State
from diffsolve.ode.schedule import NoiseSchedule


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives after each step (k-diffusion's ``x, i, sigma, denoised``)."""

    step: int
    t: float
    x: Tensor
    denoised: Tensor | None
    nfe: int


class NonFiniteError(FloatingPointError):
    """The solver state became NaN or inf. The message names the step and its times;
    :attr:`last_finite` is the last finite state (at time :attr:`t_finite`)."""

    def __init__(
        self,
        step: int,
        t_start: float,
        t_end: float,
        last_finite: Tensor,
        t_finite: float,
        nfe: int,
    ) -> None:
        self.step, self.t_start, self.t_end = step, t_start, t_end
        self.last_finite, self.t_finite, self.nfe = last_finite, t_finite, nfe
        super().__init__(
            f"the sample became NaN or inf at step {step} (t = {t_start:.6g} → {t_end:.6g}) "
            f"after {nfe} model evaluations: the model returned non-finite values or the "
            "solver diverged (try more steps, a lower order, or check the model); the last "
            f"finite state (t = {t_finite:.6g}) is in .last_finite"
        )


@dataclass
class SampleOutput:
    """Result of :func:`sample`.

    Attributes:
        x: Final samples, in the dtype of ``x_start``.
        nfe: Model evaluations spent per sample (a batched guidance pair counts once).
        times: Solver time after each step (with ``return_intermediates``), starting with
            the initial time.
        intermediates: States at those times (with ``return_intermediates``).
    """

    x: Tensor
    nfe: int
    times: list[float] = field(default_factory=list)
    intermediates: list[Tensor] = field(default_factory=list)


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations."""

    def __init__(self, model: Denoiser) -> None:
        self.model = model
        self.schedule: NoiseSchedule = model.schedule
        self.calls = 0

    def __call__(self, x: Tensor, t: float) -> Prediction:
        self.calls += 1
        return self.model(x, t)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solver state is kept in at least float32, whatever the model's precision."""
    if not dtype.is_floating_point:
        raise ValueError(f"x_start must be a floating-point tensor, got dtype {dtype}")
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def finite_flag(x: Tensor) -> Tensor:
    """A 0-dim boolean tensor on ``x``'s device: whether the sum of ``x`` is finite — one
    reduction in ``x``'s own precision (NaN and ±inf propagate through a sum). It can only
    err on the side of caution: a float32 sum may overflow with finite entries beyond ~1e31,
    which :func:`all_finite` then rules out exactly. In float32 it is ~15× cheaper than a
    float64 sum on CPU, which is ~2× cheaper than ``torch.isfinite(x).all()``."""
    return torch.isfinite(x.sum())


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite: :func:`finite_flag`, confirmed exactly by the
    smallest and largest entry (which finite values cannot overflow) when the sum is not."""
    if bool(finite_flag(x)):
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


#: Steps between two finiteness checks of the state (and one at the end of a run): the loop
#: reads a flag from the device once per this many model evaluations, not after every step.
CHECK_EVERY = 8


class FinitenessWatch:
    """Finds the first non-finite state of a run without a host synchronisation per step.

    Every :data:`CHECK_EVERY` steps and at the end, one :func:`finite_flag` of the newest
    state is read: NaN and inf propagate through every later step of an ODE solver (each is a
    linear combination of the earlier states and the model's outputs at them), so a finite
    newest state means finite states all along. When it is not, the states since the last
    check, kept until then, are checked one by one and the first bad step raises
    :class:`NonFiniteError` with the state before it. (A model that turned a NaN back into
    finite values would go unreported: the run's result is then finite.)
    """

    def __init__(self, out_dtype: torch.dtype, enabled: bool = True) -> None:
        self.out_dtype, self.enabled = out_dtype, enabled
        self.pending: list[tuple[State, State, int]] = []

    def add(self, previous: State, state: State, calls: int) -> None:
        """Record step ``previous → state`` (``calls``: model evaluations so far)."""
        if not self.enabled:
            return
        self.pending.append((previous, state, calls))
        if len(self.pending) >= CHECK_EVERY:
            self.check()

    def check(self) -> None:
        """Read the newest state's flag (one synchronisation); raise at the first bad step."""
        pending, self.pending = self.pending, []
        if not pending or bool(finite_flag(pending[-1][1].x)):
            return
        for previous, state, calls in pending:
            if all_finite(state.x):  # finite, or its float32 sum overflowed
                continue
            raise NonFiniteError(
                state.step, previous.t, state.t, previous.x.to(self.out_dtype), previous.t, calls
            )


def sample(
    model: Denoiser,
    x_start: Tensor,
    solver: Solver,
    grid: Tensor | Sequence[float] | None = None,
    *,
    plan: Plan[Any] | None = None,
    denoise_to_zero: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
    check_finite: bool = True,
    initial_state: State | None = None,
    grad: bool = False,
    noise: NoiseSource | torch.Generator | Sequence[int] | None = None,
) -> SampleOutput:
    """Integrate the probability-flow ODE (or, with a stochastic solver, the reverse SDE)
    from ``x_start`` along ``grid`` with ``solver``.

    Args:
        model: A :class:`~diffsolve.ode.model.Denoiser` (e.g. a
            :class:`~diffsolve.ode.model.ModelWrapper`); its schedule defines the ODE.
        x_start: Samples at the grid's first time, shape ``(B, ...)``.
        solver: Any :class:`~diffsolve.ode.plan.Solver`.
        grid: Strictly decreasing solver times (see :mod:`diffsolve.ode.grids`); ignored when a
            precomputed ``plan`` is given.
        plan: A plan from ``solver.plan(schedule, grid)``, to reuse it across batches.
        denoise_to_zero: After the last step, return the model's :math:`\\hat x_0` there
            (one extra evaluation; DPM-Solver's ``denoise_to_zero``).
        callback: Called with a :class:`StepInfo` after every step.
        progress: Show a tqdm progress bar.
        return_intermediates: Keep the state after every step.
        check_finite: Refuse a non-finite ``x_start`` (``ValueError``, before any model
            evaluation), and detect a NaN or inf state and raise :class:`NonFiniteError`
            naming the step where it appeared (:class:`FinitenessWatch`): one reduction of
            the state every :data:`CHECK_EVERY` steps and at the end, so the loop does not
            wait for the device after every step.
        initial_state: Start from this state of ``plan`` instead of ``plan.init(x_start)``
            (e.g. BDIA's pair from an inversion).
        grad: Record autograd graphs (to differentiate through sampling). By default the
            loop runs under ``torch.no_grad()``, as diffusers' pipelines and k-diffusion's
            samplers do, so a network's activations are not kept across steps; classifier
            guidance enables gradients locally where it needs them.
        noise: Where a stochastic solver draws its fresh noise (:mod:`diffsolve.ode.noise`):
            one seed per sample (each sample's noise then depends on its seed only), a
            ``torch.Generator``, a :class:`~diffsolve.ode.noise.NoiseSource`, or ``None``
            for torch's global generator. Deterministic solvers draw none.

    Returns:
        A :class:`SampleOutput` with the samples and the exact number of model evaluations.

    Raises:
        ValueError: ``x_start`` (or ``initial_state.x``) holds NaN or inf.
        NonFiniteError: The state became NaN or inf; the last finite state is attached.
    """
    if plan is None:
        if grid is None:
            raise ValueError("sample: pass a grid (see diffsolve.grids) or a precomputed plan")
        plan = solver.plan(model.schedule, grid)
    if x_start.ndim < 1 or x_start.shape[0] == 0:
        raise ValueError(
            f"x_start must have a non-empty batch dimension, got shape {tuple(x_start.shape)}"
        )
    if check_finite:
        _check_finite_start(x_start, initial_state)
    reset = getattr(model, "reset", None)
    if callable(reset):  # stateful model wrappers (e.g. APG momentum) start every run afresh
        reset()
    with contextlib.nullcontext() if grad else torch.no_grad():
        return _run(
            plan,
            CountingDenoiser(model),
            x_start,
            initial_state,
            denoise_to_zero,
            _Reporting(callback, progress, return_intermediates, check_finite),
            None if noise is None else as_noise_source(noise),
        )


def _check_finite_start(x_start: Tensor, initial_state: State | None) -> None:
    """Raise a ``ValueError`` naming the input when the starting point is not finite (it
    would otherwise surface as the model diverging)."""
    name, x = ("initial_state.x", initial_state.x) if initial_state else ("x_start", x_start)
    if x.is_floating_point() and not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN or inf value(s) out of {x.numel()}: the starting "
            "point must be finite (e.g. noise from torch.randn scaled to the first time), "
            "check how it was made"
        )


@dataclass
class _Reporting:
    """What the loop reports besides the samples."""

    callback: Callable[[StepInfo], None] | None
    progress: bool
    return_intermediates: bool
    check_finite: bool


def _run(
    plan: Plan[Any],
    counter: CountingDenoiser,
    x_start: Tensor,
    initial_state: State | None,
    denoise_to_zero: bool,
    report: _Reporting,
    noise: NoiseSource | None = None,
) -> SampleOutput:
    """The loop of :func:`sample` (``noise``: where stochastic steps draw, carried by the
    state)."""
    out_dtype = x_start.dtype
    state: State = initial_state or plan.init(x_start.to(state_dtype(out_dtype)))
    if noise is not None:
        state = replace(state, noise=noise)
    watch = FinitenessWatch(out_dtype, report.check_finite)
    result = SampleOutput(x=x_start, nfe=0)
    if report.return_intermediates:
        result.times.append(state.t)
        result.intermediates.append(state.x)
    bar = _progress_bar(plan, report.progress)
    try:
        while not state.done:
            previous, state = state, plan.step(counter, state)
            watch.add(previous, state, counter.calls)
            if bar is not None:
                bar.update(1)
            if report.return_intermediates:
                result.times.append(state.t)
                result.intermediates.append(state.x)
            if report.callback is not None:
                info = StepInfo(state.step, state.t, state.x, state.denoised, counter.calls)
                report.callback(info)
        x = state.x
        if denoise_to_zero:
            end = State(x=counter(x, state.t).x0, t=0.0, step=state.step + 1)
            watch.add(state, end, counter.calls)
            x = end.x
        watch.check()
    finally:
        if bar is not None:
            bar.close()
    result.x = x.to(out_dtype)
    result.nfe = counter.calls
    return result


def invert(
    model: Denoiser,
    x: Tensor,
    solver: Solver,
    grid: Tensor | Sequence[float],
    **options: object,
) -> SampleOutput:
    r"""Map samples back to noise by integrating the same ODE backwards (DDIM inversion
    generalised to every solver).

    ``grid`` is the *sampling* grid (decreasing; a final ``t = 0`` point is dropped, since
    :math:`\hat x_0` cannot be inverted) or an increasing one; ``x`` is taken as the state at
    its cleanest time. Sampling from the result on the same grid (without the ``t = 0`` step)
    reconstructs ``x`` up to the solver's discretisation error. Options as :func:`sample`.
    """
    ts = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if ts.numel() >= 2 and bool(ts[0] > ts[-1]):
        ts = ts.flip(0)
        if float(ts[0]) == 0.0:
            ts = ts[1:]
    plan = solver.plan(model.schedule, ts, inverse=True)
    return sample(model, x, solver, plan=plan, **options)  # type: ignore[arg-type]


def _progress_bar(plan: Plan, enabled: bool):  # noqa: ANN202 - tqdm is optional at type level
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=plan.num_steps, desc="sampling", unit="step", leave=False)
