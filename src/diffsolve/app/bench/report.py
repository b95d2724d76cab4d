"""Bench output: a readable table, JSON, and a plot of RMSE against NFE."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffsolve.app.bench.runner import BenchResult, Row
from diffsolve.app.bench.same_grid import SameGrid
from diffsolve.app.files import PNG_SOFTWARE, write_atomic, write_bytes_atomic

#: The ``format`` field of every JSON file ``diffsolve bench`` writes (how a rerun knows the
#: file it may replace is its own).
BENCH_FORMAT = "diffsolve-bench-1"


def format_table(result: BenchResult) -> str:
    """Two tables (RMSE and FD by solver × NFE), the same-grid section of each v3 contestant
    that has one (:func:`format_same_grid`), speed, agreement and overhead lines."""
    nfes = sorted({r.nfe_budget for r in result.results})
    by_solver: dict[str, dict[int, Row]] = defaultdict(dict)
    requested: dict[str, list[Row]] = defaultdict(list)
    for row in result.results:
        requested[row.solver].append(row)
        if not row.failed:
            by_solver[row.solver][row.nfe_budget] = row
    lines = [
        f"model {result.model}: {result.samples} samples (seeds {result.seed}…"
        f"{result.seed + result.samples - 1}), {result.seconds_total:.0f} s in all",
        f"reference: {result.reference['method']}; check: {result.reference['check']}",
        f"reference agreement (RMSE between the two): {result.reference_agreement:.2e}",
    ]
    if result.fd_reference is not None:
        train = "" if result.fd_train is None else f", training data {result.fd_train:.3f}"
        lines.append(f"FD to held-out data: reference samples {result.fd_reference:.3f}{train}")
    metrics = [("rmse", "{:.2e}"), ("median", "{:.2e}")]
    if result.fd_reference is not None:
        metrics.append(("fd", "{:.3f}"))
    for metric, fmt in metrics:
        lines.append("")
        lines.append(_table(metric, fmt, nfes, by_solver, requested))
    stochastic = {r.solver for r in result.results if r.fd_ode is not None}
    if stochastic:
        lines += ["", "stochastic samplers: FD to the reference ODE's samples (same seeds)"]
        chosen = {k: v for k, v in requested.items() if k in stochastic}
        lines.append(_table("fd_ode", "{:.3f}", nfes, by_solver, chosen))
    lines.append("(* spent one evaluation less than the budget: Heun at even NFE)")
    for section in result.same_grid:
        lines.append("")
        lines.append(format_same_grid(section, result.results))
    lines.append("")
    lines.append("speed at the largest NFE: seconds per sample, solver overhead µs per step")
    for name, rows in by_solver.items():
        if not rows:
            continue
        last = rows[max(rows)]
        lines.append(f"  {name:<34} {last.seconds:.2e} s   {last.overhead_us:7.1f} µs")
    for o in result.overhead:
        lines.append(
            f"null-model overhead per step, batch {o['batch']}: diffsolve "
            f"{o['diffsolve_us']:.1f} µs, diffusers DPMSolverMultistep.step "
            f"{o['diffusers_us']:.1f} µs (ratio {o['ratio']:.2f})"
        )
    return "\n".join(lines)


def format_same_grid(section: SameGrid, main: list[Row]) -> str:
    """The same-grid section of one v3 contestant: RMSE of v3 (the main table's row) with
    the model's and with degenerate statistics and of our other solvers, all on v3's grid,
    then the ratios of v3's RMSE to the best of the others, to v3 with degenerate statistics
    and to the best diffusers scheduler (on its own grid)."""
    nfes = [r.nfe for r in section.ratios]
    v3 = [
        replace(r, solver=f"{r.solver} (model EMS)")
        for r in main
        if r.solver == section.contestant
    ]
    by_solver: dict[str, dict[int, Row]] = defaultdict(dict)
    requested: dict[str, list[Row]] = defaultdict(list)
    for row in [*v3, *section.runs]:
        requested[row.solver].append(row)
        if not row.failed:
            by_solver[row.solver][row.nfe_budget] = row
    kinds = ", ".join(dict.fromkeys(r.grid for r in section.ratios))
    lines = [
        f"same grid: {section.contestant} against our solvers on its own grid ({kinds})",
        _table("rmse", "{:.2e}", nfes, by_solver, requested),
    ]
    for label, key in (
        ("same-grid ratio: v3 / best of ours", "same_grid_ratio"),
        ("same, of the median errors", "median_ratio"),
        ("v3 / v3 with degenerate EMS", "degenerate_ratio"),
        ("v3 / best diffusers (its grid)", "diffusers_ratio"),
    ):
        cells = [getattr(r, key) for r in section.ratios]
        lines.append(f"{label:<34} " + " ".join(_ratio_cell(c) for c in cells))
    for what, key in (("of ours on v3's grid", "best_rival"), ("diffusers", "best_diffusers")):
        best = [f"{r.nfe} {getattr(r, key) or '—'}" for r in section.ratios]
        lines.append(f"best {what} at each NFE: " + ", ".join(best))
    return "\n".join(lines)


def _ratio_cell(value: float | None) -> str:
    return f"{value:>9.2f}" if value is not None else f"{'—':>9}"


def _table(
    metric: str,
    fmt: str,
    nfes: list[int],
    by_solver: dict[str, dict[int, Row]],
    requested: dict[str, list[Row]],
) -> str:
    head = f"{metric.upper():<34} " + " ".join(f"{n:>9}" for n in nfes)
    out = [head, "-" * len(head)]
    for name, rows in requested.items():
        cells = []
        for n in nfes:
            row = by_solver.get(name, {}).get(n)
            mark = "*" if row and row.nfe != row.nfe_budget else ""
            cells.append(f"{fmt.format(getattr(row, metric)) + mark:>9}" if row else f"{'—':>9}")
        failed = [r for r in rows if r.failed]
        note = (
            f"  failed at NFE {','.join(str(r.nfe) for r in failed)}: {failed[0].error}"
            if failed
            else ""
        )
        out.append(f"{name:<34} " + " ".join(cells) + note)
    return "\n".join(out)


def write_json(result: Any, path: str | Path) -> None:
    """Write a result (anything with ``to_json()``, or a JSON-ready dict) as JSON, atomically,
    marked with ``"format": BENCH_FORMAT``."""
    data = result if isinstance(result, dict) else result.to_json()
    marked = {"format": BENCH_FORMAT, **data}
    write_bytes_atomic(path, (json.dumps(marked, indent=2) + "\n").encode())


def plot(result: BenchResult, path: str | Path) -> None:
    """RMSE to the reference against NFE on log axes.

    Solid lines are diffsolve, dashed diffusers, dotted our solvers on a diffusers grid;
    DPM-Solver-v3 is drawn thicker. Runs that diverge (RMSE above 3× the worst diffusers
    scheduler) would flatten every other curve: the axis stops there and their points are
    drawn as triangles on its top edge, named in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, NullLocator

    fig, ax = plt.subplots(figsize=(9.0, 5.0), dpi=130)
    series: dict[str, list[Row]] = defaultdict(list)
    for row in result.results:
        if not row.failed and row.rmse is not None:
            series[row.solver].append(row)
    finite = [r.rmse for rows in series.values() for r in rows]
    peers = [r.rmse for rows in series.values() for r in rows if r.source == "diffusers"]
    top = 3 * max(peers or finite or [1.0])
    low = min(finite or [top / 10]) / 1.5
    colours = plt.get_cmap("tab20").colors
    for i, (name, rows) in enumerate(series.items()):
        rows.sort(key=lambda r: r.nfe)
        style = "--" if rows[0].source == "diffusers" else ":" if "@diffusers" in name else "-"
        wide = name.startswith("dpm-solver-v3")
        off = [r for r in rows if r.rmse > top]
        off_nfes = ",".join(str(n) for n in sorted({r.nfe for r in off}))
        note = f" (off scale at NFE {off_nfes})" if off else ""
        ax.plot(
            [r.nfe for r in rows],
            [min(r.rmse, top) for r in rows],
            style,
            color=colours[i % len(colours)],
            marker="o",
            markersize=3.5 if wide else 2.5,
            linewidth=2.4 if wide else 1.1,
            label=name + note,
        )
        if off:
            ax.plot([r.nfe for r in off], [top] * len(off), "^", color=colours[i % len(colours)])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(low, top * 1.05)
    nfes = sorted({r.nfe for rows in series.values() for r in rows})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("NFE (model evaluations per sample)")
    ax.set_ylabel("RMSE to the reference solution")
    ax.set_title(f"{result.model}: {result.samples} samples, same noise for every solver")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> None:
    """Write a matplotlib figure as PNG atomically (:func:`~diffsolve.app.files.write_atomic`),
    marked as diffsolve's (its ``Software`` text chunk), and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_atomic(
            path, lambda f: fig.savefig(f, format="png", metadata={"Software": PNG_SOFTWARE})
        )
    finally:
        plt.close(fig)
