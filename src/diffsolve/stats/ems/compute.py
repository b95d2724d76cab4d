r"""Estimating DPM-Solver-v3's empirical model statistics for any model (paper §3.1 and App.
C.1.1; the official repository never shipped a general tool).

On an ``N``-interval logSNR-uniform grid :math:`\lambda_0 < \dots < \lambda_N` and ``K`` data
points :math:`x_0^{(k)}`, at every :math:`\lambda_j` each data point is noised afresh,
:math:`x = \alpha x_0 + \sigma z`, and two Jacobian-vector products of the noise prediction
:math:`\epsilon_\theta(x, t)` are taken:

1. in ``x`` with a Rademacher probe ``v``: :math:`l = \mathbb E[\sigma (J v) \odot v]`, Bekas'
   estimator of :math:`\mathrm{diag}(\sigma\nabla_x\epsilon_\theta)`;
2. in ``(x, t)`` along the ODE, tangents :math:`dx/d\lambda = \frac{d\log\alpha}{d\lambda} x -
   \sigma\epsilon` and :math:`dt/d\lambda`: the total derivative :math:`\epsilon'`.

Per-dimension first and second moments of :math:`e = e^{-\lambda}\epsilon`,
:math:`w = e - x/\alpha` (minus the data prediction) and :math:`d = e^{-\lambda}\epsilon'` are
accumulated in float64. Afterwards :math:`l'` comes from finite differences smoothed over ±5
grid points, and :math:`f = e - l x/\alpha = (1-l)e + l w` and
:math:`f' = e^{-\lambda}((l-1)\epsilon + \epsilon') - l' x/\alpha = (l-1-l')e + l' w + d` are
affine in the accumulated quantities with bounded weights (:math:`e` and :math:`x/\alpha`
themselves cancel to about five digits at high noise, :math:`w` and :math:`x/\alpha` at low
noise); the least-squares fit gives :math:`s = \mathrm{Cov}(f, f')/\mathrm{Var}(f)` and
:math:`b = \mathbb E f' - s\,\mathbb E f`.

The JVPs are taken by the first derivative path the network supports (:mod:`.derivatives`:
forward-mode AD, the same with math attention, double backward, finite differences); the
path is reported and recorded in the metadata (``"derivative"``). Noise and probes
are drawn from one generator per (grid point, sample), so the result does not depend on the
batch size nor on how samples are sharded over ``torch.distributed`` ranks (their sums are
all-reduced). A checkpoint file makes an interrupted run resumable.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.stats.ems.derivatives import JVP, JVPMode, describe
from diffsolve.stats.ems.memory import auto_batch_size
from diffsolve.stats.ems.smoothing import local_polynomial, smooth
from diffsolve.stats.ems.statistics import EMS, make_metadata, model_fingerprint

_F64 = torch.float64
# per sample: e = e^{-lambda} eps, w = e - x/alpha = -x0_pred, d = e^{-lambda} eps'
MOMENTS = ("l", "e", "w", "d", "ee", "ew", "ed", "ww", "wd", "dd")


@dataclass
class _Grid:
    lambdas: Tensor
    times: Tensor
    alpha: Tensor
    sigma: Tensor
    dlog_alpha: Tensor  # d log(alpha) / d lambda
    dt: Tensor  # d t / d lambda


def ems_grid(schedule: NoiseSchedule, n: int, t_start: float, t_end: float) -> _Grid:
    """The logSNR-uniform EMS grid (increasing λ) with the ODE's tangents at each point."""
    lambdas = torch.linspace(
        float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end)), n + 1, dtype=_F64
    )
    times = schedule.t_of_lambda(lambdas)
    times[0], times[-1] = t_start, t_end
    alpha, sigma, dlog_alpha, dt = [], [], [], []
    for t in times.tolist():
        tt = torch.tensor(t, dtype=_F64, requires_grad=True)
        log_alpha, log_sigma = schedule.log_alpha_sigma(tt)
        lam = log_alpha - log_sigma
        dlam_dt = torch.autograd.grad(lam, tt, retain_graph=True)[0]
        dlog_alpha_dt = (
            torch.autograd.grad(log_alpha, tt)[0]
            if log_alpha.requires_grad
            else torch.zeros((), dtype=_F64)
        )
        alpha.append(float(torch.exp(log_alpha.detach())))
        sigma.append(float(torch.exp(log_sigma.detach())))
        dt.append(1.0 / float(dlam_dt))
        dlog_alpha.append(float(dlog_alpha_dt) / float(dlam_dt))
    as64 = lambda v: torch.tensor(v, dtype=_F64)  # noqa: E731
    return _Grid(lambdas, times, as64(alpha), as64(sigma), as64(dlog_alpha), as64(dt))


BLOCK = 32  # samples per noise block: the unit of randomness and of sharding


def _seed(seed: int, j: int, block: int) -> int:
    key = f"{seed}:{j}:{block}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _noise(seed: int, j: int, indices: list[int], shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Noise ``z`` and Rademacher probes ``v`` of samples ``indices`` at grid point ``j``: one
    generator per block of :data:`BLOCK` samples, so a sample's draws depend only on
    ``(seed, j, k)``."""
    z, v = [], []
    blocks: dict[int, tuple[Tensor, Tensor]] = {}
    for k in indices:
        q, r = divmod(k, BLOCK)
        if q not in blocks:
            g = torch.Generator().manual_seed(_seed(seed, j, q))
            blocks[q] = (
                torch.randn((BLOCK, *shape), generator=g),
                torch.randint(0, 2, (BLOCK, *shape), generator=g).float() * 2 - 1,
            )
        z.append(blocks[q][0][r])
        v.append(blocks[q][1][r])
    return torch.stack(z), torch.stack(v)


def _accumulate(
    jvp: JVP,
    grid: _Grid,
    j: int,
    x0: Tensor,
    indices: list[int],
    seed: int,
    device: str,
) -> dict[str, Tensor]:
    """Sums over a batch of the moments at grid point ``j``."""
    shape = tuple(x0.shape[1:])
    z, v = _noise(seed, j, indices, shape)
    z, v = z.to(device, x0.dtype), v.to(device, x0.dtype)
    a, s = float(grid.alpha[j]), float(grid.sigma[j])
    x = a * x0 + s * z
    t = grid.times[j].clone()
    eps, jv = jvp(x, t, v, torch.zeros((), dtype=_F64))
    tx = float(grid.dlog_alpha[j]) * x - s * eps
    _, deps = jvp(x, t, tx, grid.dt[j].clone())
    # f = e - l x/alpha = (1 - l) e + l w with w = e - x/alpha: both weights lie in [0, 1],
    # so f never comes from two large terms that cancel (e and x/alpha do, at high noise)
    scale = math.exp(-float(grid.lambdas[j]))
    e = scale * eps.double()
    w = e - x.double() / a
    d = scale * deps.double()
    return {
        "l": (s * jv.double() * v.double()).sum(0),
        "e": e.sum(0),
        "w": w.sum(0),
        "d": d.sum(0),
        "ee": (e * e).sum(0),
        "ew": (e * w).sum(0),
        "ed": (e * d).sum(0),
        "ww": (w * w).sum(0),
        "wd": (w * d).sum(0),
        "dd": (d * d).sum(0),
    }


def moving_average(values: Tensor, window: int) -> Tensor:
    """Mean over ±``window`` points along axis 0 (truncated at the edges)."""
    if window <= 0:
        return values
    padded = torch.cumsum(torch.cat([torch.zeros_like(values[:1]), values]), 0)
    n = values.shape[0]
    lo = torch.clamp(torch.arange(n) - window, min=0)
    hi = torch.clamp(torch.arange(n) + window + 1, max=n)
    counts = (hi - lo).reshape(-1, *([1] * (values.ndim - 1))).to(values.dtype)
    return (padded[hi] - padded[lo]) / counts


def smoothed_derivative(values: Tensor, lambdas: Tensor, window: int = 5) -> Tensor:
    """Finite-difference derivative along axis 0 (central inside, one-sided at the ends),
    smoothed by a moving average over ±``window`` points (truncated at the edges)."""
    grad = torch.gradient(values, spacing=(lambdas,), dim=0, edge_order=1)[0]
    return moving_average(grad, window)


#: Default smoothing bandwidth in λ (:func:`finalize`), chosen on ``digits`` (BENCHMARKS.md
#: §11). A grid coarser than ``bandwidth / MIN_SPACINGS`` cannot resolve it and is
#: not smoothed (:func:`effective_bandwidth`).
BANDWIDTH = 0.2
MIN_SPACINGS = 2.0
#: The recommended estimation: a fine grid with few samples per point, smoothed — a tenth
#: of the official recipe's K·N (256 × 1201) for the same DPM-Solver-v3 accuracy.
RECIPE = {"grid_size": 1200, "samples": 24, "bandwidth": BANDWIDTH}


def effective_bandwidth(bandwidth: float, lambdas: Tensor) -> float:
    """``bandwidth`` if the grid ``lambdas`` resolves it (at least :data:`MIN_SPACINGS`
    spacings), else 0: the per-point estimator."""
    spacing = abs(float(lambdas[-1] - lambdas[0])) / max(lambdas.numel() - 1, 1)
    return float(bandwidth) if bandwidth >= MIN_SPACINGS * spacing else 0.0


def finalize(
    sums: dict[str, Tensor],
    count: int,
    grid: _Grid,
    window: int = 5,
    l_window: int = 0,
    bandwidth: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Turn moment sums ``(N+1, *shape)`` over ``count`` samples into ``(l, s, b)``.

    With ``bandwidth > 0`` (and a grid that resolves it, :func:`effective_bandwidth`) the
    estimates are smoothed in λ with kernels of that bandwidth (:mod:`.smoothing`): first
    :math:`l`, by a
    local quadratic regression whose fit also gives :math:`l'`; then the per-point
    :math:`\mathbb E f`, :math:`\mathbb E f'`, :math:`\mathrm{Var} f` and
    :math:`\mathrm{Cov}(f, f')` (scaled by :math:`e^{\lambda}` per power of :math:`f`), by
    a kernel average with positive weights (so the variance stays positive), before the ratio
    :math:`s = \mathrm{Cov}/\mathrm{Var}` — a ratio of pooled moments, not a mean of noisy
    per-point ratios. Otherwise (the paper's estimator) each point stands alone,
    :math:`l'` is a finite difference smoothed over ±``window`` points and ``l_window > 0``
    smooths ``l`` itself over ±``l_window`` points."""
    m = {k: v / count for k, v in sums.items()}
    lambdas = grid.lambdas
    bandwidth = effective_bandwidth(bandwidth, lambdas)
    if bandwidth > 0:
        value, slope = local_polynomial(lambdas, lambdas, bandwidth)
        l, dl = smooth(m["l"], value), smooth(m["l"], slope)
    else:
        l = moving_average(m["l"], l_window)
        dl = smoothed_derivative(l, lambdas, window)
    # f = A e + B w,  f' = e^{-lam}((l-1) eps + eps') - l' x/alpha = C e + D w + d
    big_a, big_b, big_c, big_d = 1 - l, l, l - 1 - dl, dl
    mean_f = big_a * m["e"] + big_b * m["w"]
    mean_df = big_c * m["e"] + big_d * m["w"] + m["d"]
    ff = big_a**2 * m["ee"] + 2 * big_a * big_b * m["ew"] + big_b**2 * m["ww"]
    fdf = (
        big_a * big_c * m["ee"]
        + (big_a * big_d + big_b * big_c) * m["ew"]
        + big_a * m["ed"]
        + big_b * big_d * m["ww"]
        + big_b * m["wd"]
    )
    var = ff - mean_f**2
    cov = fdf - mean_f * mean_df
    if bandwidth > 0:  # positive weights: pooled variances stay positive
        average, _ = local_polynomial(lambdas, lambdas, bandwidth, degree=0)
        unit = torch.exp(lambdas).reshape(-1, *([1] * (l.ndim - 1)))  # f, f' ~ e^{-lambda}
        mean_f, mean_df = (smooth(v * unit, average) / unit for v in (mean_f, mean_df))
        var, cov = (smooth(v * unit**2, average) / unit**2 for v in (var, cov))
    tiny = 1e-12 * torch.clamp(ff, min=1e-300)
    s = torch.where(
        var > tiny, cov / torch.where(var > tiny, var, torch.ones_like(var)), torch.zeros_like(var)
    )
    b = mean_df - s * mean_f
    return l, s, b


def compute_ems(
    model: object,
    data: Tensor,
    *,
    samples: int | None = RECIPE["samples"],
    grid_size: int = RECIPE["grid_size"],
    t_start: float | None = None,
    t_end: float | None = None,
    seed: int = 0,
    batch_size: int | Literal["auto"] = 256,
    memory_budget: int | None = None,
    window: int | None = None,
    l_window: int = 0,
    bandwidth: float | None = None,
    jvp: JVPMode = "auto",
    checkpoint: str | Path | None = None,
    progress: bool = False,
    device: str = "cpu",
    model_name: str | None = None,
    conditioning: Mapping[str, Tensor] | None = None,
    guidance: Mapping[str, Any] | None = None,
) -> EMS:
    r"""Estimate the EMS of ``model`` from ``data`` (the K points :math:`x_0`).

    Args:
        model: A denoiser with ``differentiable_eps(x, t)`` and ``schedule`` (a
            :class:`~diffsolve.ModelWrapper` or an analytic model's denoiser).
        data: Data points ``(M, *shape)`` in the model's input space (training data, or
            model samples); sample ``k`` at grid point ``j`` uses ``data[(k + j K) % M]``:
            the grid points rotate through the data, so every point of it is used even
            with few samples per point (and neighbouring points, pooled by the smoothing,
            see different data).
        samples: ``K``, samples per grid point (default: :data:`RECIPE`'s 24 — with the
            smoothing, more buys little; ``None``: as many as ``data`` has points).
        grid_size: ``N``, intervals of the logSNR-uniform grid (default 1200, as the
            official code: the grid must resolve how the network varies between its
            training timesteps, see :mod:`.smoothing`).
        t_start, t_end: Time range (default: the schedule's ``default_range``).
        seed: Seed of the noise and the probes.
        batch_size: Samples per JVP batch (memory only: results do not depend on it), or
            ``"auto"``: sized from the peak memory of probe batches on CUDA, 32 on CPU
            (:mod:`.memory`).
        memory_budget: Bytes a batch may use with ``batch_size="auto"`` (CUDA only;
            default 90% of the memory the device has available).
        window: Half-width of the moving average smoothing :math:`l'` (official: 5 points on
            N = 1200); default ``round(5 N / 1200)``, the same width in λ.
        l_window: Half-width of a moving average of :math:`l` itself (0: none, as the paper).
            At high noise :math:`f` is :math:`e^{-\lambda}`-sensitive to errors in ``l``.
            ``window`` and ``l_window`` apply only without smoothing (``bandwidth=0``).
        bandwidth: Smooth every moment in λ by a local quadratic regression of this
            bandwidth (:func:`finalize`, :mod:`.smoothing`); default :data:`BANDWIDTH` (0.2);
            a grid that cannot resolve the bandwidth is a ``ValueError`` before any
            evaluation (never a silent fall-back to per-point statistics); 0 for the paper's
            per-point estimator. Smoothing lets a fine grid with few
            samples per point replace many samples per point: the recommended recipe
            (:data:`RECIPE`) is N = 1200 with K = 24, a tenth of the official K·N.
        jvp: How the JVPs are taken: ``"auto"`` (the first of the paths below that works
            on the first batch), ``"forward"`` (``torch.func.jvp``),
            ``"forward_math_attention"`` (the same with ``scaled_dot_product_attention`` on
            its math backend, e.g. for attention models on CPU), ``"double_backward"``
            (``torch.autograd.functional.jvp``) or ``"finite_difference"`` (forward passes
            only); see :mod:`.derivatives`. The network may run in float16/bfloat16
            (:meth:`~diffsolve.ModelWrapper.network_dtype`): its inputs are cast to it,
            the statistics are accumulated in float64.
        checkpoint: A file to save progress to; a rerun from the same inputs resumes. The
            file records a fingerprint of every input that determines the result (the data's
            bytes, ``K``, ``N``, seed, time range, windows, conditioning, the model's and the
            schedule's fingerprints, the number of processes): a checkpoint made from other
            inputs is refused with a ``ValueError`` naming them (delete it to start over),
            and an existing file that is not a diffsolve EMS checkpoint is refused and never
            touched.
        progress: Show a progress bar and one line naming the derivative path and the
            batch size (rank 0).
        device: Device for the model evaluations.
        model_name: Recorded in the metadata.
        conditioning: Network keyword arguments per data point, each ``(M, ...)`` — e.g.
            ``{"class_labels": labels}`` estimates the EMS of a class-conditional model
            under its data's own labels (``model`` must have ``with_kwargs``, as
            :class:`~diffsolve.ModelWrapper`).
        guidance: How ``model`` is guided, recorded in the metadata and the checkpoint
            (``{"method": "cfg", "scale": 7.5}``; default: unguided): the statistics move
            with the guidance scale (BENCHMARKS.md §11), and a guided model has the
            unguided one's weights, so the fingerprint alone cannot tell them apart.

    With ``torch.distributed`` initialised, every rank takes its share of the K samples and
    the sums are all-reduced; all ranks return the same statistics.
    """
    schedule, t_start, t_end = _check_model_and_range(model, t_start, t_end)
    k_total = _check_data(data, samples, grid_size)
    conditioning = _check_conditioning(model, data, conditioning)
    window = round(5 * grid_size / 1200) if window is None else int(window)
    rank, world = _dist_info()
    fingerprint = model_fingerprint(model)
    dtype = data.dtype if data.dtype in (torch.float32, torch.float64) else torch.float32
    guidance = dict(guidance or NO_GUIDANCE)
    inputs = {
        "data": tensor_digest(data.to(dtype)),
        **{"K": k_total, "N": grid_size, "seed": seed, "t_start": t_start, "t_end": t_end},
        **{"window": window, "l_window": l_window, "guidance": guidance},
        "conditioning": {key: tensor_digest(v) for key, v in sorted(conditioning.items())},
        **{"model": fingerprint, "schedule": schedule.fingerprint(), "world": world},
        **{"rank": rank, "shape": list(data.shape[1:])},
        "data_order": "rotating",  # sample k at point j noises data[(k + j K) mod M]
    }
    report = _reporter(progress and rank == 0)
    run = _Run(
        model,
        _make_jvp(model, jvp, schedule, report),
        ems_grid(schedule, grid_size, t_start, t_end),
        data.to(device=device, dtype=dtype),
        conditioning,
        [k for k in range(k_total) if (k // BLOCK) % world == rank],
        seed,
        batch_size if isinstance(batch_size, int) else 1,
        device,
        stride=k_total,
    )
    bandwidth = _bandwidth(bandwidth, run.grid.lambdas)  # checked before any evaluation
    _check_fractional_time(model, data, schedule, jvp, device, conditioning)
    run.batch_size = _batch_size(run, batch_size, memory_budget, report)
    sums = _all_reduce(
        run.all_points(_Checkpoint(checkpoint, inputs, rank), progress and rank == 0)
    )
    l, s, b = finalize(sums, k_total, run.grid, window, l_window, bandwidth)
    meta = make_metadata(
        schedule,
        t_start,
        t_end,
        tuple(data.shape[1:]),
        k_total,
        fingerprint,
        description=_description(k_total, grid_size, bandwidth, conditioning),
        grid_size=grid_size,
        seed=seed,
        window=window,
        bandwidth=bandwidth,
        model_name=model_name,
        derivative=run.jvp.path or "unknown: every point came from the checkpoint",
        guidance=guidance,
    )
    return EMS(run.grid.lambdas, l, s, b, meta)


def check_recipe(
    model: object,
    grid_size: int,
    bandwidth: float | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
) -> float:
    """The smoothing bandwidth :func:`compute_ems` will use for these settings, checked
    without evaluating the model (a ``ValueError`` for a grid too coarse for it): what a
    caller runs before anything costly, e.g. the cost projection."""
    schedule, t_start, t_end = _check_model_and_range(model, t_start, t_end)
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    return _bandwidth(bandwidth, ems_grid(schedule, grid_size, t_start, t_end).lambdas)


def _bandwidth(requested: float | None, lambdas: Tensor) -> float:
    """The smoothing bandwidth used: the recipe's (:data:`BANDWIDTH`) by default, or the one
    requested; a grid too coarse to resolve it is refused before any evaluation, never
    silently estimated per point (v3 is then far worse, with no sign of it)."""
    bandwidth = BANDWIDTH if requested is None else requested
    if not 0 <= bandwidth < math.inf:
        raise ValueError(
            f"bandwidth must be a finite number >= 0 (0: the paper's per-point estimator), "
            f"got {requested!r}"
        )
    if bandwidth > 0 and not effective_bandwidth(bandwidth, lambdas):
        span = abs(float(lambdas[-1] - lambdas[0]))
        needed = math.ceil(MIN_SPACINGS * span / bandwidth)
        which = "the recipe's smoothing bandwidth" if requested is None else "bandwidth"
        raise ValueError(
            f"grid_size {lambdas.numel() - 1} is too coarse for {which} {bandwidth:g} in λ: "
            f"it needs at least {needed} intervals over this range ({span:.3g} in λ); use "
            f"grid_size {max(needed, RECIPE['grid_size'])} (the recipe: "
            f"{RECIPE['grid_size']}), or bandwidth=0 (the per-point estimator, which needs "
            "about 10x the samples)"
        )
    return float(bandwidth)


def _all_reduce(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """The moment sums of every rank (in place; a single process keeps its own)."""
    if _dist_info()[1] > 1:
        import torch.distributed as dist

        for key in MOMENTS:
            dist.all_reduce(sums[key])
    return sums


def _description(k: int, n: int, bandwidth: float, conditioning: Mapping[str, Tensor]) -> str:
    text = f"DPM-Solver-v3 EMS estimated by diffsolve (K={k}, N={n}"
    text += f", smoothed in λ, bandwidth {bandwidth:g})" if bandwidth else ")"
    if conditioning:
        text += f", conditioned on the data's {', '.join(sorted(conditioning))}"
    return text


def _make_jvp(
    model: Any, mode: JVPMode, schedule: NoiseSchedule, report: Callable[[str], None]
) -> JVP:
    """The JVPs of ``model``'s noise prediction by ``mode`` (:mod:`.derivatives`), finite
    differences stepped for its network's dtype, the path ``"auto"`` takes reported."""
    return JVP(
        model.differentiable_eps,
        mode,
        precision=getattr(model, "network_dtype", None),
        t_max=schedule.t_bound,
        t_step=getattr(model, "network_time_unit", None),
        on_select=lambda path, failed: report(f"EMS derivatives: {describe(path, failed)}"),
    )


def _check_fractional_time(
    model: object,
    data: Tensor,
    schedule: NoiseSchedule,
    jvp: str,
    device: str,
    conditioning: Mapping[str, Tensor],
) -> None:
    """Refuse a network that ignores fractional time (its forward-mode time derivative is
    zero: the statistics would be wrong without a word), unless its time derivative is taken
    across training steps (``jvp="step_difference"``)."""
    if not hasattr(model, "ignores_fractional_time") or jvp == "step_difference":
        return
    if conditioning:  # the first points under their own conditioning
        model = model.with_kwargs(**{k: v[:4].to(device) for k, v in conditioning.items()})  # type: ignore[attr-defined]
    probe = model.ignores_fractional_time  # type: ignore[attr-defined]
    t = float(schedule.t_of_lambda(torch.tensor(0.0)))
    x = data[:4].to(device=device, dtype=torch.float32)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    if probe(float(schedule.alpha(t)) * x + float(schedule.sigma(t)) * noise):
        raise ValueError(
            "the network ignores fractional time (its time embedding truncates t to an "
            "integer, e.g. t.long() or an nn.Embedding): its time derivative by autograd is "
            "zero and the statistics would be wrong. Make it embed the real-valued t (a "
            "sinusoidal embedding works on floats: drop the cast), or estimate the time "
            "derivative across training steps with jvp='step_difference' (--jvp "
            "step_difference)"
        )


def _batch_size(
    run: _Run,
    batch_size: int | Literal["auto"],
    memory_budget: int | None,
    report: Callable[[str], None],
) -> int:
    """The batch size, checked; ``"auto"``: sized by probe batches (:mod:`.memory`)."""
    if batch_size == "auto":
        plan = auto_batch_size(
            lambda n: replace(run, mine=run.mine[:n], batch_size=n).point(0),
            len(run.mine),
            run.device,
            memory_budget,
        )
        report(f"EMS {plan.describe()}")
        return plan.batch_size
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


#: The ``guidance`` an EMS records when its model was not guided.
NO_GUIDANCE: dict[str, Any] = {"method": "none", "scale": 1.0}

#: Where EMS of a schedule that starts at pure noise begin by default:
#: :math:`\lambda = \log\frac{1-t}{t} \approx -6.9`, rectified flow's own clip.
FLOW_T_START = 1.0 - 1e-3


def _check_model_and_range(
    model: object, t_start: float | None, t_end: float | None
) -> tuple[NoiseSchedule, float, float]:
    """The model's schedule and the time range, checked. Default: the schedule's; where it
    starts at pure noise (flow matching up to ``t = 1``, λ = −∞), from
    :data:`FLOW_T_START` (rectified flow's own clip): v3's first step from pure noise needs
    no statistics."""
    if not hasattr(model, "differentiable_eps"):
        raise ValueError(
            f"{type(model).__name__} cannot be differentiated in (x, t); wrap the "
            "network in diffsolve.ModelWrapper"
        )
    schedule: NoiseSchedule = model.schedule  # type: ignore[attr-defined]
    default_start, default_end = schedule.default_range
    if default_start > schedule.t_bound:
        default_start = FLOW_T_START
    t_start = default_start if t_start is None else float(t_start)
    t_end = default_end if t_end is None else float(t_end)
    if not 0 < t_end < t_start <= schedule.t_bound:
        raise ValueError(
            f"need 0 < t_end < t_start <= {schedule.t_bound}; got t_start={t_start}, t_end={t_end}"
        )
    return schedule, t_start, t_end


def _check_data(data: Tensor, samples: int | None, grid_size: int) -> int:
    """``K``, after checking the data and the grid size."""
    if data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must have shape (M, *sample_shape), got {tuple(data.shape)}")
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    k_total = samples or data.shape[0]
    if k_total < 2:
        raise ValueError(f"samples must be >= 2, got {k_total}")
    return k_total


def _check_conditioning(
    model: object, data: Tensor, conditioning: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Per-data-point network arguments, one entry per data point."""
    conditioning = dict(conditioning or {})
    for key, value in conditioning.items():
        if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] != data.shape[0]:
            raise ValueError(
                f"conditioning[{key!r}] must be a tensor with one entry per data point "
                f"({data.shape[0]}), got {getattr(value, 'shape', type(value).__name__)}"
            )
    if conditioning and not hasattr(model, "with_kwargs"):
        raise ValueError(
            f"conditioning needs a model with with_kwargs (diffsolve.ModelWrapper), got "
            f"{type(model).__name__}"
        )
    return conditioning


@dataclass
class _Checkpoint:
    """Where a run saves its progress (``None``: nowhere) and what it must match to resume."""

    path: str | Path | None
    inputs: dict
    rank: int

    def load(self) -> tuple[dict[str, Tensor], set[int]]:
        """The progress saved from these inputs (none if there is no file yet)."""
        if self.path is None:
            return {}, set()
        return _load_checkpoint(_checkpoint_path(self.path, self.rank), self.inputs)

    def save(self, sums: dict[str, Tensor], done: set[int]) -> None:
        if self.path is not None:
            _save_checkpoint(_checkpoint_path(self.path, self.rank), self.inputs, sums, done)


@dataclass
class _Run:
    """One estimation on this process: the model, the grid, this rank's samples."""

    model: Any
    jvp: JVP
    grid: _Grid
    data: Tensor
    conditioning: dict[str, Tensor]
    mine: list[int]
    seed: int
    batch_size: int
    device: str
    stride: int

    def point(self, j: int) -> dict[str, Tensor]:
        """Moment sums over this rank's samples at grid point ``j``: sample ``k`` noises data
        point ``(k + j·stride) mod M``, so with ``stride = K`` consecutive grid points take
        consecutive data points and all of ``data`` is used however small K is."""
        totals: dict[str, Tensor] = {}
        for start in range(0, len(self.mine), self.batch_size):
            chunk = self.mine[start : start + self.batch_size]
            rows = torch.tensor([(k + j * self.stride) % self.data.shape[0] for k in chunk])
            if self.conditioning:  # the network sees each data point's own conditioning
                kwargs = {
                    key: value[rows].to(self.device) for key, value in self.conditioning.items()
                }
                self.jvp.fn = self.model.with_kwargs(**kwargs).differentiable_eps
            part = _accumulate(
                self.jvp, self.grid, j, self.data[rows], chunk, self.seed, self.device
            )
            totals = {k: totals.get(k, 0) + v.cpu() for k, v in part.items()}
        if not totals:  # a rank with no samples
            totals = {k: torch.zeros(self.data.shape[1:], dtype=_F64) for k in MOMENTS}
        return totals

    def all_points(self, checkpoint: _Checkpoint, progress: bool) -> dict[str, Tensor]:
        """Moment sums ``(N+1, *shape)`` at every grid point, resumed from and saved to
        ``checkpoint`` (every 30 s and at the end)."""
        sums, done = checkpoint.load()
        n = self.grid.lambdas.numel()
        bar = _bar(progress, n, done)
        last_save = time.monotonic()
        for j in (j for j in range(n) if j not in done):
            totals = self.point(j)
            for key in MOMENTS:
                sums.setdefault(key, torch.zeros((n, *self.data.shape[1:]), dtype=_F64))
                sums[key][j] = totals[key]
            done.add(j)
            if bar is not None:
                bar.update(1)
            if time.monotonic() - last_save > 30:
                checkpoint.save(sums, done)
                last_save = time.monotonic()
        if bar is not None:
            bar.close()
        checkpoint.save(sums, done)
        return sums


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reporter(enabled: bool) -> Callable[[str], None]:
    """Where one-line progress messages go: the progress output (tqdm's ``write``, which
    keeps a bar intact) when enabled, else the ``diffsolve.ems`` logger."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm.write
    import logging

    return logging.getLogger("diffsolve.ems").info


def _bar(enabled: bool, total: int, done: set[int]):  # noqa: ANN202 - tqdm type
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=len(done), desc="EMS", unit="λ")


def checkpoint_files(path: str | Path, world_size: int = 1) -> list[Path]:
    """The files of a checkpoint written by ``world_size`` processes (rank ``r > 0`` adds
    ``.rank<r>`` to the name)."""
    return [_checkpoint_path(path, rank) for rank in range(world_size)]


def _checkpoint_path(path: str | Path, rank: int) -> Path:
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")


#: ``format`` metadata of a checkpoint file (older diffsolve checkpoints have none).
CHECKPOINT_FORMAT = "diffsolve-ems-checkpoint"
#: How the error names each recorded input.
_INPUT_NAMES = {
    "data": "data (the bytes of the data tensor)",
    "K": "K (samples)",
    "N": "N (grid_size)",
    "conditioning": "labels/conditioning",
    "model": "model (weights fingerprint)",
    "schedule": "noise schedule",
    "world": "number of processes",
    "shape": "data shape",
}


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's dtype, shape and bytes."""
    value = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{value.dtype}:{list(value.shape)}".encode())
    digest.update(value.flatten().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _save_checkpoint(target: Path, inputs: dict, sums: dict[str, Tensor], done: set[int]) -> None:
    """Write the checkpoint atomically (:func:`diffsolve.numerics.files.atomic_path`), never
    over a file that is not one."""
    from safetensors.torch import save_file

    from diffsolve.numerics.files import atomic_path

    if target.exists():
        _read_checkpoint(target, arrays=False)  # raises if it is not a diffsolve checkpoint
    meta = {
        "format": CHECKPOINT_FORMAT,
        "settings": json.dumps(inputs, sort_keys=True),
        "done": json.dumps(sorted(done)),
    }
    tensors = {k: v.contiguous() for k, v in sums.items()} or {"empty": torch.zeros(1)}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _read_checkpoint(
    target: Path, arrays: bool = True
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and (with ``arrays``) moment sums of a checkpoint file; a ``ValueError``
    naming the path when it is not a diffsolve EMS checkpoint (the file is left untouched)."""
    from safetensors import safe_open

    refuse = (
        f"the checkpoint path {target} holds a file that is not a diffsolve EMS checkpoint "
        "({}); it is left untouched: pass another checkpoint path"
    )
    if not target.is_file():
        raise ValueError(refuse.format("not a regular file"))
    try:
        with safe_open(str(target), framework="pt") as handle:
            meta = handle.metadata() or {}
            names = [k for k in handle.keys() if k in MOMENTS] if arrays else []  # noqa: SIM118
            sums = {k: handle.get_tensor(k) for k in names}
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(refuse.format(f"unreadable as safetensors: {reason}")) from None
    if meta.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT or not {
        "settings",
        "done",
    } <= set(meta):
        raise ValueError(refuse.format("no diffsolve checkpoint metadata"))
    return meta, sums


def _load_checkpoint(target: Path, inputs: dict) -> tuple[dict[str, Tensor], set[int]]:
    """The moment sums and finished grid points saved from ``inputs``."""
    if not target.exists():
        return {}, set()
    meta, sums = _read_checkpoint(target)
    try:
        saved = json.loads(meta["settings"])
        done = {int(j) for j in json.loads(meta["done"])}
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"the EMS checkpoint {target} has corrupt metadata ({err}); delete it to start over"
        ) from None
    now = json.loads(json.dumps(inputs, sort_keys=True))
    if saved != now:
        raise ValueError(
            f"the EMS checkpoint {target} was made from other inputs: "
            f"{_differences(saved, now)}; delete it to start over (or pass another checkpoint "
            "path)"
        )
    if done and len(sums) != len(MOMENTS):
        return {}, set()
    return sums, done


def _differences(saved: Any, now: dict) -> str:
    """Which inputs differ, e.g. ``seed (0 in the checkpoint, 1 now), data ... differs``."""
    saved = saved if isinstance(saved, dict) else {}
    parts = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        name = _INPUT_NAMES.get(key, key)
        if isinstance(new, (int, float)) and isinstance(old, (int, float, type(None))):
            parts.append(f"{name} ({old} in the checkpoint, {new} now)")
        else:
            parts.append(f"{name} differs")
    return ", ".join(parts)


__all__ = [
    "checkpoint_files",
    "compute_ems",
    "ems_grid",
    "finalize",
    "moving_average",
    "smoothed_derivative",
    "tensor_digest",
]
