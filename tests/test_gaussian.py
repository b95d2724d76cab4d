"""The Gaussian oracle: exact denoiser and exact probability-flow ODE solution."""

import pytest
import torch

from conftest import SCHEDULES, noise
from diffsolve import GaussianModel


def _derivative(f, t: float, eps: float = 1e-6):
    return (f(t + eps) - f(t - eps)) / (2 * eps)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("rank", [6, 3])
def test_solution_satisfies_the_probability_flow_ode(name, rank):
    """dx/dt = (α̇/α) x + (σ̇ - σ α̇/α) ε̂(x, t) along the closed-form trajectory."""
    schedule = SCHEDULES[name]()
    g = GaussianModel.random((6,), rank=rank, seed=2)
    x_start = noise(schedule)
    t_start = schedule.default_range[0]

    def x(t):
        return g.solution(x_start, t_start, t, schedule)

    for t in (0.2 * schedule.t_max, 0.6 * schedule.t_max):
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        da = _derivative(lambda u: float(schedule.alpha(u)), t)
        ds = _derivative(lambda u: float(schedule.sigma(u)), t)
        xt = x(t)
        eps = (xt - a * g.denoise(xt, a, s)) / s
        rhs = da / a * xt + (ds - s * da / a) * eps
        torch.testing.assert_close(_derivative(x, t), rhs, rtol=1e-5, atol=1e-6)


def test_solution_is_a_flow():
    schedule = SCHEDULES["vp_linear"]()
    g = GaussianModel.random((6,), rank=4, seed=5)
    x0 = noise(schedule)
    mid = g.solution(x0, 1.0, 0.4, schedule)
    torch.testing.assert_close(
        g.solution(mid, 0.4, 0.01, schedule), g.solution(x0, 1.0, 0.01, schedule)
    )
    torch.testing.assert_close(g.solution(x0, 1.0, 1.0, schedule), x0)
    many = g.solution(x0, 1.0, torch.tensor([0.4, 0.01], dtype=torch.float64), schedule)
    assert many.shape == (2, *x0.shape)
    torch.testing.assert_close(many[0], mid)


def test_denoiser_is_the_posterior_mean():
    """Monte-Carlo check of E[x0 | x_t] on a 2-D Gaussian."""
    g = GaussianModel.from_covariance(
        torch.tensor([0.3, -0.2], dtype=torch.float64),
        torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64),
    )
    gen = torch.Generator().manual_seed(0)
    x0 = g.sample(400_000, gen)
    a, s = 0.8, 0.6
    xt = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    # regress x0 on x_t: the posterior mean of a Gaussian is affine in x_t
    design = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, x0).solution
    probe = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    empirical = torch.cat([probe, torch.ones(2, 1, dtype=torch.float64)], 1) @ coef
    torch.testing.assert_close(g.denoise(probe, a, s), empirical, atol=0.01, rtol=0)


def test_fit_recovers_mean_and_covariance():
    truth = GaussianModel.random((3, 2), seed=4)
    data = truth.sample(200_000, torch.Generator().manual_seed(1))
    fitted = GaussianModel.fit(data)
    torch.testing.assert_close(fitted.mean, truth.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(fitted.covariance(), truth.covariance(), atol=0.02, rtol=0)
    assert fitted.shape == (3, 2)
    top = GaussianModel.fit(data, rank=2)
    assert top.eigvals.shape == (2,) and (top.eigvals[0] >= top.eigvals[1])


def test_gaussian_validation():
    with pytest.raises(ValueError, match="eigvecs must have shape"):
        GaussianModel(torch.zeros(3), torch.ones(2), torch.eye(3))
    with pytest.raises(ValueError, match="orthonormal"):
        GaussianModel(torch.zeros(2), torch.ones(2), 2 * torch.eye(2))
    with pytest.raises(ValueError, match=">= 0"):
        GaussianModel(torch.zeros(2), -torch.ones(2), torch.eye(2))
