"""diffusers' schedulers as bench contestants (the only place the bench imports diffusers).

Each peer runs the loop diffusers documents — ``set_timesteps``, then ``scale_model_input``,
the model, ``step`` — with the scheduler's recommended settings, on the bench model: the
network is called with exactly the input it would get from diffsolve at the same time. A
diffusers model's peers are built from its own scheduler config (``from_config``: its
schedule, prediction type, timestep spacing and flow shift); others' from the schedule.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from diffsolve.app.bench.timing import TimedModel, synchronize
from diffsolve.ode.schedule import NoiseSchedule, RectifiedFlow, VPDiscrete

DIFFUSERS_PREDICTION = {
    "epsilon": "epsilon",
    "x0": "sample",
    "v": "v_prediction",
    "flow": "flow_prediction",
}


@dataclass(frozen=True)
class Peer:
    """A diffusers scheduler configuration.

    Attributes:
        name: Row label, e.g. ``"diffusers:dpm-2m"``.
        scheduler: Class name in ``diffusers``.
        options: Extra constructor arguments (beyond the schedule and prediction type).
        twin: The diffsolve configuration that implements the same method, if any.
        stochastic: The scheduler draws fresh noise (:func:`stochastic_peers`).
    """

    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    twin: str | None = None
    stochastic: bool = False
    model_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def build(self, schedule: NoiseSchedule, prediction: str) -> Any:
        """Instantiate the scheduler for ``schedule`` and a network predicting ``prediction``
        (from the model's own scheduler config where it has one)."""
        import diffusers

        cls = getattr(diffusers, self.scheduler)
        config: dict[str, Any] = dict(self.options)
        flow = isinstance(schedule, RectifiedFlow)
        shift = (schedule.shift or 1.0) if isinstance(schedule, RectifiedFlow) else 1.0
        if flow and self.scheduler != "FlowMatchEulerDiscreteScheduler":
            config.update(use_flow_sigmas=True, flow_shift=shift)
        if self.model_config is not None:
            config["prediction_type"] = DIFFUSERS_PREDICTION[prediction]
            return cls.from_config(self.model_config, **config)
        if flow:
            if self.scheduler == "FlowMatchEulerDiscreteScheduler":
                config["shift"] = shift
            else:
                config["prediction_type"] = "flow_prediction"
            return cls(num_train_timesteps=1000, **config)
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(
                f"diffusers peers support discrete VP and flow schedules, not {schedule!r}"
            )
        spec = schedule.to_config()
        if "beta_schedule" in spec:
            config.update(
                {
                    k: spec[k]
                    for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
                }
            )
        else:
            ac = schedule.alphas_cumprod
            betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
            config.update(trained_betas=betas.tolist(), num_train_timesteps=len(betas))
        return cls(prediction_type=DIFFUSERS_PREDICTION[prediction], **config)

    def solver_times(self, scheduler: Any, schedule: NoiseSchedule) -> list[float]:
        """diffsolve solver time of every model evaluation, then of the final point."""
        if isinstance(schedule, RectifiedFlow):
            return [float(s) for s in scheduler.sigmas]
        n = schedule.num_train_timesteps  # type: ignore[attr-defined]
        times = [(float(ts) + 1) / n for ts in scheduler.timesteps]
        final = getattr(scheduler, "sigmas", None)
        zero = final is None or float(final[-1]) == 0.0
        return [*times, 0.0 if zero else 1 / n]

    def set_timesteps(self, scheduler: Any, schedule: NoiseSchedule, nfe: int) -> None:
        """``set_timesteps(nfe)``; a dynamic-shifting config (Flux) also gets the model's
        ``mu`` (the log of its shift at the sampled size), as its pipeline passes it."""
        if scheduler.config.get("use_dynamic_shifting") and isinstance(schedule, RectifiedFlow):
            scheduler.set_timesteps(nfe, mu=math.log(schedule.shift or 1.0))
        else:
            scheduler.set_timesteps(nfe)

    def run(self, model: TimedModel, x_start: Tensor, nfe: int) -> tuple[Tensor, int, float]:
        """Sample; return ``(x, steps, loop seconds)``."""
        scheduler = self.build(model.schedule, model.prediction)
        self.set_timesteps(scheduler, model.schedule, nfe)
        times = self.solver_times(scheduler, model.schedule)
        x = x_start * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers: none
        scale_input = getattr(scheduler, "scale_model_input", lambda x, _: x)
        # a stochastic scheduler's noise: one generator for the batch, seeded by the first seed
        seeds = getattr(model, "seeds", None) or [0]
        options = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            options["generator"] = torch.Generator(x.device).manual_seed(seeds[0] + 1)
        start = time.perf_counter()
        for i, timestep in enumerate(scheduler.timesteps):
            model_input = scale_input(x, timestep)
            out = model.raw(model_input, times[i])
            x = scheduler.step(out, timestep, x, **options).prev_sample
        synchronize(x)
        return x, len(scheduler.timesteps), time.perf_counter() - start

    def grid(self, schedule: NoiseSchedule, nfe: int) -> Tensor:
        """The scheduler's grid for ``nfe`` evaluations, in diffsolve solver time.

        Flow schedulers start at σ ≈ 1 (float32), where λ = −∞; the grid's first point is
        clipped to the schedule's ``t_max`` (rectified flow: 1 − 10⁻³), as our own grids are.
        """
        scheduler = self.build(
            schedule, "epsilon" if not isinstance(schedule, RectifiedFlow) else "flow"
        )
        self.set_timesteps(scheduler, schedule, nfe)
        times = torch.tensor(self.solver_times(scheduler, schedule), dtype=torch.float64)
        return times.clamp(max=schedule.t_max)


def default_peers(
    schedule: NoiseSchedule, conditional: bool, model_config: dict[str, Any] | None = None
) -> list[Peer]:
    """diffusers' schedulers with their documented recommendations: order 3 for unconditional
    sampling and 2 for conditional (DPM-Solver++, UniPC, DEIS); UniPC bh1 below 10 steps is
    its docstring's advice, bh2 otherwise — both are run at every NFE. Built from
    ``model_config`` (a diffusers model's scheduler config) where given; none for schedules
    diffusers has no scheduler for (continuous VP, EDM) without one."""
    if model_config is None and not isinstance(schedule, (VPDiscrete, RectifiedFlow)):
        return []
    order = 2 if conditional else 3
    peers: list[Peer] = []
    if isinstance(schedule, RectifiedFlow):
        peers.append(Peer("diffusers:flow-euler", "FlowMatchEulerDiscreteScheduler"))
    else:
        peers.append(Peer("diffusers:ddim", "DDIMScheduler", twin=None))
    peers += [
        Peer(
            "diffusers:dpm-2m",
            "DPMSolverMultistepScheduler",
            {"solver_order": 2},
            twin="dpm-solver++-2m",
        ),
        Peer("diffusers:dpm-3m", "DPMSolverMultistepScheduler", {"solver_order": 3}),
        Peer(
            "diffusers:unipc-bh1",
            "UniPCMultistepScheduler",
            {"solver_order": order, "solver_type": "bh1"},
            twin=f"unipc-bh1-{order}",
        ),
        Peer(
            "diffusers:unipc-bh2",
            "UniPCMultistepScheduler",
            {"solver_order": order, "solver_type": "bh2"},
            twin=f"unipc-bh2-{order}",
        ),
        Peer("diffusers:deis", "DEISMultistepScheduler", {"solver_order": order}),
    ]
    return [replace(p, model_config=model_config) for p in peers]


def stochastic_peers(
    schedule: NoiseSchedule, conditional: bool, model_config: dict[str, Any] | None = None
) -> list[Peer]:
    """diffusers' stochastic schedulers (not in the default line-up; by name): DPM-Solver++
    2M/3M SDE, SDE-DPM-Solver 2M, Euler ancestral (VP only in diffusers) and SA-Solver
    (data prediction, τ = 1, its defaults), each stepped with one ``torch.Generator``."""
    if model_config is None and not isinstance(schedule, (VPDiscrete, RectifiedFlow)):
        return []
    sde = {"algorithm_type": "sde-dpmsolver++"}
    peers = [
        Peer("diffusers:dpm-2m-sde", "DPMSolverMultistepScheduler", {**sde, "solver_order": 2},
             twin="dpm-solver++-2m-sde"),
        Peer("diffusers:dpm-3m-sde", "DPMSolverMultistepScheduler", {**sde, "solver_order": 3}),
        Peer("diffusers:sde-dpm-2m", "DPMSolverMultistepScheduler",
             {"algorithm_type": "sde-dpmsolver", "solver_order": 2}, twin="sde-dpm-solver-2m"),
        Peer("diffusers:sa-solver", "SASolverScheduler"),
    ]  # fmt: skip
    if not isinstance(schedule, RectifiedFlow):
        peers.append(Peer("diffusers:euler-ancestral", "EulerAncestralDiscreteScheduler"))
    return [replace(p, model_config=model_config, stochastic=True) for p in peers]


def null_overhead(batch: int, steps: int = 20, repeats: int = 5) -> dict[str, float]:
    """Per-step solver overhead (µs) with a model that costs nothing, at one batch size:
    diffsolve's DPM-Solver++(2M) loop (model wrapper included) against
    ``DPMSolverMultistepScheduler.step`` (with ``scale_model_input``)."""
    import diffusers

    from diffsolve.app.loader import digits_schedule
    from diffsolve.ode import grids
    from diffsolve.ode.model import ModelWrapper
    from diffsolve.ode.sampling import sample
    from diffsolve.solvers import DPMSolverPP

    schedule = digits_schedule()
    x0 = torch.randn(batch, 1, 8, 8)
    output = torch.randn(batch, 1, 8, 8)
    model = ModelWrapper(lambda x, t: output, schedule, "epsilon")
    grid = grids.append_zero(schedule, grids.time_uniform(schedule, steps - 1))
    solver = DPMSolverPP(2)
    plan = solver.plan(schedule, grid)
    ours, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(model, x0, solver, plan=plan)
        ours.append((time.perf_counter() - start) / steps)
        scheduler = diffusers.DPMSolverMultistepScheduler(
            beta_schedule="linear", beta_start=1e-4, beta_end=0.02
        )
        scheduler.set_timesteps(steps)
        x = x0.clone()
        start = time.perf_counter()
        for timestep in scheduler.timesteps:
            x = scheduler.step(
                output, timestep, scheduler.scale_model_input(x, timestep)
            ).prev_sample
        theirs.append((time.perf_counter() - start) / steps)
    ours_us, theirs_us = 1e6 * min(ours), 1e6 * min(theirs)
    return {
        "batch": batch,
        "diffsolve_us": ours_us,
        "diffusers_us": theirs_us,
        "ratio": ours_us / theirs_us,
    }
