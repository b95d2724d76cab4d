"""Shared numerical kernels: φ-functions and exponential-integrator weight solves."""

from diffsolve.numerics.expint import ExpStep, solve_vandermonde, taylor_weights
from diffsolve.numerics.phi import phi, phi_tensor

__all__ = ["ExpStep", "phi", "phi_tensor", "solve_vandermonde", "taylor_weights"]
