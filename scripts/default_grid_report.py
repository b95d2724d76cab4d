"""Tables of ``scripts/default_grid_study.py``'s rows: per schedule family and solver, the
RMSE of every grid kind at NFE 5/10/20, diffusers' same solver on its own placement, and the
ratio of our default to it.

    python scripts/default_grid_report.py docs/bench/default-grids.jsonl [--grids]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from default_grid_study import TWINS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows")
    parser.add_argument("--grids", action="store_true", help="every grid kind, not just ours")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    table: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        table[(r["family"], r["solver"], r["grid"])][r["nfe"]] = r["rmse"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    nfes = sorted({r["nfe"] for r in rows})
    worst = 0.0
    for family in families:
        print(f"\n### {family}\n")
        head = "| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes)
        print(head + " | ratio to diffusers " + " / ".join(str(n) for n in nfes) + " |")
        print("|" + "---|" * (3 + len(nfes)))
        for solver, twin in TWINS.items():
            theirs = table.get((family, twin, "diffusers"), {})
            grids = [g for (f, s, g) in table if f == family and s == solver]
            shown = grids if args.grids else ["default"]
            for grid in shown:
                ours = table[(family, solver, grid)]
                cells = " | ".join(f"{ours.get(n, float('nan')):.2e}" for n in nfes)
                ratios = [ours[n] / theirs[n] for n in nfes if theirs.get(n)]
                if grid == "default" and ratios:
                    worst = max(worst, *ratios)
                text = " / ".join(f"{r:.2f}" for r in ratios) if ratios else "—"
                print(f"| {solver} | {grid} | {cells} | {text} |")
            if theirs:
                cells = " | ".join(f"{theirs.get(n, float('nan')):.2e}" for n in nfes)
                print(f"| {twin} | diffusers' | {cells} | 1 |")
    print(f"\nlargest ratio of a default to diffusers' same solver: {worst:.2f}")


if __name__ == "__main__":
    main()
