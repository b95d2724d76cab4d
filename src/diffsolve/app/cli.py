"""The ``diffsolve`` command line."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from diffsolve.solvers.registry import SOLVERS


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
    default="auto",
    type=click.Choice(["auto", *sorted(SOLVERS)]),
    metavar="NAME",
    help="Solver (see `diffsolve solvers`); auto: dpm-solver-v3 where the model ships EMS, "
    "else unipc-bh2-3.",
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
@click.option(
    "--guidance",
    default="none",
    type=click.Choice(["none", "cfg", "apg", "classifier"]),
    help="Classifier-free (cfg) or adaptive projected (apg) guidance of a class-conditional "
    "model, or classifier guidance with the shipped digits classifier.",
)
@click.option(
    "--scale",
    "guidance_scale",
    default=1.0,
    type=click.FloatRange(0, None),
    help="Guidance scale (1: the conditional model).",
)
@click.option(
    "--threshold",
    default=None,
    type=click.FloatRange(0, 1, min_open=True),
    help="Dynamic thresholding of x0 at this quantile ratio (e.g. 0.995).",
)
@click.option(
    "--label",
    "class_label",
    default=None,
    type=click.IntRange(0, None),
    help="Class of every sample (conditional models; default: seed % classes).",
)
@click.option(
    "--teleport",
    default=0.0,
    type=click.FloatRange(0, 1, max_open=True),
    help="Skip this share of the solver's usual grid by analytic Gaussian teleportation.",
)
@click.option(
    "--gaussian-stats",
    default=None,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Gaussian statistics for --teleport (default: the model's gaussian_stats.safetensors).",
)
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
    guidance: str,
    guidance_scale: float,
    threshold: float | None,
    class_label: int | None,
    teleport: float,
    gaussian_stats: str | None,
) -> None:
    """Sample a model into --out: shard files, a manifest, samples.npz and grid.png.

    A sample depends only on its seed (one random generator per seed), not on --batch-size
    nor on the number of processes. Under `torchrun --nproc_per_node R -m diffsolve sample`
    rank r takes shards r::R. Rerunning the same command resumes: valid shards are kept,
    missing or corrupt ones recomputed; a folder made with other settings is refused.
    """
    from diffsolve.wrappers.guidance import GuidanceSpec
    from diffsolve.app.scale import RunConfig, SamplingError, distributed, run_sampling

    try:
        spec = GuidanceSpec(guidance, guidance_scale, threshold)  # type: ignore[arg-type]
    except ValueError as err:
        raise click.UsageError(str(err)) from None
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
        guidance=spec,
        class_label=class_label,
        teleport=teleport,
        gaussian_stats=gaussian_stats,
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
    click.echo(f"{m.num_seeds} samples, {m.nfe} NFE each, {m.solver} ({done}) → {target}")


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
    from diffsolve.app.scale import SamplingError, merge_shards, read_manifest

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
@click.option(
    "--sweep",
    default=None,
    type=click.Choice(["teleport", "guidance", "inversion"]),
    help="Instead of the solver comparison: RMSE/FD against the teleportation skip fraction "
    "(--skips); accuracy/FD/saturation against the guidance scale (--methods, --scales); or "
    "the image → noise → image round-trip error against the steps (--nfe) on held-out digits.",
)
@click.option(
    "--skips",
    default="0,0.1,0.2,0.3,0.4",
    metavar="LIST",
    help="Teleportation skip fractions (--sweep teleport).",
)
@click.option(
    "--methods", default="cfg,apg", metavar="LIST", help="Guidance methods (--sweep guidance)."
)
@click.option(
    "--scales", default="1,2,3,5,7,10", metavar="LIST", help="Guidance scales (--sweep guidance)."
)
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
    sweep: str | None,
    skips: str,
    methods: str,
    scales: str,
) -> None:
    """Measure solvers against diffusers' schedulers: RMSE to a reference, FD, speed."""
    from diffsolve.app.bench import BenchConfig, run_bench
    from diffsolve.app.bench.report import format_table, plot, write_json

    nfes = _nfe_list(nfe_list)
    if sweep is not None:
        _run_sweep(
            sweep,
            model_name,
            nfes,
            solvers,
            samples,
            seed,
            reference_steps,
            skips,
            methods,
            scales,
            json_path,
        )
        return
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


def _nfe_list(text: str) -> list[int]:
    try:
        nfes = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise click.UsageError(f"--nfe: expected integers like 5,6,8, got {text!r}") from None
    if not nfes or min(nfes) < 2:
        raise click.UsageError("--nfe: give at least one budget, each >= 2")
    return nfes


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.UsageError(f"{option}: expected numbers like 1,2,3, got {text!r}") from None


def _run_sweep(
    sweep: str,
    model_name: str,
    nfes: list[int],
    solvers: str | None,
    samples: int,
    seed: int,
    reference_steps: int,
    skips: str,
    methods: str,
    scales: str,
    json_path: str | None,
) -> None:
    """The accelerations' sweeps of ``diffsolve bench --sweep``."""
    import json

    from diffsolve.app.bench.sweeps import (
        INVERSION_SOLVERS,
        format_guidance,
        format_inversion,
        format_teleport,
        guidance_sweep,
        inversion_sweep,
        teleport_sweep,
    )

    try:
        if sweep == "teleport":
            names = (
                solvers.split(",")
                if solvers
                else ["dpm-solver++-2m", "unipc-bh2-3", "dpm-solver-v3"]
            )
            result = teleport_sweep(
                model_name, names, nfes, _floats(skips, "--skips"), samples, seed, reference_steps
            )
            click.echo(format_teleport(result))
        elif sweep == "inversion":
            names = solvers.split(",") if solvers else list(INVERSION_SOLVERS)
            result = inversion_sweep(model_name, names, nfes, min(samples, 397))
            click.echo(format_inversion(result))
        else:
            name = solvers.split(",")[0] if solvers else "dpm-solver++-2m"
            result = guidance_sweep(
                model_name,
                name,
                nfes[0],
                methods.split(","),
                _floats(scales, "--scales"),
                samples,
                seed,
            )
            click.echo(format_guidance(result))
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@main.command("ems")
@click.option("--model", "model_name", default="digits", metavar="NAME|DIR", help="Model.")
@click.option("--samples", default=1024, type=click.IntRange(2, None), help="K: data points.")
@click.option(
    "--grid",
    "grid_size",
    default=200,
    type=click.IntRange(2, None),
    help="N: intervals of the logSNR grid.",
)
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output file (default: the model's ems.safetensors).",
)
@click.option(
    "--data",
    "data_source",
    default="digits",
    metavar="digits|FILE",
    help="x0 points: the digits training split, or a .pt/.npy/.npz array (M, ...).",
)
@click.option("--t-start", default=None, type=float, help="Noisiest time (default: schedule's).")
@click.option("--t-end", default=None, type=float, help="Cleanest time (default: schedule's).")
@click.option("--seed", default=0, type=click.IntRange(0, None), help="Noise and probe seed.")
@click.option("--batch-size", default=512, type=click.IntRange(1, None), help="JVP batch.")
@click.option(
    "--jvp",
    default="auto",
    type=click.Choice(["auto", "forward", "double_backward"]),
    help="Forward-mode AD, double-backward, or forward with automatic fallback.",
)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(dir_okay=False),
    help="Progress file (default: OUT.partial); rerunning resumes from it.",
)
@click.option(
    "--labels",
    "labels_source",
    default=None,
    metavar="FILE",
    help="Class-conditional models: class labels of the --data points (.pt/.npy/.npz). "
    "Default: the digits labels with --data digits, else the null class (unconditional).",
)
@click.option("--device", default="cpu", help="torch device.")
def ems_command(
    model_name: str,
    samples: int,
    grid_size: int,
    out_path: str | None,
    data_source: str,
    t_start: float | None,
    t_end: float | None,
    seed: int,
    batch_size: int,
    jvp: str,
    checkpoint: str | None,
    labels_source: str | None,
    device: str,
) -> None:
    """Estimate DPM-Solver-v3's empirical model statistics (shards over torchrun ranks).

    A class-conditional model is measured under its data's own labels (the conditional
    model, as sampled without guidance).
    """
    from diffsolve.stats.ems.compute import compute_ems
    from diffsolve.app.loader import load_model
    from diffsolve.app.scale import distributed

    with distributed() as dist:
        try:
            model = load_model(model_name, device=device)
            data = _load_data(data_source)
            labels = None
            if labels_source is not None:
                labels = _load_data(labels_source, "--labels").long()
            elif data_source == "digits":
                from diffsolve.app.data import load_digit_labels

                labels = load_digit_labels("train")
            if labels is not None and labels.shape[:1] != data.shape[:1]:
                raise ValueError(
                    f"--labels: {labels.shape[0]} labels for {data.shape[0]} data points"
                )
            out = Path(out_path) if out_path else model.ems_path
            if out is None:
                raise ValueError("--out is required for this model")
            if tuple(data.shape[1:]) != model.data_shape:
                raise ValueError(
                    f"--data has samples of shape {tuple(data.shape[1:])}, the "
                    f"model takes {model.data_shape}"
                )
            ems = compute_ems(
                model.denoiser,
                data,
                samples=samples,
                grid_size=grid_size,
                t_start=t_start,
                t_end=t_end,
                seed=seed,
                batch_size=batch_size,
                jvp=jvp,  # type: ignore[arg-type]
                checkpoint=checkpoint or f"{out}.partial",
                progress=True,
                device=device,
                conditioning=model.label_kwargs(labels),
                model_name=model_name,
            )
        except (ValueError, FileNotFoundError) as err:
            raise click.UsageError(str(err)) from None
        if dist.rank == 0:
            ems.save(out)
            for partial in Path(out).parent.glob(f"{Path(out).name}.partial*"):
                partial.unlink()
            click.echo(f"EMS (K={samples}, N={grid_size}, {dist.world_size} process(es)) → {out}")


def _load_data(source: str, option: str = "--data") -> torch.Tensor:
    """The digits training split, or an array file of shape (M, ...)."""
    if source == "digits" and option == "--data":
        from diffsolve.app.data import load_digits

        return load_digits("train")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{option}: {source!r} is neither 'digits' nor an existing file")
    if path.suffix == ".pt":
        return torch.as_tensor(torch.load(path, weights_only=True))
    if path.suffix in (".npy", ".npz"):
        array = np.load(path)
        if path.suffix == ".npz":
            array = array[array.files[0]]
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
    raise ValueError(f"{option}: unsupported file type {path.suffix!r} (use .pt, .npy or .npz)")


@main.command("gaussian-stats")
@click.option(
    "--model",
    "model_name",
    default="digits",
    metavar="NAME|DIR",
    help="Model whose input space the statistics are for (sets the default --out).",
)
@click.option(
    "--data",
    "data_source",
    default="digits",
    metavar="digits|FILE",
    help="Data in the model's input space: the digits training split or an array file.",
)
@click.option(
    "--rank",
    default=None,
    type=click.IntRange(1, None),
    help="Top eigenpairs to keep (default: all for small data).",
)
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output file (default: the model's gaussian_stats.safetensors).",
)
def gaussian_stats_command(
    model_name: str, data_source: str, rank: int | None, out_path: str | None
) -> None:
    """Mean and top eigenpairs of a data set (float64), for analytic teleportation."""
    from diffsolve.stats.gaussian.estimate import compute_gaussian_stats
    from diffsolve.app.loader import load_model

    try:
        model = load_model(model_name)
        data = _load_data(data_source)
        if tuple(data.shape[1:]) != model.data_shape:
            raise ValueError(
                f"--data has samples of shape {tuple(data.shape[1:])}, the model "
                f"takes {model.data_shape}"
            )
        out = (
            Path(out_path)
            if out_path
            else (model.folder / "gaussian_stats.safetensors" if model.folder else None)
        )
        if out is None:
            raise ValueError("--out is required for this model")
        stats = compute_gaussian_stats(
            data, rank, description=f"{data_source} data for model {model_name}"
        )
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    stats.save(out)
    click.echo(f"Gaussian statistics of {data.shape[0]} samples → {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
