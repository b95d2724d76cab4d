"""Gaussian statistics of a data set: exact and randomized PCA, streaming, files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from diffsolve import GaussianModel
from diffsolve.stats.gaussian.estimate import (
    FORMAT,
    compute_gaussian_stats,
    data_fingerprint,
    load_gaussian_stats,
    read_gaussian_stats,
    save_gaussian_stats,
)


def low_rank_data(n: int = 600, shape=(3, 10, 10), rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Samples with a decaying spectrum of ``rank`` strong directions plus weak noise."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    scales = 3.0 * 0.7 ** torch.arange(rank, dtype=torch.float64)
    coords = torch.randn(n, rank, generator=g, dtype=torch.float64) * scales
    noise = 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (0.3 + coords @ basis.T + noise).reshape(n, *shape).float()


def test_exact_streaming_equals_a_direct_fit():
    data = GaussianModel.random((2, 3, 3), seed=1).sample(500, torch.Generator().manual_seed(0))
    direct = GaussianModel.fit(data)
    batches = [data[:7], data[7:300], data[300:]]
    for source in (data, batches, (b for b in batches), lambda: iter(batches)):
        stats = compute_gaussian_stats(source, batch_size=64)
        assert stats.method == "exact" and stats.num_samples == 500
        assert stats.data_shape == (2, 3, 3) and stats.rank == 18
        torch.testing.assert_close(stats.mean.flatten(), direct.mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(stats.eigvals, direct.eigvals.flip(0).sort(descending=True)[0])
        cov = (stats.eigvecs * stats.eigvals) @ stats.eigvecs.T
        torch.testing.assert_close(cov, direct.covariance(), atol=1e-12, rtol=0)
    top = compute_gaussian_stats(data, rank=4)
    assert top.rank == 4 and bool((top.eigvals[:-1] >= top.eigvals[1:]).all())
    # (x, y) batches, as a DataLoader of a labelled data set yields them
    labelled = compute_gaussian_stats([(data[:250], 0), (data[250:], 1)], rank=4)
    torch.testing.assert_close(labelled.eigvals, top.eigvals)


def test_randomized_pca_matches_the_exact_top_eigenpairs():
    data = low_rank_data()
    exact = compute_gaussian_stats(data, rank=8, method="exact")
    for source in (data, list(data.split(128))):
        fast = compute_gaussian_stats(source, rank=8, method="randomized", batch_size=100)
        assert fast.method == "randomized"
        torch.testing.assert_close(fast.eigvals, exact.eigvals, rtol=1e-8, atol=0)
        overlap = torch.linalg.svdvals(fast.eigvecs.T @ exact.eigvecs)
        assert float(overlap.min()) > 1 - 1e-8
        gram = fast.eigvecs.T @ fast.eigvecs
        torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
        fast.model()  # a valid GaussianModel (orthonormal columns, eigenvalues >= 0)
    # "auto" switches to the randomized method above MAX_EXACT_DIM (patched low here)
    import diffsolve.stats.gaussian.estimate as gs

    old, gs.MAX_EXACT_DIM = gs.MAX_EXACT_DIM, 100
    try:
        assert compute_gaussian_stats(data, rank=8).method == "randomized"
        with pytest.raises(ValueError, match="rank is required"):
            compute_gaussian_stats(data)
    finally:
        gs.MAX_EXACT_DIM = old


def test_save_load_roundtrip_and_metadata(tmp_path):
    data = low_rank_data(n=200, shape=(1, 8, 8))
    stats = compute_gaussian_stats(data, rank=10, description="digits-like, [-1, 1] pixels")
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = read_gaussian_stats(path)
    assert (back.data_shape, back.rank, back.num_samples) == ((1, 8, 8), 10, 200)
    assert back.fingerprint == stats.fingerprint == data_fingerprint(data)
    assert back.description == "digits-like, [-1, 1] pixels" and back.method == "exact"
    model = load_gaussian_stats(path, expect_shape=(1, 8, 8))
    assert isinstance(model, GaussianModel) and model.shape == (1, 8, 8)
    torch.testing.assert_close(model.eigvecs, stats.eigvecs, atol=0, rtol=0)
    with pytest.raises(
        ValueError,
        match=r"statistics were computed for data of shape \(1, 8, 8\), "
        r"the model takes \(3, 32, 32\)",
    ):
        load_gaussian_stats(path, expect_shape=(3, 32, 32))


def test_bad_files_give_clear_errors(tmp_path):
    stats = compute_gaussian_stats(low_rank_data(n=50, shape=(4, 4), rank=4), rank=3)
    good = tmp_path / "good.safetensors"
    save_gaussian_stats(stats, good)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gaussian_stats(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gaussian_stats(garbage)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gaussian_stats(tmp_path / "missing.safetensors")

    meta = {"format": FORMAT, "data_shape": json.dumps([4, 4]), "num_samples": "50"}
    meta["fingerprint"] = "x"
    partial = tmp_path / "partial.safetensors"
    save_file({"mean": stats.mean, "eigvals": stats.eigvals}, str(partial), metadata=meta)
    with pytest.raises(ValueError, match="missing tensor 'eigvecs'"):
        load_gaussian_stats(partial)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a diffsolve Gaussian statistics file"):
        load_gaussian_stats(foreign)
    wrong = tmp_path / "wrong.safetensors"
    tensors = {"mean": stats.mean, "eigvals": stats.eigvals, "eigvecs": stats.eigvecs}
    save_file(tensors, str(wrong), metadata={**meta, "data_shape": "[5, 5]"})
    with pytest.raises(ValueError, match="inconsistent tensors"):
        load_gaussian_stats(wrong)


def test_fingerprint_ignores_batching_and_sees_the_data():
    data = low_rank_data(n=64, shape=(2, 4), rank=4)
    assert data_fingerprint(data) == data_fingerprint(list(data.split(5)))
    assert data_fingerprint(data) != data_fingerprint(data[:-1])
    assert data_fingerprint(data) != data_fingerprint(data + 1e-3)


def test_argument_validation():
    data = low_rank_data(n=20, shape=(2, 3), rank=4)
    cases = [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 7}, "rank must be <= the data dimension D = 6"),
        ({"method": "svd"}, "method must be one of"),
        ({"power_iterations": -1}, "power_iterations must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            compute_gaussian_stats(data, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        compute_gaussian_stats([])
    with pytest.raises(ValueError, match="same sample shape"):
        compute_gaussian_stats([data, torch.zeros(3, 3, 2)])
    with pytest.raises(ValueError, match="one-shot iterator"):
        compute_gaussian_stats((b for b in data.split(5)), rank=2, method="randomized")
    with pytest.raises(ValueError, match="must be tensors"):
        compute_gaussian_stats(["not a tensor"])
