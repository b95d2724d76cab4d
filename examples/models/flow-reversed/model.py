r"""A user's own flow model, trained with conventions opposite to diffsolve's: how to load it.

This file is the documented example of ``diffsolve sample --model path/to/model.py:load``.
The network (:class:`FlowNet`, a small U-Net on 1x16x16 images: the scikit-learn 8x8
digits upsampled bilinearly to 16x16, scaled to ``[-1, 1]``) was trained by
``scripts/train_user_models.py --model flow-reversed`` as rectified flow with

* **time reversed**: ``s`` in ``[0, 1]``, ``s = 0`` is pure noise and ``s = 1`` is data,
  :math:`x_s = (1 - s)\,\epsilon + s\,x_0`;
* **velocity toward the data**: the network predicts
  :math:`v(x_s, s) = \mathrm{d}x_s/\mathrm{d}s = x_0 - \epsilon`, and one samples by
  integrating :math:`\mathrm{d}x/\mathrm{d}s = v` from ``s = 0`` (noise) to ``s = 1``.

diffsolve's rectified flow (:class:`diffsolve.RectifiedFlow`) has the opposite conventions:
:math:`x_t = (1 - t)\,x_0 + t\,\epsilon` with ``t = 1`` noise and ``t = 0`` data, and its
``"flow"`` prediction is :math:`u = \mathrm{d}x_t/\mathrm{d}t = \epsilon - x_0`. The two
processes are the same with :math:`s = 1 - t`, and then :math:`u = -v`. So :func:`load`

* maps diffsolve's time to the network's with ``time_input=lambda t: 1 - t``, and
* negates the network's output (:class:`Negated`) to turn :math:`v` into :math:`u`.

The negation is an ``nn.Module`` rather than a lambda so that diffsolve can fingerprint the
weights (it hashes an ``nn.Module``'s ``state_dict``) and read the network's dtype.

The network's time input is the float ``s`` (not an integer timestep); its sinusoidal
embedding multiplies it by 1000 internally. Only ``torch``, ``safetensors`` and
``diffsolve`` are imported, so this file can be loaded on its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import diffsolve

WEIGHTS = Path(__file__).with_name("model.safetensors")
DATA_SHAPE = (1, 16, 16)


def timestep_embedding(s: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of the float time ``s`` (shape ``(B,)``), scaled by ``scale``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=s.device) / half
    )
    args = (scale * s.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added in between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """One residual block."""
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class FlowNet(nn.Module):
    """A small U-Net: 16x16 (``ch``) -> 8x8 (``2 ch``) -> 4x4 (``2 ch``) and back, with skips.

    ``forward(x, s)`` takes images ``(B, 1, 16, 16)`` and the float time ``s`` of shape
    ``(B,)`` (``s = 0`` noise, ``s = 1`` data) and returns the velocity
    :math:`v = x_0 - \\epsilon`, shaped like ``x``.
    """

    def __init__(self, ch: int = 24, emb_dim: int = 128, in_channels: int = 1) -> None:
        super().__init__()
        self.ch = ch
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, emb_dim)  # 16x16
        self.pool1 = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)  # -> 8x8
        self.down2 = ResBlock(2 * ch, 2 * ch, emb_dim)
        self.pool2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)  # -> 4x4
        self.mid = ResBlock(2 * ch, 2 * ch, emb_dim)
        self.up2 = ResBlock(4 * ch, 2 * ch, emb_dim)  # 8x8, with the down2 skip
        self.up1 = ResBlock(3 * ch, ch, emb_dim)  # 16x16, with the down1 skip
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.act = nn.SiLU()
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        """The velocity :math:`\\mathrm{d}x_s/\\mathrm{d}s` at ``(x, s)``."""
        s = torch.as_tensor(s, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(s, self.ch)).to(x.dtype)
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.pool2(h2), emb)
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.conv_out(self.act(self.norm_out(h)))


class Negated(nn.Module):
    """``-net(x, s)``: turns this network's :math:`v = x_0 - \\epsilon` into diffsolve's
    :math:`u = \\epsilon - x_0`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        """The negated network output."""
        return -self.net(x, s)


def build_network() -> FlowNet:
    """The network with the trained weights (float32, eval mode)."""
    net = FlowNet()
    net.load_state_dict(load_file(str(WEIGHTS)))
    return net.eval().requires_grad_(False)


def load() -> diffsolve.ModelWrapper:
    """The flow-reversed model as a diffsolve denoiser (entry point `model.py:load`)."""
    return diffsolve.ModelWrapper(
        Negated(build_network()),  # diffsolve's velocity is u = eps - x0 = -v
        diffsolve.RectifiedFlow(),
        prediction="flow",
        time_input=lambda t: 1 - t,  # diffsolve's t = 1 is noise; this network's s = 0 is
        data_shape=DATA_SHAPE,
    )
