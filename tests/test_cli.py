"""The command line: sample and bench, including argument errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.app.seeds import noise_for_seeds, parse_seeds


def test_sample_writes_grid_and_npz(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "sample",
            "--model",
            "gaussian",
            "--seeds",
            "0-9",
            "--batch-size",
            "4",
            "--nfe",
            "6",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (10, 1, 8, 8)
    assert data["seeds"].tolist() == list(range(10))
    assert (out / "grid.png").stat().st_size > 100
    assert json.loads((out / "sample.json").read_text())["nfe"] == 6


def test_sample_is_independent_of_batch_size(tmp_path):
    runs = []
    for batch in ("1", "7"):
        out = tmp_path / batch
        CliRunner().invoke(
            main,
            [
                "sample",
                "--model",
                "gaussian",
                "--seeds",
                "3-12",
                "--batch-size",
                batch,
                "--out",
                str(out),
            ],
        )
        runs.append(np.load(out / "samples.npz")["samples"])
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--model", "nope"], "unknown model 'nope'"),
        (["sample", "--seeds", "5-1"], "cannot parse '5-1'"),
        (["sample", "--solver", "magic"], "Invalid value for '--solver'"),
        (["sample", "--nfe", "0"], "Invalid value for '--nfe'"),
        (["bench", "--nfe", "five"], "expected integers"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_seed_parsing_and_noise():
    assert parse_seeds("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]
    a = noise_for_seeds([5, 6], (1, 2))
    b = noise_for_seeds([6], (1, 2))
    assert np.array_equal(a[1].numpy(), b[0].numpy())


def test_solvers_lists_the_registry():
    result = CliRunner().invoke(main, ["solvers"])
    assert "unipc-bh2-3" in result.output and "dpm-solver++-3m" in result.output


def test_sample_with_guidance_threshold_and_teleport(tmp_path):
    from diffsolve.app.data import load_digits
    from diffsolve.stats.gaussian.estimate import compute_gaussian_stats

    stats = tmp_path / "stats.safetensors"
    compute_gaussian_stats(load_digits("train")).save(stats)
    out = tmp_path / "guided"
    result = CliRunner().invoke(
        main,
        [
            "sample",
            "--model",
            "gmm",
            "--seeds",
            "0-3",
            "--nfe",
            "5",
            "--guidance",
            "classifier",
            "--scale",
            "2",
            "--threshold",
            "0.995",
            "--teleport",
            "0.2",
            "--gaussian-stats",
            str(stats),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "sample.json").read_text())
    assert json.loads(manifest["conditioning"])["teleport"] == 0.2
    assert np.load(out / "samples.npz")["samples"].shape == (4, 1, 8, 8)
    # a guided run refuses to resume into the folder with other guidance settings
    again = CliRunner().invoke(
        main, ["sample", "--model", "gmm", "--seeds", "0-3", "--nfe", "5", "--out", str(out)]
    )
    assert again.exit_code == 2 and "different settings" in again.output


def test_guidance_errors_are_usage_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is ./samples
    result = CliRunner().invoke(
        main, ["sample", "--model", "digits", "--guidance", "cfg", "--scale", "3", "--seeds", "0"]
    )
    assert result.exit_code == 2 and "class-conditional" in result.output
