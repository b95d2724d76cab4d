"""The architecture: a solver file is the unit of extension; functions stay small; the layers
import downwards only (also checked by ``lint-imports`` in CI)."""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffsolve import DPMSolverPP, ModelWrapper, sample
from diffsolve.app.loader import load_model
from diffsolve.solvers import registry

SRC = Path(__file__).resolve().parents[1] / "src" / "diffsolve"

#: A complete new solver in one file: a second-order Adams–Bashforth method in λ on the data
#: prediction (the linear interpolant of the last two x̂₀ integrated exactly).
TOY_SOLVER = '''
"""Adams–Bashforth 2 in λ (a toy for the architecture test)."""

from dataclasses import dataclass
from typing import ClassVar

from diffsolve.numerics.expint import taylor_weights
from diffsolve.ode.plan import Solver
from diffsolve.solvers.engine import GridValues, Update, multistep_orders, multistep_plan
from diffsolve.solvers.registry import ConfigKey, DiffusersMapping, Preset, register


@register
@dataclass(frozen=True)
class AdamsBashforth2(Solver):
    order: int = 2

    name: ClassVar[str] = "ab2"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("ab2", "Adams-Bashforth 2 in lambda (toy)", lineup=True),
    )
    diffusers: ClassVar[DiffusersMapping] = DiffusersMapping(
        "DiffsolveAB2Scheduler", "ab2", {"solver_order": ConfigKey(2, "order")}
    )

    def min_steps(self):
        return self.order

    def build_plan(self, schedule, grid):
        at = GridValues.of(schedule, grid)

        def predictor(i, p):
            step = at.exp_step("data", i, i + 1)
            nodes = at.nodes(i, range(i, i - p, -1))
            return Update(step.a, taylor_weights(step, nodes), "data")

        return multistep_plan(at, multistep_orders(at, self.order, True), predictor)
'''


@pytest.fixture
def toy_solver(tmp_path):
    """The toy solver file, imported as a user's module would be; unregistered afterwards."""
    path = tmp_path / "ab2_solver.py"
    path.write_text(textwrap.dedent(TOY_SOLVER))
    spec = importlib.util.spec_from_file_location("ab2_solver", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ab2_solver"] = module
    spec.loader.exec_module(module)
    yield module.AdamsBashforth2
    registry.unregister(module.AdamsBashforth2)
    del sys.modules["ab2_solver"]


def test_a_new_solver_file_appears_everywhere(toy_solver):
    """Registry, `diffsolve solvers`, `diffsolve sample`, the bench line-up, a diffusers
    scheduler and a k-diffusion sampler, from the one file and no other edit."""
    from diffsolve.app.bench.runner import contestants
    from diffsolve.app.cli import main

    loaded = load_model("gaussian")
    solver, grid = registry.setup_solver("ab2", loaded.schedule, 8)
    assert isinstance(solver, toy_solver) and solver.plan(loaded.schedule, grid).nfe == 8
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample(loaded.denoiser, x, solver, grid).x
    pp = sample(loaded.denoiser, x, DPMSolverPP(2, solver_type="taylor"), grid).x
    assert float((ours - pp).abs().max()) < 1e-12  # AB2 in λ is DPM-Solver++(2M), Taylor form

    listing = CliRunner().invoke(main, ["solvers"])
    assert "ab2" in listing.output and "toy" in listing.output
    assert "ab2" in [c.name for c in contestants(None, loaded)]
    run = CliRunner().invoke(main, ["sample", "--solver", "ab2", "--help"])
    assert run.exit_code == 0

    _check_diffusers_scheduler(loaded, x, grid, ours)
    _check_k_diffusion_sampler(toy_solver)


def _check_diffusers_scheduler(loaded, x, grid, expected):
    pytest.importorskip("diffusers")
    from diffsolve.integrations import diffusers as integration

    cls = integration.DiffsolveAB2Scheduler
    config = cls(prediction_type="sample", solver_order=2, grid="time_quadratic").config
    scheduler = cls.from_config(config)
    assert scheduler.config.solver_order == 2 and type(scheduler).__name__ == cls.__name__
    scheduler.set_timesteps(8)
    assert torch.equal(scheduler.grid, grid)
    state = x
    for timestep in scheduler.timesteps:
        t = float(scheduler.solver_time(timestep))
        x0 = loaded.denoiser(state, t).x0
        state = scheduler.step(x0, timestep, state).prev_sample
    # the adapter's schedule is diffusers' float32 alphas_cumprod (in float64)
    assert float((state - expected).abs().max()) < 1e-5


def _check_k_diffusion_sampler(toy_solver):
    from diffsolve import EDM, GaussianModel, grids
    from diffsolve.integrations.k_diffusion import samplers

    gaussian = GaussianModel.random((6,), seed=2)
    schedule = EDM(0.002, 80.0)
    sigmas = grids.append_zero(schedule, grids.karras(schedule, 9))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80

    def denoiser(x, sigma):
        return gaussian.denoise(x, 1.0, float(sigma[0]))

    out = samplers()["sample_ab2"](denoiser, x, sigmas)
    model = ModelWrapper(denoiser, schedule, "x0", "sigma")
    assert torch.equal(out, sample(model, x, toy_solver(), sigmas).x)


def test_the_toy_solver_is_gone_after_the_test():
    assert "ab2" not in registry.SOLVERS


# ---------------------------------------------------------------------------------------
MAX_FUNCTION_LINES = 60


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code of a function: its body without the docstring, blank and comment-only
    lines (nested functions count in their parent)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    lines = source[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_no_function_in_src_is_longer_than_60_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node, source)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n})")
    assert not long, "functions over 60 lines of code: " + ", ".join(long)


LAYERS = ("numerics", "ode", "stats", "solvers", "wrappers", "integrations", "app")


def _imported_modules(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_layers_import_downwards_only():
    """Each layer imports only itself and the layers below it (README, "Architecture")."""
    upward = []
    for layer in LAYERS:
        for path in sorted((SRC / layer).rglob("*.py")):
            for module in _imported_modules(ast.parse(path.read_text())):
                parts = module.split(".")
                if parts[0] != "diffsolve" or len(parts) < 2 or parts[1] not in LAYERS:
                    continue
                if LAYERS.index(parts[1]) > LAYERS.index(layer):
                    upward.append(f"{path.relative_to(SRC)} imports {module}")
    assert not upward, "; ".join(upward)
