"""Align Your Steps grids (grids.align_your_steps): the published lists reproduced, the
log-linear interpolation monotone, every step count valid, the sigma = 0 end as documented."""

from __future__ import annotations

import pytest
import torch

from diffsolve.ode import grids
from diffsolve.ode.schedule import EDM, VPDiscrete

SD = VPDiscrete.from_diffusers(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SVD = EDM(sigma_min=0.002, sigma_max=700.0)
SCHEDULES = {"sd15": SD, "sdxl": SD, "svd": SVD}


@pytest.mark.parametrize("kind", sorted(grids.AYS_SIGMAS))
def test_the_published_ten_step_lists_are_reproduced(kind):
    schedule, published = (
        SCHEDULES[kind],
        torch.tensor(grids.AYS_SIGMAS[kind], dtype=torch.float64),
    )
    grid = grids.align_your_steps(schedule, 10, kind, end="sigma_min")
    sigma = schedule.edm_sigma(grid)
    # the ends are the schedule's range ends, which the published three decimals round
    assert float(grid[0]) == schedule.t_max and float(grid[-1]) == schedule.default_range[1]
    assert torch.allclose(sigma[[0, -1]], published[[0, -1]], rtol=0, atol=5e-4)
    assert torch.allclose(sigma[1:-1], published[1:-1], rtol=1e-9, atol=0)
    # registry convention: 11 steps evaluate exactly there, then a free step to t = 0
    zero = grids.align_your_steps(schedule, 11, kind)
    assert torch.equal(zero[:-1], grid) and float(zero[-1]) == 0.0
    # ComfyUI / diffusers: 10 steps, the last level replaced by t = 0
    replaced = grids.align_your_steps(schedule, 10, kind, end="replace")
    assert torch.equal(replaced[:-1], grid[:-1]) and float(replaced[-1]) == 0.0


@pytest.mark.parametrize("kind", sorted(grids.AYS_SIGMAS))
@pytest.mark.parametrize("end", ["zero", "replace", "sigma_min"])
def test_every_step_count_is_a_valid_monotone_interpolation(kind, end):
    schedule = SCHEDULES[kind]
    logs = torch.tensor(grids.AYS_SIGMAS[kind], dtype=torch.float64).log()
    for steps in range(3, 31):
        grid = grids.align_your_steps(schedule, steps, kind, end=end)
        assert grid.numel() == steps + 1
        assert torch.equal(grid, grids.validate_grid(schedule, grid))
        n = steps if end == "zero" else steps + 1  # levels interpolated
        levels = schedule.edm_sigma(grid[1 : n - 1]).log()  # interior: log-linear in position
        pos = torch.arange(1, n - 1, dtype=torch.float64) * (logs.numel() - 1) / (n - 1)
        k = pos.floor().long()
        expect = torch.lerp(logs[k], logs[(k + 1).clamp(max=logs.numel() - 1)], pos - k)
        assert torch.allclose(levels, expect, atol=1e-9), (steps, end)


def test_a_list_beyond_the_schedule_is_refused_and_options_checked():
    with pytest.raises(ValueError, match="another model"):
        grids.align_your_steps(EDM(), 10, "svd")  # sigma_max 80 < 700
    with pytest.raises(ValueError, match="model_kind"):
        grids.align_your_steps(SD, 10, "sd3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="end"):
        grids.align_your_steps(SD, 10, end="none")  # type: ignore[arg-type]
