"""Sampling at scale: per-seed determinism across batch sizes and processes, resume after a
killed run, corrupt shards recomputed, merge checks, manifest refusal, the CLI."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsolve.app.loader
from diffsolve.app.cli import main
from diffsolve.app.scale import (
    RunConfig,
    RunReport,
    SamplingError,
    check_shard,
    format_seeds,
    merge_shards,
    read_manifest,
    run_sampling,
    run_shards,
    seed_shards,
    shard_path,
)
from diffsolve.app.seeds import parse_seeds

SEEDS = "0-19"


@pytest.fixture(autouse=True)
def fast_models(monkeypatch):
    """Fit the analytic demo once per session, and run torch single-threaded: on shared,
    oversubscribed CPUs its intra-op threads can be ~100x slower."""
    monkeypatch.setattr(diffsolve.app.loader, "load_model", _cached_load_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _load(name: str, device: str):
    return _ORIGINAL_LOAD(name, device=device)


_ORIGINAL_LOAD = diffsolve.app.loader.load_model


def _cached_load_model(name, device="cpu", dtype=None, options=None):
    if dtype is None and options in (None, diffsolve.app.loader.LoadOptions()):
        return _load(str(name), str(device))
    return _ORIGINAL_LOAD(name, device, dtype, options)


def config(out: Path, **kw) -> RunConfig:
    base = {"model": "gaussian", "nfe": 6, "seeds": SEEDS, "shard_size": 8, "out_dir": out}
    return RunConfig(**{**base, **kw})


def merged(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as data:
        return data["samples"], data["seeds"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    run_sampling(config(out, batch_size=64, shard_size=1000))
    samples, seeds = merged(out)
    assert seeds.tolist() == list(range(20))
    return samples


# ---------------------------------------------------------------------------------------
def test_seed_text_and_shards():
    seeds = parse_seeds("7,0-3,10-12,5")
    assert format_seeds(seeds) == "0-3,5,7,10-12"
    assert parse_seeds(format_seeds(seeds)) == seeds
    assert seed_shards(seeds, 3) == [(0, 1, 2), (3, 5, 7), (10, 11, 12)]
    assert shard_path("d", 1000).name == "shard-00001000.npz"
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        seed_shards(seeds, 0)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_samples_do_not_depend_on_batch_size(tmp_path, reference, batch_size):
    report = run_sampling(config(tmp_path, batch_size=batch_size))
    assert len(report.computed) == 3 and report.merged == tmp_path / "samples.npz"
    samples, seeds = merged(tmp_path)
    assert seeds.tolist() == list(range(20))
    np.testing.assert_allclose(samples, reference, rtol=0, atol=1e-6)
    manifest = json.loads((tmp_path / "sample.json").read_text())
    assert manifest["nfe"] == 6 and manifest["seeds"] == "0-19" and manifest["shard_size"] == 8
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "shard-00000008.png").is_file()


def test_two_processes_match_one(tmp_path, reference):
    """torchrun with 2 gloo ranks: rank r writes shards r::2; the merge equals 1 process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "diffsolve",
        "sample",
        "--model",
        "gaussian",
        "--nfe",
        "6",
        "--seeds",
        SEEDS,
        "--shard-size",
        "8",
        "--batch-size",
        "5",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on rank 0" in result.stdout  # rank 0 reports; rank 1 stays quiet
    samples, seeds = merged(tmp_path)
    assert seeds.tolist() == list(range(20))
    np.testing.assert_allclose(samples, reference, rtol=0, atol=1e-6)


class KilledError(Exception):
    pass


def killed_after_two_shards(run: RunConfig) -> list[Path]:
    """Run ``run`` and "kill" it once its second shard is written; the shards written."""
    written: list[Path] = []

    def kill_after_two(path: Path) -> None:
        written.append(path)
        if len(written) == 2:
            raise KilledError

    with pytest.raises(KilledError):
        run_sampling(run, on_shard=kill_after_two)
    return written


def test_killed_run_resumes_with_every_seed_once(tmp_path, reference):
    written = killed_after_two_shards(config(tmp_path, batch_size=3))
    assert not (tmp_path / "samples.npz").exists()
    # a write torn by the kill: the temporary file of the third shard
    torn = tmp_path / ".shard-00000016.npz.diffsolve-x1y2.tmp"
    torn.write_bytes(b"PK\x03\x04 partial")
    users = tmp_path / ".notes.tmp"  # not diffsolve's: never touched
    users.write_text("keep")
    kept = {p: p.stat().st_mtime_ns for p in written}
    with pytest.raises(SamplingError, match="seeds 16-19 have no shard yet"):
        merge_shards(tmp_path)

    report = run_sampling(config(tmp_path, batch_size=3))
    assert report.skipped == written
    assert report.computed == [shard_path(tmp_path, 16)] and not report.recomputed
    assert {p: p.stat().st_mtime_ns for p in written} == kept  # finished work untouched
    assert not torn.exists() and users.read_text() == "keep"
    samples, seeds = merged(tmp_path)
    assert seeds.tolist() == list(range(20))  # none missing, none duplicated
    np.testing.assert_allclose(samples, reference, rtol=0, atol=1e-6)


def _flip_last_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x93NUMPY", raw.index(b"samples.npy"))  # the samples member
    raw[start + 200] ^= 0xFF  # inside the array data: only the zip CRC can tell
    path.write_bytes(bytes(raw))


def test_corrupt_shards_are_detected_and_recomputed(tmp_path, reference):
    run_sampling(config(tmp_path, batch_size=7))
    shape = (1, 8, 8)
    first, second, third = (shard_path(tmp_path, s) for s in (0, 8, 16))
    first.write_bytes(first.read_bytes()[:500])  # truncated by a crash or a full disk
    _flip_last_data_byte(second)
    np.savez(
        third,
        samples=np.full((4, *shape), np.nan, np.float32),
        seeds=np.arange(16, 20),
        fingerprint=np.asarray(read_manifest(tmp_path).fingerprint()),
    )
    assert "unreadable" in check_shard(first, range(8), shape)
    assert "unreadable" in check_shard(second, range(8, 16), shape)
    assert check_shard(third, range(16, 20), shape) == "samples contain non-finite values"
    assert "holds seeds 16-19, expected 0-3" in check_shard(third, range(4), shape)
    with pytest.raises(SamplingError, match="cannot merge"):
        merge_shards(tmp_path)

    report = run_sampling(config(tmp_path, batch_size=7))
    assert set(report.recomputed) == {first, second, third}
    samples, seeds = merged(tmp_path)
    assert seeds.tolist() == list(range(20))
    np.testing.assert_allclose(samples, reference, rtol=0, atol=1e-6)


def test_merge_refuses_stray_shards_and_cli_reports(tmp_path):
    run_sampling(config(tmp_path, merge=False))
    assert not (tmp_path / "samples.npz").exists()
    np.savez(
        tmp_path / "shard-00000100.npz",
        samples=np.zeros((1, 1, 8, 8), np.float32),
        seeds=np.array([100]),
    )
    result = CliRunner().invoke(main, ["merge", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "shard-00000100.npz: not a shard of this run" in result.output
    (tmp_path / "shard-00000100.npz").unlink()
    result = CliRunner().invoke(main, ["merge", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert merged(tmp_path)[1].tolist() == list(range(20))


def test_other_settings_are_refused(tmp_path):
    run_sampling(config(tmp_path))
    with pytest.raises(ValueError, match=r"different settings \(nfe: 6 in the folder, 8 now"):
        run_sampling(config(tmp_path, nfe=8))
    with pytest.raises(ValueError, match="shard_size: 8 in the folder, 5 now"):
        run_sampling(config(tmp_path, shard_size=5))
    args = ["sample", "--model", "gaussian", "--nfe", "6", "--seeds", "0-29", "--out"]
    result = CliRunner().invoke(main, [*args, str(tmp_path), "--shard-size", "8", "--nfe", "8"])
    assert result.exit_code == 2 and "nfe: 6 in the folder, 8 now" in result.output
    # the batch size changes the network's floating-point reductions: refused too
    with pytest.raises(ValueError, match="batch_size: 64 in the folder, 3 now"):
        run_sampling(config(tmp_path, batch_size=3))
    # fewer seeds are refused; the device and merging may change between resumes
    with pytest.raises(ValueError, match="leaves out 10-19"):
        run_sampling(config(tmp_path, seeds="0-9"))
    report = run_sampling(config(tmp_path, merge=False))
    assert len(report.skipped) == 3 and not report.computed
    assert read_manifest(tmp_path).seeds == "0-19"


def test_diverging_samples_stop_the_run(tmp_path):
    run_sampling(config(tmp_path, seeds="0-1", shard_size=2))
    shard_path(tmp_path, 0).unlink()
    report = RunReport(read_manifest(tmp_path))
    with pytest.raises(SamplingError, match="seeds 1 gave non-finite samples"):
        run_shards(_nan_for_seed_1, [(0, 1)], tmp_path, report)
    assert not shard_path(tmp_path, 0).exists()  # nothing untrustworthy is written


def _nan_for_seed_1(seeds):
    x = torch.zeros(len(seeds), 1, 8, 8)
    x[list(seeds).index(1)] = float("nan")
    return x


def test_default_command_samples_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sample"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "samples")
    assert (manifest.model, manifest.solver, manifest.nfe) == ("digits", "dpm-solver-v3", 10)
    assert manifest.seeds == "0-63" and (tmp_path / "samples" / "grid.png").is_file()
    assert merged(tmp_path / "samples")[0].shape == (64, 1, 8, 8)


def test_a_killed_stochastic_run_resumes_bit_for_bit(tmp_path):
    """DPM-Solver++(2M) SDE draws its fresh noise from each sample's seed: a run killed after
    two shards and resumed equals one uninterrupted run bit for bit."""
    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    sde = {"solver": "dpm-solver++-2m-sde"}
    run_sampling(config(whole_dir, batch_size=3, **sde))
    written = killed_after_two_shards(config(resumed_dir, batch_size=3, **sde))
    report = run_sampling(config(resumed_dir, batch_size=3, **sde))
    assert report.skipped == written
    whole, resumed = merged(whole_dir), merged(resumed_dir)
    np.testing.assert_array_equal(resumed[1], whole[1])
    np.testing.assert_array_equal(resumed[0], whole[0])  # bit for bit
    run_sampling(config(tmp_path / "ode", batch_size=20))
    deterministic = merged(tmp_path / "ode")[0]
    assert np.abs(deterministic - whole[0]).max() > 1e-3  # the noise is really drawn


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "7", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK=7"),
        ({"WORLD_SIZE": "0"}, "must be >= 1"),
    ],
)
def test_torchrun_environment_is_checked_before_any_group(monkeypatch, env, message):
    from diffsolve.app.scale import LaunchError, distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=message), distributed():
        pass


def test_a_missing_peer_ends_the_run_with_a_message(monkeypatch):
    """A rank whose peers never come gives up after the join timeout (60 s; 2 s here),
    naming what to start — not after torch's 24 h default."""
    import socket
    from datetime import timedelta

    from diffsolve.app import scale

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(scale, "JOIN_TIMEOUT", timedelta(seconds=2))
    with (
        pytest.raises(scale.SamplingError, match="did not all join within 2 s"),
        scale.distributed(),
    ):
        pass
