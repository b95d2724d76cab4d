"""diffsolve: fast, training-free samplers for pretrained diffusion and flow models."""

from diffsolve import grids
from diffsolve.gaussian import GaussianModel
from diffsolve.model import ModelWrapper, Prediction
from diffsolve.sampling import SampleOutput, StepInfo, sample
from diffsolve.schedule import (
    EDM,
    NoiseSchedule,
    RectifiedFlow,
    VPCosine,
    VPDiscrete,
    VPLinear,
    schedule_from_config,
)
from diffsolve.solvers import DDIM, DPMSolver, DPMSolverPP, Solver, fast_orders

__version__ = "0.1.0"

__all__ = [
    "DDIM",
    "EDM",
    "DPMSolver",
    "DPMSolverPP",
    "GaussianModel",
    "ModelWrapper",
    "NoiseSchedule",
    "Prediction",
    "RectifiedFlow",
    "SampleOutput",
    "Solver",
    "StepInfo",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "fast_orders",
    "grids",
    "sample",
    "schedule_from_config",
]
