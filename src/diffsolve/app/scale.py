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
* **Manifest and resume.** ``sample.json`` records everything that defines the samples: the
  model and the SHA-256 of its config and weights, of the statistics the run uses (EMS,
  Gaussian statistics), of a step schedule file (``--schedule``, or the tuned one kept with
  the model, :mod:`diffsolve.app.schedules`) and of a guidance classifier, the resolved solver
  with its options, the NFE, grid kind and times, guidance, labels, teleportation, dtype,
  batch size, shard size and seeds; its :meth:`~RunManifest.fingerprint` (everything but the
  seeds) is stored in every shard too. Rerunning a command in the same folder checks the
  manifest — other settings are refused with the list of differences; more seeds (a superset)
  extend the run — and skips every shard that validates (loadable, exactly the expected seeds,
  right shape and dtype, finite, the run's fingerprint; the zip CRC catches flipped bytes); a
  missing, partial, corrupt or foreign shard is recomputed, never trusted. The manifest is
  written only once every input of the run has been checked, so a refused start leaves nothing
  behind.
* **One writer.** A run holds an exclusive lock on ``.diffsolve-sample.lock`` in the folder
  for its whole life (released however the process ends); a second run into the same folder
  is refused with a message. Temporary files are named ``.<file>.diffsolve-<random>.tmp``, and
  only such files, left by a killed run, are ever removed.
* **Only its own files.** The manifest lists the files of its run (:meth:`RunManifest.files`:
  itself, ``samples.npz``, ``grid.png``, the shards of its seeds); only those are ever
  replaced. A folder without a manifest that already holds files a run would write, and a
  folder whose shard files its manifest does not list (or that another run made), are refused
  before anything is computed, naming the files (:func:`check_folder`); nothing is written
  inside the installed package.
* **Merge.** :func:`merge_shards` checks that the shards cover every seed of the manifest
  exactly once and writes ``samples.npz`` with all seeds sorted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
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
from diffsolve.app.files import (
    file_sha256,
    inside_package,
    save_npz_atomic,
    stale_temp_files,
    write_text_atomic,
)
from diffsolve.app.images import image_samples
from diffsolve.app.loader import LoadedModel, LoadOptions
from diffsolve.app.seeds import noise_for_seeds, parse_seeds
from diffsolve.ode.plan import Plan, Solver
from diffsolve.ode.step_schedule import StepSchedule

__all__ = [
    "MANIFEST_NAME",
    "MERGED_NAME",
    "Distributed",
    "RunConfig",
    "RunManifest",
    "RunReport",
    "SamplingError",
    "check_folder",
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


class LaunchError(SamplingError, ValueError):
    """torchrun's environment is not one a run can start from (a usage error)."""


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
LOCK_NAME = ".diffsolve-sample.lock"


SHARD_ARRAYS = ["fingerprint", "samples", "seeds"]


def check_shard(
    path: str | Path,
    seeds: Sequence[int],
    data_shape: Sequence[int],
    fingerprint: str | None = None,
) -> str | None:
    """Why the shard file at ``path`` cannot be trusted, or ``None`` when it is valid.

    Valid means: it loads (the zip CRC verifies every byte), holds exactly ``samples``,
    ``seeds`` and ``fingerprint``, the fingerprint is the run's (when given: a shard made
    under other settings is never trusted), the seeds equal ``seeds`` in order, the samples
    are float32 of shape ``(len(seeds), *data_shape)`` and all finite.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as data:
            if sorted(data.files) != SHARD_ARRAYS:
                return f"holds arrays {sorted(data.files)}, expected {SHARD_ARRAYS}"
            got_seeds, samples = data["seeds"], data["samples"]
            made_under = str(data["fingerprint"])
    except Exception as err:  # any failure to read means the file is not usable
        return f"unreadable ({type(err).__name__}: {err})"
    if fingerprint is not None and made_under != fingerprint:
        return "made under other settings (its fingerprint is not this run's)"
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
        model_config_sha256: Hash of the model's parsed config.
        inputs: SHA-256 of every file the samples depend on (``weights``, ``ems``,
            ``gaussian_stats``, ``classifier``; an analytic model's own fingerprint), as JSON.
        solver: Registry name.
        solver_options: The resolved solver with all its options (its ``repr``).
        nfe: Model evaluations per sample actually spent.
        nfe_budget: The ``--nfe`` asked for.
        grid: Grid kind.
        grid_t: The grid's solver times.
        seeds: Canonical seed list (:func:`format_seeds`).
        num_seeds: Number of seeds.
        shard_size: Seeds per shard.
        batch_size: Samples per model call (the network's floating-point reductions depend on
            it: samples agree across batch sizes to ~1e-5, not bit for bit).
        dtype: The network's dtype.
        data_shape: Shape of one sample.
        conditioning: Guidance, labels and teleportation settings (JSON).
        schedule: The step schedule file of the grid: the ``--schedule`` path, or
            ``tuned:schedules/<solver>-nfe<N>.json`` for a tuned schedule picked up from the
            model folder; ``""``: none (informative, not compared: the file's hash in
            ``inputs``, ``grid`` and ``grid_t`` are what the fingerprint covers).
        version: diffsolve version that wrote it (informative, not compared).
    """

    model: str
    model_config_sha256: str
    inputs: str
    solver: str
    solver_options: str
    nfe: int
    nfe_budget: int
    grid: str
    grid_t: tuple[float, ...]
    seeds: str
    num_seeds: int
    shard_size: int
    batch_size: int
    dtype: str
    data_shape: tuple[int, ...]
    conditioning: str = ""
    schedule: str = ""
    version: str = ""
    format: str = MANIFEST_FORMAT

    _INFORMATIVE = ("schedule", "version")
    _SEEDS = ("seeds", "num_seeds")

    def to_json(self) -> str:
        """JSON text (floats written exactly)."""
        return json.dumps({**asdict(self), "fingerprint": self.fingerprint()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a diffsolve run manifest (format {MANIFEST_FORMAT})")
        data.pop("fingerprint", None)
        try:
            data["grid_t"] = tuple(data["grid_t"])
            data["data_shape"] = tuple(data["data_shape"])
            return cls(**data)
        except (TypeError, KeyError) as err:
            raise ValueError(f"malformed run manifest: {err}") from None

    def files(self) -> list[str]:
        """The files of this run in its folder, the only ones a rerun may replace: the
        manifest, the merged samples, the overview grid, and each shard's ``.npz`` and
        ``.png``."""
        names = [MANIFEST_NAME, MERGED_NAME, GRID_NAME]
        for shard in seed_shards(parse_seeds(self.seeds), self.shard_size):
            names += [shard_path("", shard[0]).name, shard_path("", shard[0], ".png").name]
        return names

    def fingerprint(self) -> str:
        """SHA-256 of every setting but the seeds (stored in each shard: a shard made under
        other settings is never trusted)."""
        settings = {
            k: v for k, v in asdict(self).items() if k not in self._INFORMATIVE + self._SEEDS
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def differences(self, other: RunManifest) -> list[str]:
        """The settings but the seeds in which ``other`` differs (informative fields
        excluded)."""
        mine, theirs = asdict(self), asdict(other)
        out = []
        for key, value in mine.items():
            if key in self._INFORMATIVE + self._SEEDS or theirs[key] == value:
                continue
            if key == "grid_t":
                out.append("grid_t: the step grids differ")
            elif key == "inputs":
                changed = _changed_inputs(json.loads(value), json.loads(theirs[key]))
                out.append(f"inputs: {', '.join(changed)} changed")
            else:
                out.append(f"{key}: {value!r} in the folder, {theirs[key]!r} now")
        return out


def _changed_inputs(before: dict[str, str], now: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def _tuned_hint(existing: RunManifest, manifest: RunManifest) -> str:
    """Why the grid may differ when a tuned step schedule was picked up on one side."""
    before, now = existing.schedule, manifest.schedule
    if now.startswith("tuned:") and before == now:
        hashes = {json.loads(m.inputs).get("schedule") for m in (existing, manifest)}
        changed = len(hashes) > 1
        where = now.removeprefix("tuned:")
        return f" (the tuned {_kind(where)} {where} changed since)" if changed else ""
    if now.startswith("tuned:"):
        return (
            f" (this run picks up the tuned {_kind(now)} {now.removeprefix('tuned:')}, the "
            f"folder's run used {before or 'none'}: --no-tuned-schedule turns it off)"
        )
    if before.startswith("tuned:"):
        return (
            f" (the folder's run used the tuned {_kind(before)} {before.removeprefix('tuned:')}"
            f", this one {now or 'none'})"
        )
    return ""


def _kind(path: str) -> str:
    """What a schedule file kept with a model holds, by its name."""
    return "solver schedule" if Path(path).name.startswith("solver-schedule-") else "step schedule"


def read_manifest(out_dir: str | Path) -> RunManifest | None:
    """The manifest in ``out_dir``, or ``None`` if there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return RunManifest.from_json(path.read_text())
    except (ValueError, KeyError) as err:
        raise SamplingError(
            f"{path}: {err}; this folder holds another kind of run (or an older diffsolve's): "
            "pass another --out"
        ) from None


def check_resume(out_dir: Path, manifest: RunManifest) -> RunManifest | None:
    """The folder's manifest, after refusing a run made with other settings. More seeds
    than the folder's run (a superset) extend it; fewer or other seeds are refused."""
    existing = read_manifest(out_dir)
    if existing is None:
        return None
    diff = existing.differences(manifest)
    if diff:
        raise ValueError(
            f"--out {out_dir} holds a run made with different settings ("
            + "; ".join(diff)
            + f"){_tuned_hint(existing, manifest)}; pass another --out, or delete the folder "
            "to start over"
        )
    if existing.seeds != manifest.seeds:
        dropped = set(parse_seeds(existing.seeds)) - set(parse_seeds(manifest.seeds))
        if dropped:
            raise ValueError(
                f"--out {out_dir} holds seeds {existing.seeds}; --seeds {manifest.seeds} "
                f"leaves out {format_seeds(sorted(dropped))}. A run can only be extended "
                "(pass a superset of its seeds), or use another --out"
            )
    return existing


# ---------------------------------------------------------------------------------------
# Processes
@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: The process group of the run's collectives (long timeout; ``None``: the default).
    group: Any = None

    def barrier(self) -> None:
        """Wait for every process (no-op when alone)."""
        if self.world_size > 1:
            torch.distributed.barrier(group=self.group)

    def device(self, device: str) -> str:
        """``cuda`` becomes ``cuda:<local rank>`` under torchrun; other devices unchanged."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process (a collective: all must call it)."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


@contextmanager
def run_lock(out_dir: Path, dist: Distributed) -> Iterator[None]:
    """Hold the folder's writer lock for the run: rank 0 takes an exclusive ``flock`` on
    :data:`LOCK_NAME` (the system releases it when the process ends, however it ends); a
    second run into the same folder is refused on every rank."""
    handle = None
    ok = True
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / LOCK_NAME, "a")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            handle, ok = None, False
    if not dist.all_ok(ok):
        raise SamplingError(
            f"--out {out_dir} is in use by another diffsolve sample run; wait for it to "
            "finish, or pass another --out"
        )
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the flock


#: How long a process waits for its torchrun peers to join the group before giving up.
JOIN_TIMEOUT = timedelta(seconds=60)
#: How long a barrier waits: ranks wait at the final one while the slowest finishes.
BARRIER_TIMEOUT = timedelta(hours=24)
_LAUNCH = (
    "launch with torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or unset WORLD_SIZE"
)


def _env_int(name: str, default: str | None = None) -> int:
    """An integer torchrun variable, or a one-line error naming it."""
    raw = os.environ.get(name, default)
    if raw is None:
        raise LaunchError(
            f"{name} is not set but WORLD_SIZE asks for several processes; {_LAUNCH}"
        )
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer; {_LAUNCH}") from None


def _long_waits() -> Any:
    """Let the joined group's collectives wait :data:`BARRIER_TIMEOUT` (the final barrier
    waits for the slowest rank; EMS sums are reduced when every rank is done): the default
    group's timeout where torch can change it, else a new group (returned) for ours."""
    set_timeout = getattr(torch.distributed.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        try:
            set_timeout(BARRIER_TIMEOUT)
            return None
        except (RuntimeError, ValueError, AttributeError):
            pass
    return torch.distributed.new_group(timeout=BARRIER_TIMEOUT)


def torchrun_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment, checked before any
    process group is created (``(0, 1, 0)`` without ``WORLD_SIZE``)."""
    world = _env_int("WORLD_SIZE", "1")
    if world < 1:
        raise LaunchError(f"WORLD_SIZE={world} must be >= 1; {_LAUNCH}")
    if world == 1:
        return 0, 1, 0
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", str(rank))
    if not 0 <= rank < world:
        raise LaunchError(
            f"RANK={rank} must lie in 0..{world - 1} (WORLD_SIZE={world}); {_LAUNCH}"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LaunchError(f"{name} is not set (WORLD_SIZE={world}); {_LAUNCH}")
    return rank, world, local_rank


@contextmanager
def distributed() -> Iterator[Distributed]:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (gloo: the group only provides
    barriers, so it works for CPU and GPU sampling alike); otherwise a single process. The
    environment is checked first; peers that do not join within :data:`JOIN_TIMEOUT` end the
    run with a message (barriers then wait up to :data:`BARRIER_TIMEOUT`)."""
    rank, world, local_rank = torchrun_world()
    if world == 1:
        yield Distributed()
        return
    if not torch.distributed.is_available():
        raise SamplingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    try:
        torch.distributed.init_process_group("gloo", timeout=JOIN_TIMEOUT)
    except Exception as err:  # torch raises DistStoreError, RuntimeError or ValueError here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamplingError(
            f"rank {rank}: the {world} torchrun processes did not all join within "
            f"{JOIN_TIMEOUT.seconds} s ({first[:200]}); start all of them "
            f"(torchrun --nproc_per_node {world}) with the same MASTER_ADDR and MASTER_PORT"
        ) from None
    try:
        yield Distributed(rank, world, local_rank, _long_waits())
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
            (DPM-Solver-v3 where the model ships EMS), after a tuned solver schedule kept
            with the model; ``schedule:FILE`` runs a solver schedule (its own times and
            NFE). The manifest records the resolved name (``schedule:<absolute path>``).
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
            teleportation (0: none), with the model's Gaussian statistics (``load``'s
            ``gaussian_stats``, default: the model folder's ``gaussian_stats.safetensors``).
        schedule: A fitted step schedule file (``diffsolve tune``): its solver, options and
            grid, checked against the model; ``grid`` must be ``None`` and ``nfe`` its NFE.
        tuned_schedule: Pick up the tuned step schedule kept with the model for the solver
            and NFE (:mod:`diffsolve.app.schedules`) when no ``grid``, ``schedule`` or
            ``teleport`` fixes the grid and no guidance, thresholding or DualFast is asked
            for; with ``solver="auto"``, also the tuned solver schedule at the NFE. After
            :func:`resolve_method`: whether one was picked up (its path then in
            ``schedule``, which also names the file of ``solver="schedule:FILE"``).
        load: How to load the model (:class:`~diffsolve.app.loader.LoadOptions`: prediction
            type, scheduler config, shape, image size, prompts, statistics files).
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
    schedule: str | None = None
    tuned_schedule: bool = True
    load: LoadOptions = field(default_factory=LoadOptions)


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
    """Samples for a list of seeds, in batches; a sample depends on its seed (and, to
    floating-point round-off of the network's batched reductions, on the batch size)."""

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

    def check(self, seeds: Sequence[int]) -> None:
        """Build the guided denoiser for the first seed (a bad guidance setting fails here,
        before anything is written)."""
        self.guidance.build(self.model, self.labels(list(seeds[:1])))

    def __call__(
        self, seeds: Sequence[int], on_batch: Callable[[int], None] | None = None
    ) -> Tensor:
        from diffsolve.ode.sampling import sample

        out = []
        for i in range(0, len(seeds), self.batch_size):
            batch = list(seeds[i : i + self.batch_size])
            x = noise_for_seeds(batch, self.model.data_shape, self.scale, self.device)
            denoiser = self.guidance.build(self.model, self.labels(batch))
            with torch.inference_mode():
                # a stochastic solver's fresh noise: per sample, from its seed (SeededNoise)
                y = sample(denoiser, x, self.solver, plan=self.plan, noise=batch).x
            out.append(y.float().cpu())
            if on_batch is not None:
                on_batch(len(batch))
        return torch.cat(out)


#: Samples → images in ``[-1, 1]`` (a latent model's VAE), or ``None`` where they are not
#: images (:meth:`~diffsolve.app.loader.LoadedModel.images`).
ToImages = Callable[[Tensor], Tensor | None]


def _save_png(samples: np.ndarray | Tensor, path: Path, images: ToImages) -> None:
    """A PNG grid of the first samples, where they are (or decode to) images."""
    from diffsolve.app.images import save_grid

    pictures = images(torch.as_tensor(np.asarray(samples[:GRID_SAMPLES])))
    if pictures is not None:
        save_grid(pictures, path)


def run_shards(
    sampler: Callable[..., Tensor],
    shards: Sequence[Sequence[int]],
    out_dir: Path,
    report: RunReport,
    *,
    on_shard: Callable[[Path], None] | None = None,
    progress: bool = False,
    desc: str = "sampling",
    images: ToImages = image_samples,
) -> RunReport:
    """Compute every shard whose file does not validate; keep the others.

    ``on_shard(path)`` is called after each shard file is written (tests use it to simulate
    a run killed midway). The progress bar counts samples, batch by batch, across shards.
    ``images`` turns samples into the shard's PNG (a latent model: its VAE decoder).
    """
    manifest = report.manifest
    fingerprint = manifest.fingerprint()
    bar = _bar(sum(len(s) for s in shards), desc) if progress else None
    on_batch = None if bar is None else bar.update
    for seeds in shards:
        path = shard_path(out_dir, seeds[0])
        reason = check_shard(path, seeds, manifest.data_shape, fingerprint)
        if reason is None:
            report.skipped.append(path)
            _ensure_png(path, images)
            if on_batch is not None:
                on_batch(len(seeds))
            continue
        if reason != "missing":
            report.recomputed[path] = reason
        samples = _sample_shard(sampler, seeds, on_batch)
        _write_shard(samples, seeds, path, fingerprint, images)
        report.computed.append(path)
        if on_shard is not None:
            on_shard(path)
    if bar is not None:
        bar.close()
    return report


def _ensure_png(path: Path, images: ToImages) -> None:
    png = path.with_suffix(".png")
    if not png.is_file():
        with np.load(path) as data:
            _writing(lambda: _save_png(data["samples"], png, images), png)


def _sample_shard(
    sampler: Callable[..., Tensor], seeds: Sequence[int], on_batch: Callable[[int], Any] | None
) -> np.ndarray:
    from diffsolve.ode.sampling import NonFiniteError

    try:
        out = sampler(seeds) if on_batch is None else sampler(seeds, on_batch)
        samples = out.numpy().astype(np.float32, copy=False)
    except NonFiniteError as err:
        raise SamplingError(
            f"seeds {format_seeds(seeds)}: the solver diverged ({err}); try more NFE, a lower "
            "guidance scale or another solver; finished shards are kept"
        ) from None
    if not np.isfinite(samples).all():
        finite = np.isfinite(samples).reshape(len(seeds), -1).all(1)
        bad = [s for s, ok in zip(seeds, finite, strict=True) if not ok]
        raise SamplingError(
            f"seeds {format_seeds(bad)} gave non-finite samples: the solver diverged (try more "
            "NFE or another solver); finished shards are kept"
        )
    return samples


def _write_shard(
    samples: np.ndarray, seeds: Sequence[int], path: Path, fingerprint: str, images: ToImages
) -> None:
    """The shard's PNG (where the samples are images), then its npz (which marks it done),
    atomically."""
    png = path.with_suffix(".png")
    _writing(lambda: _save_png(samples, png, images), png)
    arrays = {
        "samples": samples,
        "seeds": np.asarray(seeds, dtype=np.int64),
        "fingerprint": np.asarray(fingerprint),
    }
    _writing(lambda: save_npz_atomic(path, **arrays), path)


def _writing(write: Callable[[], Any], path: Path) -> None:
    """Run a file write; a system error (full disk, read-only folder) stops the run with a
    message naming the file, finished shards kept."""
    try:
        write()
    except OSError as err:
        raise SamplingError(
            f"cannot write {path}: {err.strerror or err}; finished shards are kept, rerun the "
            "command to resume once the problem is fixed"
        ) from None


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def model_config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a model config (sorted JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def run_inputs(config: RunConfig, model: LoadedModel) -> dict[str, str]:
    """SHA-256 of everything a run's samples depend on: the model
    (:meth:`~diffsolve.app.loader.LoadedModel.inputs`: its weights, an entry point's
    file and parameters, an analytic model's fingerprint), the statistics it uses (EMS,
    Gaussian statistics), a step schedule file and a guidance classifier."""
    from diffsolve.solvers import registry

    files: dict[str, Path | None] = {}
    needs = registry.preset(config.solver).needs
    if "ems" in needs:
        files["ems"] = model.ems_path
    if config.schedule is not None:  # a step or solver schedule file
        files["schedule"] = Path(config.schedule)
    teleports = config.schedule is not None and _teleports(config.schedule)
    if config.teleport or "gaussian" in needs or teleports:
        files["gaussian_stats"] = model.gaussian_stats_path
    if config.guidance.method == "classifier":
        from diffsolve.app.classifier import classifier_path

        files["classifier"] = classifier_path("digits-classifier") / "model.safetensors"
    out = {k: file_sha256(p) for k, p in files.items() if p is not None and Path(p).is_file()}
    return {**model.inputs(), **out}


def _teleports(path: str) -> bool:
    """Whether a step schedule file starts with a teleport (its Gaussian statistics are
    then an input of the run)."""
    try:
        return StepSchedule.load(path).teleport
    except (OSError, ValueError):
        return False


def run_sampling(
    config: RunConfig,
    dist: Distributed | None = None,
    *,
    on_shard: Callable[[Path], None] | None = None,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> RunReport:
    """Sample ``config.seeds`` into ``config.out_dir`` as this process's share of the run.

    Every input is checked first (a bad one raises ``ValueError`` and writes nothing); all
    processes check the folder's manifest; the run takes the folder's writer lock; rank 0
    writes the manifest and removes temporary files left by a killed run; every process
    computes its shards ``rank::world_size``; after a barrier rank 0 merges
    (``config.merge``) and draws ``grid.png``. Raises :class:`SamplingError` when the run
    cannot go on. ``say`` (rank 0) gets one-line notes on the run's choices, e.g. the tuned
    step schedule it uses.
    """
    dist = dist or Distributed()
    quiet: Callable[[str], None] = lambda line: None  # noqa: E731
    config, model, method, plan, seeds = _checked_run(
        config, dist, say if dist.rank == 0 else quiet
    )
    shards = seed_shards(seeds, config.shard_size)
    manifest = run_manifest(config, model, plan, seeds, method)
    sampler = SeedSampler(
        model, method, plan, model.device, config.batch_size, config.guidance, config.class_label
    )
    sampler.check(seeds)
    out_dir = Path(config.out_dir)
    check_folder(out_dir, manifest)  # every rank: they all fail alike, none hangs
    report = RunReport(manifest)
    with run_lock(out_dir, dist):
        _prepare_folder(out_dir, manifest, dist)
        run_shards(
            sampler,
            shards[dist.rank :: dist.world_size],
            out_dir,
            report,
            on_shard=on_shard,
            progress=progress and dist.rank == 0,
            desc="sampling" if dist.world_size == 1 else f"rank 0 of {dist.world_size}",
            images=model.images,
        )
        dist.barrier()
        if dist.rank == 0:
            if config.merge:
                report.merged = merge_shards(out_dir)
            report.grid_png = _overview(out_dir, shards, model.images)
    return report


def _checked_run(
    config: RunConfig, dist: Distributed, say: Callable[[str], None] | None = None
) -> tuple[RunConfig, LoadedModel, Solver, Plan[Any], list[int]]:
    """Every input of a run, checked before anything is written."""
    from diffsolve.app.loader import load_model

    seeds = parse_seeds(config.seeds)
    seed_shards(seeds, config.shard_size)  # checks the shard size
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {config.batch_size!r}")
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if inside_package(out_dir):
        raise ValueError(
            f"--out {out_dir} is inside the installed diffsolve package (its shipped files are "
            "never replaced); sample elsewhere, e.g. --out ./samples"
        )
    device = check_device(dist.device(config.device))
    model = load_model(config.model, device=device, options=config.load)
    spec = config.guidance
    if model.is_text and spec.method == "none" and spec.scale != 1.0:
        config = replace(config, guidance=replace(spec, method="cfg"))  # --scale of a pipeline
    config, method, grid = resolve_method(config, model, say)
    check_options(config, model, method)
    _note_ems_guidance(config, method, say)
    return config, model, method, method.plan(model.schedule, grid), seeds


def _note_ems_guidance(
    config: RunConfig, method: Solver, say: Callable[[str], None] | None
) -> None:
    """A note when DPM-Solver-v3's statistics were estimated under another guidance than
    the run's: they move with the scale (BENCHMARKS.md §11), and v3's error with them."""
    from diffsolve.stats.ems.compute import NO_GUIDANCE

    ems = getattr(method, "ems", None) or getattr(getattr(method, "solver", None), "ems", None)
    if ems is None:
        return
    made = ems.metadata.get("guidance") or NO_GUIDANCE
    spec = config.guidance
    run = {"method": spec.method if spec.scale != 1.0 else "none", "scale": spec.scale}
    if made.get("method") == run["method"] and float(made.get("scale", 1.0)) == run["scale"]:
        return
    _note(
        say,
        f"warning: the EMS were estimated with guidance {made.get('method')} at scale "
        f"{float(made.get('scale', 1.0)):g}, this run guides with {run['method']} at "
        f"{run['scale']:g}: v3's statistics move with the scale (BENCHMARKS.md §11); "
        f"estimate them at this one: diffsolve ems --scale {run['scale']:g}",
        warning=True,
    )


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else a clear ``ValueError``."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build or machine has no CUDA; use cpu")
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: only {count} GPU(s) here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use cpu")
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(
            f"--device {device}: {parsed.type} tensors hold no values to sample with; use cpu, "
            "cuda, cuda:N or mps"
        )
    return device


def check_options(config: RunConfig, model: LoadedModel, method: Solver) -> None:
    """Refuse options that the run would not apply (never accept and ignore one)."""
    from diffsolve.wrappers.teleport import Teleported

    guided = config.guidance.method != "none"
    if config.class_label is not None:
        classes = model.num_classes or (10 if config.guidance.method == "classifier" else 0)
        if not classes:
            raise ValueError(
                f"--label {config.class_label}: {config.model} is unconditional; labels apply "
                "to class-conditional models or to --guidance classifier"
            )
        if not 0 <= config.class_label < classes:
            raise ValueError(f"--label must lie in [0, {classes - 1}], got {config.class_label}")
    if not guided and config.guidance.scale != 1.0:
        raise ValueError(
            f"--scale {config.guidance.scale:g} has no effect without guidance; pass "
            "--guidance cfg, apg or classifier (or drop --scale)"
        )
    if config.load.gaussian_stats is not None and "gaussian" not in _uses(config, method):
        raise ValueError(
            "--gaussian-stats is used by --teleport only (and by a --schedule that starts "
            "with a teleport); pass --teleport too, or drop it"
        )
    if config.load.ems is not None and "ems" not in _uses(config, method):
        raise ValueError(
            f"--ems is used by DPM-Solver-v3 only, not by {config.solver}; pass --solver "
            "dpm-solver-v3, or drop --ems"
        )
    if config.teleport and not isinstance(method, Teleported):
        raise ValueError(
            f"--teleport {config.teleport:g} skips no step of the solver's grid at --nfe "
            f"{config.nfe} (it skips round({config.teleport:g} x steps) = 0 steps); raise "
            "--teleport or --nfe"
        )


def _uses(config: RunConfig, method: Solver) -> set[str]:
    """What the resolved run takes from the model's statistics: ``"ems"``, ``"gaussian"``."""
    from diffsolve.solvers import registry
    from diffsolve.wrappers.teleport import Teleported

    uses = set(registry.preset(config.solver).needs)
    return uses | {"gaussian"} if isinstance(method, Teleported) else uses


def resolve_method(
    config: RunConfig, model: LoadedModel, say: Callable[[str], None] | None = None
) -> tuple[RunConfig, Solver, Tensor]:
    """The solver and grid of a run: ``solver="auto"`` resolved (the manifest records the
    name; a tuned solver schedule kept with the model first), a fitted schedule
    (``--schedule``, ``--solver schedule:FILE``, or the tuned one kept with the model) applied,
    what it needs from the model loaded once, teleportation wrapped around it. ``say`` gets
    one-line notes (the tuned schedule used, or not used and why; default: warnings only,
    through :func:`warnings.warn`)."""
    from diffsolve.solvers import registry
    from diffsolve.wrappers.teleport import teleported_setup

    if config.schedule is not None:
        return _scheduled(replace(config, tuned_schedule=False), model)
    if is_solver_schedule(config.solver):
        return _solver_scheduled(replace(config, tuned_schedule=False), model)
    if config.solver == "auto":
        picked = _tuned_solver_schedule(config, model, say)
        if picked is not None:
            return picked
        config = replace(config, solver=registry.default_solver(model.available()))
    tuned = _tuned(config, model, say)
    if tuned is not None:
        return tuned
    config = replace(config, tuned_schedule=False)
    needs = set(registry.preset(config.solver).needs)
    if config.teleport:
        needs.add("gaussian")
    context = model.solver_context(needs)
    if config.teleport:
        method, grid = teleported_setup(
            config.solver, model.schedule, config.nfe, config.teleport, config.grid, context
        )
    else:
        method, grid = registry.setup_solver(
            config.solver, model.schedule, config.nfe, config.grid, context=context
        )
    return config, method, grid


def _tuned_clash(config: RunConfig) -> tuple[str, str] | None:
    """The option, and why, that keeps a tuned step schedule from a run (``None``: none)."""
    from diffsolve.solvers.registry import preset

    spec = config.guidance
    if config.load.ems is not None and "ems" in preset(config.solver).needs:
        return f"--ems {config.load.ems}", "it was fitted with the model folder's statistics"
    if config.load.gaussian_stats is not None and "gaussian" in preset(config.solver).needs:
        stats = config.load.gaussian_stats
        return f"--gaussian-stats {stats}", "it was fitted with the model folder's statistics"
    if config.teleport:
        return f"--teleport {config.teleport:g}", "teleportation sets the grid"
    if spec.method != "none":
        return f"--guidance {spec.method}", "it was fitted to the unguided model"
    if spec.threshold is not None:
        return f"--threshold {spec.threshold:g}", "it was fitted without thresholding"
    if spec.dualfast:
        return f"--dualfast {spec.dualfast:g}", "it was fitted without DualFast"
    return None


def _tuned(
    config: RunConfig, model: LoadedModel, say: Callable[[str], None] | None
) -> tuple[RunConfig, Solver, Tensor] | None:
    """The tuned step schedule kept with the model for the run's solver and NFE, applied as
    ``--schedule`` would be; ``None`` when the run does not pick one up (off, an explicit
    ``--grid``: silently; a file that does not fit the model, or options it was not fitted
    for: with a note)."""
    from diffsolve.app.schedules import find_tuned_schedule
    from diffsolve.solvers.registry import preset

    if not config.tuned_schedule or config.grid is not None:
        return None
    found = find_tuned_schedule(model, config.solver, config.nfe, say)
    if found is None:
        return None
    clash = _tuned_clash(config)
    if clash is not None:
        option, why = clash
        anyway = "" if config.teleport else f"; --schedule {found.path} applies it anyway"
        line = f"not using the tuned step schedule {found.where} with {option} ({why}{anyway})"
        _note(say, line)
        return None
    try:
        result = _scheduled(replace(config, schedule=str(found.path)), model, found.schedule)
    except (TypeError, ValueError) as err:
        _note(say, found.skipped(str(err)), warning=True)
        return None
    _note(say, found.describe(preset(config.solver).grid_kind(config.nfe)))
    return result


def _note(say: Callable[[str], None] | None, line: str, warning: bool = False) -> None:
    """One line to ``say``; without it, a warning through :mod:`warnings` (notes dropped)."""
    if say is not None:
        say(line)
    elif warning:
        import warnings

        warnings.warn(line, stacklevel=3)


def _scheduled(
    config: RunConfig, model: LoadedModel, fitted: StepSchedule | None = None
) -> tuple[RunConfig, Solver, Tensor]:
    """``--schedule FILE``: the fitted schedule's solver, options and grid (refused for
    another model, and with a ``--grid``, ``--solver``, ``--nfe`` or ``--teleport`` that
    contradicts it). The manifest records ``grid = "schedule:<method>"``, the times, and the
    file's hash among the run's inputs. ``fitted``: the file's contents, where the caller
    has read them already."""
    from diffsolve.app.tune import schedule_solver

    fitted = fitted or StepSchedule.load(str(config.schedule))
    clash = (
        "--grid" if config.grid is not None
        else "--teleport" if config.teleport
        else "--solver" if config.solver not in ("auto", fitted.solver)
        else "--nfe" if config.nfe != fitted.nfe
        else None
    )  # fmt: skip
    if clash:
        raise ValueError(
            f"{clash} contradicts --schedule {config.schedule} (fitted for {fitted.solver} at "
            f"{fitted.nfe} NFE, its own grid); drop {clash}"
        )
    method, grid = schedule_solver(fitted, model)
    return replace(config, solver=fitted.solver, grid=f"schedule:{fitted.method}"), method, grid


def is_solver_schedule(solver: str) -> bool:
    """Whether a registry name is a solver-schedule file, ``schedule:FILE``."""
    from diffsolve.solvers.solver_schedule import PREFIX

    return solver.startswith(f"{PREFIX}:")


def _solver_scheduled(config: RunConfig, model: LoadedModel) -> tuple[RunConfig, Solver, Tensor]:
    """``--solver schedule:FILE``: the solver schedule's choices on its own times, the file
    checked against the model (noise schedule, fingerprint, EMS digest; refused with a
    ``--grid``, ``--teleport`` or ``--nfe`` that contradicts it). The manifest records the
    solver as ``schedule:<absolute path>``, ``grid = "schedule:<method>"``, the times, and
    the file's hash among the run's inputs (``schedule``)."""
    from diffsolve.app.schedules import solver_schedule_setup

    path = Path(config.solver.partition(":")[2]).expanduser().resolve()
    clash = "--grid" if config.grid is not None else "--teleport" if config.teleport else None
    if clash:
        raise ValueError(
            f"{clash} contradicts --solver {config.solver}: a solver schedule comes with its "
            f"own times (and its own teleport); drop {clash}"
        )
    name = f"schedule:{path}"
    fitted, method, grid = solver_schedule_setup(name, model, config.nfe)
    config = replace(config, solver=name, grid=f"schedule:{fitted.method}", schedule=str(path))
    return config, method, grid


def _solver_schedule_clash(config: RunConfig, fitted: dict[str, Any]) -> tuple[str, str] | None:
    """The option, and why, that keeps a tuned solver schedule from a run: those of step
    schedules (:func:`_tuned_clash`), except that one searched under guidance (its settings
    ``fitted``: ``guidance``, ``scale``) is for runs with that guidance and scale only; and
    ``--ems`` (statistics asked for: DPM-Solver-v3's run)."""
    spec = config.guidance
    made = str(fitted.get("guidance", "none")), float(fitted.get("scale", 1.0))
    run = (spec.method, float(spec.scale)) if spec.method != "none" else ("none", 1.0)
    if run != made:
        option = f"--guidance {spec.method} --scale {spec.scale:g}"
        why = f"it was fitted with --guidance {made[0]} --scale {made[1]:g}"
        if made[0] == "none":
            why = "it was fitted to the unguided model"
        return (option, why) if spec.method != "none" else ("no --guidance", why)
    clash = _tuned_clash(replace(config, guidance=replace(spec, method="none", scale=1.0)))
    if clash is None and config.load.ems is not None:
        clash = f"--ems {config.load.ems}", "it does not use DPM-Solver-v3's statistics"
    return clash


def _tuned_solver_schedule(
    config: RunConfig, model: LoadedModel, say: Callable[[str], None] | None
) -> tuple[RunConfig, Solver, Tensor] | None:
    """The tuned solver schedule kept with the model at the run's NFE, for ``--solver
    auto``, applied as ``--solver schedule:FILE`` would be; ``None`` when the run does not
    pick one up (as :func:`_tuned`)."""
    from diffsolve.app.schedules import find_tuned_solver_schedule

    if not config.tuned_schedule or config.grid is not None:
        return None
    found = find_tuned_solver_schedule(model, config.nfe, say)
    if found is None:
        return None
    named = replace(config, solver=f"schedule:{found.path.resolve()}")
    clash = _solver_schedule_clash(named, found.schedule.config)
    if clash is not None:
        option, why = clash
        anyway = "" if config.teleport else f"; --solver {named.solver} applies it anyway"
        _note(
            say, f"not using the tuned solver schedule {found.where} with {option} ({why}{anyway})"
        )
        return None
    try:
        result = _solver_scheduled(named, model)
    except (TypeError, ValueError) as err:
        _note(say, found.skipped(str(err)), warning=True)
        return None
    _note(say, found.describe())
    return result


def run_manifest(
    config: RunConfig,
    model: LoadedModel,
    plan: Plan[Any],
    seeds: Sequence[int],
    method: Solver | None = None,
) -> RunManifest:
    """What defines the run's samples (see :class:`RunManifest`)."""
    from diffsolve import __version__
    from diffsolve.app.loader import DEMO_MODELS, DIFFUSERS_DEMOS
    from diffsolve.solvers.registry import default_grid_kind, preset

    model_id = config.model
    if model_id not in DEMO_MODELS + DIFFUSERS_DEMOS:
        model_id = str(Path(model_id).resolve())
    conditioning = {
        "guidance": asdict(config.guidance),
        "class_label": config.class_label,
        "teleport": config.teleport,
    }
    if model.is_text:
        conditioning.update(prompts=list(model.prompts), negative_prompt=model.negative_prompt)
    network = model.network
    dtype = str(next(network.parameters()).dtype) if network is not None else "float64"
    return RunManifest(
        model=model_id,
        model_config_sha256=model_config_hash(model.config),
        inputs=json.dumps(run_inputs(config, model), sort_keys=True),
        solver=config.solver,
        solver_options=_solver_repr(method),
        nfe=int(plan.nfe or 0),
        nfe_budget=config.nfe,
        grid=config.grid or default_grid_kind(preset(config.solver), model.schedule, config.nfe),
        grid_t=tuple(float(t) for t in plan.grid),
        seeds=format_seeds(seeds),
        num_seeds=len(seeds),
        shard_size=config.shard_size,
        batch_size=config.batch_size,
        dtype=dtype.removeprefix("torch."),
        data_shape=tuple(model.data_shape),
        conditioning=json.dumps(conditioning, sort_keys=True),
        schedule=_schedule_source(config, model),
        version=__version__,
    )


def _schedule_source(config: RunConfig, model: LoadedModel) -> str:
    """The manifest's ``schedule``: the ``--schedule`` file (absolute), or
    ``tuned:<path in the model folder>`` for a tuned schedule picked up; ``""``: none."""
    if config.schedule is None:
        return ""
    path = Path(config.schedule).resolve()
    if not config.tuned_schedule:
        return str(path)
    folder = Path(model.folder or path.parent).resolve()
    return f"tuned:{path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path}"


def _solver_repr(method: Solver | None) -> str:
    """The solver with its options; statistics it holds (EMS, Gaussian) are summarised by
    their hashes in ``inputs`` instead."""
    if method is None:
        return ""
    from diffsolve.wrappers.teleport import Teleported

    if isinstance(method, Teleported):
        return f"Teleported({_solver_repr(method.solver)})"
    dataclass = dataclasses.is_dataclass(method)
    names = [f.name for f in dataclasses.fields(method)] if dataclass else []
    options = {k: getattr(method, k) for k in names if k not in ("ems", "gaussian")}
    return f"{type(method).__name__}({', '.join(f'{k}={v!r}' for k, v in options.items())})"


def _prepare_folder(out_dir: Path, manifest: RunManifest, dist: Distributed) -> None:
    """Under the writer lock: re-check the folder (another run may have just written a
    manifest), write or extend the manifest, drop this run's shards of an earlier seed
    partition, and remove temporary files left by a killed run (only diffsolve's)."""
    existing = check_folder(out_dir, manifest)
    if dist.rank == 0:
        for stale in stale_temp_files(out_dir):
            stale.unlink(missing_ok=True)
        if existing is None or existing.seeds != manifest.seeds:
            if existing is not None:
                _drop_other_partition(out_dir, existing, manifest)
            write_text_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
    dist.barrier()


def _drop_other_partition(out_dir: Path, existing: RunManifest, manifest: RunManifest) -> None:
    """Shards the folder's manifest lists whose first seed is not a shard start of the
    extended seed list (their seeds are recomputed in the new partition)."""
    keep = _shard_names(manifest)
    for name in sorted(_shard_names(existing) - keep):
        path = out_dir / name
        if path.is_file() and _shard_fingerprint(path) == manifest.fingerprint():
            path.unlink()
            path.with_suffix(".png").unlink(missing_ok=True)


def _shard_names(manifest: RunManifest) -> set[str]:
    """The shard files (``.npz``) a manifest lists."""
    return {n for n in manifest.files() if n.startswith("shard-") and n.endswith(".npz")}


def _shard_fingerprint(path: Path) -> str | None:
    """The fingerprint a shard file records (``None``: unreadable, or none)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return str(data["fingerprint"])
    except Exception:  # any failure to read: not a shard we can attribute
        return None


#: At most this many file names in a refusal (then "and N more").
_LISTED = 8


def _names(paths: Sequence[str]) -> str:
    names = sorted(paths)
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _run_file(name: str) -> bool:
    """Whether a run writes files named ``name`` (merged samples, overview, shards)."""
    shard = name.startswith("shard-") and name.endswith((".npz", ".png"))
    return shard or name in (MERGED_NAME, GRID_NAME)


def check_folder(out_dir: Path, manifest: RunManifest) -> RunManifest | None:
    """The folder's manifest (:func:`check_resume`), after refusing a folder holding files
    this run would write or trip over that it cannot tell it made: without a manifest, any
    ``samples.npz``, ``grid.png`` or ``shard-*`` file; with one, a shard file that neither
    the folder's manifest nor this run lists, or that records another run's fingerprint.
    Such files are never replaced, moved or deleted."""
    existing = check_resume(out_dir, manifest)
    if not out_dir.is_dir():
        return existing
    if existing is None:
        taken = [p.name for p in out_dir.iterdir() if _run_file(p.name)]
        if taken:
            raise ValueError(
                f"--out {out_dir} has no {MANIFEST_NAME} but holds files a run writes, which "
                f"diffsolve did not make there: {_names(taken)}; they are left untouched: "
                "move them away, or pass another --out (an empty or new folder)"
            )
        return existing
    listed = _shard_names(manifest) | _shard_names(existing)
    fingerprint = manifest.fingerprint()
    foreign = []
    for path in out_dir.glob("shard-*.npz"):
        made = _shard_fingerprint(path)
        if path.name not in listed or made not in (None, fingerprint):
            foreign.append(path.name)
    if foreign:
        raise ValueError(
            f"--out {out_dir} holds shard files its run did not make ({_names(foreign)}: not "
            f"listed by its {MANIFEST_NAME}, or made under other settings); they are left "
            "untouched: move them away, or pass another --out"
        )
    return existing


def _overview(out_dir: Path, shards: Sequence[Sequence[int]], images: ToImages) -> Path | None:
    """``grid.png``: the first samples of the run, by seed (``None`` where the samples are
    not images)."""
    parts, count = [], 0
    for seeds in shards:
        if count >= GRID_SAMPLES:
            break
        with np.load(shard_path(out_dir, seeds[0])) as data:
            parts.append(data["samples"][: GRID_SAMPLES - count])
        count += len(parts[-1])
    path = out_dir / GRID_NAME
    _writing(lambda: _save_png(np.concatenate(parts), path, images), path)
    return path if path.is_file() else None


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
    if inside_package(out_dir):
        raise SamplingError(f"{out_dir} is inside the installed diffsolve package: not merged")
    seeds = parse_seeds(manifest.seeds)
    shards = seed_shards(seeds, manifest.shard_size)
    expected = {shard_path(out_dir, s[0]).name for s in shards}
    stray = sorted(p.name for p in out_dir.glob("shard-*.npz") if p.name not in expected)
    problems = [f"{n}: not a shard of this run" for n in stray]
    missing: list[int] = []
    fingerprint = manifest.fingerprint()
    for shard in shards:
        path = shard_path(out_dir, shard[0])
        reason = check_shard(path, shard, manifest.data_shape, fingerprint)
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
    merged_path = out_dir / name
    _writing(
        lambda: save_npz_atomic(merged_path, samples=np.concatenate(samples), seeds=all_seeds),
        merged_path,
    )
    return merged_path
