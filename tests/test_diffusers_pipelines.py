"""Real diffusers pipelines with every diffsolve adapter swapped in by ``from_config``.

Tiny pipelines built from configs with random weights (``tests/tiny_pipelines.py``): DDPM,
DDIM, Stable Diffusion txt2img (guidance 1 and 7.5, ``prompt_embeds`` passed directly) and
img2img (strength 0.6), SD3 and Flux (and SD3 img2img for ``scale_noise``). Each run must be
finite and equal the diffusers scheduler it replaces on the same steps and the same initial
noise (≤ 1e-5 relative):

* VP pipelines: the adapter's sibling (``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
  ``UniPCMultistepScheduler``, ``DEISMultistepScheduler``), from the same config. diffusers'
  UniPC and DEIS ``step`` take no ``generator`` / ``eta``, which DDPMPipeline and DDIMPipeline
  pass: the reference drops those arguments for them (our adapters accept them).
* Flow pipelines (the config is a FlowMatch one): DDIM in flow time *is* Euler, so the DDIM
  adapter equals ``FlowMatchEulerDiscreteScheduler``, from σ = 1; DPM-Solver++ equals
  ``DPMSolverMultistepScheduler`` (flow sigmas, flow prediction) run on FlowMatch's sigmas.
  diffusers' UniPC and DEIS cannot start at σ = 1 (UniPC applies its corrector to the step
  from pure noise; DEIS divides by α = 0), so these adapters run from σ = 1 finite, and equal
  their sibling on the sibling's own flow sigmas (``use_flow_sigmas``, ``flow_shift``).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines as tiny  # noqa: E402
from diffsolve.integrations.diffusers import (  # noqa: E402
    DiffsolveDDIMScheduler,
    DiffsolveDEISScheduler,
    DiffsolveDPMSolverPPScheduler,
    DiffsolveUniPCScheduler,
)

ADAPTERS = {
    DiffsolveDDIMScheduler: diffusers.DDIMScheduler,
    DiffsolveDPMSolverPPScheduler: diffusers.DPMSolverMultistepScheduler,
    DiffsolveUniPCScheduler: diffusers.UniPCMultistepScheduler,
    DiffsolveDEISScheduler: diffusers.DEISMultistepScheduler,
}
VP_PIPELINES = {
    "ddpm": (tiny.ddpm_pipeline, {}),
    "ddim": (tiny.ddim_pipeline, {}),
    "sd-guidance-1": (tiny.sd_pipeline, {"guidance_scale": 1.0}),
    "sd-guidance-7.5": (tiny.sd_pipeline, {"guidance_scale": 7.5}),
    "sd-img2img": (tiny.sd_img2img_pipeline, {"strength": 0.6}),
}
FLOW_PIPELINES = {"sd3": tiny.sd3_pipeline, "flux": tiny.flux_pipeline}


pytestmark = pytest.mark.usefixtures("single_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tolerant_step(scheduler):
    """diffusers' UniPC / DEIS ``step`` has no ``generator``/``eta``: drop what it lacks."""
    params = set(inspect.signature(scheduler.step).parameters)
    step = scheduler.step

    @functools.wraps(step)
    def call(*args, **kwargs):
        return step(*args, **{k: v for k, v in kwargs.items() if k in params})

    scheduler.step = call
    return scheduler


def run_with(build, scheduler_factory, steps: int, dtype=torch.float32, **kwargs) -> torch.Tensor:
    pipe = build().to(dtype)
    pipe.scheduler = scheduler_factory(pipe.scheduler.config)
    inputs = {  # the fixed embeddings / image in the pipeline's dtype
        k: v.to(dtype) if isinstance(v, torch.Tensor) else v
        for k, v in tiny.conditioning(pipe).items()
    }
    return tiny.run(pipe, steps=steps, **{**inputs, **kwargs})


def float64_tables(scheduler):
    """A diffusers scheduler whose sigmas / alphas_cumprod become float64 after each
    set_timesteps (its coefficients then carry no float32 round-off)."""
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)
    def call(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        for attr in ("sigmas", "alphas_cumprod", "final_alpha_cumprod"):
            value = getattr(scheduler, attr, None)
            if isinstance(value, torch.Tensor):
                setattr(scheduler, attr, value.double())

    scheduler.set_timesteps = call
    return scheduler


def assert_matches(build, ours, theirs, steps: int, **kwargs) -> None:
    """The pipeline with ``ours`` equals it with ``theirs`` (scheduler factories), ≤ 1e-5
    relative. Where diffusers' own float32 coefficients move its result by more than that
    (a random-weight network amplifies round-off over the steps), the bound holds with the
    pipeline in float64 and diffusers' tables in float64, and the float32 runs differ by at
    most twice diffusers' own round-off."""
    a, b = run_with(build, ours, steps, **kwargs), run_with(build, theirs, steps, **kwargs)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if rel(a, b) <= 1e-5:
        return
    own = run_with(build, lambda c: float64_tables(theirs(c)), steps, **kwargs)
    assert rel(a, b) <= 2 * rel(b, own), (rel(a, b), rel(b, own))
    precise = run_with(build, lambda c: float64_tables(theirs(c)), steps, torch.float64, **kwargs)
    assert rel(run_with(build, ours, steps, torch.float64, **kwargs), precise) <= 1e-5


@pytest.mark.parametrize("adapter", list(ADAPTERS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("pipeline", list(VP_PIPELINES))
@pytest.mark.parametrize("steps", [4, 12])
def test_vp_pipelines_equal_the_sibling(pipeline, adapter, steps):
    build, kwargs = VP_PIPELINES[pipeline]
    theirs = lambda c: tolerant_step(ADAPTERS[adapter].from_config(c))  # noqa: E731
    assert_matches(build, adapter.from_config, theirs, steps, **kwargs)


def test_ddim_pipeline_with_eta_and_the_pipelines_generator():
    """DDIMPipeline's stochastic DDIM (eta = 1) draws its noise from the pipeline's
    generator: the adapter equals diffusers' DDIM with the same seed."""
    kwargs = {"eta": 1.0}
    ours = run_with(tiny.ddim_pipeline, DiffsolveDDIMScheduler.from_config, 10, **kwargs)
    assert_matches(
        tiny.ddim_pipeline,
        DiffsolveDDIMScheduler.from_config,
        diffusers.DDIMScheduler.from_config,
        10,
        **kwargs,
    )
    deterministic = run_with(tiny.ddim_pipeline, DiffsolveDDIMScheduler.from_config, 10)
    assert rel(ours, deterministic) > 1e-3  # eta was used, not ignored


def test_ddpm_pipeline_default_1000_steps_stays_in_range():
    """DDPMPipeline's default 1000 steps: DPM-Solver's placement repeats timestep 500 there
    (a zero-length step, skipped); every timestep in [0, 999]; equal to diffusers."""
    seen = []
    pipe = tiny.ddpm_pipeline()
    pipe.scheduler = DiffsolveDPMSolverPPScheduler.from_config(pipe.scheduler.config)
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(float(a[1].flatten()[0])))
    ours = tiny.run(pipe, steps=1000)
    assert len(seen) == 1000 and min(seen) >= 0 and max(seen) <= 999
    assert torch.isfinite(ours).all()
    theirs = run_with(
        tiny.ddpm_pipeline,
        lambda c: tolerant_step(diffusers.DPMSolverMultistepScheduler.from_config(c)),
        1000,
    )
    # diffusers 0.42 divides by the zero step length there and returns NaN
    assert not torch.isfinite(theirs).all() or rel(ours, theirs) <= 1e-4


class FlowSigmasDPM:
    """diffusers' DPM-Solver++ (flow sigmas, flow prediction) on FlowMatch's sigmas: the
    steps FlowMatchEuler places (from σ = 1) with DPM-Solver's update."""

    def __new__(cls, config):
        dpm = diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction"
        )
        placer = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)

        def set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None):
            if sigmas is None and mu is not None:  # Flux skips them for use_flow_sigmas
                sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
                num_inference_steps = None
            placer.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
            dpm.num_inference_steps = len(placer.timesteps)
            dpm.timesteps, dpm.sigmas = placer.timesteps.clone(), placer.sigmas.clone()
            dpm.model_outputs = [None] * dpm.config.solver_order
            dpm.lower_order_nums, dpm._step_index, dpm._begin_index = 0, None, None

        dpm.set_timesteps = set_timesteps
        return dpm


@pytest.mark.parametrize("pipeline", list(FLOW_PIPELINES))
@pytest.mark.parametrize("steps", [4, 12])
def test_flow_pipelines(pipeline, steps):
    build = FLOW_PIPELINES[pipeline]
    euler = diffusers.FlowMatchEulerDiscreteScheduler.from_config
    assert_matches(build, DiffsolveDDIMScheduler.from_config, euler, steps)
    assert_matches(build, DiffsolveDPMSolverPPScheduler.from_config, FlowSigmasDPM, steps)
    # the sibling's own flow placement: flow_shift replaces FlowMatch's shift
    own = {"use_flow_sigmas": True, "flow_shift": 3.0, "shift": 1.0}
    for adapter in (DiffsolveUniPCScheduler, DiffsolveDEISScheduler):
        assert torch.isfinite(run_with(build, adapter.from_config, steps)).all()
        assert_matches(
            build,
            lambda c, a=adapter: a.from_config(c, timestep_source=None, **own),
            lambda c, a=adapter: ADAPTERS[a].from_config(
                c, prediction_type="flow_prediction", **own
            ),
            steps,
        )


def test_sd3_img2img_scale_noise():
    """SD3 img2img starts mid-schedule with scale_noise: the DDIM adapter equals
    FlowMatchEuler there too."""
    ours = run_with(
        tiny.sd3_img2img_pipeline, DiffsolveDDIMScheduler.from_config, 10, strength=0.6
    )
    theirs = run_with(
        tiny.sd3_img2img_pipeline,
        diffusers.FlowMatchEulerDiscreteScheduler.from_config,
        10,
        strength=0.6,
    )
    assert rel(ours, theirs) <= 1e-5


def test_saved_pipeline_with_dpm_solver_v3_loads_elsewhere(tmp_path):
    """save_pretrained of a pipeline with DPM-Solver-v3 copies its EMS; the folder loads back
    with DiffusionPipeline.from_pretrained after it has moved."""
    import shutil

    from diffsolve.app.loader import demo_path, load_model
    from diffsolve.integrations.diffusers import DPMSolverV3Scheduler

    pipe = diffusers.DiffusionPipeline.from_pretrained(demo_path("digits-diffusers"))
    pipe.set_progress_bar_config(disable=True)
    ems = str(load_model("digits").ems_path)
    pipe.scheduler = DPMSolverV3Scheduler.from_config(pipe.scheduler.config, ems_path=ems)
    pipe.save_pretrained(tmp_path / "saved")
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "moved")
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler).__name__ == "DPMSolverV3Scheduler"
    assert again.scheduler.config.ems_path == str(
        tmp_path / "moved" / "scheduler" / "ems.safetensors"
    )
    images = [
        p(
            generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="pt"
        ).images
        for p in (pipe, again)
    ]
    assert torch.equal(images[0], images[1])
