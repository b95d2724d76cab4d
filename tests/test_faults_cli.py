"""Fault injection, command line: every defect of the reliability issue that a user meets
through ``diffsolve``, reproduced as a new user would and checked fixed.

Files the command did not make are byte-identical afterwards; a resume under changed inputs is
refused with a message naming what changed; every bad input gets a one-line error, never a
traceback. (The library-side items are in ``tests/test_faults_library.py``.)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsolve
from diffsolve.app.cli import main
from diffsolve.app.files import file_mode
from diffsolve.app.loader import demo_path
from diffsolve.app.scale import LOCK_NAME, MANIFEST_NAME, read_manifest

PACKAGE = Path(diffsolve.__file__).resolve().parent
FAST = ["--model", "gaussian", "--nfe", "4", "--seeds", "0-3", "--shard-size", "2"]

pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args: str, code: int | None = None) -> object:
    """Invoke the CLI in-process; assert no traceback (an uncaught exception) and, when
    given, the exit code; the error of a failed command is one line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.output,
        result.exception,
    )
    assert "Traceback" not in result.output
    if code is not None:
        assert result.exit_code == code, result.output
    if result.exit_code:  # one error line (progress bars may share its terminal line)
        assert result.output.count("Error:") == 1, result.output
        assert len(result.output.split("Error:")[1].strip().splitlines()) == 1, result.output
    return result


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------
# Data loss
def test_1_statistics_commands_never_write_into_the_package(tmp_path, monkeypatch):
    shipped = digest(PACKAGE / "demos")
    monkeypatch.chdir(tmp_path)
    run(
        "ems",
        "--model",
        "gaussian",
        "--samples",
        "2",
        "--grid",
        "2",
        "--bandwidth",
        "0",
        "--batch-size",
        "2",
        code=0,
    )
    assert (tmp_path / "ems.safetensors").is_file()
    result = run(
        "ems", "--model", "gaussian", "--samples", "2", "--grid", "2", "--bandwidth", "0", code=2
    )
    assert "exists; pass --force" in result.output
    run(
        "ems",
        "--model",
        "gaussian",
        "--samples",
        "2",
        "--grid",
        "2",
        "--bandwidth",
        "0",
        "--force",
        code=0,
    )
    inside = demo_path("digits") / "ems.safetensors"
    result = run(
        "ems",
        "--samples",
        "2",
        "--grid",
        "2",
        "--bandwidth",
        "0",
        "--out",
        inside,
        "--force",
        code=2,
    )
    assert "inside the installed diffsolve package" in result.output
    run("gaussian-stats", code=0)
    assert (tmp_path / "gaussian_stats.safetensors").is_file()
    run("gaussian-stats", code=2)
    result = run("gaussian-stats", "--out", demo_path("digits") / "gaussian_stats.safetensors")
    assert result.exit_code == 2 and "inside the installed" in result.output
    assert digest(PACKAGE / "demos") == shipped
    assert not list(tmp_path.glob("*.partial*"))  # the run's own checkpoint, removed


def test_2_sample_removes_only_its_own_temporary_files(tmp_path):
    out = tmp_path / "h"
    out.mkdir()
    (out / ".notes.tmp").write_text("keep")
    (out / ".shard-00000000.npz.diffsolve-abc.tmp").write_bytes(b"torn")
    run("sample", *FAST, "--out", out, code=0)
    assert (out / ".notes.tmp").read_text() == "keep"
    assert not list(out.glob(".*diffsolve-*.tmp"))


def test_3_ems_checkpoint_never_overwrites_a_foreign_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "n.txt"
    notes.write_text("my notes")
    result = run(
        "ems",
        "--model",
        "gaussian",
        "--samples",
        "2",
        "--grid",
        "2",
        "--bandwidth",
        "0",
        "--checkpoint",
        notes,
        code=2,
    )
    assert "n.txt" in result.output and notes.read_text() == "my notes"


def test_4_a_second_writer_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_NAME, "a") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("sample", *FAST, "--out", out, code=1)
        assert "in use by another diffsolve sample run" in result.output
    run("sample", *FAST, "--out", out, code=0)  # the lock is released with its holder


# ---------------------------------------------------------------------------------------
# Silent wrong results
def _copy_model(tmp_path: Path, name: str = "digits") -> Path:
    folder = tmp_path / name
    shutil.copytree(demo_path(name), folder)
    return folder


def test_5_resume_refuses_other_weights_and_other_statistics(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tmp_path)
    args = ["sample", "--model", model, "--solver", "ddim", "--nfe", "2", "--seeds", "0-1"]
    run(*args, "--out", tmp_path / "a", code=0)
    weights = load_file(model / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1e-3
    save_file(weights, model / "model.safetensors")
    result = run(*args, "--out", tmp_path / "a", code=2)
    assert "inputs: weights changed" in result.output

    teleport = [*args, "--teleport", "0.3", "--nfe", "5", "--out", tmp_path / "b"]
    stats = tmp_path / "stats.safetensors"
    shutil.copy(model / "gaussian_stats.safetensors", stats)
    run(*teleport, "--gaussian-stats", stats, code=0)
    tensors = load_file(stats)
    tensors["mean"] = tensors["mean"] + 0.1
    save_file(tensors, stats, metadata=_metadata(model / "gaussian_stats.safetensors"))
    result = run(*teleport, "--gaussian-stats", stats, code=2)
    assert "inputs: gaussian_stats changed" in result.output


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def test_6_shards_carry_their_own_settings(tmp_path):
    """Shards without their manifest are another run's files: a run with other settings in
    that folder is refused, naming them, and leaves them as they are (issue 24: it used to
    recompute, i.e. overwrite, them)."""
    out = tmp_path / "run"
    run("sample", *FAST, "--solver", "ddim", "--out", out, code=0)
    (out / MANIFEST_NAME).unlink()
    before = digest(out)
    result = run("sample", *FAST, "--solver", "heun", "--out", out, code=2)
    assert "shard-00000000.npz" in result.output and "no sample.json" in result.output
    assert digest(out) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nfe", "2", "--teleport", "0.2"], "skips no step"),
        (["--model", "digits", "--label", "3"], "is unconditional"),
        (["--guidance", "none", "--scale", "7"], "has no effect without guidance"),
        (["--gaussian-stats", "x.safetensors"], "used by --teleport only"),
    ],
)
def test_9_options_are_honoured_or_refused(tmp_path, args, message):
    base = ["--model", "gaussian", "--nfe", "4", "--seeds", "0-1"]
    out = tmp_path / "run"
    result = run("sample", *base, *args, "--out", out, code=2)
    assert message in result.output
    assert not out.exists()  # a refused start writes nothing


def test_9_bench_options_of_another_mode_are_refused(tmp_path):
    result = run("bench", "--sweep", "teleport", "--plot", tmp_path / "f.png", code=2)
    assert "--plot: not used by --sweep teleport" in result.output
    result = run("bench", "--profile", "scale", "--samples", "8", code=2)
    assert "--samples: not used by --profile scale" in result.output


def test_10_batch_size_is_part_of_a_run(tmp_path):
    out = tmp_path / "run"
    run("sample", *FAST, "--batch-size", "2", "--out", out, code=0)
    result = run("sample", *FAST, "--batch-size", "1", "--out", out, code=2)
    assert "batch_size: 2 in the folder, 1 now" in result.output
    help_text = " ".join(run("sample", "--help").output.split())
    assert "to ~1e-5" in help_text and "not bit for bit" in help_text


def test_11_nan_data_is_refused_by_gaussian_stats(tmp_path):
    data = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    data[3, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    result = run(
        "gaussian-stats",
        "--data",
        tmp_path / "nan.npy",
        "--out",
        tmp_path / "s.safetensors",
        code=2,
    )
    assert "finite" in result.output and not (tmp_path / "s.safetensors").exists()


# ---------------------------------------------------------------------------------------
# Tracebacks and hangs
def test_12_bad_places_and_devices_get_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run("sample", *FAST, "--out", tmp_path / "file" / "sub")
    assert result.exit_code in (1, 2) and "Not a directory" in result.output
    assert "is not a torch device" in run("sample", *FAST, "--device", "nope", code=2).output
    if not torch.cuda.is_available():
        assert "no CUDA" in run("sample", *FAST, "--device", "cuda", code=2).output
    torch.save({"x": torch.zeros(2)}, tmp_path / "dict.pt")
    result = run("gaussian-stats", "--data", tmp_path / "dict.pt", "--out", tmp_path / "g", code=2)
    assert "holds a dict, not a tensor" in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_12_read_only_out(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert "Permission denied" in run("sample", *FAST, "--out", out, code=1).output
    finally:
        out.chmod(0o755)


def test_12_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    out = tmp_path / "run"
    result = run("sample", *FAST, "--out", out, code=1)
    assert (
        "No space left on device" in result.output and "finished shards are kept" in result.output
    )
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("tmp")]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"schedule": None}, "schedule"),
        ({"data_shape": "1,8,8"}, "data_shape"),
    ],
)
def test_12_bad_model_configs_get_one_line_errors(tmp_path, edit, message):
    model = _copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(edit)
    (model / "config.json").write_text(json.dumps(config))
    result = run(
        "sample", "--model", model, "--nfe", "2", "--seeds", "0", "--out", tmp_path / "o", code=2
    )
    assert message in result.output


def test_13_divergence_ends_with_the_documented_message(tmp_path):
    result = run(
        "sample",
        "--model",
        "digits-cond",
        "--guidance",
        "apg",
        "--scale",
        "1e30",
        "--nfe",
        "2",
        "--seeds",
        "0-1",
        "--out",
        tmp_path / "run",
        code=1,
    )
    assert "diverged" in result.output and "finished shards are kept" in result.output


def test_14_huge_seed_ranges_are_refused_at_once(tmp_path):
    result = run("sample", *FAST[:4], "--seeds", "0-99999999999", "--out", tmp_path / "r", code=2)
    assert "more than 10,000,000 seeds" in result.output


def test_15_a_refused_start_leaves_no_manifest(tmp_path):
    out = tmp_path / "run"
    result = run(
        "sample",
        "--model",
        "digits",
        "--guidance",
        "cfg",
        "--nfe",
        "2",
        "--seeds",
        "0",
        "--out",
        out,
        code=2,
    )
    assert "cfg" in result.output and not (out / MANIFEST_NAME).exists()
    run("sample", "--model", "digits", "--nfe", "2", "--seeds", "0", "--out", out, code=0)


def test_16_png_and_json_files_are_complete_and_readable(tmp_path, monkeypatch):
    from PIL import Image

    from diffsolve.app.bench.report import write_json

    class Result:
        def to_json(self) -> dict:
            return {"ok": True}

    write_json(Result(), tmp_path / "r.json")
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == file_mode()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "run"
    result = run("sample", "--model", "digits", "--nfe", "2", "--seeds", "0", "--out", out, code=1)
    assert "No space left on device" in result.output
    assert not [p for p in out.iterdir() if p.suffix in (".png", ".tmp")]


# ---------------------------------------------------------------------------------------
# Friendlier
def test_runs_extend_to_more_seeds(tmp_path):
    out = tmp_path / "run"
    run("sample", *FAST, "--out", out, code=0)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    grown = [a if a != "0-3" else "0-7" for a in FAST]
    run("sample", *grown, "--out", out, code=0)
    assert read_manifest(out).seeds == "0-7"
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # old shards reused
    with np.load(out / "samples.npz") as data:
        assert data["seeds"].tolist() == list(range(8))


def test_ems_defaults_to_the_recommended_grid():
    assert "[default: 1200;" in " ".join(run("ems", "--help").output.split())
