"""Empirical model statistics (EMS) for DPM-Solver-v3: containers, files, estimation."""

from diffsolve.ems.stats import EMS, load_ems, model_fingerprint
from diffsolve.ems.table import EMSTable

__all__ = ["EMS", "EMSTable", "load_ems", "model_fingerprint"]
