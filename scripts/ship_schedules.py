"""Ship the tuned step schedules that measured better held out (issue 15, part 4).

Reads the rows ``scripts/tune_study.py --json FILE --schedules DIR`` wrote and copies a
fitted schedule into ``src/diffsolve/demos/<model>/schedules/<solver>-nfe<N>.json``, where
``diffsolve sample`` picks it up, only when on the study's held-out seeds (10000-10511, seeds
no tuning saw) both its RMSE and its median per-sample error to the 500-step reference beat
the solver's default grid (RMSE by at least ``--margin``). The held-out numbers are added to
the file's ``fit``. Rows that fail are listed with the reason; an existing shipped file for
such a row is removed (the default grid is then what ``sample`` uses). Of several rows for one
model, solver and NFE (``dp`` and ``search``, say) the passing one with the lowest held-out
RMSE is shipped; picking the best of two on the held-out seeds flatters it slightly.

    python scripts/ship_schedules.py --rows tune.jsonl --schedules DIR [--dry-run]
    python scripts/ship_schedules.py --recheck digits --reference REF.pt [--solver S]

``--recheck MODEL`` measures the files shipped with a model again (after its EMS changed, say)
on the same held-out seeds against the reference in ``--reference`` (``tune_study.py
--reference-only`` writes it), rewrites their held-out numbers and removes those that no
longer pass.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from diffsolve.app.loader import demo_path
from diffsolve.ode.step_schedule import StepSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", help="tune_study.py --json output")
    parser.add_argument("--schedules", help="tune_study.py --schedules folder")
    parser.add_argument("--recheck", default=None, help="model whose shipped files to recheck")
    parser.add_argument("--reference", default=None, help="--recheck: the reference (.pt)")
    parser.add_argument("--solver", default=None, help="--recheck: only this solver's files")
    parser.add_argument("--margin", type=float, default=0.03, help="least relative RMSE gain")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.recheck:
        recheck(args)
        return
    if not (args.rows and args.schedules):
        parser.error("--rows and --schedules (or --recheck MODEL --reference FILE)")
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["solver"], row["nfe"]), []).append(row)
    for (model, solver, nfe), group in sorted(groups.items()):
        key = f"{model} {solver} NFE {nfe}"
        target = demo_path(model) / "schedules" / f"{solver}-nfe{nfe}.json"
        verdicts = [(why(row, args.margin), row) for row in group]
        passing = [row for reason, row in verdicts if reason is None]
        if not passing:
            print(f"skip {key}: " + "; ".join(f"{r['variant']}: {w}" for w, r in verdicts))
            if target.is_file() and not args.dry_run:
                target.unlink()
            continue
        row = min(passing, key=lambda r: r["tuned"])
        source = Path(args.schedules) / model / f"{solver}-nfe{nfe}-{row['variant']}.json"
        fitted = StepSchedule.load(source)
        fit = {
            **fitted.fit,
            "heldout_seeds": "10000-10511",
            "heldout_rmse": row["tuned"],
            "heldout_rmse_default": row["default"],
            "heldout_median": row["tuned_median"],
            "heldout_median_default": row["default_median"],
        }
        ratio, median = row["tuned"] / row["default"], row["tuned_median"] / row["default_median"]
        print(f"ship {key} ({row['variant']}): RMSE x{ratio:.2f}, median x{median:.2f}")
        if not args.dry_run:
            target.parent.mkdir(exist_ok=True)
            replace(fitted, fit=fit).save(target)


def recheck(args: argparse.Namespace) -> None:
    """Measure the shipped files of ``args.recheck`` again; keep those that still pass."""
    import torch

    from diffsolve.app.bench.runner import median_error, rmse
    from diffsolve.app.loader import load_model
    from diffsolve.app.seeds import noise_for_seeds
    from diffsolve.app.tune import schedule_needs, schedule_solver
    from diffsolve.ode.sampling import sample
    from diffsolve.solvers.registry import setup_solver

    loaded = load_model(args.recheck)
    seeds = list(range(10_000, 10_512))
    x = noise_for_seeds(seeds, loaded.data_shape)
    denoiser = loaded.denoiser
    if loaded.num_classes:
        denoiser = loaded.conditional(torch.tensor(seeds) % loaded.num_classes)
    reference = torch.load(args.reference)

    def errors(out: torch.Tensor) -> tuple[float, float]:
        return rmse(out, reference), median_error(out, reference)

    for path in sorted((demo_path(args.recheck) / "schedules").glob("*.json")):
        if path.name.startswith("solver-schedule"):  # scripts/ship_solver_schedules.py
            continue
        fitted = StepSchedule.load(path)
        if args.solver and fitted.solver != args.solver:
            continue
        context = loaded.solver_context(schedule_needs(fitted))
        base = setup_solver(fitted.solver, loaded.schedule, fitted.nfe, context=context)
        with torch.inference_mode():
            tuned, tuned_median = errors(
                sample(denoiser, x, *schedule_solver(fitted, loaded, context)).x
            )
            default, default_median = errors(sample(denoiser, x, *base).x)
        row = {
            "method": fitted.method, "tuned": tuned, "default": default,
            "tuned_median": tuned_median, "default_median": default_median,
        }  # fmt: skip
        reason = why(row, args.margin)
        key = f"{args.recheck} {fitted.solver} NFE {fitted.nfe}"
        print(
            f"{'drop' if reason else 'keep'} {key}: RMSE {tuned:.4f} vs {default:.4f}, "
            f"median {tuned_median:.4f} vs {default_median:.4f}{f' ({reason})' if reason else ''}"
        )
        if args.dry_run:
            continue
        if reason:
            path.unlink()
            continue
        fit = {
            **fitted.fit,
            "heldout_rmse": tuned,
            "heldout_rmse_default": default,
            "heldout_median": tuned_median,
            "heldout_median_default": default_median,
        }
        replace(fitted, fit=fit).save(path)


def why(row: dict, margin: float) -> str | None:
    """Why a row is not shipped (``None``: it is good enough)."""
    ratio, median = row["tuned"] / row["default"], row["tuned_median"] / row["default_median"]
    if row["method"] == "default":
        return "the default grid won the fit"
    if ratio > 1 - margin:
        return f"RMSE ratio {ratio:.2f} > {1 - margin:.2f}"
    if median > 1:
        return f"median ratio {median:.2f} > 1"
    return None


if __name__ == "__main__":
    main()
