r"""``diffsolve bench --profile scale``: what sampling costs at the sizes real models have.

Three measurements, each with its contestants interleaved (one round of every contestant,
then the next round) on the same device:

* **Overhead per step** with a null model (:math:`\epsilon = 0.5\,x`) at the shapes of the
  demos, Stable Diffusion and SDXL latents and a 256² pixel model: diffsolve's
  DPM-Solver++(2M), UniPC and DPM-Solver-v3 (EMS of the right shape, plan built beforehand)
  against diffusers' ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` (their
  ``step`` loop, ``set_timesteps`` beforehand) and k-diffusion's ``sample_dpmpp_2m`` where
  k-diffusion imports. Reported: median µs per step, and the ratio to diffusers' DPM++(2M).
* **DPM-Solver-v3 plans**: build time on the device (cold, then from the per-EMS cache) and
  the peak memory the build adds, with an EMS of N = 1200 intervals.
* **End to end** with real-size networks of random weights: a pixel ``UNet2DModel`` (64² RGB,
  channels 128/256/256/512) and a ``UNet2DConditionModel`` with Stable Diffusion 1.5's widths
  (320/640/1280/1280, cross-attention 768) on 4×64×64 latents: the network alone (the same
  calls, no solver), diffsolve's loop and diffusers' loop at the same steps; and the peak
  memory of :func:`diffsolve.sample` with and without the caller's ``no_grad``.

Peak memory (:func:`peak_bytes`) is CUDA's allocator peak, or on the CPU the replayed
allocations of the torch profiler: above what was in use before, whatever the C library
keeps for reuse.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsolve.app.bench.timing import synchronize
from diffsolve.ode import grids
from diffsolve.ode.model import ModelWrapper
from diffsolve.ode.sampling import sample
from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete
from diffsolve.solvers import DPMSolverPP, DPMSolverV3, UniPC
from diffsolve.solvers.registry import nfe_grid
from diffsolve.stats.ems import EMS

SHAPES = ((16, 1, 8, 8), (4, 4, 64, 64), (4, 4, 128, 128), (16, 3, 256, 256))
PLAN_SHAPES = ((4, 64, 64), (4, 128, 128))
SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
PIXEL_UNET = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 512),
    "layers_per_block": 2,
}


@dataclass
class ScaleConfig:
    """What ``--profile scale`` measures; ``None`` picks the device's default (CPU: small
    end-to-end batches and few steps, to stay under five minutes on 2 cores)."""

    device: str = "cpu"
    shapes: Sequence[tuple[int, ...]] = SHAPES
    steps: int = 10
    repeats: int = 5
    plan_shapes: Sequence[tuple[int, ...]] = PLAN_SHAPES
    end_to_end: bool = True
    e2e_batch: int | None = None
    e2e_steps: int | None = None


@dataclass
class ScaleResult:
    """Everything the scale profile measured (serialised to JSON as is)."""

    device: str
    device_name: str
    torch_version: str
    freed_memory_kept: bool
    overhead: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    end_to_end: list[dict[str, Any]] = field(default_factory=list)
    seconds_total: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def run_scale_bench(
    config: ScaleConfig, progress: Callable[[str], None] | None = None
) -> ScaleResult:
    """Run the three measurements of the scale profile."""
    from diffsolve.app.tuning import keep_freed_memory

    say = progress or (lambda message: None)
    started = time.perf_counter()
    device = torch.device(config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result = ScaleResult(config.device, name, torch.__version__, keep_freed_memory())
    with torch.no_grad():
        for shape in config.shapes:
            say(f"overhead per step at {'×'.join(map(str, shape))}")
            result.overhead += overhead_rows(shape, config.steps, config.repeats, device)
        for shape in config.plan_shapes:
            say(f"DPM-Solver-v3 plan at {'×'.join(map(str, shape))}")
            result.plans.append(plan_row(shape, config.steps, device))
    if config.end_to_end:
        cpu = device.type == "cpu"
        batch = config.e2e_batch or (1 if cpu else 4)
        steps = config.e2e_steps or (4 if cpu else 20)
        for kind in ("pixel", "latent"):
            say(f"end to end, {kind} UNet, batch {batch}, {steps} steps")
            result.end_to_end.append(end_to_end_row(kind, batch, steps, device))
    result.seconds_total = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------
# Null-model overhead
def _schedule() -> VPDiscrete:
    return VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)


def tiled_ems(shape: Sequence[int]) -> EMS:
    """The digits demo's EMS (N = 1200) tiled to ``shape`` (C, H, W): realistic statistics
    at any size, for timing."""
    from diffsolve.app.loader import load_model

    base = load_model("digits").load_ems()
    reps = [math.ceil(s / b) for s, b in zip(shape, base.data_shape, strict=True)]

    def tile(a: Tensor) -> Tensor:
        out = a.repeat(1, *reps)
        return out[(slice(None), *(slice(0, s) for s in shape))].contiguous()

    meta = dict(base.metadata, data_shape=list(shape))
    return EMS(
        base.lambdas, None, tile(base.s), tile(base.b), meta, one_minus_l=tile(base.one_minus_l)
    )


def overhead_rows(
    shape: tuple[int, ...], steps: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """Median µs per step of every contestant at one shape, with a null model."""
    contestants = _null_contestants(shape, steps, device)
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for round_ in range(repeats + 1):  # round 0 warms up (first calls, allocator)
        for name, prepare in contestants.items():
            seconds = _timed(prepare(), device) / steps
            if round_:
                times[name].append(seconds)
    base = statistics.median(times["diffusers DPM++(2M)"])
    return [
        {
            "shape": list(shape),
            "solver": name,
            "us_per_step": 1e6 * statistics.median(values),
            "ratio": statistics.median(values) / base,
        }
        for name, values in times.items()
    ]


def _timed(run: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of ``run()``, the device synchronised before and after."""
    synchronize(torch.empty(0, device=device))
    start = time.perf_counter()
    out = run()
    synchronize(out if isinstance(out, Tensor) else torch.empty(0, device=device))
    return time.perf_counter() - start


#: A contestant: ``prepare()`` (not timed: a new scheduler, ``set_timesteps``) returns the
#: loop to time.
Contestant = Callable[[], Callable[[], Any]]


def _null_contestants(
    shape: tuple[int, ...], steps: int, device: torch.device
) -> dict[str, Contestant]:
    schedule = _schedule()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    model = ModelWrapper(lambda x, t: 0.5 * x, schedule, "epsilon")
    grid = nfe_grid(schedule, steps, "time_quadratic")
    ems = tiled_ems(shape[1:]).to(device)
    ours = {
        "diffsolve DPM++(2M)": DPMSolverPP(2),
        "diffsolve UniPC(2)": UniPC(2),
        "diffsolve DPM-Solver-v3": DPMSolverV3(ems, order=2),
    }
    contestants: dict[str, Contestant] = {}
    for name, solver in ours.items():
        plan = solver.plan(schedule, grid)
        contestants[name] = lambda solver=solver, plan=plan: (
            lambda: sample(model, x, solver, plan=plan).x
        )
    for name, cls in (
        ("DPM++(2M)", "DPMSolverMultistepScheduler"),
        ("UniPC(2)", "UniPCMultistepScheduler"),
    ):
        contestants[f"diffusers {name}"] = lambda cls=cls: _diffusers_loop(cls, x, steps)
    k_loop = _k_diffusion_loop(x, steps)
    if k_loop is not None:
        contestants["k-diffusion DPM++(2M)"] = lambda: k_loop
    return contestants


def _diffusers_loop(scheduler_name: str, x: Tensor, steps: int) -> Callable[[], Tensor]:
    """diffusers' documented loop with a null model; the scheduler is made beforehand."""
    import diffusers

    scheduler = getattr(diffusers, scheduler_name)(solver_order=2)
    scheduler.set_timesteps(steps, device=x.device)

    def run() -> Tensor:
        y = x
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(y, timestep)
            y = scheduler.step(0.5 * model_input, timestep, y).prev_sample
        return y

    return run


def _k_diffusion_loop(x: Tensor, steps: int) -> Callable[[], Tensor] | None:
    """k-diffusion's ``sample_dpmpp_2m`` with a null denoiser, or ``None`` where k-diffusion
    does not import (its package pulls torchvision, which has no build for every torch)."""
    try:
        from k_diffusion import sampling
    except Exception:  # any import failure means "not available"
        return None
    sigmas = sampling.get_sigmas_karras(steps, 0.03, 14.6, device=x.device)

    def run() -> Tensor:
        return sampling.sample_dpmpp_2m(lambda y, sigma: 0.5 * y, x, sigmas, disable=True)

    return run


# ---------------------------------------------------------------------------------------
# DPM-Solver-v3 plans
def plan_row(shape: tuple[int, ...], steps: int, device: torch.device) -> dict[str, Any]:
    """Cold and cached build time of a v3 plan at one data shape, and its peak memory."""
    schedule = _schedule()
    grid = nfe_grid(schedule, steps, "time_quadratic")
    ems = tiled_ems(shape).to(device)
    cold = _timed(lambda: DPMSolverV3(ems, order=2).plan(schedule, grid), device)
    cached = _timed(lambda: DPMSolverV3(ems, order=2).plan(schedule, grid), device)
    ems.cache.clear()
    peak = peak_bytes(lambda: DPMSolverV3(ems, order=2).plan(schedule, grid), device)
    return {
        "shape": list(shape),
        "ems_intervals": ems.num_intervals,
        "ems_mb": sum(getattr(ems, n).nbytes for n in ("one_minus_l", "s", "b")) / 2**20,
        "cold_s": cold,
        "cached_ms": 1e3 * cached,
        "peak_extra_mb": peak / 2**20,
    }


def peak_bytes(run: Callable[[], Any], device: torch.device) -> int:
    """The peak of the memory ``run()`` allocates on ``device`` above what was in use before:
    CUDA's allocator statistics, or on the CPU the allocations and frees the torch profiler
    records, replayed in time order (independent of what the C library keeps or returns)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        run()
    deltas = []
    for event in prof.events():
        memory = (
            event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        )
        if memory:
            deltas.append((event.time_range.start, memory))
    total = peak = 0
    for _, memory in sorted(deltas):
        total += memory
        peak = max(peak, total)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ logs a line at every start and stop)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "CPU"


# ---------------------------------------------------------------------------------------
# End to end with real-size networks
def _network(kind: str, batch: int, device: torch.device) -> tuple[Any, Tensor, dict[str, Any]]:
    """A random-weight diffusers UNet, its input batch and its extra arguments."""
    import diffusers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "pixel":
        net = diffusers.UNet2DModel(**PIXEL_UNET)
        x = torch.randn(batch, 3, 64, 64, generator=gen)
        kwargs: dict[str, Any] = {}
    else:
        net = diffusers.UNet2DConditionModel(**SD_UNET)
        x = torch.randn(batch, 4, 64, 64, generator=gen)
        kwargs = {"encoder_hidden_states": torch.randn(batch, 77, 768, generator=gen).to(device)}
    return net.to(device).eval(), x.to(device), kwargs


def end_to_end_row(kind: str, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Seconds for the network alone, diffsolve's loop and diffusers' loop (interleaved, best
    of five rounds, two for the latent UNet), and diffsolve's peak memory with and without
    the caller's ``no_grad``."""
    import diffusers

    net, x, kwargs = _network(kind, batch, device)
    schedule = _schedule()
    model = ModelWrapper(net, schedule, "epsilon", model_kwargs=kwargs)
    scheduler = diffusers.DPMSolverMultistepScheduler(solver_order=2)
    scheduler.set_timesteps(steps, device=device)
    grid = _diffusers_grid(scheduler, schedule)
    solver = DPMSolverPP(2)
    plan = solver.plan(schedule, grid)
    times = [model.model_time(float(t)) for t in grid[:-1]]
    runs = {
        "network alone": lambda: _network_alone(net, x, times, kwargs),
        "diffsolve DPM++(2M)": lambda: sample(model, x, solver, plan=plan).x,
        "diffusers DPM++(2M)": lambda: _diffusers_e2e(net, scheduler, x, steps, kwargs),
    }
    best = {name: math.inf for name in runs}
    with torch.no_grad():
        for _ in range(5 if kind == "pixel" else 2):
            for name, run in runs.items():
                best[name] = min(best[name], _timed(run, device))
    memory = {
        label: _sample_peak(model, x, solver, plan, device, grad_off)
        for label, grad_off in (("caller's no_grad", True), ("grad enabled", False))
    }
    return {
        "network": kind,
        "batch": batch,
        "steps": steps,
        "seconds": best,
        "ratio_to_network": best["diffsolve DPM++(2M)"] / best["network alone"],
        "ratio_to_diffusers": best["diffsolve DPM++(2M)"] / best["diffusers DPM++(2M)"],
        "peak_mb": {k: v / 2**20 for k, v in memory.items()},
    }


def _diffusers_grid(scheduler: Any, schedule: NoiseSchedule) -> Tensor:
    """diffusers' timesteps in diffsolve time, ending at 0: both loops evaluate the network
    at the same times."""
    n = schedule.num_train_timesteps  # type: ignore[attr-defined]
    times = [(float(t) + 1) / n for t in scheduler.timesteps]
    return grids.custom(schedule, [*times, 0.0])


def _network_alone(net: Any, x: Tensor, times: list[float], kwargs: dict[str, Any]) -> Tensor:
    out = x
    for model_t in times:
        t = torch.full((x.shape[0],), model_t, device=x.device)
        out = net(x, t, **kwargs).sample
    return out


def _diffusers_e2e(
    net: Any, scheduler: Any, x: Tensor, steps: int, kwargs: dict[str, Any]
) -> Tensor:
    scheduler.set_timesteps(steps, device=x.device)
    y = x
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(y, timestep)
        out = net(model_input, timestep.expand(x.shape[0]), **kwargs).sample
        y = scheduler.step(out, timestep, y).prev_sample
    return y


def _sample_peak(
    model: ModelWrapper, x: Tensor, solver: Any, plan: Any, device: torch.device, grad_off: bool
) -> int:
    """Peak memory :func:`sample` adds, called with or without the caller's ``no_grad``."""

    def run() -> None:
        with torch.no_grad() if grad_off else torch.enable_grad():
            sample(model, x, solver, plan=plan)

    return peak_bytes(run, device)
