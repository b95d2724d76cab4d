r"""Dynamic thresholding of :math:`\hat x_0` (Saharia et al. 2022, Imagen, arXiv
2205.11487), as in DPM-Solver: per sample :math:`q = \max(\mathrm{quantile}(|\hat x_0|, p),
v_{\max})`, :math:`\hat x_0 \leftarrow \mathrm{clamp}(\hat x_0, -q, q)/q`. It wraps the
model, not the solver: every solver and guidance method composes with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffsolve.ode.model import Denoiser, Prediction
from diffsolve.wrappers.base import DenoiserWrapper

__all__ = ["DynamicThresholding", "dynamic_threshold", "row_quantile"]


def row_quantile(values: Tensor, q: float) -> Tensor:
    """Per-row quantile of a 2-D tensor with linear interpolation (``torch.quantile``'s
    default), by sorting: no size limit, any floating dtype."""
    n = values.shape[1]
    ordered = values.sort(dim=1).values
    pos = q * (n - 1)
    lo = min(math.floor(pos), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return ordered[:, lo] + frac * (ordered[:, hi] - ordered[:, lo])


def dynamic_threshold(x0: Tensor, ratio: float, lower: float, upper: float = math.inf) -> Tensor:
    r"""Per sample :math:`q = \mathrm{clamp}(\mathrm{quantile}(|\hat x_0|, \text{ratio}),
    \text{lower}, \text{upper})`, then :math:`\mathrm{clamp}(\hat x_0, -q, q)/q`, in at least
    float32. Imagen / DPM-Solver: ``lower`` the data range, no ``upper``; diffusers'
    ``thresholding``: ``lower = 1``, ``upper = sample_max_value``."""
    compute = torch.promote_types(x0.dtype, torch.float32)
    v = x0.to(compute)
    q = row_quantile(v.abs().flatten(1), ratio).clamp(min=lower, max=upper)
    q = q.view(-1, *([1] * (v.ndim - 1)))
    return (torch.maximum(torch.minimum(v, q), -q) / q).to(x0.dtype)


class DynamicThresholding(DenoiserWrapper):
    r"""Dynamic thresholding of :math:`\hat x_0` (Saharia et al. 2022, Imagen; as in
    DPM-Solver's ``correcting_x0_fn="dynamic_thresholding"``).

    Per sample, :math:`q = \max(\mathrm{quantile}(|\hat x_0|, \text{ratio}), \text{max\_value})`
    and :math:`\hat x_0 \leftarrow \mathrm{clamp}(\hat x_0, -q, q)/q`; computed in at least
    float32 (half-precision inputs included). The result is returned as a data prediction.

    Args:
        model: Any denoiser.
        ratio: Quantile level in ``(0, 1]`` (0.995 in Imagen and DPM-Solver).
        max_value: Lower bound of :math:`q` (the data range; 1 for data in [-1, 1]).
    """

    def __init__(self, model: Denoiser, ratio: float = 0.995, max_value: float = 1.0) -> None:
        if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
        if not isinstance(max_value, (int, float)) or not 0.0 < max_value < math.inf:
            raise ValueError(f"max_value must be a finite number > 0, got {max_value!r}")
        self.model = model
        self.schedule = model.schedule
        self.ratio = float(ratio)
        self.max_value = float(max_value)

    def threshold(self, x0: Tensor) -> Tensor:
        """Apply dynamic thresholding to a batch of data predictions."""
        return dynamic_threshold(x0, self.ratio, self.max_value)

    def __call__(self, x: Tensor, t: float) -> Prediction:
        prediction = self.model(x, t)
        c = prediction.conversion
        return Prediction.from_x0(x, self.threshold(prediction.x0), c.alpha, c.sigma, t)
