"""The bench on the analytic Gaussian model: schema, failures reported, twins match peers,
DPM-Solver-v3's same-grid section."""

import json
import math

import pytest
import torch

from diffsolve import DPMSolverPP, sample
from diffsolve.app.bench import BenchConfig, run_bench
from diffsolve.app.bench.report import format_table, plot, write_json
from diffsolve.app.bench.runner import contestants
from diffsolve.app.bench.same_grid import (
    DEGENERATE,
    RIVALS,
    degenerate_ems,
    same_grid_contestants,
    section_runs,
    v3_grid,
)
from diffsolve.app.bench.timing import TimedModel
from diffsolve.app.loader import load_model
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.registry import SOLVERS, SolverContext, setup_solver

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def result():
    config = BenchConfig(
        model="gaussian",
        nfes=(5, 8),
        samples=32,
        reference_steps=60,
        overhead=False,
        solvers=[
            "dpm-solver++-2m",
            "unipc-bh2-3@logsnr",
            "diffusers:dpm-2m",
            "diffusers:unipc-bh1",
            "dpm-solver++-2m@diffusers-grid",
        ],
    )
    return run_bench(config)


def test_rows_and_json_schema(result, tmp_path):
    write_json(result, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["model"] == "gaussian"
    assert 0 <= data["reference_agreement"] < 1e-3
    assert len(data["results"]) == 10
    for row in data["results"]:
        assert {"solver", "source", "nfe", "rmse", "fd", "seconds", "overhead_us"} <= set(row)
        assert row["source"] in ("diffsolve", "diffusers")


def test_failed_peer_is_reported_not_raised(result):
    bh1 = [r for r in result.results if r.solver == "diffusers:unipc-bh1"]
    assert all(r.failed and "non-finite" in r.error for r in bh1)  # diffusers' bh1 + "zero"
    assert "failed at NFE 5,8" in format_table(result)


def test_twin_reproduces_the_diffusers_rmse(result):
    rows = {(r.solver, r.nfe): r for r in result.results}
    for nfe in (5, 8):
        ours = rows[("dpm-solver++-2m@diffusers-grid", nfe)].rmse
        theirs = rows[("diffusers:dpm-2m", nfe)].rmse
        assert ours == pytest.approx(theirs, rel=5e-4)  # 3 significant digits


def test_plot_is_written(result, tmp_path):
    plot(result, tmp_path / "rmse.png")
    assert (tmp_path / "rmse.png").stat().st_size > 1000


def test_unknown_contestant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown contestant 'dpm-solver-9m'"):
        contestants(["dpm-solver-9m"], load_model("gaussian"))
    with pytest.raises(ValueError, match="no diffusers twin"):
        contestants(["deis-3@diffusers-grid"], load_model("gaussian"))


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("nfe", [3, 5, 6, 10])
def test_registry_spends_exactly_the_budget(name, nfe):
    model = load_model("gaussian")  # ships EMS for DPM-Solver-v3
    schedule = model.schedule
    context = model.solver_context(model.available())
    solver, grid = setup_solver(name, schedule, nfe, context=context)
    spent = solver.plan(schedule, grid).nfe
    heun_like = name in ("heun", "edm-sde")  # two evaluations a step, one on the last
    assert spent == nfe or (heun_like and nfe % 2 == 0 and spent == nfe - 1)
    assert grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])


def test_teleport_and_guidance_sweeps():
    from diffsolve.app.bench.sweeps import (
        format_guidance,
        format_teleport,
        guidance_sweep,
        teleport_sweep,
    )

    result = teleport_sweep(
        "gaussian", ["dpm-solver++-2m"], [6], [0.0, 0.3], samples=16, reference_steps=40
    )
    rows = result["rows"]
    assert [r["skip"] for r in rows] == [0.0, 0.3] and all(r["nfe"] == 6 for r in rows)
    assert rows[1]["t_skip"] < rows[0]["t_skip"]
    assert "skip 30%" in format_teleport(result)
    guided = guidance_sweep("gmm", "dpm-solver++-2m", 5, ["classifier"], [0.0, 4.0], samples=20)
    accuracy = [r["accuracy"] for r in guided["rows"]]
    assert accuracy[1] > accuracy[0]
    assert "accuracy" in format_guidance(guided)


def test_inversion_sweep_from_the_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from diffsolve.app.cli import main

    out = tmp_path / "inversion.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--sweep",
            "inversion",
            "--model",
            "gaussian",
            "--nfe",
            "5,20",
            "--solvers",
            "ddim,dpm-solver++-2m,bdia",
            "--samples",
            "16",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "inversion round trip" in result.output
    rows = {(r["solver"], r["steps"]): r["rmse"] for r in json.loads(out.read_text())["rows"]}
    assert rows[("ddim", 20)] < rows[("ddim", 5)]
    assert rows[("dpm-solver++-2m", 20)] < rows[("ddim", 20)]
    assert rows[("bdia", 5)] < 1e-5  # exact inversion: rounding error only


@pytest.fixture(scope="module")
def v3_result():
    config = BenchConfig(
        model="gaussian",  # ships its exact EMS
        nfes=(5, 8),
        samples=32,
        reference_steps=60,
        overhead=False,
        solvers=["dpm-solver-v3", "dpm-solver-v3@logsnr", "diffusers:unipc-bh2"],
    )
    return run_bench(config)


def test_same_grid_section_for_each_selected_v3(v3_result):
    sections = {s.contestant: s for s in v3_result.same_grid}
    assert list(sections) == ["dpm-solver-v3", "dpm-solver-v3@logsnr"]
    main = {(r.solver, r.nfe_budget): r.rmse for r in v3_result.results}
    for name, section in sections.items():
        assert [r.solver for r in section.runs] == [DEGENERATE, *RIVALS] * 2
        assert all(not r.failed and r.nfe == r.nfe_budget for r in section.runs)
        for ratio in section.ratios:
            runs = {r.solver: r.rmse for r in section.runs if r.nfe_budget == ratio.nfe}
            assert ratio.v3 == main[(name, ratio.nfe)]  # the main table's row, not re-run
            best = min(runs[rival] for rival in RIVALS)
            assert ratio.same_grid_ratio == pytest.approx(ratio.v3 / best)
            assert ratio.degenerate_ratio == pytest.approx(ratio.v3 / runs[DEGENERATE])
            peer = main[("diffusers:unipc-bh2", ratio.nfe)]
            assert ratio.diffusers_ratio == pytest.approx(ratio.v3 / peer)
            medians = {r.solver: r.median for r in section.runs if r.nfe_budget == ratio.nfe}
            at = (name, ratio.nfe)
            v3_median = next(r.median for r in v3_result.results if (r.solver, r.nfe_budget) == at)
            best_median = min(medians[rival] for rival in RIVALS)
            assert ratio.median_ratio == pytest.approx(v3_median / best_median)
            for value in (
                ratio.same_grid_ratio, ratio.degenerate_ratio, ratio.diffusers_ratio,
                ratio.median_ratio,
            ):  # fmt: skip
                assert math.isfinite(value) and value > 0
            # same-order methods on one grid: v3 without its statistics is not far off
            # DPM-Solver++(2M) (equal in Taylor form without the corrector: next test)
            assert 0.1 < runs[DEGENERATE] / runs["dpm-solver++-2m"] < 10
    assert {r.grid for r in sections["dpm-solver-v3"].ratios} == {"time_quadratic"}
    assert {r.grid for r in sections["dpm-solver-v3@logsnr"].ratios} == {"logsnr"}
    text = format_table(v3_result)
    assert "same grid: dpm-solver-v3@logsnr against our solvers on its own grid (logsnr)" in text
    assert text.count("same-grid ratio: v3 / best of ours") == 2


def test_same_grid_runs_on_v3s_grid_with_degenerate_statistics():
    """The section's grid is the one the bench's v3 samples on; its rivals run on it; its
    degenerate EMS make v3 (without the corrector) DPM-Solver++(2M) in Taylor form there."""
    loaded = load_model("gaussian")
    context = loaded.solver_context(loaded.available())
    model = TimedModel(loaded.denoiser)
    x = torch.randn(8, *loaded.data_shape, generator=torch.Generator().manual_seed(0))
    for name, nfe in (("dpm-solver-v3", 6), ("dpm-solver-v3@time_uniform", 8)):
        kind, grid = v3_grid(name, model, nfe, context)
        base, _, override = name.partition("@")
        assert kind == (override or "time_quadratic")
        assert torch.equal(
            grid, setup_solver(base, model.schedule, nfe, override or None, context=context)[1]
        )
        runs = {c.name: c for c in section_runs(name, model.schedule, context)}
        out, _, _ = runs["dpm-solver++-2m"].run(model, x, nfe)
        assert torch.equal(out, sample(model, x, DPMSolverPP(2), grid).x)
        flat = degenerate_ems(context.ems, model.schedule)
        assert flat.lambda_range == pytest.approx(context.ems.lambda_range, abs=1e-9)
        v3 = sample(model, x, DPMSolverV3(flat, 2, corrector=False), grid).x
        pp = sample(model, x, DPMSolverPP(2, solver_type="taylor"), grid).x
        assert float((v3 - pp).abs().max()) < 1e-9 * float(pp.abs().max())


def test_same_grid_section_only_where_v3_runs_with_ems(result):
    assert result.same_grid == [] and "same grid" not in format_table(result)
    context = load_model("gaussian").solver_context(("ems",))
    lineup = ["dpm-solver-v3", "dpm-solver-v3@logsnr", "dpm-solver++-2m"]
    assert same_grid_contestants(None, lineup, context) == ["dpm-solver-v3"]
    assert same_grid_contestants(["dpm-solver-v3@logsnr"], lineup, context) == [
        "dpm-solver-v3@logsnr"
    ]
    assert same_grid_contestants(None, lineup, SolverContext()) == []


def test_same_grid_json_from_the_cli_on_digits_flow(tmp_path):
    from click.testing import CliRunner

    from diffsolve.app.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--model", "digits-flow", "--nfe", "5", "--samples", "8"]
    args += ["--reference-steps", "50", "--no-overhead", "--json", str(out)]
    args += ["--solvers", "dpm-solver-v3,diffusers:unipc-bh2"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert "same-grid ratio" in run.output
    (section,) = json.loads(out.read_text())["same_grid"]
    assert section["contestant"] == "dpm-solver-v3"
    assert {r["solver"] for r in section["runs"]} == {DEGENERATE, *RIVALS}
    (ratio,) = section["ratios"]
    assert ratio["grid"] == "time_shifted" and ratio["times"][-1] == 0  # its declared shift
    for key in ("same_grid_ratio", "degenerate_ratio", "diffusers_ratio", "median_ratio"):
        assert math.isfinite(ratio[key]) and ratio[key] > 0
    assert ratio["best_rival"] in RIVALS and ratio["best_diffusers"] == "diffusers:unipc-bh2"
