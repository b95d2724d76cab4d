"""Solvers: one file per method over the shared exponential-integrator kernel."""

from diffsolve.solvers.base import Plan, Solver, State
from diffsolve.solvers.ddim import DDIM
from diffsolve.solvers.dpm_solver import DPMSolver, fast_orders
from diffsolve.solvers.dpm_solver_pp import DPMSolverPP

__all__ = ["DDIM", "DPMSolver", "DPMSolverPP", "Plan", "Solver", "State", "fast_orders"]
