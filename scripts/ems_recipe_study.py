"""EMS recipes compared: cost (JVPs, seconds) against DPM-Solver-v3's accuracy with them.

    OMP_NUM_THREADS=1 python scripts/ems_recipe_study.py [--model digits] [--seeds 0 1 2 3]
        [--recipe LABEL:K:N:BANDWIDTH ...] [--timing-points 40] [--samples 512]

For every recipe and seed, estimates the EMS of the model from its training digits
(``compute_ems``) and prints v3's RMSE to the bench's 500-step reference (same seeds, same
noise as ``diffsolve bench``) at NFE 5, 6, 8, 10, 12, 15, 20 (order 2 + corrector on the
time-quadratic grid, the registry default), next to the shipped EMS (K = 256, N = 1200,
the paper's per-point estimator). Then the mean, min and max over seeds, and the cost:
JVPs (2 per sample per λ point) and the wall time of ``--timing-points`` λ points of each
recipe, measured interleaved in this process and scaled to the whole grid.
"""

from __future__ import annotations

import argparse
import time

import torch
from v3_study import bench_problem

from diffsolve.app.bench.runner import rmse
from diffsolve.app.data import load_digit_labels, load_digits
from diffsolve.ode.sampling import sample
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.registry import nfe_grid
from diffsolve.stats.ems import EMS
from diffsolve.stats.ems.compute import compute_ems

NFES = (5, 6, 8, 10, 12, 15, 20)
RECIPES = ("new:24:1200:0.2", "paper-K24:24:1200:0")
#: The shipped EMS's recipe (the paper's: per-point estimator, K = 256): timed, not rerun.
PAPER = "paper:256:1200:0"


def v3_errors(loaded, denoiser, x: torch.Tensor, reference: torch.Tensor, ems: EMS) -> list[float]:
    errors = []
    for nfe in NFES:
        grid = nfe_grid(loaded.schedule, nfe, "time_quadratic")
        with torch.inference_mode():
            errors.append(rmse(sample(denoiser, x, DPMSolverV3(ems, order=2), grid).x, reference))
    return errors


def parse(spec: str) -> tuple[str, int, int, float]:
    label, k, n, bandwidth = spec.split(":")
    return label, int(k), int(n), float(bandwidth)


def estimate(loaded, spec: tuple[str, int, int, float], seed: int, **extra) -> EMS:
    _, k, n, bandwidth = spec
    return compute_ems(
        loaded.denoiser,
        load_digits("train"),
        samples=k,
        grid_size=n,
        bandwidth=bandwidth,
        seed=seed,
        batch_size=min(k, 256),
        conditioning=loaded.label_kwargs(load_digit_labels("train")),
        **extra,
    )


def timing(loaded, specs: list[tuple[str, int, int, float]], points: int) -> dict[str, float]:
    """Seconds for the whole grid of each recipe, from ``points`` λ points of it, three
    interleaved rounds (median)."""
    t_start, t_end = loaded.schedule.default_range
    seconds: dict[str, list[float]] = {}
    for _ in range(3):
        for spec in specs:
            label, k, n, _ = spec
            # the first `points` of the recipe's own grid spacing, from the noisy end
            lam0, lam1 = (float(loaded.schedule.lambda_(t)) for t in (t_start, t_end))
            lam_stop = lam0 + (lam1 - lam0) * points / n
            t_stop = float(
                loaded.schedule.t_of_lambda(torch.tensor(lam_stop, dtype=torch.float64))
            )
            started = time.perf_counter()
            estimate(loaded, (label, k, points, 0.0), 0, t_start=t_start, t_end=t_stop)
            seconds.setdefault(label, []).append(
                (time.perf_counter() - started) * (n + 1) / (points + 1)
            )
    return {label: sorted(v)[1] for label, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--recipe", nargs="*", default=list(RECIPES), metavar="LABEL:K:N:BW")
    parser.add_argument("--timing-points", type=int, default=40)
    args = parser.parse_args()

    loaded, denoiser, x, reference = bench_problem(args.model, args.samples)

    def row(label: str, errors: list[float]) -> None:
        print(f"{label:<24}" + "".join(f"{e:>9.4f}" for e in errors), flush=True)

    print(f"{args.model}: v3 RMSE to the 500-step reference ({args.samples} samples)")
    print(f"{'':<24}" + "".join(f"{'NFE ' + str(n):>9}" for n in NFES))
    shipped = v3_errors(loaded, denoiser, x, reference, loaded.load_ems())
    row("shipped (K256 N1200)", shipped)
    specs = [parse(s) for s in args.recipe]
    results: dict[str, list[list[float]]] = {}
    for spec in specs:
        for seed in args.seeds:
            errors = v3_errors(loaded, denoiser, x, reference, estimate(loaded, spec, seed))
            results.setdefault(spec[0], []).append(errors)
            row(f"{spec[0]} seed {seed}", errors)
    print("\nover seeds: mean [min, max]; ratio of the mean to the shipped EMS")
    for label, rows in results.items():
        table = torch.tensor(rows)
        row(f"{label} mean", table.mean(0).tolist())
        row(f"{label} min", table.min(0).values.tolist())
        row(f"{label} max", table.max(0).values.tolist())
        row(f"{label} mean/shipped", (table.mean(0) / torch.tensor(shipped)).tolist())
    print("\ncost: JVPs = 2 x K x (N + 1); seconds for the whole grid (one thread, interleaved)")
    seconds = timing(loaded, [parse(PAPER), *specs], args.timing_points)
    for label, k, n, bandwidth in [parse(PAPER), *specs]:
        print(
            f"{label:<24} K={k:<4} N={n:<5} bandwidth={bandwidth:<4} "
            f"JVPs={2 * k * (n + 1):>9,}  seconds={seconds[label]:>7.0f}"
        )


if __name__ == "__main__":
    main()
