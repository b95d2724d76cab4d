"""Wrappers compose with any model or solver: guidance and thresholding wrap the model
(:mod:`.guidance`, :mod:`.thresholding`), teleportation wraps a solver (:mod:`.teleport`)."""
