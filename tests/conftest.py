"""Shared fixtures: every schedule kind, a Gaussian oracle, a catalogue of solvers."""

from __future__ import annotations

import pytest
import torch

from diffsolve import (
    DDIM,
    DEIS,
    EDM,
    DPMSolver,
    DPMSolverPP,
    Euler,
    GaussianModel,
    Heun,
    RectifiedFlow,
    UniPC,
    VPCosine,
    VPDiscrete,
    VPLinear,
)

SCHEDULES = {
    "vp_discrete": lambda: VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000),
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}


def make_solvers(lof: bool = False) -> dict[str, object]:
    """Every fixed-grid solver configuration whose order the suite checks."""
    solvers = {
        "ddim": DDIM(),
        "euler": Euler(),
        "heun": Heun(),
        "deis-t-2": DEIS(2, lower_order_final=lof),
        "deis-t-3": DEIS(3, lower_order_final=lof),
        "deis-rho-3": DEIS(3, basis="rho", lower_order_final=lof),
        "deis-logrho-3": DEIS(3, basis="log_rho", lower_order_final=lof),
    }
    for cls, tag in ((DPMSolver, "dpms"), (DPMSolverPP, "dpmspp")):
        for order in (1, 2, 3):
            for solver_type in ("midpoint", "taylor"):
                solvers[f"{tag}-{order}m-{solver_type}"] = cls(
                    order, solver_type=solver_type, lower_order_final=lof
                )
                solvers[f"{tag}-{order}s-{solver_type}"] = cls(
                    order, method="singlestep", solver_type=solver_type
                )
    for order in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for corrector in (True, False):
                for predict in ("data", "noise"):
                    name = f"unipc-{variant}-{order}-{'pc' if corrector else 'p'}-{predict}"
                    solvers[name] = UniPC(
                        order, variant, corrector=corrector, space=predict, lower_order_final=lof
                    )
    return solvers


@pytest.fixture(scope="session")
def gaussian() -> GaussianModel:
    return GaussianModel.random((6,), seed=1)


def noise(schedule, shape=(16, 6), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * schedule.init_noise_sigma()


@pytest.fixture
def single_thread():
    """On shared, oversubscribed CPUs torch's intra-op threads can be ~100x slower; modules
    that run many small networks use ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
