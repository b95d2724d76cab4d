r"""Where a diffusers ``step(model_output, timestep, sample)`` call is in the loop.

diffusers' schedulers find their place from the timestep they are called with:

* its **multistep** schedulers (DPM-Solver, UniPC, DEIS) look the first call's timestep up in
  ``timesteps`` — a repeated timestep is its second occurrence, so that an img2img start never
  skips a step; a timestep that is not there is the **last** step — and then follow an
  internal counter;
* its **DDIM** is stateless: any call steps from the timestep it is given.

The adapters do the same (:func:`first_index`, :func:`ddim_target`), with two refinements:
a repeated *first* timestep (cosine betas with Karras sigmas: ``[998, 998, 998, …]``) is the
loop's first step, since a loop from the start is the only one that begins there (img2img
pipelines call ``set_begin_index``); and a timestep within 1% of a listed one (a timestep
rounded to bfloat16 by a pipeline: 999 → 1000) is that one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: A timestep within ``ATOL + RTOL·|t|`` of a listed one is that one.
RTOL, ATOL = 1e-2, 0.5


def timestep_value(timestep: Any) -> float:
    """The (first) value of a timestep given as a number or a tensor."""
    values = torch.as_tensor(timestep).detach().flatten()
    if values.numel() == 0:
        raise ValueError("step: timestep is empty; pass one of scheduler.timesteps")
    return float(values[0])


def matches(timesteps: Tensor, timestep: Any, rtol: float = RTOL, atol: float = ATOL) -> list[int]:
    """Indices of ``timestep`` in ``timesteps``: every exact match (a repeated timestep), else
    the nearest value within ``atol + rtol·|timestep|``, else none."""
    values = timesteps.detach().to("cpu", torch.float64).flatten()
    value = timestep_value(timestep)
    exact = (values == value).nonzero().flatten()
    if exact.numel():
        return [int(i) for i in exact]
    gap = (values - value).abs()
    if gap.numel() and float(gap.min()) <= atol + rtol * abs(value):
        return [int(gap.argmin())]
    return []


def first_index(timesteps: Tensor, timestep: Any) -> tuple[int, bool]:
    """The step a loop's first call is (no begin index set), and whether its timestep was
    found: diffusers' rule (the second of repeated matches; the last step for an unknown
    timestep), except that a repeated first timestep starts at the first step."""
    found = matches(timesteps, timestep)
    if not found:
        return len(timesteps) - 1, False
    if len(found) > 1 and found[0] != 0:
        return found[1], True
    return found[0], True


def ddim_target(grid: Tensor, t: float) -> int:
    """The grid point a DDIM step from solver time ``t`` (off the grid) ends at: the first one
    below ``t``, or the grid's end."""
    below = (grid < t).nonzero().flatten()
    return int(below[0]) if below.numel() else grid.numel() - 1


__all__ = ["ATOL", "RTOL", "ddim_target", "first_index", "matches", "timestep_value"]
