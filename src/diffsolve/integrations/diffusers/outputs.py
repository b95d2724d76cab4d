r"""What diffusers' schedulers do to a model output beyond the ODE step, reproduced.

* :class:`Clipping` — ``thresholding`` (dynamic thresholding of :math:`\hat x_0`, with
  diffusers' bounds: :math:`q = \min(\max(\text{quantile}, 1), \text{sample\_max\_value})`,
  so a ``sample_max_value`` below 1 is the threshold itself and a ratio of 0 clips to
  :math:`[-1, 1]` unless every :math:`|\hat x_0|` exceeds 1) or DDIM's ``clip_sample``.
  The clipped :math:`\hat x_0` replaces the prediction, with the noise prediction recomputed
  from it (what DPM-Solver, UniPC and DEIS do).
* :func:`ddim_step` — DDIM's generalised step (Song et al. 2021, "Denoising Diffusion
  Implicit Models", eq. 12) with ``eta`` and ``use_clipped_model_output``:

  .. math::

      x_{t'} = \alpha_{t'}\hat x_0 + \sqrt{\sigma_{t'}^2 - s^2}\;\hat\epsilon + s z, \qquad
      s = \eta\,\frac{\sigma_{t'}}{\sigma_t}\sqrt{1 - \frac{\alpha_t^2}{\alpha_{t'}^2}},

  where diffusers' :math:`\hat\epsilon` is the *unclipped* one unless
  ``use_clipped_model_output``. With ``eta = 0`` and a consistent prediction it is the ODE
  step every plan takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsolve.ode.model import Prediction
from diffsolve.wrappers.thresholding import dynamic_threshold


@dataclass(frozen=True)
class Clipping:
    """diffusers' treatment of :math:`\\hat x_0`: dynamic thresholding, or clipping to
    ``[-clip_range, clip_range]`` (DDIM's ``clip_sample``), or nothing."""

    thresholding: bool = False
    ratio: float = 0.995
    max_value: float = 1.0
    clip: bool = False
    clip_range: float = 1.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Clipping:
        """The keys ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``,
        ``clip_sample``, ``clip_sample_range`` (absent keys: off)."""
        clipping = cls(
            bool(config.get("thresholding", False)),
            float(config.get("dynamic_thresholding_ratio", 0.995)),
            float(config.get("sample_max_value", 1.0)),
            bool(config.get("clip_sample", False)),
            float(config.get("clip_sample_range", 1.0)),
        )
        if clipping.thresholding and not 0.0 <= clipping.ratio <= 1.0:
            raise ValueError(
                f"dynamic_thresholding_ratio is a quantile level and must lie in [0, 1], got "
                f"{clipping.ratio!r}"
            )
        if clipping.thresholding and not 0.0 < clipping.max_value < math.inf:
            raise ValueError(
                f"sample_max_value must be a finite number > 0 (x0 is divided by it), got "
                f"{clipping.max_value!r}"
            )
        if clipping.clip and not clipping.clip_range > 0.0:
            raise ValueError(f"clip_sample_range must be > 0, got {clipping.clip_range!r}")
        return clipping

    @property
    def active(self) -> bool:
        """Whether :math:`\\hat x_0` is changed at all."""
        return self.thresholding or self.clip

    def __call__(self, x0: Tensor) -> Tensor:
        """The treated :math:`\\hat x_0` (thresholding takes precedence, as in diffusers)."""
        if self.thresholding:
            return dynamic_threshold(x0, self.ratio, 1.0, self.max_value)
        if self.clip:
            return x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def apply(self, prediction: Prediction) -> Prediction:
        """The prediction with its :math:`\\hat x_0` treated (noise recomputed from it)."""
        if not self.active:
            return prediction
        c = prediction.conversion
        return Prediction.from_x0(
            prediction.x, self(prediction.x0), c.alpha, c.sigma, prediction.t
        )


def ddim_step(
    x0: Tensor,
    eps: Tensor,
    alpha_s: float,
    sigma_s: float,
    alpha_t: float,
    sigma_t: float,
    eta: float,
    noise: Tensor | None,
) -> Tensor:
    """DDIM's generalised step from ``s`` to ``t`` (module docstring); ``noise`` is needed
    when ``eta > 0`` and the step does not end at clean data."""
    s = 0.0
    if eta > 0.0 and sigma_t > 0.0:
        s = eta * sigma_t / sigma_s * math.sqrt(max(1.0 - (alpha_s / alpha_t) ** 2, 0.0))
    k = math.sqrt(max(sigma_t**2 - s**2, 0.0))
    out = torch.add(x0 * alpha_t, eps, alpha=k) if k else x0 * alpha_t
    if s:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        out = out.add_(noise.to(out.dtype), alpha=s)
    return out
