"""No EMS is used without being validated (issue: defaults and statistics on every model).

``diffsolve ems`` measures DPM-Solver-v3 with the new statistics against DPM-Solver++(2M) on
held-out noise, stores the ratios in the file's metadata, prints them and warns where v3
loses; loading statistics that failed repeats the warning once per file; a grid too coarse
for the recipe is refused before any evaluation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.stats.ems import load_ems
from diffsolve.stats.ems import statistics as ems_files

pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args: object, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_good_statistics_pass_and_record_their_validation(tmp_path):
    out = tmp_path / "ems.safetensors"
    text = run("ems", "--model", "gaussian", "--samples", "64", "--grid", "300", "--out", out)
    assert "EMS validation passed" in text and "WARNING" not in text
    entry = load_ems(out).metadata["validation"]
    assert entry["nfes"] == [5, 10] and entry["passed"] and entry["rival"] == "dpm-solver++-2m"
    assert all(r <= 1.0 for r in entry["ratios"])
    assert entry["samples"] == 256 and entry["reference_steps"] == 100


def test_statistics_that_lose_warn_when_made_and_when_loaded(tmp_path, monkeypatch):
    out = tmp_path / "bad.safetensors"
    coarse = ["--samples", "2", "--grid", "40", "--bandwidth", "0", "--no-check"]
    text = run("ems", "--model", "digits", *coarse, "--out", out)
    assert "EMS validation FAILED: v3 loses to DPM-Solver++(2M)" in text
    assert "WARNING: re-estimate them with more samples" in text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_ems(out).metadata["validation"]["passed"] is False
    monkeypatch.setattr(ems_files, "_REPORTED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_ems(out)
        load_ems(out)  # once per file
    messages = [str(w.message) for w in caught if "EMS validation FAILED" in str(w.message)]
    assert len(messages) == 1 and "more samples per λ point (now K = 2" in messages[0]


def test_a_grid_too_coarse_for_the_recipe_is_refused_before_any_evaluation(tmp_path):
    text = run("ems", "--model", "digits", "--grid", "40", "--out", tmp_path / "e", code=2)
    assert "grid_size 40 is too coarse for the recipe's smoothing bandwidth 0.2" in text
    assert "Projected" not in text  # refused before the calibration runs the model
    assert not (tmp_path / "e").exists()


class IntegerTime(torch.nn.Module):
    """The digits network fed its timestep cast to an integer (a ``t.long()`` embedding)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t.long().float())


def test_a_network_that_ignores_fractional_time_is_refused_with_the_fix():
    from diffsolve import ModelWrapper
    from diffsolve.app.data import load_digits
    from diffsolve.app.loader import load_model
    from diffsolve.stats.ems.compute import compute_ems

    digits = load_model("digits")
    model = ModelWrapper(IntegerTime(digits.network), digits.schedule, "epsilon", "timestep")
    data = load_digits("train")[:16]
    tiny = {"samples": 4, "grid_size": 8, "bandwidth": 0}
    with pytest.raises(ValueError, match=r"ignores fractional time .* jvp='step_difference'"):
        compute_ems(model, data, **tiny)
    ems = compute_ems(model, data, **tiny, jvp="step_difference")  # across training steps
    assert ems.metadata["derivative"] == "step_difference"
    with pytest.raises(ValueError, match="'step_difference'"):  # auto never takes it
        compute_ems(digits.denoiser, data, **tiny, jvp="nonsense")
    assert compute_ems(digits.denoiser, data, **tiny).metadata["derivative"] == "forward"


@pytest.mark.filterwarnings("ignore:.*EMS validation FAILED")  # coarse statistics, on purpose
def test_statistics_record_their_guidance_and_v3_notes_another(tmp_path):
    out = tmp_path / "cfg3.safetensors"
    small = ["--samples", "8", "--grid", "40", "--bandwidth", "0", "--no-check"]
    run("ems", "--model", "digits-cond", *small, "--scale", "3", "--out", out)
    assert load_ems(out).metadata["guidance"] == {"method": "cfg", "scale": 3.0}
    args = ["--model", "digits-cond", "--ems", out, "--seeds", "0-1", "--nfe", "6"]
    text = run("sample", *args, "--guidance", "cfg", "--scale", "3", "--out", tmp_path / "a")
    assert "were estimated with guidance" not in text
    text = run("sample", *args, "--out", tmp_path / "b")
    assert "estimated with guidance cfg at scale 3, this run guides with none at 1" in text
