"""The one sampling loop that drives every solver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffsolve.model import Denoiser, Prediction
from diffsolve.schedule import NoiseSchedule
from diffsolve.solvers.base import Plan, Solver, State


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives after each step (k-diffusion's ``x, i, sigma, denoised``)."""

    step: int
    t: float
    x: Tensor
    denoised: Tensor | None
    nfe: int


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


def sample(
    model: Denoiser,
    x_start: Tensor,
    solver: Solver,
    grid: Tensor | Sequence[float] | None = None,
    *,
    plan: Plan | None = None,
    denoise_to_zero: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
) -> SampleOutput:
    """Integrate the probability-flow ODE from ``x_start`` along ``grid`` with ``solver``.

    Args:
        model: A :class:`~diffsolve.model.Denoiser` (e.g. a
            :class:`~diffsolve.model.ModelWrapper`); its schedule defines the ODE.
        x_start: Samples at the grid's first time, shape ``(B, ...)``.
        solver: Any :class:`~diffsolve.solvers.Solver`.
        grid: Strictly decreasing solver times (see :mod:`diffsolve.grids`); ignored when a
            precomputed ``plan`` is given.
        plan: A plan from ``solver.plan(schedule, grid)``, to reuse it across batches.
        denoise_to_zero: After the last step, return the model's :math:`\\hat x_0` there
            (one extra evaluation; DPM-Solver's ``denoise_to_zero``).
        callback: Called with a :class:`StepInfo` after every step.
        progress: Show a tqdm progress bar.
        return_intermediates: Keep the state after every step.

    Returns:
        A :class:`SampleOutput` with the samples and the exact number of model evaluations.
    """
    if plan is None:
        if grid is None:
            raise ValueError("sample: pass a grid (see diffsolve.grids) or a precomputed plan")
        plan = solver.plan(model.schedule, grid)
    if x_start.ndim < 1 or x_start.shape[0] == 0:
        raise ValueError(
            f"x_start must have a non-empty batch dimension, got shape {tuple(x_start.shape)}"
        )
    out_dtype = x_start.dtype
    reset = getattr(model, "reset", None)
    if callable(reset):  # stateful model wrappers (e.g. APG momentum) start every run afresh
        reset()
    counter = CountingDenoiser(model)
    state: State = plan.init(x_start.to(state_dtype(out_dtype)))
    result = SampleOutput(x=x_start, nfe=0)
    if return_intermediates:
        result.times.append(state.t)
        result.intermediates.append(state.x)
    bar = _progress_bar(plan, progress)
    while not state.done:
        state = plan.step(counter, state)
        if bar is not None:
            bar.update(1)
        if return_intermediates:
            result.times.append(state.t)
            result.intermediates.append(state.x)
        if callback is not None:
            callback(StepInfo(state.step, state.t, state.x, state.denoised, counter.calls))
    if bar is not None:
        bar.close()
    x = state.x
    if denoise_to_zero:
        x = counter(x, state.t).x0
    result.x = x.to(out_dtype)
    result.nfe = counter.calls
    return result


def _progress_bar(plan: Plan, enabled: bool):  # noqa: ANN202 - tqdm is optional at type level
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=plan.num_steps, desc="sampling", unit="step", leave=False)
