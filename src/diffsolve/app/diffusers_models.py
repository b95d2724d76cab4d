"""diffusers folders as diffsolve models: pipelines (SD 1.x/2.x, SDXL, SD3, Flux, DDPM) and
bare model folders, loaded into the :class:`~diffsolve.app.loader.LoadedModel` every command
uses.

* **Pipeline folder** (``model_index.json``): the denoiser is ``unet`` or ``transformer``;
  the conventions come from ``scheduler/scheduler_config.json``
  (:func:`~diffsolve.integrations.diffusers.models.scheduler_conventions`); a VAE decodes
  samples to PNGs (and encodes an image folder given as data); text encoders turn
  ``prompts`` into a table of conditionings, one row per prompt and the negative prompt last
  (:class:`~diffsolve.integrations.diffusers.models.DiffusersNetwork`): prompt ``k`` is
  "class" ``k``, so per-seed prompts and classifier-free guidance reuse the class-conditional
  path. The image size (``height``/``width``, default the pipeline's) sets the latent shape.
* **Bare model folder** (``config.json`` with a diffusers ``_class_name`` and its weights)
  with ``scheduler_config.json`` beside it (or ``scheduler_config=`` a file): an
  unconditional or class-conditional ``UNet2DModel``; text-conditioned networks need their
  pipeline folder (the text encoders).

The fingerprint of a run covers every weight file of the denoiser (and of the text encoders
when prompts condition it); the EMS check uses the denoiser's weights only.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsolve.ode.model import ModelWrapper, network_fingerprint

PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
DENOISERS = ("unet", "transformer")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
#: FLUX.1-dev's embedded guidance when its pipeline is called without ``guidance_scale``.
FLUX_GUIDANCE = 3.5


def is_diffusers_folder(folder: Path) -> bool:
    """A pipeline folder, or a bare diffusers model folder (``config.json`` with a
    ``_class_name`` and no diffsolve ``network`` key)."""
    if (folder / PIPELINE_INDEX).is_file():
        return True
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return isinstance(config, dict) and "_class_name" in config and "network" not in config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err})") from None


@dataclass
class DiffusersParts:
    """What a diffusers folder yields: the denoiser network (its conditioning resolved), the
    model wrapper's arguments, and the optional VAE and text conditioning."""

    network: nn.Module
    denoiser_class: str
    scheduler_config: dict[str, Any]
    data_shape: tuple[int, ...]
    weight_files: tuple[Path, ...]
    pipeline: Any = None
    vae: Any = None
    num_classes: int | None = None
    image_size: tuple[int, int] | None = None


def load_diffusers(
    folder: Path,
    *,
    scheduler_config: str | Path | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    flux_guidance: float = FLUX_GUIDANCE,
) -> DiffusersParts:
    """Load a pipeline or bare model folder (see the module docstring) in float32 on the CPU."""
    if (folder / PIPELINE_INDEX).is_file():
        return _load_pipeline(
            folder, scheduler_config, prompts, negative_prompt, height, width, flux_guidance
        )
    return _load_bare(folder, scheduler_config, prompts)


def _scheduler_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: a diffusers model needs its scheduler config (the schedule "
            "and prediction type it was trained with); pass --scheduler-config FILE"
        )
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a scheduler config is a JSON object")
    return config


def _weights(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES))


def _load_component(folder: Path, library: str, class_name: str) -> Any:
    """``library.class_name.from_pretrained(folder)``, with an error naming the part."""
    quiet_libraries()
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise ValueError(
            f"{folder}: {library}.{class_name} cannot be imported (pip install {library})"
        ) from None
    try:
        return cls.from_pretrained(folder)
    except Exception as err:  # a part that does not load: name it, never a deep traceback
        raise ValueError(
            f"{folder}: cannot load {class_name} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else err})"
        ) from None


def _load_bare(
    folder: Path, scheduler_config: str | Path | None, prompts: Sequence[str] | None
) -> DiffusersParts:
    from diffsolve.integrations.diffusers.models import architecture_of

    config = _read_json(folder / "config.json")
    architecture = architecture_of(str(config["_class_name"]))
    if architecture.text:
        raise ValueError(
            f"{folder} holds a {architecture.name}, which is text-conditioned: load its "
            f"pipeline folder (the one with {PIPELINE_INDEX}), which has the text encoders"
        )
    if prompts:
        raise ValueError(f"--prompt: {folder} holds an unconditional {architecture.name}")
    network = _load_component(folder, "diffusers", architecture.name)
    sched = _scheduler_config(Path(scheduler_config or folder / SCHEDULER_CONFIG))
    return DiffusersParts(
        network=_wrap(network),
        denoiser_class=architecture.name,
        scheduler_config=sched,
        data_shape=(int(network.config.in_channels), *_side(network.config.sample_size)),
        weight_files=_weights(folder),
        num_classes=network.config.get("num_class_embeds"),
    )


def _side(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _load_pipeline(
    folder: Path,
    scheduler_config: str | Path | None,
    prompts: Sequence[str] | None,
    negative_prompt: str,
    height: int | None,
    width: int | None,
    flux_guidance: float,
) -> DiffusersParts:
    from diffsolve.integrations.diffusers.models import architecture_of

    index = _read_json(folder / PIPELINE_INDEX)
    name = next((n for n in DENOISERS if _component(index, n) is not None), None)
    if name is None:
        raise ValueError(f"{folder / PIPELINE_INDEX} names no 'unet' or 'transformer'")
    architecture = architecture_of(_component(index, name)[1])  # type: ignore[index]
    for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # clear errors before the rest
        entry = _component(index, part)
        if architecture.text and entry is not None:
            _load_component(folder / part, *entry)
    pipe = _from_pretrained(folder, index)
    network = getattr(pipe, name)
    sched = _scheduler_config(Path(scheduler_config or folder / "scheduler" / SCHEDULER_CONFIG))
    vae = getattr(pipe, "vae", None)
    weights = _weights(folder / name)
    if not architecture.text:
        if prompts:
            raise ValueError(f"--prompt: {folder} is an unconditional pipeline")
        return DiffusersParts(
            network=_wrap(network),
            denoiser_class=architecture.name,
            scheduler_config=sched,
            data_shape=(int(network.config.in_channels), *_side(network.config.sample_size)),
            weight_files=weights,
            pipeline=pipe,
            vae=vae,
            num_classes=network.config.get("num_class_embeds"),
        )
    image, shape = _latent_shape(pipe, network, architecture.name, height, width)
    texts = [*(prompts or [""]), negative_prompt]
    rows, fixed = _encode(pipe, texts, image)
    if architecture.name == "FluxTransformer2DModel" and network.config.get("guidance_embeds"):
        fixed["guidance"] = torch.tensor([float(flux_guidance)])
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, part, None) is not None:
            weights += _weights(folder / part)
    return DiffusersParts(
        network=_wrap(network, rows, fixed),
        denoiser_class=architecture.name,
        scheduler_config=sched,
        data_shape=shape,
        weight_files=weights,
        pipeline=pipe,
        vae=vae,
        num_classes=len(texts) - 1,
        image_size=image,
    )


def _wrap(network: nn.Module, rows: Any = None, fixed: Any = None) -> nn.Module:
    from diffsolve.integrations.diffusers.models import DiffusersNetwork

    return DiffusersNetwork(network.eval().requires_grad_(False), rows, fixed)


def _component(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry):
        return entry[0], entry[1]
    return None


def quiet_libraries() -> None:
    """diffusers' and transformers' loading chatter (progress bars, advice) off: the
    commands print what matters themselves."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is optional for pixel models
        pass


def _from_pretrained(folder: Path, index: dict[str, Any]) -> Any:
    from diffusers import DiffusionPipeline

    # parts saved as [null, null] (SD3 without T5) are passed as None, as when it was built
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    quiet_libraries()
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    except Exception as err:  # name the folder and the cause, never a deep traceback
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{folder}: cannot load the pipeline ({type(err).__name__}: {first})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_scale(pipe: Any) -> int:
    vae = getattr(pipe, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def _latent_shape(
    pipe: Any, network: nn.Module, cls: str, height: int | None, width: int | None
) -> tuple[tuple[int, int], tuple[int, ...]]:
    """The image size and latent shape of a text pipeline (default: the pipeline's own)."""
    scale = _vae_scale(pipe)
    if cls == "FluxTransformer2DModel":
        channels, multiple = int(network.config.in_channels) // 4, 2 * scale
        default = 128 * scale
    else:
        channels, multiple = int(network.config.in_channels), scale
        default = _side(network.config.sample_size)[0] * scale
    h, w = height or default, width or default
    if h % multiple or w % multiple:
        raise ValueError(
            f"--height/--width must be multiples of {multiple} for this pipeline, got {h}x{w}"
        )
    return (h, w), (channels, h // scale, w // scale)


def _encode(
    pipe: Any, texts: list[str], image: tuple[int, int]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Conditioning tables of ``texts`` (rows) and the conditioning shared by all samples."""
    kind = type(pipe).__name__
    with torch.no_grad():
        if kind.startswith("Flux"):
            embeds, pooled, _ = pipe.encode_prompt(texts, None, device="cpu")
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, {}
        if kind.startswith("StableDiffusion3"):
            embeds, _, pooled, _ = pipe.encode_prompt(
                texts, None, None, device="cpu", do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, {}
        if kind.startswith("StableDiffusionXL"):
            embeds, _, pooled, _ = pipe.encode_prompt(
                texts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            if not texts[-1] and pipe.config.get("force_zeros_for_empty_prompt", False):
                embeds[-1], pooled[-1] = 0, 0  # SDXL's unconditional branch, as its pipeline
            dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 else None
            ids = pipe._get_add_time_ids(image, (0, 0), image, embeds.dtype, dim)
            rows = {"encoder_hidden_states": embeds, "added_text_embeds": pooled}
            return rows, {"added_time_ids": ids}
        if hasattr(pipe, "encode_prompt"):
            embeds, _ = pipe.encode_prompt(texts, "cpu", 1, False)
            return {"encoder_hidden_states": embeds}, {}
    raise ValueError(f"{kind}: diffsolve does not know how to encode this pipeline's prompts")


def wrapper_for(
    parts: DiffusersParts, schedule: Any, prediction: str, dtype: torch.dtype | None
) -> ModelWrapper:
    """The :class:`~diffsolve.ModelWrapper` of a loaded diffusers denoiser."""
    from diffsolve.integrations.diffusers.models import architecture_of

    fingerprint = network_fingerprint(parts.network)
    return ModelWrapper(
        parts.network,
        schedule,
        prediction,
        architecture_of(parts.denoiser_class).time_input,
        model_dtype=dtype,
        fingerprint=fingerprint,
        data_shape=parts.data_shape,
    )


def vae_codec(vae: Any) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(decode, encode)`` between latents and images in ``[-1, 1]``, with the VAE's
    ``scaling_factor`` and ``shift_factor`` as the pipelines apply them."""
    scale = float(vae.config.get("scaling_factor", 1.0) or 1.0)
    shift = float(vae.config.get("shift_factor", 0.0) or 0.0)

    def decode(latents: Tensor) -> Tensor:
        parameter = next(vae.parameters())
        with torch.no_grad():
            z = latents.to(parameter.device, parameter.dtype) / scale + shift
            return vae.decode(z).sample.float().clamp(-1, 1)

    def encode(images: Tensor) -> Tensor:
        parameter = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist
            return ((dist.mean - shift) * scale).float()

    return decode, encode
