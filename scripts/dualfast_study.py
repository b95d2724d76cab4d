"""DualFast on a demo model: tune c, tau and the c-schedule on fit seeds, report on held-out seeds.

    python scripts/dualfast_study.py [--model digits] [--fit 1000:256] [--report 0:512]
                                     [--nfe 3 4 5 6 8 10] [--out results.json]

For each solver (DDIM, DPM-Solver++(2M), UniPC-bh2 order 3 by default) and NFE, every
configuration of :class:`diffsolve.wrappers.DualFast` — reference tau in {previous, first},
c-schedule in {constant, linear}, c in ``--cs`` (c = 0, the base solver, included) — is run on
the fit seeds; the one with the lowest RMSE to the bench's 500-step reference solution
(:func:`diffsolve.app.bench.runner.reference_solve`) is then measured on the held-out seeds
beside the base solver. Prints a markdown table; ``--out`` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch import Tensor

from diffsolve.app.bench.runner import reference_solve, rmse
from diffsolve.app.loader import LoadedModel, load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode.model import Denoiser
from diffsolve.ode.sampling import sample
from diffsolve.solvers.registry import setup_solver
from diffsolve.wrappers import DualFast

SOLVERS = ("ddim", "dpm-solver++-2m", "unipc-bh2-3")
CS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def seeds(spec: str) -> list[int]:
    start, count = (int(v) for v in spec.split(":"))
    return list(range(start, start + count))


def problem(loaded: LoadedModel, seed_list: list[int]) -> tuple[Denoiser, Tensor, Tensor]:
    """The denoiser (class-conditional models: label = seed mod classes, as the bench), the
    initial noise and the reference solution for ``seed_list``."""
    denoiser = loaded.denoiser
    if loaded.num_classes:
        denoiser = loaded.conditional(torch.tensor(seed_list) % loaded.num_classes)
    x = noise_for_seeds(seed_list, loaded.data_shape)
    with torch.inference_mode():
        reference, _, _ = reference_solve(denoiser, x, 500)
    return denoiser, x, reference


def error(denoiser: Denoiser, x: Tensor, reference: Tensor, setup, config) -> float:
    solver, grid = setup
    model = denoiser if config is None else DualFast(denoiser, *config)
    with torch.inference_mode():
        return rmse(sample(model, x, solver, grid).x, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--fit", default="1000:256", metavar="START:COUNT")
    parser.add_argument("--report", default="0:512", metavar="START:COUNT")
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    parser.add_argument("--nfe", nargs="*", type=int, default=[3, 4, 5, 6, 8, 10])
    parser.add_argument("--cs", nargs="*", type=float, default=list(CS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    loaded = load_model(args.model)
    fit = problem(loaded, seeds(args.fit))
    held = problem(loaded, seeds(args.report))
    configs = [
        (c, ref, sched)
        for c, ref, sched in itertools.product(
            args.cs, ("previous", "first"), ("constant", "linear")
        )
    ]
    rows = []
    print(
        f"{args.model}: DualFast tuned on seeds {args.fit} (START:COUNT), RMSE to the 500-step "
        f"reference on held-out seeds {args.report}\n"
    )
    print(
        "| solver | NFE | without | with (tuned) | change | c | tau | c-schedule "
        "| fit: without / with |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, nfe in itertools.product(args.solvers, args.nfe):
        setup = setup_solver(name, loaded.schedule, nfe)
        base_fit = error(*fit, setup, None)
        scored = [(error(*fit, setup, config), config) for config in configs]
        best_fit, best = min(scored, key=lambda item: item[0])
        if best_fit >= base_fit:  # nothing beats the base solver on the fit seeds: c = 0
            best_fit, best = base_fit, None
        base = error(*held, setup, None)
        tuned = base if best is None else error(*held, setup, best)
        c, ref, sched = best if best is not None else (0.0, "-", "-")
        rows.append(
            {
                "solver": name,
                "nfe": nfe,
                "rmse": base,
                "rmse_dualfast": tuned,
                "c": c,
                "reference": ref,
                "c_schedule": sched,
                "fit_rmse": base_fit,
                "fit_rmse_dualfast": best_fit,
                "fit_all": [[*cfg, err] for err, cfg in scored],
            }
        )
        print(
            f"| {name} | {nfe} | {base:.4f} | {tuned:.4f} | {100 * (tuned / base - 1):+.1f}% "
            f"| {c:g} | {ref} | {sched} | {base_fit:.4f} / {best_fit:.4f} |",
            flush=True,
        )
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"model": args.model, "fit": args.fit, "report": args.report, "rows": rows},
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
