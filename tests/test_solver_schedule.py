"""Solver schedules (issue 23): per-step choices compiled by the one plan engine.

* the schedule that copies DPM-Solver++(2M/3M), UniPC-bh2 (orders 2 and 3, bh1, noise space)
  and DPM-Solver-v3 (exact Gaussian EMS, pseudo orders, half correctors) reproduces each of
  them to 1e-12 — samples and every plan coefficient — on VP and flow grids, one of them
  from pure noise (flow at t = 1);
* the JSON file round-trips, and every foreign or malformed input is a one-line ValueError;
* a teleporting schedule equals ``Teleported(solver)`` on the same grid;
* mixed per-step choices run, relaxation 1 is no relaxation and relaxation 0 is DDIM.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from diffsolve import (
    DDIM,
    DPMSolverPP,
    GaussianModel,
    RectifiedFlow,
    UniPC,
    VPDiscrete,
    VPLinear,
    grids,
    sample,
)
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.engine import MultistepStep, Update
from diffsolve.solvers.registry import SolverContext, preset, setup_solver
from diffsolve.solvers.solver_schedule import (
    JumpStep,
    ScheduledSolver,
    SolverSchedule,
    StepChoice,
    copy_solver,
    ems_digest,
)
from diffsolve.stats.ems import EMS
from diffsolve.stats.ems.exact import gaussian_ems
from diffsolve.wrappers.teleport import Teleported

GAUSSIAN = GaussianModel.random((6,), seed=1)
VP = VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)
FLOW = RectifiedFlow(t_max=1.0)  # grids from pure noise (t = 1, alpha = 0)

#: (schedule, grid): a VP grid, a flow grid from pure noise, a flow grid from t = 0.999.
GRIDS = {
    "vp": (VP, grids.make_grid(VP, 7, "time_quadratic")),
    "flow-from-noise": (FLOW, torch.linspace(1.0, 0.0, 8, dtype=torch.float64)),
    "flow": (RectifiedFlow(), grids.make_grid(RectifiedFlow(), 6, "time_uniform")),
}
_EMS: dict[str, EMS] = {}


def exact_ems(case: str) -> EMS:
    """The Gaussian's exact (non-degenerate) EMS under the case's schedule."""
    if case not in _EMS:
        schedule = GRIDS[case][0]
        _EMS[case] = gaussian_ems(GAUSSIAN, schedule, 60, t_start=min(0.999, schedule.t_max))
    return _EMS[case]


def x_start(schedule, grid, n: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sigma = schedule.init_noise_sigma(float(grid[0]))
    return torch.randn(n, 6, generator=gen, dtype=torch.float64) * sigma


def solvers(ems: EMS) -> dict[str, object]:
    return {
        "dpm-solver++-2m": DPMSolverPP(2),
        "dpm-solver++-3m": DPMSolverPP(3),
        "unipc-bh2-2": UniPC(2, "bh2"),
        "unipc-bh2-3": UniPC(3, "bh2"),
        "unipc-bh1-2": UniPC(2, "bh1"),
        "unipc-bh2-3-noise": UniPC(3, "bh2", space="noise"),
        "v3-2": DPMSolverV3(ems, 2),
        "v3-3-pseudo": DPMSolverV3(ems, 3, predictor_pseudo=True),
        "v3-3-corrector-taylor": DPMSolverV3(ems, 3, corrector_pseudo=False),
        "v3-half-low": DPMSolverV3(ems, 2, half_corrector="low_noise"),
        "v3-half-high": DPMSolverV3(ems, 2, half_corrector="high_noise"),
    }


def coefficients(update: Update | None) -> dict[str, object] | None:
    """An update as comparable numbers: its feature, base coefficient, constant and the
    weight of each evaluation it reads."""
    if update is None:
        return None
    weights: dict[int, torch.Tensor] = {}
    for point, w in zip(update.points, update.w, strict=True):
        weights[point] = weights.get(point, 0.0) + torch.as_tensor(w, dtype=torch.float64)
    return {
        "feature": update.feature,
        "a": torch.as_tensor(update.a, dtype=torch.float64),
        "c": None if update.c is None else update.c.to(torch.float64),
        "w": weights,
    }


def assert_same_update(ours: Update | None, theirs: Update | None, where: str) -> None:
    a, b = coefficients(ours), coefficients(theirs)
    if a is None or b is None:
        assert a is b, where
        return
    assert a["feature"] == b["feature"] and set(a["w"]) == set(b["w"]), where
    pairs = [(a["a"], b["a"]), *((a["w"][k], b["w"][k]) for k in a["w"])]
    if a["c"] is not None or b["c"] is not None:
        pairs.append((a["c"], b["c"]))
    for x, y in pairs:
        assert float((x - y).abs().max()) <= 1e-12 * max(1.0, float(y.abs().max())), where


def assert_same_plan(ours, theirs) -> None:
    assert len(ours.steps) == len(theirs.steps)
    for i, (s, t) in enumerate(zip(ours.steps, theirs.steps, strict=True)):
        assert isinstance(s, MultistepStep) and isinstance(t, MultistepStep)
        assert_same_update(s.predictor, t.predictor, f"predictor {i}")
        assert_same_update(s.corrector, t.corrector, f"corrector {i}")
        if t.f_x is not None or s.f_x is not None:
            assert float((s.f_x - t.f_x).abs().max()) <= 1e-12, f"f_x {i}"


@pytest.mark.parametrize("case", list(GRIDS))
def test_copies_reproduce_the_fixed_solvers(case):
    """Samples and plans of the copy equal the fixed solver's to 1e-12 (float64)."""
    schedule, grid = GRIDS[case]
    ems = exact_ems(case)
    model = GAUSSIAN.denoiser(schedule)
    x = x_start(schedule, grid)
    for name, solver in solvers(ems).items():
        choices = copy_solver(solver, schedule, grid)
        assert len(choices) == grid.numel() - 1, name
        copy = ScheduledSolver(choices, ems=ems)
        assert_same_plan(copy.plan(schedule, grid), solver.plan(schedule, grid))
        ours, theirs = sample(model, x, copy, grid).x, sample(model, x, solver, grid).x
        scale = float(theirs.abs().max())
        assert float((ours - theirs).abs().max()) <= 1e-12 * scale, (case, name)


def test_the_copies_are_not_trivial():
    """The copies differ where the solvers do: warm-up and final orders, half correctors
    that switch the corrector off on one side of t_max / 2, pseudo predictors."""
    schedule, grid = GRIDS["vp"]
    made = {name: copy_solver(s, schedule, grid) for name, s in solvers(exact_ems("vp")).items()}
    assert [c.order for c in made["dpm-solver++-3m"]] == [1, 2, 3, 3, 3, 2, 1]
    for half in ("v3-half-low", "v3-half-high"):
        correctors = {c.corrector for c in made[half]}
        assert correctors == {"none", "pseudo"}, half
    low = [c.corrector != "none" for c in made["v3-half-low"]]
    high = [c.corrector != "none" for c in made["v3-half-high"]]
    assert not any(a and b for a, b in zip(low, high, strict=True))
    assert {c.predictor for c in made["v3-3-pseudo"]} == {"pseudo"}
    assert {c.space for c in made["unipc-bh2-3-noise"]} == {"noise"}


# ---------------------------------------------------------------------------------------
def fitted_file(schedule=VP, ems: EMS | None = None, teleport: bool = False) -> SolverSchedule:
    """A small solver schedule: data, noise and (with ``ems``) v3 steps."""
    steps = [
        StepChoice(1, "noise"),
        StepChoice(2, "data", "taylor", corrector="bh2"),
        StepChoice(3, "f" if ems is not None else "data", "pseudo", 0.9, "pseudo", 3),
        StepChoice(2, "data", "bh1", corrector="bh1", corrector_order=3),
    ]
    times = [0.8, 0.45, 0.2, 0.06, 0.0]
    if teleport:
        times = [1.0, *times]
    return SolverSchedule(
        times=tuple(times),
        steps=tuple(steps),
        nfe=len(steps),
        noise_schedule=schedule.to_config(),
        teleport=teleport,
        fingerprint=GAUSSIAN.fingerprint(),
        ems=None if ems is None else ems_digest(ems),
        gaussian=GAUSSIAN.fingerprint() if teleport else None,
        model="gaussian",
        method="test",
        fit={"heldout_rmse": 0.01, "heldout_rmse_best_step_schedule": 0.02},
    )


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_the_file_round_trips(tmp_path):
    ems = exact_ems("vp")
    fitted = fitted_file(ems=ems, teleport=True)
    again = SolverSchedule.from_json(fitted.to_json())
    assert again == fitted
    assert again.needs == ("ems", "gaussian")
    path = tmp_path / "s.json"
    path.write_text(fitted.to_json())
    assert SolverSchedule.load(path) == fitted
    data = json.loads(path.read_text())
    assert data["format"] == "diffsolve-solver-schedule-1"
    assert data["steps"][2] == {
        "order": 3,
        "space": "f",
        "predictor": "pseudo",
        "relax": 0.9,
        "corrector": "pseudo",
        "corrector_order": 3,
    }
    fitted.check(VP, GAUSSIAN.fingerprint(), ems)  # its own model: no error
    assert torch.equal(fitted.grid(VP), torch.tensor(fitted.times, dtype=torch.float64))


def test_foreign_and_malformed_files_are_one_line_errors(tmp_path):
    ems = exact_ems("vp")
    fitted = fitted_file(ems=ems)
    with pytest.raises(ValueError, match="5 times for 3 steps") as err:
        replace(fitted, steps=fitted.steps[:3], nfe=3)
    one_line(err)
    with pytest.raises(ValueError, match="fitted under the noise schedule") as err:
        fitted.check(VPLinear(), GAUSSIAN.fingerprint(), ems)
    one_line(err)
    with pytest.raises(ValueError, match="fitted to model gaussian") as err:
        fitted.check(VP, "0123456789abcdef", ems)
    one_line(err)
    other = gaussian_ems(GaussianModel.random((6,), seed=2), VP, 60)
    assert ems_digest(other) != ems_digest(ems)
    with pytest.raises(ValueError, match="other EMS") as err:
        fitted.check(VP, GAUSSIAN.fingerprint(), other)
    one_line(err)
    data = json.loads(fitted.to_json())
    for key, bad in (("space", "latent"), ("predictor", "rk4"), ("corrector", "heun")):
        broken = json.loads(json.dumps(data))
        broken["steps"][0][key] = bad
        with pytest.raises(ValueError, match=f"malformed solver schedule.*{bad}") as err:
            SolverSchedule.from_json(json.dumps(broken))
        one_line(err)
    for key, bad in (("order", 4), ("corrector_order", 1), ("relax", float("nan"))):
        with pytest.raises(ValueError, match=f"step choice {key}") as err:
            StepChoice(**{key: bad})
        one_line(err)
    with pytest.raises(ValueError, match=r"space 'f'.*not 'bh2'") as err:
        StepChoice(2, "f", "bh2")
    one_line(err)
    for text, message in (("{", "not JSON"), ("[]", "not a diffsolve solver schedule")):
        with pytest.raises(ValueError, match=message) as err:
            SolverSchedule.from_json(text)
        one_line(err)
    with pytest.raises(ValueError, match="no such file") as err:
        preset(f"schedule:{tmp_path / 'missing.json'}")
    one_line(err)


def test_what_a_schedule_needs_is_refused_when_missing(tmp_path):
    ems = exact_ems("vp")
    with pytest.raises(ValueError, match=r"space 'f'.*pass the model's EMS") as err:
        ScheduledSolver(fitted_file(ems=ems).steps)
    one_line(err)
    with pytest.raises(ValueError, match=r"Gaussian teleport.*Gaussian statistics") as err:
        ScheduledSolver(fitted_file().steps, teleport=True)
    one_line(err)
    path = tmp_path / "needs.json"
    path.write_text(fitted_file(ems=ems, teleport=True).to_json())
    spec = preset(f"schedule:{path}")
    assert spec.needs == ("ems", "gaussian")
    with pytest.raises(ValueError, match="needs the model's empirical model statistics") as err:
        setup_solver(f"schedule:{path}", VP, 4, context=SolverContext(gaussian=GAUSSIAN))
    one_line(err)
    with pytest.raises(ValueError, match="needs Gaussian statistics") as err:
        setup_solver(f"schedule:{path}", VP, 4, context=SolverContext(ems=ems))
    one_line(err)


def test_the_registry_name_runs_the_file_on_its_times(tmp_path):
    ems = exact_ems("vp")
    fitted = fitted_file(ems=ems)
    path = tmp_path / "s.json"
    path.write_text(fitted.to_json())
    name = f"schedule:{path}"
    solver, grid = setup_solver(name, VP, 4, context=SolverContext(ems=ems))
    assert isinstance(solver, ScheduledSolver) and solver.choices == fitted.steps
    assert grid.tolist() == list(fitted.times)
    with pytest.raises(ValueError, match="spends 4 model evaluations, not 5; use nfe 4"):
        setup_solver(name, VP, 5, context=SolverContext(ems=ems))
    with pytest.raises(ValueError, match="comes with its own times"):
        setup_solver(name, VP, 4, "logsnr", context=SolverContext(ems=ems))
    with pytest.raises(ValueError, match="runs on a grid of 4 steps, not 6"):
        solver.plan(VP, grids.make_grid(VP, 6, "logsnr"))


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["vp", "flow-from-noise"])
def test_a_teleporting_schedule_equals_the_teleport_wrapper(case):
    schedule, full = GRIDS[case]
    grid = torch.cat([full[:1], full[2:]])  # the first interval is the jump
    model = GAUSSIAN.denoiser(schedule)
    x = x_start(schedule, grid)
    for inner in (DPMSolverPP(2), UniPC(3, "bh2")):
        choices = copy_solver(inner, schedule, grid[1:])
        ours = ScheduledSolver(choices, gaussian=GAUSSIAN, teleport=True)
        plan = ours.plan(schedule, grid)
        assert isinstance(plan.steps[0], JumpStep) and plan.nfe == grid.numel() - 2
        a = sample(model, x, ours, grid).x
        b = sample(model, x, Teleported(inner, GAUSSIAN), grid).x
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max()), (case, inner)


def test_mixed_choices_run_and_converge():
    """Noise-space, data-space pseudo-3rd-order with a bh1 corrector, v3's feature and
    relaxed steps in one schedule: finite, and at most 0.6x DDIM's error on the same grid
    (0.13 vs 0.29 at 4 steps, 0.11 vs 0.26 at 5)."""
    schedule = VP
    ems = exact_ems("vp")
    model = GAUSSIAN.denoiser(schedule)
    fitted = fitted_file(ems=ems)
    grid = fitted.grid(schedule)
    x = x_start(schedule, grid)

    def error(solver, on: torch.Tensor) -> float:
        out = sample(model, x, solver, on).x
        assert torch.isfinite(out).all()
        exact = GAUSSIAN.solution(x, float(on[0]), 0.0, schedule)
        return float((out - exact).norm() / exact.norm())

    assert error(fitted.solver(ems), grid) < 0.6 * error(DDIM(), grid)
    mixed = (
        StepChoice(1, "noise"),
        StepChoice(3, "data", "pseudo", 1.2, "bh1", 3),
        StepChoice(3, "data", "pseudo", 0.8, "bh1", 3),
        StepChoice(2, "noise", "midpoint", 1.1, "taylor"),
        StepChoice(2, "data", "bh2", 0.95, "bh2"),
    )
    fine = grids.make_grid(schedule, 5, "time_quadratic")
    assert error(ScheduledSolver(mixed), fine) < 0.6 * error(DDIM(), fine)


def test_relaxation_one_is_none_and_zero_is_ddim():
    schedule, grid = GRIDS["vp"]
    model = GAUSSIAN.denoiser(schedule)
    x = x_start(schedule, grid)
    choices = copy_solver(UniPC(3, "bh2"), schedule, grid)
    relaxed = tuple(replace(c, relax=1.0) for c in choices)
    data = json.loads(fitted_file().to_json())
    for step in data["steps"]:
        del step["relax"]  # a file without relax: the default, 1
    assert all(s.relax == 1.0 for s in SolverSchedule.from_json(json.dumps(data)).steps)
    plain = sample(model, x, ScheduledSolver(choices), grid).x
    assert torch.equal(sample(model, x, ScheduledSolver(relaxed), grid).x, plain)
    other = tuple(replace(c, relax=0.7) for c in choices)
    assert not torch.allclose(sample(model, x, ScheduledSolver(other), grid).x, plain)
    # relax 0 drops every derivative estimate: first order in data space, DDIM
    zero = tuple(replace(c, relax=0.0) for c in choices)
    ddim = sample(model, x, DDIM(), grid).x
    out = sample(model, x, ScheduledSolver(zero), grid).x
    assert float((out - ddim).abs().max()) <= 1e-12 * float(ddim.abs().max())
    assert math.isfinite(float(out.sum()))
