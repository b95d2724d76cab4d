"""The tables of BENCHMARKS.md §12 from ``scripts/tune_study.py --json`` rows and the bench's
JSON on the same held-out seeds (``diffsolve bench --model M --seed 10000 --nfe 3,4,5,6,8,10
--json bench10000-M.json``): per model, each solver's RMSE on its default grid and tuned
(ratio to the default and median ratio), the best untuned diffsolve configuration (any solver,
any grid the bench runs), the best tuned / best untuned, and the best diffusers scheduler.

    python scripts/tune_report.py --rows docs/bench/tune-study.jsonl --bench docs/bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NFES = (3, 4, 5, 6, 8, 10)
SOLVERS = ("dpm-solver-v3", "dpm-solver++-2m", "unipc-bh2-3")


def baselines(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Best RMSE per NFE of our contestants and of diffusers' schedulers."""
    ours: dict[int, float] = {}
    peers: dict[int, float] = {}
    for r in json.loads(path.read_text())["results"]:
        if r["failed"] or r["rmse"] is None:
            continue
        best = peers if r["solver"].startswith("diffusers:") else ours
        n = r["nfe_budget"]
        best[n] = min(best.get(n, float("inf")), r["rmse"])
    return ours, peers


def cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row["method"] == "default":
        return "(default)"
    ratio, median = row["tuned"] / row["default"], row["tuned_median"] / row["default_median"]
    return f"{row['tuned']:.4f} ({ratio:.2f}; {median:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--bench", required=True, help="folder with bench10000-<model>.json")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, peers = baselines(Path(args.bench) / f"bench10000-{model}.json")
        print(f"\n{model}: RMSE (ratio to the default grid; median ratio)\n")
        print("| solver | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
        print("|---|---|" + "---|" * len(NFES))
        tuned_best = {n: ours.get(n, float("inf")) for n in NFES}
        for solver in SOLVERS:
            mine = [r for r in rows if r["model"] == model and r["solver"] == solver]
            if not mine:
                continue
            by_nfe = {r["nfe"]: r for r in mine}
            print(
                f"| {solver} | default | "
                + " | ".join(f"{by_nfe[n]['default']:.4f}" if n in by_nfe else "—" for n in NFES)
                + " |"
            )
            for method in ("dp", "search"):
                found = {
                    n: min(
                        (r for r in mine if r["nfe"] == n and r["variant"].startswith(method)),
                        key=lambda r: r["tuned"],
                        default=None,
                    )
                    for n in NFES
                }
                if not any(found.values()):
                    continue
                for n, r in found.items():
                    if r is not None:
                        tuned_best[n] = min(tuned_best[n], r["tuned"])
                label = "dp + teleport" if method == "dp" else "search (from dp)"
                print(f"| {solver} | {label} | " + " | ".join(cell(found[n]) for n in NFES) + " |")
        print("| best untuned diffsolve | | " + " | ".join(f"{ours[n]:.4f}" for n in NFES) + " |")
        print(
            "| **best tuned / best untuned** | | "
            + " | ".join(f"**{tuned_best[n] / ours[n]:.2f}**" for n in NFES)
            + " |"
        )
        print("| best diffusers | | " + " | ".join(f"{peers[n]:.4f}" for n in NFES) + " |")


if __name__ == "__main__":
    main()
