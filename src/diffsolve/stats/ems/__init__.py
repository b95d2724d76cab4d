"""Empirical model statistics (EMS) for DPM-Solver-v3: containers, files, estimation."""

from diffsolve.stats.ems.statistics import EMS, exposed_fingerprint, load_ems, model_fingerprint
from diffsolve.stats.ems.table import EMSTable

__all__ = ["EMS", "EMSTable", "exposed_fingerprint", "load_ems", "model_fingerprint"]
