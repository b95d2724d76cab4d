"""Solver schedules in ``diffsolve sample`` (issue 23): ``--solver schedule:FILE`` runs
everywhere the CLI does, checked against the model, recorded and resumed by the file's
content; a solver schedule kept with the model (``schedules/solver-schedule-nfe<N>.json``) is
picked up with ``--solver auto`` as tuned step schedules are."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from diffsolve.app import loader
from diffsolve.app.cli import main
from diffsolve.app.loader import load_model
from diffsolve.app.schedules import solver_schedule_filename
from diffsolve.app.tune import schedule_fingerprint
from diffsolve.solvers.registry import setup_solver
from diffsolve.solvers.solver_schedule import SolverSchedule, copy_solver, ems_digest

pytestmark = pytest.mark.usefixtures("single_thread")

DEMO_FILES = ("config.json", "model.safetensors", "ems.safetensors", "gaussian_stats.safetensors")
NAME = solver_schedule_filename(5)
FIT = {"heldout_rmse": 0.0512, "heldout_rmse_best_step_schedule": 0.0803}


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


def v3_copy(model, nfe: int = 5, **changes) -> SolverSchedule:
    """The solver schedule that copies the registry's dpm-solver-v3 at ``nfe`` on its
    default grid, fitted to ``model``."""
    context = model.solver_context(("ems",))
    solver, grid = setup_solver("dpm-solver-v3", model.schedule, nfe, context=context)
    fitted = SolverSchedule(
        times=tuple(grid.tolist()),
        steps=copy_solver(solver, model.schedule, grid),
        nfe=nfe,
        noise_schedule=model.schedule.to_config(),
        fingerprint=schedule_fingerprint(model),
        ems=ems_digest(context.ems),
        model=model.name,
        method="copy",
        fit=dict(FIT),
    )
    return replace(fitted, **changes)


def unipc_copy(model, nfe: int = 5) -> SolverSchedule:
    """The solver schedule that copies unipc-bh2-3 at ``nfe`` (no statistics needed)."""
    solver, grid = setup_solver("unipc-bh2-3", model.schedule, nfe)
    steps = copy_solver(solver, model.schedule, grid)
    return replace(v3_copy(model, nfe), steps=steps, times=tuple(grid.tolist()), ems=None)


def write(fitted: SolverSchedule, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fitted.to_json())
    return path


def copy_digits(folder: Path) -> Path:
    """A model folder of the user's: a copy of the digits demo (the package is never
    written)."""
    (folder / "schedules").mkdir(parents=True)
    for name in DEMO_FILES:
        shutil.copy(loader.demo_path("digits") / name, folder / name)
    return folder


def run(out: Path, *args: str, model: str = "digits", code: int = 0) -> str:
    command = ["sample", "--model", model, "--seeds", "0-3", "--out", str(out), *args]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def manifest(out: Path) -> dict:
    return json.loads((out / "sample.json").read_text())


def samples(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as data:
        return data["samples"]


def test_solver_schedule_file_runs_in_sample(digits, tmp_path):
    """``--solver schedule:FILE`` takes the file's NFE and times; the copy of v3 gives v3's
    samples; the manifest names the file (absolute) and covers its content."""
    path = write(v3_copy(digits), tmp_path / "s.json")
    run(tmp_path / "ours", "--solver", f"schedule:{path}")
    run(tmp_path / "v3", "--solver", "dpm-solver-v3", "--nfe", "5", "--no-tuned-schedule")
    ours, v3 = manifest(tmp_path / "ours"), manifest(tmp_path / "v3")
    assert ours["solver"] == f"schedule:{path.resolve()}" and ours["nfe"] == 5
    assert ours["grid"] == "schedule:copy" and ours["grid_t"] == v3["grid_t"]
    assert "schedule" in json.loads(ours["inputs"]) and ours["schedule"] == str(path.resolve())
    assert ours["solver_options"].startswith("ScheduledSolver(choices=(StepChoice(")
    np.testing.assert_allclose(samples(tmp_path / "ours"), samples(tmp_path / "v3"), atol=2e-5)
    # a resume keeps the shards; after the file changed it is refused, naming the file
    assert "0 shard(s) computed, 1 kept" in run(tmp_path / "ours", "--solver", f"schedule:{path}")
    write(v3_copy(digits, fit={"heldout_rmse": 0.04}), path)
    text = run(tmp_path / "ours", "--solver", f"schedule:{path}", code=2)
    assert "inputs: schedule changed" in text


def test_what_contradicts_the_file_is_refused(digits, tmp_path):
    path = write(v3_copy(digits), tmp_path / "s.json")
    name = f"schedule:{path}"
    text = run(tmp_path / "g", "--solver", name, "--grid", "logsnr", code=2)
    assert (
        f"--grid contradicts --solver {name}: a solver schedule comes with its own times" in text
    )
    text = run(tmp_path / "n", "--solver", name, "--nfe", "6", code=2)
    assert f"--nfe 6 contradicts --solver schedule:{path.resolve()}" in text
    assert "pass --nfe 5" in text
    text = run(tmp_path / "t", "--solver", name, "--teleport", "0.2", code=2)
    assert "--teleport contradicts" in text
    missing = run(tmp_path / "m", "--solver", f"schedule:{tmp_path / 'none.json'}", code=2)
    assert "no such file" in missing
    for bad, message in (
        ({"fingerprint": "0123456789abcdef"}, "fitted to model digits (fingerprint"),
        ({"ems": "0123456789abcdef"}, "fitted with other EMS (0123456789abcdef)"),
        ({"noise_schedule": {"kind": "vp_linear"}}, "fitted under the noise schedule"),
    ):
        other = write(v3_copy(digits, **bad), tmp_path / "other.json")
        text = run(tmp_path / "x", "--solver", f"schedule:{other}", code=2)
        assert message in text, text
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()


def test_sample_picks_up_a_solver_schedule_kept_with_the_model(digits, tmp_path):
    folder = copy_digits(tmp_path / "mine")
    path = write(v3_copy(digits), folder / "schedules" / NAME)
    text = run(tmp_path / "auto", "--nfe", "5", model=str(folder))
    line = (
        f"using the tuned solver schedule {path} (5 NFE; held-out RMSE 0.0512 vs 0.0803 for "
        "the best step schedule; --solver NAME or --no-tuned-schedule to opt out)"
    )
    assert line in text
    auto = manifest(tmp_path / "auto")
    assert auto["solver"] == f"schedule:{path.resolve()}"
    assert auto["schedule"] == f"tuned:schedules/{NAME}" and auto["grid"] == "schedule:copy"
    # the same run as naming the file
    run(tmp_path / "named", "--solver", f"schedule:{path}", model=str(folder))
    np.testing.assert_array_equal(samples(tmp_path / "auto"), samples(tmp_path / "named"))
    assert manifest(tmp_path / "named")["fingerprint"] == auto["fingerprint"]
    # opted out, another solver, another NFE: not used, silently
    for out, args in {
        "off": ("--nfe", "5", "--no-tuned-schedule"),
        "v3": ("--nfe", "5", "--solver", "dpm-solver-v3"),
        "six": ("--nfe", "6"),
    }.items():
        assert "solver schedule" not in run(tmp_path / out, *args, model=str(folder))
        assert manifest(tmp_path / out)["solver"] == "dpm-solver-v3"
    # options it was not fitted for
    text = run(tmp_path / "thr", "--nfe", "5", "--threshold", "0.995", model=str(folder))
    assert f"not using the tuned solver schedule {path} with --threshold 0.995" in text
    assert manifest(tmp_path / "thr")["solver"] == "dpm-solver-v3"
    # statistics given: v3 with them, not the schedule (which uses the folder's)
    ems = str(folder / "ems.safetensors")
    for fitted in (v3_copy(digits), unipc_copy(digits)):
        write(fitted, path)
        text = run(tmp_path / fitted.steps[0].space, "--nfe", "5", "--ems", ems, model=str(folder))
        assert f"not using the tuned solver schedule {path} with --ems {ems}" in text, text
        assert manifest(tmp_path / fitted.steps[0].space)["solver"] == "dpm-solver-v3"
    write(v3_copy(digits), path)
    # a resume after the file changed is refused, naming it
    write(v3_copy(digits, fit={"heldout_rmse": 0.04}), path)
    text = run(tmp_path / "auto", "--nfe", "5", model=str(folder), code=2)
    assert f"the tuned solver schedule schedules/{NAME} changed since" in text


def test_a_solver_schedule_that_does_not_fit_is_skipped_with_one_line(
    digits, tmp_path, monkeypatch
):
    root = tmp_path / "demos"
    copy_digits(root / "digits")
    monkeypatch.setattr(loader, "DEMO_DIR", root)
    path = root / "digits" / "schedules" / NAME
    cases = {
        "model": (v3_copy(digits, fingerprint="0123456789abcdef"), "fitted to model digits"),
        "ems": (v3_copy(digits, ems="0123456789abcdef"), "fitted with other EMS"),
        "nfe": (v3_copy(digits, nfe=6), "holds a solver schedule for 6 NFE, not 5"),
    }
    for case, (fitted, reason) in cases.items():
        write(fitted, path)
        text = run(tmp_path / case, "--nfe", "5")
        head = f"skipping the tuned solver schedule schedules/{NAME} shipped with digits"
        assert head in text and "packaging bug" in text and reason in text, text
        assert manifest(tmp_path / case)["solver"] == "dpm-solver-v3"
    path.write_text("{broken")
    assert "not JSON" in run(tmp_path / "broken", "--nfe", "5")
    write(v3_copy(digits, config={"scale": "high"}), path)
    assert "its config (the search's settings) is malformed" in run(tmp_path / "cfg", "--nfe", "5")


def test_solvers_lists_the_schedule_prefix():
    listing = CliRunner().invoke(main, ["solvers"]).output
    assert "schedule:FILE" in listing and "tune --method solver-schedule" in listing


def test_a_schedule_searched_under_guidance_is_for_that_guidance(tmp_path):
    """A solver schedule searched on the guided denoiser (its ``config`` records guidance
    and scale) is picked up by runs with that guidance and scale only."""
    cond = load_model("digits-cond")
    folder = tmp_path / "cond"
    (folder / "schedules").mkdir(parents=True)
    for name in DEMO_FILES:
        shutil.copy(loader.demo_path("digits-cond") / name, folder / name)
    fitted = replace(unipc_copy(cond), config={"guidance": "cfg", "scale": 2.0})
    path = write(fitted, folder / "schedules" / NAME)
    args = ("--nfe", "5", "--guidance", "cfg")
    text = run(tmp_path / "s2", *args, "--scale", "2", model=str(folder))
    assert f"using the tuned solver schedule {path}" in text
    assert manifest(tmp_path / "s2")["solver"] == f"schedule:{path.resolve()}"
    text = run(tmp_path / "s3", *args, "--scale", "3", model=str(folder))
    line = f"not using the tuned solver schedule {path} with --guidance cfg --scale 3 (it was"
    assert f"{line} fitted with --guidance cfg --scale 2" in text, text
    text = run(tmp_path / "none", "--nfe", "5", model=str(folder))
    assert f"{path} with no --guidance (it was fitted with --guidance cfg --scale 2" in text
    assert manifest(tmp_path / "none")["solver"] == "dpm-solver-v3"
