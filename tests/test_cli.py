"""The command line: sample and bench, including argument errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffsolve.cli import main
from diffsolve.seeds import noise_for_seeds, parse_seeds


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
