r"""Sizing the EMS estimator's micro-batches to the memory a device has.

The estimator's results do not depend on the batch size (noise and probes are drawn per
sample), so the batch only trades memory for speed. ``batch_size="auto"`` picks it:

* **CUDA** — measured. Two probe batches of 1 and 3 samples run the real estimation step
  (both JVPs, the moments) with ``torch.cuda.max_memory_allocated`` reset before each; their
  peaks above the memory already allocated give a per-sample cost :math:`m = (p_3 - p_1)/2`
  and a fixed cost :math:`c = p_1 - m`. The batch is
  :math:`\lfloor (B - c) / (1.25\,m) \rfloor` samples (25% headroom for fragmentation),
  capped at the samples this process has, with :math:`B` the ``memory_budget`` in bytes or
  90% of what the device can still give (free memory plus the cache PyTorch holds unused).
* **CPU and other devices** — a conservative default of :data:`CPU_BATCH` samples: no
  per-call peak can be measured there, and the throughput of a JVP on CPU stops improving at
  a few dozen samples. ``memory_budget`` is refused there (pass an integer ``batch_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``batch_size="auto"`` on CPU (one noise block of the estimator).
CPU_BATCH = 32
#: Headroom on the measured per-sample peak.
HEADROOM = 1.25
#: Share of the device's available memory used when no budget is given.
DEVICE_SHARE = 0.9
#: Sizes of the probe batches.
PROBES = (1, 3)


@dataclass(frozen=True)
class BatchPlan:
    """A chosen batch size and how it was chosen.

    Attributes:
        batch_size: Samples per JVP batch.
        per_sample_bytes: Measured peak memory per sample (``None``: not measured).
        fixed_bytes: Measured peak memory independent of the batch (``None``: not measured).
        budget_bytes: The memory the batch was sized to (``None``: CPU default).
    """

    batch_size: int
    per_sample_bytes: float | None = None
    fixed_bytes: float | None = None
    budget_bytes: float | None = None

    def describe(self) -> str:
        """One line, e.g. ``batch 412 (1.8 MiB/sample measured, budget 70.1 GiB)``."""
        if self.per_sample_bytes is None:
            return f"batch {self.batch_size} (CPU default)"
        return (
            f"batch {self.batch_size} ({_size(self.per_sample_bytes)}/sample measured, "
            f"budget {_size(self.budget_bytes or 0)})"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns


def auto_batch_size(
    probe: Callable[[int], object],
    count: int,
    device: str | torch.device,
    memory_budget: int | None = None,
) -> BatchPlan:
    """Choose the batch size (module docstring).

    Args:
        probe: Runs the estimation step on the first ``n`` samples (results discarded).
        count: Samples this process will estimate (the batch never exceeds it).
        device: Where the network runs.
        memory_budget: Bytes the batch may use (CUDA; default: 90% of what is available).
    """
    device = torch.device(device)
    count = max(int(count), 1)
    if memory_budget is not None and int(memory_budget) <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    if device.type != "cuda":
        if memory_budget is not None:
            raise ValueError(
                f"memory_budget is measured on CUDA devices only (device {device}); pass an "
                f"integer batch_size (batch_size='auto' gives {CPU_BATCH} there)"
            )
        return BatchPlan(min(count, CPU_BATCH))
    peaks = [_cuda_peak(probe, n, device) for n in PROBES]
    small, large = PROBES
    per_sample = (peaks[1] - peaks[0]) / (large - small)
    if per_sample <= 0:  # no growth measured (caching allocator noise): all of it per sample
        per_sample = max(peaks[0] / small, 1.0)
    fixed = max(peaks[0] - small * per_sample, 0.0)
    if memory_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = DEVICE_SHARE * (free + unused)
    else:
        budget = float(memory_budget)
    batch = int((budget - fixed) // (HEADROOM * per_sample))
    if batch < 1:
        raise ValueError(
            f"one sample needs about {_size(HEADROOM * per_sample + fixed)} but the budget "
            f"is {_size(budget)}; raise memory_budget or free device memory"
        )
    return BatchPlan(min(batch, count), per_sample, fixed, budget)


def _cuda_peak(probe: Callable[[int], object], n: int, device: torch.device) -> float:
    """Peak bytes allocated above the current allocation while ``probe(n)`` runs."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    probe(n)
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


__all__ = ["CPU_BATCH", "BatchPlan", "auto_batch_size"]
