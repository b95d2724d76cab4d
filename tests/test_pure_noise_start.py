"""Grids that start from pure noise (α = 0, λ = −∞): flow matching's σ = 1.

The first step is the exact limit of every exponential integrator's first-order step,
x₁ = (σ₁/σ₀) x₀ + α₁ x̂₀ (= Euler in flow time); the λ = −∞ point never enters a history, so
no weight is infinite, and each solver still converges on the Gaussian oracle.
"""

import itertools
import math

import pytest
import torch

from diffsolve import RectifiedFlow, sample
from diffsolve.solvers.engine import GridValues, multistep_orders
from diffsolve.solvers.registry import preset
from diffsolve.stats.gaussian.analytic import GaussianModel

SCHEDULE = RectifiedFlow(t_max=1.0)
GAUSSIAN = GaussianModel.random((16,), seed=1)
SOLVERS = [
    "ddim",
    "dpm-solver++-2m",
    "dpm-solver++-3m",
    "dpm-solver-2m",
    "dpm-solver-3m",
    "unipc-bh2-2",
    "unipc-bh1-3",
    "deis-2",
    "deis-3",
    "euler",
    "heun",
]


def grid(steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.05, steps + 1, dtype=torch.float64)


def x_start() -> torch.Tensor:
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def error(name: str, steps: int) -> float:
    solver = preset(name).build(steps, None)
    out = sample(GAUSSIAN.denoiser(SCHEDULE), x_start(), solver, grid(steps)).x
    exact = GAUSSIAN.solution(x_start(), 1.0, 0.05, SCHEDULE)
    return float((out - exact).abs().max())


@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_converges_from_pure_noise(name):
    errors = [error(name, n) for n in (10, 20, 40)]
    assert all(math.isfinite(e) for e in errors)
    rates = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    # first order at least; the first-order start step caps the rest near 2
    assert min(rates) > 0.8, (name, errors)


def test_the_first_step_is_the_exact_limit():
    """x₁ = σ₁ x₀ + α₁ x̂₀ from σ₀ = 1, whatever the solver."""
    x = x_start()
    g = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.0], dtype=torch.float64)
    model = GAUSSIAN.denoiser(SCHEDULE)
    expected = 0.7 * x + 0.3 * GAUSSIAN.denoise(x, 0.0, 1.0)
    for name in SOLVERS:
        solver = preset(name).build(4, None)
        plan = solver.plan(SCHEDULE, g)
        state = plan.step(model, plan.init(x))
        torch.testing.assert_close(state.x, expected, rtol=1e-12, atol=1e-12, msg=name)


def test_the_pure_noise_point_is_no_history():
    at = GridValues.of(SCHEDULE, grid(6))
    assert at.alpha[0] == 0.0 and at.lam[0] == -math.inf and at.first_usable == 1
    assert multistep_orders(at, 3, False) == [1, 1, 2, 3, 3, 3]
