"""Shared numerical kernels: φ-functions and exponential-integrator weight solves."""

from diffsolve.core.expint import ExpStep, solve_vandermonde, taylor_weights
from diffsolve.core.phi import phi, phi_tensor

__all__ = ["ExpStep", "phi", "phi_tensor", "solve_vandermonde", "taylor_weights"]
