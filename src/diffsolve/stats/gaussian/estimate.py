r"""Gaussian statistics of a data set — mean and top principal components — for analytic
teleportation (:mod:`diffsolve.wrappers.teleport`) and the Gaussian oracle.

The statistics must live in **the model's input space** (``reference/accelerations.md`` §1):
pixels in the range the network was trained on (e.g. [-1, 1], not [0, 1]), or scaled VAE
latents for a latent model. :func:`compute_gaussian_stats` streams over batches in float64:

* ``method="exact"`` — one pass accumulating the mean and the scatter matrix with Chan et
  al.'s pairwise update (:math:`M = M_a + M_b + \delta\delta^\top n_a n_b/n`), then a full
  symmetric eigendecomposition of the :math:`D\times D` covariance. For ``D`` up to
  :data:`MAX_EXACT_DIM` (CIFAR-10's 3,072 included).
* ``method="randomized"`` — randomized subspace iteration (Halko, Martinsson & Tropp 2011,
  "Finding Structure with Randomness", SIAM Review 53(2), Alg. 4.4 and 5.3) on the covariance
  :math:`C = X_c^\top X_c/(n-1)`, applied as :math:`CQ = \sum_b X_{c,b}^\top(X_{c,b}Q)/(n-1)`
  batch by batch, never forming :math:`C`: sketch :math:`Y = C\Omega` with
  :math:`k = r + p` Gaussian columns, ``power_iterations`` rounds of
  :math:`Q \leftarrow \mathrm{qr}(CQ)`, then the eigenpairs of :math:`Q^\top C Q`. It needs
  ``3 + power_iterations`` passes over the data, so the data must be re-iterable (a tensor,
  a list, a ``DataLoader``, or a callable returning a fresh iterable).

The covariance is normalised by :math:`n - 1`, as :meth:`GaussianModel.fit` does.

Files are safetensors with float64 tensors ``mean`` (data shape), ``eigvals`` ``(r,)`` and
``eigvecs`` ``(D, r)`` and string metadata: ``format`` (``diffsolve.gaussian_stats``),
``version``, ``data_shape`` (JSON list), ``rank``, ``num_samples``, ``fingerprint`` (see
:func:`data_fingerprint`), ``method`` and a free-text ``description``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffsolve.stats.gaussian.analytic import GaussianModel

__all__ = [
    "FORMAT",
    "MAX_EXACT_DIM",
    "GaussianStats",
    "check_stats",
    "compute_gaussian_stats",
    "data_fingerprint",
    "load_gaussian_stats",
    "read_gaussian_stats",
    "save_gaussian_stats",
]

FORMAT = "diffsolve.gaussian_stats"
VERSION = "1"
#: Largest data dimension for which ``method="auto"`` builds the full covariance.
MAX_EXACT_DIM = 4096

_F64 = torch.float64
DataSource = Tensor | Iterable[Any] | Callable[[], Iterable[Any]]


@dataclass(frozen=True)
class GaussianStats:
    """Mean and top-``rank`` eigenpairs of a data set's covariance, with provenance.

    Attributes:
        mean: :math:`\\mu`, float64, shaped like one sample.
        eigvals: :math:`\\lambda_1 \\ge \\dots \\ge \\lambda_r \\ge 0`, float64 ``(r,)``.
        eigvecs: Orthonormal :math:`U`, float64 ``(D, r)``.
        num_samples: Number of samples the statistics were computed from.
        fingerprint: :func:`data_fingerprint` of those samples.
        method: ``"exact"`` or ``"randomized"``.
        description: Free text (what data, which space, which scaling).
    """

    mean: Tensor
    eigvals: Tensor
    eigvecs: Tensor
    num_samples: int
    fingerprint: str
    method: str
    description: str = ""

    def __post_init__(self) -> None:
        check_stats(self.mean, self.eigvals, self.eigvecs, tuple(self.mean.shape))

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.mean.shape)

    @property
    def rank(self) -> int:
        """Number of principal components kept."""
        return int(self.eigvals.numel())

    def model(self) -> GaussianModel:
        """The Gaussian data model :math:`\\mathcal N(\\mu, U\\Lambda U^\\top)`."""
        return GaussianModel(self.mean, self.eigvals, self.eigvecs)

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (see the module docstring)."""
        save_gaussian_stats(self, path)


def check_stats(mean: Tensor, eigvals: Tensor, eigvecs: Tensor, shape: tuple[int, ...]) -> None:
    """Raise a one-line ``ValueError`` unless the statistics are valid: consistent shapes
    for data of ``shape``, a finite mean and eigenpairs, eigenvalues >= 0."""
    dim, rank = math.prod(shape), eigvals.numel()
    if mean.numel() != dim or eigvals.ndim != 1 or tuple(eigvecs.shape) != (dim, rank):
        raise ValueError(
            f"inconsistent tensors of Gaussian statistics for data shape {shape}: mean "
            f"{tuple(mean.shape)}, eigvals {tuple(eigvals.shape)}, eigvecs "
            f"{tuple(eigvecs.shape)} (expected ({dim}, {rank}))"
        )
    for name, tensor in (("mean", mean), ("eigvals", eigvals), ("eigvecs", eigvecs)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"invalid Gaussian statistics: {name} contains NaN or inf (were they computed "
                "from data with NaN or inf?); recompute them from finite data"
            )
    if rank and float(eigvals.min()) < 0:
        raise ValueError(
            f"invalid Gaussian statistics: negative eigenvalue {float(eigvals.min()):.3g} "
            "(a covariance has eigenvalues >= 0); recompute them"
        )


# ---- streaming over batches -------------------------------------------------------------
def _first_tensor(item: Any) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    raise ValueError(
        f"data batches must be tensors (N, *sample_shape) or tuples whose first item is one, "
        f"got {type(item).__name__}"
    )


def _batches(data: DataSource, batch_size: int) -> Iterator[Tensor]:
    """Yield float64 CPU batches ``(n, D)``-ready tensors ``(n, *shape)``."""
    if isinstance(data, Tensor):
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(
                f"data must have shape (N, *sample_shape) with N >= 1, got {tuple(data.shape)}"
            )
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
        return
    source = data() if callable(data) else data
    for item in source:
        batch = _first_tensor(item)
        if batch.ndim < 2:
            raise ValueError(
                f"each batch must have shape (n, *sample_shape), got {tuple(batch.shape)}"
            )
        yield batch


class _Pass:
    """One pass over the data, checking that every batch has the same sample shape."""

    def __init__(self, data: DataSource, batch_size: int, shape: tuple[int, ...] | None) -> None:
        self.data, self.batch_size, self.shape = data, batch_size, shape

    def __iter__(self) -> Iterator[Tensor]:
        for batch in _batches(self.data, self.batch_size):
            shape = tuple(batch.shape[1:])
            if self.shape is None:
                self.shape = shape
            elif shape != self.shape:
                raise ValueError(
                    f"all batches must have the same sample shape; got {shape} after {self.shape}"
                )
            yield batch.detach()


def _hash_update(hasher: Any, batch: Tensor) -> None:
    hasher.update(batch.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def data_fingerprint(data: DataSource, batch_size: int = 4096) -> str:
    """SHA-256 (first 16 hex digits) of the sample shape and the samples' float32 values in
    iteration order; independent of how the samples are split into batches."""
    hasher = hashlib.sha256()
    shape: tuple[int, ...] | None = None
    for batch in _Pass(data, batch_size, None):
        if shape is None:
            shape = tuple(batch.shape[1:])
            hasher.update(json.dumps(list(shape)).encode())
        _hash_update(hasher, batch)
    return hasher.hexdigest()[:16]


# ---- computation --------------------------------------------------------------------------
def compute_gaussian_stats(
    data: DataSource,
    rank: int | None = None,
    *,
    method: Literal["auto", "exact", "randomized"] = "auto",
    batch_size: int = 1024,
    oversample: int = 10,
    power_iterations: int = 4,
    seed: int = 0,
    description: str = "",
) -> GaussianStats:
    """Mean and top-``rank`` principal components of ``data``, in float64.

    Args:
        data: A tensor ``(N, *sample_shape)``, an iterable of batches (tensors, or tuples
            whose first item is the batch, e.g. a ``DataLoader`` of ``(x, y)``), or a
            callable returning such an iterable. ``method="randomized"`` needs several
            passes, so a one-shot iterator (a generator) is accepted only by ``"exact"``.
        rank: Components to keep; ``None`` keeps all ``D`` (exact method only).
        method: ``"exact"`` (full covariance, ``D <= MAX_EXACT_DIM`` advised), ``"randomized"``
            (subspace iteration, for large ``D``) or ``"auto"`` (exact when
            ``D <= MAX_EXACT_DIM`` or ``rank`` is ``None``).
        batch_size: Batch size used to split a tensor ``data``.
        oversample: Extra sketch columns ``p`` of the randomized method.
        power_iterations: Subspace iterations ``q`` of the randomized method (each sharpens
            the spectrum gap by :math:`(\\lambda_{k+1}/\\lambda_r)^2`; 4 is plenty for image
            data).
        seed: Seed of the random sketch.
        description: Free text stored with the statistics.

    Returns:
        A :class:`GaussianStats`; ``.model()`` gives the :class:`GaussianModel`, ``.save(path)``
        writes it.
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be one of ['auto', 'exact', 'randomized'], got {method!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("oversample", oversample, 0),
        ("power_iterations", power_iterations, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    mean, count, shape, fingerprint, scatter = _first_pass(
        data, batch_size, need_scatter=method != "randomized", allow_switch=method == "auto"
    )
    dim = math.prod(shape)
    if rank is not None and rank > dim:
        raise ValueError(f"rank must be <= the data dimension D = {dim}, got {rank}")
    if method == "auto":
        method = "exact" if scatter is not None else "randomized"
    if method == "randomized" and rank is None:
        raise ValueError(
            f"rank is required for the randomized method (data dimension D = {dim}); "
            "pass rank=r, or method='exact'"
        )
    denom = max(count - 1, 1)
    if method == "exact":
        assert scatter is not None
        eigvals, eigvecs = _top_eigh(scatter / denom, rank or dim)
    else:
        assert rank is not None
        eigvals, eigvecs = _randomized_eigh(
            data, batch_size, shape, mean, denom, rank, oversample, power_iterations, seed
        )
    return GaussianStats(
        mean=mean.reshape(shape),
        eigvals=eigvals,
        eigvecs=eigvecs,
        num_samples=count,
        fingerprint=fingerprint,
        method=method,
        description=description,
    )


def _first_pass(
    data: DataSource, batch_size: int, need_scatter: bool, allow_switch: bool
) -> tuple[Tensor, int, tuple[int, ...], str, Tensor | None]:
    """Mean, count, sample shape, fingerprint and (if wanted) the centred scatter matrix."""
    hasher = hashlib.sha256()
    count, mean, scatter = 0, None, None
    passes = _Pass(data, batch_size, None)
    for batch in passes:
        if mean is None:
            hasher.update(json.dumps(list(passes.shape or ())).encode())
            dim = batch[0].numel()
            mean = torch.zeros(dim, dtype=_F64)
            if allow_switch and dim > MAX_EXACT_DIM:
                need_scatter = False
            if need_scatter:
                scatter = torch.zeros(dim, dim, dtype=_F64)
        _hash_update(hasher, batch)
        x = batch.to("cpu", _F64).flatten(1)
        n_b = x.shape[0]
        if n_b == 0:
            continue
        _check_finite_batch(x, count)
        mean_b = x.mean(0)
        total = count + n_b
        delta = mean_b - mean
        if scatter is not None:  # Chan et al.: M = M_a + M_b + delta delta^T n_a n_b / n
            centred = x - mean_b
            scatter += centred.T @ centred
            scatter += torch.outer(delta, delta) * (count * n_b / total)
        mean += delta * (n_b / total)
        count = total
    if mean is None or count == 0:
        raise ValueError("data is empty: no samples to compute statistics from")
    assert passes.shape is not None
    return mean, count, passes.shape, hasher.hexdigest()[:16], scatter


def _check_finite_batch(x: Tensor, offset: int) -> None:
    """Refuse data with NaN or inf (``offset``: index of the batch's first sample)."""
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):
        first = offset + int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"data contains NaN or inf (first at sample {first}); Gaussian statistics need "
            "finite data: drop or fix those samples"
        )


def _top_eigh(covariance: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top ``rank`` eigenpairs of a symmetric matrix, eigenvalues descending and >= 0."""
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (covariance + covariance.T))
    order = torch.argsort(eigvals, descending=True)[:rank]
    return eigvals[order].clamp(min=0.0), eigvecs[:, order].contiguous()


def _randomized_eigh(
    data: DataSource,
    batch_size: int,
    shape: tuple[int, ...],
    mean: Tensor,
    denom: int,
    rank: int,
    oversample: int,
    power_iterations: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Randomized subspace iteration on :math:`C = X_c^\\top X_c / (n-1)` (Halko et al.)."""
    if not isinstance(data, Tensor) and not callable(data) and iter(data) is data:
        raise ValueError(
            "the randomized method passes over the data several times; pass a tensor, a "
            "re-iterable (list, DataLoader) or a callable returning a fresh iterable, not a "
            "one-shot iterator or generator"
        )
    dim = mean.numel()
    k = min(rank + oversample, dim)

    def cov_times(q: Tensor) -> Tensor:
        out = torch.zeros_like(q)
        for batch in _Pass(data, batch_size, shape):
            centred = batch.to("cpu", _F64).flatten(1) - mean
            out += centred.T @ (centred @ q)
        return out / denom

    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(cov_times(torch.randn(dim, k, generator=gen, dtype=_F64)))
    for _ in range(power_iterations):
        q, _ = torch.linalg.qr(cov_times(q))
    small = q.T @ cov_times(q)
    eigvals, vecs = _top_eigh(small, rank)
    eigvecs = q @ vecs
    # re-orthonormalise against round-off (Q V is orthonormal up to ~1e-15)
    eigvecs, r = torch.linalg.qr(eigvecs)
    eigvecs = eigvecs * torch.sign(torch.diagonal(r))
    return eigvals, eigvecs.contiguous()


# ---- files --------------------------------------------------------------------------------
def save_gaussian_stats(stats: GaussianStats, path: str | Path) -> None:
    """Write ``stats`` to a safetensors file with its metadata, atomically and with the
    umask's permissions (:func:`diffsolve.numerics.files.atomic_path`)."""
    from safetensors.torch import save_file

    from diffsolve.numerics.files import atomic_path

    try:
        check_stats(stats.mean, stats.eigvals, stats.eigvecs, stats.data_shape)
    except ValueError as err:
        raise ValueError(f"not writing {path}: {err}") from None
    tensors = {
        "mean": stats.mean.detach().to("cpu", _F64).contiguous(),
        "eigvals": stats.eigvals.detach().to("cpu", _F64).contiguous(),
        "eigvecs": stats.eigvecs.detach().to("cpu", _F64).contiguous(),
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "data_shape": json.dumps(list(stats.data_shape)),
        "rank": str(stats.rank),
        "num_samples": str(stats.num_samples),
        "fingerprint": stats.fingerprint,
        "method": stats.method,
        "description": stats.description,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_gaussian_stats(path: str | Path) -> GaussianStats:
    """Read and check a statistics file written by :func:`save_gaussian_stats`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gaussian statistics file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            tensors = {
                key: f.get_tensor(key) for key in ("mean", "eigvals", "eigvecs") if key in keys
            }
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a diffsolve Gaussian statistics file (metadata 'format' is "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    for key in ("mean", "eigvals", "eigvecs"):
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor {key!r} (has {sorted(keys)})")
    for key in ("data_shape", "num_samples", "fingerprint"):
        if key not in metadata:
            raise ValueError(f"{path}: missing metadata entry {key!r}")
    try:
        shape = tuple(int(s) for s in json.loads(metadata["data_shape"]))
        num_samples = int(metadata["num_samples"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: malformed metadata: {exc}") from exc
    mean, eigvals, eigvecs = tensors["mean"], tensors["eigvals"], tensors["eigvecs"]
    try:
        check_stats(mean, eigvals, eigvecs, shape)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    r = eigvals.numel()
    if "rank" in metadata and metadata["rank"] != str(r):
        raise ValueError(f"{path}: metadata rank {metadata['rank']} but {r} eigenvalues stored")
    return GaussianStats(
        mean=mean.to(_F64).reshape(shape),
        eigvals=eigvals.to(_F64),
        eigvecs=eigvecs.to(_F64),
        num_samples=num_samples,
        fingerprint=metadata["fingerprint"],
        method=metadata.get("method", "unknown"),
        description=metadata.get("description", ""),
    )


def load_gaussian_stats(
    path: str | Path, expect_shape: tuple[int, ...] | None = None
) -> GaussianModel:
    """Load a statistics file as a :class:`GaussianModel`.

    Args:
        path: A file written by :func:`save_gaussian_stats`.
        expect_shape: The model's sample shape; a mismatch raises a ``ValueError``.
    """
    stats = read_gaussian_stats(path)
    if expect_shape is not None and tuple(expect_shape) != stats.data_shape:
        raise ValueError(
            f"statistics were computed for data of shape {stats.data_shape}, the model takes "
            f"{tuple(expect_shape)} ({path})"
        )
    return stats.model()
