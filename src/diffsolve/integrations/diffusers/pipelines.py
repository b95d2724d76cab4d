r"""diffusers pipelines as diffsolve denoisers: DPM-Solver-v3's statistics for SD, SD3 & co.

A pipeline's denoising network (``pipe.unet`` or ``pipe.transformer``) with fixed text
conditioning is a function of ``(x, t)`` only; :func:`denoiser_from_pipeline` wraps it into a
:class:`~diffsolve.ModelWrapper` on the schedule the diffsolve schedulers read from
``pipe.scheduler.config`` (VP: the scheduler's own :math:`\bar\alpha`, network time
:math:`tN - 1`; flow matching: rectified flow :math:`\alpha = 1-t, \sigma = t`, velocity
prediction, network time :math:`1000\,t = 1000\,\sigma`). With ``guidance_scale > 1`` and a
negative prompt it is the classifier-free-guided model
:math:`\hat\epsilon = \hat\epsilon_u + w(\hat\epsilon_c - \hat\epsilon_u)`, both branches in
one batched call. :func:`ems_for_pipeline` then estimates the EMS
(:func:`~diffsolve.stats.ems.compute.compute_ems`) from latents, e.g. for SD 1.5::

    import torch
    from diffusers import StableDiffusionPipeline
    from diffsolve.integrations.diffusers import DPMSolverV3Scheduler, ems_for_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16
    ).to("cuda")
    embeds, negative = pipe.encode_prompt("a photo", "cuda", 1, True, "")
    latents = ...  # (M, 4, 64, 64): model samples, e.g. 1024 latents from DPM-Solver++ 200 steps
    ems = ems_for_pipeline(pipe, latents, prompt_embeds=negative,  # K = 24, N = 1200: RECIPE
                           batch_size="auto", device="cuda", progress=True)
    ems.save("sd15-ems.safetensors")
    pipe.scheduler = DPMSolverV3Scheduler.from_config(
        pipe.scheduler.config, ems_path="sd15-ems.safetensors"
    )

Attention: PyTorch's ``scaled_dot_product_attention`` kernels have no forward-mode AD on CPU
(flash) and on CUDA (flash, memory-efficient); the estimator's ``jvp="auto"`` then takes its
``"forward_math_attention"`` path, which covers every processor that calls
``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``, ``JointAttnProcessor2_0``).
Processors with their own kernels (xformers) are not covered: :func:`differentiable_attention`
swaps them, for the duration of a ``with`` block, for diffusers' plain-PyTorch processors and
restores the model's own afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models import attention_processor as ap
from torch import Tensor, nn

from diffsolve.integrations.diffusers.models import architecture_of
from diffsolve.ode.model import ModelWrapper
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.stats.ems import EMS
from diffsolve.stats.ems.compute import FLOW_T_START, compute_ems

#: Processor class name -> the processor that computes the same attention with plain PyTorch
#: ops (matmul, softmax: every AD mode works). Joint attention (SD3, Flux) has no plain
#: processor in diffusers; its xformers variant becomes the SDPA one.
PLAIN_PROCESSORS: dict[str, type] = {
    "AttnProcessor2_0": ap.AttnProcessor,
    "XFormersAttnProcessor": ap.AttnProcessor,
    "AttnAddedKVProcessor2_0": ap.AttnAddedKVProcessor,
    "XFormersAttnAddedKVProcessor": ap.AttnAddedKVProcessor,
    "XFormersJointAttnProcessor": ap.JointAttnProcessor2_0,
}


@contextmanager
def differentiable_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s attention runs on processors every AD mode supports.

    Each processor named in :data:`PLAIN_PROCESSORS` is replaced by a fresh instance of its
    plain counterpart (e.g. ``AttnProcessor2_0`` and xformers' by ``AttnProcessor``); the
    others are kept. The model's own processors are restored on exit, also after an error.

    Args:
        model: A diffusers model with ``attn_processors`` / ``set_attn_processor`` (UNets,
            transformers).
    """
    if not hasattr(model, "attn_processors") or not hasattr(model, "set_attn_processor"):
        raise ValueError(
            f"{type(model).__name__} has no attention processors (attn_processors / "
            "set_attn_processor): not a diffusers attention model"
        )
    saved = dict(model.attn_processors)
    plain = {
        name: PLAIN_PROCESSORS[type(p).__name__]() if type(p).__name__ in PLAIN_PROCESSORS else p
        for name, p in saved.items()
    }
    model.set_attn_processor(plain)
    try:
        yield model
    finally:
        model.set_attn_processor(saved)


class ConditionedNetwork(nn.Module):
    """A diffusers denoising network with fixed conditioning: ``forward(x, timestep)``.

    Args:
        network: ``UNet2DConditionModel``, ``SD3Transformer2DModel``,
            ``FluxTransformer2DModel`` or ``UNet2DModel``
            (:data:`~diffsolve.integrations.diffusers.models.ARCHITECTURES`; Flux on unpacked
            latents ``(B, C, H, W)``).
        conditioning: Keyword arguments of every call (e.g. ``encoder_hidden_states``,
            ``pooled_projections``, Flux's ``guidance``, SDXL's ``added_cond_kwargs``); a
            tensor with batch size 1 is broadcast to the batch.
        negative: The unconditional branch's arguments for classifier-free guidance.
        guidance_scale: :math:`w`; with ``negative`` and :math:`w \\ne 1` the output is
            :math:`u + w(c - u)` of the two branches, evaluated as one batch.

    Per-call keyword arguments (e.g. per-sample prompts through ``compute_ems``'s
    ``conditioning``) override ``conditioning`` for that call.
    """

    def __init__(
        self,
        network: nn.Module,
        conditioning: Mapping[str, Any] | None = None,
        negative: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.network = network
        self.architecture = architecture_of(network)
        self.conditioning = _flat(conditioning or {})
        self.negative = _flat(negative) if negative is not None else None
        self.guidance_scale = float(guidance_scale)

    def _call(self, x: Tensor, timestep: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        ready = {k: _batched(v, x.shape[0], x.device, x.dtype) for k, v in kwargs.items()}
        return self.architecture.call(self.network, x, timestep, ready)

    def forward(self, x: Tensor, timestep: Tensor, **overrides: Any) -> Tensor:
        """The (guided) network output at ``x``, network time ``timestep`` (shape ``(B,)``)."""
        cond = {**self.conditioning, **_flat(overrides)}
        if self.negative is None or self.guidance_scale == 1.0:
            return self._call(x, timestep, cond)
        n = x.shape[0]
        neg = {k: _batched(v, n, x.device, x.dtype) for k, v in self.negative.items()}
        pos = {k: _batched(v, n, x.device, x.dtype) for k, v in cond.items()}
        both = {k: torch.cat([neg[k], pos[k]]) for k in pos}
        out = self._call(torch.cat([x, x]), torch.cat([timestep, timestep]), both)
        uncond, conditional = out.chunk(2)
        return uncond + self.guidance_scale * (conditional - uncond)


def _flat(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SDXL's ``added_cond_kwargs={"text_embeds", "time_ids"}`` as the architecture's
    ``added_text_embeds`` / ``added_time_ids``; other keys as they are."""
    out = {k: v for k, v in kwargs.items() if k != "added_cond_kwargs"}
    for key, value in (kwargs.get("added_cond_kwargs") or {}).items():
        out[f"added_{key}"] = value
    return out


def _batched(value: Any, n: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A tensor on ``device`` (floating ones in ``dtype``), its batch of 1 expanded to ``n``."""
    if not isinstance(value, Tensor):
        return value
    value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if value.ndim and value.shape[0] == 1 and n != 1:
        value = value.expand(n, *value.shape[1:])
    return value


def pipeline_schedule(pipe: Any) -> tuple[NoiseSchedule, str]:
    """The noise schedule and prediction type diffsolve's schedulers read from
    ``pipe.scheduler.config`` (flow-matching configs: rectified flow and ``"flow"``)."""
    from diffsolve.integrations.diffusers.scheduler import scheduler_classes

    adapter = scheduler_classes()["DiffsolveDPMSolverPPScheduler"].from_config(
        pipe.scheduler.config
    )
    return adapter.schedule, str(adapter.config.prediction_type)


def _network_and_names(pipe: Any) -> tuple[nn.Module, str, str | None]:
    """The denoising network and the names of its text and pooled-text arguments."""
    network = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if network is None:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer")
    pooled = "pooled_projections" if architecture_of(network).pooled else None
    return network, "encoder_hidden_states", pooled


def denoiser_from_pipeline(
    pipe: Any,
    prompt_embeds: Tensor | None = None,
    *,
    pooled_prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    negative_pooled_prompt_embeds: Tensor | None = None,
    guidance_scale: float = 1.0,
    network_kwargs: Mapping[str, Any] | None = None,
) -> ModelWrapper:
    """A diffsolve denoiser of ``pipe``'s network under fixed text embeddings.

    Args:
        pipe: A ``StableDiffusion*Pipeline`` (``unet``), ``StableDiffusion3*Pipeline`` or
            ``Flux*Pipeline`` (``transformer``), text encoders not needed.
        prompt_embeds: ``(1 or B, tokens, dim)`` text embeddings (``pipe.encode_prompt``);
            the empty prompt's for the unconditional model the paper estimates EMS on.
        pooled_prompt_embeds: SD3's pooled embeddings ``(1 or B, dim)``.
        negative_prompt_embeds, negative_pooled_prompt_embeds: The unconditional branch for
            classifier-free guidance.
        guidance_scale: :math:`w` (guidance needs the negative embeddings).
        network_kwargs: More fixed network arguments (e.g. SDXL's ``added_cond_kwargs``,
            FLUX.1-dev's ``guidance``: ``torch.tensor([3.5])``).

    Returns:
        A :class:`~diffsolve.ModelWrapper` with ``differentiable_eps`` (for
        :func:`~diffsolve.stats.ems.compute.compute_ems`) and ``with_kwargs``.
    """
    network, text_name, pooled_name = _network_and_names(pipe)
    if guidance_scale != 1.0 and negative_prompt_embeds is None:
        raise ValueError("guidance_scale != 1 needs negative_prompt_embeds")
    cond: dict[str, Any] = dict(network_kwargs or {})
    neg: dict[str, Any] | None = None
    if prompt_embeds is not None:
        cond[text_name] = prompt_embeds
    if pooled_name is not None:
        if pooled_prompt_embeds is None:
            raise ValueError(f"{type(network).__name__} needs pooled_prompt_embeds")
        cond[pooled_name] = pooled_prompt_embeds
    if negative_prompt_embeds is not None and guidance_scale != 1.0:
        neg = {**dict(network_kwargs or {}), text_name: negative_prompt_embeds}
        if pooled_name is not None:
            if negative_pooled_prompt_embeds is None:
                raise ValueError("guidance needs negative_pooled_prompt_embeds for SD3")
            neg[pooled_name] = negative_pooled_prompt_embeds
    schedule, prediction = pipeline_schedule(pipe)
    wrapped = ConditionedNetwork(network, cond, neg, guidance_scale)
    return ModelWrapper(wrapped, schedule, prediction, wrapped.architecture.time_input)


def ems_for_pipeline(
    pipe: Any,
    latents: Tensor,
    *,
    prompt_embeds: Tensor | None = None,
    pooled_prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    negative_pooled_prompt_embeds: Tensor | None = None,
    guidance_scale: float = 1.0,
    network_kwargs: Mapping[str, Any] | None = None,
    plain_attention: bool = False,
    **options: Any,
) -> EMS:
    """DPM-Solver-v3's EMS of ``pipe``'s network (:func:`denoiser_from_pipeline`) from
    ``latents`` ``(M, C, H, W)`` (the model's own samples, as the paper uses for SD; Flux:
    the packed ``(M, tokens, 64)`` its pipeline hands the scheduler, so that
    ``DPMSolverV3Scheduler`` inside ``FluxPipeline`` can use them).

    ``options`` go to :func:`~diffsolve.stats.ems.compute.compute_ems` (``samples``,
    ``grid_size``, ``batch_size``, ``jvp``, ``device``, ``progress``, ``checkpoint``,
    ``conditioning``: per-latent arguments such as ``{"encoder_hidden_states": E}`` with
    ``E`` of shape ``(M, tokens, dim)``...). ``plain_attention`` runs the estimation inside
    :func:`differentiable_attention`. The result's time range defaults to the schedule's
    (flow matching, whose schedule runs to pure noise at :math:`t = 1`: from
    :data:`FLOW_T_START`; DPM-Solver-v3's first step from :math:`t = 1` needs no statistics);
    pass it to ``DPMSolverV3Scheduler`` through a file (``ems.save(path)``,
    ``ems_path=path``).
    """
    model = denoiser_from_pipeline(
        pipe,
        prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        guidance_scale=guidance_scale,
        network_kwargs=network_kwargs,
    )
    options.setdefault("model_name", type(pipe).__name__)
    if guidance_scale != 1.0:
        options.setdefault("guidance", {"method": "cfg", "scale": float(guidance_scale)})
    network = model.model.network  # type: ignore[attr-defined]
    if not plain_attention:
        return compute_ems(model, latents, **options)
    with differentiable_attention(network):
        return compute_ems(model, latents, **options)


__all__ = [
    "FLOW_T_START",
    "PLAIN_PROCESSORS",
    "ConditionedNetwork",
    "denoiser_from_pipeline",
    "differentiable_attention",
    "ems_for_pipeline",
    "pipeline_schedule",
]
