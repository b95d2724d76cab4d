"""Reliability: non-finite model outputs, half precision, inversion (every solver, BDIA)."""

import numpy as np
import pytest
import torch

from conftest import noise
from diffsolve import (
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverAdaptive,
    DPMSolverPP,
    Euler,
    Heun,
    ModelWrapper,
    NonFiniteError,
    UniPC,
    VPLinear,
    grids,
    invert,
    sample,
)
from diffsolve.app.loader import load_model
from diffsolve.solvers import BDIA, bdia_invert, bdia_reconstruct
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.stats.ems import EMS

SCHEDULE = VPLinear()


def ode_solvers():
    ems = EMS.degenerate(SCHEDULE, (6,), n=20)
    return {
        "ddim": DDIM(),
        "euler": Euler(),
        "heun": Heun(),
        "dpm-solver-2m": DPMSolver(2),
        "dpm-solver-3s": DPMSolver(3, method="singlestep"),
        "dpm-solver++-3m": DPMSolverPP(3),
        "unipc-bh2-3": UniPC(3),
        "deis-3": DEIS(3),
        "v3": DPMSolverV3(ems, 3),
        "adaptive-23": DPMSolverAdaptive(3, rtol=1e-4, atol=1e-5),
        "bdia": BDIA(1.0),
    }


class Poisoned:
    """A denoiser whose output turns NaN (or inf) from its k-th call on."""

    def __init__(self, model, k, value=float("nan")):
        self.model, self.schedule, self.k, self.value, self.calls = (
            model,
            model.schedule,
            k,
            value,
            0,
        )

    def __call__(self, x, t):
        self.calls += 1
        p = self.model(x, t)
        if self.calls >= self.k:
            p = type(p).from_x0(
                x, p.x0 * 0 + self.value, p.conversion.alpha, p.conversion.sigma, t
            )
        return p


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("solver", [DPMSolverPP(2), UniPC(3), Heun()])
def test_non_finite_model_output_is_an_error_naming_the_step(solver, value, gaussian):
    grid = grids.logsnr_uniform(SCHEDULE, 8)
    model = Poisoned(gaussian.denoiser(SCHEDULE), 4, value)
    x = noise(SCHEDULE)
    with pytest.raises(NonFiniteError, match=r"NaN or inf at step \d+ \(t = ") as info:
        sample(model, x, solver, grid)
    err = info.value
    assert torch.isfinite(err.last_finite).all()
    assert err.t_finite == err.t_start and err.step >= 1
    clean = sample(gaussian.denoiser(SCHEDULE), x, solver, grid, return_intermediates=True)
    index = clean.times.index(err.t_finite)
    torch.testing.assert_close(err.last_finite, clean.intermediates[index])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver_name", ["dpm-solver++-2m", "unipc-bh2-3", "dpm-solver-v3"])
def test_half_precision_network(dtype, solver_name):
    """The digits network run in float16/bfloat16: state in float32, finite output in the
    input's dtype, close to the float32 run."""
    from diffsolve.solvers.registry import setup_solver

    full = load_model("digits")
    half = load_model("digits", dtype=dtype)
    context = full.solver_context(full.available())
    solver, grid = setup_solver(solver_name, full.schedule, 8, context=context)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sample(
        half.denoiser, x.to(dtype), solver, grid, callback=lambda info: seen.append(info.x.dtype)
    )
    assert out.x.dtype == dtype and set(seen) == {torch.float32}
    assert torch.isfinite(out.x.float()).all()
    reference = sample(full.denoiser, x, solver, grid).x
    assert (out.x.float() - reference).abs().mean() < 0.05


@pytest.mark.parametrize("name", list(ode_solvers()))
def test_inversion_round_trip_converges(name, gaussian):
    solver = ode_solvers()[name]
    model = gaussian.denoiser(SCHEDULE)
    x0 = gaussian.sample(16, torch.Generator().manual_seed(0))
    errors = []
    for n in (10, 40):
        grid = grids.logsnr_uniform(SCHEDULE, n)
        x_t = invert(model, x0, solver, grid).x
        errors.append(float((sample(model, x_t, solver, grid).x - x0).abs().max()))
    assert errors[1] < errors[0] / 3 or errors[1] < 1e-4, errors


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_bdia_inversion_is_exact(gamma, gaussian):
    model = gaussian.denoiser(SCHEDULE)
    x0 = gaussian.sample(8, torch.Generator().manual_seed(1))
    grid = grids.logsnr_uniform(SCHEDULE, 20)
    x_t, x_next = bdia_invert(model, x0, grid, gamma)
    back = bdia_reconstruct(model, x_t, x_next, grid, gamma)
    assert float((back - x0).abs().max()) < 1e-9
    # on a real network too (float32)
    digits = load_model("digits")
    data = torch.load  # noqa: F841 - keep the namespace small
    from diffsolve.app.data import load_digits

    images = load_digits("test")[:8]
    grid = grids.time_uniform(digits.schedule, 10, t_end=0.02)
    x_t, x_next = bdia_invert(digits.denoiser, images, grid, gamma)
    back = bdia_reconstruct(digits.denoiser, x_t, x_next, grid, gamma)
    assert float((back - images).abs().max()) < 1e-3


@pytest.mark.parametrize(("gamma", "order"), [(1.0, 2), (0.5, 1)])
def test_bdia_order(gamma, order, gaussian):
    model = gaussian.denoiser(SCHEDULE)
    t_end = float(SCHEDULE.t_of_lambda(0.5))
    x = noise(SCHEDULE)
    steps, errors = (40, 80, 160), []
    for n in steps:
        grid = grids.logsnr_uniform(SCHEDULE, n, t_end=t_end)
        out = sample(model, x, BDIA(gamma), grid).x
        errors.append(float((out - gaussian.solution(x, 1.0, t_end, SCHEDULE)).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - BDIA(gamma).convergence_order) < 0.3, (slope, errors)


def test_inversion_argument_errors(gaussian):
    with pytest.raises(ValueError, match="gamma must lie in"):
        BDIA(0.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DDIM().plan(SCHEDULE, [0.1, 0.5])  # an increasing grid is only for inversion
    model = ModelWrapper(lambda x, t: torch.zeros_like(x), SCHEDULE)
    with pytest.raises(ValueError, match="strictly"):
        invert(model, torch.zeros(2, 3), DDIM(), [0.5, 0.5])


def test_damaged_model_folders_give_clear_errors(tmp_path):
    import shutil

    from diffsolve.app.loader import demo_path

    folder = tmp_path / "model"
    shutil.copytree(demo_path("digits"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config file"):
        load_model(folder)
    with pytest.raises(ValueError, match="unknown model"):
        load_model(tmp_path / "nowhere")


def test_statistics_made_for_another_model_are_refused(tmp_path):
    from diffsolve.stats.gaussian.estimate import compute_gaussian_stats, load_gaussian_stats

    digits = load_model("digits")
    other = digits.load_ems()
    other.metadata["model_fingerprint"] = "0123456789abcdef"
    path = other.save(tmp_path / "ems.safetensors")
    with pytest.raises(ValueError, match="not for this model"):
        digits.load_ems(path)
    stats = tmp_path / "stats.safetensors"
    compute_gaussian_stats(torch.randn(50, 3, 4, 4)).save(stats)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        load_gaussian_stats(stats, expect_shape=(1, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finiteness_check_catches_every_non_finite_value(dtype):
    from diffsolve.ode.sampling import all_finite

    top = 1e300 if dtype == torch.float64 else torch.finfo(dtype).max
    big = torch.full((64, 8), top, dtype=dtype)
    assert all_finite(big) and all_finite(-big)  # huge finite entries are not taken for inf
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[7, 3] = bad
        assert not all_finite(x)
