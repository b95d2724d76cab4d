"""diffsolve: fast, training-free samplers for pretrained diffusion and flow models."""

from diffsolve.ode import grids
from diffsolve.stats.gaussian.analytic import GaussianModel
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
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverAdaptive,
    DPMSolverPP,
    Euler,
    Heun,
    Solver,
    UniPC,
    fast_orders,
)

__version__ = "0.1.0"

__all__ = [
    "DDIM",
    "DEIS",
    "EDM",
    "DPMSolver",
    "DPMSolverAdaptive",
    "DPMSolverPP",
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
    "StepInfo",
    "UniPC",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "fast_orders",
    "grids",
    "invert",
    "sample",
    "schedule_from_config",
]
