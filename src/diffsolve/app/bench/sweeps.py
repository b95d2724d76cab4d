"""Bench sweeps for the accelerations: teleportation skip fraction and guidance scale.

* :func:`teleport_sweep` — RMSE to the reference and FD against the share of the usual grid
  skipped by analytic Gaussian teleportation, at fixed total NFE (Wang & Vastola 2023).
* :func:`guidance_sweep` — class accuracy (shipped digits classifier), FD and saturation
  (mean :math:`|x_0|`, share of pixels at ±1) against the guidance scale, for CFG and APG.
* :func:`inversion_sweep` — round-trip reconstruction error (image → noise → image) against
  the number of steps, for every ODE solver and for BDIA's exact inversion.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from diffsolve.app.bench.runner import reference_solve, rmse
from diffsolve.app.loader import LoadedModel
from diffsolve.app.metrics import frechet_distance
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.ode import grids
from diffsolve.ode.sampling import invert, sample
from diffsolve.solvers.registry import SOLVERS, SolverContext, lineup, preset, setup_solver

SATURATED = 0.98  # |x| at or beyond this counts as a pixel at ±1 (data are in [-1, 1])


@dataclass
class TeleportRow:
    """One (solver, NFE, skip fraction) of :func:`teleport_sweep`."""

    solver: str
    nfe: int
    skip: float
    t_skip: float
    rmse: float
    fd: float


@dataclass
class GuidanceRow:
    """One (method, scale) of :func:`guidance_sweep`."""

    method: str
    scale: float
    accuracy: float
    fd: float
    mean_abs: float
    saturated: float


def teleport_sweep(
    model_name: str,
    solvers: Sequence[str],
    nfes: Sequence[int],
    skips: Sequence[float],
    samples: int = 512,
    seed: int = 0,
    reference_steps: int = 500,
) -> dict[str, Any]:
    """RMSE / FD against the skip fraction (0 = no teleportation) at each total NFE."""
    from diffsolve.app.data import load_digits
    from diffsolve.app.loader import load_model
    from diffsolve.wrappers.teleport import teleported_setup

    loaded = load_model(model_name)
    context = loaded.solver_context(loaded.available() | {"gaussian"})
    x = noise_for_seeds(range(seed, seed + samples), loaded.data_shape)
    test = load_digits("test")
    with torch.inference_mode():
        reference, check, _ = reference_solve(loaded.denoiser, x, reference_steps)
    rows = []
    for name in solvers:
        for nfe in nfes:
            for skip in skips:
                solver, grid = teleported_setup(name, loaded.schedule, nfe, skip, context=context)
                with torch.inference_mode():
                    out = sample(loaded.denoiser, x, solver, grid)
                t_skip = float(grid[1]) if skip else float(grid[0])
                rows.append(
                    TeleportRow(
                        name,
                        out.nfe,
                        skip,
                        t_skip,
                        rmse(out.x, reference),
                        frechet_distance(out.x.float(), test),
                    )
                )

    return {
        "model": model_name,
        "samples": samples,
        "reference_agreement": rmse(reference, check),
        "rows": [asdict(r) for r in rows],
    }


def guidance_sweep(
    model_name: str,
    solver_name: str,
    nfe: int,
    methods: Sequence[str],
    scales: Sequence[float],
    samples: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, FD and saturation against the guidance scale (targets: seed % 10)."""
    from diffsolve.app.classifier import classifier_accuracy, load_classifier
    from diffsolve.app.conditioning import GuidanceSpec
    from diffsolve.app.data import load_digits
    from diffsolve.app.loader import load_model

    loaded = load_model(model_name)
    seeds = list(range(seed, seed + samples))
    labels = torch.tensor(seeds) % 10
    x = noise_for_seeds(seeds, loaded.data_shape)
    context = loaded.solver_context(preset(solver_name).needs)
    solver, grid = setup_solver(solver_name, loaded.schedule, nfe, context=context)
    classifier = load_classifier()
    test = load_digits("test")
    rows = []
    for method in methods:
        for scale in scales:
            denoiser = GuidanceSpec(method, scale).build(loaded, labels)  # type: ignore[arg-type]
            with torch.inference_mode():
                out = sample(denoiser, x, solver, grid).x.float()
            rows.append(
                GuidanceRow(
                    method,
                    scale,
                    classifier_accuracy(classifier, out, labels),
                    frechet_distance(out, test),
                    float(out.abs().mean()),
                    float((out.abs() >= SATURATED).float().mean()),
                )
            )
    return {
        "model": model_name,
        "solver": solver_name,
        "nfe": nfe,
        "samples": samples,
        "rows": [asdict(r) for r in rows],
    }


@dataclass
class InversionRow:
    """One (solver, steps) of :func:`inversion_sweep`: errors of the round trip in pixels."""

    solver: str
    steps: int
    rmse: float
    max_error: float


def inversion_solvers(available: Collection[str]) -> list[str]:
    """The default solvers of :func:`inversion_sweep`: the registry's line-up and every
    solver with an exact inversion (``invert``/``reconstruct`` methods, e.g. BDIA)."""
    exact = [
        name for name, p in SOLVERS.items() if hasattr(p.solver, "reconstruct") and not p.needs
    ]
    return [n for n in lineup(available) if "@" not in n] + exact


def inversion_sweep(
    model_name: str,
    solvers: Sequence[str] | None,
    steps: Sequence[int],
    samples: int = 397,
) -> dict[str, Any]:
    r"""Invert held-out digits to noise and sample them back on the same grid.

    The grid is each solver's default grid kind with ``steps`` steps from the schedule's
    noisiest to its cleanest time (not to :math:`t = 0`: :math:`\hat x_0` has no inverse);
    the images are taken as the state at the cleanest time. Solvers with an exact inversion
    (BDIA) use it (:meth:`~diffsolve.solvers.bdia.BDIA.invert`); every other one integrates
    the ODE backwards (:func:`~diffsolve.ode.sampling.invert`). ``steps`` counts grid steps
    (Heun spends two evaluations on each but the last). ``solvers=None``:
    :func:`inversion_solvers`.
    """
    from diffsolve.app.data import load_digits
    from diffsolve.app.loader import load_model

    loaded = load_model(model_name)
    context = loaded.solver_context(loaded.available())
    images = load_digits("test")[:samples].to(torch.float32)
    rows = []
    for name in solvers or inversion_solvers(context.provides()):
        for n in steps:
            back = _round_trip(loaded, name, n, images, context)
            err = (back.float() - images).abs()
            rows.append(InversionRow(name, n, rmse(back, images), float(err.max())))
    return {"model": model_name, "samples": len(images), "rows": [asdict(r) for r in rows]}


def _round_trip(
    loaded: LoadedModel, name: str, steps: int, images: Tensor, context: SolverContext
) -> Tensor:
    """Images → noise → images with solver ``name`` on its grid of ``steps`` steps (a
    solver with per-step orders, DPM-Solver-fast, takes ``steps`` as its evaluations and
    its orders decide its steps)."""
    solver, _ = setup_solver(name, loaded.schedule, steps, context=context)
    kind = preset(name).grid_kind(steps)
    t_clean = loaded.schedule.default_range[1]
    orders = getattr(solver, "orders", None)
    grid = grids.make_grid(loaded.schedule, len(orders or ()) or steps, kind, None, t_clean)
    with torch.inference_mode():
        if hasattr(solver, "reconstruct"):
            x_t, x_next = solver.invert(loaded.denoiser, images, grid)
            return solver.reconstruct(loaded.denoiser, x_t, x_next, grid)
        x_t = invert(loaded.denoiser, images, solver, grid).x
        return sample(loaded.denoiser, x_t, solver, grid).x


def format_inversion(result: dict[str, Any]) -> str:
    """Table: one line per solver, round-trip RMSE per number of steps."""
    rows = result["rows"]
    steps = sorted({r["steps"] for r in rows})
    head = f"{'solver':<18}" + "".join(f"{str(n) + ' steps':>12}" for n in steps)
    lines = [
        f"inversion round trip on {result['model']} ({result['samples']} held-out images; "
        "RMSE in pixels, data in [-1, 1])",
        head,
        "-" * len(head),
    ]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        cells = {r["steps"]: r["rmse"] for r in rows if r["solver"] == solver}
        lines.append(f"{solver:<18}" + "".join(f"{cells[n]:>12.2e}" for n in steps))
    return "\n".join(lines)


def format_teleport(result: dict[str, Any]) -> str:
    """Table: one line per (solver, NFE), RMSE and FD per skip fraction."""
    rows = result["rows"]
    skips = sorted({r["skip"] for r in rows})
    head = f"{'solver':<18}{'NFE':>4}  " + "  ".join(
        f"{'skip ' + format(s, '.0%'):>17}" for s in skips
    )
    lines = [
        f"teleportation on {result['model']} ({result['samples']} samples; RMSE / FD)",
        head,
        "-" * len(head),
    ]
    keys = sorted({(r["solver"], r["nfe"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for solver, nfe in keys:
        cells = {r["skip"]: r for r in rows if r["solver"] == solver and r["nfe"] == nfe}
        best = min(cells.values(), key=lambda r: r["rmse"])["skip"]
        lines.append(
            f"{solver:<18}{nfe:>4}  "
            + "  ".join(
                f"{cells[s]['rmse']:.2e}/{cells[s]['fd']:.3f}{'*' if s == best else ' '}".rjust(17)
                for s in skips
            )
        )
    lines.append("(* lowest RMSE)")
    return "\n".join(lines)


def format_guidance(result: dict[str, Any]) -> str:
    """Table: accuracy, FD and saturation per (method, scale)."""
    lines = [
        f"guidance on {result['model']} ({result['solver']}, {result['nfe']} NFE, "
        f"{result['samples']} samples; targets seed % 10)",
        f"{'method':<8}{'scale':>6}{'accuracy':>10}{'FD':>8}{'mean|x|':>9}{'at ±1':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['method']:<8}{r['scale']:>6g}{r['accuracy']:>10.3f}{r['fd']:>8.3f}"
            f"{r['mean_abs']:>9.3f}{r['saturated']:>8.3f}"
        )
    return "\n".join(lines)
