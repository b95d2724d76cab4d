"""Why DPM-Solver-v3 wins or loses on a demo model: EMS settings, solver options, step grids.

    python scripts/v3_study.py [--model digits] [--samples 512] [--bench BENCH_JSON]
                               [--ems LABEL=FILE ...] [--moments LABEL=CHECKPOINT:K:EVERY ...]

Prints three tables of RMSE to the bench's reference solution (same seeds, same 500-step
reference as `diffsolve bench`), each cell also as a ratio to the best diffusers scheduler of
the bench JSON at that NFE:

A. EMS variants (files, or moment sums of an estimator checkpoint sub-sampled every EVERY-th λ
   point, i.e. N/EVERY intervals), all with the default v3 solver on its default grid;
B. the model's shipped EMS with every solver option (order, corrector and its pseudo order,
   half-corrector in both senses, pseudo predictor) on logSNR-, time-uniform and
   time-quadratic grids;
C. our peers of the same family on the same three grids.
"""

from __future__ import annotations

import argparse
import json

import torch

from diffsolve.app.bench.runner import reference_solve, rmse
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode.sampling import sample
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.registry import nfe_grid, setup_solver
from diffsolve.stats.ems import EMS, load_ems

NFES = (5, 6, 8, 10, 12, 15, 20)
GRIDS = ("time_quadratic", "logsnr", "time_uniform")
OPTIONS = {
    "order 2 + corrector (default)": {"order": 2},
    "order 3 + corrector": {"order": 3},
    "order 2, no corrector": {"order": 2, "corrector": False},
    "order 3, no corrector": {"order": 3, "corrector": False},
    "order 2 + corrector of order p": {"order": 2, "corrector_pseudo": False},
    "order 2 + half-corrector low-noise": {"order": 2, "half_corrector": "low_noise"},
    "order 2 + half-corrector high-noise": {"order": 2, "half_corrector": "high_noise"},
    "order 2 + pseudo predictor": {"order": 2, "predictor_pseudo": True},
}
PEERS = ("dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh2-3", "deis-3")


def from_moments(model_name: str, spec: str) -> EMS:
    """EMS from an estimator checkpoint's moment sums, every ``every``-th λ point."""
    from safetensors import safe_open

    from diffsolve.stats.ems.compute import MOMENTS, ems_grid, finalize

    path, k, every = spec.rsplit(":", 2)
    loaded = load_model(model_name)
    with safe_open(path, framework="pt") as handle:
        sums = {key: handle.get_tensor(key)[:: int(every)] for key in MOMENTS}
    n = sums["e"].shape[0] - 1
    grid = ems_grid(loaded.schedule, n, *loaded.schedule.default_range)
    stats = finalize(sums, int(k), grid, round(5 * n / 1200))
    return EMS(grid.lambdas, *stats, loaded.load_ems().metadata)


def best_peer(bench_json: str) -> dict[int, float]:
    with open(bench_json) as handle:
        rows = json.load(handle)["results"]
    best: dict[int, float] = {}
    for r in rows:
        if r["source"] == "diffusers" and not r["failed"] and r["rmse"] is not None:
            best[r["nfe"]] = min(best.get(r["nfe"], float("inf")), r["rmse"])
    return best


def bench_problem(model_name: str, samples: int, first_seed: int = 0, device: str = "cpu"):
    """The bench's problem for a model: the loaded model, its denoiser (a conditional model
    labels sample k with class k mod C), the bench's noise for seeds first_seed.. and the
    500-step reference solution."""
    loaded = load_model(model_name, device=device)
    seeds = range(first_seed, first_seed + samples)
    denoiser = loaded.denoiser
    if loaded.num_classes:
        denoiser = loaded.conditional(
            torch.tensor(list(seeds), device=device) % loaded.num_classes
        )
    x = noise_for_seeds(seeds, loaded.data_shape, device=device)
    with torch.inference_mode():
        reference, _, _ = reference_solve(denoiser, x, 500)
    return loaded, denoiser, x, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--bench", default="docs/bench/bench-digits.json")
    parser.add_argument("--ems", nargs="*", default=[], metavar="LABEL=FILE")
    parser.add_argument("--moments", nargs="*", default=[], metavar="LABEL=CKPT:K:EVERY")
    args = parser.parse_args()

    loaded, denoiser, x, reference = bench_problem(args.model, args.samples)
    best = best_peer(args.bench)
    print(
        f"{args.model}: RMSE to the reference ({args.samples} samples) / ratio to the best "
        "diffusers scheduler at that NFE"
    )
    print(f"{'best diffusers':<40}" + "".join(f"{best[n]:>14.3e}" for n in NFES))

    def row(label: str, solver_for, kind: str | None) -> None:
        cells = []
        for nfe in NFES:
            solver, grid = solver_for(nfe)
            if kind is not None:
                grid = nfe_grid(loaded.schedule, nfe, kind)
            with torch.inference_mode():
                err = rmse(sample(denoiser, x, solver, grid).x, reference)
            cells.append(f"{err:.2e}/{err / best[nfe]:.2f}")
        print(f"{label:<40}" + "".join(f"{c:>14}" for c in cells), flush=True)

    print(f"\n{'':<40}" + "".join(f"{'NFE ' + str(n):>14}" for n in NFES))
    variants = {label: load_ems(path) for label, path in (e.split("=", 1) for e in args.ems)}
    for item in args.moments:
        label, spec = item.split("=", 1)
        variants[label] = from_moments(args.model, spec)
    if variants:
        print("A. EMS variants (order 2 + corrector, time-quadratic grid)")
        for label, ems in variants.items():
            row(label, lambda nfe, ems=ems: (DPMSolverV3(ems, order=2), None), "time_quadratic")
    shipped = loaded.load_ems()
    print("B. shipped EMS: solver options × step grids")
    for kind in GRIDS:
        for label, options in OPTIONS.items():
            row(
                f"{kind[:9]} {label}",
                lambda nfe, o=options: (DPMSolverV3(shipped, **o), None),
                kind,
            )
    print("C. our peers on the same grids")
    for kind in GRIDS:
        for name in PEERS:
            row(
                f"{kind[:9]} {name}",
                lambda nfe, name=name: setup_solver(name, loaded.schedule, nfe),
                kind,
            )


if __name__ == "__main__":
    main()
