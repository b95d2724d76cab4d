"""One file-safety mechanism for every writer (issue 24): the issue's data-loss reproductions,
each checked fixed.

Every file diffsolve makes goes through :mod:`diffsolve.numerics.files` (a temporary
``.<name>.diffsolve-<random>.tmp`` beside the target, fsync, the umask's mode, ``os.replace``);
an existing file is replaced only where diffsolve can tell it made it (a run manifest that
lists it, the file's own marker) or with ``--force``; nothing is written inside the
installed package (:func:`diffsolve.app.files.check_output`, :func:`diffsolve.app.scale.
check_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsolve
from diffsolve.app.cli import main
from diffsolve.app.files import check_output, file_mode, made_by_diffsolve
from diffsolve.app.loader import demo_path
from diffsolve.numerics import files as writer

PACKAGE = Path(diffsolve.__file__).resolve().parent
GAUSSIAN = ["--model", "gaussian", "--solver", "ddim", "--nfe", "5"]
#: ``ems`` at its cheapest on the analytic demo.
TINY_EMS = ["--model", "gaussian", "--samples", "2", "--grid", "4", "--bandwidth", "0"]
BENCH = ["bench", "--model", "gaussian", "--nfe", "5", "--samples", "4", "--solvers", "ddim"]
BENCH += ["--reference-steps", "50", "--no-overhead"]

pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args: object, code: int | None = None) -> str:
    """Invoke the CLI in-process: no traceback, the exit code, a one-line error."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.output,
        result.exception,
    )
    if code is not None:
        assert result.exit_code == code, result.output
    if result.exit_code:
        assert result.output.count("Error:") == 1, result.output
        assert len(result.output.split("Error:")[1].strip().splitlines()) == 1, result.output
    return result.output


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (hidden ones too)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------
# Reproduction 1: the user's grid.png / samples.npz in --out
def test_1_sample_refuses_a_folder_holding_files_it_would_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "grid.png").write_text("pic")
    (mine / "samples.npz").write_text("arr")
    before = digest(mine)
    out = run("sample", *GAUSSIAN, "--seeds", "0-3", "--out", mine, code=2)
    assert "grid.png, samples.npz" in out and "no sample.json" in out
    assert digest(mine) == before  # nothing replaced, nothing added (no shard, no lock)
    # an unrelated file does not stand in the way
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run("sample", *GAUSSIAN, "--seeds", "0-3", "--out", other, code=0)
    assert (other / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# Reproduction 2: a foreign shard copied into a folder
def test_2_a_foreign_shard_is_never_overwritten(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("sample", "--model", "gaussian", "--seeds", "0-7", "--out", a, code=0)
    b.mkdir()
    shutil.copy(a / "shard-00000000.npz", b)
    out = run("sample", *GAUSSIAN, "--seeds", "0-7", "--out", b, code=2)
    assert "shard-00000000.npz" in out
    assert digest(b) == {"shard-00000000.npz": digest(a)["shard-00000000.npz"]}


def test_2b_shards_a_folder_s_manifest_does_not_list_are_refused_before_sampling(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    seeds = ["--seeds", "0-7,1000-1003", "--shard-size", "8"]
    run("sample", "--model", "gaussian", *seeds, "--out", a, code=0)
    run("sample", *GAUSSIAN, "--seeds", "0-7", "--out", b, code=0)
    # another run's shard under a name this run lists: its fingerprint gives it away
    shutil.copy(a / "shard-00000000.npz", b / "shard-00000000.npz")
    before = digest(b)
    out = run("sample", *GAUSSIAN, "--seeds", "0-7", "--out", b, code=2)
    assert "shard-00000000.npz" in out and "made under other settings" in out
    assert digest(b) == before
    # a shard the manifest does not list at all: refused before any sample is computed
    run("sample", *GAUSSIAN, "--seeds", "0-3", "--out", tmp_path / "c", code=0)
    shutil.copy(a / "shard-00001000.npz", tmp_path / "c")
    before = digest(tmp_path / "c")
    out = run("sample", *GAUSSIAN, "--seeds", "0-7", "--out", tmp_path / "c", code=2)
    assert "shard-00001000.npz" in out
    assert digest(tmp_path / "c") == before  # the extension computed nothing


def test_2c_an_extended_run_drops_only_its_own_old_partition(tmp_path):
    out = tmp_path / "run"
    args = [*GAUSSIAN, "--shard-size", "4", "--out", out]
    run("sample", *args, "--seeds", "2-5", code=0)
    run("sample", *args, "--seeds", "0-7", code=0)  # shard starts move: 2 → 0, 4
    assert sorted(p.name for p in out.glob("shard-*.npz")) == [
        "shard-00000000.npz",
        "shard-00000004.npz",
    ]
    with np.load(out / "samples.npz") as data:
        assert data["seeds"].tolist() == list(range(8))


# ---------------------------------------------------------------------------------------
# Reproduction 3 and 4: ems's temporary file and its checkpoint
def test_3_ems_keeps_the_users_tmp_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e.safetensors.tmp").write_text("notes")
    run("ems", *TINY_EMS, "--out", "e.safetensors", code=0)
    assert (tmp_path / "e.safetensors.tmp").read_text() == "notes"
    assert made_by_diffsolve(tmp_path / "e.safetensors")
    assert (tmp_path / "e.safetensors").stat().st_mode & 0o777 == file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "e.safetensors.tmp"]


def test_4_ems_checkpoint_equal_to_out_is_refused(tmp_path):
    out = tmp_path / "r.safetensors"
    text = run("ems", *TINY_EMS, "--out", out, "--checkpoint", out, code=2)
    assert "--checkpoint" in text and "is the --out file" in text
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# Reproduction 5: bench --json/--plot, sweeps, tune --out
def test_5_bench_never_replaces_a_file_it_did_not_make(tmp_path):
    res, png = tmp_path / "res.json", tmp_path / "res.png"
    res.write_text("mine")
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot diffsolve's")
    before = digest(tmp_path)
    out = run(*BENCH, "--json", res, "--plot", png, code=2)
    assert "--json" in out and "diffsolve did not make it" in out and "--force" in out
    assert digest(tmp_path) == before
    run(*BENCH, "--json", res, "--plot", png, "--force", code=0)
    assert json.loads(res.read_text())["format"].startswith("diffsolve-bench")
    assert made_by_diffsolve(png) and png.stat().st_mode & 0o777 == file_mode()
    run(*BENCH, "--json", res, "--plot", png, code=0)  # its own files: replaced on a rerun
    same = run(*BENCH, "--json", res, "--plot", res, code=2)
    assert "both name" in same
    sweep = ["bench", "--sweep", "teleport", "--model", "gaussian", "--nfe", "5"]
    sweep += ["--samples", "4", "--reference-steps", "50", "--solvers", "ddim", "--skips", "0,0.2"]
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    run(*sweep, "--json", notes, code=2)
    assert notes.read_text() == "{}"
    run(*sweep, "--json", tmp_path / "sweep.json", code=0)
    assert json.loads((tmp_path / "sweep.json").read_text())["format"].startswith("diffsolve")


def _failing_replace(monkeypatch) -> None:
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.os, "replace", full)


def test_5b_sweeps_and_tune_write_through_a_temporary_file(tmp_path, monkeypatch):
    """A write that fails (a full disk) leaves the old file as it was and no temporary
    file: sweeps and tune used to write in place."""
    sweep = tmp_path / "sweep.json"
    args = ["bench", "--sweep", "teleport", "--model", "gaussian", "--nfe", "5", "--samples"]
    args += ["4", "--reference-steps", "50", "--solvers", "ddim", "--skips", "0", "--json", sweep]
    run(*args, code=0)
    schedule = tmp_path / "schedule.json"
    tune = ["tune", "--model", "gaussian", "--solver", "ddim", "--nfe", "3", "--trajectories"]
    tune += ["4", "--candidates", "6", "--teacher-steps", "20", "--out", schedule]
    run(*tune, code=0)
    before = digest(tmp_path)
    _failing_replace(monkeypatch)
    assert "No space left" in run(*args, code=1)
    assert "No space left" in run(*tune, "--force", code=1)
    assert digest(tmp_path) == before


# ---------------------------------------------------------------------------------------
# Reproduction 6: one temporary-file name for every writer
def _writers(tmp_path: Path) -> dict[str, object]:
    from diffsolve.app.bench.report import save_figure, write_json
    from diffsolve.app.files import save_npz_atomic
    from diffsolve.app.images import save_grid
    from diffsolve.app.loader import load_model
    from diffsolve.ode.step_schedule import StepSchedule
    from diffsolve.stats.ems.compute import _save_checkpoint
    from diffsolve.stats.gaussian import compute_gaussian_stats

    stats = compute_gaussian_stats(torch.randn(32, 1, 2, 2, dtype=torch.float64))
    ems = load_model("gaussian").ems_path

    def figure(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        save_figure(plt.figure(), path)

    schedule = StepSchedule((1.0, 0.5, 0.0), "ddim", 2, "dp", {"kind": "vp_linear"})
    return {
        "ems.safetensors": lambda p: diffsolve.load_ems(ems).save(p),
        "ck.partial": lambda p: _save_checkpoint(p, {}, {}, set()),
        "stats.safetensors": stats.save,
        "grid.png": lambda p: save_grid(torch.zeros(2, 1, 4, 4), p),
        "plot.png": figure,
        "bench.json": lambda p: write_json({"ok": True}, p),
        "schedule.json": schedule.save,
        "samples.npz": lambda p: save_npz_atomic(p, x=np.zeros(2)),
        "copied.safetensors": lambda p: writer.copy_atomic(ems, p),  # save_pretrained's
    }


def test_6_every_writer_uses_the_one_temporary_name(tmp_path, monkeypatch):
    replaced: list[tuple[str, str]] = []
    real = os.replace

    def record(src, dst):
        replaced.append((str(src), str(dst)))
        real(src, dst)

    monkeypatch.setattr(writer.os, "replace", record)
    for name, write in _writers(tmp_path).items():
        target = tmp_path / name
        write(target)  # type: ignore[operator]
        assert replaced and replaced[-1][1] == str(target), name
        tmp = Path(replaced[-1][0])
        assert tmp.parent == tmp_path and re.fullmatch(
            rf"\.{re.escape(name)}\.diffsolve-\w+\.tmp", tmp.name
        ), (name, tmp.name)
        assert target.stat().st_mode & 0o777 == file_mode(), name
    assert not writer.stale_temp_files(tmp_path)


def test_6b_a_killed_writer_s_temporary_file_is_recognised_and_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torn = tmp_path / ".g.safetensors.diffsolve-k1ll3d.tmp"
    torn.write_bytes(b"half a file")
    users = tmp_path / ".g.safetensors.tmp"
    users.write_text("mine")
    assert writer.stale_temp_files(tmp_path) == [torn]
    run("gaussian-stats", "--model", "gaussian", "--out", "g.safetensors", code=0)
    assert not torn.exists() and users.read_text() == "mine"


# ---------------------------------------------------------------------------------------
# Writes into the installed package; file modes
@pytest.mark.parametrize(
    "args",
    [
        ["sample", *GAUSSIAN, "--seeds", "0", "--out", PACKAGE / "demos" / "digits" / "x"],
        [*BENCH, "--json", PACKAGE / "bench.json"],
        [*BENCH, "--plot", PACKAGE / "demos" / "bench.png"],
        ["ems", *TINY_EMS, "--out", "e.safetensors", "--checkpoint", PACKAGE / "ck.partial"],
        ["gaussian-stats", "--model", "gaussian", "--out", PACKAGE / "g.safetensors"],
        ["tune", "--model", "gaussian", "--out", PACKAGE / "demos" / "gaussian" / "s.json"],
    ],
)
def test_7_nothing_is_written_inside_the_installed_package(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = digest(PACKAGE / "demos")
    out = run(*args, code=2)
    assert "inside the installed diffsolve package" in out
    assert digest(PACKAGE / "demos") == before
    assert not list(PACKAGE.glob("*.json")) and not list(PACKAGE.glob("*.partial"))
    assert not list(tmp_path.iterdir())


def test_7b_merge_refuses_the_package():
    from diffsolve.app.scale import SamplingError, merge_shards

    with pytest.raises(SamplingError):
        merge_shards(demo_path("digits"))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_8_files_honour_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        run("gaussian-stats", "--model", "gaussian", "--out", "g.safetensors", code=0)
        run(*BENCH, "--json", "b.json", "--plot", "b.png", code=0)
        run("sample", *GAUSSIAN, "--seeds", "0-1", "--out", "run", code=0)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("g.safetensors", "b.json", "b.png", "run/samples.npz", "run/grid.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# ---------------------------------------------------------------------------------------
# The rule itself
def test_check_output_rules(tmp_path):
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"format": "diffsolve-bench-1"}))
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"format": "theirs"}))
    assert check_output(own, "--json") == own
    with pytest.raises(ValueError, match="diffsolve did not make it"):
        check_output(users, "--json")
    assert check_output(users, "--json", force=True) == users
    with pytest.raises(ValueError, match="exists; pass --force"):
        check_output(own, "--out", replace_own=False)
    with pytest.raises(ValueError, match="is a folder"):
        check_output(tmp_path, "--out", force=True)
    with pytest.raises(ValueError, match="inside the installed"):
        check_output(PACKAGE / "x.json", "--json", force=True)
    link = tmp_path / "link"
    link.symlink_to(PACKAGE)
    with pytest.raises(ValueError, match="inside the installed"):
        check_output(link / "x.json", "--json")


@pytest.mark.parametrize(
    ("content", "own"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, False),
        (b'{"format": "diffsolve-step-schedule-1"}', True),
        (b'{"format": "other"}', False),
        (b"[1, 2]", False),
        (b"\xff\xfe garbage", False),
        (b"", False),
    ],
)
def test_made_by_diffsolve_reads_markers_only(tmp_path, content, own):
    path = tmp_path / "f"
    path.write_bytes(content)
    assert made_by_diffsolve(path) is own
    assert made_by_diffsolve(demo_path("gaussian") / "ems.safetensors")
    assert not made_by_diffsolve(demo_path("digits") / "model.safetensors")


# ---------------------------------------------------------------------------------------
# README "Guarantees": the process count does not change a sample
def test_two_processes_give_the_same_bits_as_one(tmp_path):
    """At one thread per process (torchrun's default) the samples of a 2-rank run equal a
    single process's bit for bit: a shard's batches do not depend on the ranks."""
    import subprocess
    import sys

    args = ["sample", "--model", "digits", "--solver", "unipc-bh2-3", "--nfe", "4"]
    args += ["--seeds", "0-9", "--shard-size", "4", "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launch, "--nproc_per_node", "2", "-m", "diffsolve", *args]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run(*args, "--out", tmp_path / "one", code=0)  # this process: one thread (single_thread)
    one, two = (np.load(tmp_path / name / "samples.npz") for name in ("one", "two"))
    with one, two:
        assert np.array_equal(one["samples"], two["samples"])
