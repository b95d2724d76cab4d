"""Step grids for a rectified-flow model: RMSE of solvers on time-shifted and standard grids.

    OMP_NUM_THREADS=1 python scripts/flow_grid_study.py [--model digits-flow]
        [--solvers dpm-solver-v3,unipc-bh2-3,dpm-solver++-2m] [--shifts 0.6,0.7,0.8,0.9]
        [--seed 0] [--samples 512]

RMSE to the bench's 500-step reference (same noise as ``diffsolve bench --seed``) at NFE 5,
6, 8, 10, 12, 15, 20 for each solver on ``time_shifted`` grids of each shift and on the
time-uniform, time-quadratic and logSNR grids. Compare with diffusers' schedulers on the same
seeds: ``diffsolve bench --model digits-flow --seed S --solvers diffusers:unipc-bh2,...``.
"""

from __future__ import annotations

import argparse

import torch

from diffsolve.app.bench.runner import reference_solve, rmse
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode import grids
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import SOLVERS, nfe_grid, setup_solver

NFES = (5, 6, 8, 10, 12, 15, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-flow")
    parser.add_argument("--solvers", default="dpm-solver-v3,unipc-bh2-3,dpm-solver++-2m")
    parser.add_argument("--shifts", default="0.6,0.7,0.8,0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()

    loaded = load_model(args.model)
    x = noise_for_seeds(range(args.seed, args.seed + args.samples), loaded.data_shape)
    with torch.inference_mode():
        reference, _, _ = reference_solve(loaded.denoiser, x, 500)
    print(f"{args.model}, seeds {args.seed}-{args.seed + args.samples - 1}: RMSE")
    print(f"{'':<36}" + "".join(f"{'NFE ' + str(n):>9}" for n in NFES))
    kinds = [("shift", float(s)) for s in args.shifts.split(",")]
    kinds += [(kind, None) for kind in ("time_uniform", "time_quadratic", "logsnr")]
    for name in args.solvers.split(","):
        context = loaded.solver_context(SOLVERS[name].needs)
        for kind, shift in kinds:
            cells = []
            for nfe in NFES:
                solver, grid = setup_solver(name, loaded.schedule, nfe, context=context)
                steps = grid.numel() - 1
                if shift is not None:
                    grid = grids.time_shifted(loaded.schedule, steps, None, 0.0, shift=shift)
                else:
                    grid = nfe_grid(loaded.schedule, steps, kind)
                with torch.inference_mode():
                    cells.append(rmse(sample(loaded.denoiser, x, solver, grid).x, reference))
            label = f"{name}, " + (f"time_shifted {shift}" if shift is not None else kind)
            print(f"{label:<36}" + "".join(f"{c:>9.4f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
