"""The BENCHMARKS.md tables of searched solver schedules, from the rows that
``scripts/ship_solver_schedules.py --json ROWS`` appends (the last row per model, NFE and
search seed wins).

    python scripts/solver_schedule_report.py ROWS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(values: list[float] | None) -> str:
    if not values:
        return "—"
    rmse, median, fd = values
    return f"{rmse:.4f} / {median:.4f} / {fd:.3f}"


def main(path: str) -> None:
    rows: dict[tuple[str, int, int], dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row["model"], row["nfe"], row.get("seed") or 0)] = row
    print(
        "| model | NFE | seed | best shipped configuration | solver schedule | RMSE ratio | "
        "median ratio | best diffusers | search |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, nfe, seed), row in sorted(rows.items()):
        shipped = [
            (f"{kv[0]} ({kind})", kv[1])
            for kv, kind in ((row["best_step"], "tuned steps"), (row["best_untuned"], "default"))
            if kv
        ]
        name, values = min(shipped, key=lambda kv: kv[1][0])
        ratio = row["rmse"] / values[0]
        median = row["median"] / values[1]
        cost = row["cost"]
        print(
            f"| {model} | {nfe} | {seed} | {name}: {_cell(values)} | "
            f"{_cell([row['rmse'], row['median'], row['fd']])} | **{ratio:.2f}** | "
            f"{median:.2f} | {row['diffusers_best']} | {cost['schedules']} schedules, "
            f"{cost['model_evaluations'] / 1e3:.0f}k evals, {cost['seconds'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
