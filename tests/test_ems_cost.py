"""``diffsolve ems`` projects its cost before it starts (issue 14): JVPs and wall time from a
short calibration on the run's device, and a refusal without ``--yes`` beyond one hour."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.app.loader import load_model
from diffsolve.stats.ems import cost
from diffsolve.stats.ems.compute import compute_ems

pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args: object, code: int) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    if code:  # one error line
        assert len(result.output.split("Error:")[1].strip().splitlines()) == 1, result.output
    return result.output


def slow_calibration(monkeypatch: pytest.MonkeyPatch, seconds_per_jvp: float) -> None:
    """Every JVP-sample calibrates at ``seconds_per_jvp`` (no timing at all)."""

    def calibrate(*args: object, **kwargs: object) -> cost.Calibration:
        return cost.Calibration(seconds_per_batch=4 * seconds_per_jvp, batch_size=4)

    monkeypatch.setattr(cost, "calibrate", calibrate)


def test_ems_prints_its_projection_first(tmp_path):
    out = tmp_path / "ems.safetensors"
    output = run("ems", "--samples", "4", "--grid", "4", "--bandwidth", "0", "--out", out, code=0)
    line = next(text for text in output.splitlines() if text.startswith("Projected: "))
    assert "5 λ × 4 samples × 2 JVPs = 40 JVPs" in line
    # the calibration batch depends on the measured time (2 or 4 on a loaded machine)
    assert re.search(r"ms/JVP-sample \(batch \d+ on cpu\) → ", line), line
    assert output.index("Projected: ") < output.index("EMS (K=4, N=4")
    assert out.is_file()


def test_ems_refuses_over_an_hour_without_yes(tmp_path, monkeypatch):
    slow_calibration(monkeypatch, 200.0)  # 5 λ × 4 × 2 = 40 JVPs × 200 s = 2.2 h
    out = tmp_path / "ems.safetensors"
    output = run("ems", "--samples", "4", "--grid", "4", "--bandwidth", "0", "--out", out, code=2)
    assert "calibrated 200 s/JVP-sample" in output and "→ 2.2 h" in output
    error = output.split("Error:")[1]
    assert "projected EMS time 2.2 h on cpu exceeds one hour" in error
    assert "--yes" in error and "--samples/--grid" in error and "--device" in error
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ems_runs_over_an_hour_with_yes(tmp_path, monkeypatch):
    slow_calibration(monkeypatch, 200.0)
    out = tmp_path / "ems.safetensors"
    output = run(
        "ems", "--samples", "4", "--grid", "4", "--bandwidth", "0", "--out", out, "--yes", code=0
    )
    assert "→ 2.2 h" in output and out.is_file()


def test_huge_samples_are_refused_from_a_real_calibration(tmp_path):
    """The calibration itself stays small: batches up to --batch-size, never K."""
    output = run("ems", "--model", "gaussian", "--samples", 10**9, "--out", tmp_path / "e", code=2)
    assert "1201 λ × 1000000000 samples × 2 JVPs = 2,402,000,000,000 JVPs" in output
    assert "exceeds one hour: pass --yes" in output


def test_the_arithmetic_is_consistent():
    estimate = cost.EMSCost(1201, 256, 2, seconds_per_batch=0.4, batch_size=128, processes=4)
    assert estimate.total_jvps == 1201 * 256 * 2 == 614_912
    assert estimate.seconds_per_jvp == pytest.approx(0.4 / 128)
    assert estimate.seconds == pytest.approx(614_912 * 0.4 / 128 / 4)
    text = str(estimate)
    assert text.startswith("1201 λ × 256 samples × 2 JVPs = 614,912 JVPs; calibrated 3.12 ms")
    assert "→ 32.0 min / 4 processes = 8.0 min" in text
    assert cost.format_seconds(59) == "59.0 s" and cost.format_seconds(3 * 86400) == "3.0 days"


def test_another_recipe_is_projected_by_the_same_code(monkeypatch):
    slow_calibration(monkeypatch, 0.001)
    loaded = load_model("gaussian")
    estimate = cost.project_cost(
        loaded.denoiser,
        torch.zeros(8, *loaded.data_shape),
        samples=1024,
        grid_size=1200,
        batch_size=512,
        points=121,
        samples_per_point=256,
        jvps_per_sample=3,
    )
    assert (estimate.points, estimate.samples, estimate.jvps_per_sample) == (121, 256, 3)
    assert estimate.total_jvps == 121 * 256 * 3
    assert estimate.seconds == pytest.approx(121 * 256 * 3 * 0.001)


class Counted:
    """A denoiser that counts the samples its ``differentiable_eps`` evaluates."""

    def __init__(self, model: object) -> None:
        self.model, self.count = model, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def differentiable_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.count += x.shape[0]
        return self.model.differentiable_eps(x, t)


def test_jvps_per_sample_is_what_compute_ems_takes():
    """JVPS_PER_SAMPLE is today's recipe: with forward-mode AD (one network call per JVP)
    compute_ems evaluates the network twice per sample at every λ point. Should the recipe
    change, this fails: update cost.JVPS_PER_SAMPLE (or pass the recipe's counts)."""
    loaded = load_model("gaussian")
    data = torch.randn(6, *loaded.data_shape)
    counted = Counted(loaded.denoiser)
    compute_ems(counted, data, samples=6, grid_size=3, bandwidth=0, jvp="forward")
    assert counted.count == 4 * 6 * cost.JVPS_PER_SAMPLE
    found = cost.calibrate(loaded.denoiser, data, batch_size=8, total_jvps=100, repeats=1)
    assert found.batch_size == 8 and found.seconds_per_batch > 0
