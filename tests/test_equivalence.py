"""Algebraic equivalences between solvers (float64)."""

import pytest
import torch

from conftest import SCHEDULES, noise
from diffsolve import (
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverPP,
    Euler,
    UniPC,
    grids,
    sample,
)

FIRST_ORDER = {
    "euler": Euler(),
    "dpm-solver-1-multistep": DPMSolver(1),
    "dpm-solver-1-singlestep": DPMSolver(1, method="singlestep"),
    "dpm-solver++-1-multistep": DPMSolverPP(1),
    "dpm-solver++-1-singlestep": DPMSolverPP(1, method="singlestep"),
    "unipc-1-predictor-data": UniPC(1, corrector=False),
    "unipc-1-predictor-noise": UniPC(1, corrector=False, space="noise"),
    "deis-1-t": DEIS(1),
    "deis-1-rho": DEIS(1, basis="rho"),
    "deis-1-log-rho": DEIS(1, basis="log_rho"),
}


def run(solver, schedule, gaussian, grid):
    return sample(gaussian.denoiser(schedule), noise(schedule), solver, grid).x


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("kind", ["logsnr", "time_uniform", "karras"])
@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_first_order_methods_are_ddim(name, kind, schedule_name, gaussian):
    schedule = SCHEDULES[schedule_name]()
    grid = grids.make_grid(schedule, 7, kind)
    ddim = run(DDIM(), schedule, gaussian, grid)
    torch.testing.assert_close(
        run(FIRST_ORDER[name], schedule, gaussian, grid), ddim, rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("order", [2, 3])
def test_deis_log_rho_is_dpm_solver_taylor(order, schedule_name, gaussian):
    """Lagrange in log ρ = -λ, integrated in ρ, is the noise-space exponential integrator."""
    schedule = SCHEDULES[schedule_name]()
    grid = grids.logsnr_uniform(schedule, 9)
    deis = run(DEIS(order, basis="log_rho"), schedule, gaussian, grid)
    dpm = run(DPMSolver(order, solver_type="taylor"), schedule, gaussian, grid)
    torch.testing.assert_close(deis, dpm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("predict", ["data", "noise"])
def test_unipc3_predictor_is_the_exact_exponential_integrator(predict, gaussian):
    """UniP-3 solves the full system for ρ, so it integrates the quadratic interpolant
    exactly, as DPM-Solver(++) 3M does (UniP-2 hard-codes ρ = 1/2 instead)."""
    schedule = SCHEDULES["vp_linear"]()
    grid = grids.time_uniform(schedule, 9)
    unipc = run(UniPC(3, corrector=False, space=predict), schedule, gaussian, grid)
    reference = DPMSolverPP(3) if predict == "data" else DPMSolver(3)
    torch.testing.assert_close(unipc, run(reference, schedule, gaussian, grid), rtol=0, atol=1e-10)
