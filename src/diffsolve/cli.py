"""The ``diffsolve`` command line."""

from __future__ import annotations

from pathlib import Path

import click

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
@click.option("--seeds", default="0-63", metavar="LIST", help="Seeds, e.g. 0-49999 or 0,5,9-12.")
@click.option(
    "--batch-size",
    default=64,
    type=click.IntRange(1, None),
    help="Samples per model call (does not change the samples).",
)
@click.option(
    "--shard-size",
    default=1000,
    type=click.IntRange(1, None),
    help="Seeds per shard file (shard-<first seed>.npz).",
)
@click.option(
    "--out",
    "out_dir",
    default="samples",
    type=click.Path(file_okay=False),
    help="Output folder: shards, sample.json, samples.npz, grid.png. Rerun to resume.",
)
@click.option(
    "--merge/--no-merge",
    default=True,
    help="Merge the shards into samples.npz when all are done.",
)
@click.option("--device", default="cpu", help="torch device (cuda: one GPU per torchrun rank).")
def sample_command(
    model_name: str,
    solver: str,
    nfe: int,
    grid_kind: str | None,
    seeds: str,
    batch_size: int,
    shard_size: int,
    out_dir: str,
    merge: bool,
    device: str,
) -> None:
    """Sample a model into --out: shard files, a manifest, samples.npz and grid.png.

    A sample depends only on its seed (one random generator per seed), not on --batch-size
    nor on the number of processes. Under `torchrun --nproc_per_node R -m diffsolve sample`
    rank r takes shards r::R. Rerunning the same command resumes: valid shards are kept,
    missing or corrupt ones recomputed; a folder made with other settings is refused.
    """
    from diffsolve.scale import RunConfig, SamplingError, distributed, run_sampling

    config = RunConfig(
        model=model_name,
        solver=solver,
        nfe=nfe,
        grid=grid_kind,
        seeds=seeds,
        out_dir=out_dir,
        batch_size=batch_size,
        shard_size=shard_size,
        device=device,
        merge=merge,
    )
    try:
        with distributed() as dist:
            report = run_sampling(config, dist, progress=True)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    except SamplingError as err:
        raise click.ClickException(str(err)) from None
    for path, reason in report.recomputed.items():
        click.echo(f"recomputed {path.name}: {reason}", err=True)
    if dist.rank != 0:
        return
    m = report.manifest
    done = f"{len(report.computed)} shard(s) computed, {len(report.skipped)} kept"
    if dist.world_size > 1:
        done += " on rank 0"
    target = report.grid_png or report.merged or Path(out_dir)
    click.echo(f"{m.num_seeds} samples, {m.nfe} NFE each, {solver} ({done}) → {target}")


@main.command("merge")
@click.option(
    "--out",
    "out_dir",
    default="samples",
    type=click.Path(file_okay=False, exists=True),
    help="Folder of a `diffsolve sample` run.",
)
def merge_command(out_dir: str) -> None:
    """Merge a run's shards into samples.npz (every seed once, sorted).

    Fails, naming them, if seeds are missing, duplicated or a shard is corrupt.
    """
    from diffsolve.scale import SamplingError, merge_shards, read_manifest

    try:
        path = merge_shards(out_dir)
    except SamplingError as err:
        raise click.ClickException(str(err)) from None
    manifest = read_manifest(out_dir)
    count = manifest.num_seeds if manifest else 0
    click.echo(f"merged {count} samples → {path}")


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


if __name__ == "__main__":  # pragma: no cover
    main()
