"""Bad input raises a clear ValueError naming the argument and the allowed values."""

import pytest
import torch

from diffsolve import (
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverAdaptive,
    DPMSolverPP,
    Euler,
    Heun,
    UniPC,
    VPLinear,
    fast_orders,
    grids,
    sample,
)

SCHEDULE = VPLinear()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DPMSolverPP(4), r"DPMSolverPP: order must be one of \[1, 2, 3\], got 4"),
        (lambda: DPMSolver(0), r"DPMSolver: order must be one of \[1, 2, 3\], got 0"),
        (lambda: UniPC(5), r"UniPC: order must be one of \[1, 2, 3\], got 5"),
        (lambda: DEIS(4), r"DEIS: order must be one of \[1, 2, 3\], got 4"),
        (lambda: DDIM(2), r"DDIM: order must be one of \[1\], got 2"),
        (lambda: Euler(2), r"Euler: order must be one of \[1\], got 2"),
        (lambda: Heun(3), r"Heun: order must be one of \[2\], got 3"),
        (lambda: DPMSolverAdaptive(1), r"order must be one of \[2, 3\], got 1"),
        (lambda: DPMSolverPP(2.0), r"order must be one of \[1, 2, 3\], got 2.0"),
        (lambda: DPMSolverPP(2, method="leapfrog"), r"method must be one of"),
        (lambda: DPMSolverPP(2, solver_type="heun"), r"solver_type must be one of"),
        (lambda: UniPC(2, variant="bh3"), r"variant must be one of \['bh1', 'bh2'\]"),
        (lambda: UniPC(2, space="both"), r"space must be one of"),
        (lambda: DEIS(2, basis="sigma"), r"basis must be one of \['t', 'rho', 'log_rho'\]"),
        (lambda: DPMSolver(2, orders=(2, 2)), r"orders: per-step orders apply to"),
        (lambda: DPMSolver(2, method="singlestep", orders=(2, 4)), r"order must be one of"),
        (lambda: DPMSolverAdaptive(3, rtol=0), r"rtol must be > 0"),
        (lambda: DPMSolverAdaptive(3, theta=2), r"theta must lie in"),
        (lambda: fast_orders(0, 3), r"nfe must be a positive integer"),
    ],
)
def test_bad_configuration(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("solver", "steps"),
    [(DPMSolverPP(3), 2), (UniPC(3), 2), (DEIS(2), 1), (DPMSolver(3), 1)],
)
def test_fewer_steps_than_the_order_needs(solver, steps):
    grid = grids.logsnr_uniform(SCHEDULE, steps)
    with pytest.raises(
        ValueError,
        match=rf"grid has {steps} step\(s\) but this configuration "
        rf"needs at least {solver.order}",
    ):
        solver.plan(SCHEDULE, grid)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([1.0, 0.2, 0.5], "strictly decreasing"),
        ([1.0, 0.5, 0.5], "duplicate time point"),
        ([1.2, 0.5], r"must lie in \[0, 1.0\]"),
        ([0.5, 0.0, 0.0], "duplicate time point"),
    ],
)
def test_sample_validates_the_grid(grid, message):
    with pytest.raises(ValueError, match=message):
        sample(_model(), torch.randn(2, 3), DDIM(), grid)


def test_singlestep_orders_must_match_grid():
    solver = DPMSolver(3, method="singlestep", orders=(3, 3, 1))
    with pytest.raises(ValueError, match="orders: got 3 per-step orders for a grid of 5 steps"):
        solver.plan(SCHEDULE, grids.logsnr_uniform(SCHEDULE, 5))


def test_sample_argument_errors():
    with pytest.raises(ValueError, match="pass a grid"):
        sample(_model(), torch.randn(2, 3), DDIM())
    with pytest.raises(ValueError, match="floating-point"):
        sample(_model(), torch.zeros(2, 3, dtype=torch.long), DDIM(), [1.0, 0.5])
    with pytest.raises(ValueError, match="final_corrector"):
        UniPC(2, final_corrector=True).plan(SCHEDULE, [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="must end at t > 0"):
        DPMSolverAdaptive().plan(SCHEDULE, [1.0, 0.0])


def _model():
    from diffsolve import ModelWrapper

    return ModelWrapper(lambda x, t: torch.zeros_like(x), SCHEDULE, "epsilon")
