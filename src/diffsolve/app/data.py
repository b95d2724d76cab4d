"""The scikit-learn 8x8 handwritten digits, as used by the bundled demo models.

The data set has 1797 greyscale images of 8x8 pixels with integer values 0..16. They are
scaled to ``[-1, 1]`` with ``x / 8 - 1`` and returned as float32 tensors of shape
``(N, 1, 8, 8)``.

The split is fixed and deterministic: the 1797 images are permuted once with
``numpy.random.default_rng(0).permutation(1797)``; the first 1400 images of that permutation
form the ``"train"`` split (the only data the demo models were trained on) and the last 397
form the ``"test"`` split (held out, used as the reference set for Fréchet distances).
``"all"`` returns the 1797 images in their original scikit-learn order.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = ["NUM_TOTAL", "NUM_TRAIN", "load_digit_labels", "load_digits"]

NUM_TOTAL = 1797
NUM_TRAIN = 1400

Split = Literal["train", "test", "all"]


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the raw sklearn digits images ``(1797, 8, 8)`` and labels ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "diffsolve needs scikit-learn for the 8x8 digits data set; "
            "install it with `pip install scikit-learn` (or `pip install diffsolve[bench]`)."
        ) from exc
    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.shape != (NUM_TOTAL, 8, 8):
        raise ValueError(f"unexpected sklearn digits shape {images.shape}")
    return images, labels


def _split_indices(split: str) -> np.ndarray:
    """Return the indices (into the sklearn order) of the images in ``split``."""
    if split == "all":
        return np.arange(NUM_TOTAL)
    perm = np.random.default_rng(0).permutation(NUM_TOTAL)
    if split == "train":
        return perm[:NUM_TRAIN]
    if split == "test":
        return perm[NUM_TRAIN:]
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def load_digits(split: Split = "train") -> torch.Tensor:
    """Load the 8x8 digits as a float32 tensor of shape ``(N, 1, 8, 8)`` in ``[-1, 1]``.

    Pixels (0..16) are mapped with ``x / 8 - 1``. ``split`` is ``"train"`` (1400 images),
    ``"test"`` (397 held-out images) or ``"all"`` (1797, sklearn order); train/test come
    from the fixed permutation ``numpy.random.default_rng(0).permutation(1797)``: first
    1400 = train, last 397 = test.
    """
    idx = _split_indices(split)
    images, _ = _raw_digits()
    x = torch.from_numpy(images[idx] / 8.0 - 1.0).to(torch.float32)
    return x.unsqueeze(1).contiguous()


def load_digit_labels(split: Split = "train") -> torch.Tensor:
    """Load the class labels (0..9) as an int64 tensor, aligned with :func:`load_digits`."""
    idx = _split_indices(split)
    _, labels = _raw_digits()
    return torch.from_numpy(labels[idx].copy()).to(torch.long)
