"""How the command line and the bench guide a loaded model (``--guidance``, ``--scale``,
``--threshold``): a registry of guidance methods over the wrappers of
:mod:`diffsolve.wrappers`, and the spec that builds the guided denoiser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffsolve.app.loader import LoadedModel
from diffsolve.ode.model import Denoiser, ModelWrapper
from diffsolve.wrappers.dualfast import DualFast
from diffsolve.wrappers.guidance import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    check_scale,
    class_conditioning,
)
from diffsolve.wrappers.thresholding import DynamicThresholding

__all__ = ["GUIDANCE", "GuidanceSpec", "GuidedNetwork", "guided_network"]

Builder = Callable[[LoadedModel, Tensor | None, float], Denoiser]


def _unguided(loaded: LoadedModel, labels: Tensor | None, scale: float) -> Denoiser:
    """A class-conditional model samples its labels unguided; others as they are."""
    if loaded.num_classes and labels is not None:
        return loaded.conditional(labels)
    return loaded.denoiser


def _null_class(loaded: LoadedModel, method: str) -> int:
    """The class of the unconditional branch (a text pipeline: its negative prompt)."""
    if not loaded.num_classes:
        raise ValueError(
            f"guidance {method!r} needs a class-conditional model (e.g. digits-cond) or a text "
            f"pipeline; {loaded.name!r} is neither"
        )
    conditioning = loaded.config.get("conditioning") or {}
    return int(conditioning.get("null_class", loaded.num_classes))


def _pair(method: str, cls: type[ClassifierFreeGuidance]) -> Builder:
    """CFG or APG of a class-conditional model, the null class as unconditional branch."""

    def build(loaded: LoadedModel, labels: Tensor | None, scale: float) -> Denoiser:
        null_class = _null_class(loaded, method)
        if labels is None:
            raise ValueError(f"guidance {method!r} needs the labels of the samples")
        cond, uncond = class_conditioning(labels, null_class)
        return cls(loaded.denoiser, scale, cond, uncond)  # type: ignore[arg-type]

    return build


class GuidedNetwork(nn.Module):
    r"""Classifier-free guidance inside the network, for what needs one network
    differentiable in :math:`(x, t)` (DPM-Solver-v3's statistics under guidance):
    :math:`\text{out}_u + w\,(\text{out}_c - \text{out}_u)`, the two branches in one
    batched call, the unconditional one at ``null_class``. Sampling guides through
    :class:`~diffsolve.wrappers.guidance.ClassifierFreeGuidance` instead; both give the same
    denoiser."""

    def __init__(self, network: nn.Module, null_class: int, scale: float) -> None:
        super().__init__()
        self.network, self.null_class, self.scale = network, int(null_class), float(scale)

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **kw: object
    ) -> Tensor:
        n = x.shape[0]
        if class_labels is None:  # no condition given: both branches unconditional
            class_labels = torch.tensor(self.null_class)
        labels = class_labels.to(x.device).long().expand(n)
        null = torch.full_like(labels, self.null_class)
        times = t.expand(n) if t.ndim else t.reshape(1).expand(n)
        out = self.network(
            torch.cat([x, x]),
            torch.cat([times, times]),
            class_labels=torch.cat([null, labels]),
            **kw,
        )
        out = getattr(out, "sample", out)
        uncond, cond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


def guided_network(loaded: LoadedModel, scale: float) -> ModelWrapper:
    """The model's denoiser with classifier-free guidance at ``scale`` in its network
    (:class:`GuidedNetwork`): same schedule, prediction, time map and fingerprint."""
    check_scale(scale)
    wrapper = loaded.denoiser
    if not isinstance(wrapper, ModelWrapper):
        raise ValueError(f"model {loaded.name!r} has no network to guide")
    network = GuidedNetwork(wrapper.model, _null_class(loaded, "cfg"), scale)  # type: ignore[arg-type]
    return ModelWrapper(
        network,
        wrapper.schedule,
        wrapper.prediction,
        wrapper.time_input,
        wrapper.model_kwargs,
        wrapper.model_dtype,
        wrapper.fingerprint,
        wrapper.data_shape,
    )


def check_classifier_schedule(config: dict | None, loaded: LoadedModel) -> None:
    """Refuse a classifier trained under another noise schedule than the model's (its
    ``config["schedule"]``): it reads the noise level from the time input, so on another
    schedule its gradient steers the wrong levels and the samples leave the data range."""
    from diffsolve.ode.schedule import schedule_from_config

    recorded = (config or {}).get("schedule")
    if recorded is None:
        return
    trained = schedule_from_config(recorded)
    if not trained.same_process(loaded.schedule):
        raise ValueError(
            f"--guidance classifier: the classifier was trained on noisy digits of the noise "
            f"schedule {trained!r}, not this model's {loaded.schedule!r}, so its gradients "
            "would steer the wrong noise levels; use a model of its schedule (digits, "
            "digits-cond), or cfg/apg with a class-conditional model"
        )


def _classifier(loaded: LoadedModel, labels: Tensor | None, scale: float) -> Denoiser:
    """Classifier guidance with the shipped digits classifier."""
    from diffsolve.app.classifier import load_classifier

    if labels is None:
        raise ValueError("classifier guidance needs target labels")
    classifier = load_classifier(device=str(labels.device))
    check_classifier_schedule(classifier.config, loaded)
    base = loaded.conditional(labels) if loaded.num_classes else loaded.denoiser
    return ClassifierGuidance(base, classifier, labels, scale)


#: ``--guidance`` methods: ``none``, classifier-free (``cfg``) and adaptive projected
#: (``apg``) guidance of a class-conditional model, or ``classifier`` guidance with the
#: shipped digits classifier on any digits model.
GUIDANCE: dict[str, Builder] = {
    "none": _unguided,
    "cfg": _pair("cfg", ClassifierFreeGuidance),
    "apg": _pair("apg", AdaptiveProjectedGuidance),
    "classifier": _classifier,
}


@dataclass(frozen=True)
class GuidanceSpec:
    """How to guide a loaded model.

    Attributes:
        method: A key of :data:`GUIDANCE`.
        scale: Guidance weight (CFG/APG :math:`w`, classifier :math:`s`).
        threshold: Dynamic-thresholding ratio (e.g. 0.995), or ``None`` for none.
        dualfast: DualFast's coefficient :math:`c` (:class:`~diffsolve.wrappers.DualFast`,
            applied to the guided prediction, τ = the previous evaluation); 0: none.
    """

    method: str = "none"
    scale: float = 1.0
    threshold: float | None = None
    dualfast: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in GUIDANCE:
            raise ValueError(f"guidance must be one of {list(GUIDANCE)}, got {self.method!r}")
        check_scale(self.scale)
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        if not 0.0 <= self.dualfast < float("inf"):
            raise ValueError(f"dualfast must be a finite c >= 0, got {self.dualfast!r}")

    def build(self, loaded: LoadedModel, labels: Tensor | None) -> Denoiser:
        """The denoiser for a loaded model and per-sample labels."""
        model = GUIDANCE[self.method](loaded, labels, self.scale)
        if self.dualfast:
            model = DualFast(model, self.dualfast)
        if self.threshold is not None:
            model = DynamicThresholding(model, self.threshold)
        return model
