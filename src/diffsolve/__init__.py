"""diffsolve: fast, training-free samplers for pretrained diffusion and flow models.

The public API, by layer (README, "Architecture"): the ODE core (schedules, the model
wrapper, grids, :func:`sample`), the solvers and their registry, the wrappers (guidance,
thresholding, teleportation) and the statistics they use (EMS, Gaussian models).
"""

from diffsolve.ode import grids
from diffsolve.ode.model import ModelWrapper, Prediction
from diffsolve.ode.sampling import NonFiniteError, SampleOutput, StepInfo, invert, sample
from diffsolve.ode.schedule import (
    EDM,
    NoiseSchedule,
    RectifiedFlow,
    VPCosine,
    VPDiscrete,
    VPLinear,
    schedule_from_config,
)
from diffsolve.solvers import (
    BDIA,
    DDIM,
    DEIS,
    SOLVERS,
    AdaptiveLimitError,
    DPMSolver,
    DPMSolverAdaptive,
    DPMSolverPP,
    DPMSolverV3,
    Euler,
    Heun,
    Solver,
    SolverContext,
    UniPC,
    fast_orders,
)
from diffsolve.solvers.registry import setup_solver
from diffsolve.stats.ems import EMS, load_ems
from diffsolve.stats.gaussian import GaussianModel, load_gaussian_stats
from diffsolve.wrappers import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    DualFast,
    DynamicThresholding,
    Teleported,
)

__version__ = "0.1.0"

__all__ = [
    "BDIA",
    "DDIM",
    "DEIS",
    "EDM",
    "EMS",
    "SOLVERS",
    "AdaptiveLimitError",
    "AdaptiveProjectedGuidance",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DPMSolver",
    "DPMSolverAdaptive",
    "DPMSolverPP",
    "DPMSolverV3",
    "DualFast",
    "DynamicThresholding",
    "Euler",
    "GaussianModel",
    "Heun",
    "ModelWrapper",
    "NoiseSchedule",
    "NonFiniteError",
    "Prediction",
    "RectifiedFlow",
    "SampleOutput",
    "Solver",
    "SolverContext",
    "StepInfo",
    "Teleported",
    "UniPC",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "fast_orders",
    "grids",
    "invert",
    "load_ems",
    "load_gaussian_stats",
    "sample",
    "schedule_from_config",
    "setup_solver",
]
