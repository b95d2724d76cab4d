"""FD of the shipped tuned step schedules against the solver's default grid (issue 15).

For every ``schedules/<solver>-nfe<N>.json`` shipped with a demo model: samples from the
held-out seeds 10000-10511 (labels ``seed % 10`` on a conditional model, as the bench) with
the tuned schedule and with the solver's default grid, and the Fréchet distance of each to
the held-out digits (the bench's FD).

    OMP_NUM_THREADS=1 python scripts/schedule_fd.py [MODEL ...]
"""

from __future__ import annotations

import sys

import torch

from diffsolve.app.data import load_digits
from diffsolve.app.loader import demo_path, load_model
from diffsolve.app.metrics import frechet_distance
from diffsolve.app.schedules import find_tuned_schedule
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.app.tune import schedule_needs, schedule_solver
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import setup_solver

SEEDS = range(10_000, 10_512)


def main(models: list[str]) -> None:
    test = load_digits("test")
    print("| model | solver | NFE | FD default grid | FD tuned |")
    print("|---|---|---|---|---|")
    for name in models or ["digits", "digits-cond", "digits-flow"]:
        loaded = load_model(name)
        x = noise_for_seeds(SEEDS, loaded.data_shape)
        denoiser = loaded.denoiser
        if loaded.num_classes:
            denoiser = loaded.conditional(torch.tensor(list(SEEDS)) % loaded.num_classes)
        for path in sorted((demo_path(name) / "schedules").glob("*.json")):
            if path.name.startswith("solver-schedule"):  # scripts/ship_solver_schedules.py
                continue
            solver_name, _, nfe = path.stem.rpartition("-nfe")
            found = find_tuned_schedule(loaded, solver_name, int(nfe))
            assert found is not None, path
            context = loaded.solver_context(schedule_needs(found.schedule))
            with torch.inference_mode():
                tuned = sample(denoiser, x, *schedule_solver(found.schedule, loaded, context)).x
                base = sample(
                    denoiser,
                    x,
                    *setup_solver(solver_name, loaded.schedule, int(nfe), context=context),
                ).x
            print(
                f"| {name} | {solver_name} | {nfe} | {frechet_distance(base, test):.3f} | "
                f"{frechet_distance(tuned, test):.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
