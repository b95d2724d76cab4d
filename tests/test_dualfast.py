"""DualFast (wrappers/dualfast.py): c = 0 is the base solver bit for bit, the rule on a stub
model, the c-schedules, the cache's reset, and no extra model evaluations."""

from __future__ import annotations

import math

import pytest
import torch

from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode.model import Prediction, conversion_for
from diffsolve.ode.sampling import sample
from diffsolve.ode.schedule import VPLinear
from diffsolve.solvers.registry import setup_solver
from diffsolve.wrappers import DualFast


@pytest.fixture(scope="module")
def digits():
    loaded = load_model("digits")
    return loaded, noise_for_seeds(range(16), loaded.data_shape)


def _setup(loaded, name: str, nfe: int):
    context = loaded.solver_context(["ems"]) if name == "dpm-solver-v3" else None
    return setup_solver(name, loaded.schedule, nfe, context=context)


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++-2m", "unipc-bh2-3", "dpm-solver-v3"])
@pytest.mark.parametrize(
    ("reference", "c_schedule"), [("previous", "constant"), ("first", "linear")]
)
def test_c_zero_is_the_base_solver_bit_for_bit(digits, name, reference, c_schedule):
    loaded, x = digits
    solver, grid = _setup(loaded, name, 5)
    with torch.inference_mode():
        base = sample(loaded.denoiser, x, solver, grid)
        wrapped = sample(DualFast(loaded.denoiser, 0.0, reference, c_schedule), x, solver, grid)
    assert torch.equal(base.x, wrapped.x)
    assert base.nfe == wrapped.nfe


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++-2m"])
def test_c_changes_the_samples_at_no_extra_nfe_and_runs_are_independent(digits, name):
    loaded, x = digits
    solver, grid = _setup(loaded, name, 5)
    model = DualFast(loaded.denoiser, 0.2)
    with torch.inference_mode():
        base = sample(loaded.denoiser, x, solver, grid)
        first = sample(model, x, solver, grid)
        again = sample(model, x, solver, grid)  # reset() by sample: no stale cache
    assert first.nfe == base.nfe
    assert not torch.equal(first.x, base.x)
    assert torch.equal(first.x, again.x)


class _Stub:
    """A denoiser whose noise prediction at call k is the constant k (per-call bookkeeping)."""

    def __init__(self) -> None:
        self.schedule = VPLinear()
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: float) -> Prediction:
        self.calls += 1
        alpha, sigma = (float(v) for v in (self.schedule.alpha(t), self.schedule.sigma(t)))
        out = torch.full_like(x, float(self.calls))
        return Prediction(x, out, conversion_for("epsilon", alpha, sigma), t)


@pytest.mark.parametrize("reference", ["previous", "first"])
def test_the_rule_on_eps_and_its_data_prediction_identity(reference):
    model = DualFast(_Stub(), 0.3, reference)
    x = torch.randn(2, 3, dtype=torch.float64)
    first = model(x, 0.9)
    assert torch.equal(first.eps, torch.full_like(x, 1.0))  # first evaluation: c = 0
    second = model(x, 0.6)
    assert torch.allclose(second.eps, torch.full_like(x, 1.3 * 2 - 0.3 * 1))
    third = model(x, 0.3)
    tau_eps = 2.0 if reference == "previous" else 1.0  # the raw cached prediction
    assert torch.allclose(third.eps, torch.full_like(x, 1.3 * 3 - 0.3 * tau_eps))
    alpha, sigma = float(VPLinear().alpha(0.3)), float(VPLinear().sigma(0.3))
    assert torch.allclose(third.x0, (x - sigma * third.eps) / alpha)


def test_linear_ramp_and_a_new_trajectory_restarts_the_cache():
    model = DualFast(_Stub(), 0.4, c_schedule="linear")
    x = torch.zeros(1, 2, dtype=torch.float64)
    model(x, 0.8)
    assert math.isclose(model.coefficient(0.6), 0.4 * (1 - 0.6 / 0.8))
    assert math.isclose(model.coefficient(0.0), 0.4)
    model(x, 0.6)
    restarted = model(x, 0.9)  # t increased: a new trajectory, c = 0 again
    assert torch.equal(restarted.eps, torch.full_like(x, 3.0))
    model.reset()
    assert model.coefficient(0.5) == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"c": -0.1}, {"c": math.nan}, {"reference": "last"}, {"c_schedule": "cosine"}]
)
def test_invalid_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        DualFast(_Stub(), **kwargs)


def test_sample_command_dualfast(tmp_path):
    """``diffsolve sample --dualfast C``: C = 0 is the plain run bit for bit, C > 0 changes the
    samples and is recorded in the run's settings, so a resume with another C is refused."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from diffsolve.app.cli import main

    def run(out, *extra):
        args = ["sample", "--model", "digits", "--solver", "ddim", "--nfe", "6", "--seeds", "0-7"]
        return CliRunner().invoke(main, [*args, "--out", str(tmp_path / out), *extra])

    def samples(out):
        return np.load(tmp_path / out / "samples.npz")["samples"]

    assert run("plain").exit_code == 0
    assert run("zero", "--dualfast", "0").exit_code == 0
    assert run("on", "--dualfast", "0.5").exit_code == 0
    assert np.array_equal(samples("plain"), samples("zero"))
    assert not np.allclose(samples("plain"), samples("on"))
    manifest = json.loads((tmp_path / "on" / "sample.json").read_text())
    settings = json.loads(manifest["conditioning"])
    assert settings["guidance"]["dualfast"] == 0.5
    refused = run("on", "--dualfast", "0.7")
    assert refused.exit_code != 0 and "dualfast" in refused.output
