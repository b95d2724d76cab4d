"""The user's own model through every command (issue: any model, every command).

Every source kind ``--model`` takes — a diffusers DDPM pipeline folder, a bare diffusers
``UNet2DModel`` folder, tiny SD / SD3 / Flux pipeline folders with locally made tokenizers,
and a ``.py`` entry point of a flow model with reversed time — runs ``check-model``, ``ems``
(small grid), ``sample`` (with a resume), ``bench`` (two NFE), ``tune`` (one NFE) and
``gaussian-stats``. The loaded denoisers agree with the diffusers pipelines' own loops (the
network's call convention, time input, Flux's packing and guidance embedding, prompt
encoding), and ``check-model`` names the convention of networks built to each one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffsolve import DDIM, ModelWrapper, RectifiedFlow, VPDiscrete, grids, sample
from diffsolve.app.check_model import Convention, check_conventions
from diffsolve.app.cli import main
from diffsolve.app.data import load_digit_labels, load_digits
from diffsolve.app.loader import LoadedModel, LoadOptions, load_model
from diffsolve.ode.model import ModelWrapper as Wrapper
from diffsolve.stats.gaussian import GaussianMixtureModel
from tiny_folders import (
    ddpm_folder,
    flux_folder,
    reversed_flow_file,
    sd3_folder,
    sd_folder,
    unet_folder,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = ["--height", "16", "--width", "16"]
#: ``ems`` at its cheapest: K = 2 on a 9-point grid, per point (no smoothing to resolve).
TINY_EMS = ["--samples", "2", "--grid", "8", "--bandwidth", "0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[str]]:
    """``--model`` arguments of every source kind (folders built once per module)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "ddpm": [str(ddpm_folder(root / "ddpm"))],
        "unet": [str(unet_folder(root / "unet"))],
        "sd": [str(sd_folder(root / "sd")), "--prompt", "a red cat", "--prompt", "a dog", *TEXT],
        "sd3": [str(sd3_folder(root / "sd3")), "--prompt", "a blue dog", *TEXT],
        "flux": [str(flux_folder(root / "flux")), *TEXT],
        "py": [reversed_flow_file(root / "py")],
    }


def run(*args: object, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


@pytest.mark.parametrize("source", ["ddpm", "unet", "sd", "sd3", "flux", "py"])
def test_every_command_on_every_source(models, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ["--model", *models[source]]
    out = run("check-model", *model, "--data-samples", "8")
    assert "convention" in out
    ems = tmp_path / "ems.safetensors"
    small = [
        *TINY_EMS,
        "--data-samples",
        "4",
        "--out",
        ems,
    ]
    run("ems", *model, *small)
    assert ems.is_file()
    stats = tmp_path / "stats.safetensors"
    run("gaussian-stats", *model, "--data-samples", "8", "--out", stats)
    runs = tmp_path / "samples"
    common = ["--seeds", "0-3", "--nfe", "4", "--shard-size", "2", "--out", runs]
    out = run("sample", *model, *common)
    assert "2 shard(s) computed" in out
    (runs / "shard-00000002.npz").unlink()  # a killed run: the rest is kept
    out = run("sample", *model, *common)
    assert "1 shard(s) computed, 1 kept" in out
    assert (runs / "grid.png").is_file() and (runs / "shard-00000000.png").is_file()
    run("sample", *model, *common, "--teleport", "0.3", "--gaussian-stats", stats, code=2)
    bench = ["--nfe", "3,4", "--samples", "4", "--reference-steps", "50", "--no-overhead"]
    out = run("bench", *model, *bench, "--solvers", "dpm-solver++-2m,diffusers:dpm-2m")
    assert "diffusers:dpm-2m" in out and "failed" not in out
    tune = ["--nfe", "3", "--trajectories", "4", "--candidates", "6", "--teacher-steps", "20"]
    out = run("tune", *model, *tune, "--out", tmp_path / "schedule.json")
    assert "held-out RMSE" in out


def test_statistics_files_for_any_model(tmp_path):
    """``--ems`` / ``--gaussian-stats``: files kept anywhere (here the demo's, copied), in
    sample, bench and tune; the run fingerprint covers them."""
    from diffsolve.app.loader import demo_path

    ems, stats = tmp_path / "my-ems.safetensors", tmp_path / "my-stats.safetensors"
    shutil.copy(demo_path("digits") / "ems.safetensors", ems)
    shutil.copy(demo_path("digits") / "gaussian_stats.safetensors", stats)
    args = ["--model", "digits", "--seeds", "0-1", "--nfe", "4", "--no-tuned-schedule"]
    out = run("sample", *args, "--ems", ems, "--teleport", "0.3", "--gaussian-stats", stats,
              "--out", tmp_path / "run")  # fmt: skip
    assert "dpm-solver-v3" in out
    manifest = json.loads((tmp_path / "run" / "sample.json").read_text())
    assert set(json.loads(manifest["inputs"])) == {"weights", "ems", "gaussian_stats"}
    out = run("sample", *args, "--solver", "ddim", "--ems", ems, "--out", tmp_path / "b", code=2)
    assert "--ems is used by DPM-Solver-v3 only" in out
    bench = ["--nfe", "4", "--samples", "4", "--reference-steps", "50", "--no-overhead"]
    run("bench", "--model", "digits", *bench, "--solvers", "dpm-solver-v3", "--ems", ems)
    tune = ["--nfe", "3", "--trajectories", "4", "--candidates", "6", "--teacher-steps", "20"]
    run("tune", "--model", "digits", "--solver", "dpm-solver-v3", *tune, "--ems", ems,
        "--gaussian-stats", stats, "--out", tmp_path / "s.json")  # fmt: skip


def test_broken_statistics_are_refused_not_integrated(tmp_path):
    """An EMS whose |l + s| is astronomical (too few samples) is a clear error, not a plan
    of a hundred million pieces."""
    from diffsolve import DPMSolverV3, load_ems
    from diffsolve.app.loader import demo_path

    ems = load_ems(demo_path("digits") / "ems.safetensors")
    ems.s[len(ems.s) // 2] = 1e7
    model = load_model("digits")
    grid = grids.append_zero(model.schedule, grids.time_uniform(model.schedule, 4))
    with pytest.raises(ValueError, match="EMS statistics out of range"):
        DPMSolverV3(ems).plan(model.schedule, grid)


def test_text_pipeline_records_its_prompts_and_decodes_pngs(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue dog\nthe digit seven\n")
    folder = models["sd"][0]
    args = ["--model", folder, "--prompts", prompts, *TEXT, "--seeds", "0-3", "--nfe", "3"]
    run("sample", *args, "--scale", "3", "--out", tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "sample.json").read_text())
    conditioning = json.loads(manifest["conditioning"])
    assert conditioning["prompts"] == ["a red cat", "a blue dog", "the digit seven"]
    assert conditioning["guidance"]["method"] == "cfg"  # --scale of a text pipeline
    assert manifest["data_shape"] == [4, 8, 8]  # latents in the shards
    from PIL import Image

    with Image.open(tmp_path / "run" / "grid.png") as image:
        assert image.mode == "RGB"  # decoded by the VAE
    out = run("sample", *args, "--scale", "3", "--prompt", "x", "--out", tmp_path / "b", code=2)
    assert "give the prompts one way" in out


def test_image_folders_and_guided_statistics(models, tmp_path):
    """``--data DIR``: images resized to the model's image size (a latent model's encoded by
    its VAE); ``ems --scale``: the statistics of the classifier-free-guided pipeline."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        colour = (40 * i, 200 - 50 * i, 90)
        Image.new("RGB", (24 + i, 20), colour).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    small = [*TINY_EMS, "--data", images, "--no-check"]
    for source in ("ddpm", "sd"):
        out = tmp_path / f"{source}.safetensors"
        run("ems", "--model", *models[source], *small, "--scale", "3" if source == "sd" else "1",
            "--out", out)  # fmt: skip
        assert out.is_file()
    text = run("ems", "--model", *models["ddpm"], *small, "--scale", "3", "--out", tmp_path / "x",
               code=2)  # fmt: skip
    assert "needs a class-conditional model" in text
    text = run("gaussian-stats", "--model", "digits", "--data", images, "--out", tmp_path / "g")
    assert "of 3 samples" in text  # greyscale 8x8 for the digits model
    text = run("gaussian-stats", "--model", "digits", "--data", tmp_path, "--out", tmp_path / "h",
               code=2)  # fmt: skip
    assert "no images" in text


def test_a_schedule_tuned_into_a_diffusers_folder_is_picked_up(models, tmp_path):
    folder = tmp_path / "ddpm"
    shutil.copytree(models["ddpm"][0], folder)
    target = folder / "schedules" / "unipc-bh2-3-nfe3.json"
    tune = ["--nfe", "3", "--trajectories", "4", "--candidates", "6", "--teacher-steps", "20"]
    run("tune", "--model", folder, "--solver", "unipc-bh2-3", *tune, "--out", target)
    out = run("sample", "--model", folder, "--nfe", "3", "--seeds", "0-1", "--out", tmp_path / "r")
    assert "tuned schedule schedules/unipc-bh2-3-nfe3.json" in out


def test_text_pipeline_under_torchrun_equals_one_process(models, tmp_path):
    """Two gloo ranks on a text pipeline with two prompts: the same latents, seed by seed."""
    import os
    import subprocess
    import sys

    import numpy as np

    args = ["--model", *models["sd"], "--seeds", "0-5", "--nfe", "3", "--shard-size", "2"]
    run("sample", *args, "--batch-size", "1", "--out", tmp_path / "one")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "diffsolve", "sample", *args, "--batch-size", "1", "--out",
               str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with (
        np.load(tmp_path / "one" / "samples.npz") as a,
        np.load(tmp_path / "two" / "samples.npz") as b,
    ):
        np.testing.assert_array_equal(a["samples"], b["samples"])
        assert b["seeds"].tolist() == list(range(6))


def test_the_run_fingerprint_covers_the_weights(models, tmp_path):
    folder = tmp_path / "ddpm"
    shutil.copytree(models["ddpm"][0], folder)
    args = ["--model", folder, "--seeds", "0-1", "--nfe", "3", "--out", tmp_path / "run"]
    run("sample", *args)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, weights)
    out = run("sample", *args, code=2)
    assert "inputs: weights changed" in out


def test_entry_point_errors_are_clear(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import torch, diffsolve\n"
        "def plain():\n    return torch.nn.Linear(2, 2)\n"
        "def shapeless():\n"
        "    return diffsolve.ModelWrapper(lambda x, t: x, diffsolve.VPLinear())\n"
        "def broken():\n    raise RuntimeError('no weights here')\n"
    )
    cases = {
        f"{path}:missing": "has no callable 'missing'",
        f"{path}:plain": "must return a diffsolve.ModelWrapper",
        f"{path}:shapeless": "has no data_shape",
        f"{path}:broken": "broken() failed: RuntimeError: no weights here",
        f"{tmp_path / 'none.py'}:load": "no such file",
    }
    for spec, message in cases.items():
        out = run("sample", "--model", spec, "--out", tmp_path / "x", code=2)
        assert message in out
    out = run("sample", "--model", f"{path}:shapeless", "--shape", "1,2", "--seeds", "0-1",
              "--nfe", "3", "--out", tmp_path / "y")  # fmt: skip
    assert "2 samples" in out


def test_a_tokenizer_that_cannot_load_is_named(models, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(models["sd"][0], folder)
    (folder / "tokenizer" / "tokenizer.json").write_text("{not json")
    out = run("sample", "--model", folder, "--out", tmp_path / "x", code=2)
    assert "tokenizer" in out and "cannot load CLIPTokenizer" in out


def test_options_a_source_does_not_use_are_refused(models, tmp_path):
    out = run("sample", "--model", "digits", "--prompt", "cat", "--out", tmp_path / "x", code=2)
    assert "--prompt/--prompts: not used by model 'digits'" in out
    out = run("sample", "--model", *models["ddpm"], "--height", "32", "--out", tmp_path, code=2)
    assert "for text pipelines only" in out
    out = run("sample", "--model", "digits", "--ems", tmp_path / "no.safetensors", code=2)
    assert "no such file" in out


# ---------------------------------------------------------------------------------------
# The loaded denoisers equal the pipelines' own loops
def _pipeline(folder: str):
    """The folder as diffusers loads it (SD3's absent T5 passed as None)."""
    from diffsolve.app.diffusers_models import _from_pretrained

    return _from_pretrained(
        Path(folder), json.loads((Path(folder) / "model_index.json").read_text())
    )


def test_sd_folder_matches_its_pipeline_with_ddim(models):
    from diffusers import DDIMScheduler

    folder = models["sd"][0]
    pipe = _pipeline(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = pipe("a red cat", num_inference_steps=4, guidance_scale=1.0, height=16,
                      width=16, latents=noise.clone(), output_type="latent").images  # fmt: skip
    model = load_model(folder, options=LoadOptions(prompts=("a red cat",), height=16, width=16))
    n = model.schedule.num_train_timesteps
    steps = [(int(ts) + 1) / n for ts in pipe.scheduler.timesteps]
    grid = grids.custom(model.schedule, [*steps, 1 / n])  # set_alpha_to_one=False
    ours = sample(model.conditional(torch.zeros(1, dtype=torch.long)), noise, DDIM(), grid).x
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["sd3", "flux"])
def test_flow_folders_match_their_pipelines(models, source):
    from diffsolve.integrations.diffusers.models import pack_latents, unpack_latents

    folder = models[source][0]
    pipe = _pipeline(folder)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    call = {"num_inference_steps": 4, "height": 16, "width": 16, "output_type": "latent"}
    if source == "flux":
        call.update(latents=pack_latents(noise), guidance_scale=3.5)
    else:
        call.update(latents=noise.clone(), guidance_scale=1.0)
    with torch.no_grad():
        theirs = pipe("a blue dog", **call).images
    if source == "flux":
        theirs = unpack_latents(theirs, 16, 8, 8)
    model = load_model(folder, options=LoadOptions(prompts=("a blue dog",), height=16, width=16))
    wrapper = model.denoiser
    # the pipelines start at sigma = 1 (the app's schedule is clipped at 0.999)
    exact = ModelWrapper(wrapper.model, RectifiedFlow(t_max=1.0), "flow", wrapper.time_input)
    grid = grids.custom(exact.schedule, [*pipe.scheduler.sigmas.tolist()])
    ours = sample(exact.with_kwargs(class_labels=torch.zeros(1, dtype=torch.long)), noise,
                  DDIM(), grid).x  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_flux_shift_is_read_from_the_image_size(models):
    small = load_model(models["flux"][0], options=LoadOptions(height=16, width=16))
    large = load_model(models["flux"][0], options=LoadOptions(height=32, width=32))
    assert 1.0 < small.schedule.shift < large.schedule.shift  # mu grows with the tokens
    sd3 = load_model(models["sd3"][0], options=LoadOptions(height=16, width=16))
    assert sd3.schedule.shift == 3.0


# ---------------------------------------------------------------------------------------
# check-model on networks built to each convention
_GMM: list[GaussianMixtureModel] = []


def _gmm() -> GaussianMixtureModel:
    if not _GMM:
        _GMM.append(GaussianMixtureModel.fit(load_digits("train"), load_digit_labels("train")))
    return _GMM[0]


class ConventionNet(torch.nn.Module):
    """The exact denoiser of a Gaussian mixture of the digits, predicting ``prediction``,
    fed network time ``tau`` that it maps to solver time with ``to_t`` (``floor``: an
    integer time embedding)."""

    def __init__(self, schedule, prediction, to_t, floor=False, sign=1.0):
        super().__init__()
        self.schedule, self.to_t, self.floor, self.sign = schedule, to_t, floor, sign
        self.den = _gmm().denoiser(schedule)
        self.reader = Wrapper(lambda x, t: x, schedule, prediction)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, tau):
        tau = tau[0].double().floor() if self.floor else tau[0].double()
        high, low = self.schedule.default_range
        t = min(max(float(self.to_t(tau)), low), high)
        c = self.reader.conversion(t)
        x0 = self.den(x.double(), t).x0
        return (self.sign * (x0 - c.px * x.double()) / c.po).float()


def _gmm_samples(n: int = 64) -> torch.Tensor:
    gmm = _gmm()
    gen = torch.Generator().manual_seed(0)
    component = torch.multinomial(gmm.log_weights.exp().float(), n, True, generator=gen)
    z = torch.randn(n, gmm.means.shape[-1], generator=gen, dtype=torch.float64)
    root = gmm.eigvecs * gmm.eigvals.sqrt()[:, None, :]
    return (
        (gmm.means[component] + (root[component] @ z[..., None])[..., 0])
        .reshape(n, 1, 8, 8)
        .float()
    )


VP = VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)
N = 1000
FLOW = RectifiedFlow()


def _index(offset: int):
    """A network trained on timestep index ``t * N - 1 + offset``."""
    return lambda u: (u + 1 - offset) / N


#: name: (schedule, trained prediction, network time -> t, declared prediction, declared
#: time input, expected convention)
CONVENTIONS = {
    "epsilon": (VP, "epsilon", _index(0), "epsilon", "timestep", ("epsilon", "declared")),
    "x0": (VP, "x0", _index(0), "x0", "timestep", ("x0", "declared")),
    "v declared epsilon": (VP, "v", _index(0), "epsilon", "timestep", ("v", "declared")),
    "index t*N": (VP, "epsilon", _index(1), "epsilon", "timestep", ("epsilon", "index+1")),
    "index t*N-2": (VP, "epsilon", _index(-1), "epsilon", "timestep", ("epsilon", "index-1")),
    "flow": (FLOW, "flow", lambda u: u, "flow", "t", ("flow", "declared")),
    "flow reversed": (FLOW, "flow", lambda u: 1 - u, "flow", "t", ("flow", "reversed")),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_check_model_names_the_convention_a_model_was_built_to(name):
    schedule, trained, to_t, declared, time_input, expected = CONVENTIONS[name]
    wrapper = Wrapper(ConventionNet(schedule, trained, to_t), schedule, declared, time_input)
    loaded = LoadedModel(name, wrapper, schedule, (1, 8, 8), {})
    result = check_conventions(loaded, _gmm_samples(), source="model", index=True)
    assert result.best == Convention(*expected), result.verdict()
    assert result.fits == (expected == (declared, "declared"))
    assert not result.integer_time


def test_check_model_finds_a_velocity_of_the_other_sign_and_integer_time():
    flow = RectifiedFlow()
    negated = Wrapper(ConventionNet(flow, "flow", lambda u: u, sign=-1.0), flow, "flow", "t")
    result = check_conventions(LoadedModel("n", negated, flow, (1, 8, 8), {}), _gmm_samples())
    assert result.best == Convention("-flow", "declared") and result.clearly_wrong
    assert "negate the network's output" in result.verdict()
    floor = Wrapper(ConventionNet(VP, "epsilon", lambda u: (u + 1) / N, floor=True), VP)
    result = check_conventions(LoadedModel("i", floor, VP, (1, 8, 8), {}), _gmm_samples())
    assert result.integer_time and "truncates t to an integer" in result.verdict()


def test_a_clearly_wrong_declaration_is_refused_before_a_long_command(tmp_path):
    path = tmp_path / "wrong.py"
    path.write_text(
        "import diffsolve\n"
        "from test_user_models import ConventionNet, VP, N\n"
        "def load():\n"
        "    net = ConventionNet(VP, 'v', lambda u: (u + 1) / N)\n"
        "    return diffsolve.ModelWrapper(net, VP, 'epsilon', data_shape=(1, 8, 8))\n"
    )
    model = ["--model", f"{path}:load", "--data", "digits"]
    out = run(
        "ems",
        *model,
        *TINY_EMS,
        "--out",
        tmp_path / "e",
        code=2,
    )
    assert "does not fit; v, declared time does" in out and "--prediction v" in out
    assert not (tmp_path / "e").exists()
    out = run("check-model", *model, code=1)
    assert "--prediction v" in out
    run("check-model", *model, "--prediction", "v")


# ---------------------------------------------------------------------------------------
def test_float32_grids_and_tensor_time_maps():
    flow = RectifiedFlow(t_max=0.999)
    sigmas = torch.tensor([0.999, 0.5, 0.0], dtype=torch.float32)  # 0.99900001 in float32
    assert float(grids.custom(flow, sigmas)[0]) == 0.999
    with pytest.raises(ValueError, match="must lie in"):
        grids.custom(flow, [0.9995, 0.5, 0.0])
    seen = []

    def time_map(t):
        seen.append(type(t))
        return t.clamp(0, 1) * 1000  # tensor methods work: time is a tensor

    wrapper = ModelWrapper(lambda x, t: x, flow, "flow", time_map, data_shape=(3,))
    assert wrapper.model_time(0.25) == 250.0 and seen == [torch.Tensor]
    with pytest.raises(ValueError, match="data_shape must be"):
        ModelWrapper(lambda x, t: x, flow, data_shape=(0, 2))
