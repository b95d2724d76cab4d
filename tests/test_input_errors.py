"""Bad input files, devices and tune budgets end in one-line errors naming the fix, never a
traceback (issue 24's reproductions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffsolve.app.cli import main
from diffsolve.app.model_data import load_array
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
