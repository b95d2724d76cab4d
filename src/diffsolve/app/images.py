"""Image grids of samples (PNG), written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffsolve.app.files import PNG_SOFTWARE, write_atomic


def image_samples(samples: Tensor) -> Tensor | None:
    """Samples ``(N, C, H, W)`` of 1 or 3 channels are images themselves; others (latents,
    vectors) are not (``None``)."""
    shape = tuple(samples.shape[1:])
    return samples if len(shape) == 3 and shape[0] in (1, 3) else None


def to_uint8(samples: Tensor) -> np.ndarray:
    """Map samples in ``[-1, 1]`` to ``uint8`` images ``(N, H, W, C)``."""
    x = samples.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(
    samples: Tensor, path: str | Path, nrow: int | None = None, scale: int = 4, pad: int = 1
) -> Path:
    """Save ``samples`` ``(N, C, H, W)`` in ``[-1, 1]`` as one PNG grid (nearest upscaling),
    marked as diffsolve's (its ``Software`` text chunk)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    images = to_uint8(samples)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((ncol * cell_h + pad, nrow * cell_w + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        big = image.repeat(scale, 0).repeat(scale, 1)
        canvas[
            pad + r * cell_h : pad + r * cell_h + h * scale,
            pad + col * cell_w : pad + col * cell_w + w * scale,
        ] = big
    mode = "L" if c == 1 else "RGB"
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode=mode)
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    return write_atomic(path, lambda f: picture.save(f, format="PNG", pnginfo=info))
