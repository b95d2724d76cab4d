"""Output of ``diffsolve bench --profile scale``: a table and a plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from diffsolve.app.bench.report import save_figure
from diffsolve.app.bench.scale import ScaleResult


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape))


def format_scale_table(result: ScaleResult) -> str:
    """Overhead per step by shape, v3 plan cost, and end-to-end times."""
    lines = [
        f"scale profile on {result.device} ({result.device_name}), torch "
        f"{result.torch_version}, {result.seconds_total:.0f} s in all"
        + ("; freed memory kept for reuse" if result.freed_memory_kept else ""),
        "",
        "null-model overhead per step, µs (ratio to diffusers' DPM++(2M))",
    ]
    by_shape: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in result.overhead:
        by_shape[_shape(row["shape"])][row["solver"]] = row
    solvers = list(dict.fromkeys(row["solver"] for row in result.overhead))
    lines.append(f"{'solver':<26}" + "".join(f"{s:>20}" for s in by_shape))
    for solver in solvers:
        cells = [by_shape[s].get(solver) for s in by_shape]
        lines.append(
            f"{solver:<26}"
            + "".join(
                f"{'—':>20}" if c is None else f"{c['us_per_step']:>13.1f} ({c['ratio']:.2f})"
                for c in cells
            )
        )
    if result.plans:
        lines += ["", "DPM-Solver-v3 plan, 10 steps"]
        for p in result.plans:
            lines.append(
                f"  {_shape(p['shape']):<12} N = {p['ems_intervals']}: EMS {p['ems_mb']:.0f} MB, "
                f"build {p['cold_s']:.3f} s cold, {p['cached_ms']:.2f} ms cached, peak extra "
                f"{p['peak_extra_mb']:.0f} MB"
            )
    for e in result.end_to_end:
        lines += ["", _end_to_end_line(e)]
    return "\n".join(lines)


def _end_to_end_line(e: dict[str, Any]) -> str:
    seconds = ", ".join(f"{name} {value:.3f} s" for name, value in e["seconds"].items())
    peaks = ", ".join(f"{name} {value:.0f} MB" for name, value in e["peak_mb"].items())
    return (
        f"end to end, {e['network']} UNet, batch {e['batch']}, {e['steps']} steps: {seconds}\n"
        f"  diffsolve / network alone {e['ratio_to_network']:.3f}, diffsolve / diffusers "
        f"{e['ratio_to_diffusers']:.3f}; peak memory of sample(): {peaks}"
    )


def plot_scale(result: ScaleResult, path: str | Path) -> None:
    """Overhead per step against the shape (log scale), one line per contestant; diffusers'
    DPM++(2M) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(_shape(r["shape"]) for r in result.overhead))
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for row in result.overhead:
        series[row["solver"]][_shape(row["shape"])] = row["us_per_step"]
    fig, ax = plt.subplots(figsize=(8.0, 4.5), dpi=130)
    for name, values in series.items():
        xs = [i for i, s in enumerate(shapes) if s in values]
        style = "--" if name.startswith("diffusers") else ":" if "k-diffusion" in name else "-"
        ax.plot(xs, [values[shapes[i]] for i in xs], style, marker="o", label=name)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_yscale("log")
    ax.set_xlabel("batch × sample shape")
    ax.set_ylabel("µs per step (null model)")
    ax.set_title(f"solver overhead per step on {result.device} ({result.device_name})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    save_figure(fig, path)
