"""The solver-schedule search (``diffsolve tune --method solver-schedule``): reuse of the
incumbent's steps is exact, the search is deterministic and never worse than its start on
its own seeds, guided and flow models run, the CLI writes a file ``sample`` runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.app.loader import load_model
from diffsolve.app.solver_tune import (
    Candidate,
    Proposer,
    Scorer,
    SearchConfig,
    first_change,
    search_solver_schedule,
    search_starts,
)
from diffsolve.app.tune import Meter
from diffsolve.solvers.solver_schedule import SolverSchedule

TINY = SearchConfig(proposals=12, trajectories=16, check_trajectories=16, teacher_steps=24)


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


def _scorer(model, n: int = 8) -> tuple[Scorer, dict[str, Candidate]]:
    context = model.solver_context(("ems", "gaussian"))
    starts = search_starts(model, 5, context, teleport=True)
    x = torch.randn(n, *model.data_shape, generator=torch.Generator().manual_seed(0))
    scorer = Scorer(Meter(model.denoiser), x, torch.zeros_like(x), context.ems, context.gaussian)
    return scorer, starts


def test_starts_copy_every_solver_and_tuned_schedule(digits):
    _, starts = _scorer(digits)
    assert "dpm-solver-v3" in starts and "dpm-solver-v3+teleport" in starts
    assert any(":schedules/" in name for name in starts)  # the shipped step schedules
    assert all(len(c.choices) == 5 for c in starts.values())


def test_reused_steps_give_the_fresh_score_exactly(digits):
    scorer, starts = _scorer(digits)
    incumbent = scorer.score(starts["dpm-solver-v3+teleport"])
    proposer = Proposer(digits.schedule, torch.Generator().manual_seed(1), ("data", "noise", "f"))
    checked = 0
    while checked < 6:
        proposal = proposer.propose(incumbent)
        if proposal is None:
            continue
        reused = scorer.score(proposal, reuse=incumbent)
        fresh = scorer.score(proposal)
        assert reused.score == fresh.score or (
            math.isinf(reused.score) and math.isinf(fresh.score)
        )
        checked += 1


def test_a_proposal_reading_more_history_than_the_incumbent_kept(digits):
    scorer, starts = _scorer(digits)
    c = scorer.score(starts["dpm-solver++-2m"])  # keeps two evaluations
    wider = replace(c.choices[3], order=3, corrector="taylor", corrector_order=4)
    proposal = Candidate(c.times, (*c.choices[:3], wider, *c.choices[4:]))
    assert scorer.score(proposal, reuse=c).score == scorer.score(proposal).score


def test_first_change_finds_the_changed_step(digits):
    scorer, starts = _scorer(digits)
    c = scorer.score(starts["dpm-solver++-2m"])
    changed = replace(c.choices[3], relax=0.5)
    d = scorer.score(Candidate(c.times, (*c.choices[:3], changed, *c.choices[4:])))
    assert c.plan is not None and d.plan is not None
    assert first_change(c.plan, d.plan) == 3
    assert first_change(c.plan, c.plan) == len(c.plan.steps)


def test_search_is_deterministic_and_no_worse_than_its_start(digits, tmp_path):
    a = search_solver_schedule(digits, 4, TINY)
    b = search_solver_schedule(digits, 4, TINY)
    assert (a.times, a.steps, a.fit) == (b.times, b.steps, b.fit)  # (not the seconds)
    assert a.fit["search_rmse"] <= a.fit["search_rmse_start"]
    assert a.nfe == 4 and len(a.steps) == 4
    SolverSchedule.from_json(a.to_json())  # a valid file


def test_flow_and_guided_models(tmp_path):
    flow = search_solver_schedule(load_model("digits-flow"), 4, replace(TINY, proposals=4))
    assert math.isfinite(flow.fit["check_rmse"])
    guided = search_solver_schedule(
        load_model("digits-cond"), 4, replace(TINY, proposals=4, guidance="cfg", scale=3.0)
    )
    assert guided.config["guidance"] == "cfg" and math.isfinite(guided.fit["check_rmse"])
    with pytest.raises(ValueError, match="class-conditional"):
        search_solver_schedule(load_model("digits"), 4, replace(TINY, guidance="cfg", scale=2.0))


def test_cli_tune_then_sample(tmp_path):
    out = tmp_path / "s.json"
    runner = CliRunner()
    args = ["tune", "--model", "digits", "--method", "solver-schedule", "--nfe", "4"]
    small = ["--proposals", "4", "--trajectories", "16", "--teacher-steps", "24"]
    result = runner.invoke(main, [*args, *small, "--out", str(out), "--no-check"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["format"] == "diffsolve-solver-schedule-1"
    result = runner.invoke(
        main,
        ["sample", "--model", "digits", "--solver", f"schedule:{out}", "--seeds", "0-3",
         "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    refused = runner.invoke(main, [*args, "--cost", "euler", "--out", str(tmp_path / "x.json")])
    assert refused.exit_code != 0 and "--cost does not apply" in refused.output
    refused = runner.invoke(main, ["tune", "--model", "digits", "--proposals", "3"])
    assert refused.exit_code != 0 and "--proposals applies to" in refused.output


def test_bench_runs_a_solver_schedule_at_its_nfe_only(tmp_path):
    from diffsolve.app.bench.runner import contestants
    from diffsolve.solvers.registry import setup_solver
    from diffsolve.solvers.solver_schedule import copy_solver

    loaded = load_model("digits")
    solver, grid = setup_solver("dpm-solver++-2m", loaded.schedule, 4)
    schedule = SolverSchedule(
        tuple(grid.tolist()), copy_solver(solver, loaded.schedule, grid), 4,
        loaded.schedule.to_config(),
    )  # fmt: skip
    path = tmp_path / "s.json"
    path.write_text(schedule.to_json())
    (found,) = contestants([f"schedule:{path}"], loaded)
    assert found.nfe == 4 and found.source == "diffsolve"
    result = CliRunner().invoke(
        main,
        ["bench", "--model", "digits", "--nfe", "4,5", "--samples", "4", "--solvers",
         f"schedule:{path},ddim", "--reference-steps", "50", "--no-overhead", "--no-check"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
