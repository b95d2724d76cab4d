"""The ``diffsolve`` command line.

Choices are read from where they are declared: ``--solver`` from the solver registry,
``--grid`` from :data:`diffsolve.ode.grids.GRIDS`, ``--guidance`` from
:data:`diffsolve.app.conditioning.GUIDANCE`; options shared by several commands are declared
once below.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, get_args

import click
import torch
from click.core import ParameterSource

from diffsolve.app.conditioning import GUIDANCE
from diffsolve.ode.grids import GRIDS
from diffsolve.ode.model import PREDICTION_ALIASES
from diffsolve.solvers.registry import SOLVERS
from diffsolve.stats.ems.compute import RECIPE
from diffsolve.stats.ems.derivatives import JVPMode

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------
# Options shared by several commands
MODEL_HELP = (
    "Model: a demo (digits, digits-cond, digits-flow, gaussian, gmm), a diffsolve or "
    "diffusers folder (pipeline with model_index.json, or a model folder with "
    "scheduler_config.json), or an entry point FILE.py:NAME / module:NAME whose NAME() returns "
    "a diffsolve.ModelWrapper."
)


def model_option(help: str = MODEL_HELP) -> Callable[[F], F]:
    """``--model``: a demo, a folder or an entry point (see
    :func:`~diffsolve.app.loader.load_model`)."""
    return click.option("--model", "model_name", default="digits", metavar="MODEL", help=help)


#: The option names :func:`model_options` adds (popped by :func:`load_options`).
LOAD_KEYS = (
    "prediction",
    "scheduler_config",
    "shape",
    "height",
    "width",
    "prompt",
    "prompts_file",
    "negative_prompt",
    "ems_file",
    "gaussian_stats",
)


_FILE = click.Path(dir_okay=False)
#: How to read the model (every source).
_SOURCE_OPTIONS = (
    click.option(
        "--prediction",
        default=None,
        type=click.Choice(sorted(PREDICTION_ALIASES)),
        help="What the network predicts, instead of the model's declaration.",
    ),
    click.option(
        "--scheduler-config",
        default=None,
        type=_FILE,
        metavar="FILE",
        help="diffusers models: this scheduler_config.json instead of the folder's.",
    ),
    click.option(
        "--shape",
        default=None,
        metavar="C,H,W",
        help="Entry points: the sample shape, instead of the ModelWrapper's data_shape.",
    ),
)
#: Text pipelines' prompts and image size.
_TEXT_OPTIONS = (
    click.option(
        "--prompt",
        multiple=True,
        help="Text pipelines: a prompt (repeat for several; sample i takes prompt i mod P). "
        "Default: the empty prompt.",
    ),
    click.option(
        "--prompts",
        "prompts_file",
        default=None,
        type=_FILE,
        metavar="FILE",
        help="Text pipelines: prompts, one per line (sample i takes prompt i mod P).",
    ),
    click.option(
        "--negative-prompt",
        default=None,
        help="Text pipelines: the unconditional branch of guidance [default: ''].",
    ),
    click.option(
        "--height",
        default=None,
        type=click.IntRange(8, None),
        help="Text pipelines: image height [default: the pipeline's].",
    ),
    click.option(
        "--width",
        default=None,
        type=click.IntRange(8, None),
        help="Text pipelines: image width [default: the pipeline's].",
    ),
)
#: The statistics files solvers take from the model.
_STATS_OPTIONS = (
    click.option(
        "--ems",
        "ems_file",
        default=None,
        type=_FILE,
        metavar="FILE",
        help="DPM-Solver-v3's statistics [default: the model folder's ems.safetensors].",
    ),
    click.option(
        "--gaussian-stats",
        default=None,
        type=_FILE,
        metavar="FILE",
        help="Gaussian statistics for teleportation [default: the model folder's "
        "gaussian_stats.safetensors].",
    ),
)


def model_options(
    help: str = MODEL_HELP, text: bool = True, stats: bool = True
) -> Callable[[F], F]:
    """``--model`` and how to load it: ``--prediction``, ``--scheduler-config``, ``--shape``;
    for text pipelines ``--prompt``/``--prompts``, ``--negative-prompt``, ``--height``,
    ``--width`` (``text``); the statistics files ``--ems``, ``--gaussian-stats`` (``stats``).
    :func:`load_options` reads them back."""
    options = [model_option(help), *_SOURCE_OPTIONS]
    options += [*(_TEXT_OPTIONS if text else ()), *(_STATS_OPTIONS if stats else ())]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def load_options(options: dict[str, Any]) -> Any:
    """Pop :func:`model_options`' values from a command's keyword arguments into a
    :class:`~diffsolve.app.loader.LoadOptions`."""
    from diffsolve.app.loader import LoadOptions

    values = {key: options.pop(key, None) for key in LOAD_KEYS}
    prompts = list(values["prompt"] or ())
    if values["prompts_file"] is not None:
        if prompts:
            raise click.UsageError("--prompt and --prompts: give the prompts one way")
        prompts = _prompt_lines(values["prompts_file"])
    shape = None
    if values["shape"] is not None:
        shape = tuple(_csv(values["shape"], int, "--shape", "a shape like 1,28,28"))
        if not shape or min(shape) < 1:
            raise click.UsageError(f"--shape: expected positive sizes like 1,28,28, got {shape}")
    return LoadOptions(
        prediction=values["prediction"],
        scheduler_config=values["scheduler_config"],
        shape=shape,
        height=values["height"],
        width=values["width"],
        prompts=tuple(prompts) or None,
        negative_prompt=values["negative_prompt"] or "",
        ems=values["ems_file"],
        gaussian_stats=values["gaussian_stats"],
    )


def _prompt_lines(path: str) -> list[str]:
    """``--prompts FILE``: one prompt per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise click.UsageError(f"--prompts {path}: cannot read it ({err})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise click.UsageError(f"--prompts {path}: no prompts in the file (one per line)")
    return prompts


def device_option(help: str = "torch device.") -> Callable[[F], F]:
    """``--device``."""
    return click.option("--device", default="cpu", help=help)


def seed_option(help: str = "First seed.") -> Callable[[F], F]:
    """``--seed N``."""
    return click.option("--seed", default=0, type=click.IntRange(0, None), help=help)


def data_option(help: str, default: str | None = "digits", samples: int = 256) -> Callable[[F], F]:
    """``--data``: ``digits``, ``self``, an array file or an image folder
    (:func:`diffsolve.app.model_data.model_data`), and ``--data-samples``."""

    def decorate(f: F) -> F:
        f = int_option(
            "--data-samples",
            samples,
            2,
            "--data self: how many own samples (unipc-bh2-3, 50 NFE, seeds from --seed).",
        )(f)
        return click.option(
            "--data",
            "data_source",
            default=default,
            metavar="digits|self|FILE|DIR",
            help=help + " digits: the demos' data; self: the model's own samples; FILE: a "
            ".pt/.npy/.npz array in the model's sample space; DIR: a folder of images (a "
            "latent model encodes them with its VAE).",
        )(f)

    return decorate


def check_option() -> Callable[[F], F]:
    """``--check/--no-check``: the quick conventions check before a long command."""
    return click.option(
        "--check/--no-check",
        "check",
        default=True,
        help="First check that the declared prediction type and time map fit the model "
        "(as `diffsolve check-model`, quickly) and refuse a clearly wrong one.",
    )


def int_option(flag: str, default: int, minimum: int, help: str) -> Callable[[F], F]:
    """An integer option with a lower bound."""
    dest = flag.lstrip("-").replace("-", "_")
    return click.option(flag, dest, default=default, type=click.IntRange(minimum, None), help=help)


def file_option(flag: str, dest: str, help: str) -> Callable[[F], F]:
    """An optional output file."""
    return click.option(flag, dest, default=None, type=click.Path(dir_okay=False), help=help)


def out_file_option(name: str) -> Callable[[F], F]:
    """``--out FILE`` (default: ``./<name>``) and ``--force``."""

    def decorate(f: F) -> F:
        f = click.option(
            "--force", is_flag=True, help="Replace --out if it exists (never inside diffsolve)."
        )(f)
        return file_option(
            "--out",
            "out_path",
            f"Output file (default: ./{name}; copy it into a model folder as {name} for "
            "`diffsolve sample` to use it).",
        )(f)

    return decorate


class SolverChoice(click.Choice):
    """``--solver``: ``auto`` or a registry name, read when the option is parsed (a solver
    registered after this module was imported is a valid choice too), or a prefixed name
    such as ``schedule:FILE`` (a solver schedule, resolved when the run starts)."""

    def __init__(self) -> None:
        super().__init__([])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """A registry name, or ``PREFIX:ARGUMENT`` of a registered prefix as it is."""
        from diffsolve.solvers.registry import PREFIXES

        prefix, _, argument = str(value).partition(":")
        if argument and prefix in PREFIXES:
            return str(value)
        return super().convert(value, param, ctx)

    @property
    def choices(self) -> list[str]:  # type: ignore[override]
        return ["auto", *sorted(SOLVERS)]

    @choices.setter
    def choices(self, value: object) -> None:
        """click's constructor sets the choices; they come from the registry instead."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Bad input (``ValueError``, a missing file) is a usage error: exit code 2 and the
    message; a system error (a read-only folder, a full disk) exits 1 with its message;
    never a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise click.ClickException(f"{err.strerror or err}{where}") from None


@contextmanager
def joined() -> Iterator[Any]:
    """torchrun's process group (:func:`~diffsolve.app.scale.distributed`) for a command;
    a run that cannot start or go on ends with its one-line message."""
    from diffsolve.app.scale import SamplingError, distributed

    try:
        with distributed() as dist:
            yield dist
    except SamplingError as err:
        raise click.ClickException(str(err)) from None


#: How an option given on the command line is marked (``ctx.get_parameter_source``).
_GIVEN = ParameterSource.COMMANDLINE


def refuse_unused(ctx: click.Context, used: set[str], mode: str) -> None:
    """Options given on the command line that ``mode`` does not use are an error, not
    silently ignored."""
    from click.core import ParameterSource

    given = [
        p.opts[0]  # type: ignore[attr-defined]
        for p in ctx.command.params
        if p.name not in used and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE  # type: ignore[arg-type]
    ]
    if given:
        raise click.UsageError(f"{', '.join(given)}: not used by {mode}; drop it")


def _csv(text: str, convert: Callable[[str], Any], option: str, example: str) -> list[Any]:
    try:
        return [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.UsageError(f"{option}: expected {example}, got {text!r}") from None


def _nfe_list(text: str) -> list[int]:
    nfes = _csv(text, int, "--nfe", "integers like 5,6,8")
    if not nfes or min(nfes) < 2:
        raise click.UsageError("--nfe: give at least one budget, each >= 2")
    return nfes


# ---------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="diffsolve")
def main() -> None:
    """Fast, training-free samplers for diffusion and flow models."""
    import os

    from diffsolve.app.tuning import keep_freed_memory

    keep_freed_memory()  # large CPU tensors are reused, not faulted in afresh every step
    warnings.formatwarning = _one_line_warning
    # transformers' import-time advice (e.g. on torchvision) is not the user's business here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any) -> str:
    """Warnings on the command line as ``warning: <message>`` (no source line)."""
    return f"warning: {message}\n"


@main.command("solvers")
def list_solvers() -> None:
    """List the named solver configurations."""
    width = max(len(n) for n in SOLVERS)
    for name, spec in sorted(SOLVERS.items()):
        click.echo(f"{name:<{width}}  {spec.description}")
    schedule = "schedule:FILE"
    click.echo(
        f"{schedule:<{width}}  a solver schedule (a solving strategy per step, its own times "
        "and NFE) from `diffsolve tune --method solver-schedule`"
    )


@main.command("sample")
@model_options()
@click.option(
    "--solver",
    default="auto",
    type=SolverChoice(),
    metavar="NAME",
    help="Solver (see `diffsolve solvers`), or schedule:FILE (a solver schedule from `diffsolve "
    "tune --method solver-schedule`: its own times and NFE); auto: the solver schedule tuned "
    "for the model at --nfe where its folder keeps one, else dpm-solver-v3 where the model "
    "ships EMS, else unipc-bh2-3.",
)
@click.option("--nfe", default=10, type=click.IntRange(2, 1000), help="Model evaluations.")
@click.option(
    "--grid",
    "grid_kind",
    default=None,
    type=click.Choice(list(GRIDS)),
    help="Step grid (default: the solver's).",
)
@click.option("--seeds", default="0-63", metavar="LIST", help="Seeds, e.g. 0-49999 or 0,5,9-12.")
@int_option(
    "--batch-size",
    64,
    1,
    "Samples per model call. Samples agree across batch sizes and process counts to ~1e-5 "
    "(the network's floating-point reductions), not bit for bit: a resume keeps it.",
)
@int_option("--shard-size", 1000, 1, "Seeds per shard file (shard-<first seed>.npz).")
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
@device_option("torch device (cuda: one GPU per torchrun rank).")
@click.option(
    "--guidance",
    default="none",
    type=click.Choice(list(GUIDANCE)),
    help="Classifier-free (cfg) or adaptive projected (apg) guidance of a class-conditional "
    "model or text pipeline, or classifier guidance with the shipped digits classifier. A "
    "text pipeline with --scale takes cfg.",
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
    "--dualfast",
    default=0.0,
    type=click.FloatRange(0, None),
    help="DualFast's c (0: off): eps~ = (1+c) eps - c eps_previous, no extra evaluations. "
    "Helps DDIM (c 0.4-1), not UniPC (BENCHMARKS.md §12).",
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
    "--schedule",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    metavar="FILE",
    help="A step schedule fitted by `diffsolve tune`: its solver, NFE and grid (refused for "
    "another model; --grid, and a --solver or --nfe other than its own, are refused).",
)
@click.option(
    "--tuned-schedule/--no-tuned-schedule",
    default=True,
    help="Use the step schedule tuned for this model, solver and NFE where its folder keeps "
    "one (schedules/<solver>-nfe<N>.json; the demos ship theirs), and with --solver auto the "
    "solver schedule for the NFE (schedules/solver-schedule-nfe<N>.json). --grid and "
    "--schedule win; not with --teleport, guidance, --threshold or --dualfast (a note says so).",
)
def sample_command(
    model_name: str,
    guidance: str,
    guidance_scale: float,
    threshold: float | None,
    dualfast: float,
    out_dir: str,
    grid_kind: str | None,
    **options: Any,
) -> None:
    """Sample a model into --out: shard files, a manifest, samples.npz and grid.png.

    A latent model (SD, SD3, Flux) stores latents in the shards and decodes PNGs with its
    VAE; with --prompt/--prompts sample i takes prompt i mod P, and --scale is
    classifier-free guidance against --negative-prompt.

    A sample depends only on its seed (one random generator per seed), up to ~1e-5 of
    floating-point round-off between batch sizes and process counts. Under `torchrun
    --nproc_per_node R -m diffsolve sample` rank r takes shards r::R. Rerunning the same
    command resumes: valid shards are kept, missing, corrupt or foreign ones recomputed; a
    folder made with other settings (model weights, statistics, solver, batch size, ...) is
    refused, more seeds extend the run; one run writes into a folder at a time.

    Where the model keeps a step schedule tuned for the solver and NFE
    (schedules/<solver>-nfe<N>.json in its folder) and nothing else sets the grid, the run
    uses it as --schedule would, and says so; with --solver auto a solver schedule kept
    for the NFE (schedules/solver-schedule-nfe<N>.json) comes first, run as --solver
    schedule:FILE would.
    """
    from diffsolve.app.conditioning import GuidanceSpec
    from diffsolve.app.scale import RunConfig, SamplingError, distributed, run_sampling

    with usage_errors():
        if options["schedule"] is not None:
            options["nfe"] = _schedule_nfe(options["schedule"], options["nfe"])
        elif options["solver"].startswith("schedule:"):
            options["nfe"] = _schedule_nfe(options["solver"], options["nfe"])
        spec = GuidanceSpec(guidance, guidance_scale, threshold, dualfast)
        load = load_options(options)
        config = RunConfig(
            model=model_name, grid=grid_kind, out_dir=out_dir, guidance=spec, load=load, **options
        )
    try:
        with distributed() as dist, usage_errors():
            say = lambda line: click.echo(line, err=True)  # noqa: E731
            report = run_sampling(config, dist, progress=True, say=say)
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
    fitted = (
        f", fitted schedule {options['schedule']}" if options["schedule"]
        else f", tuned schedule {m.schedule.removeprefix('tuned:')}" if m.schedule
        else ""
    )  # fmt: skip
    click.echo(f"{m.num_seeds} samples, {m.nfe} NFE each, {m.solver}{fitted} ({done}) → {target}")


def _schedule_nfe(path: str, nfe: int) -> int:
    """The NFE of ``sample --schedule FILE`` or ``--solver schedule:FILE``: the file's,
    unless --nfe was given (then both must agree, which the run checks)."""
    from click.core import ParameterSource

    from diffsolve.ode.step_schedule import StepSchedule
    from diffsolve.solvers.solver_schedule import load_solver_schedule

    given = click.get_current_context().get_parameter_source("nfe") is ParameterSource.COMMANDLINE
    if given:
        return nfe
    if path.startswith("schedule:"):
        return load_solver_schedule(path.partition(":")[2]).nfe
    return StepSchedule.load(path).nfe


@main.command("tune")
@model_options()
@click.option(
    "--solver",
    default="auto",
    type=SolverChoice(),
    metavar="NAME",
    help="Solver the schedule is fitted for (auto: as `diffsolve sample`).",
)
@click.option("--nfe", default=5, type=click.IntRange(2, 100), help="Model evaluations.")
@click.option(
    "--method",
    default="dp",
    type=click.Choice(["dp", "search", "solver-schedule"]),
    help="dp: dynamic programming over candidate times; search: dp, then an evolutionary "
    "search over times and solver options on held-out seeds; solver-schedule: a solver "
    "decision per step (order, prediction, derivative estimate, corrector) searched with "
    "the times and the teleport start (--solver is not used; sample with --solver "
    "schedule:FILE).",
)
@click.option(
    "--cost",
    default="student",
    type=click.Choice(["student", "euler"]),
    help="dp's jump cost: the solver's own steps (OSS rollout) or DDIM jumps (GITS).",
)
@click.option(
    "--teleport/--no-teleport",
    default=None,
    help="Let the schedule start with analytic Gaussian teleportation (0 NFE) where that "
    "measures better [default: on when the model has gaussian_stats.safetensors].",
)
@int_option(
    "--trajectories",
    128,
    1,
    "Teacher trajectories (fit seeds); also each held-out set (solver-schedule: search "
    "seeds, default 512, and four times as many check seeds).",
)
@int_option("--candidates", 60, 2, "Candidate intervals of the dp (candidates + 1 times).")
@int_option("--teacher-steps", 300, 2, "DPM-Solver++(3M) steps of the teacher (at least).")
@click.option(
    "--budget",
    default=None,
    type=click.IntRange(1, None),
    help="search: model evaluations (per sample, summed) [default: 60 schedules' worth].",
)
@click.option(
    "--proposals",
    default=None,
    type=click.IntRange(1, None),
    help="solver-schedule: schedules proposed by the evolution [default: 400].",
)
@click.option(
    "--guidance",
    default="none",
    type=click.Choice(["none", "cfg", "apg"]),
    help="solver-schedule: search under classifier-free (cfg) or adaptive projected (apg) "
    "guidance of a class-conditional model (labels seed % classes): the guided denoiser is "
    "the model.",
)
@click.option(
    "--scale",
    "guidance_scale",
    default=1.0,
    type=click.FloatRange(0, None),
    help="solver-schedule: the guidance scale.",
)
@click.option(
    "--metric",
    default="rmse",
    type=click.Choice(["rmse", "mean"]),
    help="solver-schedule: what the search lowers: the RMSE to the teacher, or the mean "
    "per-sample error (lowers the median more, the RMSE less; BENCHMARKS.md §16).",
)
@seed_option("First fit seed; the held-out seeds follow.")
@device_option()
@check_option()
@click.option(
    "--out",
    "out_path",
    default="schedule.json",
    type=click.Path(dir_okay=False),
    help="Output file (JSON).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def tune_command(
    model_name: str,
    solver: str,
    nfe: int,
    method: str,
    out_path: str,
    force: bool,
    device: str,
    check: bool,
    **options: Any,
) -> None:
    """Fit a step schedule for --solver at --nfe to the model (training-free).

    Teacher trajectories of the model itself (DPM-Solver++(3M), many steps) on fit seeds; the
    best path over candidate times by dynamic programming (--cost student: the solver's own
    steps; euler: GITS' DDIM jumps); with --method search, an evolutionary search from it on
    held-out seeds. Prints the times and the RMSE to the teacher on check seeds, tuned and
    the solver's default grid. Use it with `diffsolve sample --schedule FILE`.
    """
    from diffsolve.app.files import write_text_atomic
    from diffsolve.app.loader import load_model
    from diffsolve.app.scale import check_device
    from diffsolve.app.tune import TuneConfig, tune_schedule
    from diffsolve.solvers.registry import default_solver

    with usage_errors():
        out = _out_path(out_path, "schedule.json", force)
        if method == "dp" and options["budget"] is not None:
            raise ValueError(
                f"--budget {options['budget']} limits --method search only (dp's cost is "
                "fixed by --candidates and --trajectories); pass --method search, or drop "
                "--budget"
            )
        _check_tune_method(method, options)
        load = load_options(options)
        model = load_model(model_name, device=check_device(device), options=load)
        if check:
            _quick_check(model)
        if method == "solver-schedule":
            return _tune_solver_schedule(model, nfe, options, out)
        if solver == "auto":
            solver = default_solver(model.available())
        config = TuneConfig(
            cost=options["cost"],
            candidates=options["candidates"],
            teacher_steps=options["teacher_steps"],
            trajectories=options["trajectories"],
            holdout=options["trajectories"],
            seed=options["seed"],
            budget=options["budget"],
            teleport=(
                "gaussian" in model.available()
                if options["teleport"] is None
                else options["teleport"]
            ),
        )
        say = lambda line: click.echo(line, err=True)  # noqa: E731
        fitted = tune_schedule(model, solver, nfe, method, config, progress=say)  # type: ignore[arg-type]
        write_text_atomic(out, fitted.to_json())  # (creates <model folder>/schedules/)
    fit = fitted.fit
    times = ", ".join(f"{t:.4g}" for t in fitted.times)
    options_text = f", options {fitted.options}" if fitted.options else ""
    if fitted.teleport:
        options_text += f", Gaussian teleport {fitted.times[0]:.4g} → {fitted.times[1]:.4g}"
    click.echo(f"{solver} at {nfe} NFE ({fitted.method}{options_text}): t = {times}")
    click.echo(
        f"held-out RMSE to the teacher ({fit['check_seeds']}): {fit['check_rmse']:.4g} tuned, "
        f"{fit['check_rmse_default']:.4g} default grid "
        f"({fit['check_rmse'] / fit['check_rmse_default']:.2f}x)"
    )
    click.echo(
        f"cost: {fitted.cost['model_evaluations']:,} model evaluations, "
        f"{fitted.cost['seconds']:.1f} s → {out}"
    )


def _check_tune_method(method: str, options: dict[str, Any]) -> None:
    """Options of another tuning method are refused, never ignored."""
    given = click.get_current_context().get_parameter_source
    if method != "solver-schedule":
        for name in ("proposals", "guidance", "guidance_scale", "metric"):
            if given(name) is ParameterSource.COMMANDLINE:
                raise ValueError(
                    f"--{name.removeprefix('guidance_').replace('_', '-')} applies to --method "
                    "solver-schedule only; drop it"
                )
    if method == "solver-schedule":
        for name in ("solver", "cost", "candidates", "budget"):
            if given(name) is ParameterSource.COMMANDLINE:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} does not apply to --method solver-schedule (it searches every "
                    f"solver's decisions per step); drop {flag}"
                )


def _tune_solver_schedule(model: Any, nfe: int, options: dict[str, Any], out: Path) -> None:
    """``tune --method solver-schedule``: search, write ``out``, report."""
    from diffsolve.app.files import write_text_atomic
    from diffsolve.app.solver_tune import SearchConfig, search_solver_schedule
    from diffsolve.solvers.solver_schedule import describe_choice

    given = click.get_current_context().get_parameter_source
    settings = {
        name: options[name]
        for name in ("trajectories", "teacher_steps")
        if given(name) is ParameterSource.COMMANDLINE
    }
    if "trajectories" in settings:  # check seeds: four times the search seeds
        settings["check_trajectories"] = 4 * settings["trajectories"]
    config = SearchConfig(
        proposals=options["proposals"] or SearchConfig.proposals,
        seed=options["seed"],
        teleport=options["teleport"],
        guidance=options["guidance"],
        scale=options["guidance_scale"],
        metric=options["metric"],
        **settings,
    )
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    fitted = search_solver_schedule(model, nfe, config, progress=say)
    write_text_atomic(out, fitted.to_json())
    fit = fitted.fit
    jump = f", Gaussian teleport to t = {fitted.times[1]:.4g}" if fitted.teleport else ""
    click.echo(f"solver schedule at {nfe} NFE ({fitted.method}, from {fit['start']}{jump}):")
    for t, choice in zip(fitted.times[int(fitted.teleport) :], fitted.steps, strict=False):
        click.echo(f"  t = {t:.4g}: {describe_choice(choice)}")
    click.echo(
        f"held-out RMSE to the teacher ({fit['check_seeds']}): {fit['check_rmse']:.4g}, its "
        f"start {fit['check_rmse_start']:.4g} ({fit['check_rmse'] / fit['check_rmse_start']:.2f}x)"
    )
    click.echo(
        f"cost: {fitted.cost['model_evaluations']:,} model evaluations, "
        f"{fitted.cost['schedules']} schedules, {fitted.cost['seconds']:.1f} s → {out}"
    )
    guided = (
        f" --guidance {config.guidance} --scale {config.scale:g}"
        if config.guidance != "none"
        else ""
    )
    click.echo(f"sample with: diffsolve sample --solver schedule:{out}{guided}")


@main.command("check-model")
@model_options(stats=False)
@data_option(
    "Data to noise and denoise [default: self; the timestep index is judged on own samples only].",
    default="self",
    samples=64,
)
@seed_option("Seed of the noise (and of --data self).")
@device_option()
def check_model_command(
    model_name: str, data_source: str, data_samples: int, seed: int, device: str, **options: Any
) -> None:
    """Measure which conventions fit the model: prediction type and time map.

    Noises data at times across the schedule, feeds the network under the declared time
    map, reversed, and (discrete models) one training step off either way, and reads each
    output as epsilon, x0, v, score and flow velocity: the error against a linear denoiser
    says which convention fits. Also detects a time embedding that truncates fractional
    times. Exit code 1 when the declared convention does not fit.
    """
    from diffsolve.app.check_model import OWN_SAMPLES, check_conventions, format_check
    from diffsolve.app.model_data import model_data
    from diffsolve.app.scale import check_device

    with usage_errors():
        model = _load(model_name, options, check_device(device))
        data, labels = model_data(
            model, data_source, split="test", samples=data_samples, seed=seed, progress=True
        )
        source = OWN_SAMPLES if data_source == "self" else data_source
        result = check_conventions(
            model, data, labels, source=source, seed=seed, index=data_source == "self"
        )
    click.echo(f"model {model_name}: " + format_check(result))
    if not result.fits and result.denoises:
        raise SystemExit(1)


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
@model_options()
@click.option(
    "--data",
    "data_source",
    default=None,
    metavar="digits|FILE|DIR",
    help="Held-out data for the Fréchet distance, in the model's sample space (an array "
    "file, an image folder) [default: digits for 8x8 models, else none: RMSE and median "
    "only].",
)
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
@int_option("--samples", 512, 2, "Samples (same noise for all).")
@seed_option()
@int_option("--reference-steps", 500, 50, "Steps of the two reference solves.")
@file_option("--json", "json_path", "Write all results as JSON.")
@file_option("--plot", "plot_path", "Write a PNG plot of RMSE against NFE.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace a --json/--plot file that diffsolve did not make (its own are replaced).",
)
@device_option()
@check_option()
@click.option("--no-overhead", is_flag=True, help="Skip the null-model overhead measurement.")
@click.option(
    "--sweep",
    default=None,
    type=click.Choice(["teleport", "guidance", "inversion"]),
    help="Instead of the solver comparison: RMSE/FD against the teleportation skip fraction "
    "(--skips); accuracy/FD/saturation against the guidance scale (--methods, --scales), for "
    "every --solvers × --nfe (default: dpm-solver++-2m at 10 NFE); or the image → noise → "
    "image round-trip error against the steps (--nfe) on held-out digits.",
)
@click.option(
    "--profile",
    default="solvers",
    type=click.Choice(["solvers", "scale"]),
    help="solvers: accuracy and speed of every solver on the model; scale: overhead per "
    "step at real-model shapes (null model), DPM-Solver-v3 plan cost and memory, end to end "
    "with real-size random-weight UNets (uses --device, --shapes, --json, --plot).",
)
@click.option(
    "--shapes",
    default=None,
    metavar="LIST",
    help="--profile scale: batch×shape list, e.g. 16x1x8x8,4x4x64x64 (default: the demos, "
    "SD and SDXL latents, 16x3x256x256).",
)
@click.option(
    "--end-to-end/--no-end-to-end",
    default=True,
    help="--profile scale: also time real-size UNets end to end (minutes on a CPU).",
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
@click.pass_context
def bench_command(
    ctx: click.Context,
    nfe_list: str,
    solvers: str | None,
    json_path: str | None,
    plot_path: str | None,
    force: bool,
    device: str,
    no_overhead: bool,
    sweep: str | None,
    **options: Any,
) -> None:
    """Measure solvers against diffusers' schedulers: RMSE to a reference, FD, speed.

    Where DPM-Solver-v3 runs with the model's EMS, a same-grid section follows: on v3's own
    grid, v3 against itself with degenerate statistics and against our DPM-Solver++(2M) and
    UniPC-bh2, with the ratios of v3's RMSE to theirs and to the best diffusers scheduler.
    """
    from diffsolve.app.bench import BenchConfig, run_bench
    from diffsolve.app.bench.report import format_table, plot, write_json

    profile, shapes, end_to_end = (options.pop(k) for k in ("profile", "shapes", "end_to_end"))
    mode = f"--sweep {sweep}" if sweep else f"--profile {profile}"
    refuse_unused(ctx, BENCH_OPTIONS[sweep or profile], mode)
    with usage_errors():
        from diffsolve.app.scale import check_device

        check_device(device)
        _bench_outputs(json_path, plot_path, force)
    nfes = _nfe_list(nfe_list)
    if sweep == "guidance" and ctx.get_parameter_source("nfe_list") is not _GIVEN:
        nfes = [10]  # one table by default, not one per NFE of the solver comparison
    names = [s.strip() for s in solvers.split(",")] if solvers else None
    load, data = load_options(options), options.pop("data_source")  # refused above but here
    check = options.pop("check")
    if profile == "scale":
        _run_scale(device, shapes, end_to_end, json_path, plot_path)
        return
    if sweep is not None:
        _run_sweep(sweep, nfes, names, json_path, **options)
        return
    for key in ("skips", "methods", "scales"):
        options.pop(key)
    config = BenchConfig(
        model=options.pop("model_name"),
        nfes=nfes,
        solvers=names,
        device=device,
        overhead=not no_overhead,
        data=data,
        load=load,
        check=check,
        **options,
    )
    with usage_errors():
        result = run_bench(config, progress=lambda message: click.echo(message, err=True))
    click.echo(format_table(result))
    if json_path:
        write_json(result, json_path)
    if plot_path:
        plot(result, plot_path)


def _bench_outputs(json_path: str | None, plot_path: str | None, force: bool) -> None:
    """``bench --json/--plot``, checked before the bench runs
    (:func:`~diffsolve.app.files.check_output`: a file diffsolve did not make only with
    ``--force``, never inside the package)."""
    from diffsolve.app.files import check_output

    if force and not (json_path or plot_path):
        raise ValueError("--force replaces --json/--plot files; give one, or drop --force")
    if json_path and plot_path and Path(json_path).resolve() == Path(plot_path).resolve():
        raise ValueError(f"--json and --plot both name {json_path}; give two files")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path:
            check_output(path, option, force=force)


_COMMON = {"sweep", "profile", "force"}
#: The ``bench`` options each mode uses (others given on the command line are refused).
BENCH_OPTIONS: dict[str, set[str]] = {
    "scale": _COMMON | {"device", "shapes", "end_to_end", "json_path", "plot_path"},
    "solvers": _COMMON
    | {"model_name", "nfe_list", "solvers", "samples", "seed", "reference_steps"}
    | {"json_path", "plot_path", "device", "no_overhead", "data_source", "check", *LOAD_KEYS},
    "teleport": _COMMON
    | {"model_name", "nfe_list", "solvers", "samples", "seed", "reference_steps"}
    | {"skips", "json_path"},
    "guidance": _COMMON
    | {"model_name", "nfe_list", "solvers", "samples", "seed", "methods", "scales", "json_path"},
    "inversion": _COMMON | {"model_name", "nfe_list", "solvers", "samples", "json_path"},
}


def _run_scale(
    device: str,
    shapes: str | None,
    end_to_end: bool,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """``diffsolve bench --profile scale``."""
    from diffsolve.app.bench.report import write_json
    from diffsolve.app.bench.scale import ScaleConfig, run_scale_bench
    from diffsolve.app.bench.scale_report import format_scale_table, plot_scale

    config = ScaleConfig(device=device, end_to_end=end_to_end)
    if shapes:
        config.shapes = _shapes(shapes)
        config.plan_shapes = list(dict.fromkeys(shape[1:] for shape in config.shapes))
    with usage_errors():
        result = run_scale_bench(config, progress=lambda m: click.echo(m, err=True))
    click.echo(format_scale_table(result))
    if json_path:
        write_json(result, json_path)
    if plot_path:
        plot_scale(result, plot_path)


def _shapes(text: str) -> list[tuple[int, ...]]:
    """``--shapes``: ``4x4x64x64,16x3x256x256`` (batch first)."""
    shapes = []
    for item in text.split(","):
        dims = _csv(item.replace("x", ","), int, "--shapes", "shapes like 4x4x64x64")
        if len(dims) < 2 or min(dims) < 1:
            raise click.UsageError(
                f"--shapes: {item!r} needs a batch size and a sample shape, all >= 1"
            )
        shapes.append(tuple(dims))
    return shapes


def _run_sweep(
    sweep: str,
    nfes: list[int],
    names: list[str] | None,
    json_path: str | None,
    *,
    model_name: str,
    samples: int,
    seed: int,
    reference_steps: int,
    skips: str,
    methods: str,
    scales: str,
) -> None:
    """The accelerations' sweeps of ``diffsolve bench --sweep``."""
    from diffsolve.app.bench import sweeps
    from diffsolve.app.bench.report import write_json

    with usage_errors():
        if sweep == "teleport":
            result = sweeps.teleport_sweep(
                model_name,
                names or ["dpm-solver++-2m", "unipc-bh2-3", "dpm-solver-v3"],
                nfes,
                _csv(skips, float, "--skips", "numbers like 0,0.1,0.2"),
                samples,
                seed,
                reference_steps,
            )
            text = sweeps.format_teleport(result)
        elif sweep == "inversion":
            result = sweeps.inversion_sweep(model_name, names, nfes, min(samples, 397))
            text = sweeps.format_inversion(result)
        else:
            runs = [
                sweeps.guidance_sweep(
                    model_name,
                    name,
                    nfe,
                    methods.split(","),
                    _csv(scales, float, "--scales", "numbers like 1,2,3"),
                    samples,
                    seed,
                )
                for name in names or ["dpm-solver++-2m"]
                for nfe in nfes
            ]
            result = runs[0] if len(runs) == 1 else {"sweep": "guidance", "runs": runs}
            text = "\n\n".join(sweeps.format_guidance(run) for run in runs)
    click.echo(text)
    if json_path:
        with usage_errors():
            write_json(result, json_path)


#: ``diffsolve ems`` asks for ``--yes`` when its projected time exceeds this (seconds).
CONFIRM_ABOVE_S = 3600.0


@main.command("ems")
@model_options(stats=False)
@int_option(
    "--samples",
    RECIPE["samples"],
    2,
    "K: samples per λ point (noised data points; the points rotate through --data).",
)
@click.option(
    "--grid",
    "grid_size",
    default=RECIPE["grid_size"],
    type=click.IntRange(2, None),
    help="N: logSNR intervals (fine: the network varies between its training timesteps).",
)
@click.option(
    "--bandwidth",
    default=None,
    type=click.FloatRange(0, None),
    help=f"Smoothing of the statistics in λ (local regression; default {RECIPE['bandwidth']}; "
    "a --grid too coarse for it is refused); 0: the paper's per-point estimator, which needs "
    "~10x the samples (BENCHMARKS.md §11).",
)
@out_file_option("ems.safetensors")
@data_option("x0 points [default: digits for 8x8 models, else self].", default=None)
@click.option("--t-start", default=None, type=float, help="Noisiest time (default: schedule's).")
@click.option("--t-end", default=None, type=float, help="Cleanest time (default: schedule's).")
@seed_option("Noise and probe seed.")
@int_option("--batch-size", 512, 1, "JVP batch.")
@click.option(
    "--jvp",
    default="auto",
    type=click.Choice(list(get_args(JVPMode))),
    help="How the JVPs are taken (auto: the first path that works, reported; "
    "step_difference: time derivatives across one training step, for a network whose time "
    "embedding takes integer timesteps, which is refused otherwise).",
)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(dir_okay=False),
    help="Progress file (default: OUT.partial); rerunning resumes from it. An existing file "
    "that is not this run's checkpoint is refused, never overwritten.",
)
@click.option(
    "--labels",
    "labels_source",
    default=None,
    metavar="FILE",
    help="Class-conditional models: class labels of the --data points (.pt/.npy/.npz). "
    "Default: the digits labels with --data digits, each sample's own with --data self, "
    "else the null class (unconditional).",
)
@click.option(
    "--scale",
    "guidance_scale",
    default=1.0,
    type=click.FloatRange(0, None),
    help="Estimate under classifier-free guidance at this scale (a class-conditional model "
    "or text pipeline; sample with the same scale).",
)
@device_option()
@check_option()
@click.option(
    "--yes",
    is_flag=True,
    help="Run even when the projected time (printed first) exceeds one hour.",
)
def ems_command(
    model_name: str,
    out_path: str | None,
    force: bool,
    data_source: str | None,
    data_samples: int,
    labels_source: str | None,
    guidance_scale: float,
    device: str,
    checkpoint: str | None,
    yes: bool,
    check: bool,
    **options: Any,
) -> None:
    """Estimate DPM-Solver-v3's empirical model statistics (shards over torchrun ranks).

    A class-conditional model (a text pipeline: its prompts) is measured under its data's
    own labels (the conditional model, as sampled without guidance; with --scale, the
    guided model). The projected cost — JVPs and wall time, from a short calibration run on
    --device — is printed first; over one hour needs --yes.
    """
    from diffsolve.app.scale import check_device, torchrun_world
    from diffsolve.stats.ems import cost
    from diffsolve.stats.ems.compute import check_recipe, checkpoint_files, compute_ems

    with usage_errors():  # before joining the ranks: each calibrates on its own
        out = _out_path(out_path, "ems.safetensors", force)
        progress_file = _progress_file(checkpoint, out)
        model = _load(model_name, options, check_device(device))
        denoiser = _guided_for_estimation(model, guidance_scale)
        recipe = ("grid_size", "bandwidth", "t_start", "t_end")
        check_recipe(denoiser, *(options[k] for k in recipe))  # before any evaluation
        data, labels, source = _command_data(
            model, data_source, data_samples, options["seed"], guidance_scale
        )
        point_labels = _labels(labels_source, labels, data, guidance_scale, model.num_classes)
        if check:
            _quick_check(model, data, point_labels, source)
        conditioning = model.label_kwargs(point_labels)
        estimate = cost.project_cost(
            denoiser,
            data,
            device=device,
            conditioning=conditioning,
            processes=torchrun_world()[1],
            **{k: options[k] for k in ("samples", "grid_size", "batch_size", "jvp")},
            **{k: options[k] for k in ("t_start", "t_end")},
        )
    with joined() as dist:
        estimate = cost.agree(estimate)
        if dist.rank == 0:
            click.echo(f"Projected: {estimate}", err=True)
        if estimate.seconds > CONFIRM_ABOVE_S and not yes:
            raise click.UsageError(
                f"projected EMS time {cost.format_seconds(estimate.seconds)} on {device} "
                "exceeds one hour: pass --yes to run it, or lower --samples/--grid, or use a "
                "faster --device"
            )
        with usage_errors():
            ems = compute_ems(
                denoiser,
                data,
                checkpoint=progress_file,
                progress=True,
                device=device,
                conditioning=conditioning,
                model_name=model_name,
                guidance=_guidance_record(guidance_scale),
                **options,
            )
        if dist.rank == 0:
            _validate(ems, model, guidance_scale)
            with usage_errors():
                ems.save(out)
            for path in checkpoint_files(progress_file, dist.world_size):
                path.unlink(missing_ok=True)  # this run's own checkpoint, now done
            click.echo(
                f"EMS (K={options['samples']}, N={options['grid_size']}, "
                f"{dist.world_size} process(es)) → {out}"
            )


def _progress_file(checkpoint: str | None, out: Path) -> Path:
    """``ems --checkpoint`` (default ``<out>.partial``): never the result file (the run
    removes its checkpoint when done) and never inside the installed package; a file there
    that is not a diffsolve checkpoint is refused by the estimator, never overwritten."""
    from diffsolve.app.files import inside_package, remove_stale_temps
    from diffsolve.app.scale import torchrun_world
    from diffsolve.stats.ems.compute import checkpoint_files

    path = Path(checkpoint) if checkpoint else Path(f"{out}.partial")
    if inside_package(path):
        raise ValueError(
            f"--checkpoint {path} is inside the installed diffsolve package; give a path "
            f"elsewhere (default: {out}.partial)"
        )
    files = checkpoint_files(path, torchrun_world()[1])
    if out.resolve() in {p.resolve() for p in files}:
        raise ValueError(
            f"--checkpoint {path} is the --out file: the run removes its checkpoint when done, "
            f"and the result with it; give another --checkpoint (default: {out}.partial)"
        )
    for file in files:
        remove_stale_temps(file)  # a killed run's; the checkpoint itself is resumed from
    return path


def _validate(ems: Any, model: Any, scale: float) -> None:
    """v3 with the new statistics against DPM-Solver++(2M) on held-out noise
    (:mod:`diffsolve.app.ems_validation`): stored in the metadata, printed, and a loud
    warning where v3 loses."""
    from diffsolve.app.conditioning import GuidanceSpec
    from diffsolve.app.ems_validation import validate_ems
    from diffsolve.stats.ems.statistics import validation_advice

    click.echo("validating: v3 against DPM-Solver++(2M) on held-out noise ...", err=True)
    spec = GuidanceSpec("cfg" if scale != 1.0 else "none", scale)
    validation = validate_ems(model, ems, lambda labels: spec.build(model, labels))
    ems.metadata["validation"] = validation.to_metadata()
    click.echo(validation.summary(), err=True)
    if not validation.passed:
        click.secho(f"WARNING: {validation_advice(ems.metadata)}", err=True, fg="red", bold=True)


def _quick_check(
    model: Any,
    data: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    source: str = "",
) -> None:
    """:func:`~diffsolve.app.check_model.quick_check`, its verdict on stderr."""
    from diffsolve.app.check_model import quick_check

    quick_check(model, data, labels, source, say=lambda line: click.echo(line, err=True))


def _load(model_name: str, options: dict[str, Any], device: str = "cpu") -> Any:
    """The model, with the loading options of :func:`model_options` popped from ``options``."""
    from diffsolve.app.loader import load_model

    return load_model(model_name, device=device, options=load_options(options))


def _guidance_record(scale: float) -> dict[str, Any]:
    """How ``ems --scale`` guides the model, as the statistics record it."""
    return {"method": "cfg" if scale != 1.0 else "none", "scale": float(scale)}


def _guided_for_estimation(model: Any, scale: float) -> Any:
    """The denoiser statistics are estimated on: the model, or under ``--scale`` its
    classifier-free-guided network (:func:`diffsolve.app.conditioning.guided_network`)."""
    if scale == 1.0:
        return model.denoiser
    from diffsolve.app.conditioning import guided_network

    return guided_network(model, scale)


def _command_data(
    model: Any, source: str | None, samples: int, seed: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``--data`` (default: the digits for 8x8 models, else the model's own samples), its
    labels, in the model's sample space, and the source's name (for messages)."""
    from diffsolve.app.check_model import OWN_SAMPLES
    from diffsolve.app.conditioning import GuidanceSpec
    from diffsolve.app.model_data import model_data

    if source is None:
        source = "digits" if model.data_shape == (1, 8, 8) else "self"
    spec = GuidanceSpec("cfg" if scale != 1.0 else "none", scale)
    data, labels = model_data(
        model,
        source,
        samples=samples,
        seed=seed,
        denoiser_for=lambda labels: spec.build(model, labels),
        progress=True,
    )
    return data, labels, OWN_SAMPLES if source == "self" else source


@main.command("gaussian-stats")
@model_options("Model whose sample space the statistics are for (" + MODEL_HELP[7:], stats=False)
@data_option("Data in the model's sample space [default: digits for 8x8 models, else self].",
             default=None)  # fmt: skip
@seed_option("First seed of --data self.")
@click.option(
    "--rank",
    default=None,
    type=click.IntRange(1, None),
    help="Top eigenpairs to keep (default: all for small data).",
)
@out_file_option("gaussian_stats.safetensors")
def gaussian_stats_command(
    model_name: str,
    data_source: str | None,
    data_samples: int,
    seed: int,
    rank: int | None,
    out_path: str | None,
    force: bool,
    **options: Any,
) -> None:
    """Mean and top eigenpairs of a data set (float64), for analytic teleportation."""
    from diffsolve.stats.gaussian import compute_gaussian_stats

    with usage_errors():
        out = _out_path(out_path, "gaussian_stats.safetensors", force)
        model = _load(model_name, options)
        data, _, source = _command_data(model, data_source, data_samples, seed)
        stats = compute_gaussian_stats(
            data, rank, description=f"{source} data for model {model_name}"
        )
        stats.save(out)
    click.echo(f"Gaussian statistics of {data.shape[0]} samples → {out}")


# ---------------------------------------------------------------------------------------
# Inputs of the statistics commands
def _out_path(out_path: str | None, name: str, force: bool) -> Path:
    """``--out`` (default ``./<name>``) of a statistics or tune command
    (:func:`~diffsolve.app.files.check_output`): never inside the installed package, and an
    existing file only with ``--force`` (a rerun does not replace an earlier result)."""
    from diffsolve.app.files import check_output

    out = Path(out_path) if out_path else Path.cwd() / name
    return check_output(out, "--out", force=force, replace_own=False, example=name)


def _labels(
    source: str | None,
    data_labels: torch.Tensor | None,
    data: torch.Tensor,
    scale: float = 1.0,
    classes: int | None = None,
) -> torch.Tensor | None:
    """``--labels``: a file, else the labels the data came with (the digits', or each own
    sample's label or prompt); guided statistics (``--scale``) need them. A file for a
    model without classes (``classes``) is refused, not ignored."""
    from diffsolve.app.model_data import load_array

    labels = data_labels
    if source is not None and not classes:
        raise ValueError(
            "--labels: this model is not class-conditional, so labels would be ignored; "
            "drop --labels"
        )
    if source is not None:
        if not Path(source).is_file():
            raise ValueError(f"--labels: {source!r} is not an existing file")
        labels = load_array(source, "--labels").long()
    if labels is not None and labels.shape[:1] != data.shape[:1]:
        raise ValueError(f"--labels: {labels.shape[0]} labels for {data.shape[0]} data points")
    if scale != 1.0 and labels is None:
        raise ValueError(
            "--scale: guided statistics need each data point's label or prompt; give "
            "--labels FILE, or --data digits / self (which come with theirs)"
        )
    return labels


if __name__ == "__main__":  # pragma: no cover
    main()
