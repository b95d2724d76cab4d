"""The bench on the analytic Gaussian model: schema, failures reported, twins match peers."""

import json

import pytest
import torch

from diffsolve.app.bench import BenchConfig, run_bench
from diffsolve.app.bench.report import format_table, plot, write_json
from diffsolve.app.bench.runner import contestants
from diffsolve.app.loader import load_model
from diffsolve.solvers.registry import SOLVERS, setup_solver

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
    assert spent == nfe or (name == "heun" and nfe % 2 == 0 and spent == nfe - 1)
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
