"""Wrappers compose with any model or solver: guidance, thresholding and DualFast wrap the
model (:mod:`.guidance`, :mod:`.thresholding`, :mod:`.dualfast`), teleportation wraps a solver
(:mod:`.teleport`)."""

from diffsolve.wrappers.dualfast import DualFast
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
    "DualFast",
    "DynamicThresholding",
    "Teleported",
    "teleport",
    "teleported_setup",
]
