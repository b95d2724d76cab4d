"""Per-step solver overhead of one diffsolve checkout, for A/B comparisons of two versions.

DPM-Solver++(2M) with a null model (the output is a fixed tensor), 20 steps, batch 1 and 512,
one thread; prints the 10th percentile of 200 runs in µs per step. Compare two checkouts
interleaved on the same machine, e.g. before and after a refactoring:

    git worktree add /tmp/before <commit>
    for i in 1 2 3 4 5; do
      OMP_NUM_THREADS=1 .venv/bin/python scripts/overhead_ab.py /tmp/before/src
      OMP_NUM_THREADS=1 .venv/bin/python scripts/overhead_ab.py src
    done
"""

from __future__ import annotations

import importlib
import os
import sys
import time


def main(src: str) -> None:
    sys.path.insert(0, src)
    import torch

    torch.set_num_threads(1)
    diffsolve = importlib.import_module("diffsolve")
    layered = os.path.isdir(os.path.join(src, "diffsolve", "ode"))  # after issue 10
    sampling = importlib.import_module(f"diffsolve.{'ode.' if layered else ''}sampling")
    schedule = diffsolve.VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)
    steps, result = 20, {}
    grid = diffsolve.grids.append_zero(schedule, diffsolve.grids.time_uniform(schedule, steps - 1))
    solver = diffsolve.DPMSolverPP(2)
    plan = solver.plan(schedule, grid)
    for batch in (1, 512):
        x0 = torch.randn(batch, 1, 8, 8)
        output = torch.randn(batch, 1, 8, 8)
        model = diffsolve.ModelWrapper(lambda x, t, out=output: out, schedule, "epsilon")
        times = []
        for _ in range(200):
            start = time.perf_counter()
            sampling.sample(model, x0, solver, plan=plan)
            times.append((time.perf_counter() - start) / steps)
        result[batch] = round(1e6 * sorted(times)[len(times) // 10], 2)
    print(src, "µs per step by batch size:", result)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "src")
