r"""diffusers denoising networks as diffsolve networks: one calling convention for all.

diffusers' denoisers take their inputs under different names and layouts: ``UNet2DModel``
``(sample, timestep, class_labels)``, ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL) ``(sample,
timestep, encoder_hidden_states, added_cond_kwargs)``, ``SD3Transformer2DModel``
``(hidden_states, encoder_hidden_states, pooled_projections, timestep)`` and
``FluxTransformer2DModel``, which takes its latents packed in 2×2 patches with position ids,
its time as :math:`\sigma` and FLUX.1-dev's guidance as an embedding. An
:class:`Architecture` describes one of them; :class:`DiffusersNetwork` makes any of them a
network ``net(x, timestep, class_labels=None)`` on *unpacked* latents ``(B, C, H, W)``, where
``class_labels`` picks, per sample, one row of a table of text conditionings (prompt ``k`` is
row ``k``, the negative prompt the last), so that the application's class-conditional
machinery (per-seed labels, classifier-free guidance against a null class) serves text
models as it serves class-conditional ones.

:func:`scheduler_conventions` reads what a model folder's ``scheduler_config.json`` says
about the process: the noise schedule, the prediction type and, for flow matching, the
sampling shift (Flux: from the image size, as its pipeline computes ``mu``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffsolve.ode.model import normalize_prediction
from diffsolve.ode.schedule import NoiseSchedule, RectifiedFlow, VPDiscrete

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Conventions",
    "DiffusersNetwork",
    "architecture_of",
    "scheduler_conventions",
]


def _text(cond: Mapping[str, Tensor], *names: str) -> dict[str, Tensor]:
    """The named conditioning entries that are present."""
    return {name: cond[name] for name in names if name in cond}


def _unet2d(net: nn.Module, x: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
    labels = cond.get("class_labels")
    return net(x, timestep, class_labels=labels).sample


def _unet2d_condition(
    net: nn.Module, x: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]
) -> Tensor:
    added = {k.removeprefix("added_"): v for k, v in cond.items() if k.startswith("added_")}
    kwargs: dict[str, Any] = _text(cond, "encoder_hidden_states")
    if added:
        kwargs["added_cond_kwargs"] = added
    return net(x, timestep, **kwargs).sample


def _sd3(net: nn.Module, x: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
    text = _text(cond, "encoder_hidden_states", "pooled_projections")
    return net(hidden_states=x, timestep=timestep, **text).sample


def pack_latents(x: Tensor) -> Tensor:
    """Flux's 2×2 patch packing: ``(B, C, H, W)`` → ``(B, H/2 · W/2, 4C)``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`."""
    b = x.shape[0]
    x = x.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)


def _image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Flux's position ids of the packed latent patches: ``(H/2 · W/2, 3)``."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def _flux(net: nn.Module, x: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
    """Unpacked latents ``(B, C, H, W)``, or the pipeline's own packed ``(B, H/2 · W/2, 4C)``
    of a square image (what ``FluxPipeline`` hands its scheduler)."""
    packed = x.ndim == 3
    if packed:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(
                f"packed Flux latents of {x.shape[1]} tokens: not a square image; give "
                "unpacked latents (B, C, H, W)"
            )
        c, h, w = x.shape[2] // 4, 2 * side, 2 * side
    else:
        _, c, h, w = x.shape
    text = _text(cond, "encoder_hidden_states", "pooled_projections")
    tokens = text["encoder_hidden_states"].shape[1]
    guidance = cond.get("guidance")
    out = net(
        hidden_states=x if packed else pack_latents(x),
        timestep=timestep,
        img_ids=_image_ids(h, w, x.device, x.dtype),
        txt_ids=torch.zeros(tokens, 3, device=x.device, dtype=x.dtype),
        guidance=None if guidance is None else guidance.to(x.dtype).expand(x.shape[0]),
        **text,
    ).sample
    return out if packed else unpack_latents(out, c, h, w)


@dataclass(frozen=True)
class Architecture:
    """How to call one diffusers denoiser class.

    Attributes:
        name: The class name (``config.json``'s ``_class_name``).
        call: ``(network, x, timestep, conditioning) -> output`` on unpacked latents.
        time_input: The network's time: ``"timestep"`` (VP: :math:`tN - 1`; flow:
            :math:`1000\\,t`) or ``"t"`` (Flux takes :math:`\\sigma = t` and scales it itself).
        text: Whether it is text-conditioned (needs encoder hidden states).
        pooled: Whether it also takes pooled text embeddings (``pooled_projections``).
    """

    name: str
    call: Callable[[nn.Module, Tensor, Tensor, Mapping[str, Tensor]], Tensor]
    time_input: str = "timestep"
    text: bool = True
    pooled: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("UNet2DModel", _unet2d, text=False),
        Architecture("UNet2DConditionModel", _unet2d_condition),
        Architecture("SD3Transformer2DModel", _sd3, pooled=True),
        Architecture("FluxTransformer2DModel", _flux, time_input="t", pooled=True),
    )
}


def architecture_of(network: nn.Module | str) -> Architecture:
    """The :class:`Architecture` of a diffusers network (or class name), or a clear error."""
    name = network if isinstance(network, str) else type(network).__name__
    if name not in ARCHITECTURES:
        raise ValueError(
            f"{name}: diffsolve loads diffusers denoisers of the classes "
            f"{', '.join(ARCHITECTURES)}; wrap another network in a .py entry point that "
            "returns a diffsolve.ModelWrapper (README, 'Bring your own model')"
        )
    return ARCHITECTURES[name]


class DiffusersNetwork(nn.Module):
    """A diffusers denoiser as ``net(x, timestep, class_labels=None)`` on unpacked latents.

    Args:
        network: A model of one of :data:`ARCHITECTURES`.
        rows: Per-row conditioning tables, each ``(R, ...)`` (e.g. ``encoder_hidden_states``
            of R prompts, ``pooled_projections``, SDXL's ``added_text_embeds``): sample
            ``i`` is conditioned on row ``class_labels[i]``. Held as plain attributes (not
            state): the network's fingerprint is its weights', whatever the prompts.
        fixed: Conditioning shared by every sample (SDXL's ``added_time_ids``, Flux's
            ``guidance``), batch 1 or a scalar.

    A class-conditional ``UNet2DModel`` gets ``class_labels`` itself; without ``rows`` a
    text model is refused at construction.
    """

    def __init__(
        self,
        network: nn.Module,
        rows: Mapping[str, Tensor] | None = None,
        fixed: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.architecture = architecture_of(network)
        self.rows = dict(rows or {})
        self.fixed = dict(fixed or {})
        if self.architecture.text and "encoder_hidden_states" not in self.rows:
            raise ValueError(
                f"{self.architecture.name} is text-conditioned: give its prompt embeddings "
                "(rows['encoder_hidden_states'])"
            )
        sizes = {v.shape[0] for v in self.rows.values()}
        if len(sizes) > 1:
            raise ValueError(f"conditioning tables have different numbers of rows: {sizes}")
        self.num_rows = sizes.pop() if sizes else 0

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DiffusersNetwork:
        """``.to(device/dtype)`` moves the conditioning tables with the network."""
        super()._apply(fn, recurse)
        self.rows = {k: fn(v) for k, v in self.rows.items()}
        self.fixed = {k: fn(v) for k, v in self.fixed.items()}
        return self

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The network output at ``x`` (shape ``(B, C, H, W)``) and network time ``timestep``."""
        cond: dict[str, Tensor] = {}
        if self.rows:
            if class_labels is None:
                if self.num_rows != 1:
                    raise ValueError(
                        f"{self.num_rows} prompts: give class_labels (the prompt of each sample)"
                    )
                class_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            index = class_labels.to(device=x.device, dtype=torch.long)
            cond = {k: _cast(v, x)[index] for k, v in self.rows.items()}
        elif class_labels is not None:
            cond["class_labels"] = class_labels.to(x.device)
        for key, value in self.fixed.items():
            value = _cast(value, x)
            cond[key] = value.expand(x.shape[0], *value.shape[1:]) if value.ndim else value
        return self.architecture.call(self.network, x, timestep.to(x.device), cond)


def _cast(value: Tensor, x: Tensor) -> Tensor:
    """A conditioning tensor on ``x``'s device (floating ones in ``x``'s dtype)."""
    dtype = x.dtype if value.is_floating_point() else value.dtype
    return value.to(device=x.device, dtype=dtype)


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conventions:
    """What a scheduler config says about a model: its noise schedule (with the sampling
    shift of a flow model) and its prediction type (diffsolve's name)."""

    schedule: NoiseSchedule
    prediction: str


#: What tells a flow-matching config from others (:mod:`.scheduler` reads it from these).
FLOW_MATCH_MARKS = frozenset({"_class_name", "shift", "base_shift"})


def flux_shift(config: Mapping[str, Any], image_seq_len: int) -> float:
    """The shift of a dynamic-shifting flow config at ``image_seq_len`` packed tokens, as
    Flux's pipeline computes it: :math:`\\mu` linear in the sequence length between
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``, shift
    :math:`e^\\mu` (``time_shift_type="exponential"``, the default) or :math:`\\mu`."""
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base, top = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    mu = base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)
    exponential = config.get("time_shift_type", "exponential") == "exponential"
    return math.exp(mu) if exponential else mu


def scheduler_conventions(
    config: Mapping[str, Any],
    prediction: str | None = None,
    image_seq_len: int | None = None,
) -> Conventions:
    """The schedule and prediction type of a diffusers scheduler config, read as the
    diffsolve schedulers read it (VP: the scheduler's own :math:`\\bar\\alpha`; flow
    matching: rectified flow up to :math:`t = 1`, velocity prediction).

    Args:
        config: A ``scheduler_config.json`` (any diffusers scheduler with betas, or a
            flow-matching one).
        prediction: Overrides the config's ``prediction_type`` (e.g. ``"v_prediction"``).
        image_seq_len: Packed latent tokens of the image size to sample (dynamic shifting).
    """
    from diffsolve.integrations.diffusers.config import SCHEDULE_KEYS
    from diffsolve.integrations.diffusers.scheduler import scheduler_classes

    adapter_cls = scheduler_classes()["DiffsolveDPMSolverPPScheduler"]
    kept = {k: v for k, v in config.items() if k in SCHEDULE_KEYS | FLOW_MATCH_MARKS}
    adapter = adapter_cls.from_config(kept)
    schedule = adapter.schedule
    predicted = normalize_prediction(prediction or str(adapter.config.prediction_type))
    if isinstance(schedule, VPDiscrete):
        schedule = schedule.for_prediction(predicted)  # cosine betas + epsilon: from λ = -5.1
    if isinstance(schedule, RectifiedFlow):
        shift = float(config.get("shift", config.get("flow_shift", 1.0)))
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError("a dynamic-shifting flow config needs the image size")
            shift = flux_shift(config, image_seq_len)
        schedule = RectifiedFlow(shift=shift)  # clipped where λ is finite, as digits-flow
    return Conventions(schedule, predicted)
