"""Tiny diffusers pipelines with deterministic random weights, for scheduler tests.

A helper module, not a test module: it builds real diffusers pipelines from small configs so the
suite can run ``pipe(...)`` end to end with a swapped-in scheduler on one CPU thread (4-20 ms a
call at 4 steps). Every model is built right after ``torch.manual_seed`` (its own fixed seed),
so the weights are the same on every call. Each builder returns a fresh pipeline with fresh
models and a fresh scheduler, float32 on CPU, progress bar disabled.

Builders (the schedulers are built from the configs the real checkpoints ship):

* :func:`ddpm_pipeline` - ``DDPMPipeline``: 3x8x8 ``UNet2DModel``, ``DDPMScheduler()``.
* :func:`ddim_pipeline` - ``DDIMPipeline``: the same UNet config (other seed), ``DDIMScheduler()``.
* :func:`sd_pipeline` - ``StableDiffusionPipeline``: ``UNet2DConditionModel`` (cross-attention
  dim 32), 4-channel ``AutoencoderKL`` with VAE scale factor 2 (16x16 images, 8x8 latents) and
  SD 1.5's own scheduler. That is a ``PNDMScheduler`` (PLMS, ``skip_prk_steps``), built with
  ``from_config(SD15_SCHEDULER_CONFIG)``, the hub's ``scheduler_config.json``, so its config also
  carries the key ``clip_sample=False`` that PNDM ignores. ``DDIMScheduler.from_config`` of it is
  the usual SD DDIM: scaled_linear 0.00085..0.012, ``clip_sample=False``,
  ``set_alpha_to_one=False``, ``steps_offset=1``, "leading" spacing.
* :func:`sd_img2img_pipeline` - ``StableDiffusionImg2ImgPipeline`` on the same components.
* :func:`sd3_pipeline` / :func:`sd3_img2img_pipeline` - ``StableDiffusion3(Img2Img)Pipeline``:
  ``SD3Transformer2DModel`` (patch 2, 16 latent channels), 16-channel VAE with SD3's
  scaling/shift factors, ``FlowMatchEulerDiscreteScheduler`` with SD3-medium's config (shift 3).
* :func:`flux_pipeline` / :func:`flux_img2img_pipeline` - ``Flux(Img2Img)Pipeline``:
  ``FluxTransformer2DModel`` (64 = 16 channels x 2x2 packed, guidance embedding like
  FLUX.1-dev), 16-channel VAE, ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's config
  (dynamic shifting: the pipeline passes ``sigmas=linspace(1, 1/n, n)`` and ``mu`` from the
  image sequence length to ``set_timesteps``).

Text encoders: the text-conditioned pipelines are built with every ``text_encoder*`` and
``tokenizer*`` set to ``None`` (and ``safety_checker=None``, ``feature_extractor=None``,
``requires_safety_checker=False`` for SD). Their constructors accept ``None``, and
``encode_prompt`` never touches the encoders when the embeddings are passed in, so :func:`run`
passes fixed random ``prompt_embeds`` and ``negative_prompt_embeds`` (plus the pooled pair for
SD3 and Flux) from :func:`conditioning`; guidance on or off (e.g. ``guidance_scale=1.0`` or
``7.5`` for SD, ``true_cfg_scale`` for Flux) works. A text ``prompt`` would fail.

:func:`run` returns the raw output as a float32 tensor: the final latents
(``output_type="latent"``) of the latent pipelines - for Flux *packed*, shape ``(B, 16, 64)`` - and
for DDPM/DDIM the final sample before the pipelines' ``(x / 2 + 0.5).clamp(0, 1)``, which would
saturate many pixels of these untrained models (``raw=False`` gives the clamped
``output_type="pt"`` image instead).

Swapping schedulers: :func:`swap` does ``pipe.scheduler = cls.from_config(config, **overrides)``.
What diffusers 0.42.1 allows:

* ``DDPMPipeline`` calls ``scheduler.step(out, t, x, generator=...)``;
  ``UniPCMultistepScheduler.step`` has no ``generator`` and raises ``TypeError`` there.
* ``DDIMPipeline.__init__`` converts any scheduler to ``DDIMScheduler``; assigning
  ``pipe.scheduler`` later bypasses that, but the loop calls
  ``step(..., eta=, use_clipped_model_output=, generator=)``, which only DDIM's signature takes.
* ``from_config`` drops the keys the source config took as defaults (``_use_default_values``):
  every key of ``DDPMScheduler()`` is one, so a scheduler swapped into :func:`ddpm_pipeline`
  gets only its *own* defaults (e.g. DPMSolverMultistep: no thresholding, while DDPM clips x0).
* Flow: ``DPMSolverMultistepScheduler`` has ``flow_shift``, not ``shift``; pass
  ``flow_shift=3.0`` to keep SD3's shift. It has no ``sigmas`` argument: FluxPipeline drops its
  sigmas when the config has ``use_flow_sigmas`` (FluxImg2ImgPipeline does not check, so it
  raises there); ``mu`` is used only with ``use_dynamic_shifting=True``, which Flux's config
  carries over. The SD3 and Flux img2img pipelines call ``scheduler.scale_noise``, which only
  the flow-matching schedulers have (not DPMSolverMultistep or UniPC).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

#: ``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``scheduler/scheduler_config.json``.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

#: ``stabilityai/stable-diffusion-3-medium-diffusers``, ``scheduler/scheduler_config.json``.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

#: ``black-forest-labs/FLUX.1-dev``, ``scheduler/scheduler_config.json``.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

#: Image side of the latent pipelines, in pixels (VAE scale factor 2: 8x8 latents).
IMAGE_SIZE = 16
#: Shapes of the fixed random text conditioning.
TEXT_TOKENS = 8
TEXT_DIM = 32
POOLED_DIM = 32
#: Seed of :func:`conditioning` (embeddings, img2img image); ``run``'s ``seed`` is the noise's.
CONDITIONING_SEED = 1234
#: ``strength`` :func:`run` passes to the img2img pipelines.
STRENGTH = 0.75

_PIXEL = (DDPMPipeline, DDIMPipeline)
_SD = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)
_NO_QUANT_CONV = {"use_quant_conv": False, "use_post_quant_conv": False}  # as SD3's, Flux's VAE
_IMG2IMG = (StableDiffusionImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline)


def _ready(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded(seed: int, build: Any, **config: Any) -> Any:
    torch.manual_seed(seed)
    return build(**config).eval().requires_grad_(False)


def _unet2d(seed: int) -> UNet2DModel:
    return _seeded(
        seed,
        UNet2DModel,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )


def _vae(seed: int, latent_channels: int, **config: Any) -> AutoencoderKL:
    return _seeded(
        seed,
        AutoencoderKL,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        **config,
    )


def ddpm_pipeline() -> DDPMPipeline:
    """``DDPMPipeline`` with a tiny 3x8x8 ``UNet2DModel`` and ``DDPMScheduler()``."""
    return _ready(DDPMPipeline(unet=_unet2d(0), scheduler=DDPMScheduler()))


def ddim_pipeline() -> DDIMPipeline:
    """``DDIMPipeline`` with a tiny 3x8x8 ``UNet2DModel`` and ``DDIMScheduler()``."""
    return _ready(DDIMPipeline(unet=_unet2d(1), scheduler=DDIMScheduler()))


def _sd_components() -> dict[str, Any]:
    unet = _seeded(
        10,
        UNet2DConditionModel,
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
    )
    return {
        "vae": _vae(11, 4),
        "text_encoder": None,
        "tokenizer": None,
        "unet": unet,
        "scheduler": PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def sd_pipeline() -> StableDiffusionPipeline:
    """``StableDiffusionPipeline``: tiny UNet and VAE, no text encoder, SD 1.5's PNDM config."""
    return _ready(StableDiffusionPipeline(**_sd_components()))


def sd_img2img_pipeline() -> StableDiffusionImg2ImgPipeline:
    """``StableDiffusionImg2ImgPipeline`` with :func:`sd_pipeline`'s components."""
    components = sd_pipeline().components
    return _ready(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))


def _sd3_components() -> dict[str, Any]:
    transformer = _seeded(
        20,
        SD3Transformer2DModel,
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=8,
    )
    vae = _vae(21, 16, scaling_factor=1.5305, shift_factor=0.0609, **_NO_QUANT_CONV)
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """``StableDiffusion3Pipeline``: tiny transformer and VAE, no text encoders, shift 3."""
    return _ready(StableDiffusion3Pipeline(**_sd3_components()))


def sd3_img2img_pipeline() -> StableDiffusion3Img2ImgPipeline:
    """``StableDiffusion3Img2ImgPipeline`` with :func:`sd3_pipeline`'s components."""
    return _ready(StableDiffusion3Img2ImgPipeline(**_sd3_components()))


def _flux_components() -> dict[str, Any]:
    transformer = _seeded(
        30,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = _vae(31, 16, scaling_factor=0.3611, shift_factor=0.1159, **_NO_QUANT_CONV)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "transformer": transformer,
    }


def flux_pipeline() -> FluxPipeline:
    """``FluxPipeline``: tiny transformer and VAE, no text encoders, FLUX.1-dev's scheduler."""
    return _ready(FluxPipeline(**_flux_components()))


def flux_img2img_pipeline() -> FluxImg2ImgPipeline:
    """``FluxImg2ImgPipeline`` with :func:`flux_pipeline`'s components."""
    return _ready(FluxImg2ImgPipeline(**_flux_components()))


def swap(pipe: DiffusionPipeline, scheduler_cls: Any, **overrides: Any) -> DiffusionPipeline:
    """Set ``pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)``."""
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    return pipe


def conditioning(pipe: DiffusionPipeline, seed: int = CONDITIONING_SEED) -> dict[str, Any]:
    """The fixed random inputs ``pipe`` needs besides noise: embeddings, img2img image."""
    if isinstance(pipe, _PIXEL):
        return {}
    g = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
        "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
    }
    if not isinstance(pipe, _SD):
        kwargs["pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
    if isinstance(pipe, _IMG2IMG):
        kwargs["image"] = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # in [0, 1]
        kwargs["strength"] = STRENGTH
    return kwargs


@contextmanager
def _last_step(scheduler: Any) -> Iterator[list[torch.Tensor]]:
    """Record the ``prev_sample`` of the scheduler's steps (the output object is unchanged)."""
    last: list[torch.Tensor] = []
    step = scheduler.step

    @functools.wraps(step)
    def recording(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        last[:] = [out[0]]  # SchedulerOutput or tuple: prev_sample first
        return out

    scheduler.step = recording
    try:
        yield last
    finally:
        del scheduler.step


def run(
    pipe: DiffusionPipeline, *, steps: int, seed: int = 0, raw: bool = True, **kwargs: Any
) -> torch.Tensor:
    """``pipe(...)`` with ``steps`` inference steps; its raw output as a float32 tensor.

    Deterministic given ``seed`` (a CPU generator for the pipeline) and the fixed
    :func:`conditioning`. ``kwargs`` go to the pipeline and override those defaults (e.g.
    ``guidance_scale=1.0``, ``strength=0.5``, ``eta=1.0``). Latent pipelines return latents;
    DDPM/DDIM return the last ``scheduler.step``'s sample, or with ``raw=False`` the pipeline's
    clamped ``output_type="pt"`` image.
    """
    call: dict[str, Any] = {
        "num_inference_steps": steps,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "pt" if isinstance(pipe, _PIXEL) else "latent",
        "return_dict": False,
        **conditioning(pipe),
    }
    if not isinstance(pipe, (*_PIXEL, StableDiffusionImg2ImgPipeline)):
        call["height"] = call["width"] = IMAGE_SIZE
    call.update(kwargs)
    with torch.no_grad():
        if isinstance(pipe, _PIXEL) and raw:
            with _last_step(pipe.scheduler) as last:
                pipe(**call)
            return last[0].float()
        return torch.as_tensor(pipe(**call)[0]).float()
