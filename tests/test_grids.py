import math

import pytest
import torch

from conftest import SCHEDULES
from diffsolve import EDM, VPDiscrete, grids


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("kind", sorted(grids.GRIDS))
def test_generators_land_exactly_on_both_ends(name, kind):
    s = SCHEDULES[name]()
    g = grids.make_grid(s, 12, kind)
    assert g.dtype == torch.float64 and g.numel() == 13
    assert (g[0].item(), g[-1].item()) == s.default_range
    assert (g[1:] < g[:-1]).all()


def test_logsnr_grid_is_uniform_in_lambda():
    s = VPDiscrete.from_diffusers()
    lam = s.lambda_(grids.logsnr_uniform(s, 10))
    step = torch.full((10,), float(lam[1] - lam[0]), dtype=torch.float64)
    torch.testing.assert_close(lam[1:] - lam[:-1], step)


def test_karras_grid_on_edm_is_the_paper_formula():
    s = EDM()
    g = grids.karras(s, 18, rho=7)
    i = torch.arange(19, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)


def test_append_zero_and_quadratic():
    s = VPDiscrete.from_diffusers()
    g = grids.append_zero(s, grids.time_quadratic(s, 4))
    assert g[-1] == 0 and g.numel() == 6
    assert math.isclose(float(grids.time_quadratic(s, 4)[2]), ((1 + 0.001**0.5) / 2) ** 2)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([0.9, 0.5, 0.7], "strictly decreasing"),
        ([0.9, 0.5, 0.5, 0.1], "duplicate time point t=0.5 at index 1"),
        ([1.5, 0.5], r"must lie in \[0, 1.0\]"),
        ([0.5, -0.1], r"must lie in \[0, 1.0\]"),
        ([0.5, float("nan")], "finite"),
        ([0.5], "at least 2 time points"),
        ([0.9, 0.0, 0.0], "duplicate"),
    ],
)
def test_bad_grids_raise_clear_errors(grid, message):
    with pytest.raises(ValueError, match=message):
        grids.custom(VPDiscrete.from_diffusers(), grid)


def test_bad_generator_arguments():
    s = VPDiscrete.from_diffusers()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        grids.logsnr_uniform(s, 0)
    with pytest.raises(ValueError, match="t_start must be greater than t_end"):
        grids.time_uniform(s, 4, t_start=0.1, t_end=0.5)
    with pytest.raises(ValueError, match="grid kind must be one of"):
        grids.make_grid(s, 4, "fibonacci")
    with pytest.raises(ValueError, match="t_end must be > 0"):
        grids.logsnr_uniform(s, 4, t_end=0.0)
    with pytest.raises(ValueError, match="rho must be > 0"):
        grids.karras(s, 4, rho=0)


@pytest.mark.parametrize("kind", ["time_uniform", "time_quadratic", "logsnr", "karras"])
def test_nfe_grids_never_evaluate_below_the_first_training_step(kind):
    """At any step count 1-1000 the model is evaluated only at t >= 1/N (timestep >= 0); the
    last step to t = 0 stays the free x̂₀ step."""
    from diffsolve.solvers.registry import nfe_grid

    schedule = VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)
    for steps in [*range(1, 60), 100, 250, 999, 1000]:
        grid = nfe_grid(schedule, steps, kind)
        assert grid.numel() == steps + 1 and float(grid[-1]) == 0.0
        assert float(grid[:-1].min()) >= 1e-3 * (1 - 1e-12), (kind, steps)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_time_shifted_is_flow_matchs_spacing(shift):
    """On rectified flow (t = σ) the shifted grid is diffusers' FlowMatchEulerDiscrete sigmas
    (its `shift`), given the same two ends; shift 1 is the time-uniform grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffsolve.ode.schedule import RectifiedFlow

    schedule = RectifiedFlow(t_max=1.0)
    peer = FlowMatchEulerDiscreteScheduler(shift=shift)
    peer.set_timesteps(10)
    sigmas = peer.sigmas[:-1].double()
    ours = grids.time_shifted(schedule, 9, float(sigmas[0]), float(sigmas[-1]), shift=shift)
    torch.testing.assert_close(ours, sigmas, rtol=1e-6, atol=1e-7)
    if shift == 1.0:
        uniform = grids.time_uniform(schedule, 9, *sigmas[[0, -1]].tolist())
        torch.testing.assert_close(ours, uniform)
    edm = grids.time_shifted(EDM(), 5, shift=shift)  # warped in t / t_max
    assert (edm[1:] < edm[:-1]).all() and tuple(edm[[0, -1]].tolist()) == EDM().default_range


@pytest.mark.parametrize(
    ("family", "schedule", "expected"),
    [
        ("DDPM linear", lambda: VPDiscrete.from_diffusers(), "time_quadratic"),
        ("SD scaled-linear", lambda: _scaled_linear(), "time_quadratic"),
        ("zero terminal SNR", lambda: _zero_snr(), "time_quadratic"),
        ("cosine (discrete)", lambda: _cosine(), "time_uniform"),
        ("cosine (continuous)", lambda: _schedule("VPCosine"), "time_uniform"),
        ("cosine, ε from λ -5.1", lambda: _cosine().for_prediction("epsilon"), "karras"),
        ("rectified flow", lambda: _schedule("RectifiedFlow"), "time_uniform"),
        ("flow, shift 3", lambda: _schedule("RectifiedFlow", shift=3.0), "time_shifted"),
        ("EDM", lambda: _schedule("EDM"), "karras"),
    ],
)  # fmt: skip
def test_the_default_grid_is_a_rule_of_the_schedule(family, schedule, expected):
    """Every solver without a grid of its own takes the schedule's rule (BENCHMARKS.md,
    "Defaults on every schedule"): quadratic where SNR 1 sits in the clean 40% of the time
    range, uniform where mid-range, the model's own flow shift, Karras on EDM (logsnr from
    third order); every grid ends at t = 0."""
    from diffsolve.solvers.registry import nfe_grid, schedule_grid_kind, setup_solver

    sched = schedule()
    assert schedule_grid_kind(sched) == expected, family
    for name in ("dpm-solver++-2m", "unipc-bh2-2", "ddim"):
        _, grid = setup_solver(name, sched, 8)
        torch.testing.assert_close(grid, nfe_grid(sched, grid.numel() - 1, expected))
        assert float(grid[-1]) == 0.0
    third = "logsnr" if expected == "karras" else expected
    _, grid = setup_solver("dpm-solver++-3m", sched, 8)
    torch.testing.assert_close(grid, nfe_grid(sched, grid.numel() - 1, third))


def test_a_solver_with_a_grid_of_its_own_keeps_it_except_on_flow():
    from diffsolve.solvers.registry import nfe_grid, setup_solver

    vp = VPDiscrete.from_diffusers()
    _, grid = setup_solver("heun", vp, 9)  # EDM's Algorithm 1: Karras
    torch.testing.assert_close(grid, nfe_grid(vp, grid.numel() - 1, "karras"))
    flow = _schedule("RectifiedFlow")
    _, grid = setup_solver("heun", flow, 9)  # Karras in sigma/alpha is no grid for a flow
    torch.testing.assert_close(grid, nfe_grid(flow, grid.numel() - 1, "time_uniform"))


def _schedule(kind: str, **options):
    import diffsolve

    return getattr(diffsolve, kind)(**options)


def _scaled_linear():
    return VPDiscrete.from_diffusers("scaled_linear", 0.00085, 0.012)


def _cosine():
    return VPDiscrete.from_diffusers("squaredcos_cap_v2")


def _zero_snr():
    from diffsolve.integrations.diffusers.config import diffusers_schedule

    return diffusers_schedule(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        rescale_betas_zero_snr=True,
    )  # fmt: skip
