"""The digits demo network as a diffusers ``UNet2DModel`` (``scripts/export_diffusers_demo.py``
writes the ``digits-diffusers`` pipeline folder with it)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor

from diffsolve.app.nets import DigitsUNet

__all__ = ["digits_unet_to_diffusers"]

_RES_LAYERS = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("emb", "time_emb_proj"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("skip", "conv_shortcut"),
)


def digits_unet_to_diffusers(network: DigitsUNet) -> UNet2DModel:
    """The same network as a diffusers ``UNet2DModel`` (weights copied, eval mode, float32).

    ``DigitsUNet``'s layers are diffusers' ``ResnetBlock2D`` with
    ``resnet_time_scale_shift="scale_shift"``, ``Downsample2D``/``Upsample2D`` with convs, the
    mid-block attention (one group norm, per-head softmax, residual) and the sinusoidal
    embedding with ``flip_sin_to_cos=True, freq_shift=0``; only the names differ. Supported:
    no attention outside the middle block, ``time_scale = 1``, channel counts divisible by
    ``num_groups``.
    """
    cfg = _unet_config(network)
    unet = UNet2DModel(**cfg)
    state = _unet_state(network, len(cfg["block_out_channels"]), cfg["layers_per_block"])
    unet.load_state_dict(state, strict=True)
    return unet.eval().float()


def _unet_config(net: DigitsUNet) -> dict[str, Any]:
    downsamplers = sum(1 for block in net.down if isinstance(block[0], torch.nn.Conv2d))
    res_blocks = [block for block in net.down if not isinstance(block[0], torch.nn.Conv2d)]
    levels = downsamplers + 1
    if any(len(block) > 1 for block in res_blocks):
        raise ValueError(
            "digits_unet_to_diffusers: attention outside the mid block is unsupported"
        )
    if net.time_scale != 1.0:
        raise ValueError("digits_unet_to_diffusers: time_scale must be 1 (diffusers has none)")
    per_level = len(res_blocks) // levels
    channels = [res_blocks[level * per_level][0].conv1.out_channels for level in range(levels)]
    groups = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    if len(groups) != 1:
        raise ValueError(
            f"digits_unet_to_diffusers: every GroupNorm needs the same group count, got {groups}"
        )
    group = groups.pop()
    mid = net.mid_attn
    return {
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "down_block_types": ["DownBlock2D"] * levels,
        "up_block_types": ["UpBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "attention_head_dim": channels[-1] // getattr(mid, "heads", 1),
        "norm_num_groups": group,
        "attn_norm_num_groups": group,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift",
        "add_attention": not isinstance(mid, torch.nn.Identity),
        "time_embedding_dim": net.time_mlp[0].out_features,
        "num_class_embeds": None if net.num_classes is None else net.num_classes + 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def _unet_state(net: DigitsUNet, levels: int, per_level: int) -> dict[str, Tensor]:
    src = net.state_dict()
    out: dict[str, Tensor] = {}

    def copy(a: str, b: str) -> None:
        for p in ("weight", "bias"):
            if f"{a}.{p}" in src:
                out[f"{b}.{p}"] = src[f"{a}.{p}"]

    def res(a: str, b: str) -> None:
        for x, y in _RES_LAYERS:
            copy(f"{a}.{x}", f"{b}.{y}")

    for a, b in (
        ("conv_in", "conv_in"),
        ("time_mlp.0", "time_embedding.linear_1"),
        ("time_mlp.2", "time_embedding.linear_2"),
        ("class_emb", "class_embedding"),
        ("norm_out", "conv_norm_out"),
        ("conv_out", "conv_out"),
    ):
        copy(a, b)
    i = 0
    for level in range(levels):
        for j in range(per_level):
            res(f"down.{i}.0", f"down_blocks.{level}.resnets.{j}")
            i += 1
        if level != levels - 1:
            copy(f"down.{i}.0", f"down_blocks.{level}.downsamplers.0.conv")
            i += 1
    res("mid1", "mid_block.resnets.0")
    res("mid2", "mid_block.resnets.1")
    if "mid_attn.qkv.weight" in src:
        copy("mid_attn.norm", "mid_block.attentions.0.group_norm")
        w, b = src["mid_attn.qkv.weight"].flatten(1), src["mid_attn.qkv.bias"]
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"mid_block.attentions.0.{name}.weight"] = w.chunk(3)[k].clone()
            out[f"mid_block.attentions.0.{name}.bias"] = b.chunk(3)[k].clone()
        out["mid_block.attentions.0.to_out.0.weight"] = src["mid_attn.proj.weight"].flatten(1)
        out["mid_block.attentions.0.to_out.0.bias"] = src["mid_attn.proj.bias"]
    i = 0
    for k in range(levels):
        for j in range(per_level + 1):
            res(f"up.{i}.0", f"up_blocks.{k}.resnets.{j}")
            if k != levels - 1 and j == per_level:
                copy(f"up.{i}.2", f"up_blocks.{k}.upsamplers.0.conv")
            i += 1
    return out
