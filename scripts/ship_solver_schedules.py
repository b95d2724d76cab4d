"""Solver schedules against the best shipped step schedules, held out; ship the winners.

For each searched file (``diffsolve tune --method solver-schedule``) of a demo model: the RMSE
and median per-sample error to the bench's 500-step reference on the held-out seeds
10000-10511 (no search saw them), beside every tuned step schedule shipped with the model at
the same NFE and every untuned configuration of the bench line-up's solvers on their default
grids (the best of both is what the file must beat), and diffusers' best from
``docs/bench/bench10000-<model>.json`` (same seeds, same reference). With ``--ship`` a file
whose held-out RMSE is at least 3% below the best shipped configuration's is
copied to ``<demo>/schedules/solver-schedule-nfe<N>.json`` with its held-out numbers in
``fit`` when its median is no higher and its FD at most 1% higher too; a file that does not
is not shipped (and a shipped one for that NFE is removed).

    OMP_NUM_THREADS=1 python scripts/ship_solver_schedules.py --model digits \\
        --reference REF.pt --json rows.jsonl [--ship] FILE...

``REF.pt``: ``python scripts/tune_study.py --model digits --reference REF.pt
--reference-only``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from diffsolve.app.bench.runner import median_error, rmse
from diffsolve.app.data import load_digits
from diffsolve.app.loader import demo_path, load_model
from diffsolve.app.metrics import frechet_distance
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.app.tune import schedule_needs, schedule_solver
from diffsolve.ode.sampling import sample
from diffsolve.ode.step_schedule import StepSchedule
from diffsolve.solvers.registry import preset, setup_solver
from diffsolve.solvers.solver_schedule import SolverSchedule

UNTUNED = ("dpm-solver-v3", "unipc-bh2-3", "dpm-solver++-2m", "dpm-solver++-3m")
SEEDS = list(range(10_000, 10_512))


def diffusers_best(model: str, nfe: int) -> float | None:
    """diffusers' best RMSE at ``nfe`` in the held-out bench JSON."""
    path = Path("docs/bench") / f"bench10000-{model}.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["results"]
    found = [
        r["rmse"]
        for r in rows
        if r["source"] == "diffusers" and r["nfe"] == nfe and not r.get("failed")
    ]
    return min(found) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--json", default=None, help="append one JSON line per file")
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    loaded = load_model(args.model)
    x = noise_for_seeds(SEEDS, loaded.data_shape)
    denoiser = loaded.denoiser
    if loaded.num_classes:
        denoiser = loaded.conditional(torch.tensor(SEEDS) % loaded.num_classes)
    reference = torch.load(args.reference)

    test = load_digits("test")

    def errors(method: object, grid: torch.Tensor) -> tuple[float, float, float]:
        """RMSE, median per-sample error (to the reference) and FD (to the held-out digits)."""
        with torch.inference_mode():
            out = sample(denoiser, x, method, grid).x
        return rmse(out, reference), median_error(out, reference), frechet_distance(out, test)

    for file in args.files:
        fitted = SolverSchedule.load(file)
        nfe = fitted.nfe
        context = loaded.solver_context(fitted.needs)
        mine = errors(fitted.solver(context.ems, context.gaussian), fitted.grid(loaded.schedule))
        steps = {}
        for path in sorted((demo_path(args.model) / "schedules").glob(f"*-nfe{nfe}.json")):
            if path.name.startswith("solver-schedule"):
                continue
            step_file = StepSchedule.load(path)
            step_context = loaded.solver_context(schedule_needs(step_file))
            steps[step_file.solver] = errors(*schedule_solver(step_file, loaded, step_context))
        untuned = {}
        for name in UNTUNED:
            if set(preset(name).needs) <= set(loaded.available()):
                ctx = loaded.solver_context(preset(name).needs)
                untuned[name] = errors(*setup_solver(name, loaded.schedule, nfe, context=ctx))
        report(args, file, fitted, mine, steps, untuned)


def report(
    args: argparse.Namespace,
    file: str,
    fitted: SolverSchedule,
    mine: tuple[float, float, float],
    steps: dict[str, tuple[float, float, float]],
    untuned: dict[str, tuple[float, float, float]],
) -> None:
    """Print, record and (``--ship``) ship one file."""
    nfe = fitted.nfe
    best_step = min(steps.items(), key=lambda kv: kv[1][0]) if steps else None
    best_untuned = min(untuned.items(), key=lambda kv: kv[1][0])
    peer = diffusers_best(args.model, nfe)
    peer = None if peer is None else round(peer, 4)
    row = {
        "model": args.model, "nfe": nfe, "file": file, "seed": fitted.config.get("seed"),
        "rmse": mine[0], "median": mine[1], "fd": mine[2], "method": fitted.method,
        "start": fitted.fit.get("start"), "steps": {k: v for k, v in steps.items()},
        "untuned": untuned, "diffusers_best": peer, "cost": fitted.cost,
        "best_step": best_step, "best_untuned": best_untuned,
    }  # fmt: skip
    # the best configuration shipped: a tuned step schedule, or a solver's default grid
    against = min([x for x in (best_step, best_untuned) if x], key=lambda kv: kv[1][0])
    ratio = mine[0] / against[1][0]
    step_text = (
        f"{best_step[0]} {best_step[1][0]:.4f} (median {best_step[1][1]:.4f}, FD "
        f"{best_step[1][2]:.3f})"
        if best_step
        else "-"
    )
    print(
        f"{args.model} NFE {nfe}: solver schedule {mine[0]:.4f} (median {mine[1]:.4f}, FD "
        f"{mine[2]:.3f}); best "
        f"step schedule {step_text}; best untuned {best_untuned[0]} "
        f"{best_untuned[1][0]:.4f}; diffusers best {peer}; ratio {ratio:.2f}",
        flush=True,
    )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if not args.ship:
        return
    target = demo_path(args.model) / "schedules" / f"solver-schedule-nfe{nfe}.json"
    worse = [
        what
        for what, mine_v, theirs, slack in (
            ("RMSE", mine[0], against[1][0], 0.97),  # at least 3% lower, as step schedules
            ("median", mine[1], against[1][1], 1.0),
            ("FD", mine[2], against[1][2], 1.01),
        )
        if mine_v >= theirs * slack
    ]
    if worse:
        print(f"  not shipped: {', '.join(worse)} no better than {against[0]}")
        target.unlink(missing_ok=True)
        return
    kind = "tuned steps" if against is best_step else "default grid"
    fit = {
        **fitted.fit,
        "heldout_seeds": f"{SEEDS[0]}-{SEEDS[-1]}",
        "heldout_rmse": mine[0],
        "heldout_median": mine[1],
        "heldout_rmse_best_step_schedule": against[1][0],
        "heldout_median_best_step_schedule": against[1][1],
        "heldout_fd": mine[2],
        "heldout_fd_best_step_schedule": against[1][2],
        "best_step_schedule": f"{against[0]} ({kind})",
    }
    target.write_text(replace(fitted, fit=fit).to_json())
    print(f"  shipped → {target}")


if __name__ == "__main__":
    main()
