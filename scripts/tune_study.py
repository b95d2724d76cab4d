"""Fitted step schedules vs the solver's default grid (issue 15, part 1).

For each solver and NFE: ``tune_schedule`` (fit seeds 0..T-1, its own search/check seeds
after them), then the RMSE of the tuned grid and of the solver's default grid to the bench's
500-step reference (``reference_solve``: DPM-Solver++(3M) on logSNR steps) on held-out seeds
10000.. (disjoint from every seed the tuning saw), and the cost of the tuning.

    OMP_NUM_THREADS=1 python scripts/tune_study.py --model digits --costs student,euler
"""

from __future__ import annotations

import argparse
import time

import torch

from diffsolve.app.bench.runner import reference_solve, rmse
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.app.tune import TuneConfig, schedule_solver, tune_schedule
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import preset, setup_solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--solvers", default="dpm-solver-v3,dpm-solver++-2m,unipc-bh2-3")
    parser.add_argument("--nfe", default="3,4,5,6,8,10")
    parser.add_argument("--costs", default="student")
    parser.add_argument("--method", default="dp")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--first-seed", type=int, default=10_000)
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=TuneConfig.candidates)
    parser.add_argument("--trajectories", type=int, default=TuneConfig.trajectories)
    parser.add_argument("--trim", default="0", help="comma list of TuneConfig.trim values")
    parser.add_argument("--teleport", default="0", help="comma list of 0/1")
    args = parser.parse_args()

    loaded = load_model(args.model)
    seeds = list(range(args.first_seed, args.first_seed + args.samples))
    t_start = loaded.schedule.default_range[0]
    x = noise_for_seeds(seeds, loaded.data_shape, loaded.schedule.init_noise_sigma(t_start))
    denoiser = loaded.denoiser
    if loaded.num_classes:
        denoiser = loaded.conditional(torch.tensor(seeds) % loaded.num_classes)
    with torch.inference_mode():
        reference, check, _ = reference_solve(denoiser, x, args.reference_steps)  # type: ignore[arg-type]
    print(
        f"# {args.model}: {args.samples} held-out seeds from {args.first_seed}; reference "
        f"vs check solve RMSE {rmse(reference, check):.2e}"
    )
    print("| solver | NFE | cost | default | tuned | ratio | method | evals | s | times |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.solvers.split(","):
        context = loaded.solver_context(preset(name).needs)
        for nfe in (int(n) for n in args.nfe.split(",")):
            solver, grid = setup_solver(name, loaded.schedule, nfe, context=context)
            with torch.inference_mode():
                base = rmse(sample(denoiser, x, solver, grid).x, reference)
            variants = [
                (cost, float(trim), bool(int(jump)))
                for cost in args.costs.split(",")
                for trim in args.trim.split(",")
                for jump in args.teleport.split(",")
            ]
            for cost, trim, jump in variants:
                config = TuneConfig(
                    cost=cost,  # type: ignore[arg-type]
                    candidates=args.candidates,
                    trajectories=args.trajectories,
                    holdout=args.trajectories,
                    trim=trim,
                    teleport=jump,
                )
                began = time.perf_counter()
                fitted = tune_schedule(loaded, name, nfe, args.method, config, context=context)
                seconds = time.perf_counter() - began
                tuned_solver, tuned_grid = schedule_solver(fitted, loaded, context)
                with torch.inference_mode():
                    tuned = rmse(sample(denoiser, x, tuned_solver, tuned_grid).x, reference)
                times = ",".join(f"{t:.3g}" for t in fitted.times)
                print(
                    f"| {name} | {nfe} | {cost}, trim {trim:g}{', teleport' if jump else ''} | "
                    f"{base:.4f} | {tuned:.4f} | "
                    f"{tuned / base:.2f} | {fitted.method} | "
                    f"{fitted.cost['model_evaluations']} | {seconds:.0f} | {times} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
