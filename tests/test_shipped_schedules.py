"""Tuned step schedules kept with a model (``<folder>/schedules/<solver>-nfe<N>.json``):
``diffsolve sample`` picks them up, says so, and leaves them alone where they do not apply."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from diffsolve.app import loader
from diffsolve.app.cli import main
from diffsolve.app.loader import load_model
from diffsolve.app.schedules import find_tuned_schedule, schedule_filename
from diffsolve.app.tune import schedule_fingerprint
from diffsolve.ode.step_schedule import StepSchedule

pytestmark = pytest.mark.usefixtures("single_thread")

TIMES = (1.0, 0.55, 0.25, 0.09, 0.02, 0.0)  # not the default grid of dpm-solver-v3 at 5 NFE
NAME = schedule_filename("dpm-solver-v3", 5)
DEMO_FILES = ("config.json", "model.safetensors", "ems.safetensors", "gaussian_stats.safetensors")


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


def _schedule(model, solver="dpm-solver-v3", nfe=5, times=TIMES, fingerprint=None):
    return StepSchedule(
        times=times,
        solver=solver,
        nfe=nfe,
        method="dp",
        noise_schedule=model.schedule.to_config(),
        fingerprint=fingerprint or schedule_fingerprint(model),
        model=model.name,
        fit={"check_rmse": 0.081, "check_rmse_default": 0.114},
    )


def _copy_digits(folder):
    folder.mkdir(parents=True)
    for name in DEMO_FILES:
        shutil.copy(loader.demo_path("digits") / name, folder / name)
    (folder / "schedules").mkdir()
    return folder


@pytest.fixture
def demos(tmp_path, monkeypatch):
    """The demo folder, redirected to a copy of ``digits`` in tmp_path (the package is
    never written)."""
    root = tmp_path / "demos"
    _copy_digits(root / "digits")
    monkeypatch.setattr(loader, "DEMO_DIR", root)
    return root


def _sample(out, *args):
    command = ["sample", "--model", "digits", "--nfe", "5", "--seeds", "0-3", "--out", str(out)]
    result = CliRunner().invoke(main, [*command, *args])
    assert result.exit_code == 0, result.output
    return result.output


def _manifest(out):
    return json.loads((out / "sample.json").read_text())


def _samples(out):
    with np.load(out / "samples.npz") as data:
        return data["samples"]


def test_sample_picks_up_the_shipped_schedule_and_says_so(demos, digits, tmp_path):
    path = _schedule(digits).save(demos / "digits" / "schedules" / NAME)
    output = _sample(tmp_path / "auto")
    line = (
        f"using the tuned step schedule schedules/{NAME} shipped with digits (held-out RMSE "
        "0.081 vs 0.114 on the default grid; --grid time_quadratic or --no-tuned-schedule "
        "to opt out)"
    )
    assert line in output.splitlines()
    assert "dpm-solver-v3, tuned schedule schedules/" in output
    auto = _manifest(tmp_path / "auto")
    assert auto["grid_t"] == list(TIMES) and auto["grid"] == "schedule:dp"
    assert auto["schedule"] == f"tuned:schedules/{NAME}" and "schedule" in auto["inputs"]
    # exactly what --schedule FILE does: the same samples, the same fingerprint
    _sample(tmp_path / "explicit", "--schedule", str(path))
    explicit = _manifest(tmp_path / "explicit")
    assert explicit["schedule"] == str(path.resolve())
    assert explicit["fingerprint"] == auto["fingerprint"]
    np.testing.assert_array_equal(_samples(tmp_path / "auto"), _samples(tmp_path / "explicit"))
    # a resume makes the same choice
    again = _sample(tmp_path / "auto")
    assert line in again.splitlines() and "0 shard(s) computed, 1 kept" in again


def test_opting_out_and_an_explicit_grid_leave_it_alone(demos, digits, tmp_path):
    _schedule(digits).save(demos / "digits" / "schedules" / NAME)
    for name, args in {"off": ["--no-tuned-schedule"], "grid": ["--grid", "logsnr"]}.items():
        output = _sample(tmp_path / name, *args)
        assert "tuned" not in output, output
        manifest = _manifest(tmp_path / name)
        assert manifest["grid_t"] != list(TIMES) and manifest["schedule"] == ""
        assert "schedule" not in manifest["inputs"]
    assert _manifest(tmp_path / "off")["grid"] == "time_quadratic"
    assert _manifest(tmp_path / "grid")["grid"] == "logsnr"


def test_a_file_for_another_model_or_solver_is_skipped_with_a_warning(demos, digits, tmp_path):
    gaussian = load_model("gaussian")  # the digits noise schedule, another model
    assert schedule_fingerprint(gaussian) != schedule_fingerprint(digits)
    folder = demos / "digits" / "schedules"
    _schedule(gaussian).save(folder / NAME)
    output = _sample(tmp_path / "other")
    assert f"skipping the tuned step schedule schedules/{NAME} shipped with digits" in output
    assert "packaging bug" in output and "using the tuned" not in output
    assert _manifest(tmp_path / "other")["grid"] == "time_quadratic"
    # a file whose contents do not match its name
    _schedule(digits, nfe=6, times=(1.0, 0.6, 0.3, 0.15, 0.06, 0.02, 0.0)).save(folder / NAME)
    output = _sample(tmp_path / "misnamed")
    assert "not dpm-solver-v3 at 5" in output and "using the tuned" not in output
    bogus = replace(_schedule(digits), options={"bogus": 1})
    bogus.save(folder / NAME)
    output = _sample(tmp_path / "options")
    assert "skipping" in output and "bogus" in output and "using the tuned" not in output
    (folder / NAME).write_text("{not json")
    output = _sample(tmp_path / "broken")
    assert "skipping" in output and "not JSON" in output
    with pytest.warns(UserWarning, match="skipping the tuned step schedule"):
        assert find_tuned_schedule(load_model("digits"), "dpm-solver-v3", 5) is None


def test_an_nfe_without_a_file_uses_the_default_grid_quietly(demos, digits, tmp_path):
    _schedule(digits).save(demos / "digits" / "schedules" / NAME)
    output = _sample(tmp_path / "six", "--nfe", "6")
    assert "tuned" not in output and "skipping" not in output
    manifest = _manifest(tmp_path / "six")
    assert manifest["grid"] == "time_quadratic" and manifest["schedule"] == ""


def test_a_model_folder_of_the_users_is_searched_too(digits, tmp_path):
    folder = _copy_digits(tmp_path / "mine")
    path = _schedule(digits, "unipc-bh2-3", 5).save(folder / "schedules" / "unipc-bh2-3-nfe5.json")
    found = find_tuned_schedule(load_model(folder), "unipc-bh2-3", 5)
    assert found is not None and found.path == path and not found.shipped
    args = ["sample", "--model", str(folder), "--solver", "unipc-bh2-3", "--nfe", "5"]
    result = CliRunner().invoke(main, [*args, "--seeds", "0-1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert f"using the tuned step schedule {path} (held-out RMSE" in result.output
    manifest = _manifest(tmp_path / "r")
    assert manifest["schedule"] == "tuned:schedules/unipc-bh2-3-nfe5.json"
    assert manifest["grid_t"] == list(TIMES)


def test_options_it_was_not_fitted_for_keep_the_default_grid(demos, digits, tmp_path):
    _schedule(digits).save(demos / "digits" / "schedules" / NAME)
    output = _sample(tmp_path / "tele", "--teleport", "0.2")
    assert f"not using the tuned step schedule schedules/{NAME}" in output
    assert "--teleport 0.2 (teleportation sets the grid)" in output
    assert _manifest(tmp_path / "tele")["schedule"] == ""
    output = _sample(tmp_path / "thr", "--threshold", "0.995")
    assert "--threshold 0.995 (it was fitted without thresholding; --schedule" in output
    assert _manifest(tmp_path / "thr")["grid"] == "time_quadratic"


def test_a_resume_with_another_choice_is_refused_naming_it(demos, digits, tmp_path):
    _sample(tmp_path / "run", "--no-tuned-schedule")
    _schedule(digits).save(demos / "digits" / "schedules" / NAME)  # shipped since
    args = ["sample", "--model", "digits", "--nfe", "5", "--seeds", "0-3"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert f"picks up the tuned step schedule schedules/{NAME}, the folder's run used none" in text
    assert "--no-tuned-schedule turns it off" in text
    assert "Traceback" not in result.output
    assert "0 shard(s) computed, 1 kept" in _sample(tmp_path / "run", "--no-tuned-schedule")
    _sample(tmp_path / "tuned")
    _schedule(digits, times=(1.0, 0.5, 0.25, 0.1, 0.03, 0.0)).save(
        demos / "digits" / "schedules" / NAME
    )  # a newer version ships another schedule
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "tuned")])
    assert result.exit_code == 2
    assert f"the tuned step schedule schedules/{NAME} changed since" in " ".join(
        result.output.split()
    )
