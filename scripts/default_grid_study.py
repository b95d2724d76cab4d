"""Which step grid should each solver default to, under each schedule family users train with?

On an exact oracle — the digits' Gaussian mixture (one full-covariance component per class,
its exact denoiser) — under every schedule family (DDPM linear, SD's scaled-linear, cosine,
zero terminal SNR, EDM, rectified flow with and without a shift), every diffsolve solver runs
on every grid kind at NFE 5/10/20 from the same noise, and diffusers' same solver on its
default placement for a model of that family (built from the family's scheduler config, as a
user's pipeline would). RMSE to a 500-step DPM-Solver++(3M) solve of the same ODE (float64).

    OMP_NUM_THREADS=1 python scripts/default_grid_study.py --out docs/bench/default-grids.jsonl

Each line: {"family", "solver", "grid", "nfe", "rmse", "source"}; ``grid`` is a diffsolve grid
kind, ``"diffusers-grid"`` (our solver on the peer's steps) or ``"default"`` (what
``setup_solver`` picks now), and for peers the diffusers scheduler's own placement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diffsolve.app.bench.peers import Peer
from diffsolve.app.bench.runner import reference_solve, rmse, run_solver
from diffsolve.app.bench.timing import TimedModel
from diffsolve.app.data import load_digit_labels, load_digits
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.integrations.diffusers.config import diffusers_schedule
from diffsolve.ode.model import ModelWrapper
from diffsolve.ode.schedule import EDM, NoiseSchedule, RectifiedFlow
from diffsolve.solvers.registry import SOLVERS, default_grid_kind, nfe_grid
from diffsolve.stats.gaussian import GaussianMixtureModel

SOLVER_NAMES = ("ddim", "dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh2-3", "deis-3")
GRID_KINDS = ("time_uniform", "time_quadratic", "logsnr", "karras", "time_shifted")
NFES = (5, 10, 20)

#: family -> (diffusers scheduler config of a model of that family, diffsolve schedule)
FAMILIES: dict[str, dict[str, Any]] = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False,
    },
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "zero_snr": {
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
    },
    "flow": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0},
    "flow_shift3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
    "edm": {"_class_name": "EDM", "sigma_min": 0.002, "sigma_max": 80.0},
}  # fmt: skip

#: Our solver -> the diffusers peer that runs the same method (VP / flow).
TWINS = {
    "ddim": "diffusers:ddim",
    "dpm-solver++-2m": "diffusers:dpm-2m",
    "dpm-solver++-3m": "diffusers:dpm-3m",
    "unipc-bh2-3": "diffusers:unipc-bh2",
    "deis-3": "diffusers:deis",
}


def schedule_of(family: str, config: dict[str, Any]) -> NoiseSchedule:
    if family == "edm":
        return EDM(config["sigma_min"], config["sigma_max"])
    if family.startswith("flow"):
        return RectifiedFlow(shift=config["shift"])
    keys = ("beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr")
    return diffusers_schedule(**{k: config[k] for k in keys if k in config})


def peers(family: str, config: dict[str, Any]) -> dict[str, Peer | EDMPeer]:
    if family == "edm":
        return {
            "diffusers:ddim": EDMPeer("EDMEulerScheduler", {}),
            "diffusers:dpm-2m": EDMPeer("EDMDPMSolverMultistepScheduler", {"solver_order": 2}),
            "diffusers:dpm-3m": EDMPeer("EDMDPMSolverMultistepScheduler", {"solver_order": 3}),
        }
    out = {
        "diffusers:dpm-2m": Peer("diffusers:dpm-2m", "DPMSolverMultistepScheduler",
                                 {"solver_order": 2}),
        "diffusers:dpm-3m": Peer("diffusers:dpm-3m", "DPMSolverMultistepScheduler",
                                 {"solver_order": 3}),
        "diffusers:unipc-bh2": Peer("diffusers:unipc-bh2", "UniPCMultistepScheduler",
                                    {"solver_order": 3, "solver_type": "bh2"}),
        "diffusers:deis": Peer("diffusers:deis", "DEISMultistepScheduler", {"solver_order": 3}),
    }  # fmt: skip
    if family.startswith("flow"):
        out["diffusers:ddim"] = Peer("diffusers:ddim", "FlowMatchEulerDiscreteScheduler")
    else:
        out["diffusers:ddim"] = Peer("diffusers:ddim", "DDIMScheduler")
    model_config = {k: v for k, v in config.items()}
    model_config.setdefault("num_train_timesteps", 1000)
    from dataclasses import replace

    return {name: replace(peer, model_config=model_config) for name, peer in out.items()}


class Oracle(torch.nn.Module):
    """The exact denoiser as a network predicting ``prediction`` at solver time ``t``
    (diffusers' schedulers read a network output, not an x0)."""

    def __init__(self, denoiser: Any, schedule: NoiseSchedule, prediction: str) -> None:
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule
        self.reader = ModelWrapper(lambda x, t: x, schedule, prediction)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = float(t.reshape(-1)[0])
        x0 = self.denoiser(x.double(), time).x0
        c = self.reader.conversion(time)
        return ((x0 - c.px * x.double()) / c.po).to(x.dtype)


def oracle_model(gmm: GaussianMixtureModel, schedule: NoiseSchedule) -> ModelWrapper:
    prediction = "flow" if isinstance(schedule, RectifiedFlow) else (
        "x0" if isinstance(schedule, EDM) else "epsilon"
    )  # fmt: skip
    # diffusers' flow schedulers evaluate at sigma = 1 (and float32's 0.99900001): the oracle
    # answers there too
    exact = RectifiedFlow(t_max=1.0) if isinstance(schedule, RectifiedFlow) else schedule
    net = Oracle(gmm.denoiser(exact), exact, prediction)
    return ModelWrapper(net, schedule, prediction, "t", model_dtype=torch.float64)


class EDMPeer:
    """diffusers' EDM schedulers on an x0 oracle: the network output they precondition is
    F = (D - c_skip x) / c_out (epsilon convention), fed the unscaled x."""

    def __init__(self, scheduler: str, options: dict[str, Any]) -> None:
        self.scheduler, self.options = scheduler, options

    def build(self) -> Any:
        import diffusers

        return getattr(diffusers, self.scheduler)(sigma_min=0.002, sigma_max=80.0, **self.options)

    def run(self, model: TimedModel, x_start: torch.Tensor, nfe: int) -> tuple[Any, int, float]:
        scheduler = self.build()
        scheduler.set_timesteps(nfe)
        x = x_start.clone()  # already at sigma_max: the study scales the noise itself
        data = scheduler.config.sigma_data
        for i, timestep in enumerate(scheduler.timesteps):
            sigma = float(scheduler.sigmas[i])
            denoised = model(x, sigma).x0  # EDM solver time is sigma
            c_skip = data**2 / (sigma**2 + data**2)
            c_out = sigma * data / (sigma**2 + data**2) ** 0.5
            scheduler.scale_model_input(x, timestep)  # keeps the scheduler's bookkeeping
            x = scheduler.step((denoised - c_skip * x) / c_out, timestep, x).prev_sample
        return x, len(scheduler.timesteps), 0.0

    def grid(self, schedule: NoiseSchedule, nfe: int) -> torch.Tensor:
        scheduler = self.build()
        scheduler.set_timesteps(nfe)
        sigmas = scheduler.sigmas.double()
        return sigmas.clamp(max=schedule.t_max)


def study_family(
    family: str, gmm: GaussianMixtureModel, samples: int, reference_steps: int
) -> list[dict[str, Any]]:
    """Every contestant at every NFE on one schedule family (module docstring)."""
    config = FAMILIES[family]
    schedule = schedule_of(family, config)
    model = TimedModel(oracle_model(gmm, schedule))
    x = noise_for_seeds(range(samples), (1, 8, 8), dtype=torch.float64)
    x = x * schedule.init_noise_sigma()
    with torch.inference_mode():
        reference, check, _ = reference_solve(model, x, reference_steps)
    agreement = rmse(reference, check)
    family_peers = peers(family, config)
    rows: list[dict[str, Any]] = []

    def record(solver: str, grid: str, nfe: int, run: Any, source: str) -> None:
        try:
            out = run()
            error = rmse(out, reference) if torch.isfinite(out).all() else math.inf
        except Exception as err:  # a contestant that fails is recorded, not fatal
            print(f"{family} {solver} {grid} {nfe}: {err}", file=sys.stderr)
            error = math.inf
        rows.append({"family": family, "solver": solver, "grid": grid, "nfe": nfe,
                     "rmse": error, "source": source, "agreement": agreement})  # fmt: skip

    with torch.inference_mode():
        for nfe in NFES:
            for name, peer in family_peers.items():
                record(name, "diffusers", nfe, lambda p=peer, n=nfe: p.run(model, x, n)[0],
                       "diffusers")  # fmt: skip
            for solver in SOLVER_NAMES:
                spec = SOLVERS[solver]
                kinds = {"default": default_grid_kind(spec, schedule, nfe)}
                kinds.update({k: k for k in GRID_KINDS})
                for label, kind in kinds.items():

                    def ours(spec=spec, kind=kind, nfe=nfe) -> torch.Tensor:
                        grid = nfe_grid(schedule, spec.steps(nfe), kind)
                        return run_solver(spec.build(nfe), grid, model, x)[0]

                    record(solver, label, nfe, ours, "diffsolve")
                twin = family_peers.get(TWINS[solver])
                if twin is not None:

                    def on_twin(spec=spec, twin=twin, nfe=nfe) -> torch.Tensor:
                        grid = twin.grid(schedule, nfe)
                        return run_solver(spec.build(nfe), grid, model, x)[0]

                    record(solver, "diffusers-grid", nfe, on_twin, "diffsolve")
    print(f"{family}: reference agreement {agreement:.1e}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/default-grids.jsonl")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--reference-steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gmm = GaussianMixtureModel.fit(load_digits("train"), load_digit_labels("train"))
    start = time.time()
    rows = []
    for family in args.families.split(","):
        rows += study_family(family, gmm, args.samples, args.reference_steps)
        print(f"{family}: done ({time.time() - start:.0f} s)", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
