"""DDIM, deterministic (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffsolve.ode.plan import Solver
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import GridValues, StepPlan, Update, check_order, multistep_plan
from diffsolve.solvers.registry import DiffusersMapping, Preset, register


@register
@dataclass(frozen=True)
class DDIM(Solver):
    r"""DDIM with :math:`\eta = 0`: re-noise the data prediction to the next time,

    .. math::

        x_t = \alpha_t \hat x_0 + \sigma_t \hat\epsilon
            = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t\,(1 - e^{-h})\,\hat x_0,
        \qquad h = \lambda_t - \lambda_s,

    which is the first-order exponential integrator in either data or noise space, and the
    Euler method on :math:`(x/\alpha, \sigma/\alpha)`. One model evaluation per step.
    """

    order: int = 1

    name: ClassVar[str] = "ddim"
    presets: ClassVar[tuple[Preset, ...]] = (
        Preset("ddim", "DDIM (eta = 0), first order", lineup=True),
    )
    diffusers: ClassVar[DiffusersMapping] = DiffusersMapping(
        "DiffsolveDDIMScheduler", "ddim", sibling="DDIMScheduler"
    )

    def __post_init__(self) -> None:
        check_order(self.order, (1,), "DDIM")

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> StepPlan:
        at = GridValues.of(schedule, grid)

        def predictor(i: int, order: int) -> Update:
            step = at.exp_step("data", i, i + 1)
            return Update(step.a, (step.coef(0),), "data")

        return multistep_plan(at, [1] * at.num_steps, predictor)
