"""Fault injection, library: every defect of the reliability issue that a user meets through
the Python API, reproduced and checked fixed.

Every bad input gets a ``ValueError`` (or a specific subclass) whose one-line message names
the problem and the fix — never a NaN, a hang, an ignored option or a traceback from deep
inside torch; files the library did not make are left byte-identical. (The command-line
items are in ``tests/test_faults_cli.py``.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import diffsolve.ode.model as model_module
from diffsolve import (
    AdaptiveLimitError,
    ClassifierFreeGuidance,
    DPMSolverAdaptive,
    DPMSolverV3,
    ModelWrapper,
    grids,
    sample,
)
from diffsolve.app.data import load_digit_labels, load_digits
from diffsolve.app.loader import demo_path, load_model
from diffsolve.app.model_config import ConfigError
from diffsolve.ode.sampling import CountingDenoiser
from diffsolve.stats.ems import EMS, load_ems, model_fingerprint
from diffsolve.stats.ems.compute import compute_ems
from diffsolve.stats.gaussian.estimate import (
    GaussianStats,
    compute_gaussian_stats,
    load_gaussian_stats,
    read_gaussian_stats,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------
# 1. EMS checkpoints
@pytest.fixture(scope="module")
def gaussian():
    return load_model("gaussian")


def _ems(model, data, path, **options):
    settings = {"samples": 4, "grid_size": 3, "bandwidth": 0, "batch_size": 4, "checkpoint": path}
    return compute_ems(model.denoiser, data, **{**settings, **options})


def test_1a_a_checkpoint_refuses_other_inputs(tmp_path, gaussian):
    """Resuming on other data returned the first data's statistics."""
    digits = load_digits("train")
    path = tmp_path / "ems.partial"
    first = _ems(gaussian, digits[:4], path)
    again = _ems(gaussian, digits[:4], path)  # same inputs: resumed, same statistics
    torch.testing.assert_close(again.s, first.s, rtol=0, atol=0)
    changes = [
        ({"data": digits[4:8]}, r"data \(the bytes of the data tensor\) differs"),
        ({"seed": 1}, r"seed \(0 in the checkpoint, 1 now\)"),
        ({"grid_size": 4}, r"N \(grid_size\) \(3 in the checkpoint, 4 now\)"),
        ({"samples": 3}, r"K \(samples\)"),
        ({"t_end": 0.01}, "t_end"),
        ({"window": 2}, "window"),
        ({"l_window": 1}, "l_window"),
    ]
    saved = path.read_bytes()
    for change, named in changes:
        options = {"data": digits[:4], **change}
        with pytest.raises(ValueError, match=named) as err:
            _ems(gaussian, options.pop("data"), path, **options)
        assert "delete it to start over" in one_line(err)
    assert path.read_bytes() == saved  # a refused resume leaves the checkpoint as it was


def test_1a_a_checkpoint_refuses_other_labels_and_another_model(tmp_path):
    cond = load_model("digits-cond")
    data, labels = load_digits("train")[:2], load_digit_labels("train")[:2]
    path = tmp_path / "ems.partial"

    def run(model, labels):
        return compute_ems(
            model.denoiser,
            data,
            samples=2,
            grid_size=2,
            bandwidth=0,
            checkpoint=path,
            conditioning=model.label_kwargs(labels),
        )

    run(cond, labels)
    with pytest.raises(ValueError, match="labels/conditioning differs"):
        run(cond, (labels + 1) % 10)
    with pytest.raises(ValueError, match=r"model \(weights fingerprint\) differs"):
        run(load_model("digits"), None)


@pytest.mark.parametrize("kind", ["text", "ems", "folder"])
def test_1b_a_foreign_file_at_the_checkpoint_path_is_never_touched(tmp_path, gaussian, kind):
    """An existing notes.txt given as the checkpoint was overwritten (a UserWarning only)."""
    target = tmp_path / "notes.txt"
    if kind == "text":
        target.write_text("my notes")
    elif kind == "ems":  # a finished EMS file passed as the checkpoint by mistake
        gaussian.load_ems().save(target)
    else:
        target.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    content = target.read_bytes() if target.is_file() else None
    with pytest.raises(ValueError, match=r"notes\.txt") as err:
        _ems(gaussian, load_digits("train")[:4], target)
    assert "not a diffsolve EMS checkpoint" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left
    if content is not None:
        assert target.read_bytes() == content


# ---------------------------------------------------------------------------------------
# 2. DPM-Solver-v3 checks its statistics against the model and the input
def _v3(ems: EMS) -> DPMSolverV3:
    return DPMSolverV3(ems, 2)


def test_2_v3_refuses_another_models_ems():
    """The digits-cond EMS ran on the digits model without a word."""
    digits, cond = load_model("digits"), load_model("digits-cond")
    grid = grids.time_quadratic(digits.schedule, 3)
    x = torch.randn(2, *digits.data_shape, generator=torch.Generator().manual_seed(0))
    counted = CountingDenoiser(digits.denoiser)
    with pytest.raises(ValueError, match="computed for digits-cond") as err:
        sample(counted, x, _v3(cond.load_ems()), grid)
    assert "not for this model" in one_line(err) and counted.calls <= 1
    sample(digits.denoiser, x, _v3(digits.load_ems()), grid)  # its own EMS: fine
    labels = {"class_labels": torch.tensor([3, 4])}
    guided = ClassifierFreeGuidance(cond.denoiser, 2.0, labels, {"class_labels": torch.tensor(10)})
    sample(guided, x, _v3(cond.load_ems()), grid)  # found through the guidance wrapper
    with pytest.raises(ValueError, match="not for this model"):
        sample(guided, x, _v3(digits.load_ems()), grid)


def test_2_v3_refuses_an_input_of_another_shape():
    """An EMS shaped (1, 8, 8) broadcast silently over a 3-channel input."""
    schedule = load_model("digits").schedule
    ems = EMS.degenerate(schedule, (1, 8, 8), n=20)
    model = ModelWrapper(lambda x, t: 0.1 * x, schedule, "epsilon")  # any channel count
    grid = grids.time_quadratic(schedule, 4)
    counted = CountingDenoiser(model)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*\(3, 8, 8\)") as err:
        sample(counted, torch.randn(2, 3, 8, 8), _v3(ems), grid)
    assert "per-pixel" in one_line(err) and counted.calls <= 1
    assert sample(model, torch.randn(2, 1, 8, 8), _v3(ems), grid).x.isfinite().all()


def test_2_the_check_hashes_no_weights(monkeypatch):
    """The model check reads the fingerprint the loaded model already knows."""
    digits = load_model("digits")
    ems = digits.load_ems()

    def no_hashing(*args, **kwargs):
        raise AssertionError("weights hashed while sampling")

    monkeypatch.setattr(model_module, "_hash_tensors", no_hashing)
    grid = grids.time_quadratic(digits.schedule, 4)
    sample(digits.denoiser, torch.randn(2, 1, 8, 8), _v3(ems), grid)


# ---------------------------------------------------------------------------------------
# 3. Gaussian statistics and the starting point
def test_3_gaussian_statistics_from_nan_data_are_refused(tmp_path):
    """Statistics of data with a NaN were written (exit 0), then blamed on the model."""
    data = torch.randn(40, 1, 4, 4, dtype=torch.float64)
    data[7, 0, 1, 2] = float("nan")
    for method, rank in (("exact", None), ("randomized", 3)):
        with pytest.raises(ValueError, match=r"NaN or inf.*sample 7") as err:
            compute_gaussian_stats(data, rank, method=method, batch_size=5)
        assert "finite" in one_line(err)


def _write_stats(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_3_invalid_gaussian_statistics_are_refused_on_load_and_write(tmp_path):
    from safetensors import safe_open

    good = tmp_path / "good.safetensors"
    compute_gaussian_stats(torch.randn(40, 1, 4, 4)).save(good)
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edits = {
        "mean": ("mean", float("nan"), "mean contains NaN or inf"),
        "eigvecs": ("eigvecs", float("inf"), "eigvecs contains NaN or inf"),
        "negative": ("eigvals", -1.0, "negative eigenvalue"),
    }
    for name, (key, value, message) in edits.items():
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[key].view(-1)[0] = value
        path = tmp_path / f"{name}.safetensors"
        _write_stats(path, bad, metadata)
        with pytest.raises(ValueError, match=message) as err:
            load_gaussian_stats(path)
        assert path.name in one_line(err)
        with pytest.raises(ValueError, match=message):
            GaussianStats(bad["mean"].reshape(1, 4, 4), bad["eigvals"], bad["eigvecs"], 40, "", "")
    stats = read_gaussian_stats(good)
    stats.mean.view(-1)[0] = float("nan")  # corrupted in memory after the checks
    with pytest.raises(ValueError, match="not writing"):
        stats.save(tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_3_a_non_finite_start_is_the_inputs_fault():
    """A NaN x_start was reported as the model diverging 'after 0 model evaluations'."""
    digits = load_model("digits")
    counted = CountingDenoiser(digits.denoiser)
    x = torch.randn(2, 1, 8, 8)
    x[1, 0, 3, 3] = float("inf")
    grid = grids.time_quadratic(digits.schedule, 3)
    with pytest.raises(ValueError, match=r"x_start contains 1 NaN or inf") as err:
        sample(counted, x, DPMSolverAdaptive(), grid)
    assert counted.calls == 0 and "finite" in one_line(err)


# ---------------------------------------------------------------------------------------
# 4. The adaptive solver is capped
def test_4_adaptive_steps_are_capped():
    """DPMSolverAdaptive(rtol=1e-12) had no cap and ran practically forever."""
    model = load_model("gaussian")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = grids.logsnr_uniform(model.schedule, 1)
    for option, value in (("max_nfe", 300), ("max_steps", 20)):
        counted = CountingDenoiser(model.denoiser)
        solver = DPMSolverAdaptive(rtol=1e-12, atol=1e-12, **{option: value})
        with pytest.raises(AdaptiveLimitError, match=f"{option}={value}") as err:
            sample(counted, x, solver, grid)
        assert "looser rtol/atol" in one_line(err)
        assert counted.calls <= 300 if option == "max_nfe" else counted.calls < 10_000
    solver = DPMSolverAdaptive(rtol=1e-12, atol=1e-12)  # the documented defaults stop too
    assert (solver.max_steps, solver.max_nfe) == (5_000, 10_000)
    counted = CountingDenoiser(model.denoiser)
    with pytest.raises(AdaptiveLimitError, match="max_"):
        sample(counted, x, solver, grid)
    assert counted.calls <= 10_000
    assert sample(model.denoiser, x, DPMSolverAdaptive(), grid).nfe < 200  # defaults: fine
    for bad in ({"max_nfe": 0}, {"max_steps": 1.5}, {"max_nfe": True}):
        with pytest.raises(ValueError, match="must be an integer"):
            DPMSolverAdaptive(**bad)


# ---------------------------------------------------------------------------------------
# 5. Model configs and dtypes
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"schedule": None}, r"key 'schedule' must be an object.*got null"),
        (
            {"schedule": {"kind": "vp_discrete", "num_train_timesteps": "1000"}},
            r"key 'schedule.num_train_timesteps' must be an integer, got string '1000'",
        ),
        ({"data_shape": "1,8,8"}, r"key 'data_shape' must be a list of positive integers"),
        ({"prediction": 3}, r"key 'prediction' must be one of"),
        ({"schedule": {"kind": "vp_linear", "beta": 1}}, r"unknown key 'schedule.beta'"),
        ({"conditioning": {"num_classes": "10"}}, r"'conditioning.num_classes' must be a"),
        ({"network": {"base_channels": "32"}}, r"'network.base_channels' must be an integer"),
        ({"network": {"channel_mult": 2}}, r"'network.channel_mult' must be a list of int"),
    ],
)
def test_5_bad_model_configs_name_the_key_the_type_and_the_file(tmp_path, edit, message):
    folder = tmp_path / "model"
    shutil.copytree(demo_path("digits"), folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        if key == "network":
            config["network"].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as err:
        load_model(folder)
    assert str(folder / "config.json") in one_line(err)


def test_5_float64_input_runs_a_float32_network():
    """float64 input into a float32 network failed deep inside torch."""
    digits = load_model("digits")
    wrapper = ModelWrapper(digits.network, digits.schedule, "epsilon", "timestep")
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = wrapper.forward(x, 0.5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, wrapper.forward(x.float(), 0.5).double())
    grid = grids.time_quadratic(digits.schedule, 4)
    assert sample(wrapper, x, _v3(digits.load_ems()), grid).x.dtype == torch.float64
    t = torch.tensor(0.5, dtype=torch.float64)
    assert wrapper.differentiable_eps(x, t).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_5_a_model_loaded_in_any_dtype_accepts_its_own_ems(dtype):
    """load_model(name, dtype=torch.bfloat16).load_ems() refused the model's own EMS."""
    reference = model_fingerprint(load_model("digits").denoiser)
    for name in ("digits", "digits-cond", "digits-flow"):
        model = load_model(name, dtype=dtype)
        ems = model.load_ems()
        assert ems.metadata["model_fingerprint"] == model_fingerprint(model.denoiser)
        grid = grids.time_quadratic(model.schedule, 3)
        out = sample(model.denoiser, torch.randn(2, *model.data_shape), _v3(ems), grid)
        assert out.x.isfinite().all()
    assert model_fingerprint(load_model("digits", dtype=dtype).denoiser) == reference


def test_5_the_shipped_ems_still_match_their_models():
    for name in ("digits", "digits-cond", "digits-flow", "gaussian", "gmm"):
        model = load_model(name)
        recorded = load_ems(model.ems_path).metadata["model_fingerprint"]
        assert recorded == model_fingerprint(model.denoiser), name


def test_5_a_half_precision_network_without_a_known_fingerprint_is_not_misjudged():
    """Rounded weights cannot be told from the original's: no fingerprint, no false
    refusal (the shape is still checked)."""
    digits = load_model("digits")
    half = ModelWrapper(digits.network.to(torch.bfloat16), digits.schedule, "epsilon")
    assert half.weights_fingerprint() is None
    grid = grids.time_quadratic(digits.schedule, 3)
    sample(half, torch.randn(2, 1, 8, 8), _v3(digits.load_ems()), grid)
