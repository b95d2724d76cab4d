"""The ``diffsolve`` command line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from diffsolve.registry import SOLVERS

DEFAULT_SOLVER = "unipc-bh1-3"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="diffsolve")
def main() -> None:
    """Fast, training-free samplers for diffusion and flow models."""


@main.command("solvers")
def list_solvers() -> None:
    """List the named solver configurations."""
    width = max(len(n) for n in SOLVERS)
    for name, spec in SOLVERS.items():
        click.echo(f"{name:<{width}}  {spec.description}")


@main.command("sample")
@click.option(
    "--model",
    "model_name",
    default="digits",
    metavar="NAME|DIR",
    help="Demo model (digits, digits-cond, digits-flow, gaussian, gmm) or a folder.",
)
@click.option(
    "--solver",
    default=DEFAULT_SOLVER,
    type=click.Choice(sorted(SOLVERS)),
    metavar="NAME",
    help="Solver (see `diffsolve solvers`).",
)
@click.option("--nfe", default=10, type=click.IntRange(2, 1000), help="Model evaluations.")
@click.option(
    "--grid",
    "grid_kind",
    default=None,
    type=click.Choice(["logsnr", "time_uniform", "time_quadratic", "karras"]),
    help="Step grid (default: the solver's).",
)
@click.option("--seeds", default="0-63", metavar="LIST", help="Seeds, e.g. 0-63 or 0,5,9-12.")
@click.option("--batch-size", default=64, type=click.IntRange(1, None), help="Samples per batch.")
@click.option(
    "--out",
    "out_dir",
    default="samples",
    type=click.Path(file_okay=False),
    help="Output folder (grid.png, samples.npz).",
)
@click.option("--device", default="cpu", help="torch device.")
def sample_command(
    model_name: str,
    solver: str,
    nfe: int,
    grid_kind: str | None,
    seeds: str,
    batch_size: int,
    out_dir: str,
    device: str,
) -> None:
    """Sample a model and write a PNG grid and the samples (.npz) to --out."""
    from tqdm.auto import tqdm

    from diffsolve.images import save_grid
    from diffsolve.models import load_model
    from diffsolve.registry import setup_solver
    from diffsolve.sampling import sample
    from diffsolve.seeds import noise_for_seeds, parse_seeds

    try:
        seed_list = parse_seeds(seeds)
        model = load_model(model_name, device=device)
        method, grid = setup_solver(solver, model.schedule, nfe, grid_kind)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    plan = method.plan(model.schedule, grid)
    scale = model.schedule.init_noise_sigma(float(grid[0]))
    batches = [seed_list[i : i + batch_size] for i in range(0, len(seed_list), batch_size)]
    results, spent = [], 0
    with torch.inference_mode(), tqdm(total=len(seed_list), desc="sampling", unit="img") as bar:
        for batch in batches:
            x = noise_for_seeds(batch, model.data_shape, scale, device)
            denoiser = model.denoiser
            if model.num_classes:
                labels = torch.tensor(batch, device=device) % model.num_classes
                denoiser = model.conditional(labels)
            out = sample(denoiser, x, method, plan=plan)
            spent = out.nfe
            results.append(out.x.float().cpu())
            bar.update(len(batch))
    samples = torch.cat(results)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    save_grid(samples, out_path / "grid.png")
    _save_npz(out_path / "samples.npz", samples=samples.numpy(), seeds=np.array(seed_list))
    meta = {
        "model": model_name,
        "solver": solver,
        "nfe": spent,
        "seeds": seeds,
        "grid": [float(t) for t in grid],
    }
    (out_path / "sample.json").write_text(json.dumps(meta, indent=2))
    click.echo(f"{len(seed_list)} samples, {spent} NFE each, {solver} → {out_path / 'grid.png'}")


@main.command("bench")
@click.option("--model", "model_name", default="digits", metavar="NAME|DIR", help="Model.")
@click.option(
    "--nfe",
    "nfe_list",
    default="5,6,8,10,12,15,20",
    metavar="LIST",
    help="Comma-separated NFE budgets.",
)
@click.option(
    "--solvers",
    default=None,
    metavar="LIST",
    help="Comma-separated contestants: solver names (`diffsolve solvers`), NAME@GRID, "
    "NAME@diffusers-grid, diffusers:PEER. Default: ours, every peer, twins.",
)
@click.option(
    "--samples", default=512, type=click.IntRange(2, None), help="Samples (same noise for all)."
)
@click.option("--seed", default=0, type=click.IntRange(0, None), help="First seed.")
@click.option(
    "--reference-steps",
    default=500,
    type=click.IntRange(50, None),
    help="Steps of the two reference solves.",
)
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write all results as JSON.",
)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a PNG plot of RMSE against NFE.",
)
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-overhead", is_flag=True, help="Skip the null-model overhead measurement.")
def bench_command(
    model_name: str,
    nfe_list: str,
    solvers: str | None,
    samples: int,
    seed: int,
    reference_steps: int,
    json_path: str | None,
    plot_path: str | None,
    device: str,
    no_overhead: bool,
) -> None:
    """Measure solvers against diffusers' schedulers: RMSE to a reference, FD, speed."""
    from diffsolve.bench import BenchConfig, run_bench
    from diffsolve.bench.report import format_table, plot, write_json

    try:
        nfes = [int(n) for n in nfe_list.split(",") if n.strip()]
    except ValueError:
        raise click.UsageError(f"--nfe: expected integers like 5,6,8, got {nfe_list!r}") from None
    if not nfes or min(nfes) < 2:
        raise click.UsageError("--nfe: give at least one budget, each >= 2")
    config = BenchConfig(
        model=model_name,
        nfes=nfes,
        samples=samples,
        seed=seed,
        solvers=[s.strip() for s in solvers.split(",")] if solvers else None,
        reference_steps=reference_steps,
        device=device,
        overhead=not no_overhead,
    )
    try:
        result = run_bench(config)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    click.echo(format_table(result))
    if json_path:
        write_json(result, json_path)
    if plot_path:
        plot(result, plot_path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (temporary file + rename): never a half-written file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)


if __name__ == "__main__":  # pragma: no cover
    main()
