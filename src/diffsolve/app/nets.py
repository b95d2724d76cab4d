"""A compact U-Net for the bundled 8x8 digits demo models, and helpers to load them.

The network only uses standard layers (``Conv2d``, ``Linear``, ``GroupNorm``, ``SiLU``,
``Embedding`` and plain matmul attention), so it runs under ``torch.func.jvp`` (forward-mode
AD) and in float16/bfloat16 after ``model.to(dtype)``.

A demo model lives in a folder holding ``config.json`` (see ``scripts/train_demo.py`` for the
schema) and ``model.safetensors`` (float32 weights); :func:`load_network` reads both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as fn

from diffsolve.app.model_config import ConfigError, check_arguments

__all__ = ["DigitsUNet", "build_network", "load_network"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a float tensor ``t`` of shape ``(B,)`` into ``(B, dim)``.

    Computed in float32 (at least) whatever the dtype of ``t``, so that large time values
    (e.g. 0..1000) keep their precision; the caller casts the result to the model dtype.
    """
    half = dim // 2
    compute_dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=compute_dtype, device=t.device) / half
    )
    args = t.to(compute_dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = fn.pad(emb, (0, 1))
    return emb


def embed_time(network: nn.Module, x: Tensor, t: Tensor | float) -> Tensor:
    """``network.time_mlp`` of the sinusoidal embedding of network time ``t`` (a scalar or
    ``(B,)``, scaled by ``network.time_scale``), in ``x``'s dtype. The time itself stays in at
    least float32 even when the network runs in half precision."""
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if t.ndim == 0:
        t = t.expand(b)
    elif t.shape != (b,):
        raise ValueError(f"t must be a scalar or have shape ({b},), got {tuple(t.shape)}")
    temb = timestep_embedding(t * network.time_scale, network.base_channels)
    return network.time_mlp(temb.to(x.dtype))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (reduced to a divisor of ``channels`` if needed)."""
    g = math.gcd(groups, channels)
    return nn.GroupNorm(g, channels, eps=1e-5)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, add (scale, shift) from the embedding, GN-SiLU-conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float) -> None:
        """Create a block mapping ``in_ch`` to ``out_ch`` channels."""
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block to ``x`` (B, C, H, W) given the embedding ``emb`` (B, E)."""
        h = self.conv1(fn.silu(self.norm1(x)))
        scale, shift = self.emb(fn.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(fn.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the spatial positions, with plain matmuls."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        """Create an attention block over ``channels`` split into ``heads`` heads."""
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply residual self-attention to ``x`` of shape (B, C, H, W)."""
        b, c, h, w = x.shape
        d = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, N)
        logits = torch.matmul(q.transpose(-1, -2), k) * (d**-0.5)  # (B, heads, N, N)
        # Softmax in at least float32 (half-precision logits can overflow in exp).
        attn = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        attn = attn.to(v.dtype)
        out = torch.matmul(v, attn.transpose(-1, -2))  # (B, heads, d, N)
        return x + self.proj(out.reshape(b, c, h, w))


class DigitsUNet(nn.Module):
    """Small U-Net for (B, C, 8, 8) images, with time and optional class conditioning.

    Resolutions 8 -> 4 -> 2 (one level per entry of ``channel_mult``), ``num_res_blocks``
    residual blocks per level on the way down (one more on the way up, fed by skip
    connections), self-attention at the resolutions listed in ``attention_resolutions`` and
    in the middle block (at the lowest resolution) if ``mid_attention``.

    The time ``t`` is given in the model's own units and multiplied by ``time_scale`` before
    the sinusoidal embedding. With ``num_classes = K`` the class embedding has ``K + 1``
    rows; index ``K`` is the "null" class (no label), used for label dropout during training
    and for the unconditional branch of classifier-free guidance.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 8,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        mid_attention: bool = True,
        num_heads: int = 4,
        num_groups: int = 8,
        dropout: float = 0.0,
        num_classes: int | None = None,
        time_scale: float = 1.0,
        emb_channels: int | None = None,
    ) -> None:
        """Build the network; all arguments are JSON-serialisable config entries."""
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.time_scale = float(time_scale)
        self.base_channels = base_channels
        emb_dim = 4 * base_channels if emb_channels is None else emb_channels

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = (
            nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        )

        def make_res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, num_groups, dropout)

        def make_attn(ch: int) -> SelfAttention:
            return SelfAttention(ch, num_heads, num_groups)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch = base_channels
        res = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([make_res(ch, base_channels * mult)])
                ch = base_channels * mult
                if res in attention_resolutions:
                    block.append(make_attn(ch))
                self.down.append(block)
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_chs.append(ch)
                res //= 2

        self.mid1 = make_res(ch, ch)
        self.mid_attn = make_attn(ch) if mid_attention else nn.Identity()
        self.mid2 = make_res(ch, ch)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList([make_res(ch + skip_chs.pop(), base_channels * mult)])
                ch = base_channels * mult
                if res in attention_resolutions:
                    block.append(make_attn(ch))
                if level != 0 and i == num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(ch, ch, 3, padding=1))
                    res *= 2
                self.up.append(block)

        self.norm_out = _norm(ch, num_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _embed(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """Return the (B, emb_dim) time (+ class) embedding, in the dtype of ``x``."""
        b = x.shape[0]
        emb = embed_time(self, x, t)
        if self.class_emb is not None:
            if class_labels is None:
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            else:
                labels = torch.as_tensor(class_labels, device=x.device).long()
                if labels.ndim == 0:
                    labels = labels.expand(b)
                if labels.shape != (b,):
                    raise ValueError(
                        f"class_labels must have shape ({b},), got {tuple(labels.shape)}"
                    )
            emb = emb + self.class_emb(labels).to(x.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this network is unconditional")
        return emb

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Predict the model output for ``x`` (B, C, H, W) at time ``t`` (B,) or scalar.

        ``class_labels`` (B,) int64 in ``0..num_classes`` (``num_classes`` = null class);
        ``None`` means the null class for a conditional network.
        """
        emb = self._embed(x, t, class_labels)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(fn.silu(self.norm_out(h)))


_NETWORK_CLASSES: dict[str, type[nn.Module]] = {"DigitsUNet": DigitsUNet}


def build_network(config: dict[str, Any], path: str | Path = "network config") -> nn.Module:
    """Build a network from a config dict.

    Accepts either a full demo config (with a ``"network"`` entry) or the ``"network"``
    entry itself: ``{"class": "DigitsUNet", **constructor_kwargs}``. The arguments are
    checked against the class's constructor first (``path`` names the file in errors).
    """
    if not isinstance(config, dict):
        raise ValueError(f"network config must be a dict, got {type(config).__name__}")
    net_cfg = config.get("network", config)
    if not isinstance(net_cfg, dict):
        raise ValueError("config['network'] must be a dict")
    kwargs = dict(net_cfg)
    cls_name = kwargs.pop("class", None)
    if cls_name not in _NETWORK_CLASSES:
        raise ValueError(
            f"unknown network class {cls_name!r}; expected one of {sorted(_NETWORK_CLASSES)}"
        )
    check_arguments(_NETWORK_CLASSES[cls_name], kwargs, path, "network.")
    try:
        return _NETWORK_CLASSES[cls_name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for {cls_name}: {exc}") from exc


def load_network(
    folder: str | Path, check: Callable[[dict[str, Any], Path], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``config.json`` and ``model.safetensors`` from ``folder``.

    ``check(config, config_path)`` validates the parsed config before anything is built
    (e.g. :func:`~diffsolve.app.model_config.check_model_config`).

    Returns ``(model, config)`` with the model in eval mode (float32, on the CPU).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    weights_path = folder / "model.safetensors"
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not config_path.is_file():
        raise FileNotFoundError(f"missing config file: {config_path}")
    if not weights_path.is_file():
        raise FileNotFoundError(f"missing weights file: {weights_path}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON in {config_path}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("network"), dict):
        raise ValueError(f"{config_path} must be a JSON object with a 'network' object")
    if check is not None:
        check(config, config_path)
    try:
        model = build_network(config["network"], config_path)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise ValueError(
            f"weights file {weights_path} is corrupt or truncated ({exc}); restore it or "
            "retrain the model"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {weights_path} do not match {config_path}: {exc}") from exc
    model.eval()
    return model, config
