"""Bad input files, devices and tune budgets end in one-line errors naming the fix, never a
traceback (issue 24's reproductions)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.app.model_data import load_array
from diffsolve.app.scale import MERGED_NAME as MERGED
from diffsolve.app.scale import check_device


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("corrupt.npz", lambda p: p.write_bytes(b"PK\x03\x04 garbage"), "not a readable .npz"),
        ("random.pt", lambda p: p.write_bytes(bytes(range(256)) * 4), "no tensor saved"),
        ("empty.npz", lambda p: np.savez(p), "holds no array"),
        ("nan.npy", lambda p: np.save(p, np.full((3, 1, 8, 8), np.nan)), "NaN or inf"),
        ("none.npy", lambda p: np.save(p, np.zeros((0, 1, 8, 8))), "holds no samples"),
        ("pickled.npy", lambda p: np.save(p, np.array([{}]), allow_pickle=True), "not a readable"),
    ],
)
def test_bad_array_files_are_named(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=message):
        load_array(str(path))


def test_a_good_array_file_loads(tmp_path):
    np.save(tmp_path / "ok.npy", np.ones((2, 1, 8, 8)))
    assert load_array(str(tmp_path / "ok.npy")).dtype == torch.float32


def test_meta_device_is_refused():
    with pytest.raises(ValueError, match="meta tensors hold no values"):
        check_device("meta")


def test_ems_on_corrupt_data_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 garbage")
    args = ["ems", "--model", "digits", "--data", str(tmp_path / "bad.npz"), "--yes"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2 and "not a readable .npz" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "e.safetensors").exists()


def test_tune_with_few_candidates(tmp_path):
    """Fewer candidates than steps: refused; just enough, with teleport starts: a result."""
    base = ["tune", "--model", "digits", "--trajectories", "4", "--teacher-steps", "10"]
    base += ["--solver", "ddim", "--nfe", "5"]
    few = CliRunner().invoke(main, [*base, "--candidates", "2", "--out", str(tmp_path / "a")])
    assert few.exit_code != 0 and "--candidates >= 5" in few.output
    enough = CliRunner().invoke(main, [*base, "--candidates", "5", "--out", str(tmp_path / "b")])
    assert enough.exit_code == 0, enough.output


def test_ems_labels_on_an_unconditional_model_are_refused(tmp_path):
    np.save(tmp_path / "labels.npy", np.zeros(1400, dtype=np.int64))
    args = ["ems", "--model", "digits", "--labels", str(tmp_path / "labels.npy"), "--yes"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2 and "not class-conditional" in result.output
    assert not (tmp_path / "e.safetensors").exists()


# ---------------------------------------------------------------------------------------
# No ignored option (issue 24): each is honoured or refused with a one-line error
def _invoke(*args: object) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    if result.exit_code:  # one error line (an exception's name in the message aside)
        assert len(re.findall(r"^Error: ", result.output, re.M)) == 1, result.output
    return result


def test_classifier_guidance_refuses_a_model_of_another_noise_schedule(tmp_path):
    """The digits classifier was trained on the VP schedule: on digits-flow it steered the
    wrong noise levels (median |x| 45 for data in [-1, 1]) without a word."""
    args = ["sample", "--guidance", "classifier", "--label", "3", "--scale", "1"]
    args += ["--seeds", "0-1", "--nfe", "4", "--out"]
    flow = _invoke(*args, tmp_path / "flow", "--model", "digits-flow")
    assert flow.exit_code == 2 and "classifier was trained" in flow.output
    assert "RectifiedFlow" in flow.output and not (tmp_path / "flow").exists()
    vp = _invoke(*args, tmp_path / "vp", "--model", "digits")  # its own schedule: guided
    assert vp.exit_code == 0, vp.output
    diffusers = _invoke(*args, tmp_path / "d", "--model", "digits-diffusers")  # float32 ᾱ
    assert diffusers.exit_code == 0, diffusers.output


def test_a_teleporting_schedule_takes_the_users_gaussian_stats(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffsolve.app.files import file_sha256
    from diffsolve.app.loader import demo_path

    schedule = tmp_path / "tel.json"
    tune = ["tune", "--model", "gaussian", "--teleport", "--solver", "dpm-solver++-2m"]
    tune += ["--nfe", "4", "--candidates", "10", "--teacher-steps", "20", "--trajectories", "4"]
    assert _invoke(*tune, "--out", schedule).exit_code == 0
    assert json.loads(schedule.read_text())["teleport"]
    with safe_open(str(demo_path("gaussian") / "gaussian_stats.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["mean"] = tensors["mean"] + 1.0
    mine = tmp_path / "mine.safetensors"
    save_file(tensors, str(mine), metadata=meta)
    args = ["sample", "--model", "gaussian", "--schedule", schedule, "--seeds", "0-3"]
    assert _invoke(*args, "--out", tmp_path / "a").exit_code == 0
    run = _invoke(*args, "--gaussian-stats", mine, "--out", tmp_path / "b")
    assert run.exit_code == 0, run.output
    inputs = json.loads(json.loads((tmp_path / "b" / "sample.json").read_text())["inputs"])
    assert inputs["gaussian_stats"] == file_sha256(mine)
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / MERGED) as b:
        assert np.abs(a["samples"] - b["samples"]).max() > 0.1  # the jump used the user's mean


def test_tune_budget_applies_to_search_only(tmp_path):
    args = ["tune", "--model", "gaussian", "--method", "dp", "--budget", "5"]
    result = _invoke(*args, "--out", tmp_path / "s.json")
    assert result.exit_code == 2 and "--budget 5 limits --method search only" in result.output
    assert not (tmp_path / "s.json").exists()


def test_guidance_sweep_runs_every_solver_and_nfe(tmp_path):
    """Only the first --solvers and --nfe were run (rc 0)."""
    import json

    out = tmp_path / "g.json"
    args = ["bench", "--sweep", "guidance", "--model", "digits-cond", "--nfe", "3,4"]
    args += ["--solvers", "ddim,unipc-bh2-3", "--samples", "4", "--methods", "cfg"]
    result = _invoke(*args, "--scales", "1,2", "--json", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("guidance on digits-cond") == 4
    runs = json.loads(out.read_text())["runs"]
    assert sorted((r["solver"], r["nfe"]) for r in runs) == [
        ("ddim", 3),
        ("ddim", 4),
        ("unipc-bh2-3", 3),
        ("unipc-bh2-3", 4),
    ]
    assert all(len(r["rows"]) == 2 for r in runs)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_ems_bandwidth_must_be_a_finite_number(tmp_path, value):
    args = ["ems", "--model", "gaussian", "--samples", "2", "--grid", "4", "--bandwidth", value]
    result = _invoke(*args, "--out", tmp_path / "e.safetensors")
    assert result.exit_code == 2 and "bandwidth" in result.output
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (torch.tensor([[1.0, 0.5], [0.2, 0.0]]), "expected a 1-D sequence"),
        ("karras", "make_grid"),
        ([1.0, "a", 0.0], "expected time points"),
        (torch.tensor(0.5), "expected a 1-D sequence"),
    ],
)
def test_a_grid_is_one_sequence_of_times(grid, message):
    """A 2-D grid tensor was silently flattened; a string gave a TypeError from torch."""
    from diffsolve import DDIM, VPLinear, grids, sample

    with pytest.raises(ValueError, match=message):
        grids.validate_grid(VPLinear(), grid)

    def model(x, t):
        return x

    from diffsolve import ModelWrapper

    wrapped = ModelWrapper(model, VPLinear(), "x0", "t")
    with pytest.raises(ValueError, match="grid"):
        sample(wrapped, torch.zeros(2, 3), DDIM(), grid)


def test_the_inversion_sweep_runs_its_default_solvers():
    """DPM-Solver-fast's per-step orders did not fit the sweep's grid: the default sweep was
    refused at every NFE (found by the CLI property run)."""
    from diffsolve.app.bench.sweeps import inversion_sweep

    result = inversion_sweep("gaussian", None, [3, 5], samples=4)
    fast = [r for r in result["rows"] if r["solver"] == "dpm-solver-fast"]
    assert [r["steps"] for r in fast] == [3, 5] and all(r["rmse"] < 1 for r in fast)


def test_a_derivative_path_the_model_cannot_take_is_a_one_line_error(tmp_path):
    """``ems --jvp forward`` on a network with flash attention (no forward AD) ended in a
    traceback (found by the CLI property run)."""
    from tiny_folders import ddpm_folder

    model = ddpm_folder(tmp_path / "ddpm")
    args = ["ems", "--model", str(model), "--samples", "2", "--grid", "4", "--bandwidth", "0"]
    args += ["--data-samples", "4", "--jvp", "forward", "--no-check"]
    result = _invoke(*args, "--out", tmp_path / "e.safetensors")
    assert result.exit_code == 2 and "forward JVP failed" in result.output
    assert "try jvp='auto'" in result.output and not (tmp_path / "e.safetensors").exists()
