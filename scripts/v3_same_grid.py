"""DPM-Solver-v3 against the other diffsolve solvers on v3's own grid (issue 15).

At each NFE every contestant runs on the grid the registry gives v3 at that NFE, on the
bench's noise (seeds 0..S-1), and is scored against the bench's 500-step reference: RMSE,
the median per-sample RMS error and its 99th percentile (the RMSE of the demos is decided
by a few trajectories near a boundary between two digits; the median is not).

    OMP_NUM_THREADS=1 python scripts/v3_same_grid.py --model digits
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from v3_study import bench_problem

from diffsolve.app.bench.same_grid import degenerate_ems
from diffsolve.ode.sampling import sample
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.solvers.registry import setup_solver
from diffsolve.stats.ems import load_ems

OTHERS = ("dpm-solver++-2m", "unipc-bh2-2", "unipc-bh2-3")


def per_sample(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS error."""
    return (out.double() - reference.double()).pow(2).flatten(1).mean(1).sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--nfe", default="5,6,8,10,12,15,20")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants",
        default="default,degenerate,half_low,order3,no_corrector",
        help="v3 variants: default, degenerate, half_low, order3, no_corrector, "
        "no_pseudo, lof_off, smooth<bandwidth>, smooth<bandwidth>_half_low, ems:<file>",
    )
    args = parser.parse_args()
    loaded, denoiser, x, reference = bench_problem(
        args.model, args.samples, args.first_seed, args.device
    )
    context = loaded.solver_context(("ems",))
    print(
        f"# {args.model}, seeds {args.first_seed}..+{args.samples}; cells: RMSE / RMSE "
        "without the worst 1% / median / p99 of the per-sample RMS error"
    )
    for nfe in (int(n) for n in args.nfe.split(",")):
        v3, grid = setup_solver("dpm-solver-v3", loaded.schedule, nfe, context=context)
        assert isinstance(v3, DPMSolverV3)
        contestants = {}
        for variant in args.variants.split(","):
            if variant.startswith("ems:"):  # ems:<file>: v3 with another EMS file
                contestants[f"v3 {variant}"] = replace(
                    v3, ems=load_ems(variant[4:]).to(args.device)
                )
                continue
            if variant.startswith("smooth"):  # smooth<bandwidth>[_half_low]
                bandwidth, _, half = variant[len("smooth") :].partition("_")
                ems = v3.ems.smoothed(float(bandwidth))
                contestants[f"v3 {variant}"] = replace(
                    v3, ems=ems, half_corrector="low_noise" if half else "off"
                )
                continue
            contestants[f"v3 {variant}"] = {
                "default": v3,
                "degenerate": replace(v3, ems=degenerate_ems(v3.ems, loaded.schedule)),
                "half_low": replace(v3, half_corrector="low_noise"),
                "order3": replace(v3, order=3),
                "no_corrector": replace(v3, corrector=False),
                "no_pseudo": replace(v3, corrector_pseudo=False),
                "lof_off": replace(v3, lower_order_final=False),
            }[variant]
        for name in OTHERS:
            contestants[name] = setup_solver(name, loaded.schedule, nfe, context=context)[0]
        for name, solver in contestants.items():
            with torch.inference_mode():
                err = per_sample(sample(denoiser, x, solver, grid).x, reference)
            err = err.cpu()
            rmse = float(err.pow(2).mean().sqrt())
            median, p99 = (
                float(q) for q in err.quantile(torch.tensor([0.5, 0.99], dtype=err.dtype))
            )
            kept = err.sort().values[: err.numel() - err.numel() // 100]
            trimmed = float(kept.pow(2).mean().sqrt())
            print(
                f"{nfe:3d} {name:22s} {rmse:.4f} / {trimmed:.4f} / {median:.4f} / {p99:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
