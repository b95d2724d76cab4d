"""Parity with diffusers' multistep schedulers on the same discrete VP schedule, grid and model.

Where diffusers deviates from the paper, diffsolve keeps the paper's version; the tests below
pin down each difference:

* ``DPMSolverMultistepScheduler`` order 3 weights the second difference by hφ₃ instead of the
  Taylor coefficient 2hφ₃, so its 3M converges at second order (our 3M at third).
* ``UniPCMultistepScheduler(solver_type="bh1")`` with its default ``final_sigmas_type="zero"``
  computes ``-inf * 0`` in the last step and returns NaN; diffsolve returns x̂₀ there.
"""

import math

import numpy as np
import pytest
import torch

from diffsolve import (
    DEIS,
    DPMSolver,
    DPMSolverPP,
    GaussianModel,
    ModelWrapper,
    UniPC,
    VPDiscrete,
    grids,
    sample,
)
from diffsolve.numerics import solve_vandermonde
from diffsolve.solvers.dpm_solver import ei_weights
from diffsolve.solvers.engine import (
    GridValues,
    StepPlan,
    Update,
    multistep_orders,
    multistep_plan,
)

diffusers = pytest.importorskip("diffusers")

CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
}
# The same schedule, bit for bit: diffusers keeps alphas_cumprod in float32.
SCHEDULE = VPDiscrete(diffusers.DDPMScheduler(**CONFIG).alphas_cumprod)
GAUSSIAN = GaussianModel.random((1, 4, 4), seed=3)


def gaussian_eps(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """An analytic epsilon-network: the exact Gaussian denoiser at an integer timestep."""
    t = float(SCHEDULE.t_of_timestep(float(timestep.flatten()[0])))
    a, s = float(SCHEDULE.alpha(t)), float(SCHEDULE.sigma(t))
    x = x.double()
    return (x - a * GAUSSIAN.denoise(x, a, s)) / s


class RandomNet(torch.nn.Module):
    """A fixed random-weight convolutional epsilon-network with a time input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.time = torch.nn.Linear(1, 16)
        self.conv2 = torch.nn.Conv2d(16, 1, 3, padding=1)
        self.double()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = x.double()
        t = timestep.double().reshape(-1, 1).expand(x.shape[0], 1) / 1000
        h = torch.tanh(self.conv1(x) + self.time(t)[:, :, None, None])
        return 0.5 * self.conv2(h) + 0.3 * x


NETWORKS = {"gaussian": gaussian_eps, "random-weights": RandomNet()}


def x_start() -> torch.Tensor:
    return torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run_diffusers(scheduler_cls, steps: int, net, **config):
    """Run a diffusers scheduler loop; return its samples and the same grid in solver time."""
    scheduler = scheduler_cls(**CONFIG, **config)
    scheduler.set_timesteps(steps)
    x = x_start().float()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t).float(), t, x).prev_sample
    grid = (scheduler.timesteps.double() + 1) / 1000
    last = 0.0 if float(scheduler.sigmas[-1]) == 0 else 1 / 1000  # "zero" or sigma at t_0
    return x.double(), torch.cat([grid, torch.tensor([last], dtype=torch.float64)])


def ours(solver, grid, net) -> torch.Tensor:
    return sample(ModelWrapper(net, SCHEDULE, "epsilon"), x_start(), solver, grid).x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize(
    ("algorithm", "solver_type", "cls", "final"),
    [
        ("dpmsolver++", "midpoint", DPMSolverPP, "zero"),
        ("dpmsolver++", "midpoint", DPMSolverPP, "sigma_min"),
        ("dpmsolver++", "heun", DPMSolverPP, "zero"),
        ("dpmsolver++", "heun", DPMSolverPP, "sigma_min"),
        ("dpmsolver", "midpoint", DPMSolver, "sigma_min"),  # diffusers: no "zero" for dpmsolver
        ("dpmsolver", "heun", DPMSolver, "sigma_min"),
    ],
)
def test_dpm_solver_2m(algorithm, solver_type, cls, final, steps, net):
    theirs, grid = run_diffusers(
        diffusers.DPMSolverMultistepScheduler,
        steps,
        NETWORKS[net],
        solver_order=2,
        algorithm_type=algorithm,
        solver_type=solver_type,
        final_sigmas_type=final,
    )
    solver = cls(
        2,
        solver_type="taylor" if solver_type == "heun" else "midpoint",
        lower_order_final=steps < 15,
    )
    assert rel_err(ours(solver, grid, NETWORKS[net]), theirs) <= 1e-5


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc(variant, order, steps, net):
    # bh1 with diffusers' default final_sigmas_type="zero" returns NaN (see below)
    final = "zero" if variant == "bh2" else "sigma_min"
    theirs, grid = run_diffusers(
        diffusers.UniPCMultistepScheduler,
        steps,
        NETWORKS[net],
        solver_order=order,
        solver_type=variant,
        final_sigmas_type=final,
    )
    assert rel_err(ours(UniPC(order, variant), grid, NETWORKS[net]), theirs) <= 1e-5


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis(order, steps, net):
    theirs, grid = run_diffusers(
        diffusers.DEISMultistepScheduler, steps, NETWORKS[net], solver_order=order
    )
    solver = DEIS(order, basis="log_rho", lower_order_final=steps < 15)
    assert rel_err(ours(solver, grid, NETWORKS[net]), theirs) <= 1e-5


def test_unipc_bh1_final_zero_deviation():
    """diffusers' bh1 with a final sigma of 0 multiplies B(h) = -inf by a zero correction."""
    theirs, grid = run_diffusers(
        diffusers.UniPCMultistepScheduler,
        10,
        gaussian_eps,
        solver_order=2,
        solver_type="bh1",
        final_sigmas_type="zero",
    )
    result = ours(UniPC(2, "bh1"), grid, gaussian_eps)
    assert torch.isfinite(result).all()
    if not torch.isnan(theirs).any():  # fixed upstream: then the two must agree
        assert rel_err(result, theirs) <= 1e-5


def diffusers_3m_plan(grid: torch.Tensor) -> StepPlan:
    """DPM-Solver++ 3M with diffusers' (and the official code's) weights: the second-derivative
    term carries hφ₃ instead of the Taylor coefficient 2hφ₃."""
    v = GridValues.of(SCHEDULE, grid)
    orders = multistep_orders(v, 3, len(grid) - 1 < 15)

    def predictor(i: int, p: int) -> Update:
        e = v.exp_step("data", i, i + 1)
        nodes = v.nodes(i, range(i, i - p, -1))
        if p < 3:  # warm-up and final steps: diffusers' default 2M is the midpoint form
            w = ei_weights(e, nodes, "midpoint")
        else:  # Taylor would be [coef0, coef1, 2 coef2]
            w = solve_vandermonde(nodes, [e.coef(0), e.coef(1), e.coef(2)])
        return Update(e.a, tuple(w), "data")

    return multistep_plan(v, orders, predictor)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_3m_differs_from_diffusers_by_the_second_derivative_weight(steps):
    theirs, grid = run_diffusers(
        diffusers.DPMSolverMultistepScheduler,
        steps,
        gaussian_eps,
        solver_order=3,
        final_sigmas_type="sigma_min",
    )
    model = ModelWrapper(gaussian_eps, SCHEDULE, "epsilon")
    solver = DPMSolverPP(3, lower_order_final=steps < 15)
    reproduced = sample(model, x_start(), solver, plan=diffusers_3m_plan(grid)).x
    assert rel_err(reproduced, theirs) <= 1e-5  # the difference is exactly that weight ...
    assert rel_err(ours(solver, grid, gaussian_eps), theirs) > 1e-3  # ... and it is not small


def test_dpm_solver_3m_orders_ours_3_diffusers_2():
    """On logSNR grids the measured orders are ~3 (ours) and ~2 (diffusers' weights)."""
    model = GAUSSIAN.denoiser(SCHEDULE)
    t_end = float(SCHEDULE.t_of_lambda(2.0))
    steps, err_ours, err_theirs = (40, 80, 160), [], []
    for n in steps:
        grid = grids.logsnr_uniform(SCHEDULE, n, t_end=t_end)
        exact = GAUSSIAN.solution(x_start(), 1.0, t_end, SCHEDULE)
        solver = DPMSolverPP(3, lower_order_final=False)
        err_ours.append(float((sample(model, x_start(), solver, grid).x - exact).abs().max()))
        plan = diffusers_3m_plan(grid)
        theirs = sample(model, x_start(), solver, plan=plan).x
        err_theirs.append(float((theirs - exact).abs().max()))
    slope = lambda e: -np.polyfit(np.log(steps), np.log(e), 1)[0]  # noqa: E731
    assert abs(slope(err_ours) - 3) < 0.3
    assert abs(slope(err_theirs) - 2) < 0.3
    assert math.isfinite(slope(err_theirs))


@pytest.mark.parametrize(
    ("algorithm", "solver_type", "order"),
    [
        ("sde-dpmsolver++", "midpoint", 1),
        ("sde-dpmsolver++", "midpoint", 2),
        ("sde-dpmsolver++", "heun", 2),
        ("sde-dpmsolver", "midpoint", 2),
        ("sde-dpmsolver", "heun", 2),
    ],
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sde_adapter_equals_diffusers_given_the_same_generator(algorithm, solver_type, order):
    """``algorithm_type="sde-dpmsolver++"`` / ``"sde-dpmsolver"``: teacher-forced, each step of
    the adapter equals diffusers' to ≤ 1e-5 relative, drawing the same noise from the same
    generator seed."""
    import diffusers

    from diffsolve.integrations.diffusers import DiffsolveDPMSolverPPScheduler

    options = {"algorithm_type": algorithm, "solver_type": solver_type, "solver_order": order}
    if algorithm == "sde-dpmsolver":  # diffusers refuses its default final sigma there
        options["final_sigmas_type"] = "sigma_min"
    theirs = diffusers.DPMSolverMultistepScheduler(**options)
    ours = DiffsolveDPMSolverPPScheduler.from_config(theirs.config)
    theirs.set_timesteps(12)
    ours.set_timesteps(12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    g_theirs, g_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in theirs.timesteps:
        out = 0.5 * torch.randn(2, 4, 8, 8, generator=g) + 0.1 * x
        expected = theirs.step(out, t, x, generator=g_theirs).prev_sample
        got = ours.step(out, t, x.clone(), generator=g_ours).prev_sample
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        x = expected


def test_sde_3m_differs_from_diffusers_by_the_second_difference_weight():
    """diffusers' 3M SDE weights D2 by α(((1 - e^{-2h} - 2h)/(2h)² - 0.5)), which tends to -α
    as h → 0 (an O(1) weight on an O(h²) difference); the exact integral of the quadratic
    interpolant weights it by α((1 - e^{-2h} - 2h)/(2h²) + 1) → 0. On the Gaussian oracle
    ours converges (tests/test_stochastic.py); the two differ by O(h²) per step."""
    h = 1e-3
    theirs = (1 - math.exp(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5
    exact = (1 - math.exp(-2 * h) - 2 * h) / (2 * h * h) + 1
    assert theirs == pytest.approx(-1.0, abs=1e-3) and exact == pytest.approx(0.0, abs=1e-3)
