"""``diffsolve ems`` under torchrun: R processes write the same statistics as one.

The K samples are sharded over the ranks in noise blocks, each sample's noise depends only on
(seed, grid point, sample), and the moment sums are all-reduced before the smoothing, so the
file of 2 gloo ranks equals the file of 1 process up to the order of a floating-point sum
(which the least squares for s and b amplify where f is nearly deterministic).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from diffsolve.stats.ems import load_ems

ARGS = ["--model", "gaussian", "--samples", "64", "--grid", "300", "--batch-size", "16"]


def run(out, processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else []
    )
    command = [sys.executable, *launcher, "-m", "diffsolve", "ems", *ARGS, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Projected:" in result.stderr


def test_two_processes_write_the_statistics_of_one(tmp_path):
    run(tmp_path / "one.safetensors", 1)
    run(tmp_path / "two.safetensors", 2)
    one, two = load_ems(tmp_path / "one.safetensors"), load_ems(tmp_path / "two.safetensors")
    assert one.metadata["bandwidth"] == two.metadata["bandwidth"] == 0.2  # smoothed
    torch.testing.assert_close(two.l, one.l, rtol=1e-9, atol=1e-12)
    for name in ("s", "b"):  # Var f cancels where f is nearly deterministic: sum order shows
        a, b = getattr(two, name), getattr(one, name)
        assert float((a - b).norm() / b.norm()) < 1e-5, name
