"""Solvers: one self-describing file per method over the plan engine (:mod:`.engine`);
:mod:`.registry` collects their presets. Importing this package registers every solver."""

from diffsolve.ode.plan import Plan, Solver, State
from diffsolve.solvers.adaptive import AdaptiveLimitError, DPMSolverAdaptive
from diffsolve.solvers.ancestral import DDPM, EulerAncestral
from diffsolve.solvers.bdia import BDIA, bdia_invert, bdia_reconstruct
from diffsolve.solvers.ddim import DDIM
from diffsolve.solvers.deis import DEIS
from diffsolve.solvers.dpm_solver import DPMSolver, fast_orders
from diffsolve.solvers.dpm_solver_pp import DPMSolverPP
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.edm_stochastic import EDMStochastic
from diffsolve.solvers.engine import StepPlan, Update
from diffsolve.solvers.euler_heun import Euler, Heun
from diffsolve.solvers.registry import SOLVERS, Preset, SolverContext, register
from diffsolve.solvers.sa_solver import SASolver
from diffsolve.solvers.sde_dpm_solver import SDEDPMSolver, SDEDPMSolverPP
from diffsolve.solvers.solver_schedule import ScheduledSolver, SolverSchedule, StepChoice
from diffsolve.solvers.unipc import UniPC

__all__ = [
    "BDIA",
    "DDIM",
    "DDPM",
    "DEIS",
    "SOLVERS",
    "AdaptiveLimitError",
    "DPMSolver",
    "DPMSolverAdaptive",
    "DPMSolverPP",
    "DPMSolverV3",
    "EDMStochastic",
    "Euler",
    "EulerAncestral",
    "Heun",
    "Plan",
    "Preset",
    "SASolver",
    "SDEDPMSolver",
    "SDEDPMSolverPP",
    "ScheduledSolver",
    "Solver",
    "SolverContext",
    "SolverSchedule",
    "State",
    "StepChoice",
    "StepPlan",
    "UniPC",
    "Update",
    "bdia_invert",
    "bdia_reconstruct",
    "fast_orders",
    "register",
]
