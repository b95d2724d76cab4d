"""Fitted step schedules (``diffsolve tune``): the Gaussian oracle, determinism, the file."""

import json

import pytest
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.app.tune import TuneConfig, schedule_solver, tune_schedule
from diffsolve.ode import grids
from diffsolve.ode.sampling import sample
from diffsolve.ode.step_schedule import StepSchedule
from diffsolve.solvers.registry import setup_solver
from diffsolve.wrappers.teleport import Teleported

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = TuneConfig(candidates=30, teacher_steps=120, trajectories=32, holdout=32)


@pytest.fixture(scope="module")
def gaussian_model():
    return load_model("gaussian")


def _exact_error(model, solver, grid) -> float:
    """RMSE to the exact solution on seeds no tuning saw."""
    x = noise_for_seeds(range(5000, 5128), model.data_shape)
    exact = model.analytic.solution(x, float(grid[0]), 0.0, model.schedule)
    out = sample(model.denoiser, x, solver, grid).x
    return float((out.double() - exact.double()).pow(2).mean().sqrt())


@pytest.mark.parametrize("solver", ["dpm-solver++-2m", "unipc-bh2-3"])
@pytest.mark.parametrize("cost", ["student", "euler"])
def test_dp_is_never_worse_than_the_default_grid_on_the_oracle(gaussian_model, solver, cost):
    config = TuneConfig(cost=cost, candidates=30, teacher_steps=120, trajectories=32, holdout=32)
    for nfe in (3, 4, 5, 6, 8):
        fitted = tune_schedule(gaussian_model, solver, nfe, "dp", config)
        tuned_solver, tuned_grid = schedule_solver(fitted, gaussian_model)
        base_solver, base_grid = setup_solver(solver, gaussian_model.schedule, nfe)
        tuned = _exact_error(gaussian_model, tuned_solver, tuned_grid)
        base = _exact_error(gaussian_model, base_solver, base_grid)
        assert tuned <= base * 1.02, (nfe, tuned, base, fitted.times)
        assert tuned_grid.numel() == nfe + 1 and float(tuned_grid[-1]) == 0.0


def test_student_dp_beats_the_default_grid_on_the_oracle(gaussian_model):
    fitted = tune_schedule(gaussian_model, "dpm-solver++-2m", 5, "dp", SMALL)
    assert fitted.method == "dp"
    tuned = _exact_error(gaussian_model, *schedule_solver(fitted, gaussian_model))
    base = _exact_error(
        gaussian_model, *setup_solver("dpm-solver++-2m", gaussian_model.schedule, 5)
    )
    assert tuned < 0.8 * base


def test_tuning_is_deterministic_for_a_seed(gaussian_model):
    one = tune_schedule(gaussian_model, "unipc-bh2-3", 4, "search", SMALL)
    two = tune_schedule(gaussian_model, "unipc-bh2-3", 4, "search", SMALL)
    assert one.times == two.times and one.options == two.options
    assert one.fit == two.fit and one.cost["model_evaluations"] > 0
    assert one.fit["check_rmse"] <= one.fit["check_rmse_default"] * 1.05


def test_search_respects_its_budget_and_the_nfe(gaussian_model):
    budget = 10 * 4 * SMALL.holdout
    config = TuneConfig(
        candidates=30, teacher_steps=120, trajectories=32, holdout=32, budget=budget
    )
    fitted = tune_schedule(gaussian_model, "unipc-bh2-3", 4, "search", config)
    solver, grid = schedule_solver(fitted, gaussian_model)
    assert solver.plan(gaussian_model.schedule, grid).nfe == 4
    teachers = 3 * 32 * 121  # fit, search and check teachers (120 steps + candidate rounding)
    assert fitted.cost["model_evaluations"] < teachers + budget + 5 * 32 * 31 * 4


def test_file_round_trip_and_refusals(gaussian_model, tmp_path):
    fitted = tune_schedule(gaussian_model, "dpm-solver++-2m", 4, "dp", SMALL)
    path = fitted.save(tmp_path / "schedule.json")
    again = StepSchedule.load(path)
    assert again == fitted
    grid = grids.from_file(str(path), gaussian_model.schedule, fitted.fingerprint)
    assert tuple(grid.tolist()) == fitted.times
    with pytest.raises(ValueError, match=r"fitted to model .* not this one"):
        grids.from_file(str(path), gaussian_model.schedule, "0123456789abcdef")
    flow = load_model("digits-flow")
    with pytest.raises(ValueError, match="noise schedule"):
        grids.from_file(str(path), flow.schedule)
    digits = load_model("digits")
    with pytest.raises(ValueError, match="not this one"):
        schedule_solver(again, digits)
    (tmp_path / "bad.json").write_text(json.dumps({"times": [1, 0]}))
    with pytest.raises(ValueError, match="not a diffsolve step schedule"):
        StepSchedule.load(tmp_path / "bad.json")


def test_cli_tune_then_sample_with_the_schedule(tmp_path):
    out = tmp_path / "schedule.json"
    tune = [
        "tune", "--model", "gaussian", "--solver", "dpm-solver++-2m", "--nfe", "4",
        "--candidates", "20", "--teacher-steps", "60", "--trajectories", "16", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, tune)
    assert result.exit_code == 0, result.output
    assert "held-out RMSE" in result.output and out.is_file()
    again = CliRunner().invoke(main, tune)
    assert again.exit_code == 2 and "--force" in again.output
    run = tmp_path / "run"
    args = ["sample", "--model", "gaussian", "--schedule", str(out), "--seeds", "0-3"]
    result = CliRunner().invoke(main, [*args, "--out", str(run)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "sample.json").read_text())
    assert manifest["grid_t"] == json.loads(out.read_text())["times"]
    assert manifest["solver"] == "dpm-solver++-2m" and "schedule" in manifest["inputs"]
    clash = CliRunner().invoke(main, [*args, "--nfe", "6", "--out", str(tmp_path / "r2")])
    assert clash.exit_code == 2 and "--schedule" in clash.output
    elsewhere = ["sample", "--model", "digits", "--schedule", str(out)]
    other = CliRunner().invoke(main, [*elsewhere, "--out", str(tmp_path / "r3")])
    assert other.exit_code == 2 and "not this one" in other.output.replace("\n", " ")


def test_samples_follow_the_tuned_grid(gaussian_model):
    fitted = tune_schedule(gaussian_model, "dpm-solver++-2m", 3, "dp", SMALL)
    solver, grid = schedule_solver(fitted, gaussian_model)
    x = noise_for_seeds(range(4), gaussian_model.data_shape)
    out = sample(gaussian_model.denoiser, x, solver, grid, return_intermediates=True)
    assert out.nfe == 3 and out.times == pytest.approx(list(fitted.times), rel=1e-6)


def test_dp_with_teleport_starts_where_the_gaussian_takes_over(gaussian_model, tmp_path):
    """On the Gaussian model teleportation is the exact flow: dp skips as far as it may,
    the file records the jump, and the schedule spends its NFE after it."""
    config = TuneConfig(
        candidates=30, teacher_steps=120, trajectories=32, holdout=32, teleport=True
    )
    fitted = tune_schedule(gaussian_model, "dpm-solver++-2m", 4, "dp", config)
    assert fitted.teleport and fitted.method == "dp" and len(fitted.times) == 4 + 2
    solver, grid = schedule_solver(fitted, gaussian_model)
    assert isinstance(solver, Teleported)
    assert solver.plan(gaussian_model.schedule, grid).nfe == 4
    tuned = _exact_error(gaussian_model, solver, grid)
    plain = tune_schedule(gaussian_model, "dpm-solver++-2m", 4, "dp", SMALL)
    assert tuned < 0.5 * _exact_error(gaussian_model, *schedule_solver(plain, gaussian_model))
    assert StepSchedule.load(fitted.save(tmp_path / "s.json")).teleport
    run = tmp_path / "run"
    args = ["sample", "--model", "gaussian", "--schedule", str(tmp_path / "s.json")]
    result = CliRunner().invoke(main, [*args, "--seeds", "0-3", "--out", str(run)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "sample.json").read_text())
    assert "gaussian_stats" in manifest["inputs"] and manifest["nfe"] == 4


def test_trim_leaves_the_worst_trajectories_out():
    config = TuneConfig(trim=0.25)
    assert config.trim == 0.25
    with pytest.raises(ValueError, match="trim"):
        TuneConfig(trim=0.5)
    with pytest.raises(ValueError, match="max_skip"):
        TuneConfig(max_skip=1.0)
