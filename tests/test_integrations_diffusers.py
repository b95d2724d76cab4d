"""The diffusers scheduler adapter and the k-diffusion entry point equal diffsolve's own loop.

(The contract points diffusers' own scheduler tests check, and the equality with each sibling
diffusers scheduler, are in ``tests/test_diffusers_conformance.py``; real pipelines in
``tests/test_diffusers_pipelines.py``.)

* every scheduler's diffusers-style loop equals :func:`diffsolve.sample` on the same grid;
* the exported ``digits-diffusers`` DDPMPipeline run with our schedulers equals ``sample()`` of
  the ``digits`` demo on the same per-seed noise;
* ``set_timesteps`` leaves no stale state; steps follow an internal counter;
* configs round-trip and accept diffusers' DDPM keys.
"""

import subprocess
import sys

import pytest
import torch

from diffsolve import (
    DDIM,
    DEIS,
    EDM,
    DPMSolverPP,
    GaussianModel,
    ModelWrapper,
    RectifiedFlow,
    UniPC,
    VPDiscrete,
    grids,
    sample,
)
from diffsolve.app.loader import demo_path, load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.solvers.registry import nfe_grid

diffusers = pytest.importorskip("diffusers")

from diffsolve.app.diffusers_export import digits_unet_to_diffusers  # noqa: E402
from diffsolve.integrations.diffusers import (  # noqa: E402
    DiffsolveDDIMScheduler,
    DiffsolveDEISScheduler,
    DiffsolveDPMSolverPPScheduler,
    DiffsolveUniPCScheduler,
    DPMSolverV3Scheduler,
    shift_flow_times,
)
from diffsolve.integrations.k_diffusion import make_sampler, sample_denoiser  # noqa: E402
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3  # noqa: E402

SCHEDULE = VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)
GAUSSIAN = GaussianModel.random((1, 4, 4), seed=3)
DEMO = demo_path("digits-diffusers")


pytestmark = pytest.mark.usefixtures("single_thread")


def vp_eps(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """An analytic epsilon-network at (fractional) training timesteps."""
    t = float(SCHEDULE.t_of_timestep(float(torch.as_tensor(timestep).flatten()[0])))
    a, s = float(SCHEDULE.alpha(t)), float(SCHEDULE.sigma(t))
    return (x - a * GAUSSIAN.denoise(x, a, s)) / s


def flow_velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """An analytic rectified-flow network, u = eps - x0, at time input 1000 t."""
    t = float(torch.as_tensor(timestep).flatten()[0]) / 1000
    x0 = GAUSSIAN.denoise(x, 1 - t, t)
    return (x - (1 - t) * x0) / t - x0


def x_start(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def loop(scheduler, net, x: torch.Tensor) -> torch.Tensor:
    """diffusers' denoising loop."""
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(net(x_in, t), t, x).prev_sample
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = {
    "ddim": (DiffsolveDDIMScheduler, {"clip_sample": False}, DDIM()),
    "dpm++2m": (DiffsolveDPMSolverPPScheduler, {}, DPMSolverPP(2)),
    "dpm++3m-heun": (
        DiffsolveDPMSolverPPScheduler,
        {"solver_order": 3, "solver_type": "heun"},
        DPMSolverPP(3, solver_type="taylor"),
    ),
    "unipc-bh1-3": (
        DiffsolveUniPCScheduler,
        {"solver_order": 3, "solver_type": "bh1"},
        UniPC(3, "bh1"),
    ),
    "unipc-bh2-noise": (
        DiffsolveUniPCScheduler,
        {"predict_x0": False, "disable_corrector": [2]},
        UniPC(2, "bh2", space="noise", disable_corrector=(2,)),
    ),
    "deis-3": (DiffsolveDEISScheduler, {"solver_order": 3}, DEIS(3, basis="log_rho")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scheduler_loop_equals_sample(case):
    """On a diffsolve grid kind: fractional timesteps, the registry's grid."""
    cls, options, solver = CASES[case]
    scheduler = cls(grid="time_quadratic", **options)
    scheduler.set_timesteps(8)
    grid = nfe_grid(SCHEDULE, 8, "time_quadratic")
    assert torch.equal(scheduler.grid, grid)
    assert torch.equal(scheduler.timesteps, (grid[:-1] * 1000 - 1).float())
    model = ModelWrapper(vp_eps, scheduler.schedule, "epsilon")
    ours = sample(model, x_start(), solver, grid).x
    assert rel_err(loop(scheduler, vp_eps, x_start()), ours) <= 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_scheduler_loop_on_the_sibling_grid_equals_sample(case):
    """On the sibling's own steps (the default): integer timesteps, sample() on .grid."""
    cls, options, solver = CASES[case]
    scheduler = cls(**options)
    scheduler.set_timesteps(8)
    assert scheduler.timesteps.dtype == torch.int64
    assert torch.equal(scheduler.grid[:-1], (scheduler.timesteps.double() + 1) / 1000)
    model = ModelWrapper(vp_eps, scheduler.schedule, "epsilon")
    ours = sample(model, x_start(), solver, scheduler.grid).x
    assert rel_err(loop(scheduler, vp_eps, x_start()), ours) <= 1e-6


def test_flow_scheduler_equals_sample():
    scheduler = DiffsolveUniPCScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        solver_order=3,
        grid="time_quadratic",
    )
    scheduler.set_timesteps(8)
    flow = RectifiedFlow()
    grid = shift_flow_times(nfe_grid(flow, 8, "time_quadratic"), 3.0, flow.t_max)
    assert float(grid[0]) == pytest.approx(flow.t_max) and float(grid[-1]) == 0.0
    assert torch.allclose(scheduler.timesteps.double(), 1000 * grid[:-1], rtol=1e-6)
    assert torch.allclose(scheduler.sigmas.double(), grid, rtol=1e-6)
    model = ModelWrapper(flow_velocity, flow, "flow", time_input=lambda t: 1000 * t)
    ours = sample(model, x_start(), UniPC(3), grid).x
    assert rel_err(loop(scheduler, flow_velocity, x_start()), ours) <= 1e-6


def test_set_timesteps_leaves_no_stale_state():
    scheduler = DiffsolveUniPCScheduler(solver_order=3)
    scheduler.set_timesteps(10)
    loop(scheduler, vp_eps, x_start())
    scheduler.set_timesteps(6)  # abandon a loop after 3 steps
    x = x_start()
    for t in scheduler.timesteps[:3]:
        x = scheduler.step(vp_eps(x, t), t, x).prev_sample
    scheduler.set_timesteps(7)
    fresh = DiffsolveUniPCScheduler(solver_order=3)
    fresh.set_timesteps(7)
    assert torch.equal(loop(scheduler, vp_eps, x_start()), loop(fresh, vp_eps, x_start()))


def test_custom_timesteps_and_sigmas():
    scheduler = DiffsolveDPMSolverPPScheduler()
    custom = [999, 799, 599, 399, 199, 0]
    scheduler.set_timesteps(timesteps=custom)
    assert scheduler.timesteps.tolist() == custom
    grid = torch.tensor([(t + 1) / 1000 for t in custom] + [0.0], dtype=torch.float64)
    model = ModelWrapper(vp_eps, scheduler.schedule, "epsilon")
    ours = sample(model, x_start(), DPMSolverPP(2), grid).x
    assert rel_err(loop(scheduler, vp_eps, x_start()), ours) <= 1e-6
    by_sigma = DiffsolveDPMSolverPPScheduler()
    by_sigma.set_timesteps(sigmas=SCHEDULE.edm_sigma(grid[:-1]))
    assert torch.allclose(by_sigma.timesteps.double(), scheduler.timesteps.double(), atol=1e-3)


def test_steps_follow_the_counter_and_errors_are_clear():
    scheduler = DiffsolveUniPCScheduler()
    x = x_start()
    with pytest.raises(ValueError, match=r"call set_timesteps\(\) before step"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="duplicate time point"):
        scheduler.set_timesteps(timesteps=[999, 500, 500, 10])
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps(5, timesteps=[999, 500])
    scheduler.set_timesteps(4)
    t0, t1, t2 = scheduler.timesteps[:3]
    # a first timestep that is not in the loop is its last step, as in diffusers' multistep
    # schedulers
    last = scheduler.step(vp_eps(x, 620), 620, x).prev_sample
    assert scheduler.step_index == 4
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(3)
    assert torch.equal(last, scheduler.step(vp_eps(x, 620), scheduler.timesteps[3], x)[0])
    scheduler.set_timesteps(4)
    scheduler.step(vp_eps(x, t0), t0, x)
    with pytest.raises(ValueError, match=f"expected timestep {int(t1)}"):
        scheduler.step(vp_eps(x, t2), t2, x)
    scheduler.set_timesteps(4)
    loop(scheduler, vp_eps, x)
    assert scheduler.step_index == 4
    with pytest.raises(ValueError, match="all 4 steps are done"):
        scheduler.step(x, t0, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.set_timesteps(4)
        scheduler.step(x[:, :, :2], t0, x)


def test_img2img_begin_index_restarts_the_plan():
    scheduler = DiffsolveDPMSolverPPScheduler(solver_order=3)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    x = scheduler.add_noise(x_start(), x_start(), scheduler.timesteps[4])
    out = x
    for t in scheduler.timesteps[4:]:
        out = scheduler.step(vp_eps(out, t), t, out).prev_sample
    grid = scheduler.grid[4:]
    model = ModelWrapper(vp_eps, scheduler.schedule, "epsilon")
    ours = sample(model, x, DPMSolverPP(3), grid).x
    assert rel_err(out, ours) <= 1e-6


def test_add_noise_scale_and_init_sigma():
    scheduler = DiffsolveDDIMScheduler()
    x0, noise = x_start(3), x_start(3).flip(0)
    ts = torch.tensor([999, 499, 0])
    t = scheduler.schedule.t_of_timestep(ts.double())
    a = scheduler.schedule.alpha(t).view(-1, 1, 1, 1)
    s = scheduler.schedule.sigma(t).view(-1, 1, 1, 1)
    assert scheduler.schedule.same_process(SCHEDULE)  # diffusers' float32 alphas_cumprod
    assert torch.allclose(scheduler.add_noise(x0, noise, ts), a * x0 + s * noise)
    assert scheduler.scale_model_input(x0, 999) is x0
    scheduler.set_timesteps(5)
    assert scheduler.init_noise_sigma == 1.0  # as diffusers


def test_config_round_trip_and_ddpm_keys(tmp_path):
    scheduler = DiffsolveUniPCScheduler(solver_order=3, solver_type="bh1", grid="logsnr")
    scheduler.save_config(tmp_path)
    again = DiffsolveUniPCScheduler.from_pretrained(tmp_path)
    public = [k for k in scheduler.config if not k.startswith("_")]
    assert {k: again.config[k] for k in public} == {k: scheduler.config[k] for k in public}
    assert again.config.solver_type == "bh1" and again.config.grid == "logsnr"
    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_end=0.012)
    swapped = DiffsolveDPMSolverPPScheduler.from_config({**ddpm.config, "made_up_key": 1})
    assert swapped.config.beta_schedule == "scaled_linear" and swapped.config.beta_end == 0.012
    assert swapped.schedule.same_process(
        VPDiscrete.from_diffusers("scaled_linear", 1e-4, 0.012, 1000)
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_type": "nope"}, "prediction must be one of"),
        ({"solver_type": "bh3"}, "solver_type must be one of"),
        ({"grid": "weird"}, "grid must be one of"),
        ({"solver_order": 4}, "order must be one of"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule must be one of"),
    ],
)
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        DiffsolveUniPCScheduler(**options)


# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline():
    pipe = diffusers.DiffusionPipeline.from_pretrained(DEMO)
    pipe.set_progress_bar_config(disable=True)
    pipe.ddpm_config = dict(pipe.scheduler.config)
    return pipe


def test_exported_unet_equals_digits_network(pipeline):
    net = load_model("digits").network
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (0.0, 37.5, 999.0):
            ts = torch.full((8,), t)
            assert (net(x, ts) - pipeline.unet(x, ts).sample).abs().max() <= 1e-5
    converted = digits_unet_to_diffusers(net)
    assert dict(converted.config)["block_out_channels"] == [32, 32, 32]


def run_pipeline(pipe, cls, seeds, steps, **options):
    """The stock DDPMPipeline with our scheduler; one generator per seed (noise_for_seeds)."""
    assert type(pipe).__name__ == "DDPMPipeline"
    pipe.scheduler = cls.from_config(pipe.ddpm_config, grid="time_quadratic", **options)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        batch_size=len(seeds), generator=generators, num_inference_steps=steps, output_type="pt"
    ).images


def to_image(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)  # what DDPMPipeline returns


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("cls", "options", "solver"),
    [
        (DiffsolveUniPCScheduler, {}, UniPC(2, "bh2")),
        (DiffsolveUniPCScheduler, {"solver_order": 3, "solver_type": "bh1"}, UniPC(3, "bh1")),
        (DiffsolveDPMSolverPPScheduler, {}, DPMSolverPP(2)),
        (
            DPMSolverV3Scheduler,
            {"ems_path": str(load_model("digits").ems_path)},
            DPMSolverV3(load_model("digits").load_ems(), 2),
        ),
    ],
)
def test_pipeline_equals_sample(pipeline, cls, options, solver):
    """DDPMPipeline + our scheduler == diffsolve's sample() on the same per-seed noise."""
    images = run_pipeline(pipeline, cls, SEEDS, 10, **options)
    model = load_model("digits")
    grid = nfe_grid(model.schedule, 10, "time_quadratic")
    noise = noise_for_seeds(SEEDS, model.data_shape)
    same_net = ModelWrapper(pipeline.unet, pipeline.scheduler.schedule, "epsilon")
    assert (images - to_image(sample(same_net, noise, solver, grid).x)).abs().max() <= 1e-6
    # the demo's own DigitsUNet and float64 schedule: float32 round-off of the converted
    # network and of diffusers' alphas_cumprod only
    ours = sample(model.denoiser, noise, solver, grid).x
    assert (images - to_image(ours)).abs().max() <= 3e-5


def test_pipeline_equals_sample_in_float64():
    """In float64 the exported pipeline equals sample() of the original DigitsUNet to
    round-off. UNet2DModel computes its sinusoidal time embedding in float32, so the
    DigitsUNet is given its time input in float32 as well."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(DEMO, dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    pipe.ddpm_config = dict(pipe.scheduler.config)
    images = run_pipeline(pipe, DiffsolveUniPCScheduler, SEEDS, 6, solver_order=3)
    model = load_model("digits", dtype=torch.float64)
    noise = torch.cat(  # what the pipeline draws: one float64 randn per generator
        [
            torch.randn(
                1,
                *model.data_shape,
                generator=torch.Generator().manual_seed(s),
                dtype=torch.float64,
            )
            for s in SEEDS
        ]
    )
    net = model.network
    schedule = pipe.scheduler.schedule  # diffusers' alphas_cumprod, in float64
    denoiser = ModelWrapper(lambda x, t: net(x, t.float()), schedule, "epsilon")
    ours = sample(denoiser, noise, UniPC(3), nfe_grid(model.schedule, 6, "time_quadratic")).x
    assert (images - to_image(ours)).abs().max() <= 1e-10


def test_from_config_swaps_between_diffsolve_schedulers():
    unipc = DiffsolveUniPCScheduler(solver_type="bh1", solver_order=3)
    dpm = DiffsolveDPMSolverPPScheduler.from_config(unipc.config)
    assert dpm.config.solver_type == "midpoint" and dpm.config.solver_order == 3
    back = DiffsolveUniPCScheduler.from_config(dpm.config)
    assert back.config.solver_type == "bh2"


# ---------------------------------------------------------------------------------------
VECTOR_GAUSSIAN = GaussianModel.random((6,), seed=1)


def edm_denoiser(x: torch.Tensor, sigma: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """k-diffusion's contract: D(x, sigma * s_in) -> x0 (EDM: x = x0 + sigma n)."""
    return scale * VECTOR_GAUSSIAN.denoise(x, 1.0, float(sigma[0]))


def test_k_diffusion_entry_point_equals_sample():
    rho, n = 7.0, 24
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    seen = []
    out = sample_denoiser(
        edm_denoiser, x, sigmas, {"scale": 1.0}, seen.append, solver="unipc-bh2-3"
    )
    schedule = EDM(0.002, 80.0)
    ours = sample(VECTOR_GAUSSIAN.denoiser(schedule), x, UniPC(3, "bh2"), sigmas).x
    assert rel_err(out, ours) <= 1e-10
    assert [d["i"] for d in seen] == list(range(n)) and seen[0]["sigma"] == pytest.approx(80)
    exact = VECTOR_GAUSSIAN.solution(x, 80.0, 0.0, schedule)
    assert rel_err(out, exact) <= 1e-2
    heun = make_sampler("heun")(edm_denoiser, x, sigmas)
    assert rel_err(heun, exact) <= 3e-2
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_denoiser(edm_denoiser, x, sigmas.flip(0))


def test_dpm_solver_v3_through_the_k_diffusion_entry_point():
    """DPM-Solver-v3 by registry name on k-diffusion's σ list, its EMS from the context (the
    exact EMS of the Gaussian under diffsolve's EDM schedule): the same as sample()."""
    from diffsolve import SolverContext
    from diffsolve.integrations.k_diffusion import samplers
    from diffsolve.stats.ems.exact import gaussian_ems

    schedule = EDM(0.002, 80.0)
    ems = gaussian_ems(VECTOR_GAUSSIAN, schedule, 200)
    sigmas = grids.append_zero(schedule, grids.karras(schedule, 9))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    context = SolverContext(ems=ems)
    out = sample_denoiser(edm_denoiser, x, sigmas, solver="dpm-solver-v3", context=context)
    solver = DPMSolverV3(ems, order=2, corrector=True, corrector_pseudo=True)
    ours = sample(VECTOR_GAUSSIAN.denoiser(schedule), x, solver, sigmas).x
    assert rel_err(out, ours) <= 1e-10
    exact = VECTOR_GAUSSIAN.solution(x, 80.0, 0.0, schedule)
    assert rel_err(out, exact) <= 1e-2
    by_name = samplers(context)["sample_dpm_solver_v3"](edm_denoiser, x, sigmas)
    assert torch.equal(by_name, out)
    assert "sample_dpm_solver_v3" not in samplers()  # nothing to run it with
    with pytest.raises(ValueError, match="needs the model's empirical model statistics"):
        sample_denoiser(edm_denoiser, x, sigmas, solver="dpm-solver-v3")


def test_core_does_not_import_diffusers():
    code = (
        "import sys, diffsolve, diffsolve.app.cli, diffsolve.app.scale, diffsolve.integrations, "
        "diffsolve.integrations.k_diffusion; assert 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_v3_scheduler_needs_and_checks_its_ems(tmp_path):
    with pytest.raises(ValueError, match="ems_path"):
        DPMSolverV3Scheduler()
    from diffsolve import VPLinear
    from diffsolve.stats.ems import EMS

    path = EMS.degenerate(VPLinear(), (1, 8, 8)).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="computed for the schedule"):
        DPMSolverV3Scheduler(ems_path=str(path))


def test_single_step_solvers_are_refused():
    class SingleStep(DiffsolveDPMSolverPPScheduler):
        def build_solver(self, num_steps, trailing=0):
            return DPMSolverPP(2, method="singlestep")

    scheduler = SingleStep()
    with pytest.raises(ValueError, match="one model evaluation per step"):
        scheduler.set_timesteps(6)


def test_dpm_solver_v3_on_a_flow_model_through_the_adapter():
    """DPM-Solver-v3 runs a flow-matching model from a FlowMatch config with the model's
    EMS (the digits-flow demo): from sigma = 1 exactly, equal to sample() on its grid, and
    closer to a 500-step reference than FlowMatch's Euler at the same 10 steps (on FlowMatch's
    uniform sigmas; 0.048 against 0.061 relative)."""
    model = load_model("digits-flow")
    config = diffusers.FlowMatchEulerDiscreteScheduler().config
    scheduler = DPMSolverV3Scheduler.from_config(config, ems_path=str(model.ems_path))
    euler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    net = model.network
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def flow_net(x, timestep):
        with torch.no_grad():
            return net(x, torch.as_tensor(timestep).float().expand(x.shape[0]) / 1000)

    outs = []
    for s in (scheduler, euler):
        s.set_timesteps(10)
        x = noise
        for t in s.timesteps:
            x = s.step(flow_net(x, t), t, x).prev_sample
        outs.append(x)
    assert float(scheduler.grid[0]) == 1.0
    wrapped = ModelWrapper(lambda x, t: net(x, t), scheduler.schedule, "flow", "t")
    solver = DPMSolverV3(model.load_ems(), 2)
    assert rel_err(outs[0], sample(wrapped, noise, solver, scheduler.grid).x) <= 1e-5
    reference = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(500)
    x = noise
    for t in reference.timesteps:
        x = reference.step(flow_net(x, t), t, x).prev_sample
    assert rel_err(outs[0], x) < 0.85 * rel_err(outs[1], x)
    # at 1000 SD3-shifted steps the first sigmas lie above the EMS range (t <= 0.999): those
    # steps are first order, the rest is v3
    shifted = DPMSolverV3Scheduler.from_config(
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config, ems_path=str(model.ems_path)
    )
    shifted.set_timesteps(1000)
    features = [step.predictor.feature for step in shifted._plan.steps]
    assert float(shifted.sigmas[1]) > 0.999 and features[:2] == ["data", "data"]
    assert features.count("f") >= 990
