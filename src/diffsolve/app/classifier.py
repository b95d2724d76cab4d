r"""A time-conditional classifier of noisy 8x8 digits, for classifier guidance and as an
accuracy meter.

:class:`DigitsClassifier` predicts the logits of :math:`p(c \mid x_t)` for the digits demo's
noisy inputs :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon` (VP discrete schedule: linear
betas 1e-4 … 0.02 over 1000 steps), given the network time of the ``digits`` model, the
(fractional) training timestep ``i ∈ [0, 999]``. Its gradient
:math:`\nabla_{x_t}\log p(c\mid x_t)` drives
:class:`diffsolve.wrappers.guidance.ClassifierGuidance`
(Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233);
evaluated at timestep 0 it classifies clean samples, which makes it the accuracy meter of
guided sampling (:func:`classifier_accuracy`).

The shipped weights live in ``demos/digits-classifier/`` (``config.json`` +
``model.safetensors``) and are trained by ``scripts/train_classifier.py`` on the train split
of :func:`diffsolve.app.data.load_digits` only; the config records the test-split accuracies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as fn

from diffsolve.app.loader import DEMO_DIR
from diffsolve.app.nets import ResBlock, embed_time

__all__ = [
    "CLASSIFIER_DEMOS",
    "DigitsClassifier",
    "classifier_accuracy",
    "load_classifier",
]

CLASSIFIER_DEMOS = ("digits-classifier",)


class DigitsClassifier(nn.Module):
    """Small time-conditional ResNet: ``(x_t, timestep) -> logits`` of shape ``(B, K)``.

    One residual block per resolution (8 → 4 → 2 for 8x8 inputs, one level per entry of
    ``channels``), each modulated by the sinusoidal time embedding (scale and shift, as in
    the demo U-Net, whose :class:`~diffsolve.app.nets.ResBlock` it reuses), then global average
    pooling and a linear head.

    Args:
        in_channels: Image channels.
        num_classes: Number of classes ``K``.
        channels: Channels per resolution level.
        emb_channels: Width of the time embedding.
        num_groups: GroupNorm groups.
        dropout: Dropout inside the residual blocks.
        time_scale: The time input is multiplied by this before the embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32, 32),
        emb_channels: int = 64,
        num_groups: int = 8,
        dropout: float = 0.0,
        time_scale: float = 1.0,
    ) -> None:
        """Build the network; all arguments are JSON-serialisable config entries."""
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one resolution level")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.time_scale = float(time_scale)
        self.base_channels = channels[0]
        self.config: dict[str, Any] | None = None  # set by load_classifier
        self.time_mlp = nn.Sequential(
            nn.Linear(channels[0], emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.down = nn.ModuleList()
        ch = channels[0]
        for level, out_ch in enumerate(channels):
            self.blocks.append(ResBlock(ch, out_ch, emb_channels, num_groups, dropout))
            ch = out_ch
            if level != len(channels) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.norm_out = nn.GroupNorm(math.gcd(num_groups, ch), ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, H, W)`` at network time ``t`` (scalar or
        ``(B,)``, the digits model's training timestep)."""
        emb = embed_time(self, x, t)
        h = self.conv_in(x)
        for level, block in enumerate(self.blocks):
            h = block(h, emb)
            if level < len(self.down):
                h = self.down[level](h)
        h = fn.silu(self.norm_out(h)).mean(dim=(-2, -1))
        return self.head(h)


def classifier_path(name: str) -> Path:
    """Folder of a shipped classifier."""
    return DEMO_DIR / name


def load_classifier(
    name_or_path: str | Path = "digits-classifier", device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """Load a shipped classifier by name or a classifier folder by path.

    The folder holds ``config.json`` (``{"network": {"class": "DigitsClassifier", ...}, ...}``)
    and ``model.safetensors``. The returned module is in eval mode, float32, and carries the
    parsed config as ``.config``.

    Args:
        name_or_path: One of :data:`CLASSIFIER_DEMOS`, or a folder path.
        device: Where to put the network.
    """
    from safetensors.torch import load_file

    name = str(name_or_path)
    folder = classifier_path(name) if name in CLASSIFIER_DEMOS else Path(name_or_path)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"unknown classifier {name!r}: not a shipped classifier "
            f"({', '.join(CLASSIFIER_DEMOS)}) and not a folder with config.json and "
            "model.safetensors"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON in {config_path}: {exc}") from exc
    net_cfg = dict(config.get("network") or {}) if isinstance(config, dict) else {}
    if net_cfg.pop("class", None) != "DigitsClassifier":
        raise ValueError(f"{config_path}: network.class must be 'DigitsClassifier'")
    try:
        net = DigitsClassifier(**net_cfg)
    except TypeError as exc:
        raise ValueError(f"{config_path}: bad network arguments: {exc}") from exc
    try:
        net.load_state_dict(load_file(str(weights_path)), strict=True)
    except Exception as exc:  # safetensors' own error type or a key/shape mismatch
        raise ValueError(f"weights in {weights_path} do not match {config_path}: {exc}") from exc
    net.config = config
    return net.to(device).eval()


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module,
    x: Tensor,
    labels: Tensor,
    timestep: float = 0.0,
    batch_size: int = 512,
) -> float:
    """Fraction of ``x`` (clean samples unless ``timestep > 0``) that ``classifier`` assigns to
    ``labels`` — the accuracy meter of guided sampling."""
    if x.shape[0] != labels.shape[0]:
        raise ValueError(
            f"x and labels must have the same batch size, got {x.shape[0]} and {labels.shape[0]}"
        )
    param = next(classifier.parameters())
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(param.device, param.dtype)
        logits = classifier(xb, torch.full((xb.shape[0],), float(timestep), device=xb.device))
        pred = logits.argmax(-1).cpu()
        correct += int((pred == labels[start : start + batch_size].cpu()).sum())
    return correct / max(x.shape[0], 1)
