"""Real-model scale (issue 11): no autograd graphs by default, finiteness without a host sync
per step, DPM-Solver-v3's EMS in float32 with quadrature integrals and cached plans."""

from __future__ import annotations

import math

import pytest
import torch

from diffsolve import (
    DPMSolverPP,
    ModelWrapper,
    NonFiniteError,
    UniPC,
    VPDiscrete,
    VPLinear,
    grids,
    invert,
    sample,
)
from diffsolve.ode import sampling
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.stats.ems import EMS, load_ems

SCHEDULE = VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)


class TinyNet(torch.nn.Module):
    """A network with parameters: what a user's model looks like to autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + 0 * t.reshape(-1, 1, 1, 1))


def test_sampling_records_no_autograd_graph_unless_asked():
    model = ModelWrapper(TinyNet(), SCHEDULE, "epsilon")
    grid = grids.append_zero(SCHEDULE, grids.time_uniform(SCHEDULE, 5))
    x = torch.randn(2, 2, 4, 4)
    assert torch.is_grad_enabled()
    out = sample(model, x, DPMSolverPP(2), grid)
    assert not out.x.requires_grad and out.x.grad_fn is None
    back = invert(model, out.x, DPMSolverPP(2), grid)
    assert not back.x.requires_grad
    kept = sample(model, x, DPMSolverPP(2), grid, grad=True)
    assert kept.x.requires_grad
    kept.x.sum().backward()  # differentiable through the whole loop
    assert model.model.conv.weight.grad is not None


def test_adapters_record_no_graph():
    from diffsolve.integrations.k_diffusion import sample_denoiser

    net = torch.nn.Linear(6, 6, dtype=torch.float64)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64) * 10
    out = sample_denoiser(lambda x, sigma: net(x) / (1 + sigma[0]), x, sigmas)
    assert not out.requires_grad
    pytest.importorskip("diffusers")
    from diffsolve.integrations.diffusers import DiffsolveUniPCScheduler

    scheduler = DiffsolveUniPCScheduler()
    scheduler.set_timesteps(4)
    sample_ = torch.randn(2, 6)
    linear = torch.nn.Linear(6, 6)
    for timestep in scheduler.timesteps:
        sample_ = scheduler.step(linear(sample_), timestep, sample_).prev_sample
    assert not sample_.requires_grad


class PoisonAt:
    """A denoiser whose ``k``-th evaluation (1-based) returns NaN."""

    def __init__(self, model, k: int) -> None:
        self.model, self.k, self.calls = model, k, 0
        self.schedule = model.schedule

    def __call__(self, x, t):
        self.calls += 1
        prediction = self.model(x, t)
        if self.calls == self.k:
            prediction = type(prediction)(x, prediction.out * math.nan, prediction.conversion, t)
        return prediction


@pytest.mark.parametrize("k", [1, 5, 8, 9, 17])
def test_a_nan_at_step_k_is_reported_as_step_k(k):
    model = ModelWrapper(lambda x, t: 0.5 * x, SCHEDULE, "epsilon")
    grid = grids.append_zero(SCHEDULE, grids.time_uniform(SCHEDULE, 19))
    x = torch.randn(4, 3)
    clean = sample(model, x, UniPC(2), grid, return_intermediates=True)
    with pytest.raises(NonFiniteError, match=rf"at step {k} ") as info:
        sample(PoisonAt(model, k), x, UniPC(2), grid)
    err = info.value
    assert err.step == k and err.nfe == k
    torch.testing.assert_close(err.last_finite, clean.intermediates[k - 1])
    assert err.t_finite == clean.times[k - 1]


def test_the_finiteness_check_does_not_synchronise_every_step(monkeypatch):
    """Count every way a tensor reaches the host (bool, item, float, tolist) during a
    20-step sample with a null model: one read of ``x_start`` before the first evaluation (a
    non-finite start is the input's fault), one per CHECK_EVERY steps and one at the end.
    (A first run fills the model wrapper's per-time cache of schedule scalars, host-side
    float64 arithmetic that never touches the sample's device.)"""
    model = ModelWrapper(lambda x, t: 0.5 * x, SCHEDULE, "epsilon")
    grid = grids.append_zero(SCHEDULE, grids.time_uniform(SCHEDULE, 19))
    plan = DPMSolverPP(2).plan(SCHEDULE, grid)
    x = torch.randn(4, 3)
    sample(model, x, DPMSolverPP(2), plan=plan)
    reads = {"n": 0}
    for name in ("__bool__", "item", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sample(model, x, DPMSolverPP(2), plan=plan)
    assert reads["n"] == 1 + math.ceil(20 / sampling.CHECK_EVERY)
    reads["n"] = 0
    sample(model, x, DPMSolverPP(2), plan=plan, check_finite=False)
    assert reads["n"] == 0


def test_ems_is_held_in_float32_as_one_minus_l(tmp_path):
    ems = EMS.degenerate(VPLinear(), (2, 3), n=4)
    assert ems.one_minus_l.dtype == ems.s.dtype == ems.b.dtype == torch.float32
    assert ems.lambdas.dtype == torch.float64
    assert ems.l.dtype == torch.float64 and torch.equal(ems.l, torch.ones_like(ems.l))
    again = load_ems(ems.save(tmp_path / "ems.safetensors"))
    assert torch.equal(again.one_minus_l, ems.one_minus_l)


def test_version_1_ems_files_still_load(tmp_path):
    """Files written before issue 11 hold l itself, in float64."""
    import json

    from safetensors.torch import save_file

    ems = EMS.degenerate(VPLinear(), (3,), n=5)
    stats = torch.linspace(0.2, 0.9, 6, dtype=torch.float64)[:, None].expand(6, 3).contiguous()
    meta = {"format": "diffsolve-ems", "diffsolve_ems": json.dumps({**ems.metadata, "version": 1})}
    tensors = {"lambdas": ems.lambdas, "l": stats, "s": ems.s.double(), "b": ems.b.double()}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    loaded = load_ems(tmp_path / "v1.safetensors")
    torch.testing.assert_close(loaded.l, stats, rtol=0, atol=1e-7)


def test_v3_plans_are_cached_per_ems_grid_and_options():
    schedule = VPLinear()
    ems = EMS.degenerate(schedule, (6,), n=20)
    grid = grids.time_uniform(schedule, 8)
    first = DPMSolverV3(ems, 2).plan(schedule, grid)
    assert DPMSolverV3(ems, 2).plan(schedule, grid) is first  # a new solver, same EMS
    assert DPMSolverV3(ems, 3).plan(schedule, grid) is not first
    assert DPMSolverV3(ems, 2).plan(schedule, grids.time_uniform(schedule, 9)) is not first


def test_v3_scheduler_reuses_its_plan():
    pytest.importorskip("diffusers")
    from diffsolve.app.loader import load_model
    from diffsolve.integrations.diffusers import DPMSolverV3Scheduler

    scheduler = DPMSolverV3Scheduler(ems_path=str(load_model("digits").ems_path))
    scheduler.set_timesteps(10)
    plan = scheduler._plan
    scheduler.set_timesteps(10)
    assert scheduler._plan is plan


def test_scale_profile_from_the_cli(tmp_path):
    pytest.importorskip("diffusers")
    import json

    from click.testing import CliRunner

    from diffsolve.app.cli import main

    out = tmp_path / "scale.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--profile",
            "scale",
            "--shapes",
            "2x1x8x8",
            "--no-end-to-end",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    solvers = {row["solver"] for row in data["overhead"]}
    assert {"diffsolve DPM++(2M)", "diffsolve DPM-Solver-v3", "diffusers DPM++(2M)"} <= solvers
    assert data["plans"][0]["shape"] == [1, 8, 8] and data["plans"][0]["cached_ms"] < 1e3
    bad = CliRunner().invoke(main, ["bench", "--profile", "scale", "--shapes", "4x"])
    assert bad.exit_code == 2 and "--shapes" in bad.output


def test_end_to_end_row_with_a_small_unet(monkeypatch):
    """The end-to-end measurement's code path, on a UNet small enough for CI."""
    pytest.importorskip("diffusers")
    from diffsolve.app.bench import scale

    small = {
        **scale.PIXEL_UNET,
        "sample_size": 16,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D",) * 2,
        "up_block_types": ("UpBlock2D",) * 2,
        "norm_num_groups": 4,
    }
    monkeypatch.setattr(scale, "PIXEL_UNET", small)
    monkeypatch.setattr(scale, "_network", _small_network(scale))
    row = scale.end_to_end_row("pixel", 2, 3, torch.device("cpu"))
    assert set(row["seconds"]) == {"network alone", "diffsolve DPM++(2M)", "diffusers DPM++(2M)"}
    assert row["ratio_to_network"] > 0 and set(row["peak_mb"]) == {
        "caller's no_grad",
        "grad enabled",
    }


def _small_network(scale):
    import diffusers

    def build(kind, batch, device):
        torch.manual_seed(0)
        net = diffusers.UNet2DModel(**scale.PIXEL_UNET).eval()
        return net, torch.randn(batch, 3, 16, 16), {}

    return build
