"""Analytic Gaussian teleportation: the closed-form jump and the solver wrapper."""

from __future__ import annotations

import pytest
import torch

from conftest import SCHEDULES, make_solvers, noise
from diffsolve import DDIM, DPMSolver, DPMSolverAdaptive, DPMSolverPP, GaussianModel
from diffsolve import grids as grid_lib
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import SolverContext, setup_solver
from diffsolve.wrappers.teleport import (
    Teleported,
    TeleportPlan,
    skip_time,
    teleport,
    teleported_setup,
)

ALL_SOLVERS = make_solvers()


def _skip_and_end(schedule) -> tuple[float, float, float]:
    """Start, a skip time half-way in log-SNR, and the end of the default range."""
    t_start, t_end = schedule.default_range
    lam = 0.5 * (schedule.lambda_(t_start) + schedule.lambda_(t_end))
    return t_start, float(schedule.t_of_lambda(lam)), t_end


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("rank", [6, 3])
def test_teleport_is_the_exact_flow_under_every_schedule(name, rank):
    """Equals GaussianModel.solution, and agrees with a fine numerical solve of the ODE."""
    schedule = SCHEDULES[name]()
    g = GaussianModel.random((6,), rank=rank, seed=1)
    x = noise(schedule)
    t_start, t_skip, _ = _skip_and_end(schedule)
    jumped = teleport(g, x, t_start, t_skip, schedule)
    torch.testing.assert_close(jumped, g.solution(x, t_start, t_skip, schedule), atol=0, rtol=0)
    fine = sample(
        g.denoiser(schedule),
        x,
        DPMSolverPP(3, lower_order_final=False),
        grid_lib.logsnr_uniform(schedule, 400, t_start, t_skip),
    ).x
    torch.testing.assert_close(jumped, fine, atol=1e-6 * schedule.init_noise_sigma(), rtol=0)
    assert jumped.dtype == x.dtype
    torch.testing.assert_close(teleport(g, x.float(), t_start, t_skip, schedule), jumped.float())


@pytest.mark.parametrize("end", ["t_end", "zero"])
@pytest.mark.parametrize("name", list(ALL_SOLVERS))
def test_whole_range_teleport_with_every_solver_is_exact(name, end):
    schedule = SCHEDULES["vp_discrete"]()
    g = GaussianModel.random((6,), rank=4, seed=2)
    x = noise(schedule)
    t_start, _, t_end = _skip_and_end(schedule)
    t_end = t_end if end == "t_end" else 0.0
    out = sample(g.denoiser(schedule), x, Teleported(ALL_SOLVERS[name], g), [t_start, t_end])
    assert out.nfe == 0
    torch.testing.assert_close(out.x, g.solution(x, t_start, t_end, schedule), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(ALL_SOLVERS))
def test_teleported_plan_is_the_jump_then_the_inner_plan(name):
    """Exactly the inner solver started from the closed-form state at the skip time."""
    schedule = SCHEDULES["vp_linear"]()
    g = GaussianModel.random((6,), seed=3)
    model = g.denoiser(schedule)
    x = noise(schedule)
    t_start, t_skip, _ = _skip_and_end(schedule)
    inner_grid = grid_lib.time_uniform(schedule, 6, t_skip, 0.0)
    solver = ALL_SOLVERS[name]
    teleported = sample(model, x, Teleported(solver, g), torch.cat([torch.ones(1), inner_grid]))
    direct = sample(model, g.solution(x, t_start, t_skip, schedule), solver, inner_grid)
    torch.testing.assert_close(teleported.x, direct.x, atol=0, rtol=0)
    assert teleported.nfe == direct.nfe == solver.plan(schedule, inner_grid).nfe


@pytest.mark.parametrize(
    "solver",
    [DPMSolver(3, method="singlestep"), DPMSolverPP(3, method="singlestep")],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_teleport_then_fine_grid_matches_the_exact_solution(name, solver):
    """Single-step third-order solvers (no lower-order warm-up, whose O(h^2) error would
    dominate a multistep method's) reach the closed form at the end of a fine grid."""
    schedule = SCHEDULES[name]()
    g = GaussianModel.random((6,), rank=5, seed=4)
    x = noise(schedule)
    t_start, t_skip, t_end = _skip_and_end(schedule)
    grid = torch.cat(
        [
            torch.tensor([t_start], dtype=torch.float64),
            grid_lib.logsnr_uniform(schedule, 150, t_skip, t_end),
        ]
    )
    out = sample(g.denoiser(schedule), x, Teleported(solver, g), grid)
    exact = g.solution(x, t_start, t_end, schedule)
    torch.testing.assert_close(out.x, exact, atol=1e-6 * schedule.init_noise_sigma(), rtol=0)


def test_plan_bookkeeping_and_intermediates():
    schedule = SCHEDULES["edm"]()
    g = GaussianModel.random((6,), seed=5)
    grid = [80.0, 10.0, 3.0, 1.0, 0.0]
    plan = Teleported(DPMSolverPP(2), g).plan(schedule, grid)
    assert isinstance(plan, TeleportPlan)
    assert (plan.num_steps, plan.nfe, plan.t_start, plan.t_skip) == (4, 3, 80.0, 10.0)
    steps = []
    out = sample(
        g.denoiser(schedule),
        noise(schedule),
        Teleported(DPMSolverPP(2), g),
        grid,
        return_intermediates=True,
        callback=lambda info: steps.append((info.step, info.t, info.nfe)),
    )
    assert out.times == grid
    assert steps == [(1, 10.0, 0), (2, 3.0, 1), (3, 1.0, 2), (4, 0.0, 3)]
    adaptive = Teleported(DPMSolverAdaptive(), g).plan(schedule, [80.0, 10.0, 0.002])
    assert adaptive.num_steps is None and adaptive.nfe is None
    assert Teleported(DDIM(), g).order == 1 and Teleported(DPMSolverPP(3), g).order == 3


def test_skip_time_rounds_and_validates():
    schedule = SCHEDULES["vp_discrete"]()
    grid = grid_lib.time_uniform(schedule, 10, 1.0, 0.0)
    assert skip_time(schedule, grid, 0.0) == 1.0
    assert skip_time(schedule, grid, 0.25) == pytest.approx(0.7)  # index round(2.5) = 3
    assert skip_time(schedule, grid, 0.3) == pytest.approx(0.7)
    for bad in (1.0, -0.1, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="fraction"):
            skip_time(schedule, grid, bad)
    with pytest.raises(ValueError, match="grid"):
        skip_time(schedule, [0.5, 0.5, 0.0], 0.2)


@pytest.mark.parametrize("name", ["dpm-solver++-2m", "heun", "unipc-bh2-3", "dpm-solver-fast"])
def test_teleported_setup_keeps_the_budget(name):
    schedule = SCHEDULES["vp_discrete"]()
    g = GaussianModel.random((6,), seed=6)
    x = noise(schedule)
    plain_solver, plain_grid = setup_solver(name, schedule, 10)
    context = SolverContext(gaussian=g)
    solver, grid = teleported_setup(name, schedule, 10, 0.3, context=context)
    assert isinstance(solver, Teleported)
    assert float(grid[0]) == float(plain_grid[0]) and float(grid[-1]) == 0.0
    assert float(grid[1]) == skip_time(schedule, plain_grid, 0.3)
    out = sample(g.denoiser(schedule), x, solver, grid)
    plain = sample(g.denoiser(schedule), x, plain_solver, plain_grid)
    assert out.nfe == plain.nfe
    same_solver, same_grid = teleported_setup(name, schedule, 10, 0.0, context=context)
    assert same_solver == plain_solver and torch.equal(same_grid, plain_grid)
    with pytest.raises(ValueError, match="lower the fraction"):
        teleported_setup(name, schedule, 10, 0.99, context=context)


def test_teleport_validation():
    schedule = SCHEDULES["vp_linear"]()
    g = GaussianModel.random((6,), seed=7)
    x = noise(schedule)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        teleport(g, torch.zeros(2, 1, 8, 8), 1.0, 0.5, schedule)
    with pytest.raises(ValueError, match="t_skip"):
        teleport(g, x, 0.5, 0.7, schedule)
    with pytest.raises(ValueError, match="t_start"):
        teleport(g, x, 2.0, 0.5, schedule)
    with pytest.raises(ValueError, match="gaussian"):
        Teleported(DDIM(), "not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs at least"):
        Teleported(DPMSolverPP(3, lower_order_final=False), g).plan(schedule, [1.0, 0.5, 0.2])
