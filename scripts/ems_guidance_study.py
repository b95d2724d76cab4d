"""How much does DPM-Solver-v3 lose when its statistics were estimated at another guidance
scale than it samples at? (``digits-cond``, classifier-free guidance.)

EMS are estimated under the guided model at each scale (the recipe: K = 24, N = 1200,
bandwidth 0.2, the digits training split under its own labels: what
``diffsolve ems --model digits-cond --scale S`` does); then v3 with each of them samples at
each scale, at NFE 5 and 10, from the same held-out noise (labels seed mod 10). RMSE to a
500-step DPM-Solver++(3M) solve of the guided ODE at that scale; DPM-Solver++(2M) beside.

    OMP_NUM_THREADS=1 python scripts/ems_guidance_study.py --out docs/bench/ems-guidance.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffsolve.app.bench.runner import reference_solve, rmse
from diffsolve.app.conditioning import GuidanceSpec, guided_network
from diffsolve.app.data import load_digit_labels, load_digits
from diffsolve.app.loader import load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import SolverContext, setup_solver
from diffsolve.stats.ems.compute import compute_ems

SCALES = (1.0, 3.0, 7.5)
NFES = (5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/ems-guidance.json")
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("digits-cond")
    data, labels = load_digits("train"), load_digit_labels("train")
    start = time.time()
    statistics = {}
    for scale in SCALES:
        denoiser = model.denoiser if scale == 1.0 else guided_network(model, scale)
        statistics[scale] = compute_ems(
            denoiser, data, conditioning={"class_labels": labels}, progress=True
        )
        print(f"EMS at scale {scale:g}: {time.time() - start:.0f} s", flush=True)
    seeds = list(range(20_000, 20_000 + args.samples))
    x = noise_for_seeds(seeds, model.data_shape)
    classes = torch.tensor(seeds) % 10
    results = []
    for scale in SCALES:
        guided = GuidanceSpec("cfg" if scale != 1.0 else "none", scale).build(model, classes)
        with torch.inference_mode():
            reference = reference_solve(guided, x, 500)[0]
            for nfe in NFES:
                row = {"sampling_scale": scale, "nfe": nfe}
                solver, grid = setup_solver("dpm-solver++-2m", model.schedule, nfe)
                row["dpm-solver++-2m"] = rmse(sample(guided, x, solver, grid).x, reference)
                for made, ems in statistics.items():
                    context = SolverContext(ems=ems)
                    solver, grid = setup_solver(
                        "dpm-solver-v3", model.schedule, nfe, context=context
                    )
                    row[f"v3, EMS at {made:g}"] = rmse(
                        sample(guided, x, solver, grid).x, reference
                    )
                results.append(row)
                print(row, flush=True)
    Path(args.out).write_text(json.dumps({"samples": args.samples, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
