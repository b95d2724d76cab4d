"""Solvers: one file per method over the shared exponential-integrator kernel."""

from diffsolve.solvers.adaptive import DPMSolverAdaptive
from diffsolve.solvers.engine import Plan, Solver, State, Update
from diffsolve.solvers.bdia import BDIA, bdia_invert, bdia_reconstruct
from diffsolve.solvers.ddim import DDIM
from diffsolve.solvers.deis import DEIS
from diffsolve.solvers.dpm_solver import DPMSolver, fast_orders
from diffsolve.solvers.dpm_solver_pp import DPMSolverPP
from diffsolve.solvers.euler_heun import Euler, Heun
from diffsolve.solvers.unipc import UniPC

__all__ = [
    "BDIA",
    "DDIM",
    "DEIS",
    "DPMSolver",
    "DPMSolverAdaptive",
    "DPMSolverPP",
    "Euler",
    "Heun",
    "Plan",
    "Solver",
    "State",
    "UniPC",
    "Update",
    "bdia_invert",
    "bdia_reconstruct",
    "fast_orders",
]
