"""The sampling loop: exact NFE, callbacks, intermediates, dtypes, final steps, adaptive."""

import pytest
import torch

from conftest import SCHEDULES, noise
from diffsolve import (
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverAdaptive,
    DPMSolverPP,
    Heun,
    UniPC,
    VPLinear,
    fast_orders,
    grids,
    sample,
)
from diffsolve.ode.sampling import CountingDenoiser

SCHEDULE = VPLinear()


@pytest.mark.parametrize(
    ("solver", "steps", "expected"),
    [
        (DDIM(), 7, 7),
        (DPMSolverPP(3), 7, 7),
        (UniPC(2), 7, 7),
        (UniPC(2, final_corrector=True), 7, 8),
        (DEIS(3), 7, 7),
        (DPMSolver(2, method="singlestep"), 7, 14),
        (DPMSolver(3, method="singlestep"), 7, 21),
        (Heun(), 7, 14),
    ],
)
def test_exact_nfe(solver, steps, expected, gaussian):
    grid = grids.logsnr_uniform(SCHEDULE, steps)
    plan = solver.plan(SCHEDULE, grid)
    out = sample(gaussian.denoiser(SCHEDULE), noise(SCHEDULE), solver, grid)
    assert out.nfe == expected == plan.nfe


def test_final_step_to_zero_returns_x0_and_heun_skips_correction(gaussian):
    grid = grids.append_zero(SCHEDULE, grids.logsnr_uniform(SCHEDULE, 6))  # 7 steps
    model = gaussian.denoiser(SCHEDULE)
    for solver, nfe in [(Heun(), 13), (DPMSolver(3, method="singlestep"), 19), (UniPC(3), 7)]:
        out = sample(model, noise(SCHEDULE), solver, grid, return_intermediates=True)
        assert out.nfe == nfe
        before = out.intermediates[-2]
        torch.testing.assert_close(out.x, model(before, float(grid[-2])).x0)


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_lands_exactly_on_grid_and_reports_intermediates(schedule_name, gaussian):
    schedule = SCHEDULES[schedule_name]()
    grid = grids.karras(schedule, 5)
    seen = []
    out = sample(
        gaussian.denoiser(schedule),
        noise(schedule),
        DPMSolverPP(2),
        grid,
        callback=seen.append,
        return_intermediates=True,
    )
    assert out.times == grid.tolist()
    assert len(out.intermediates) == 6 and out.intermediates[-1] is not None
    assert [info.step for info in seen] == [1, 2, 3, 4, 5]
    assert [info.nfe for info in seen] == [1, 2, 3, 4, 5]
    assert seen[-1].t == float(grid[-1]) and seen[-1].denoised is not None


def test_denoise_to_zero_adds_one_evaluation(gaussian):
    grid = grids.logsnr_uniform(SCHEDULE, 5)
    model = gaussian.denoiser(SCHEDULE)
    plain = sample(model, noise(SCHEDULE), DPMSolverPP(2), grid)
    out = sample(model, noise(SCHEDULE), DPMSolverPP(2), grid, denoise_to_zero=True)
    assert out.nfe == plain.nfe + 1
    torch.testing.assert_close(out.x, model(plain.x, float(grid[-1])).x0)


def test_plan_reuse_has_no_stale_state(gaussian):
    grid = grids.logsnr_uniform(SCHEDULE, 8)
    solver = UniPC(3)
    plan = solver.plan(SCHEDULE, grid)
    model = gaussian.denoiser(SCHEDULE)
    first = sample(model, noise(SCHEDULE, seed=1), solver, plan=plan).x
    sample(model, noise(SCHEDULE, seed=2), solver, plan=plan)
    torch.testing.assert_close(sample(model, noise(SCHEDULE, seed=1), solver, plan=plan).x, first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_follows_input_and_state_is_at_least_float32(dtype, gaussian):
    grid = grids.logsnr_uniform(SCHEDULE, 6)
    seen = []
    out = sample(
        gaussian.denoiser(SCHEDULE),
        noise(SCHEDULE).to(dtype),
        DPMSolverPP(2),
        grid,
        callback=lambda info: seen.append(info.x.dtype),
    )
    assert out.x.dtype == dtype
    assert all(d in (torch.float32, torch.float64) for d in seen)
    assert torch.isfinite(out.x.float()).all()


def test_progress_bar(gaussian, capsys):
    grid = grids.logsnr_uniform(SCHEDULE, 4)
    out = sample(gaussian.denoiser(SCHEDULE), noise(SCHEDULE), DDIM(), grid, progress=True)
    assert out.nfe == 4


def test_fast_orders_spend_the_budget(gaussian):
    for nfe in range(3, 25):
        orders = fast_orders(nfe, 3)
        assert sum(orders) == nfe
        grid = grids.logsnr_uniform(SCHEDULE, len(orders))
        out = sample(
            gaussian.denoiser(SCHEDULE),
            noise(SCHEDULE),
            DPMSolver(3, method="singlestep", orders=orders),
            grid,
        )
        assert out.nfe == nfe
    assert fast_orders(10, 3) == (3, 3, 3, 1)
    assert fast_orders(9, 3) == (3, 3, 2, 1)
    assert fast_orders(7, 2) == (2, 2, 2, 1)


@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_converges_and_reports_nfe(order, gaussian):
    model = CountingDenoiser(gaussian.denoiser(SCHEDULE))
    grid = grids.logsnr_uniform(SCHEDULE, 1)
    x = noise(SCHEDULE)
    exact = gaussian.solution(x, float(grid[0]), float(grid[-1]), SCHEDULE)
    errors, nfes = [], []
    for rtol in (1e-2, 1e-4):
        out = sample(model, x, DPMSolverAdaptive(order, rtol=rtol, atol=rtol / 10), grid)
        errors.append(float((out.x - exact).abs().max()))
        nfes.append(out.nfe)
    assert errors[1] < errors[0] / 10 and nfes[1] > nfes[0]
    assert errors[1] < 1e-3
    assert sum(nfes) == model.calls  # the loop counts every evaluation, rejected ones too
