"""Wrappers compose with any model or solver: guidance and thresholding wrap the model
(:mod:`.guidance`, :mod:`.thresholding`), teleportation wraps a solver (:mod:`.teleport`)."""

from diffsolve.wrappers.guidance import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
)
from diffsolve.wrappers.teleport import Teleported, teleport, teleported_setup
from diffsolve.wrappers.thresholding import DynamicThresholding

__all__ = [
    "AdaptiveProjectedGuidance",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DynamicThresholding",
    "Teleported",
    "teleport",
    "teleported_setup",
]
