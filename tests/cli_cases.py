"""Generated ``diffsolve`` invocations over every command and option, and what each must
leave behind (a helper module of ``tests/test_cli_properties.py``, not a test module).

:func:`make_world` builds the working folder a user would have — their own files (notes, a
picture and an array in ``mine/``, a JSON and a PNG that diffsolve did not make, a
``.tmp`` file next to an output name, another run's shard without its manifest), input
files (data, labels, prompts, a scheduler config, statistics, a teleporting step schedule,
an image folder) — and the models: the demos, a diffusers pipeline folder and a ``.py``
entry point. :func:`draw_case` draws one invocation: a command, a value (valid or not) for
any of its options, sometimes a broken torchrun environment, and the paths it may write
(``--out``, ``--json``, ``--plot``, ``--checkpoint`` or their defaults). :func:`check_case`
classifies the result: ran (exit 0 with a complete result), refused (a one-line error), or
a problem — a traceback, a hang, a multi-line error, an incomplete result, a file outside
the outputs created, changed or removed, a user's file replaced without ``--force``, a
temporary file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

import diffsolve
from diffsolve.app.cli import main
from diffsolve.app.files import made_by_diffsolve
from diffsolve.app.loader import demo_path

PACKAGE = Path(diffsolve.__file__).resolve().parent
DEMOS = ["gaussian", "gmm", "digits", "digits-cond", "digits-flow", "digits-diffusers"]
#: ``--out``/``--json``/``--plot`` values that name files the user made (or the package).
PKG = "<package>"


@dataclass
class World:
    """The working folder, the models and the user's files (byte contents)."""

    root: Path
    models: dict[str, str]
    user_files: dict[Path, bytes] = field(default_factory=dict)
    watched: list[Path] = field(default_factory=list)
    fresh: int = 0


@dataclass
class Case:
    """One invocation: its arguments, environment, targets (paths it may write) and what
    a complete result is."""

    command: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    targets: list[Path] = field(default_factory=list)
    force: bool = False
    result: dict[str, Path] = field(default_factory=dict)
    merge: bool = True


# ---------------------------------------------------------------------------------------
# The world
def make_world(root: Path, models: dict[str, str], scratch: Path) -> World:
    """The working folder with the user's files and inputs (see the module docstring);
    ``scratch`` (outside it) holds the runs that made some of them."""
    from click.testing import CliRunner

    root.mkdir(parents=True, exist_ok=True)
    runner = CliRunner()
    run = ["sample", "--model", "gaussian", "--seeds", "0-3", "--out", str(scratch / "a")]
    tune = ["tune", "--model", "gaussian", "--teleport", "--solver", "dpm-solver++-2m"]
    tune += ["--nfe", "4", "--candidates", "10", "--teacher-steps", "20", "--trajectories", "4"]
    for args in (run, [*tune, "--out", str(scratch / "tel.json")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    gen = np.random.default_rng(0)
    files: dict[str, bytes] = {
        "notes.txt": b"my notes",
        "mine/grid.png": b"pic",
        "mine/samples.npz": b"arr",
        "res.json": b"mine",
        "res.png": b"\x89PNG\r\n\x1a\nnot diffsolve's",
        "e.safetensors.tmp": b"notes",
        "prompts.txt": b"a red cat\na dog\n",
        "bad.npz": b"PK\x03\x04 garbage",
        "foreign/shard-00000000.npz": (scratch / "a" / "shard-00000000.npz").read_bytes(),
        "gs.safetensors": (demo_path("gaussian") / "gaussian_stats.safetensors").read_bytes(),
        "ems-g.safetensors": (demo_path("gaussian") / "ems.safetensors").read_bytes(),
        "tel.json": (scratch / "tel.json").read_bytes(),
        "sched.json": (Path(models["ddpm"]) / "scheduler" / "scheduler_config.json").read_bytes(),
    }
    _arrays(root, gen)
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    inputs = ("data.npy", "labels.npy", "imgs/0.png", "imgs/1.png", "imgs/2.png")
    user = {root / n: (root / n).read_bytes() for n in [*files, *inputs]}
    watched = [root, PACKAGE, *(Path(m.split(":")[0]).parent for m in models.values())]
    return World(root, models, user, watched)


def _arrays(root: Path, gen: np.random.Generator) -> None:
    """8x8 data in [-1, 1] with labels, and a folder of three 8x8 images."""
    from PIL import Image

    data = gen.uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32)
    np.save(root / "data.npy", data)
    np.save(root / "labels.npy", gen.integers(0, 10, 16))
    (root / "imgs").mkdir(exist_ok=True)
    for i in range(3):
        pixels = gen.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(root / "imgs" / f"{i}.png")


# ---------------------------------------------------------------------------------------
# Drawing invocations
@dataclass(frozen=True)
class B:
    """A value the command must refuse: never drawn in a clean case, now and then (each
    pick, one in :data:`BAD_ODDS`) in the others."""

    value: Any


#: Whether the case being drawn is clean (no value it must refuse).
_CLEAN = [False]
BAD_ODDS = 10
#: Demos with the VP schedule of the shipped digits classifier (and 1x8x8 samples).
VP_DIGITS = {"gaussian", "gmm", "digits", "digits-cond", "digits-diffusers"}
#: Models with Gaussian statistics (their own, or the user's gs.safetensors fits them).
TELEPORTS = {"gaussian", "gmm", "digits", "digits-cond", "digits-flow", "digits-diffusers"}


def _pick(data: Any, pool: list[Any]) -> Any:
    bad = any(isinstance(v, B) for v in pool)
    if bad and (_CLEAN[0] or data.draw(st.integers(0, BAD_ODDS - 1)) != 0):
        pool = [v for v in pool if not isinstance(v, B)] or [None]
    value = data.draw(st.sampled_from(pool))
    return value.value if isinstance(value, B) else value


def _opt(data: Any, args: list[str], flag: str, pool: list[Any]) -> Any:
    """Draw ``flag``'s value from ``pool`` (``None``/``False``: leave the option out)."""
    value = _pick(data, pool)
    if value is True:
        args.append(flag)
    elif value is not None and value is not False:
        args += [flag, str(value)]
    return value


def _only(fits: bool, pool: list[Any]) -> list[Any]:
    """``pool`` where the option fits the case, else its values as ones to refuse."""
    refused = (v if isinstance(v, B) else B(v) for v in pool if v is not None)
    return pool if fits else [None, *refused]


def _choices(command: str, flag: str) -> list[str]:
    """The declared choices of a command's option (new choices are drawn too)."""
    param = next(p for p in main.commands[command].params if flag in p.opts)
    return list(param.type.choices)  # type: ignore[attr-defined]


def _path(world: World, name: str | None) -> str | None:
    """An output name as given on the command line: relative to the working folder, a
    fresh name, or inside the package."""
    if name is None:
        return None
    if name == PKG:
        return str(PACKAGE / "demos" / "digits" / "out.x")
    if name.startswith("fresh"):
        world.fresh += 1
        return f"{name}-{world.fresh}"
    return name


def _target(world: World, case: Case, value: str | None, default: str | None) -> Path | None:
    name = value if value is not None else default
    if name is None:
        return None
    path = Path(name) if Path(name).is_absolute() else world.root / name
    case.targets.append(path)
    return path


def _model(data: Any, world: World, case: Case, pool: list[str], stats: bool) -> str:
    """``--model`` and how to read it (options that do not fit the model: to refuse)."""
    model = _pick(data, pool)
    case.args += ["--model", world.models.get(model, model)] if model else []
    a, folder = case.args, model == "ddpm"
    _opt(data, a, "--prediction", [None] * 12 + _only(folder, ["epsilon"]) + [B("flow")])
    _opt(data, a, "--scheduler-config", [None] * 12 + _only(folder, ["sched.json"]))
    _opt(data, a, "--shape", [None] * 12 + _only(model == "py", ["1,4,4"]) + [B("0,2"), B("x")])
    for flag, value in (("--prompt", "a red cat"), ("--prompts", "prompts.txt")):
        _opt(data, a, flag, [None] * 12 + [B(value)])  # no text pipeline among the models
    _opt(data, a, "--negative-prompt", [None] * 20 + [B("blurry")])
    _opt(data, a, "--height", [None] * 20 + [B(16), B(7)])
    _opt(data, a, "--width", [None] * 20 + [B(16)])
    if stats:
        _opt(data, a, "--ems", [None] * 20 + [B("notes.txt"), B("none.st")])
        _opt(data, a, "--gaussian-stats", [None] * 20 + [B("notes.txt")])
    return model


def _env(data: Any) -> dict[str, str]:
    bad = [B({"WORLD_SIZE": "abc"}), B({"WORLD_SIZE": "2"}), B({"WORLD_SIZE": "2", "RANK": "7"})]
    return _pick(data, [{}] * 8 + [{"WORLD_SIZE": "1"}, *bad]) or {}


def _device(data: Any, args: list[str]) -> None:
    _opt(data, args, "--device", [None] * 8 + ["cpu", B("meta"), B("cuda:7"), B("bogus")])


def draw_sample(data: Any, world: World) -> Case:
    case = Case("sample", ["sample"], env=_env(data))
    models = [*DEMOS, "gaussian", "digits", "ddpm", "py", B("no-such-model")]
    model = _model(data, world, case, models, False)
    a = case.args
    scheduled = _opt(data, a, "--schedule", [None] * 6 + _only(model == "gaussian", ["tel.json"]))
    free = scheduled is None
    solver = _opt(data, a, "--solver", _only(free, [None, None, *_choices("sample", "--solver")]))
    _opt(data, a, "--nfe", [*_only(free, [None, 2, 3, 4, 5, 8]), B(1)])
    _opt(data, a, "--grid", [None] * 6 + _only(free, _choices("sample", "--grid")))
    seeds = [None, "0", "0-3", "3,5", "0-7", "0-3", B("a-b"), B("5-2"), B("-1")]
    _opt(data, a, "--seeds", seeds)
    _opt(data, a, "--batch-size", [None, None, 1, 2, 3, B(0)])
    _opt(data, a, "--shard-size", [None, None, 1, 2, 4, B(0)])
    merge = _pick(data, [None, None, "--merge", "--no-merge"])
    a += [merge] if merge else []
    case.merge = merge != "--no-merge"
    _device(data, a)
    guidance = _opt(
        data,
        a,
        "--guidance",
        [
            None,
            None,
            "none",
            *_only(model == "digits-cond", ["cfg", "apg"]),
            *_only(model in VP_DIGITS, ["classifier"]),
        ],
    )
    guided = guidance not in (None, "none")
    _opt(data, a, "--scale", [None, None, 1, *_only(guided, [2.5, 0]), B("-1"), B("nan")])
    _opt(data, a, "--threshold", [None] * 6 + [0.995, 1, B(0), B(1.5)])
    _opt(data, a, "--dualfast", [None] * 6 + [0, 0.5, B("nan")])
    labelled = model == "digits-cond" or guidance == "classifier"
    _opt(data, a, "--label", [None] * 4 + _only(labelled, [0, 3]) + [B(12), B(-1)])
    teleport = _opt(
        data, a, "--teleport", [None] * 4 + _only(free and model in TELEPORTS, [0.3]) + [B(1.0)]
    )
    stats = bool(teleport) and model in ("gaussian", "gmm", "digits", "digits-cond")
    _opt(data, a, "--gaussian-stats", [None] * 6 + _only(stats, ["gs.safetensors"]))
    v3 = solver == "dpm-solver-v3" and model == "gaussian"
    _opt(data, a, "--ems", [None] * 6 + _only(v3, ["ems-g.safetensors"]))
    _opt(data, a, "--tuned-schedule", [None] * 6 + [True])
    _opt(data, a, "--no-tuned-schedule", [None] * 6 + [True])
    names = [None, "run", "run2", "fresh", "fresh", "fresh", B("mine"), B("foreign")]
    out = _path(world, _pick(data, [*names, B("notes.txt"), B(PKG)]))
    a += ["--out", out] if out else []
    case.result["out"] = _target(world, case, out, "samples")  # type: ignore[assignment]
    return case


def _file_out(data: Any, world: World, case: Case, default: str, names: list[Any]) -> Path:
    """``--force`` and ``--out`` of a one-file command: mostly fresh names (an existing
    file is refused without ``--force``)."""
    case.force = bool(_opt(data, case.args, "--force", [None, None, True]))
    out = _path(world, _pick(data, [None, *names, B("notes.txt"), B("imgs"), B(PKG)]))
    case.args += ["--out", out] if out else []
    return _target(world, case, out, default)  # type: ignore[return-value]


def draw_ems(data: Any, world: World) -> Case:
    case = Case("ems", ["ems"], env=_env(data))
    model = _model(data, world, case, ["gaussian", "gmm", "py", "py", "digits", "ddpm"], False)
    a = case.args
    _opt(data, a, "--samples", [2, 2, 3, B(1)])
    _opt(data, a, "--grid", [4, 8, 8, B(1)])
    _opt(data, a, "--bandwidth", [0, 0, 0, B(None), B(0.5), B("nan"), B("inf"), B(-1)])
    eight = model not in ("py", "ddpm")
    sources = [None, "self", "self", *_only(eight, ["digits", "data.npy", "imgs"])]
    _opt(data, a, "--data", [*sources, B("bad.npz")])
    _opt(data, a, "--data-samples", [4, 8, B(1)])
    _opt(data, a, "--t-start", [None] * 8 + [0.9, B(2.0), B("nan")])
    _opt(data, a, "--t-end", [None] * 8 + [0.01, B(-1)])
    _opt(data, a, "--seed", [None, None, 0, 3])
    _opt(data, a, "--batch-size", [None, None, 2, B(0)])
    _opt(data, a, "--jvp", [None] * 12 + _choices("ems", "--jvp"))
    _opt(data, a, "--labels", [None] * 8 + [B("labels.npy"), B("missing.npy")])
    _opt(data, a, "--scale", [None] * 6 + [1, B(2)])
    _device(data, a)
    _opt(data, a, "--no-check", [None, True])
    _opt(data, a, "--yes", [None, True])
    names = ["e.safetensors", "fresh.st", "fresh.st", B("gs.safetensors"), B("mine")]
    case.result["ems"] = result = _file_out(data, world, case, "ems.safetensors", names)
    checkpoints = [None] * 6 + ["ck.partial", B("notes.txt"), B("e.safetensors"), B(PKG)]
    ckpt = _path(world, _pick(data, checkpoints))
    a += ["--checkpoint", ckpt] if ckpt else []
    _target(world, case, ckpt, f"{result}.partial")
    return case


def draw_gaussian_stats(data: Any, world: World) -> Case:
    case = Case("gaussian-stats", ["gaussian-stats"])
    model = _model(data, world, case, [*DEMOS, "ddpm", "py", B("no-such-model")], False)
    a = case.args
    eight = model not in ("py", "ddpm")
    sources = [None, None, "self", *_only(eight, ["digits", "data.npy", "imgs"])]
    _opt(data, a, "--data", [*sources, B("bad.npz")])
    _opt(data, a, "--data-samples", [4, 8, 16, B(1)])
    _opt(data, a, "--seed", [None, None, 2])
    _opt(data, a, "--rank", [None, None, 1, 3, B(0)])
    names = ["g.safetensors", "fresh.st", "fresh.st", B("gs.safetensors")]
    out = _file_out(data, world, case, "gaussian_stats.safetensors", names)
    case.result["stats"] = out
    return case


def draw_tune(data: Any, world: World) -> Case:
    case = Case("tune", ["tune"])
    _model(data, world, case, ["gaussian", "gaussian", "gmm", "digits", "py", "ddpm"], False)
    a = case.args
    methods = _choices("tune", "--method")
    method = _opt(data, a, "--method", [None, "dp", "dp", *methods, B("nope")]) or "dp"
    steps = method in ("dp", "search")
    solvers = ["ddim", "dpm-solver++-2m", "unipc-bh2-3", "dpm-solver-v3"]
    _opt(data, a, "--solver", [None, *_only(steps, solvers), B("heun"), B("nope")])
    _opt(data, a, "--nfe", [2, 3, 4, B(1)])
    _opt(data, a, "--cost", [None, None, *_only(steps, _choices("tune", "--cost"))])
    _opt(data, a, "--teleport", [None] * 4 + [True])
    _opt(data, a, "--no-teleport", [None] * 4 + [True])
    _opt(data, a, "--trajectories", [2, 4, B(0)])
    _opt(data, a, "--candidates", [*_only(steps, [6, 10]), B(2)])
    _opt(data, a, "--teacher-steps", [10, 20, B(1)])
    _opt(data, a, "--budget", [None] * 4 + _only(method == "search", [5, 50]))
    _opt(data, a, "--seed", [None, None, 1])
    _device(data, a)
    _opt(data, a, "--no-check", [None, True, True])
    _extra_tune_options(data, a, method)
    names = ["t.json", "fresh.json", "fresh.json", B("res.json")]
    case.result["json"] = _file_out(data, world, case, "schedule.json", names)
    return case


#: ``tune``'s options of the step-schedule methods (others get small values, see below).
_TUNE_KNOWN = {"--model", "--prediction", "--scheduler-config", "--shape", "--prompt"}
_TUNE_KNOWN |= {"--prompts", "--negative-prompt", "--height", "--width", "--ems", "--force"}
_TUNE_KNOWN |= {"--gaussian-stats", "--solver", "--nfe", "--method", "--cost", "--teleport"}
_TUNE_KNOWN |= {"--trajectories", "--candidates", "--teacher-steps", "--budget", "--seed"}
_TUNE_KNOWN |= {"--device", "--check", "--out"}


def _extra_tune_options(data: Any, args: list[str], method: str) -> None:
    """Options of ``tune`` beyond the step-schedule ones (the solver-schedule search's),
    each given now and then with a small value (refused with the other methods)."""
    other = method not in ("dp", "search")
    for param in main.commands["tune"].params:
        flag = param.opts[0]
        if flag in _TUNE_KNOWN:
            continue
        if getattr(param, "is_flag", False):
            _opt(data, args, flag, [None] * 5 + _only(other, [True]))
        elif hasattr(param.type, "choices"):
            _opt(data, args, flag, [None] * 5 + _only(other, list(param.type.choices)))
        else:
            _opt(data, args, flag, [None] * 5 + _only(other, [2]) + [B("x")])


_MODES = {
    "solvers": {"--no-overhead", "--data", "--json", "--plot", "--reference-steps"},
    "teleport": {"--skips", "--json", "--reference-steps"},
    "guidance": {"--methods", "--scales", "--json"},
    "inversion": {"--json"},
    "scale": {"--shapes", "--json", "--plot"},
}


def draw_bench(data: Any, world: World) -> Case:
    case = Case("bench", ["bench"])
    mode = _pick(data, ["solvers"] * 4 + ["teleport", "guidance", "inversion", "scale"])
    cheap = ["gaussian", "gmm", "py"]
    models = {
        "solvers": [*cheap, *cheap, *DEMOS[2:], "ddpm", B("no-such-model")],
        "teleport": ["gaussian", "gmm", "digits", B("py")],
        "guidance": ["digits-cond", "digits-cond", B("digits"), B("gaussian")],
        "inversion": ["digits", "digits-flow", "gaussian", B("py")],
        "scale": [None, B("gaussian")],
    }
    model = _model(data, world, case, models[mode], False)
    a, uses = case.args, _MODES[mode]
    if mode in ("teleport", "guidance", "inversion"):
        a += ["--sweep", mode]
    elif mode == "scale":
        a += ["--profile", "scale", "--no-end-to-end"]
        _opt(data, a, "--shapes", ["1x1x8x8", "2x1x4x4", B("bad")])
    else:
        _opt(data, a, "--profile", [None] * 4 + ["solvers"])
    _bench_common(data, a, mode, model)
    _opt(data, a, "--no-overhead", _only("--no-overhead" in uses, [True] * 6 + [None]))
    _opt(data, a, "--skips", [None] * 3 + _only("--skips" in uses, ["0,0.2", "0.5"]) + [B("x")])
    guided = mode == "guidance" and model == "digits-cond"
    _opt(data, a, "--methods", [None] * 3 + _only(guided, ["cfg", "cfg,apg"]) + [B("bogus")])
    _opt(data, a, "--scales", [None] * 3 + _only("--scales" in uses, ["1,2"]) + [B("x")])
    case.force = bool(_opt(data, a, "--force", [None, None, None, True]))
    names = ["b.json", "fresh.json", B("res.json"), B("notes.txt"), B("res.png"), B(PKG)]
    out = _path(world, _pick(data, [None, None, *_only("--json" in uses, names)]))
    a += ["--json", out] if out else []
    case.result["bench-json"] = _target(world, case, out, None)  # type: ignore[assignment]
    plots = ["b.png", "fresh.png", B("res.png"), B("b.json"), B(PKG)]
    plot = _path(world, _pick(data, [None, None, *_only("--plot" in uses, plots)]))
    a += ["--plot", plot] if plot else []
    case.result["png"] = _target(world, case, plot, None)  # type: ignore[assignment]
    return case


def _bench_common(data: Any, a: list[str], mode: str, model: str) -> None:
    """``bench``'s NFE, solvers, samples, seed, reference, data, device, check options."""
    scale = mode == "scale"
    _opt(data, a, "--nfe", [*_only(not scale, ["3", "3,4", "5"]), B("x"), B("1")])
    solvers = ["ddim", "ddim,unipc-bh2-3", "dpm-solver++-2m@diffusers-grid", "diffusers:dpm-2m"]
    own = [None, "ddim", "ddim,unipc-bh2-3"] if mode in ("guidance", "inversion") else solvers
    _opt(data, a, "--solvers", [*_only(not scale, own), B("nope")])
    _opt(data, a, "--samples", [*_only(not scale, [4, 4, 8]), B(1)])
    _opt(data, a, "--seed", [None, None, *_only(not scale, [5])])
    reference = mode in ("solvers", "teleport")
    _opt(data, a, "--reference-steps", [*_only(reference, [50, 50]), B(10)])
    eight = mode == "solvers" and model not in ("py", "ddpm")
    _opt(data, a, "--data", [None] * 6 + _only(eight, ["digits", "data.npy"]) + [B("bad.npz")])
    _device(data, a)
    _opt(data, a, "--no-check", [None, *_only(mode == "solvers", [True, True])])


def draw_check_model(data: Any, world: World) -> Case:
    case = Case("check-model", ["check-model"])
    nets = ["digits", "digits-cond", "digits-flow", "digits-diffusers", "ddpm", "py"]
    model = _model(data, world, case, [*nets, B("gaussian"), B("no-such-model")], False)
    eight = model not in ("py", "ddpm")
    sources = [None, None, *_only(eight, ["digits", "data.npy", "imgs"]), B("bad.npz")]
    _opt(data, case.args, "--data", sources)
    _opt(data, case.args, "--data-samples", [4, 8, B(1)])
    _opt(data, case.args, "--seed", [None, 3])
    _device(data, case.args)
    return case


def draw_merge(data: Any, world: World) -> Case:
    case = Case("merge", ["merge"])
    outs = [None, "run", "run2", B("mine"), B("foreign"), B("missing"), B("notes.txt")]
    out = _pick(data, outs)
    case.args += ["--out", out] if out else []
    case.result["merged"] = _target(world, case, out, "samples")  # type: ignore[assignment]
    return case


COMMANDS = {
    "sample": (draw_sample, 30),
    "bench": (draw_bench, 20),
    "tune": (draw_tune, 12),
    "ems": (draw_ems, 7),
    "gaussian-stats": (draw_gaussian_stats, 10),
    "check-model": (draw_check_model, 5),
    "merge": (draw_merge, 6),
    "solvers": (lambda data, world: Case("solvers", ["solvers"]), 1),
}


def draw_case(data: Any, world: World) -> Case:
    """One invocation (commands weighted by how much they do); about half of them leave
    out the values a command must refuse (:class:`B`)."""
    _CLEAN[0] = False
    names = [name for name, (_, weight) in COMMANDS.items() for _ in range(weight)]
    command = _pick(data, names)
    _CLEAN[0] = data.draw(st.booleans())
    try:
        case = COMMANDS[command][0](data, world)
    finally:
        _CLEAN[0] = False
    return case


# ---------------------------------------------------------------------------------------
# Snapshots and checks
def snapshot(folders: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every file and folder under ``folders`` — ``__pycache__`` and the package's ``.py``
    sources aside (Python's and the developers', not a command's) — as size, mtime, inode."""
    out: dict[str, tuple[int, ...]] = {}
    for folder in folders:
        for base, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out[base] = (-1,)
            for name in names:
                if name.endswith(".py") and folder == PACKAGE:
                    continue
                stat = os.lstat(os.path.join(base, name))
                out[os.path.join(base, name)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return out


def _allowed(path: Path, targets: list[Path]) -> bool:
    """Inside an output, an output itself, or a folder on the way to one."""
    return any(path == t or path.is_relative_to(t) or t.is_relative_to(path) for t in targets)


def file_problems(
    world: World, case: Case, before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]
) -> list[str]:
    """Files outside the case's outputs that changed; the user's files replaced without
    ``--force``; temporary files left behind."""
    targets = [t.resolve() for t in case.targets]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    outside = [k for k in sorted(changed) if not _allowed(Path(k).resolve(), targets)]
    problems = [f"touched {k}" for k in outside]
    for path, content in list(world.user_files.items()):
        intact = path.is_file() and path.read_bytes() == content
        if intact:
            continue
        if case.force and path.resolve() in targets:
            del world.user_files[path]  # replaced on purpose: diffsolve's from now on
        else:
            problems.append(f"user file {path.name} replaced or removed")
    problems += [f"left {p}" for p in world.root.rglob("*.diffsolve-*.tmp")]
    return problems


def result_problems(case: Case, output: str) -> list[str]:
    """What is missing from a run that exited 0."""
    try:
        return _missing(case, output)
    except Exception as err:  # any unreadable result is incomplete
        return [f"incomplete result: {type(err).__name__}: {err}"]


def _missing(case: Case, output: str) -> list[str]:
    from diffsolve import load_ems
    from diffsolve.app.scale import read_manifest
    from diffsolve.stats.gaussian import load_gaussian_stats

    result, problems = case.result, []
    if case.command == "sample":
        manifest = read_manifest(result["out"])
        assert manifest is not None, "no manifest"
        if case.merge:
            with np.load(result["out"] / "samples.npz") as data:
                assert np.isfinite(data["samples"]).all()
                assert data["seeds"].size == manifest.num_seeds
    elif case.command == "ems":
        import warnings

        with warnings.catch_warnings():  # tiny statistics lose to DPM-Solver++: as the run said
            warnings.simplefilter("ignore")
            load_ems(result["ems"])
    elif case.command == "gaussian-stats":
        load_gaussian_stats(result["stats"])
    elif case.command == "tune":
        assert json.loads(result["json"].read_text())["format"].startswith("diffsolve")
    elif case.command == "bench":
        if result.get("bench-json"):
            assert json.loads(result["bench-json"].read_text())["format"].startswith("diffsolve")
        if result.get("png"):
            assert made_by_diffsolve(result["png"]), "plot without diffsolve's marker"
    elif case.command == "merge":
        assert (result["merged"] / "samples.npz").is_file()
    elif not output.strip():
        problems.append("no output")
    return problems


def clean_fresh(world: World, case: Case) -> None:
    """Remove a case's outputs with fresh names (they are never reused)."""
    for target in case.targets:
        if target.name.startswith("fresh") and target.parent == world.root:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def small_validation(monkeypatch: Any) -> None:
    """``diffsolve ems`` validates its statistics on 256 held-out samples against a
    100-step reference; for generated cases 16 samples and 20 steps do."""
    import functools

    from diffsolve.app import ems_validation

    fast = functools.partial(ems_validation.validate_ems, samples=16, reference_steps=20)
    monkeypatch.setattr(ems_validation, "validate_ems", fast)
    torch.set_num_threads(1)
