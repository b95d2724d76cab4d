"""The diffusers scheduler contract, for every diffsolve adapter.

The contract points diffusers' ``SchedulerCommonTest`` checks (written here from the contract,
not copied): config save/load round trip, ``from_config`` across the sibling schedulers,
``set_timesteps`` with a step count / ``timesteps`` / ``sigmas``, ``add_noise``,
``scale_model_input``, ``step`` output shapes and determinism, the begin index, ``__len__``,
compatibles; then, for each sibling diffusers scheduler, equal outputs on the same grid
(≤ 1e-5 relative, same initial noise) for every config key the adapter honours, and a clear
error for every value it refuses.

Every passing check counts one (adapter, contract point); ``test_zz_report_counts`` prints
the total in the test summary.
"""

from __future__ import annotations

import collections
import inspect
import re

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffsolve import DDIM, DPMSolverV3, GaussianModel, ModelWrapper, sample  # noqa: E402
from diffsolve.app.loader import load_model  # noqa: E402
from diffsolve.integrations.diffusers import scheduler_classes  # noqa: E402
from diffsolve.integrations.diffusers.config import init_defaults  # noqa: E402

CHECKS: collections.Counter[tuple[str, str]] = collections.Counter()
ADAPTERS = scheduler_classes()
EMS_PATH = str(load_model("digits").ems_path)
#: What each adapter needs beyond a diffusers config.
EXTRA = {"DPMSolverV3Scheduler": {"ems_path": EMS_PATH}}
SIBLING = {
    "DiffsolveDDIMScheduler": diffusers.DDIMScheduler,
    "DiffsolveDPMSolverPPScheduler": diffusers.DPMSolverMultistepScheduler,
    "DiffsolveUniPCScheduler": diffusers.UniPCMultistepScheduler,
    "DiffsolveDEISScheduler": diffusers.DEISMultistepScheduler,
    "DPMSolverV3Scheduler": diffusers.DPMSolverMultistepScheduler,
}
SHAPE = (1, 8, 8)  # the digits demo's, which DPM-Solver-v3's shipped EMS are for
GAUSSIAN = GaussianModel.random(SHAPE, seed=3)


pytestmark = pytest.mark.usefixtures("single_thread")


def betas(name: str) -> dict:
    """A non-default beta schedule, except for v3 (its shipped EMS are for linear betas)."""
    if name == "DPMSolverV3Scheduler":
        return {}
    return {"beta_schedule": "scaled_linear", "beta_end": 0.012}


def make(name: str, **config):
    return ADAPTERS[name](**EXTRA.get(name, {}), **config)


def swap(name: str, config, **overrides):
    return ADAPTERS[name].from_config(config, **EXTRA.get(name, {}), **overrides)


def passed(name: str, point: str) -> None:
    CHECKS[(name, point)] += 1


def noise(n: int = 4) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------
# Analytic networks with diffusers' conventions
def vp_net(scheduler, prediction: str = "epsilon", learned: bool = False):
    """The exact Gaussian denoiser as a network at integer timesteps, on the sibling's own
    float32 alphas_cumprod, answering in ``prediction``."""
    ac = scheduler.alphas_cumprod.double()

    def net(x: torch.Tensor, timestep) -> torch.Tensor:
        i = round(float(torch.as_tensor(timestep).flatten()[0]))
        a, s = float(ac[i].sqrt()), float((1 - ac[i]).sqrt())
        dtype, x = x.dtype, x.double()
        x0 = GAUSSIAN.denoise(x, a, s) if a > 0 else GAUSSIAN.mean.reshape(SHAPE).expand_as(x)
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction]
        return (torch.cat([out, torch.zeros_like(out)], 1) if learned else out).to(dtype)

    return net


def flow_net(n_train: int = 1000, invert: bool = False):
    """The exact Gaussian velocity u = eps - x0 at timestep 1000 sigma."""

    def net(x: torch.Tensor, timestep) -> torch.Tensor:
        t = float(torch.as_tensor(timestep).flatten()[0]) / n_train
        t = 1 - t if invert else t
        dtype, x = x.dtype, x.double()
        x0 = GAUSSIAN.denoise(x, 1 - t, t)
        u = (x - (1 - t) * x0) / t - x0 if t > 0 else -x0
        return (-u if invert else u).to(dtype)

    return net


def loop(
    scheduler, net, x: torch.Tensor, start: int = 0, stop: int | None = None, **step_kwargs
) -> torch.Tensor:
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch has none
    for t in scheduler.timesteps[start:stop]:
        scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # FlowMatch: none
        x = scheduler.step(net(scale(x, t), t), t, x, **step_kwargs)
        x = x.prev_sample
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------
# Construction and configs
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_constructor_and_from_config_agree(name):
    config = {"num_train_timesteps": 1000, "thresholding": True, **betas(name)}
    direct, swapped = make(name, **config), swap(name, config)
    public = [k for k in direct.config if not k.startswith("_")]
    assert {k: direct.config[k] for k in public} == {k: swapped.config[k] for k in public}
    with pytest.raises(TypeError):
        make(name, made_up_key=1)
    swap(name, {**config, "made_up_key": 1}).set_timesteps(3)  # from_config: ignored, as diffusers
    passed(name, "constructor == from_config")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_config_round_trip(name, tmp_path):
    scheduler = make(name, grid="logsnr", **betas(name))
    scheduler.save_pretrained(tmp_path)
    again = type(scheduler).from_pretrained(tmp_path)
    public = [k for k in scheduler.config if not k.startswith("_") and not k.endswith("_path")]
    assert {k: again.config[k] for k in public} == {k: scheduler.config[k] for k in public}
    scheduler.set_timesteps(6)
    again.set_timesteps(6)
    assert torch.equal(
        loop(scheduler, vp_net(scheduler), noise()), loop(again, vp_net(again), noise())
    )
    passed(name, "save/load round trip")


SIBLING_CONFIGS = {
    "DDPMScheduler": diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_end=0.012),
    "DDIMScheduler": diffusers.DDIMScheduler(steps_offset=1, set_alpha_to_one=False),
    "PNDMScheduler": diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
    "DPMSolverMultistepScheduler": diffusers.DPMSolverMultistepScheduler(solver_order=3),
    "UniPCMultistepScheduler": diffusers.UniPCMultistepScheduler(solver_type="bh1"),
    "DEISMultistepScheduler": diffusers.DEISMultistepScheduler(),
    "EulerDiscreteScheduler": diffusers.EulerDiscreteScheduler(),
    "FlowMatchEulerDiscreteScheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("source", list(SIBLING_CONFIGS))
def test_from_config_across_siblings(name, source):
    """Any diffusers scheduler's config becomes a working adapter (flow matching configs become
    rectified flow), and the sibling diffusers schedulers take an adapter's config back."""
    config = SIBLING_CONFIGS[source].config
    if name == "DPMSolverV3Scheduler" and (
        config.get("beta_end", 0.02) != 0.02 or "shift" in config
    ):
        with pytest.raises(ValueError, match="EMS were computed for"):
            swap(name, config)  # another model's schedule: not what its EMS are for
        passed(name, "from_config across siblings")
        return
    scheduler = swap(name, config)
    scheduler.set_timesteps(5)
    flow = source.startswith("FlowMatch")
    net = flow_net() if flow else vp_net(scheduler)
    assert torch.isfinite(loop(scheduler, net, noise())).all()
    assert scheduler.config.prediction_type == ("flow_prediction" if flow else "epsilon")
    for cls in SIBLING.values():
        cls.from_config(scheduler.config).set_timesteps(5)
    passed(name, "from_config across siblings")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_len_order_compatibles(name):
    n_train = 1000 if name == "DPMSolverV3Scheduler" else 500  # v3: its EMS' schedule
    scheduler = make(name, num_train_timesteps=n_train)
    assert len(scheduler) == n_train and scheduler.order == 1
    assert scheduler.init_noise_sigma == 1.0
    names = {cls.__name__ for cls in scheduler.compatibles}
    assert {c.__name__ for c in SIBLING.values()} <= names
    assert "FlowMatchEulerDiscreteScheduler" in names
    for attr in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(scheduler, attr).shape == (n_train,)
    sibling = SIBLING[name](num_train_timesteps=n_train)
    assert torch.allclose(scheduler.alphas_cumprod, sibling.alphas_cumprod)
    assert torch.allclose(scheduler.betas, sibling.betas, rtol=1e-4)
    passed(name, "__len__, order, compatibles, betas")


# ---------------------------------------------------------------------------------------
# set_timesteps
STEP_COUNTS = [1, 2, 3, 5, 10, 36, 50, 100, 999, 1000]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_timesteps_stay_in_the_trained_range_at_every_step_count(name):
    """Integer timesteps in [0, N-1] at 1..1000 steps; the last step to clean data is a free
    x0 step; v3's EMS cover every grid."""
    scheduler = make(name)
    for n in STEP_COUNTS:
        scheduler.set_timesteps(n)
        ts = scheduler.timesteps
        assert ts.dtype == torch.int64 and len(ts) == n == scheduler.num_inference_steps
        assert int(ts.min()) >= 0 and int(ts.max()) <= 999
        assert len(scheduler.sigmas) == n + 1 and float(scheduler.grid[:-1].min()) >= 1e-3
    for kind in ("time_quadratic", "time_uniform", "logsnr"):
        on_kind = make(name, grid=kind)
        for n in (36, 50, 250, 1000):
            on_kind.set_timesteps(n)
            assert float(on_kind.timesteps.min()) >= 0.0 and float(on_kind.grid[-1]) == 0.0
    passed(name, "timesteps in range, 1-1000 steps")


# DEISMultistepScheduler has no rescale_betas_zero_snr; v3's EMS are for plain linear betas
@pytest.mark.parametrize(
    "name", [n for n in ADAPTERS if n not in ("DPMSolverV3Scheduler", "DiffsolveDEISScheduler")]
)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_runs_for_every_beta_schedule(name, beta_schedule):
    """rescale_betas_zero_snr with any beta schedule: a decreasing schedule (linear betas
    reach alpha_cumprod[-2] = 4e-9 < 2^-24), finite v-prediction loops at 1-1000 steps."""
    scheduler = make(
        name,
        beta_schedule=beta_schedule,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    ac = scheduler.schedule.alphas_cumprod
    assert bool((ac[1:] < ac[:-1]).all()) and float(ac[-1]) > 0
    for n in (1, 10, 1000):
        scheduler.set_timesteps(n)
        assert torch.isfinite(loop(scheduler, vp_net(scheduler, "v_prediction"), noise())).all()
    passed(name, f"zero terminal SNR [{beta_schedule}]")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_custom_timesteps_and_sigmas(name):
    scheduler = make(name)
    custom = [999, 700, 500, 300, 100]
    scheduler.set_timesteps(timesteps=custom)
    assert [int(t) for t in scheduler.timesteps] == custom
    assert torch.equal(scheduler.grid[:-1], (torch.tensor(custom).double() + 1) / 1000)
    first = loop(scheduler, vp_net(scheduler), noise())
    sigmas = scheduler.sigmas[:-1].tolist()
    scheduler.set_timesteps(sigmas=sigmas)
    assert rel(loop(scheduler, vp_net(scheduler), noise()), first) <= 1e-5
    with pytest.raises(ValueError, match=r"strictly decreasing|duplicate"):
        scheduler.set_timesteps(timesteps=[999, 500, 500, 10])
    passed(name, "set_timesteps(timesteps/sigmas)")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_no_state_survives_set_timesteps(name):
    scheduler, fresh = make(name), make(name)
    scheduler.set_timesteps(10)
    x = noise()
    for t in scheduler.timesteps[:4]:
        x = scheduler.step(vp_net(scheduler)(x, t), t, x).prev_sample
    scheduler.set_timesteps(7)
    fresh.set_timesteps(7)
    net = vp_net(fresh)
    assert torch.equal(loop(scheduler, net, noise()), loop(fresh, net, noise()))
    passed(name, "no stale state")


# ---------------------------------------------------------------------------------------
# The loop
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_step_shapes_dtypes_and_determinism(name):
    scheduler = make(name)
    scheduler.set_timesteps(6)
    t = scheduler.timesteps[0]
    for dtype in (torch.float32, torch.float16, torch.float64):
        x = noise().to(dtype)
        scheduler.set_timesteps(6)
        out = scheduler.step(vp_net(scheduler)(x, t).to(dtype), t, x)
        assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
        assert out.pred_original_sample.shape == x.shape
        scheduler.set_timesteps(6)
        (again,) = scheduler.step(vp_net(scheduler)(x, t).to(dtype), t, x, return_dict=False)
        assert torch.equal(again, out.prev_sample)
    assert scheduler.scale_model_input(x, t) is x
    passed(name, "step shapes, dtypes, determinism")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_add_noise(name):
    scheduler = make(name)
    x0, eps = noise(3), noise(3).flip(0)
    ts = torch.tensor([999, 500, 0])
    ac = scheduler.alphas_cumprod.double()[ts].view(-1, 1, 1, 1)
    expected = ac.sqrt() * x0.double() + (1 - ac).sqrt() * eps.double()
    assert rel(scheduler.add_noise(x0, eps, ts), expected) <= 1e-6
    assert scheduler.add_noise(x0, eps, torch.tensor(500)).shape == x0.shape
    with pytest.raises(ValueError, match="timesteps for a batch"):
        scheduler.add_noise(x0, eps, torch.tensor([1, 2]))
    passed(name, "add_noise")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_begin_index_and_img2img_start(name):
    """set_begin_index(k), or a first step at timesteps[k] without it, runs the rest of the
    loop; both equal diffusers' sibling started the same way (sample() on the rest of the grid
    for v3)."""
    steps, k = 10, 4
    x = None
    outs = []
    for use_begin in (True, False):
        scheduler = make(name)
        scheduler.set_timesteps(steps)
        if use_begin:
            scheduler.set_begin_index(k)
            assert scheduler.begin_index == k
        x = scheduler.add_noise(noise(), noise().flip(0), scheduler.timesteps[k : k + 1])
        outs.append(loop(scheduler, vp_net(scheduler), x, start=k))
        assert scheduler.step_index == steps
    assert torch.equal(outs[0], outs[1])
    if name == "DPMSolverV3Scheduler":
        model = ModelWrapper(vp_net(scheduler), scheduler.schedule, "epsilon", "timestep")
        solver = DPMSolverV3(load_model("digits").load_ems(), 2)
        expected = sample(model, x, solver, scheduler.grid[k:]).x
    else:
        theirs = SIBLING[name]()
        theirs.set_timesteps(steps)
        if hasattr(theirs, "set_begin_index"):  # DDIM needs none: it steps by timestep
            theirs.set_begin_index(k)
        expected = loop(theirs, vp_net(theirs), x, start=k)
    assert rel(outs[0], expected) <= 1e-5
    passed(name, "begin index / img2img start")


# ---------------------------------------------------------------------------------------
# Equality with the sibling diffusers scheduler, key by key
VP_VARIANTS: dict[str, list[dict]] = {
    "DDIMScheduler": [
        {},
        {"clip_sample": False},
        {"clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.0, "sample_max_value": 0.5},
        {"set_alpha_to_one": False, "steps_offset": 1},
        {"set_alpha_to_one": False},  # a zero-length last step (clip_sample: not the sample)
        {"set_alpha_to_one": False, "clip_sample": False},
        {"timestep_spacing": "trailing"},
        {"prediction_type": "v_prediction", "clip_sample": False},
        {"prediction_type": "sample"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
    "DPMSolverMultistepScheduler": [
        {},
        {"solver_order": 1},
        {"solver_type": "heun"},
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        {"algorithm_type": "dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.0, "sample_max_value": 0.5},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"use_lu_lambdas": True},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "euler_at_final": True},
        {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},  # a repeated last sigma
        {"lower_order_final": False},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "trailing"},
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
    ],
    "UniPCMultistepScheduler": [
        {},
        {"solver_order": 1},
        {"solver_order": 3},
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        {"predict_x0": False, "final_sigmas_type": "sigma_min"},  # "zero": NaN in diffusers
        {"disable_corrector": [0, 2]},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.0, "sample_max_value": 0.5},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"final_sigmas_type": "sigma_min"},
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},  # "zero": NaN there
        # a repeated last sigma: UniC corrects the last step with the evaluation there
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"use_beta_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_type": "bh1"},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "predict_x0": False},
        # ... and the last real step is of order 2 at most (lower_order_final)
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3},
        {"timestep_spacing": "trailing"},
        {"prediction_type": "v_prediction"},
    ],
    "DEISMultistepScheduler": [
        {},
        {"solver_order": 1},
        {"solver_order": 3},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.0, "sample_max_value": 0.5},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "solver_order": 3},  # last real step of order 2 (< 15)
        {"lower_order_final": False},
        {"timestep_spacing": "trailing"},
        {"prediction_type": "v_prediction"},
    ],
}
PREDICTIONS = {"epsilon", "sample", "v_prediction"}


def _variant_cases():
    for name, sibling in SIBLING.items():
        if name == "DPMSolverV3Scheduler":
            continue
        for i, options in enumerate(VP_VARIANTS[sibling.__name__]):
            yield pytest.param(name, options, id=f"{name}-{i}")


@pytest.mark.parametrize(("name", "options"), list(_variant_cases()))
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_equals_the_sibling_for_every_honoured_key(name, options, steps):
    theirs = SIBLING[name](**options)
    net = vp_net(theirs, options.get("prediction_type", "epsilon"))
    assert_matches(swap(name, theirs.config), lambda: SIBLING[name](**options), net, steps)
    passed(name, f"= {SIBLING[name].__name__} [{', '.join(options) or 'defaults'}]")


def assert_matches(ours, make_theirs, net, steps: int) -> None:
    """Equal to the diffusers scheduler on the same steps, ≤ 1e-5 relative. diffusers
    computes its coefficients from float32 sigmas; where that round-off alone moves its own
    result by more than 1e-5 (one step across a large λ range: Karras/beta placements at 4
    steps, DEIS-3's closed form at 25, DEIS' flow sigmas), the bound holds with both sides in
    float64, and against the float32 sibling within twice its own round-off."""
    theirs = make_theirs()
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    expected = loop(theirs, net, noise())
    assert torch.isfinite(expected).all()
    result = loop(ours, net, noise())
    if rel(result, expected) > 1e-5:
        precise = loop(in_float64(make_theirs(), steps), net, noise().double())
        ours.set_timesteps(steps)
        assert rel(loop(ours, net, noise().double()), precise) <= 1e-5, steps
        assert rel(result, expected) <= 2 * rel(expected, precise), steps


def in_float64(scheduler, steps: int):
    """A diffusers scheduler after ``set_timesteps`` with its sigmas / alphas_cumprod in
    float64 (its own coefficients then carry no float32 round-off)."""
    scheduler.set_timesteps(steps)
    for attr in ("sigmas", "alphas_cumprod", "final_alpha_cumprod"):
        value = getattr(scheduler, attr, None)
        if isinstance(value, torch.Tensor):
            setattr(scheduler, attr, value.double())
    return scheduler


def test_learned_variance_half_is_dropped_as_diffusers_does():
    """``variance_type="learned_range"``: the output's second channel half is dropped
    (diffusers' DPM-Solver keeps the first three channels: RGB data here)."""
    theirs = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")
    ours = swap("DiffsolveDPMSolverPPScheduler", theirs.config)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    outs = []
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(6)
        y = x
        for t in scheduler.timesteps:
            out = torch.cat([0.4 * y + 0.01 * float(t) / 1000, 5 * y], 1)
            y = scheduler.step(out, t, y).prev_sample
        outs.append(y)
    assert rel(outs[1], outs[0]) <= 1e-5
    passed("DiffsolveDPMSolverPPScheduler", "= DPMSolverMultistep [variance_type]")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_stochastic_ddim_equals_diffusers_with_the_same_generator(eta, use_clipped):
    theirs = diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.8)
    ours = swap("DiffsolveDDIMScheduler", theirs.config)
    outs = []
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(10)
        kwargs = {"eta": eta, "use_clipped_model_output": use_clipped}
        outs.append(
            loop(
                scheduler,
                vp_net(theirs),
                noise(),
                generator=torch.Generator().manual_seed(5),
                **kwargs,
            )
        )
    assert rel(outs[1], outs[0]) <= 1e-5
    passed("DiffsolveDDIMScheduler", "= DDIMScheduler [eta, use_clipped_model_output, generator]")


FLOW_MATCH_VARIANTS = [
    {"shift": 3.0},
    {"shift": 1.0},
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 3.0, "use_exponential_sigmas": True},
    {"shift": 3.0, "use_beta_sigmas": True},
    {"shift": 3.0, "shift_terminal": 0.1},
    {"invert_sigmas": True},
]


@pytest.mark.parametrize("options", FLOW_MATCH_VARIANTS)
@pytest.mark.parametrize("steps", [4, 10, 28])
def test_ddim_on_a_flow_match_config_equals_flow_match_euler(options, steps):
    """DDIM in flow time is Euler: the DDIM adapter on any FlowMatch config equals
    FlowMatchEulerDiscreteScheduler, from sigma = 1 exactly."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    ours = swap("DiffsolveDDIMScheduler", theirs.config)
    mu = {"mu": 0.7} if options.get("use_dynamic_shifting") else {}
    theirs.set_timesteps(steps, **mu)
    ours.set_timesteps(steps, **mu)
    assert torch.equal(ours.timesteps, theirs.timesteps) and float(ours.grid[0]) <= 1.0
    net = flow_net(invert=options.get("invert_sigmas", False))
    assert rel(loop(ours, net, noise()), loop(theirs, net, noise())) <= 1e-5
    passed("DiffsolveDDIMScheduler", f"= FlowMatchEuler [{', '.join(options)}]")


def test_flux_style_custom_sigmas_and_mu():
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ours = swap("DiffsolveDDIMScheduler", theirs.config)
    sigmas = torch.linspace(1.0, 1 / 8, 8).tolist()
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(sigmas=sigmas, mu=1.1)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert rel(loop(ours, flow_net(), noise()), loop(theirs, flow_net(), noise())) <= 1e-5
    passed("DiffsolveDDIMScheduler", "= FlowMatchEuler [sigmas=, mu=]")


@pytest.mark.parametrize("name", [n for n in ADAPTERS if n != "DPMSolverV3Scheduler"])
def test_flow_match_configs_run_every_adapter_from_sigma_one(name):
    """Every adapter on a FlowMatch config starts at sigma = 1 and converges: a third of
    Euler's error or better at 28 steps on the Gaussian oracle; DPM-Solver++ equals diffusers'
    DPMSolverMultistep on FlowMatch's sigmas."""
    from diffsolve import RectifiedFlow

    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = swap(name, theirs.config)
    ours.set_timesteps(28)
    assert float(ours.grid[0]) == 1.0 and ours.schedule.t_max == 1.0
    out = loop(ours, flow_net(), noise())
    exact = GAUSSIAN.solution(noise().double(), 1.0, 0.0, RectifiedFlow(t_max=1.0))
    assert torch.isfinite(out).all() and rel(out, exact) <= 0.2
    if name == "DiffsolveDPMSolverPPScheduler":
        dpm = diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction"
        )
        dpm.set_timesteps(28)
        dpm.sigmas, dpm.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
        assert rel(out, loop(dpm, flow_net(), noise())) <= 1e-5
    passed(name, "FlowMatch config from sigma = 1")


@pytest.mark.parametrize(
    "name", [n for n in ADAPTERS if n not in ("DPMSolverV3Scheduler", "DiffsolveDDIMScheduler")]
)
@pytest.mark.parametrize("steps", [4, 10, 28])
def test_dpm_style_flow_sigmas_equal_the_sibling(name, steps):
    options = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    ours = swap(name, SIBLING[name](**options).config)
    assert_matches(ours, lambda: SIBLING[name](**options), flow_net(), steps)
    passed(name, f"= {SIBLING[name].__name__} [use_flow_sigmas, flow_shift]")


def test_dpm_solver_v3_equals_sample_on_its_grid_at_every_key():
    ems = load_model("digits").load_ems()
    for options in (
        {},
        {"use_karras_sigmas": True},
        {"timestep_spacing": "trailing"},
        {"euler_at_final": True},
    ):
        scheduler = make("DPMSolverV3Scheduler", **options)
        scheduler.set_timesteps(10)
        model = ModelWrapper(vp_net(scheduler), scheduler.schedule, "epsilon", "timestep")
        solver = DPMSolverV3(ems, 2, euler_at_final=options.get("euler_at_final", False))
        expected = sample(model, noise(), solver, scheduler.grid).x
        assert rel(loop(scheduler, vp_net(scheduler), noise()), expected) <= 1e-5
        passed("DPMSolverV3Scheduler", f"= sample() [{', '.join(options) or 'defaults'}]")


# ---------------------------------------------------------------------------------------
# Configs taken over from diffusers
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_key_of_the_siblings_config_is_accepted(name):
    """An adapter takes every key of its sibling's config (the constructor too: never a
    TypeError), honouring or refusing each by name, or accepting and ignoring it where its
    solver has no such choice (``config.IGNORED``)."""
    theirs = set(init_defaults(SIBLING[name]))
    ours = set(inspect.signature(ADAPTERS[name].__init__).parameters)
    assert theirs <= ours, theirs - ours
    full = {k: v for k, v in SIBLING[name]().config.items() if not k.startswith("_")}
    if name == "DPMSolverV3Scheduler":
        full.pop("solver_order")  # v3's order 2 (the sibling's default) is its own default
    make(name, **full).set_timesteps(4)
    passed(name, "every key of the sibling's config")


#: A non-default value of every DPMSolverMultistepScheduler key; the schedule keys of another
#: model than the EMS' are refused by the EMS check.
DPM_KEYS = {
    "solver_order": 3,
    "prediction_type": "v_prediction",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.9,
    "sample_max_value": 2.0,
    "algorithm_type": "sde-dpmsolver++",
    "solver_type": "heun",
    "lower_order_final": False,
    "euler_at_final": True,
    "use_karras_sigmas": True,
    "use_exponential_sigmas": True,
    "use_beta_sigmas": True,
    "use_lu_lambdas": True,
    "final_sigmas_type": "sigma_min",
    "lambda_min_clipped": -5.0,
    "variance_type": "learned_range",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "time_shift_type": "linear",
    "flow_shift": 3.0,
    "use_dynamic_shifting": True,
    "trained_betas": diffusers.DPMSolverMultistepScheduler().betas.tolist(),
}
OTHER_MODEL = {
    "num_train_timesteps": 500,
    "beta_start": 2e-4,
    "beta_end": 0.03,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "use_flow_sigmas": True,
}


@pytest.mark.parametrize("key", [*DPM_KEYS, *OTHER_MODEL])
def test_dpm_solver_v3_takes_every_key_of_a_dpm_config(key):
    """DPMSolverV3Scheduler accepts every DPMSolverMultistepScheduler key: the placement,
    thresholding and order keys mean what they mean there, ``algorithm_type`` and
    ``solver_type`` are accepted and ignored (README), and schedule keys of another model are
    refused by the EMS check."""
    assert set(DPM_KEYS) | set(OTHER_MODEL) == set(
        init_defaults(diffusers.DPMSolverMultistepScheduler)
    )
    if key in OTHER_MODEL:
        with pytest.raises(ValueError, match="EMS were computed for"):
            make("DPMSolverV3Scheduler", **{key: OTHER_MODEL[key]})
    else:
        scheduler = make("DPMSolverV3Scheduler", **{key: DPM_KEYS[key]})
        scheduler.set_timesteps(8)
        x = noise()
        out = torch.cat([x, x], 1) if key == "variance_type" else x
        assert torch.isfinite(scheduler.step(0.1 * out, scheduler.timesteps[0], x)[0]).all()
    passed("DPMSolverV3Scheduler", f"DPM key {key}")


def test_dpm_solver_v3_ignores_algorithm_and_solver_type():
    plain = make("DPMSolverV3Scheduler")
    other = make("DPMSolverV3Scheduler", algorithm_type="dpmsolver", solver_type="heun")
    for scheduler in (plain, other):
        scheduler.set_timesteps(6)
    net = vp_net(plain)
    assert torch.equal(loop(plain, net, noise()), loop(other, net, noise()))
    with pytest.raises(ValueError, match="algorithm_type must be one of"):
        make("DPMSolverV3Scheduler", algorithm_type="euler")
    passed("DPMSolverV3Scheduler", "algorithm_type / solver_type ignored")


def sd3_recipe():
    """diffusers' own SD3 recipe: DPM-Solver on a FlowMatch config (which carries FlowMatch's
    ``shift`` over, ignored by DPMSolverMultistepScheduler)."""
    flow_match = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    options = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    return diffusers.DPMSolverMultistepScheduler.from_config(flow_match.config, **options)


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("saved", [False, True])
def test_the_sd3_recipe_swaps_in_one_line(name, saved, tmp_path):
    """``Adapter.from_config(pipe.scheduler.config)`` after diffusers' SD3 recipe: the
    carried-over ``shift`` is ignored as diffusers ignores it (given as a keyword, it is
    refused); the loop equals the sibling on the same config (DDIM: DPM-Solver++ of order 1,
    which it is, with x0 unclipped in flow space); v3 runs with a flow model's EMS."""
    dpm = sd3_recipe()
    config = dpm.config
    if saved:
        dpm.save_config(tmp_path)
        config = diffusers.DPMSolverMultistepScheduler.load_config(tmp_path)
    extra = {"ems_path": str(load_model("digits-flow").ems_path)} if "V3" in name else {}
    ours = ADAPTERS[name].from_config(config, **extra)
    with pytest.raises(ValueError, match="shift"):
        ADAPTERS[name].from_config(config, shift=2.0, **extra)
    if name == "DPMSolverV3Scheduler":
        ours.set_timesteps(10)
        dpm.set_timesteps(10)
        assert torch.equal(ours.timesteps, dpm.timesteps)
        assert torch.isfinite(loop(ours, flow_net(), noise())).all()
    else:
        sibling = "DPMSolverMultistepScheduler" if "DDIM" in name else SIBLING[name].__name__
        order = {"solver_order": 1} if "DDIM" in name else {}
        cls = getattr(diffusers, sibling)
        assert ours.config.get("clip_sample", False) is False
        assert_matches(ours, lambda: cls.from_config(config, **order), flow_net(), 10)
    passed(name, f"SD3 recipe swap{' (saved config)' if saved else ''}")


# ---------------------------------------------------------------------------------------
# Schedules and placements diffusers takes
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_trained_betas_of_any_length(name, tmp_path):
    """diffusers takes ``trained_betas`` whose length differs from ``num_train_timesteps``
    (its tables have their length): so do the adapters, until a placement reaches past the
    betas, which ``set_timesteps`` refuses naming both keys; betas of the config's length run
    equal to the sibling. (v3: betas other than its EMS' are refused by the EMS check.)"""
    short = np.linspace(0.01, 0.3, 20)
    if name == "DPMSolverV3Scheduler":
        with pytest.raises(ValueError, match="EMS were computed for"):
            make(name, trained_betas=short)
        passed(name, "trained_betas of any length")
        return
    scheduler = make(name, trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    again = type(scheduler).from_pretrained(tmp_path)
    expected = SIBLING[name](trained_betas=np.array([0.1, 0.3])).betas.tolist()
    assert scheduler.betas.tolist() == again.betas.tolist() == expected
    with pytest.raises(ValueError, match="trained_betas has 2 values but num_train_timesteps"):
        scheduler.set_timesteps(5)
    options = {"trained_betas": short, "num_train_timesteps": 20}
    theirs = SIBLING[name](**options)
    assert_matches(swap(name, theirs.config), lambda: SIBLING[name](**options), vp_net(theirs), 4)
    passed(name, "trained_betas of any length")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_betas_whose_float32_alphas_cumprod_underflows(name):
    """Linear betas from 0.01 to 0.2 take alphas_cumprod to 1e-49, 0 in diffusers' float32
    (its sigmas there are infinite, its loops NaN): the adapters keep diffusers' values down to
    1e-30, continue them with diffsolve's float64 ones, and sample finite, equal to
    ``sample()`` on their grid (v3: refused by the EMS check, another model's betas)."""
    options = {"beta_start": 0.01, "beta_end": 0.2}
    if name == "DPMSolverV3Scheduler":  # not the betas of its EMS
        with pytest.raises(ValueError, match="EMS were computed for"):
            make(name, **options)
        passed(name, "betas whose float32 alphas_cumprod underflows")
        return
    scheduler = (
        make(name, clip_sample=False, **options) if "DDIM" in name else make(name, **options)
    )
    ac32 = SIBLING[name](**options).alphas_cumprod.double()
    ours, kept = scheduler.schedule.alphas_cumprod, ac32 >= 1e-30
    assert (ac32 == 0).any() and torch.equal(ours[kept], ac32[kept])
    assert bool((ours > 0).all()) and bool((ours[1:] < ours[:-1]).all())
    scheduler.set_timesteps(10)
    net = vp_net(scheduler)
    model = ModelWrapper(net, scheduler.schedule, "epsilon", "timestep")
    expected = sample(model, noise(), scheduler.build_solver(10), scheduler.grid).x
    result = loop(scheduler, net, noise())
    assert torch.isfinite(result).all() and rel(result, expected) <= 1e-5
    passed(name, "betas whose float32 alphas_cumprod underflows")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_sd_placements_past_the_trained_steps_are_refused_with_the_fix(name):
    """SD 1.5 / SDXL configs (``leading`` spacing, ``steps_offset=1``) at 999 or 1000 steps
    place timestep 1000 or every step at timestep 1 (diffusers: NaN or IndexError): refused,
    naming the keys and the largest step count that works, which does."""
    config = {"timestep_spacing": "leading", "steps_offset": 1, **betas(name)}
    scheduler = make(name, **config)
    for steps in (999, 1000):
        try:
            scheduler.set_timesteps(steps)
        except ValueError as err:
            found = re.search(r"steps_offset=1\).*use at most (\d+) steps", str(err))
            assert found, err
            steps = int(found.group(1))
            scheduler.set_timesteps(steps)
        else:
            assert steps == 999 and "DDIM" in name  # DDIM's leading placement fits 999
        assert len(scheduler.timesteps) == steps and int(scheduler.timesteps.max()) <= 999
    passed(name, "SD placements at 999/1000 steps")


# ---------------------------------------------------------------------------------------
# Where a step is: the timestep it is called with
def off_list_timestep(scheduler) -> float:
    """A timestep halfway between the loop's second and third (more than 1% from both)."""
    ts = scheduler.timesteps.double()
    return float((ts[1] + ts[2]) / 2)


@pytest.mark.parametrize("name", [n for n in ADAPTERS if n != "DiffsolveDDIMScheduler"])
def test_an_unknown_first_timestep_is_the_last_step(name):
    """As in diffusers' multistep schedulers: a loop's first step at a timestep that is not
    in ``timesteps`` is its last step (= ``set_begin_index(n - 1)``), equal to the sibling
    called the same way."""
    steps = 6
    ours, again = make(name), make(name)
    for scheduler in (ours, again):
        scheduler.set_timesteps(steps)
    t, x = off_list_timestep(ours), noise()
    out = vp_net(ours)(x, ours.timesteps[-1])
    first = ours.step(out, t, x).prev_sample
    assert ours.step_index == steps
    again.set_begin_index(steps - 1)
    assert torch.equal(first, again.step(out, again.timesteps[-1], x).prev_sample)
    if name != "DPMSolverV3Scheduler":
        theirs = SIBLING[name]()
        theirs.set_timesteps(steps)
        assert rel(first, theirs.step(out, t, x).prev_sample) <= 1e-5
    passed(name, "unknown first timestep = last step")


def test_ddim_steps_from_any_timestep():
    """As diffusers' DDIM, which is stateless: listed timesteps in any order step to the next
    one (equal to DDIMScheduler, whose ``N // n`` step is that one with its default spacing);
    any other timestep steps from its own time to the first grid point below (equal to
    ``sample()`` with DDIM on those two points)."""
    ours, theirs = make("DiffsolveDDIMScheduler"), diffusers.DDIMScheduler()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    x = noise()
    for k in (3, 1, 7, 7, 9):
        t = ours.timesteps[k]
        out = vp_net(ours)(x, t)
        assert rel(ours.step(out, t, x).prev_sample, theirs.step(out, t, x).prev_sample) <= 1e-5
        assert ours.step_index == k + 1
    plain = make("DiffsolveDDIMScheduler", clip_sample=False)
    plain.set_timesteps(10)  # timesteps 900, 800, ..., 0
    out = vp_net(plain)(x, 455)
    y = plain.step(out, 455, x).prev_sample
    assert plain.step_index == 5 and int(plain.timesteps[5]) == 400
    model = ModelWrapper(vp_net(plain), plain.schedule, "epsilon", "timestep")
    two_points = torch.tensor([456, 401], dtype=torch.float64) / 1000
    assert rel(y, sample(model, x, DDIM(), two_points).x) <= 1e-5
    with pytest.raises(ValueError, match="outside the schedule"):
        plain.step(out, 1500, x)
    passed("DiffsolveDDIMScheduler", "step from any timestep (stateless)")


@pytest.mark.parametrize(
    "name", ["DiffsolveDPMSolverPPScheduler", "DiffsolveUniPCScheduler", "DiffsolveDEISScheduler"]
)
def test_a_repeated_first_timestep_starts_the_loop(name):
    """Cosine betas with Karras sigmas repeat the first timestep (``[998, 998, 998, …]``):
    a loop over ``timesteps`` runs in order, equal to the sibling told
    ``set_begin_index(0)`` (without it diffusers' own schedulers skip a step and fail at the
    end)."""
    options = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}
    theirs = SIBLING[name](**options)
    ours = swap(name, theirs.config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    assert int(ours.timesteps[0]) == int(ours.timesteps[1])
    theirs.set_begin_index(0)
    net = vp_net(theirs)
    assert rel(loop(ours, net, noise()), loop(theirs, net, noise())) <= 1e-5
    passed(name, "repeated first timestep")


def test_ddim_get_variance_equals_diffusers():
    ours, theirs = make("DiffsolveDDIMScheduler"), diffusers.DDIMScheduler()
    for t, prev in ((0, 0), (420, 400), (980, 960), (999, 998), (10, -90)):
        assert torch.allclose(ours._get_variance(t, prev), theirs._get_variance(t, prev))
    passed("DiffsolveDDIMScheduler", "_get_variance")


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize(
    "options", [{}, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}]
)
def test_unipc_solver_p_predicts_and_unic_corrects(options, steps):
    """UniPC's ``solver_p`` (a diffusers scheduler predicting in UniP's place; UniC still
    corrects) is honoured by the constructor and ``from_config``: equal to diffusers."""
    theirs = diffusers.UniPCMultistepScheduler(
        solver_p=diffusers.DPMSolverMultistepScheduler(), **options
    )
    ours = swap(
        "DiffsolveUniPCScheduler", theirs.config, solver_p=diffusers.DPMSolverMultistepScheduler()
    )
    direct = make(
        "DiffsolveUniPCScheduler", solver_p=diffusers.DPMSolverMultistepScheduler(), **options
    )
    net = vp_net(theirs)
    for scheduler in (theirs, ours, direct):
        scheduler.set_timesteps(steps)
    expected = loop(theirs, net, noise())
    assert rel(loop(ours, net, noise()), expected) <= 1e-5
    assert rel(loop(direct, net, noise()), expected) <= 1e-5
    with pytest.raises(ValueError, match="solver_p must be a diffusers scheduler"):
        make("DiffsolveUniPCScheduler", solver_p="dpmsolver++")
    passed("DiffsolveUniPCScheduler", f"= UniPCMultistep [solver_p, {', '.join(options)}]")


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize(("ratio", "max_value"), [(0.0, 1.0), (0.87, 0.5), (0.995, 2.0)])
def test_thresholding_takes_every_value_diffusers_takes(name, ratio, max_value):
    """diffusers' dynamic thresholding of x0, q = min(max(quantile(|x0|, ratio), 1),
    sample_max_value) and x0 <- clamp(x0, -q, q) / q, for a ratio of 0 (clipping to [-1, 1]
    unless every |x0| exceeds 1) and a sample_max_value below 1 (the threshold itself)."""
    plain = make(name, clip_sample=False) if "DDIM" in name else make(name)
    options = {"dynamic_thresholding_ratio": ratio, "sample_max_value": max_value}
    thresholded = make(name, thresholding=True, **options)
    x, out = noise(), 3 * noise().flip(0)
    x0 = []
    for scheduler in (plain, thresholded):
        scheduler.set_timesteps(5)
        x0.append(scheduler.step(out, scheduler.timesteps[0], x).pred_original_sample)
    q = torch.quantile(x0[0].flatten(1).abs(), ratio, dim=1).clamp(min=1, max=max_value)
    q = q.view(-1, 1, 1, 1)
    assert torch.allclose(x0[1], torch.maximum(torch.minimum(x0[0], q), -q) / q, atol=1e-6)
    passed(name, f"thresholding [ratio {ratio}, sample_max_value {max_value}]")


# ---------------------------------------------------------------------------------------
# Refusals
REFUSALS = [
    ({"algorithm_type": "sde-dpmsolver+"}, "algorithm_type", ["DiffsolveDPMSolverPPScheduler"]),
    ({"stochastic_sampling": True}, "stochastic_sampling", list(ADAPTERS)),
    ({"variance_type": "weird"}, "variance_type", list(ADAPTERS)),
    ({"timestep_source": "EulerDiscreteScheduler"}, "timestep_source", list(ADAPTERS)),
    ({"grid": "weird"}, "grid", list(ADAPTERS)),
    ({"use_karras_sigmas": True}, "use_karras_sigmas", ["DiffsolveDDIMScheduler"]),
    ({"solver_type": "bh3"}, "solver_type", ["DiffsolveUniPCScheduler"]),
    ({"solver_order": 4}, "order", ["DiffsolveDPMSolverPPScheduler", "DiffsolveUniPCScheduler"]),
    ({"thresholding": True, "sample_max_value": 0.0}, "sample_max_value", list(ADAPTERS)),
    (
        {"thresholding": True, "dynamic_thresholding_ratio": 1.5},
        "dynamic_thresholding_ratio",
        list(ADAPTERS),
    ),
    ({"beta_schedule": "sigmoid"}, "beta_schedule", list(ADAPTERS)),
    ({"beta_start": 0.1, "beta_end": 2.0}, "beta_end", list(ADAPTERS)),
    ({"ems_path": None}, "ems_path", ["DPMSolverV3Scheduler"]),
]


@pytest.mark.parametrize(("options", "key", "names"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_refused_values_name_the_key(options, key, names):
    for name in names:
        kwargs = {**EXTRA.get(name, {}), **options}
        with pytest.raises(ValueError, match=key):
            ADAPTERS[name](**kwargs)
        with pytest.raises(ValueError, match=key):
            ADAPTERS[name].from_config(kwargs)
        passed(name, f"refuses {key}")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_step_options_of_other_schedulers_are_refused_not_ignored(name):
    scheduler = make(name)
    scheduler.set_timesteps(4)
    t, x = scheduler.timesteps[0], noise()
    out = vp_net(scheduler)(x, t)
    scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=None)  # DDIMPipeline's call
    if name != "DiffsolveDDIMScheduler":
        scheduler.set_timesteps(4)
        with pytest.raises(ValueError, match="eta"):
            scheduler.step(out, t, x, eta=0.5)
    passed(name, "step(eta=, use_clipped_model_output=)")


def test_save_pretrained_carries_the_ems_with_a_relative_path(tmp_path):
    """A pipeline folder with DPM-Solver-v3 works on another machine: the EMS are copied next
    to the scheduler config, which names them by a relative path."""
    import json
    import shutil

    scheduler = make("DPMSolverV3Scheduler")
    scheduler.save_pretrained(tmp_path / "scheduler")
    stored = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert stored["ems_path"] == "ems.safetensors"
    assert (tmp_path / "scheduler" / "ems.safetensors").is_file()
    assert scheduler.config.ems_path == EMS_PATH  # the live scheduler is unchanged
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "scheduler", moved)
    shutil.rmtree(tmp_path / "scheduler")
    again = ADAPTERS["DPMSolverV3Scheduler"].from_pretrained(moved)
    assert again.config.ems_path == str(moved / "ems.safetensors")
    scheduler.set_timesteps(8)
    again.set_timesteps(8)
    net = vp_net(scheduler)
    assert torch.equal(loop(scheduler, net, noise()), loop(again, net, noise()))
    passed("DPMSolverV3Scheduler", "save_pretrained carries the EMS")


def test_zz_report_counts(capsys):
    """Print how many adapter x contract-point checks passed (for BENCHMARKS.md)."""
    per_adapter = collections.Counter()
    for (adapter, _), n in CHECKS.items():
        per_adapter[adapter] += n
    with capsys.disabled():
        print(
            f"\ndiffusers conformance: {sum(CHECKS.values())} adapter x contract-point checks "
            f"passed, {len(CHECKS)} distinct (adapter, point) pairs: "
            + ", ".join(f"{a} {n}" for a, n in sorted(per_adapter.items()))
        )
