"""Regression pin: every solver's output on the digits demo and the Gaussian oracle, in
float64, equals the output recorded before the architecture refactoring (issue 10) to 1e-12 —
DPM-Solver-v3 to 1e-6, since issue 11 holds the EMS in float32 and integrates by quadrature
(measured: ≤ 6e-8, BENCHMARKS.md).

The recorded outputs live in ``tests/data/pinned_outputs.npz``; ``python tests/test_pinned.py
--write`` records them anew (only ever on code whose outputs are known good). Each case is a
registry solver at a fixed NFE on its default grid, or one of the methods outside the registry
(adaptive step size, BDIA and its exact inversion, ODE inversion, teleportation, guidance).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsolve import DPMSolverAdaptive, DPMSolverPP, invert, sample
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.solvers.registry import SOLVERS, preset, setup_solver

PINNED = Path(__file__).parent / "data" / "pinned_outputs.npz"
F64 = torch.float64
SEEDS = range(4)
MODELS = ("digits", "gaussian")
NFES = (5, 10)


@cache
def _model(name: str):
    return load_model(name, dtype=F64 if name not in ("gaussian", "gmm") else None)


def _noise(loaded, t: float | None = None) -> torch.Tensor:
    scale = loaded.schedule.init_noise_sigma(t)
    return noise_for_seeds(SEEDS, loaded.data_shape, scale, dtype=F64)


def _registry_case(model: str, name: str, nfe: int) -> torch.Tensor:
    loaded = _model(model)
    context = loaded.solver_context(SOLVERS[name].needs)
    # the preset's own grid (as pinned), also on flow models, whose default is now flow_shifted
    kind = preset(name).grid_kind(nfe)
    solver, grid = setup_solver(name, loaded.schedule, nfe, kind, context=context)
    return sample(loaded.denoiser, _noise(loaded, float(grid[0])), solver, grid).x


def _adaptive_case(model: str, order: int) -> torch.Tensor:
    loaded = _model(model)
    t_start, t_end = loaded.schedule.default_range
    return sample(loaded.denoiser, _noise(loaded), DPMSolverAdaptive(order), [t_start, t_end]).x


def _bdia_case(model: str, gamma: float) -> torch.Tensor:
    from diffsolve.solvers import BDIA, bdia_invert

    loaded = _model(model)
    _, grid = setup_solver("ddim", loaded.schedule, 10)
    grid = grid[:-1]  # BDIA's exact inversion needs a grid ending at t > 0
    out = sample(loaded.denoiser, _noise(loaded), BDIA(gamma), grid).x
    x_t, x_next = bdia_invert(loaded.denoiser, out, grid, gamma)
    return torch.cat([out, x_t, x_next])


def _inversion_case(model: str) -> torch.Tensor:
    loaded = _model(model)
    solver, grid = setup_solver("dpm-solver++-2m", loaded.schedule, 10)
    x = sample(loaded.denoiser, _noise(loaded), DPMSolverPP(2), grid[:-1]).x
    return invert(loaded.denoiser, x, solver, grid).x


def _teleport_case(model: str, name: str) -> torch.Tensor:
    from diffsolve.wrappers.teleport import teleported_setup

    loaded = _model(model)
    context = loaded.solver_context({"gaussian", *SOLVERS[name].needs})
    solver, grid = teleported_setup(name, loaded.schedule, 8, 0.2, context=context)
    return sample(loaded.denoiser, _noise(loaded), solver, grid).x


def _guidance_case(method: str) -> torch.Tensor:
    from diffsolve.app.conditioning import GuidanceSpec

    loaded = _model("digits-cond")
    labels = torch.tensor(list(SEEDS)) % 10
    denoiser = GuidanceSpec(method, 3.0).build(loaded, labels)
    solver, grid = setup_solver("unipc-bh2-3", loaded.schedule, 8)
    return sample(denoiser, _noise(loaded), solver, grid).x


def _cases() -> dict[str, object]:
    cases: dict[str, object] = {}
    for model in MODELS:
        for name in SOLVERS:
            for nfe in NFES:
                cases[f"{model}/{name}/{nfe}"] = (_registry_case, model, name, nfe)
        for order in (2, 3):
            cases[f"{model}/adaptive-{order}"] = (_adaptive_case, model, order)
        for gamma in (1.0, 0.5):
            cases[f"{model}/bdia-{gamma}"] = (_bdia_case, model, gamma)
        cases[f"{model}/invert-dpm++2m"] = (_inversion_case, model)
    for name in ("digits-flow", "digits-cond"):
        for solver in ("dpm-solver++-3m", "unipc-bh1-3", "dpm-solver-v3", "heun", "deis-3"):
            cases[f"{name}/{solver}/8"] = (_registry_case, name, solver, 8)
    for solver in ("dpm-solver++-2m", "dpm-solver-v3"):
        cases[f"digits/teleport-{solver}"] = (_teleport_case, "digits", solver)
    for method in ("cfg", "apg"):
        cases[f"digits-cond/{method}"] = (_guidance_case, method)
    return cases


CASES = _cases()


def run_case(key: str) -> torch.Tensor:
    fn, *args = CASES[key]  # type: ignore[misc]
    with torch.inference_mode():
        return fn(*args).to(F64)


@pytest.fixture(scope="module")
def pinned() -> dict[str, np.ndarray]:
    with np.load(PINNED) as data:
        return {k: data[k] for k in data.files}


def test_every_pinned_case_still_runs(pinned):
    """Cases come from the registry: every pinned one is still there (new solvers may add
    cases that have no pin)."""
    assert set(pinned) <= set(CASES)


@pytest.mark.parametrize("key", list(CASES))
def test_output_equals_the_pinned_one(key, pinned):
    if key not in pinned:
        pytest.skip(f"{key}: added after the outputs were pinned")
    out = run_case(key).numpy()
    expected = pinned[key]
    assert out.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    tolerance = 1e-6 if "v3" in key else 1e-12
    assert float(np.abs(out - expected).max()) <= tolerance * scale


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_pinned.py --write")
    torch.set_num_threads(1)
    outputs = {key: run_case(key).numpy() for key in CASES}
    PINNED.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(PINNED, **outputs)
    print(f"{len(outputs)} cases → {PINNED}")
