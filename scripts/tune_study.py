"""Fitted step schedules vs the solver's default grid (issue 15).

For each solver, NFE and variant: ``tune_schedule`` (fit seeds 0..T-1, its search and check
seeds after them), then the RMSE of the tuned schedule and of the solver's default grid to
the bench's 500-step reference (``reference_solve``: DPM-Solver++(3M) on logSNR steps) on
held-out seeds 10000.. (disjoint from every seed the tuning saw), with the median
per-sample error, and the cost of the tuning.

    OMP_NUM_THREADS=1 python scripts/tune_study.py --model digits --costs student,euler

``--schedules DIR`` keeps every fitted file as ``DIR/<model>/<solver>-nfe<N>-<variant>.json``
and ``--json FILE`` appends one JSON line per row; ``--reference FILE`` caches the
reference (several processes can share one model's).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffsolve.app.bench.runner import median_error, reference_solve, rmse
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.app.tune import TuneConfig, schedule_solver, tune_schedule
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import preset, setup_solver


def reference(args: argparse.Namespace, denoiser, x: torch.Tensor) -> torch.Tensor:
    """The 500-step reference, from ``--reference`` when it holds it."""
    cache = Path(args.reference) if args.reference else None
    if cache is not None and cache.is_file():
        return torch.load(cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":  # the same solve, on the GPU (agrees with the CPU's to ~1e-6)
        loaded = load_model(args.model, device=device)
        denoiser = loaded.denoiser
        if loaded.num_classes:
            seeds = torch.arange(args.first_seed, args.first_seed + args.samples, device=device)
            denoiser = loaded.conditional(seeds % loaded.num_classes)
    with torch.inference_mode():
        ref, check, _ = reference_solve(denoiser, x.to(device), args.reference_steps)
        ref, check = ref.cpu(), check.cpu()
    print(f"# reference vs check solve RMSE {rmse(ref, check):.2e} ({device})", flush=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref, cache)
    return ref


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """RMSE and the median per-sample RMS error (the bench's)."""
    return rmse(out, ref), median_error(out, ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--solvers", default="dpm-solver-v3,dpm-solver++-2m,unipc-bh2-3")
    parser.add_argument("--nfe", default="3,4,5,6,8,10")
    parser.add_argument("--costs", default="student")
    parser.add_argument("--methods", default="dp")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--first-seed", type=int, default=10_000)
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--reference", default=None, help="cache file of the reference")
    parser.add_argument("--reference-only", action="store_true")
    parser.add_argument("--candidates", type=int, default=TuneConfig.candidates)
    parser.add_argument("--trajectories", type=int, default=TuneConfig.trajectories)
    parser.add_argument("--trim", default="0", help="comma list of TuneConfig.trim values")
    parser.add_argument("--teleport", default="0", help="comma list of 0/1")
    parser.add_argument("--schedules", default=None, help="folder for the fitted files")
    parser.add_argument("--json", default=None, help="append one JSON line per row")
    parser.add_argument("--budget", type=int, default=None, help="search: schedules' worth")
    parser.add_argument("--smooth-ems", type=float, default=0.0, help="EMS.smoothed bandwidth")
    args = parser.parse_args()

    loaded = load_model(args.model)
    seeds = list(range(args.first_seed, args.first_seed + args.samples))
    t_start = loaded.schedule.default_range[0]
    x = noise_for_seeds(seeds, loaded.data_shape, loaded.schedule.init_noise_sigma(t_start))
    denoiser = loaded.denoiser
    if loaded.num_classes:
        denoiser = loaded.conditional(torch.tensor(seeds) % loaded.num_classes)
    ref = reference(args, denoiser, x)
    if args.reference_only:
        return
    print(f"# {args.model}: {args.samples} held-out seeds from {args.first_seed}")
    print(
        "| solver | NFE | variant | default | tuned | ratio | median ratio | method | evals | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    variants = [
        (method, cost, float(trim), bool(int(jump)))
        for method in args.methods.split(",")
        for cost in args.costs.split(",")
        for trim in args.trim.split(",")
        for jump in args.teleport.split(",")
    ]
    for name in args.solvers.split(","):
        context = loaded.solver_context(preset(name).needs)
        if context.ems is not None and args.smooth_ems:
            context = replace(context, ems=context.ems.smoothed(args.smooth_ems))
        for nfe in (int(n) for n in args.nfe.split(",")):
            solver, grid = setup_solver(name, loaded.schedule, nfe, context=context)
            with torch.inference_mode():
                base, base_median = errors(sample(denoiser, x, solver, grid).x, ref)
            for method, cost, trim, jump in variants:
                config = TuneConfig(
                    cost=cost,  # type: ignore[arg-type]
                    candidates=args.candidates,
                    trajectories=args.trajectories,
                    holdout=args.trajectories,
                    trim=trim,
                    teleport=jump,
                    budget=args.budget and args.budget * nfe * args.trajectories,
                )
                began = time.perf_counter()
                fitted = tune_schedule(loaded, name, nfe, method, config, context=context)  # type: ignore[arg-type]
                seconds = time.perf_counter() - began
                tuned_solver, tuned_grid = schedule_solver(fitted, loaded, context)
                with torch.inference_mode():
                    tuned, median = errors(sample(denoiser, x, tuned_solver, tuned_grid).x, ref)
                variant = f"{method}, {cost}, trim {trim:g}{', teleport' if jump else ''}"
                tag = f"{method}-{cost}-trim{trim:g}{'-teleport' if jump else ''}"
                tag += f"-smooth{args.smooth_ems:g}" if args.smooth_ems else ""
                tag += f"-budget{args.budget}" if args.budget else ""
                if args.schedules:
                    folder = Path(args.schedules) / args.model
                    folder.mkdir(parents=True, exist_ok=True)
                    fitted.save(folder / f"{name}-nfe{nfe}-{tag}.json")
                print(
                    f"| {name} | {nfe} | {variant} | {base:.4f} | {tuned:.4f} | "
                    f"{tuned / base:.2f} | {median / base_median:.2f} | {fitted.method}"
                    f"{' +teleport' if fitted.teleport else ''} | "
                    f"{fitted.cost['model_evaluations']} | {seconds:.0f} |",
                    flush=True,
                )
                if args.json:
                    row = {
                        "model": args.model, "solver": name, "nfe": nfe, "variant": tag,
                        "smooth_ems": args.smooth_ems,
                        "default": base, "tuned": tuned, "default_median": base_median,
                        "tuned_median": median, "method": fitted.method,
                        "teleport": fitted.teleport, "times": list(fitted.times),
                        "evaluations": fitted.cost["model_evaluations"], "seconds": seconds,
                    }  # fmt: skip
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
