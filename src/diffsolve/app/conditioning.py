"""How the command line and the bench guide a loaded model (``--guidance``, ``--scale``,
``--threshold``): a registry of guidance methods over the wrappers of
:mod:`diffsolve.wrappers`, and the spec that builds the guided denoiser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from diffsolve.app.loader import LoadedModel
from diffsolve.ode.model import Denoiser
from diffsolve.wrappers.dualfast import DualFast
from diffsolve.wrappers.guidance import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    check_scale,
    class_conditioning,
)
from diffsolve.wrappers.thresholding import DynamicThresholding

__all__ = ["GUIDANCE", "GuidanceSpec"]

Builder = Callable[[LoadedModel, Tensor | None, float], Denoiser]


def _unguided(loaded: LoadedModel, labels: Tensor | None, scale: float) -> Denoiser:
    """A class-conditional model samples its labels unguided; others as they are."""
    if loaded.num_classes and labels is not None:
        return loaded.conditional(labels)
    return loaded.denoiser


def _pair(method: str, cls: type[ClassifierFreeGuidance]) -> Builder:
    """CFG or APG of a class-conditional model, the null class as unconditional branch."""

    def build(loaded: LoadedModel, labels: Tensor | None, scale: float) -> Denoiser:
        if not loaded.num_classes or labels is None:
            raise ValueError(
                f"guidance {method!r} needs a class-conditional model (e.g. digits-cond); "
                f"{loaded.name!r} is not"
            )
        conditioning = loaded.config.get("conditioning") or {}
        null_class = conditioning.get("null_class", loaded.num_classes)
        cond, uncond = class_conditioning(labels, null_class)
        return cls(loaded.denoiser, scale, cond, uncond)  # type: ignore[arg-type]

    return build


def _classifier(loaded: LoadedModel, labels: Tensor | None, scale: float) -> Denoiser:
    """Classifier guidance with the shipped digits classifier."""
    from diffsolve.app.classifier import load_classifier

    if labels is None:
        raise ValueError("classifier guidance needs target labels")
    classifier = load_classifier(device=str(labels.device))
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
