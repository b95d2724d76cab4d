"""Data in a model's own sample space, for the commands that need some (``--data``).

* ``digits``: the 8×8 digits (the demos' data; ``split`` chooses train or test);
* an **array file** ``.pt`` / ``.npy`` / ``.npz`` of shape ``(M, *data_shape)``, taken as
  it is (latents for a latent model);
* an **image folder** (PNG, JPEG, WebP, BMP): every image resized to the model's image size,
  scaled to ``[-1, 1]`` and, for a latent model, encoded by its VAE;
* ``self``: the model's own samples from a many-step solve (:data:`SELF_SOLVER` at
  :data:`SELF_NFE` evaluations, per-seed noise from ``seed`` on, each sample under its own
  label or prompt ``seed mod P``) — what the DPM-Solver-v3 paper estimates its statistics on
  for latent models.

:func:`model_data` returns the data and, for a class-conditional model or text pipeline,
the label (prompt index) of every point: a text pipeline's point ``i`` takes prompt ``i mod
P`` unless its source says otherwise.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffsolve.app.loader import LoadedModel

__all__ = ["IMAGE_SUFFIXES", "SELF_NFE", "SELF_SOLVER", "load_array", "model_data"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SELF_SOLVER = "unipc-bh2-3"
SELF_NFE = 50


def load_array(source: str, option: str = "--data") -> Tensor:
    """An array file ``.pt`` / ``.npy`` / ``.npz`` (its first array) as a float32 tensor; a
    file that is not one, holds none, or holds NaN or inf is a one-line ``ValueError``."""
    path = Path(source)
    if path.suffix not in (".pt", ".npy", ".npz"):
        raise ValueError(
            f"{option}: unsupported file type {path.suffix!r} (use .pt, .npy or .npz)"
        )
    try:
        array = _read_array(path, f"{option} {source}")
    except (
        OSError,
        EOFError,
        ValueError,
        RuntimeError,
        zipfile.BadZipFile,
        pickle.PickleError,
    ) as err:
        if isinstance(err, ValueError) and str(err).startswith(option):
            raise
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if path.suffix == ".pt":  # torch's weights-only refusal is a paragraph
            reason = "no tensor saved with torch.save"
        raise ValueError(
            f"{option} {source}: not a readable {path.suffix} array file ({reason}); save one "
            "array of shape (N, *sample shape) with numpy.save / numpy.savez / torch.save"
        ) from None
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{option} {source}: holds no samples (shape {tuple(array.shape)})")
    bad = int((~torch.isfinite(array)).sum())
    if bad:
        raise ValueError(
            f"{option} {source}: {bad} of {array.numel()} values are NaN or inf; clean the "
            "data (statistics of non-finite data are meaningless)"
        )
    return array


def _read_array(path: Path, name: str) -> Tensor:
    """The first array of an array file, as float32 (raises what the readers raise)."""
    if path.suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
        if not isinstance(loaded, Tensor):
            raise ValueError(
                f"{name}: holds a {type(loaded).__name__}, not a tensor; save the array "
                "itself (torch.save(tensor, path))"
            )
        return loaded.float()
    array = np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        if not array.files:
            raise ValueError(f"{name}: the .npz holds no array; save one (numpy.savez)")
        array = array[array.files[0]]
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def model_data(
    model: LoadedModel,
    source: str,
    *,
    split: str = "train",
    samples: int = 256,
    seed: int = 0,
    denoiser_for: Callable[[Tensor | None], object] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(data, labels)`` from ``source`` (see the module docstring), checked against the
    model's sample shape. ``samples``, ``seed`` and ``denoiser_for`` (labels → the denoiser
    to sample, e.g. a guided one; default: the model, conditioned on the labels) are for
    ``self``; ``split`` for ``digits``. ``labels`` is ``None`` where the source has none."""
    labels: Tensor | None = None
    if source == "self":
        return self_samples(model, samples, seed, denoiser_for, progress)
    if source == "digits":
        from diffsolve.app.data import load_digit_labels, load_digits

        data = load_digits(split)  # type: ignore[arg-type]
        labels = load_digit_labels(split)  # type: ignore[arg-type]
    elif Path(source).is_dir():
        data = _image_folder(model, Path(source))
    elif Path(source).is_file():
        data = load_array(source)
    else:
        raise ValueError(
            f"--data {source!r}: not 'digits', 'self', an image folder or an array file"
        )
    if tuple(data.shape[1:]) != model.data_shape:
        raise ValueError(
            f"--data has samples of shape {tuple(data.shape[1:])}, the model takes "
            f"{model.data_shape}"
        )
    if labels is None and model.is_text and model.num_classes:
        labels = torch.arange(data.shape[0]) % model.num_classes  # point i: prompt i mod P
    return data, labels


def _image_folder(model: LoadedModel, folder: Path) -> Tensor:
    """Every image in ``folder`` at the model's image size, in ``[-1, 1]`` (encoded by the
    VAE of a latent model)."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    shape = model.image_shape
    if shape is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(
            f"--data {folder}: model {model.name!r} does not take images (its samples have "
            f"shape {model.data_shape}); give an array file"
        )
    channels, height, width = shape
    images = []
    for path in files:
        with Image.open(path) as image:
            picture = image.convert("L" if channels == 1 else "RGB").resize(
                (width, height), Image.Resampling.BICUBIC
            )
            array = np.asarray(picture, dtype=np.float32).reshape(height, width, channels)
        images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)
    data = torch.stack(images)
    if model.encode is None:
        return data
    return torch.cat([model.encode(chunk).cpu() for chunk in data.split(8)])


def self_samples(
    model: LoadedModel,
    count: int,
    seed: int = 0,
    denoiser_for: Callable[[Tensor | None], object] | None = None,
    progress: bool = False,
    nfe: int = SELF_NFE,
) -> tuple[Tensor, Tensor | None]:
    """``count`` samples of the model itself (:data:`SELF_SOLVER`, ``nfe`` evaluations,
    seeds ``seed…``); a conditional model's sample ``i`` under label (prompt) ``seed_i mod
    P``."""
    from diffsolve.app.seeds import noise_for_seeds
    from diffsolve.ode.sampling import sample
    from diffsolve.solvers.registry import setup_solver

    if count < 1:
        raise ValueError(f"--data self needs at least one sample, got {count}")
    solver, grid = setup_solver(SELF_SOLVER, model.schedule, nfe)
    plan = solver.plan(model.schedule, grid)
    seeds = list(range(seed, seed + count))
    labels = torch.tensor(seeds) % model.num_classes if model.num_classes else None
    scale = model.schedule.init_noise_sigma(float(grid[0]))
    bar = _bar(count, progress)
    out = []
    for i in range(0, count, 32):
        batch = seeds[i : i + 32]
        x = noise_for_seeds(batch, model.data_shape, scale, model.device)
        batch_labels = None if labels is None else labels[i : i + 32].to(model.device)
        if denoiser_for is not None:
            denoiser = denoiser_for(batch_labels)
        elif batch_labels is not None:
            denoiser = model.conditional(batch_labels)
        else:
            denoiser = model.denoiser
        with torch.inference_mode():
            out.append(sample(denoiser, x, solver, plan=plan).x.float().cpu())  # type: ignore[arg-type]
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return torch.cat(out), labels


def _bar(total: int, progress: bool) -> object:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"own samples ({SELF_SOLVER}, {SELF_NFE} NFE)", unit="img")
