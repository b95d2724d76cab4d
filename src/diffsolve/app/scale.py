"""Sampling at scale, EDM-style: per-seed noise, seed shards, atomic files, resume, torchrun.

A run samples a list of seeds (``--seeds 0-49999``) into an output folder:

* **Per-seed noise.** Every seed has its own random generator
  (:func:`~diffsolve.app.seeds.noise_for_seeds`), and a class-conditional model gets the label
  ``seed % num_classes``; so a sample depends only on its seed, never on the batch size or the
  number of processes (as EDM's ``StackedRandomGenerator``).
* **Shards.** The sorted seeds are cut into shards of ``shard_size`` consecutive seeds; a shard
  is one ``shard-<first seed>.npz`` file holding ``samples`` (float32, ``(n, *data_shape)``)
  and ``seeds`` (int64), plus a PNG grid of its first samples. Every file is written to a
  temporary name in the folder and renamed into place (``os.replace``), so a file is either
  complete or absent; the npz is written last and marks the shard as done.
* **Processes.** Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` of ``R`` takes shards
  ``r::R``; a gloo process group only provides barriers. Without torchrun nothing is set up.
* **Manifest and resume.** ``sample.json`` records what defines the samples (model and a hash
  of its config, solver, NFE, grid kind and times, seeds, shard size, data shape). Rerunning a
  command in the same folder checks the manifest — different settings are refused with the
  list of differences — and skips every shard that validates (loadable, exactly the expected
  seeds, right shape and dtype, finite; the zip CRC catches flipped bytes); a missing, partial
  or corrupt shard is recomputed, never trusted.
* **Merge.** :func:`merge_shards` checks that the shards cover every seed of the manifest
  exactly once and writes ``samples.npz`` with all seeds sorted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsolve.app.conditioning import GuidanceSpec
from diffsolve.app.loader import LoadedModel
from diffsolve.app.seeds import noise_for_seeds, parse_seeds
from diffsolve.ode.plan import Plan, Solver

__all__ = [
    "MANIFEST_NAME",
    "MERGED_NAME",
    "Distributed",
    "RunConfig",
    "RunManifest",
    "RunReport",
    "SamplingError",
    "check_shard",
    "distributed",
    "format_seeds",
    "merge_shards",
    "run_sampling",
    "save_npz_atomic",
    "seed_shards",
    "shard_path",
]

MANIFEST_NAME = "sample.json"
MERGED_NAME = "samples.npz"
GRID_NAME = "grid.png"
MANIFEST_FORMAT = "diffsolve-sample-run/1"
GRID_SAMPLES = 64


class SamplingError(RuntimeError):
    """A run cannot go on (diverged samples, a folder that is not a run, an incomplete
    merge)."""


# ---------------------------------------------------------------------------------------
# Seeds and shards
def format_seeds(seeds: Sequence[int]) -> str:
    """Canonical text of a seed list: sorted unique seeds as ranges, e.g. ``"0-9,12"``;
    :func:`~diffsolve.app.seeds.parse_seeds` inverts it."""
    values = sorted(set(int(s) for s in seeds))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def seed_shards(seeds: Sequence[int], shard_size: int) -> list[tuple[int, ...]]:
    """Cut the sorted unique ``seeds`` into consecutive shards of ``shard_size`` (the last
    may be shorter). The shards depend only on the seeds and the size, not on the processes."""
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    values = sorted(set(int(s) for s in seeds))
    return [tuple(values[i : i + shard_size]) for i in range(0, len(values), shard_size)]


def shard_path(out_dir: str | Path, first_seed: int, suffix: str = ".npz") -> Path:
    """File of the shard starting at ``first_seed``: ``shard-00001000.npz``."""
    return Path(out_dir) / f"shard-{first_seed:08d}{suffix}"


# ---------------------------------------------------------------------------------------
# Atomic files and shard validation
def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (``mkstemp`` makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write an uncompressed ``.npz`` to a temporary file in the same folder, flush it to
    disk and rename it into place: readers see the old file, or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_shard(path: str | Path, seeds: Sequence[int], data_shape: Sequence[int]) -> str | None:
    """Why the shard file at ``path`` cannot be trusted, or ``None`` when it is valid.

    Valid means: it loads (the zip CRC verifies every byte), holds exactly ``samples`` and
    ``seeds``, the seeds equal ``seeds`` in order, the samples are float32 of shape
    ``(len(seeds), *data_shape)`` and all finite.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as data:
            if sorted(data.files) != ["samples", "seeds"]:
                return f"holds arrays {sorted(data.files)}, expected ['samples', 'seeds']"
            got_seeds, samples = data["seeds"], data["samples"]
    except Exception as err:  # any failure to read means the file is not usable
        return f"unreadable ({type(err).__name__}: {err})"
    expected = np.asarray(seeds, dtype=np.int64)
    if got_seeds.shape != expected.shape or not np.array_equal(got_seeds, expected):
        return f"holds seeds {format_seeds(got_seeds.tolist())}, expected {format_seeds(seeds)}"
    shape = (len(expected), *data_shape)
    if samples.shape != shape:
        return f"samples have shape {samples.shape}, expected {shape}"
    if samples.dtype != np.float32:
        return f"samples have dtype {samples.dtype}, expected float32"
    if not np.isfinite(samples).all():
        return "samples contain non-finite values"
    return None


# ---------------------------------------------------------------------------------------
# The manifest
@dataclass(frozen=True)
class RunManifest:
    """What defines a run's samples; stored as ``sample.json`` in the output folder.

    Attributes:
        model: Demo name or absolute model folder.
        model_config_sha256: Hash of the model's parsed config (catches another model under
            the same folder name).
        solver: Registry name.
        nfe: Model evaluations per sample actually spent.
        nfe_budget: The ``--nfe`` asked for.
        grid: Grid kind.
        grid_t: The grid's solver times.
        seeds: Canonical seed list (:func:`format_seeds`).
        num_seeds: Number of seeds.
        shard_size: Seeds per shard.
        data_shape: Shape of one sample.
        conditioning: Guidance, labels and teleportation settings (JSON).
        version: diffsolve version that wrote it (informative, not compared).
    """

    model: str
    model_config_sha256: str
    solver: str
    nfe: int
    nfe_budget: int
    grid: str
    grid_t: tuple[float, ...]
    seeds: str
    num_seeds: int
    shard_size: int
    data_shape: tuple[int, ...]
    conditioning: str = ""
    version: str = ""
    format: str = MANIFEST_FORMAT

    _INFORMATIVE = ("version",)

    def to_json(self) -> str:
        """JSON text (floats written exactly)."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a diffsolve run manifest (format {MANIFEST_FORMAT})")
        data["grid_t"] = tuple(data["grid_t"])
        data["data_shape"] = tuple(data["data_shape"])
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"malformed run manifest: {err}") from None

    def differences(self, other: RunManifest) -> list[str]:
        """The settings in which ``other`` differs (informative fields excluded)."""
        mine, theirs = asdict(self), asdict(other)
        out = []
        for key, value in mine.items():
            if key in self._INFORMATIVE or theirs[key] == value:
                continue
            if key == "grid_t":
                out.append("grid_t: the step grids differ")
            else:
                out.append(f"{key}: {value!r} in the folder, {theirs[key]!r} now")
        return out


def read_manifest(out_dir: str | Path) -> RunManifest | None:
    """The manifest in ``out_dir``, or ``None`` if there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return RunManifest.from_json(path.read_text())
    except (ValueError, KeyError) as err:
        raise SamplingError(f"{path}: {err}") from None


def check_resume(out_dir: Path, manifest: RunManifest) -> None:
    """Refuse to resume into a folder made with other settings."""
    existing = read_manifest(out_dir)
    if existing is None:
        return
    diff = existing.differences(manifest)
    if diff:
        raise ValueError(
            f"--out {out_dir} holds a run made with different settings ("
            + "; ".join(diff)
            + "); pass another --out, or delete the folder to start over"
        )


# ---------------------------------------------------------------------------------------
# Processes
@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        """Wait for every process (no-op when alone)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def device(self, device: str) -> str:
        """``cuda`` becomes ``cuda:<local rank>`` under torchrun; other devices unchanged."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device


@contextmanager
def distributed() -> Iterator[Distributed]:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (gloo: the group only provides
    barriers, so it works for CPU and GPU sampling alike); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Distributed()
        return
    if not torch.distributed.is_available():
        raise SamplingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # long timeout: ranks wait at the final barrier while the slowest finishes its shards
    torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
    try:
        yield Distributed(rank, world, local_rank)
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Sampling
@dataclass(frozen=True)
class RunConfig:
    """One ``diffsolve sample`` run.

    Attributes:
        model: Demo name or model folder.
        solver: Registry name, or ``"auto"``: :func:`~diffsolve.solvers.registry.default_solver`
            (DPM-Solver-v3 where the model ships EMS). The manifest records the resolved name.
        nfe: Model-evaluation budget.
        grid: Grid kind, or ``None`` for the solver's default.
        seeds: Seed list text (``"0-49999"``).
        out_dir: Output folder.
        batch_size: Samples per model call (does not change the samples).
        shard_size: Seeds per shard file.
        device: torch device (``cuda`` means one GPU per process under torchrun).
        merge: Write ``samples.npz`` with every seed once all shards are done.
        guidance: Guidance and thresholding (:class:`~diffsolve.wrappers.guidance.GuidanceSpec`).
        class_label: Class of every sample of a conditional model; ``None``: seed % classes.
        teleport: Share of the solver's usual grid skipped by analytic Gaussian
            teleportation (0: none), with the statistics in ``gaussian_stats`` (default: the
            model folder's ``gaussian_stats.safetensors``).
    """

    model: str = "digits"
    solver: str = "auto"
    nfe: int = 10
    grid: str | None = None
    seeds: str = "0-63"
    out_dir: str | Path = "samples"
    batch_size: int = 64
    shard_size: int = 1000
    device: str = "cpu"
    merge: bool = True
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    class_label: int | None = None
    teleport: float = 0.0
    gaussian_stats: str | None = None


@dataclass
class RunReport:
    """What one process did.

    Attributes:
        manifest: The run's manifest.
        computed: Shard files written by this process.
        skipped: Valid shard files found and kept.
        recomputed: Shard files that existed but were invalid, with the reason.
        merged: Path of ``samples.npz`` (rank 0 with ``merge``).
        grid_png: Path of the overview grid (rank 0, image data).
    """

    manifest: RunManifest
    computed: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    recomputed: dict[Path, str] = field(default_factory=dict)
    merged: Path | None = None
    grid_png: Path | None = None


class SeedSampler:
    """Samples for a list of seeds, in batches; a sample depends on its seed only."""

    def __init__(
        self,
        model: LoadedModel,
        solver: Solver,
        plan: Plan[Any],
        device: str,
        batch_size: int,
        guidance: GuidanceSpec | None = None,
        class_label: int | None = None,
    ) -> None:
        self.model, self.solver, self.plan = model, solver, plan
        self.device, self.batch_size = device, batch_size
        self.guidance = guidance or GuidanceSpec()
        self.class_label = class_label
        self.scale = model.schedule.init_noise_sigma(float(plan.grid[0]))

    def labels(self, seeds: Sequence[int]) -> Tensor | None:
        """Per-sample class labels: the fixed ``class_label`` or ``seed % num_classes``
        (classifier guidance on an unconditional model: ``seed % 10``)."""
        classes = self.model.num_classes or (10 if self.guidance.method == "classifier" else 0)
        if not classes:
            return None
        if self.class_label is not None:
            return torch.full((len(seeds),), self.class_label, device=self.device)
        return torch.tensor(list(seeds), device=self.device) % classes

    def __call__(self, seeds: Sequence[int]) -> Tensor:
        from diffsolve.ode.sampling import sample

        out = []
        for i in range(0, len(seeds), self.batch_size):
            batch = list(seeds[i : i + self.batch_size])
            x = noise_for_seeds(batch, self.model.data_shape, self.scale, self.device)
            denoiser = self.guidance.build(self.model, self.labels(batch))
            with torch.inference_mode():
                y = sample(denoiser, x, self.solver, plan=self.plan).x
            out.append(y.float().cpu())
        return torch.cat(out)


def _is_image(data_shape: Sequence[int]) -> bool:
    return len(data_shape) == 3 and data_shape[0] in (1, 3)


def _save_png(samples: np.ndarray | Tensor, path: Path) -> None:
    from diffsolve.app.images import save_grid

    save_grid(torch.as_tensor(np.asarray(samples[:GRID_SAMPLES])), path)
    os.chmod(path, _file_mode())  # save_grid's temporary file is created 0600


def run_shards(
    sampler: Callable[[Sequence[int]], Tensor],
    shards: Sequence[Sequence[int]],
    out_dir: Path,
    report: RunReport,
    *,
    on_shard: Callable[[Path], None] | None = None,
    progress: bool = False,
    desc: str = "sampling",
) -> RunReport:
    """Compute every shard whose file does not validate; keep the others.

    ``on_shard(path)`` is called after each shard file is written (tests use it to simulate
    a run killed midway).
    """
    shape = report.manifest.data_shape
    bar = _bar(sum(len(s) for s in shards), desc) if progress else None
    for seeds in shards:
        path = shard_path(out_dir, seeds[0])
        reason = check_shard(path, seeds, shape)
        if reason is None:
            report.skipped.append(path)
            png = path.with_suffix(".png")
            if _is_image(shape) and not png.is_file():
                with np.load(path) as data:
                    _save_png(data["samples"], png)
        else:
            if reason != "missing":
                report.recomputed[path] = reason
            _compute_shard(sampler, seeds, path, shape)
            report.computed.append(path)
            if on_shard is not None:
                on_shard(path)
        if bar is not None:
            bar.update(len(seeds))
    if bar is not None:
        bar.close()
    return report


def _compute_shard(
    sampler: Callable[[Sequence[int]], Tensor],
    seeds: Sequence[int],
    path: Path,
    shape: Sequence[int],
) -> None:
    samples = sampler(seeds).numpy().astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        finite = np.isfinite(samples).reshape(len(seeds), -1).all(1)
        bad = [s for s, ok in zip(seeds, finite, strict=True) if not ok]
        raise SamplingError(
            f"seeds {format_seeds(bad)} gave non-finite samples: the solver diverged (try more "
            "NFE or another solver); finished shards are kept"
        )
    if _is_image(shape):
        _save_png(samples, path.with_suffix(".png"))
    save_npz_atomic(path, samples=samples, seeds=np.asarray(seeds, dtype=np.int64))


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def model_config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a model config (sorted JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def run_sampling(
    config: RunConfig,
    dist: Distributed | None = None,
    *,
    on_shard: Callable[[Path], None] | None = None,
    progress: bool = False,
) -> RunReport:
    """Sample ``config.seeds`` into ``config.out_dir`` as this process's share of the run.

    All processes check the folder's manifest (a different one raises ``ValueError``); rank 0
    writes it and removes temporary files left by a killed run; then every process computes
    its shards ``rank::world_size``; after a barrier rank 0 merges (``config.merge``) and draws
    ``grid.png``. Raises ``ValueError`` for bad settings, :class:`SamplingError` when the
    run cannot go on.
    """
    from diffsolve.app.loader import load_model

    dist = dist or Distributed()
    seeds = parse_seeds(config.seeds)
    shards = seed_shards(seeds, config.shard_size)
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {config.batch_size!r}")
    device = dist.device(config.device)
    model = load_model(config.model, device=device)
    config, method, grid = resolve_method(config, model)
    plan = method.plan(model.schedule, grid)
    classes = model.num_classes or 10
    if config.class_label is not None and not 0 <= config.class_label < classes:
        raise ValueError(f"class_label must lie in [0, {classes - 1}], got {config.class_label}")
    manifest = run_manifest(config, model, plan, seeds)
    out_dir = Path(config.out_dir)
    _prepare_folder(out_dir, manifest, dist)
    report = RunReport(manifest)
    sampler = SeedSampler(
        model, method, plan, device, config.batch_size, config.guidance, config.class_label
    )
    run_shards(
        sampler,
        shards[dist.rank :: dist.world_size],
        out_dir,
        report,
        on_shard=on_shard,
        progress=progress and dist.rank == 0,
        desc="sampling" if dist.world_size == 1 else f"rank 0 of {dist.world_size}",
    )
    dist.barrier()
    if dist.rank == 0:
        if config.merge:
            report.merged = merge_shards(out_dir)
        if _is_image(manifest.data_shape):
            report.grid_png = _overview(out_dir, shards, manifest)
    return report


def resolve_method(config: RunConfig, model: LoadedModel) -> tuple[RunConfig, Solver, Tensor]:
    """The solver and grid of a run: ``solver="auto"`` resolved (the manifest records the
    name), what it needs from the model loaded once, teleportation wrapped around it."""
    from diffsolve.solvers import registry
    from diffsolve.wrappers.teleport import teleported_setup

    if config.solver == "auto":
        config = replace(config, solver=registry.default_solver(model.available()))
    needs = set(registry.preset(config.solver).needs)
    if config.teleport:
        needs.add("gaussian")
    context = model.solver_context(needs, config.gaussian_stats)
    if config.teleport:
        method, grid = teleported_setup(
            config.solver, model.schedule, config.nfe, config.teleport, config.grid, context
        )
    else:
        method, grid = registry.setup_solver(
            config.solver, model.schedule, config.nfe, config.grid, context=context
        )
    return config, method, grid


def run_manifest(
    config: RunConfig, model: LoadedModel, plan: Plan[Any], seeds: Sequence[int]
) -> RunManifest:
    """What defines the run's samples (see :class:`RunManifest`)."""
    from diffsolve import __version__
    from diffsolve.app.loader import DEMO_MODELS
    from diffsolve.solvers.registry import preset

    model_id = config.model
    if model_id not in DEMO_MODELS:
        model_id = str(Path(model_id).resolve())
    conditioning = {
        "guidance": asdict(config.guidance),
        "class_label": config.class_label,
        "teleport": config.teleport,
    }
    return RunManifest(
        model=model_id,
        model_config_sha256=model_config_hash(model.config),
        solver=config.solver,
        nfe=int(plan.nfe or 0),
        nfe_budget=config.nfe,
        grid=config.grid or preset(config.solver).grid_kind(config.nfe),
        grid_t=tuple(float(t) for t in plan.grid),
        seeds=format_seeds(seeds),
        num_seeds=len(seeds),
        shard_size=config.shard_size,
        data_shape=tuple(model.data_shape),
        conditioning=json.dumps(conditioning, sort_keys=True),
        version=__version__,
    )


def _prepare_folder(out_dir: Path, manifest: RunManifest, dist: Distributed) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    check_resume(out_dir, manifest)  # every rank: they all fail alike, none hangs
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # left by a killed run; nobody writes yet
            stale.unlink(missing_ok=True)
        if read_manifest(out_dir) is None:
            _write_text_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
    dist.barrier()


def _overview(out_dir: Path, shards: Sequence[Sequence[int]], manifest: RunManifest) -> Path:
    """``grid.png``: the first samples of the run, by seed."""
    parts, count = [], 0
    for seeds in shards:
        if count >= GRID_SAMPLES:
            break
        with np.load(shard_path(out_dir, seeds[0])) as data:
            parts.append(data["samples"][: GRID_SAMPLES - count])
        count += len(parts[-1])
    path = out_dir / GRID_NAME
    _save_png(np.concatenate(parts), path)
    return path


# ---------------------------------------------------------------------------------------
def merge_shards(out_dir: str | Path, name: str = MERGED_NAME) -> Path:
    """Merge a run's shards into one ``.npz`` with every seed of the manifest, sorted.

    Every expected shard must validate (:func:`check_shard`), no other shard file may be
    present, and the merged seeds must equal the manifest's exactly: none missing, none
    duplicated. Raises :class:`SamplingError` listing what is wrong otherwise.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise SamplingError(f"{out_dir} has no {MANIFEST_NAME}: not a diffsolve sample folder")
    seeds = parse_seeds(manifest.seeds)
    shards = seed_shards(seeds, manifest.shard_size)
    expected = {shard_path(out_dir, s[0]).name for s in shards}
    stray = sorted(p.name for p in out_dir.glob("shard-*.npz") if p.name not in expected)
    problems = [f"{n}: not a shard of this run" for n in stray]
    missing: list[int] = []
    for shard in shards:
        reason = check_shard(shard_path(out_dir, shard[0]), shard, manifest.data_shape)
        if reason == "missing":
            missing.extend(shard)
        elif reason is not None:
            problems.append(f"{shard_path(out_dir, shard[0]).name}: {reason}")
    if missing:
        problems.insert(0, f"seeds {format_seeds(missing)} have no shard yet (rerun the command)")
    if problems:
        raise SamplingError(f"cannot merge {out_dir}: " + "; ".join(problems))
    samples, merged = [], []
    for shard in shards:
        with np.load(shard_path(out_dir, shard[0])) as data:
            samples.append(data["samples"])
            merged.append(data["seeds"])
    all_seeds = np.concatenate(merged)
    if np.unique(all_seeds).size != all_seeds.size or all_seeds.tolist() != seeds:
        raise SamplingError(f"cannot merge {out_dir}: the shards' seeds do not match the manifest")
    return save_npz_atomic(out_dir / name, samples=np.concatenate(samples), seeds=all_seeds)
