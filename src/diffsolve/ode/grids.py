r"""Step grids: strictly monotone float64 tensors of solver times ``t``.

A grid ``t_0 > t_1 > … > t_N`` has ``N`` steps. Generators take the number of *steps* and a
time range (default: the schedule's :attr:`~diffsolve.ode.schedule.NoiseSchedule.default_range`):

* :func:`logsnr_uniform` — uniform in :math:`\lambda` (DPM-Solver's ``logSNR``);
* :func:`time_uniform` — uniform in ``t``;
* :func:`time_quadratic` — uniform in :math:`\sqrt t`;
* :func:`karras` — Karras et al.'s :math:`\rho`-spacing of the EDM noise level
  :math:`\sigma/\alpha`;
* :func:`time_shifted` — uniform in ``t`` warped by SD3's time shift;
  :func:`flow_shifted`, with the shift measured on ``digits-flow`` (which declares it);
* :func:`custom` — a user's list, validated.
* :func:`align_your_steps` — the published Align Your Steps schedules (SD 1.5, SDXL, SVD).

A grid may end at ``t = 0`` (clean data); :func:`append_zero` adds that final point, which turns
the last step into "return the model's :math:`\hat x_0`" (diffusers' ``final_sigmas_type="zero"``).
Every grid is checked once by :func:`validate_grid`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from diffsolve.ode.schedule import NoiseSchedule

_F64 = torch.float64


def _range(
    schedule: NoiseSchedule, t_start: float | None, t_end: float | None
) -> tuple[float, float]:
    default_start, default_end = schedule.default_range
    t_start = default_start if t_start is None else float(t_start)
    t_end = default_end if t_end is None else float(t_end)
    if not t_start > t_end:
        raise ValueError(
            f"t_start must be greater than t_end; got t_start={t_start}, t_end={t_end}"
        )
    return t_start, t_end


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _finish(schedule: NoiseSchedule, ts: Tensor, t_start: float, t_end: float) -> Tensor:
    ts = ts.to(_F64).clone()
    ts[0], ts[-1] = t_start, t_end  # land exactly on both ends
    return validate_grid(schedule, ts)


def logsnr_uniform(
    schedule: NoiseSchedule, steps: int, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """``steps`` steps uniform in log-SNR :math:`\\lambda` between ``t_start`` and ``t_end``."""
    _check_steps(steps)
    t_start, t_end = _range(schedule, t_start, t_end)
    if t_end == 0.0:
        raise ValueError("logsnr_uniform: t_end must be > 0 (lambda(0) = +inf); use append_zero")
    lam = torch.linspace(
        float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end)), steps + 1, dtype=_F64
    )
    return _finish(schedule, schedule.t_of_lambda(lam), t_start, t_end)


def time_uniform(
    schedule: NoiseSchedule, steps: int, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """``steps`` steps uniform in solver time ``t``."""
    _check_steps(steps)
    t_start, t_end = _range(schedule, t_start, t_end)
    return _finish(schedule, torch.linspace(t_start, t_end, steps + 1, dtype=_F64), t_start, t_end)


def time_quadratic(
    schedule: NoiseSchedule, steps: int, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """``steps`` steps uniform in :math:`\\sqrt t` (denser near the data end)."""
    _check_steps(steps)
    t_start, t_end = _range(schedule, t_start, t_end)
    ts = torch.linspace(t_start**0.5, t_end**0.5, steps + 1, dtype=_F64) ** 2
    return _finish(schedule, ts, t_start, t_end)


def karras(
    schedule: NoiseSchedule,
    steps: int,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Karras et al. (2022, eq. 5) spacing of :math:`\\sigma/\\alpha`:
    :math:`\\sigma_i = (\\sigma_{\\max}^{1/\\rho} + \\tfrac iN(\\sigma_{\\min}^{1/\\rho} -
    \\sigma_{\\max}^{1/\\rho}))^\\rho`."""
    _check_steps(steps)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    t_start, t_end = _range(schedule, t_start, t_end)
    if t_end == 0.0:
        raise ValueError(
            "karras: t_end must be > 0 (sigma_min = 0 has no rho-th root); use append_zero"
        )
    s_max = float(schedule.edm_sigma(t_start)) ** (1 / rho)
    s_min = float(schedule.edm_sigma(t_end)) ** (1 / rho)
    sig = torch.linspace(s_max, s_min, steps + 1, dtype=_F64) ** rho
    return _finish(schedule, schedule.t_of_edm_sigma(sig), t_start, t_end)


def time_shifted(
    schedule: NoiseSchedule,
    steps: int,
    t_start: float | None = None,
    t_end: float | None = None,
    shift: float | None = None,
) -> Tensor:
    r"""``steps`` steps uniform in ``u``, mapped by SD3's time shift (Esser et al. 2024, §5.3.2)
    :math:`t = s u / (1 + (s - 1) u)` (``shift`` :math:`s`; 1: time-uniform; default: the
    schedule's own ``shift`` where it has one, e.g. a diffusers flow model's, else 3). For
    rectified flow :math:`t = \sigma`, so this is diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=s)`` spacing; :math:`s > 1` spends more steps at
    high noise. Schedules whose time runs beyond 1 (EDM) are warped in :math:`t / t_{\max}`."""
    _check_steps(steps)
    if shift is None:
        shift = getattr(schedule, "shift", None) or 3.0
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t_start, t_end = _range(schedule, t_start, t_end)
    unit = max(1.0, schedule.t_max)  # the warp acts on t / unit in [0, 1] (EDM: t = σ ≤ 80)

    def inverse(t: float) -> float:  # u with shift(u) = t / unit
        return (t / unit) / (shift - (shift - 1) * (t / unit))

    u = torch.linspace(inverse(t_start), inverse(t_end), steps + 1, dtype=_F64)
    return _finish(schedule, unit * shift * u / (1 + (shift - 1) * u), t_start, t_end)


#: The shift of :func:`flow_shifted`, measured on ``digits-flow`` (BENCHMARKS.md §12):
#: DPM-Solver-v3 on it beat diffusers' best scheduler at every NFE 5–20 on two disjoint seed
#: sets. A fitted value, which ``digits-flow`` declares as its own ``shift``; a flow model
#: without one defaults to time-uniform (BENCHMARKS.md §14: this shift was 1.2-2x worse on
#: another flow model). Refit it for yours with
#: ``diffsolve bench --model M --solvers dpm-solver-v3@time_shifted`` or a tuned schedule.
FLOW_SHIFT = 0.7


def flow_shifted(
    schedule: NoiseSchedule, steps: int, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """:func:`time_shifted` with :data:`FLOW_SHIFT` (slightly more steps near the data
    than time-uniform)."""
    return time_shifted(schedule, steps, t_start, t_end, shift=FLOW_SHIFT)


#: Relative tolerance of :func:`custom` above ``t_max``: float32 round-off of a list that
#: starts at the schedule's end (diffusers' flow σ = 0.99900001 for ``t_max = 0.999``).
FLOAT32_ROUNDOFF = 4 * torch.finfo(torch.float32).eps


def custom(schedule: NoiseSchedule, ts: Sequence[float] | Tensor) -> Tensor:
    """A user's list of solver times, validated and converted to float64. Times above
    ``t_max`` by no more than float32 round-off (:data:`FLOAT32_ROUNDOFF`, relative) are
    ``t_max``: a list computed in float32 that starts at the schedule's end is accepted."""
    values = torch.as_tensor(ts, dtype=_F64).detach().cpu()
    t_max = schedule.t_max
    above = (values > t_max) & (values <= t_max * (1 + FLOAT32_ROUNDOFF))
    return validate_grid(schedule, torch.where(above, torch.full_like(values, t_max), values))


def append_zero(schedule: NoiseSchedule, grid: Tensor) -> Tensor:
    """Append the clean-data point ``t = 0``: the last step then returns :math:`\\hat x_0`."""
    return validate_grid(schedule, torch.cat([grid.to(_F64), torch.zeros(1, dtype=_F64)]))


def from_file(path: str, schedule: NoiseSchedule, fingerprint: str | None = None) -> Tensor:
    """The grid of a fitted step schedule file (``diffsolve tune``; see
    :class:`~diffsolve.ode.step_schedule.StepSchedule`), refused with a one-line error when
    it was fitted under another noise schedule or, ``fingerprint`` given, to another model."""
    from diffsolve.ode.step_schedule import StepSchedule

    return StepSchedule.load(path).grid(schedule, fingerprint)


#: Align Your Steps' published 10-step schedules (Sabour, Fidler & Kreis, ICML 2024, arXiv
#: 2404.14507, Table 3; also research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html):
#: the EDM / k-diffusion noise levels :math:`\sigma(t_{10}) > \dots > \sigma(t_0)`, with
#: :math:`\sigma = \sigma_t/\alpha_t` for VP models. SD 1.5 and SDXL (both the scaled-linear
#: betas 0.00085–0.012, whose :math:`\sigma` range is [0.0292, 14.6146]) and Stable Video
#: Diffusion (EDM, :math:`\sigma \in [0.002, 700]`).
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
#: The published values have three decimals: an end of a list within half a unit of the
#: schedule's :math:`\sigma` range is that range's end, rounded.
_AYS_ROUNDING = 5e-4


def _loglinear(values: Sequence[float], points: int) -> Tensor:
    """``points`` values log-linearly interpolated over a decreasing list placed uniformly on
    [0, 1] (AYS' rule for other step counts); the list itself at ``points = len(values)``."""
    logs = torch.log(torch.tensor(values, dtype=_F64))
    if points == 1:
        return logs[:1].exp()
    pos = torch.linspace(0, len(values) - 1, points, dtype=_F64)
    k = pos.floor().clamp(max=len(values) - 2).long()
    frac = pos - k
    out = torch.lerp(logs[k], logs[k + 1], frac).exp()
    exact = frac == 0  # grid points on a published value keep it bit for bit
    out[exact] = logs[k[exact]].exp()
    return out


def align_your_steps(
    schedule: NoiseSchedule,
    steps: int,
    model_kind: Literal["sd15", "sdxl", "svd"] = "sd15",
    end: Literal["zero", "replace", "sigma_min"] = "zero",
) -> Tensor:
    r"""Align Your Steps (Sabour, Fidler & Kreis 2024, arXiv 2404.14507): the published
    10-step noise levels :data:`AYS_SIGMAS` of ``model_kind`` as solver times of ``schedule``.

    Other step counts interpolate :math:`\log\sigma` linearly over the list placed uniformly
    on [0, 1] (the authors' how-to page and ComfyUI's ``AlignYourStepsScheduler``). The EDM
    level :math:`\sigma` maps to time through :math:`\lambda = -\log\sigma`
    (:meth:`~diffsolve.ode.schedule.NoiseSchedule.t_of_edm_sigma`; VP:
    :math:`\sigma_t = \sigma/\sqrt{1+\sigma^2}`). A list end within rounding
    (:data:`_AYS_ROUNDING`) of the schedule's range is put on that end; a list reaching
    above the schedule's largest :math:`\sigma` is refused (it belongs to another model).
    The lists are fitted per model: on another model they are only a heuristic.

    Args:
        schedule: The model's schedule.
        steps: Number of steps; the grid has ``steps + 1`` points.
        model_kind: ``"sd15"``, ``"sdxl"`` or ``"svd"``.
        end: How the :math:`\sigma = 0` end is handled. ``"zero"`` — as the registry's
            grids (:func:`diffsolve.solvers.registry.nfe_grid`): ``steps - 1`` steps over the
            published range (the list interpolated to ``steps`` levels, the last one
            evaluated) and a final step to ``t = 0``; ``steps = 11`` evaluates at exactly the
            published levels. ``"replace"`` — ComfyUI's and diffusers' documented use: the list
            interpolated to ``steps + 1`` levels and the last replaced by ``t = 0``.
            ``"sigma_min"`` — no zero: ``steps`` steps ending at the list's smallest level
            (the paper's table as a grid; ``steps = 10`` reproduces it).
    """
    _check_steps(steps)
    if model_kind not in AYS_SIGMAS:
        raise ValueError(f"model_kind must be one of {sorted(AYS_SIGMAS)}, got {model_kind!r}")
    if end not in ("zero", "replace", "sigma_min"):
        raise ValueError(f"end must be 'zero', 'replace' or 'sigma_min', got {end!r}")
    points = steps if end == "zero" else steps + 1
    sigmas = _loglinear(AYS_SIGMAS[model_kind], points)
    hi, lo = (float(schedule.edm_sigma(t)) for t in (schedule.t_max, schedule.default_range[1]))
    if float(sigmas[0]) > hi + _AYS_ROUNDING:
        raise ValueError(
            f"align_your_steps: the {model_kind!r} list starts at sigma = {float(sigmas[0]):g}, "
            f"above this schedule's largest sigma {hi:g}: it was fitted for another model"
        )
    ts = schedule.t_of_edm_sigma(sigmas)
    if float(sigmas[0]) >= hi - _AYS_ROUNDING:  # the published ends round the model's range
        ts[0] = schedule.t_max
    if abs(float(sigmas[-1]) - lo) <= _AYS_ROUNDING:
        ts[-1] = schedule.default_range[1]
    if end == "replace":
        ts[-1] = 0.0
    if end == "zero":
        ts = torch.cat([ts, torch.zeros(1, dtype=_F64)])
    return validate_grid(schedule, ts)


GRIDS: dict[str, Callable[..., Tensor]] = {
    "logsnr": logsnr_uniform,
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "karras": karras,
    "time_shifted": time_shifted,
    "flow_shifted": flow_shifted,
}


def make_grid(
    schedule: NoiseSchedule,
    steps: int,
    kind: str = "logsnr",
    t_start: float | None = None,
    t_end: float | None = None,
) -> Tensor:
    """Build a grid by name: one of ``logsnr``, ``time_uniform``, ``time_quadratic``,
    ``karras``."""
    if kind not in GRIDS:
        raise ValueError(f"grid kind must be one of {sorted(GRIDS)}, got {kind!r}")
    return GRIDS[kind](schedule, steps, t_start, t_end)


def _grid_times(grid: Sequence[float] | Tensor) -> Tensor:
    """A grid's times as a 1-D float64 CPU tensor; a clear ``ValueError`` for a name, a
    tensor of another shape or anything that is not numbers."""
    if isinstance(grid, str | bytes):
        raise ValueError(
            f"grid: got the string {grid!r}, not time points; build a named grid with "
            f"diffsolve.grids.make_grid(schedule, steps, {grid!r}) (kinds: "
            f"{', '.join(GRIDS)}), or pass the times as a 1-D tensor"
        )
    try:
        ts = grid.detach() if isinstance(grid, Tensor) else torch.as_tensor(grid, dtype=_F64)
        ts = ts.to("cpu", _F64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"grid: expected time points (a 1-D tensor or a list of numbers), got "
            f"{type(grid).__name__} ({str(err).splitlines()[0] if str(err) else err!r})"
        ) from None
    if ts.ndim != 1:
        raise ValueError(
            f"grid: expected a 1-D sequence of time points, got shape {tuple(ts.shape)}; "
            "pass one grid (e.g. grid.flatten() if that is what is meant)"
        )
    return ts


def validate_grid(
    schedule: NoiseSchedule, grid: Sequence[float] | Tensor, *, allow_increasing: bool = False
) -> Tensor:
    """Check a grid once and return it as a 1-D float64 CPU tensor.

    A valid grid has at least two points, is finite and strictly monotone (decreasing; also
    increasing when ``allow_increasing``, for inversion), lies in ``[0, t_max]`` and touches
    ``t = 0`` only as the final point of a decreasing grid.
    """
    ts = _grid_times(grid)
    if ts.numel() < 2:
        raise ValueError(f"grid: need at least 2 time points (1 step), got {ts.numel()}")
    if not torch.isfinite(ts).all():
        raise ValueError("grid: all time points must be finite")
    diffs = ts[1:] - ts[:-1]
    decreasing = bool((diffs < 0).all())
    increasing = bool((diffs > 0).all())
    if not decreasing and not (allow_increasing and increasing):
        if (diffs == 0).any():
            i = int((diffs == 0).nonzero()[0])
            raise ValueError(
                f"grid: duplicate time point t={float(ts[i])} at index {i}; "
                "grid times must be strictly monotone"
            )
        raise ValueError(
            "grid: time points must be strictly decreasing (noisy to clean)"
            + (" or strictly increasing" if allow_increasing else "")
        )
    t_max = schedule.t_max
    if float(ts.max()) > t_max * (1 + 1e-12) or float(ts.min()) < 0:
        raise ValueError(
            f"grid: time points must lie in [0, {t_max}] for {schedule!r}; "
            f"got range [{float(ts.min())}, {float(ts.max())}]"
        )
    zero = (ts == 0).nonzero().flatten().tolist()
    if zero and (not decreasing or zero != [ts.numel() - 1]):
        raise ValueError(
            "grid: t = 0 (clean data) is allowed only as the last point of a "
            "decreasing grid; the model cannot be evaluated there"
        )
    return ts
