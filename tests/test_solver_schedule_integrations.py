"""Solver schedules in the integrations (issue 23): the diffusers scheduler given the file
(``DiffsolveSolverScheduleScheduler``, ``solver_schedule_path``) and the k-diffusion entry
point (``solver="schedule:FILE"``) equal :func:`diffsolve.sample` with the same schedule, and
refuse what does not fit in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffsolve import (
    EDM,
    DPMSolverPP,
    GaussianModel,
    ModelWrapper,
    RectifiedFlow,
    SolverContext,
    UniPC,
    VPDiscrete,
    grids,
    sample,
)
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.registry import nfe_grid
from diffsolve.solvers.solver_schedule import (
    ScheduledSolver,
    SolverSchedule,
    StepChoice,
    copy_solver,
    ems_digest,
)
from diffsolve.stats.ems.exact import gaussian_ems
from diffsolve.wrappers.teleport import Teleported

diffusers = pytest.importorskip("diffusers")

from diffsolve.integrations.diffusers import (  # noqa: E402
    DiffsolveDPMSolverPPScheduler,
    DiffsolveSolverScheduleScheduler,
)
from diffsolve.integrations.k_diffusion import make_sampler, sample_denoiser  # noqa: E402
from tiny_pipelines import ddpm_pipeline, run, sd3_pipeline, swap  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

VP = VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)  # DDPMScheduler()'s betas
GAUSSIAN = GaussianModel.random((1, 4, 4), seed=3)


def vp_eps(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """An analytic epsilon-network at (fractional) training timesteps."""
    t = float(VP.t_of_timestep(float(torch.as_tensor(timestep).flatten()[0])))
    a, s = float(VP.alpha(t)), float(VP.sigma(t))
    return (x - a * GAUSSIAN.denoise(x, a, s)) / s


def flow_velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """An analytic rectified-flow network, u = eps - x0, at time input 1000 t."""
    t = float(torch.as_tensor(timestep).flatten()[0]) / 1000
    x0 = GAUSSIAN.denoise(x, 1 - t, t)
    return (x - (1 - t) * x0) / t - x0


def x_start(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def loop(scheduler, net, x: torch.Tensor) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def schedule_file(
    path: Path, schedule, grid: torch.Tensor, choices, teleport: bool = False, ems=None
) -> Path:
    fitted = SolverSchedule(
        times=tuple(grid.tolist()),
        steps=tuple(choices),
        nfe=len(choices),
        noise_schedule=schedule.to_config(),
        teleport=teleport,
        ems=None if ems is None else ems_digest(ems),
        model="test",
        method="copy",
    )
    path.write_text(fitted.to_json())
    return path


MIXED = (
    StepChoice(1, "noise"),
    StepChoice(2, "data", "taylor", corrector="bh2"),
    StepChoice(3, "data", "pseudo", 0.9, "bh1", 3),
    StepChoice(2, "noise", "midpoint", 1.1),
    StepChoice(2, "data", "bh2", corrector="bh2"),
)


# ---------------------------------------------------------------------------------------
# diffusers
def test_the_scheduler_runs_the_file_on_its_times(tmp_path):
    grid = nfe_grid(VP, 5, "time_quadratic")
    path = schedule_file(tmp_path / "s.json", VP, grid, MIXED)
    scheduler = DiffsolveSolverScheduleScheduler(solver_schedule_path=str(path))
    scheduler.set_timesteps(5)
    assert torch.equal(scheduler.grid, grid)
    assert torch.equal(scheduler.timesteps, (grid[:-1] * 1000 - 1).float())
    model = ModelWrapper(vp_eps, scheduler.schedule, "epsilon")
    ours = sample(model, x_start(), ScheduledSolver(MIXED), grid).x
    assert rel_err(loop(scheduler, vp_eps, x_start()), ours) <= 1e-6
    with pytest.raises(ValueError, match=r"spends 5 model evaluations.*num_inference_steps=5"):
        scheduler.set_timesteps(6)
    # img2img: the remaining choices from the begin index
    scheduler.set_timesteps(5)
    scheduler.set_begin_index(2)
    x = x_start()
    for t in scheduler.timesteps[2:]:
        x = scheduler.step(vp_eps(x, t), t, x).prev_sample
    rest = sample(model, x_start(), ScheduledSolver(MIXED[2:]), grid[2:]).x
    assert rel_err(x, rest) <= 1e-6


def test_the_scheduler_refuses_what_does_not_fit(tmp_path):
    grid = nfe_grid(VP, 5, "time_quadratic")
    path = schedule_file(tmp_path / "s.json", VP, grid, MIXED)
    cases = {
        "solver_schedule_path": {},
        "grid='logsnr'": {"solver_schedule_path": str(path), "grid": "logsnr"},
        "ems_path: the solver schedule": {
            "solver_schedule_path": str(path),
            "ems_path": str(tmp_path / "ems.safetensors"),
        },
        "fitted under the noise schedule": {
            "solver_schedule_path": str(path),
            "beta_schedule": "scaled_linear",
        },
    }
    for message, config in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            DiffsolveSolverScheduleScheduler(**config)
        assert "\n" not in str(err.value)
    flow = schedule_file(tmp_path / "flow.json", RectifiedFlow(), grid[1:], MIXED[1:])
    with pytest.raises(ValueError, match="fitted under the noise schedule RectifiedFlow"):
        DiffsolveSolverScheduleScheduler(solver_schedule_path=str(flow))
    jump = schedule_file(tmp_path / "jump.json", VP, grid, MIXED[1:], teleport=True)
    with pytest.raises(ValueError, match="starts with a Gaussian teleport"):
        DiffsolveSolverScheduleScheduler(solver_schedule_path=str(jump))
    # v3's feature: the EMS it was fitted with, by digest
    ems = gaussian_ems(GAUSSIAN, VP, 40)
    other = gaussian_ems(GaussianModel.random((1, 4, 4), seed=4), VP, 40)
    ems_path = ems.save(tmp_path / "ems.safetensors")
    other_path = other.save(tmp_path / "other.safetensors")
    choices = copy_solver(DPMSolverV3(ems, 2), VP, grid)
    v3 = schedule_file(tmp_path / "v3.json", VP, grid, choices, ems=ems)
    with pytest.raises(ValueError, match="ems_path"):
        DiffsolveSolverScheduleScheduler(solver_schedule_path=str(v3))
    with pytest.raises(ValueError, match="fitted with other EMS"):
        DiffsolveSolverScheduleScheduler(solver_schedule_path=str(v3), ems_path=str(other_path))
    scheduler = DiffsolveSolverScheduleScheduler(
        solver_schedule_path=str(v3), ems_path=str(ems_path)
    )
    scheduler.set_timesteps(5)
    model = ModelWrapper(vp_eps, scheduler.schedule, "epsilon")
    ours = sample(model, x_start(), DPMSolverV3(ems, 2), grid).x
    assert rel_err(loop(scheduler, vp_eps, x_start()), ours) <= 1e-6


def test_a_flow_schedule_from_pure_noise_runs_from_a_flowmatch_config(tmp_path):
    flow = RectifiedFlow(t_max=1.0)
    grid = torch.linspace(1.0, 0.0, 7, dtype=torch.float64)
    choices = copy_solver(UniPC(3, "bh2"), flow, grid)
    path = schedule_file(tmp_path / "flow.json", RectifiedFlow(), grid, choices)
    config = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    scheduler = DiffsolveSolverScheduleScheduler.from_config(
        config, solver_schedule_path=str(path)
    )
    scheduler.set_timesteps(6)
    assert float(scheduler.grid[0]) == 1.0
    assert torch.allclose(scheduler.timesteps.double(), 1000 * grid[:-1], rtol=1e-6)
    model = ModelWrapper(flow_velocity, flow, "flow", time_input=lambda t: 1000 * t)
    ours = sample(model, x_start(), UniPC(3, "bh2"), grid).x
    assert rel_err(loop(scheduler, flow_velocity, x_start()), ours) <= 1e-6
    # custom sigmas (as Flux passes them) with one step per choice: the choices on them
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / 6, 6).tolist())
    assert len(scheduler.timesteps) == 6
    with pytest.raises(ValueError, match="takes 6 steps, one per choice"):
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.2, 5).tolist())


def test_pipelines_run_the_file(tmp_path):
    """Tiny pipelines with random weights: DDPM with the copy of DPM-Solver++(2M) equals
    the DPM-Solver++ adapter on the same grid; SD3 (flow) runs the file at its NFE; a saved
    scheduler folder carries the file."""
    pp = DiffsolveDPMSolverPPScheduler.from_config(
        diffusers.DDPMScheduler().config, grid="time_quadratic"
    )
    pp.set_timesteps(6)
    grid = pp.grid
    choices = copy_solver(DPMSolverPP(2), pp.schedule, grid)
    path = schedule_file(tmp_path / "pp.json", pp.schedule, grid, choices)
    pipe = swap(ddpm_pipeline(), DiffsolveSolverScheduleScheduler, solver_schedule_path=str(path))
    with_file = run(pipe, steps=6)
    plain = swap(ddpm_pipeline(), DiffsolveDPMSolverPPScheduler, grid="time_quadratic")
    reference = run(plain, steps=6)
    assert torch.isfinite(with_file).all()
    assert float((with_file - reference).abs().max()) <= 1e-5
    # a saved pipeline carries the file, and loads back after it has moved
    pipe.save_pretrained(tmp_path / "saved")
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "moved")
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler).__name__ == "DiffsolveSolverScheduleScheduler"
    assert Path(again.scheduler.config.solver_schedule_path) == (
        tmp_path / "moved" / "scheduler" / "pp.json"
    )
    assert rel_err(run(again, steps=6), with_file) <= 1e-6
    # SD3 (flow matching, shift 3): the file's own times from sigma = 1
    flow_grid = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    flow = schedule_file(
        tmp_path / "flow.json",
        RectifiedFlow(),
        flow_grid,
        copy_solver(UniPC(2, "bh2"), RectifiedFlow(t_max=1.0), flow_grid),
    )
    sd3 = swap(sd3_pipeline(), DiffsolveSolverScheduleScheduler, solver_schedule_path=str(flow))
    latents = run(sd3, steps=4, guidance_scale=1.0)
    assert torch.isfinite(latents).all()
    assert torch.allclose(sd3.scheduler.timesteps.double(), 1000 * flow_grid[:-1], rtol=1e-6)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        run(sd3, steps=5, guidance_scale=1.0)


# ---------------------------------------------------------------------------------------
# k-diffusion
VECTOR = GaussianModel.random((6,), seed=1)


def edm_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return VECTOR.denoise(x, 1.0, float(sigma[0]))


def test_k_diffusion_runs_the_file_on_the_users_sigmas(tmp_path):
    schedule = EDM(0.002, 80.0)
    sigmas = grids.append_zero(schedule, grids.karras(schedule, 6))
    assert sigmas.numel() == 8  # 7 steps, the last to sigma = 0
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    choices = copy_solver(UniPC(3, "bh2"), schedule, sigmas)
    path = schedule_file(tmp_path / "s.json", VP, nfe_grid(VP, 7, "logsnr"), choices)
    name = f"schedule:{path}"
    out = sample_denoiser(edm_denoiser, x, sigmas, solver=name)
    theirs = sample_denoiser(edm_denoiser, x, sigmas, solver="unipc-bh2-3")
    assert rel_err(out, theirs) <= 1e-12
    assert torch.equal(make_sampler(name)(edm_denoiser, x, sigmas), out)
    with pytest.raises(ValueError, match="takes 7 steps, one choice per step: pass 8 sigmas"):
        sample_denoiser(edm_denoiser, x, sigmas[2:], solver=name)
    # v3's feature with the context's EMS (made for the EDM schedule), checked by digest
    ems = gaussian_ems(VECTOR, schedule, 100)
    v3 = copy_solver(DPMSolverV3(ems, 2), schedule, sigmas)
    path = schedule_file(tmp_path / "v3.json", schedule, sigmas, v3, ems=ems)
    name = f"schedule:{path}"
    out = sample_denoiser(edm_denoiser, x, sigmas, solver=name, context=SolverContext(ems=ems))
    ours = sample(VECTOR.denoiser(schedule), x, DPMSolverV3(ems, 2), sigmas).x
    assert rel_err(out, ours) <= 1e-10
    with pytest.raises(ValueError, match="needs the model's empirical model statistics"):
        sample_denoiser(edm_denoiser, x, sigmas, solver=name)
    other = gaussian_ems(GaussianModel.random((6,), seed=2), schedule, 100)
    with pytest.raises(ValueError, match="fitted with other EMS"):
        sample_denoiser(edm_denoiser, x, sigmas, solver=name, context=SolverContext(ems=other))
    # a teleport first: one more sigma, and the Gaussian statistics
    after = copy_solver(UniPC(3, "bh2"), schedule, sigmas[1:])
    jump = schedule_file(tmp_path / "jump.json", schedule, sigmas, after, teleport=True)
    with pytest.raises(ValueError, match="needs Gaussian statistics"):
        sample_denoiser(edm_denoiser, x, sigmas, solver=f"schedule:{jump}")
    out = sample_denoiser(
        edm_denoiser, x, sigmas, solver=f"schedule:{jump}", context=SolverContext(gaussian=VECTOR)
    )
    wrapped = Teleported(UniPC(3, "bh2"), VECTOR)
    assert rel_err(out, sample(VECTOR.denoiser(schedule), x, wrapped, sigmas).x) <= 1e-12
