r"""Guidance and thresholding as :class:`~diffsolve.ode.model.Denoiser` wrappers.

Each wrapper takes a denoiser and is a denoiser: it has the wrapped model's ``schedule`` and
maps ``(x, t)`` to a :class:`~diffsolve.ode.model.Prediction`, so it works with every solver and
the one sampling loop, and wrappers compose (e.g.
:class:`~diffsolve.wrappers.thresholding.DynamicThresholding` around
``ClassifierFreeGuidance(...)``). A wrapper is one call of the loop: a conditional /
unconditional pair evaluated in one batched network call counts as **one** model evaluation,
as papers count NFE.

* :class:`ClassifierFreeGuidance` — Ho & Salimans 2022 (arXiv 2207.12598):
  :math:`\text{out} = \text{out}_u + w(\text{out}_c - \text{out}_u)` on the raw network
  output. Every supported parameterisation maps ``(x, out)`` to :math:`\hat x_0` and
  :math:`\hat\epsilon` affinely with coefficients that depend on ``t`` only, so this equals
  the same combination of the :math:`\hat x_0` (or :math:`\hat\epsilon`) predictions.
* :class:`ClassifierGuidance` — Dhariwal & Nichol 2021 (arXiv 2105.05233), in DPM-Solver's
  ``model_wrapper`` form (Lu et al. 2022): :math:`\hat\epsilon \leftarrow \hat\epsilon -
  s\,\sigma_t\,\nabla_{x_t}\log p_\phi(c \mid x_t)`.
* :class:`AdaptiveProjectedGuidance` — APG, Sadat, Hilliges & Weber 2024 (arXiv 2410.02416,
  Algorithm 1), on the data predictions :math:`D_c, D_u`:

  .. math::

      \Delta = D_c - D_u,\quad m \leftarrow \Delta + \beta m,\quad
      \Delta \leftarrow m\,\min(1, r/\lVert m\rVert),\quad
      \Delta_\parallel = \frac{\langle\Delta, D_c\rangle}{\lVert D_c\rVert^2} D_c,\quad
      \hat D = D_c + (w - 1)(\Delta_\perp + \eta\,\Delta_\parallel),

  with :math:`\Delta_\perp = \Delta - \Delta_\parallel`, norms and inner products per sample
  over all non-batch dimensions, the projection in float64. With :math:`\eta = 1, \beta = 0,
  r = \infty` it is classifier-free guidance.
**APG: how diffusers differs from the paper.** ``diffusers.guiders.AdaptiveProjectedGuidance``
(``src/diffusers/guiders/adaptive_projected_guidance.py``, read in diffusers 0.42.1):

1. *Output.* With the default ``use_original_formulation=False`` it returns
   :math:`\text{pred}_u + w\,u` with :math:`u = \Delta_\perp + \eta\Delta_\parallel`; with
   ``True``, :math:`\text{pred}_c + w\,u`. The paper's :math:`D_c + (w-1)\,u` is the ``True``
   form with ``guidance_scale = w - 1``. The default form starts from the unconditional
   prediction and adds :math:`w` projected updates, where the paper keeps the raw difference
   once (:math:`D_c = D_u + \Delta`) and projects only the extra :math:`w - 1`: without momentum
   or rescaling the two differ by :math:`(1-\eta)\Delta_\parallel` and agree only for
   :math:`\eta = 1`; with momentum or rescaling they differ by :math:`\Delta_{raw} - u` even
   then.
2. *Prediction space.* It combines whatever the pipeline's network emits (:math:`\epsilon`
   for most), not :math:`\hat x_0`; the paper's author recommends :math:`\hat x_0`
   (diffusers PR #10173) and this module converts to :math:`\hat x_0` first. In
   :math:`\epsilon` space the projection is onto :math:`\epsilon_c` and the norm threshold
   has another meaning.
3. *Defaults.* ``eta=1.0`` (paper: :math:`\eta = 0`), momentum ``None`` i.e. off (paper:
   :math:`\beta = -0.5`), ``adaptive_projected_guidance_rescale=15.0`` (the SDXL value of the
   paper's Table 10, whose latents have 65,536 entries; ``r`` scales with
   :math:`\sqrt{\text{numel}}`), ``guidance_scale=7.5``.
4. *Rescaling switch.* A threshold ``<= 0`` disables the rescaling (here: ``None`` or
   ``inf``; ``r`` must otherwise be ``> 0``).
5. *Momentum reset.* The momentum buffer is rebuilt at step 0 of the pipeline's own step
   counter only; here it is reset by :meth:`AdaptiveProjectedGuidance.reset` (called by
   :func:`diffsolve.sample` at the start of every run) and whenever ``t`` increases between
   calls (a new trajectory), also within a run.
6. *Extras there, not in the paper.* A ``start``/``stop`` window of steps outside which the
   conditional prediction alone is used, ``guidance_rescale`` (Lin et al. 2023) applied
   afterwards, and ``norm_dim`` to restrict the norm and projection to some dimensions.
7. *Projection precision.* Both project in float64 and cast back; diffusers normalises
   :math:`D_c` with ``F.normalize`` (norm clamped at 1e-12), as here.

**Default norm threshold.** ``norm_threshold="auto"`` uses :math:`r =
0.0625\sqrt{\text{numel}}` per sample (:data:`APG_NORM_PER_SQRT_NUMEL`): ``r = 0.5`` for the
8x8 digits. Measured on a class-conditional digits model (epsilon prediction, trained with
``scripts/train_demo.py --model digits-cond --steps 6000``), DPM-Solver++(2M) at 20 NFE, 500
samples (50 per class), :math:`\eta = 0`, :math:`\beta = -0.5`: along CFG trajectories the
per-sample :math:`\lVert D_c - D_u\rVert` is 2.5–12 for :math:`t > 0.5` and falls below 1 for
:math:`t < 0.35`, so ``r = 0.5`` caps the early, high-noise updates (where over-saturation
forms) and leaves the late ones alone. Against the test split (Fréchet distance on pixels; CFG
/ APG ``r = 0.5`` / APG without rescaling): :math:`w = 2`: 0.82 / 0.63 / 0.70; :math:`w = 3`:
1.25 / 0.69 / 0.91; :math:`w = 5`: 2.48 / 0.92 / 1.52; :math:`w = 8`: 5.15 / 1.56 / 2.88
(conditional model alone: 0.61; share of pixels beyond ±1.05 at :math:`w = 5`: 0.089 / 0.008 /
0.013), with the classifier's mean :math:`\log p(c \mid x)` of the target class as high as
CFG's for :math:`w \ge 2` (-0.0009 vs -0.0004 at :math:`w = 2`). ``r = 0.25`` weakens the
guidance at :math:`w \le 2` (mean log-probability -0.011 at :math:`w = 2`); ``r \ge 1`` lets
more saturation through. The same rule gives ``r = 16`` for SDXL's 128x128x4 latents, next to
the paper's 15.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffsolve.ode.model import Denoiser, ModelWrapper, Prediction, conversion_for
from diffsolve.wrappers.base import DenoiserWrapper

__all__ = [
    "APG_NORM_PER_SQRT_NUMEL",
    "AdaptiveProjectedGuidance",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "class_conditioning",
    "projected_guidance",
]

#: ``norm_threshold="auto"`` of APG: :math:`r = 0.0625\sqrt{\text{numel}}` per sample (0.5 for
#: the 8x8 digits; measured, see the module docstring).
APG_NORM_PER_SQRT_NUMEL = 0.0625


def check_scale(scale: float, argument: str = "scale") -> float:
    """``scale`` as a float, or a clear error unless it is a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{argument} must be a finite number >= 0, got {scale!r}")
    if scale < 0:
        raise ValueError(f"{argument} must be a finite number >= 0, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------------
def class_conditioning(
    labels: Tensor, null_class: int, key: str = "class_labels"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(cond_kwargs, uncond_kwargs)`` for a class-conditional network whose unconditional
    branch is the label ``null_class`` (the digits demo: ``null_class=10``)."""
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
    return {key: labels}, {key: torch.full_like(labels, int(null_class))}


def _broadcast_batch(value: Tensor, batch: int, name: str) -> Tensor:
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(
        f"conditioning tensor {name!r} has batch size {value.shape[0]}, but x has {batch}; "
        "pass one entry per sample (or a single one to broadcast)"
    )


def _per_sample(value: Any, batch: int, device: torch.device, name: str) -> Any:
    """Broadcast the tensors in a (nested) network argument to ``batch`` entries on
    ``device``."""
    if isinstance(value, Tensor):
        return _broadcast_batch(value, batch, name).to(device)
    if isinstance(value, Mapping):
        prefix = f"{name}." if name else ""
        return {k: _per_sample(v, batch, device, prefix + k) for k, v in value.items()}
    return value


def _batch_kwargs(
    uncond: Mapping[str, Any],
    cond: Mapping[str, Any],
    batch: int | None,
    device: torch.device | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Stack the unconditional and conditional keyword arguments along the batch
    (unconditional first) on ``device``; non-tensor values must agree. ``batch=None`` only
    validates."""
    if set(uncond) != set(cond):
        raise ValueError(
            f"cond_kwargs and uncond_kwargs must have the same keys, got {sorted(cond)} and "
            f"{sorted(uncond)}"
        )
    out: dict[str, Any] = {}
    for key in cond:
        u, c, name = uncond[key], cond[key], prefix + key
        if isinstance(u, Tensor) and isinstance(c, Tensor):
            if batch is None:
                continue
            pair = [_broadcast_batch(u, batch, name), _broadcast_batch(c, batch, name)]
            out[key] = torch.cat(pair).to(device)
        elif isinstance(u, Mapping) and isinstance(c, Mapping):
            out[key] = _batch_kwargs(u, c, batch, device, name + ".")
        elif isinstance(u, Tensor) or isinstance(c, Tensor) or u != c:
            raise ValueError(
                f"conditioning {name!r}: the conditional and unconditional values can only "
                "be batched if both are tensors (or equal non-tensor values)"
            )
        else:
            out[key] = c
    return out


class _GuidedPair(DenoiserWrapper):
    """A :class:`~diffsolve.ode.model.ModelWrapper` evaluated on a conditional and an
    unconditional input in one batched network call."""

    def __init__(
        self,
        model: ModelWrapper,
        scale: float,
        cond_kwargs: Mapping[str, Any],
        uncond_kwargs: Mapping[str, Any],
    ) -> None:
        if not isinstance(model, ModelWrapper):
            raise ValueError(
                f"model must be a ModelWrapper (guidance needs the raw network call), "
                f"got {type(model).__name__}"
            )
        if not isinstance(cond_kwargs, Mapping) or not isinstance(uncond_kwargs, Mapping):
            raise ValueError("cond_kwargs and uncond_kwargs must be dicts of network arguments")
        self.model = model
        self.schedule = model.schedule
        self.scale = check_scale(scale)
        self.cond_kwargs = dict(cond_kwargs)
        self.uncond_kwargs = dict(uncond_kwargs)
        _batch_kwargs(self.uncond_kwargs, self.cond_kwargs, None)  # validate keys and types
        self._wrappers: dict[tuple[bool, int, torch.device], ModelWrapper] = {}

    def _wrapper(self, x: Tensor, paired: bool) -> ModelWrapper:
        """The network wrapper with the conditioning for ``x``'s batch size and device
        (built once per batch size and device)."""
        key = (paired, x.shape[0], x.device)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            if paired:
                kwargs = _batch_kwargs(self.uncond_kwargs, self.cond_kwargs, x.shape[0], x.device)
            else:
                kwargs = _per_sample(self.cond_kwargs, x.shape[0], x.device, "")
            wrapper = self._wrappers[key] = self.model.with_kwargs(**kwargs)
        return wrapper

    def cond_output(self, x: Tensor, t: float) -> Tensor:
        """Raw conditional network output (one call)."""
        return self._wrapper(x, paired=False).forward(x, t)

    def pair_outputs(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """Raw ``(conditional, unconditional)`` outputs from one batched network call."""
        out = self._wrapper(x, paired=True).forward(torch.cat([x, x]), t)
        out_u, out_c = out.chunk(2)
        return out_c, out_u


class ClassifierFreeGuidance(_GuidedPair):
    r"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

    .. math:: \text{out} = \text{out}_u + w\,(\text{out}_c - \text{out}_u)

    on the network output, read through the model's own conversion (valid for every
    prediction type: each maps ``(x, out)`` affinely to :math:`\hat x_0, \hat\epsilon`).
    The two branches share one batched network call (``[uncond; cond]``, as DPM-Solver's
    ``model_wrapper``); ``scale == 1`` makes a single conditional call.

    Args:
        model: The network wrapper (its ``model_kwargs`` are kept; the conditioning given
            here is added per branch).
        scale: Guidance weight :math:`w \ge 0` (1: conditional model, 0: unconditional).
        cond_kwargs: Network keyword arguments of the conditional branch, e.g.
            ``{"class_labels": labels}``; tensors carry one entry per sample (or one to
            broadcast).
        uncond_kwargs: Same keys for the unconditional branch, e.g. the null class.
    """

    def __call__(self, x: Tensor, t: float) -> Prediction:
        if self.scale == 1.0:
            out = self.cond_output(x, t)
        else:
            out_c, out_u = self.pair_outputs(x, t)
            out = out_u + self.scale * (out_c - out_u)
        return Prediction(x, out, self.model.conversion(t), t)


# ---------------------------------------------------------------------------------------
def projected_guidance(
    d_cond: Tensor,
    d_uncond: Tensor,
    scale: float,
    eta: float = 0.0,
    norm_threshold: float | None = None,
    momentum: float = 0.0,
    running: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One APG combination (Sadat et al. 2024, arXiv 2410.02416, Algorithm 1).

    .. math::

        m \leftarrow (D_c - D_u) + \beta m,\quad \Delta = m\min(1, r/\lVert m\rVert),\quad
        \hat D = D_c + (w - 1)(\Delta_\perp + \eta\Delta_\parallel),

    with :math:`\Delta_\parallel` the projection of :math:`\Delta` onto :math:`D_c`, per
    sample, computed in float64.

    Args:
        d_cond, d_uncond: Conditional / unconditional data predictions ``(B, ...)``.
        scale: :math:`w`.
        eta: Weight :math:`\eta` of the parallel component.
        norm_threshold: :math:`r`; ``None`` or ``inf``: no rescaling.
        momentum: :math:`\beta` (negative: the paper's reverse momentum).
        running: The previous :math:`m` (``None`` at the start of a trajectory).

    Returns:
        ``(D̂, m)``: the guided prediction (in ``d_cond``'s dtype) and the new running
        average, to pass back as ``running`` at the next call.
    """
    compute = torch.promote_types(d_cond.dtype, torch.float32)
    delta = d_cond.to(compute) - d_uncond.to(compute)
    if running is not None and momentum != 0.0:
        delta = delta + momentum * running
    running = delta
    dims = tuple(range(1, delta.ndim))
    if norm_threshold is not None and math.isfinite(norm_threshold):
        norm = delta.norm(p=2, dim=dims, keepdim=True)
        delta = delta * torch.clamp(norm_threshold / norm, max=1.0)  # r/0 = inf -> 1
    v = delta.to(torch.float64)
    c = d_cond.to(torch.float64)
    unit = c / c.norm(p=2, dim=dims, keepdim=True).clamp(min=1e-12)
    parallel = (v * unit).sum(dim=dims, keepdim=True) * unit
    update = (v - parallel) + eta * parallel
    guided = c + (scale - 1.0) * update
    return guided.to(d_cond.dtype), running


class AdaptiveProjectedGuidance(_GuidedPair):
    r"""Adaptive projected guidance (APG; Sadat, Hilliges & Weber 2024, arXiv 2410.02416).

    Evaluates the conditional and unconditional branches in one batched call, converts both
    to data predictions :math:`D_c, D_u` and combines them with :func:`projected_guidance`
    (Algorithm 1 of the paper): reverse momentum, per-sample norm rescaling, and
    down-weighting the component of the update parallel to :math:`D_c`. With ``eta=1``,
    ``momentum=0`` and ``norm_threshold=None`` it equals :class:`ClassifierFreeGuidance`.

    The momentum is state: it is reset by :meth:`reset` (which :func:`diffsolve.sample`
    calls at the start of every run), when the batch shape changes, and whenever ``t``
    increases between calls. Equal consecutive times do not reset it (Heun evaluates twice
    at each interior grid time); an adaptive solver's rejected step restarts it.

    Args:
        model: The network wrapper.
        scale: Guidance weight :math:`w \ge 0`; ``1`` is the conditional model (one call).
        cond_kwargs, uncond_kwargs: Network arguments of the two branches (see
            :class:`ClassifierFreeGuidance`).
        eta: :math:`\eta`, weight of the parallel component (paper's recommendation: 0).
        norm_threshold: :math:`r` on the per-sample L2 norm of the update in :math:`x_0`
            space; ``None``/``inf`` disables it; ``"auto"`` (default) is
            :math:`0.0625\sqrt{\text{numel}}` of one sample, measured on the 8x8 digits
            (``r = 0.5``) and scaled as the norm grows (see the module docstring).
        momentum: :math:`\beta` (paper: -0.5).
    """

    def __init__(
        self,
        model: ModelWrapper,
        scale: float,
        cond_kwargs: Mapping[str, Any],
        uncond_kwargs: Mapping[str, Any],
        eta: float = 0.0,
        norm_threshold: float | Literal["auto"] | None = "auto",
        momentum: float = -0.5,
    ) -> None:
        super().__init__(model, scale, cond_kwargs, uncond_kwargs)
        if not isinstance(eta, (int, float)) or not math.isfinite(eta):
            raise ValueError(f"eta must be a finite number, got {eta!r}")
        if norm_threshold not in (None, "auto") and not (
            isinstance(norm_threshold, (int, float))
            and not isinstance(norm_threshold, bool)
            and norm_threshold > 0
        ):
            raise ValueError(
                f"norm_threshold must be 'auto', a number > 0, inf or None; got {norm_threshold!r}"
            )
        if not isinstance(momentum, (int, float)) or not -1.0 < momentum < 1.0:
            raise ValueError(f"momentum must lie in (-1, 1), got {momentum!r}")
        self.eta = float(eta)
        self.norm_threshold = (
            norm_threshold if norm_threshold in (None, "auto") else float(norm_threshold)
        )
        self.momentum = float(momentum)
        self._running: Tensor | None = None
        self._last_t: float | None = None

    def threshold_for(self, x: Tensor) -> float | None:
        """The norm threshold :math:`r` used for samples shaped like ``x[0]``."""
        if self.norm_threshold == "auto":
            return APG_NORM_PER_SQRT_NUMEL * math.sqrt(x[0].numel())
        return self.norm_threshold

    def reset(self) -> None:
        """Start a new trajectory: forget the momentum."""
        self._running = None
        self._last_t = None
        super().reset()

    def __call__(self, x: Tensor, t: float) -> Prediction:
        conversion = self.model.conversion(t)
        if self.scale == 1.0:
            return Prediction(x, self.cond_output(x, t), conversion, t)
        if self._last_t is not None and t > self._last_t:
            self._running = None
        if self._running is not None and self._running.shape != x.shape:
            self._running = None
        self._last_t = t
        out_c, out_u = self.pair_outputs(x, t)
        d_c = Prediction(x, out_c, conversion, t).x0
        d_u = Prediction(x, out_u, conversion, t).x0
        x0, self._running = projected_guidance(
            d_c, d_u, self.scale, self.eta, self.threshold_for(x), self.momentum, self._running
        )
        return Prediction.from_x0(x, x0, conversion.alpha, conversion.sigma, t)


# ---------------------------------------------------------------------------------------
class ClassifierGuidance(DenoiserWrapper):
    r"""Classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233) in DPM-Solver's form.

    .. math:: \hat\epsilon \leftarrow \hat\epsilon - s\,\sigma_t\,\nabla_{x_t}\log
        p_\phi(c \mid x_t)

    (Lu et al. 2022, ``model_wrapper`` with ``guidance_type="classifier"``). The gradient is
    taken with autograd even under ``torch.inference_mode``/``no_grad``; it costs one
    classifier forward and backward per call and no extra model evaluation.

    Args:
        model: Any denoiser.
        classifier: ``classifier(x_t, time, **classifier_kwargs) -> logits (B, K)``, with
            ``time`` a ``(B,)`` float tensor. An ``nn.Module`` gets ``x_t`` in its parameters'
            dtype.
        labels: Target classes, shape ``(B,)`` (or a scalar for all samples).
        scale: :math:`s \ge 0`.
        classifier_time: Solver time to the classifier's time input. Default: the model's
            own time input (``model.model_time``; for models without one, the training
            timestep on discrete VP schedules, else ``t``).
        classifier_kwargs: Extra keyword arguments for the classifier.
    """

    def __init__(
        self,
        model: Denoiser,
        classifier: Callable[..., Tensor],
        labels: Tensor,
        scale: float,
        classifier_time: Callable[[float], float] | None = None,
        classifier_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(classifier):
            raise ValueError(f"classifier must be callable, got {type(classifier).__name__}")
        self.model = model
        self.schedule = model.schedule
        self.classifier = classifier
        self.labels = torch.as_tensor(labels).long()
        if self.labels.ndim > 1:
            raise ValueError(f"labels must be a scalar or 1-D, got {tuple(self.labels.shape)}")
        self.scale = check_scale(scale)
        self.classifier_time = classifier_time or self.model_time
        self.classifier_kwargs = dict(classifier_kwargs or {})

    def grad_log_prob(self, x: Tensor, t: float) -> Tensor:
        r""":math:`\nabla_x \log p_\phi(c \mid x, t)` for every sample, in ``x``'s dtype."""
        labels = _broadcast_batch(self.labels, x.shape[0], "labels").to(x.device)
        dtype = x.dtype
        if isinstance(self.classifier, nn.Module):
            param = next(self.classifier.parameters(), None)
            dtype = param.dtype if param is not None else dtype
        time = torch.full(
            (x.shape[0],), self.classifier_time(t), dtype=torch.float32, device=x.device
        )
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().to(dtype).requires_grad_(True)
            logits = self.classifier(x_in, time, **self.classifier_kwargs)
            log_probs = torch.log_softmax(
                logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
            )
            selected = log_probs.gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return grad.detach().to(x.dtype)

    def __call__(self, x: Tensor, t: float) -> Prediction:
        prediction = self.model(x, t)
        if self.scale == 0.0:
            return prediction
        c = prediction.conversion
        eps = prediction.eps - (self.scale * c.sigma) * self.grad_log_prob(x, t)
        return Prediction(x, eps, conversion_for("epsilon", c.alpha, c.sigma), t)
