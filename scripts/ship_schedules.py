"""Ship the tuned step schedules that measured better held out (issue 15, part 4).

Reads the rows ``scripts/tune_study.py --json FILE --schedules DIR`` wrote and copies a
fitted schedule into ``src/diffsolve/demos/<model>/schedules/<solver>-nfe<N>.json``, where
``diffsolve sample`` picks it up, only when on the study's held-out seeds (10000-10511, seeds
no tuning saw) both its RMSE and its median per-sample error to the 500-step reference beat
the solver's default grid (RMSE by at least ``--margin``). The held-out numbers are added to
the file's ``fit``. Rows that fail are listed with the reason; an existing shipped file for
such a row is removed (the default grid is then what ``sample`` uses).

    python scripts/ship_schedules.py --rows tune.jsonl --schedules DIR [--dry-run]
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
    parser.add_argument("--rows", required=True, help="tune_study.py --json output")
    parser.add_argument("--schedules", required=True, help="tune_study.py --schedules folder")
    parser.add_argument("--margin", type=float, default=0.03, help="least relative RMSE gain")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    for row in sorted(rows, key=lambda r: (r["model"], r["solver"], r["nfe"])):
        key = f"{row['model']} {row['solver']} NFE {row['nfe']}"
        target = demo_path(row["model"]) / "schedules" / f"{row['solver']}-nfe{row['nfe']}.json"
        ratio, median = row["tuned"] / row["default"], row["tuned_median"] / row["default_median"]
        why = (
            "the default grid won the fit" if row["method"] == "default"
            else f"RMSE ratio {ratio:.2f} > {1 - args.margin:.2f}" if ratio > 1 - args.margin
            else f"median ratio {median:.2f} > 1" if median > 1
            else None
        )  # fmt: skip
        if why is not None:
            print(f"skip {key}: {why}")
            if target.is_file() and not args.dry_run:
                target.unlink()
            continue
        source = Path(args.schedules) / row["model"]
        source = source / f"{row['solver']}-nfe{row['nfe']}-{row['variant']}.json"
        fitted = StepSchedule.load(source)
        fit = {
            **fitted.fit,
            "heldout_seeds": "10000-10511",
            "heldout_rmse": row["tuned"],
            "heldout_rmse_default": row["default"],
            "heldout_median": row["tuned_median"],
            "heldout_median_default": row["default_median"],
        }
        print(f"ship {key}: RMSE x{ratio:.2f}, median x{median:.2f} -> {target}")
        if not args.dry_run:
            target.parent.mkdir(exist_ok=True)
            replace(fitted, fit=fit).save(target)


if __name__ == "__main__":
    main()
