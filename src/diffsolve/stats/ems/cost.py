r"""What an EMS estimation will cost, projected before it starts.

An estimation evaluates ``points × samples × jvps_per_sample`` Jacobian-vector products of the
noise prediction, one sample each (today :func:`~diffsolve.stats.ems.compute.compute_ems` takes
two per sample at every λ point: one in ``x`` with a Rademacher probe for :math:`l`, one along
the ODE for :math:`\epsilon'`). :func:`project_cost` times the real estimation —
:func:`~diffsolve.stats.ems.compute.compute_ems` itself, on a two-interval grid and a few
samples, on the run's device — and multiplies. The projection only counts; the recipe
(how many points, samples per point, JVPs per sample) is its arguments, so another recipe is
projected by the same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

#: JVPs per sample at each λ point in today's recipe (``compute._accumulate``: probe and ODE).
JVPS_PER_SAMPLE = 2
#: Intervals of the calibration runs' grid (``compute_ems``: ``grid_size + 1`` λ points).
_CALIBRATION_GRID = 2
#: Largest calibration batch when the run sizes its batches itself (``batch_size="auto"``).
_AUTO_BATCH_CAP = 256


@dataclass(frozen=True)
class EMSCost:
    """The projected cost of one EMS estimation.

    Attributes:
        points: λ points of the grid (``N + 1`` today).
        samples: Samples per λ point (``K`` today).
        jvps_per_sample: JVPs per sample at each point.
        seconds_per_batch: Calibrated wall time of one JVP over ``batch_size`` samples,
            everything of the estimation included (noise, moments), on ``device``.
        batch_size: Samples per JVP in the calibration.
        device: Where it was calibrated.
        processes: Processes sharing the samples (torchrun ranks).
        forward_ratio: One JVP-sample's cost in plain forward passes of one sample, measured at
            the same batch (``None``: not measured).
    """

    points: int
    samples: int
    jvps_per_sample: int
    seconds_per_batch: float
    batch_size: int
    device: str = "cpu"
    processes: int = 1
    forward_ratio: float | None = None

    @property
    def total_jvps(self) -> int:
        """JVPs of one sample each, over all processes."""
        return self.points * self.samples * self.jvps_per_sample

    @property
    def seconds_per_jvp(self) -> float:
        """Calibrated seconds per JVP of one sample."""
        return self.seconds_per_batch / self.batch_size

    @property
    def forward_equivalents(self) -> float | None:
        """:attr:`total_jvps` in plain forward passes of one sample."""
        return None if self.forward_ratio is None else self.total_jvps * self.forward_ratio

    @property
    def seconds(self) -> float:
        """Projected wall time (each process takes its share of the samples)."""
        return self.total_jvps * self.seconds_per_jvp / self.processes

    def __str__(self) -> str:
        text = (
            f"{self.points} λ × {self.samples} samples × {self.jvps_per_sample} JVPs = "
            f"{self.total_jvps:,} JVPs"
        )
        if self.forward_equivalents is not None:
            text += (
                f" (≈ {_count(self.forward_equivalents)} forward passes, 1 JVP ≈ "
                f"{self.forward_ratio:.1f})"
            )
        text += (
            f"; calibrated {_per(self.seconds_per_jvp)}/JVP-sample (batch {self.batch_size} "
            f"on {self.device}) → {format_seconds(self.total_jvps * self.seconds_per_jvp)}"
        )
        if self.processes > 1:
            text += f" / {self.processes} processes = {format_seconds(self.seconds)}"
        return text


def format_seconds(seconds: float) -> str:
    """``42.0 s``, ``31.8 min``, ``2.5 h``, ``3.1 days``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _per(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.3g} µs"


def _count(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


@dataclass(frozen=True)
class Calibration:
    """Seconds per JVP-batch measured at ``batch_size``, and the JVP/forward cost ratio."""

    seconds_per_batch: float
    batch_size: int
    forward_ratio: float | None = None


def project_cost(
    model: object,
    data: Tensor,
    *,
    samples: int,
    grid_size: int,
    batch_size: int | str,
    device: str = "cpu",
    conditioning: Mapping[str, Tensor] | None = None,
    points: int | None = None,
    samples_per_point: int | None = None,
    jvps_per_sample: int = JVPS_PER_SAMPLE,
    processes: int = 1,
    repeats: int = 2,
    max_seconds: float = 10.0,
    **ems_options: Any,
) -> EMSCost:
    """Project the cost of ``compute_ems(model, data, samples=..., grid_size=...)``.

    Args:
        model, data, conditioning, device: As for
            :func:`~diffsolve.stats.ems.compute.compute_ems`; ``ems_options`` (``jvp``,
            ``t_start``, ``t_end``) are passed on to the calibration runs.
        samples, grid_size, batch_size: The run's ``K``, ``N`` and JVP batch (``"auto"``:
            calibrated at up to 256 samples).
        points, samples_per_point, jvps_per_sample: The recipe's counts (default: today's,
            ``N + 1`` points, ``K`` samples at each, :data:`JVPS_PER_SAMPLE`).
        processes: Processes sharing the samples.
        repeats: Timed runs at the final calibration batch (the fastest counts).
        max_seconds: Calibration budget: at most this, and at most 5% of the projection
            beyond three seconds.

    The calibration runs the real estimation on a two-interval grid: once with two samples
    (warm-up, not counted), then with batches growing fourfold up to the run's own batch (or
    ``samples_per_point`` if smaller) while the budget allows; the time of the last batch
    size, per JVP-sample, is the calibrated cost (fixed costs included, so small batches err
    on the slow side).
    """
    points = grid_size + 1 if points is None else int(points)
    samples_per_point = samples if samples_per_point is None else int(samples_per_point)
    total = points * samples_per_point * jvps_per_sample
    batch = batch_size if isinstance(batch_size, int) else _AUTO_BATCH_CAP
    calibration = calibrate(
        model,
        data,
        batch_size=min(batch, samples_per_point),
        total_jvps=total // max(1, processes),
        device=device,
        conditioning=conditioning,
        jvps_per_sample=jvps_per_sample,
        repeats=repeats,
        max_seconds=max_seconds,
        **ems_options,
    )
    return EMSCost(
        points,
        samples_per_point,
        jvps_per_sample,
        calibration.seconds_per_batch,
        calibration.batch_size,
        device,
        processes,
        calibration.forward_ratio,
    )


def calibrate(
    model: object,
    data: Tensor,
    *,
    batch_size: int,
    total_jvps: int,
    device: str = "cpu",
    conditioning: Mapping[str, Tensor] | None = None,
    jvps_per_sample: int = JVPS_PER_SAMPLE,
    repeats: int = 2,
    max_seconds: float = 10.0,
    min_seconds: float = 3.0,
    clock: Callable[[], float] = time.perf_counter,
    **ems_options: Any,
) -> Calibration:
    """Seconds per JVP-batch of ``compute_ems`` at (up to) ``batch_size`` samples, within a
    budget of ``min(max_seconds, max(min_seconds, 5% of total_jvps' projected time))`` (the
    warm-up not counted)."""
    from diffsolve.stats.ems.compute import compute_ems

    def timed(k: int) -> tuple[float, int]:
        """Seconds and JVP-samples of one estimation with ``k`` samples in one batch."""
        start = clock()
        compute_ems(
            model,
            data,
            samples=k,
            grid_size=_CALIBRATION_GRID,
            bandwidth=0,  # timing only: no smoothing on the two-interval grid
            batch_size=k,
            device=device,
            conditioning=conditioning,
            **ems_options,
        )
        # JVPs, not network calls: a derivative path may call the network several times
        # per JVP (finite differences), which is part of a JVP's calibrated cost
        return clock() - start, (_CALIBRATION_GRID + 1) * k * jvps_per_sample

    cap = max(2, batch_size)
    timed(2)  # warm-up: lazy initialisation, kernel selection, caches
    spent, k = 0.0, 2
    while True:
        seconds, jvps = timed(k)
        spent += seconds
        budget = min(max_seconds, max(min_seconds, 0.05 * seconds / jvps * total_jvps))
        grown = min(4 * k, cap)
        if k >= cap or spent + grown / k * seconds * max(1, repeats) > budget:
            break
        k = grown
    seconds, jvps = min([(seconds, jvps)] + [timed(k) for _ in range(max(1, repeats) - 1)])
    per_jvp = seconds / jvps
    ratio = _forward_ratio(model, data, k, per_jvp, device, conditioning, repeats, clock)
    return Calibration(per_jvp * k, k, ratio)


def _forward_ratio(
    model: Any,
    data: Tensor,
    k: int,
    per_jvp: float,
    device: str,
    conditioning: Mapping[str, Tensor] | None,
    repeats: int,
    clock: Callable[[], float],
) -> float | None:
    """The calibrated cost of one JVP-sample over one plain forward pass of one sample
    (batch ``k``, mid-range time); ``None`` if the model cannot be called so."""
    rows = torch.arange(k) % data.shape[0]
    dtype = data.dtype if data.dtype in (torch.float32, torch.float64) else torch.float32
    x = data[rows].to(device=device, dtype=dtype)
    if conditioning:
        model = model.with_kwargs(**{key: v[rows].to(device) for key, v in conditioning.items()})
    t_start, t_end = model.schedule.default_range
    t = torch.tensor((t_start + t_end) / 2, dtype=torch.float64)
    try:
        with torch.no_grad():
            model.differentiable_eps(x, t).sum().item()  # warm-up
            best = math.inf
            for _ in range(max(1, repeats)):
                start = clock()
                model.differentiable_eps(x, t).sum().item()  # .item(): wait for the device
                best = min(best, clock() - start)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return None
    return per_jvp * k / best if best > 0 else None


def agree(cost: EMSCost) -> EMSCost:
    """Under ``torch.distributed``: every rank takes the slowest rank's calibration, so all
    ranks project (and decide) alike."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return cost
    value = torch.tensor([cost.seconds_per_jvp], dtype=torch.float64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return replace(cost, seconds_per_batch=float(value) * cost.batch_size)


__all__ = ["JVPS_PER_SAMPLE", "Calibration", "EMSCost", "agree", "calibrate", "project_cost"]
