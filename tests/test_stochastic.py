"""Stochastic samplers: weak order on the Gaussian oracle (exact law, no Monte Carlo),
identities between them, per-seed noise, and the paths every solver takes (CLI, k-diffusion,
teleportation)."""

from __future__ import annotations

import math

import pytest
import torch

from diffsolve import EDM, GaussianModel, RectifiedFlow, VPDiscrete, sample
from diffsolve.ode import grids
from diffsolve.ode.noise import SeededNoise
from diffsolve.solvers import (
    DDPM,
    EDMStochastic,
    EulerAncestral,
    SASolver,
    SDEDPMSolver,
    SDEDPMSolverPP,
)

F64 = torch.float64
MEAN = torch.tensor([0.5, -0.3], dtype=F64)
COV = torch.tensor([[0.3, 0.1], [0.1, 0.08]], dtype=F64)
#: (solver, weak order it must show). The exponential SDE integrators treat the linear part
#: and the noise exactly, so only the interpolation of x̂₀ along the (rough) path errs: first
#: order, or second with a multistep correction; the quadratic (3M) does not reach a third.
WEAK_ORDERS = {
    "sde-dpm-solver++-1": (SDEDPMSolverPP(1), 1),
    "sde-dpm-solver++-2m": (SDEDPMSolverPP(2), 2),
    "sde-dpm-solver++-2m-heun": (SDEDPMSolverPP(2, solver_type="heun"), 2),
    "sde-dpm-solver++-3m": (SDEDPMSolverPP(3), 2),
    "sde-dpm-solver-1": (SDEDPMSolver(1), 1),
    "sde-dpm-solver-2m": (SDEDPMSolver(2), 2),
    "sde-dpm-solver-3m": (SDEDPMSolver(3), 2),
    "ddpm-eta-0.5": (DDPM(0.5), 1),
    "euler-ancestral": (EulerAncestral(), 1),
    "edm-churn": (EDMStochastic(s_churn=10, s_tmin=0, s_tmax=1e9, s_noise=1.0), 1),
    "sa-solver-2-2": (SASolver(2, 2, tau_window=(0.0, 1.0)), 2),
    "sa-solver-3-4": (SASolver(3, 4, tau_window=(0.0, 1.0)), 2),
    "sa-solver-default": (SASolver(), 2),
}
SCHEDULES = {"vp": VPDiscrete.from_diffusers, "flow": RectifiedFlow, "edm": EDM}


class BasisNoise:
    """A noise source that makes the sampler's output law computable exactly: row 0 draws
    no noise, rows ``1..d`` none either (they carry the start's basis), and row
    ``1 + d + (2·step + draw)·d + j`` draws the unit vector ``e_j`` at that draw only."""

    def __init__(self, d: int, steps: int) -> None:
        self.d, self.rows = d, 1 + d + 2 * steps * d

    def __call__(self, step: int, like: torch.Tensor, draw: int = 0) -> torch.Tensor:
        z = torch.zeros_like(like)
        base = 1 + self.d + (2 * step + draw) * self.d
        for j in range(self.d):
            z[base + j, j] = 1.0
        return z


def _law(schedule, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    return a * MEAN, a * a * COV + s * s * torch.eye(2, dtype=F64)


def exact_law(schedule, solver, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the sampler's output from the exact marginal at ``grid[0]``:
    on the Gaussian oracle every step is affine in the state and the noise, so the output is
    ``out(mean) + Σ J_k ξ_k``, read off by running the basis vectors (BasisNoise)."""
    denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
    m0, v0 = _law(schedule, float(grid[0]))
    source = BasisNoise(2, grid.numel() - 1)
    x = m0.expand(source.rows, 2).clone()
    x[1:3] += torch.linalg.cholesky(v0).T
    out = sample(denoiser, x, solver, grid, noise=source).x
    dev = out[1:] - out[0]
    return out[0], dev.T @ dev


def weak_errors(schedule, solver, steps=(8, 16, 32, 64)) -> list[float]:
    t_start = float(schedule.t_of_lambda(torch.tensor(-3.0, dtype=F64)))
    t_end = float(schedule.t_of_lambda(torch.tensor(2.0, dtype=F64)))
    mean, cov = _law(schedule, t_end)
    errors = []
    for n in steps:
        m, v = exact_law(schedule, solver, grids.logsnr_uniform(schedule, n, t_start, t_end))
        errors.append(float((m - mean).abs().max() + (v - cov).abs().max()))
    return errors


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", sorted(WEAK_ORDERS))
def test_weak_order_on_the_gaussian_oracle(name, schedule):
    """The final law's mean and covariance converge to the exact marginal at the declared
    weak order, at 4 step sizes (8–64 logSNR steps), exactly (no sampling error)."""
    solver, order = WEAK_ORDERS[name]
    errors = weak_errors(SCHEDULES[schedule](), solver)
    assert all(math.isfinite(e) for e in errors)
    observed = math.log2(errors[-2] / errors[-1])
    assert observed > order - 0.35, (errors, observed)
    assert errors[-1] < 0.05


def test_ddpm_euler_ancestral_and_first_order_sde_dpm_solver_pp_are_one_method():
    """DDPM's ancestral step, k-diffusion's Euler ancestral and SDE-DPM-Solver++(1) are the
    same update on every schedule (given the same noise, the same samples)."""
    for schedule in (VPDiscrete.from_diffusers(), RectifiedFlow(), EDM()):
        denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
        grid = grids.time_uniform(schedule, 12)
        x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
        x = x * schedule.init_noise_sigma()
        outs = [
            sample(denoiser, x, s, grid, noise=[1, 2, 3, 4, 5]).x
            for s in (DDPM(), EulerAncestral(), SDEDPMSolverPP(1))
        ]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-10)


def test_sa_solver_contains_the_sde_solvers():
    """SA-Solver with τ = 1 everywhere and no corrector is SDE-DPM-Solver++ (order 1; order 2
    is its ``heun`` form, the exact linear interpolant); τ = 0 is deterministic."""
    schedule = VPDiscrete.from_diffusers()
    denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
    grid = grids.time_uniform(schedule, 10)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    seeds = [1, 2, 3, 4]
    pairs = [
        (SASolver(1, 0, tau_window=(0.0, 1.0)), SDEDPMSolverPP(1)),
        (SASolver(2, 0, tau_window=(0.0, 1.0)), SDEDPMSolverPP(2, solver_type="heun")),
    ]
    for sa, sde in pairs:
        torch.testing.assert_close(
            sample(denoiser, x, sa, grid, noise=seeds).x,
            sample(denoiser, x, sde, grid, noise=seeds).x,
            rtol=1e-10,
            atol=1e-10,
        )
    quiet = SASolver(tau=0.0)
    torch.testing.assert_close(
        sample(denoiser, x, quiet, grid, noise=seeds).x,
        sample(denoiser, x, quiet, grid, noise=[9, 9, 9, 9]).x,
    )


def test_ddim_eta_zero_is_ddim():
    from diffsolve import DDIM

    schedule = VPDiscrete.from_diffusers()
    denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
    grid = grids.time_uniform(schedule, 10)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        sample(denoiser, x, DDPM(eta=0.0), grid).x, sample(denoiser, x, DDIM(), grid).x
    )


def test_a_sample_depends_on_its_seed_only():
    """Per-seed noise: the same seed gives the same sample in any batch, at any position."""
    schedule = VPDiscrete.from_diffusers()
    denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
    grid = grids.time_uniform(schedule, 10)
    seeds = [7, 3, 11, 5]
    x = torch.stack(
        [torch.randn(2, dtype=F64, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    solver = SDEDPMSolverPP(2)
    whole = sample(denoiser, x, solver, grid, noise=seeds).x
    part = sample(denoiser, x[[2, 0]], solver, grid, noise=[seeds[2], seeds[0]]).x
    torch.testing.assert_close(part, whole[[2, 0]], rtol=0, atol=1e-13)
    other = sample(denoiser, x, solver, grid, noise=[s + 100 for s in seeds]).x
    assert (other - whole).abs().max() > 1e-3  # the noise is the seeds'
    with pytest.raises(ValueError, match="one seed per sample"):
        SeededNoise([1, 2])(0, x)


def test_a_generator_and_the_global_generator_reproduce():
    schedule = RectifiedFlow()
    denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
    grid = grids.time_uniform(schedule, 8)
    x = torch.zeros(3, 2, dtype=F64) + 0.3
    runs = [
        sample(denoiser, x, EDMStochastic(), grid, noise=torch.Generator().manual_seed(4)).x
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.manual_seed(9)
    first = sample(denoiser, x, EulerAncestral(), grid).x
    torch.manual_seed(9)
    torch.testing.assert_close(sample(denoiser, x, EulerAncestral(), grid).x, first)


def test_stochastic_samplers_refuse_to_invert_and_bad_options():
    from diffsolve import invert

    schedule = VPDiscrete.from_diffusers()
    denoiser = GaussianModel.from_covariance(MEAN, COV).denoiser(schedule)
    with pytest.raises(ValueError, match="cannot invert"):
        invert(denoiser, torch.zeros(2, 2, dtype=F64), SDEDPMSolverPP(2), [0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="eta must be"):
        DDPM(eta=1.5)
    with pytest.raises(ValueError, match="s_churn"):
        EDMStochastic(s_churn=float("nan"))
    with pytest.raises(ValueError, match="solver_type"):
        SDEDPMSolverPP(2, solver_type="rk4")  # type: ignore[arg-type]


def test_teleportation_carries_the_noise_to_the_inner_sampler():
    from diffsolve import Teleported

    schedule = VPDiscrete.from_diffusers()
    gaussian = GaussianModel.from_covariance(MEAN, COV)
    denoiser = gaussian.denoiser(schedule)
    grid = grids.time_uniform(schedule, 10)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    solver = Teleported(SDEDPMSolverPP(2), gaussian)
    a = sample(denoiser, x, solver, grid, noise=[1, 2, 3]).x
    b = sample(denoiser, x, solver, grid, noise=[1, 2, 3]).x
    c = sample(denoiser, x, solver, grid, noise=[4, 5, 6]).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def test_k_diffusion_entry_point_takes_a_noise_sampler():
    from diffsolve.integrations.k_diffusion import make_sampler

    gaussian = GaussianModel.from_covariance(MEAN, COV)
    edm = EDM()

    def model(x, sigma):
        return gaussian.denoise(x, 1.0, float(sigma[0]))

    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=F64)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 10
    sampler = make_sampler("dpm-solver++-2m-sde")
    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return torch.ones(4, 2, dtype=F64)

    out = sampler(model, x, sigmas, noise_sampler=noise_sampler)
    assert out.shape == x.shape and calls == [(10.0, 3.0), (3.0, 1.0), (1.0, 0.3)]
    assert edm is not None


def test_the_cli_samples_with_a_stochastic_solver_per_seed(tmp_path):
    """``sample --solver dpm-solver++-2m-sde``: seeds 4–7 alone, in batches of 2, equal
    the same seeds of a run of 0–7 (float32 network: to round-off)."""
    import numpy as np
    from click.testing import CliRunner

    from diffsolve.app.cli import main

    def run(seeds: str, out: str, *extra: str) -> np.ndarray:
        args = ["sample", "--model", "digits", "--solver", "dpm-solver++-2m-sde", "--nfe", "6"]
        result = CliRunner().invoke(
            main, [*args, "--seeds", seeds, "--out", str(tmp_path / out), *extra]
        )
        assert result.exit_code == 0, result.output
        return np.load(tmp_path / out / "samples.npz")["samples"]

    whole = run("0-7", "a")
    part = run("4-7", "b", "--batch-size", "2")
    np.testing.assert_allclose(part, whole[4:], atol=1e-5)


def test_the_bench_measures_stochastic_samplers_by_fd(tmp_path):
    """Stochastic contestants (ours and diffusers') get an FD to the reference ODE's samples
    beside the FD to held-out data; deterministic ones do not."""
    import json

    from click.testing import CliRunner

    from diffsolve.app.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--model", "digits", "--nfe", "6", "--samples", "16", "--no-overhead"]
    args += ["--reference-steps", "50", "--json", str(out), "--no-check"]
    args += ["--solvers", "dpm-solver++-2m,dpm-solver++-2m-sde,diffusers:dpm-2m-sde"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert "FD to the reference ODE's samples" in run.output
    rows = {r["solver"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["dpm-solver++-2m"]["fd_ode"] is None
    for name in ("dpm-solver++-2m-sde", "diffusers:dpm-2m-sde"):
        assert rows[name]["fd_ode"] > 0 and math.isfinite(rows[name]["fd"])


def test_guidance_wraps_a_stochastic_sampler(tmp_path):
    """CFG on ``digits-cond`` with an SDE solver: the guided denoiser is the model, the noise
    is the seeds'; a rerun in another folder reproduces it."""
    import numpy as np
    from click.testing import CliRunner

    from diffsolve.app.cli import main

    def run(out: str) -> np.ndarray:
        args = ["sample", "--model", "digits-cond", "--solver", "sa-solver", "--nfe", "6"]
        args += [
            "--seeds",
            "0-3",
            "--guidance",
            "cfg",
            "--scale",
            "3",
            "--out",
            str(tmp_path / out),
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return np.load(tmp_path / out / "samples.npz")["samples"]

    first = run("a")
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(run("b"), first)


def test_tune_refuses_a_stochastic_solver(tmp_path):
    from click.testing import CliRunner

    from diffsolve.app.cli import main

    args = ["tune", "--model", "digits", "--solver", "ddpm", "--nfe", "5"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "t.json")])
    assert result.exit_code != 0 and "is stochastic" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "t.json").exists()
