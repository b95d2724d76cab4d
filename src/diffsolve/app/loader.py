"""Loading models: one loader for every ``--model`` a command takes.

:func:`load_model` resolves, to one :class:`LoadedModel` whose :attr:`~LoadedModel.denoiser`
every solver can drive:

* a **demo name** (``digits``, ``digits-cond``, ``digits-flow``: shipped folders;
  ``gaussian``, ``gmm``: analytic models fitted to the digits training split, with exact
  denoisers and no training);
* a **diffsolve model folder**: ``config.json`` (network, schedule, prediction type, time
  input, data shape, conditioning) and ``model.safetensors``;
* a **diffusers folder**: a pipeline (``model_index.json``; SD 1.x/2.x, SDXL, SD3, Flux,
  DDPM) or a bare model folder with ``scheduler_config.json`` beside it
  (:mod:`diffsolve.app.diffusers_models`), its conventions read from the scheduler config;
* a **Python entry point** ``path/to/file.py:NAME`` or ``package.module:NAME`` whose
  ``NAME()`` returns a :class:`~diffsolve.ModelWrapper` with its ``data_shape``
  (:mod:`diffsolve.app.entry_points`).

:class:`LoadOptions` carries what a command line may override or add: the prediction type,
the scheduler config, the sample shape, the image size and prompts of a text pipeline, and
the statistics files (EMS, Gaussian statistics) to use instead of the model folder's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsolve.ode.model import Denoiser, ModelWrapper, network_fingerprint, normalize_prediction
from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete, schedule_from_config
from diffsolve.solvers.registry import NEEDS, SolverContext
from diffsolve.stats.ems import EMS, load_ems, model_fingerprint
from diffsolve.stats.gaussian import GaussianMixtureModel, GaussianModel, load_gaussian_stats

DEMO_DIR = Path(__file__).resolve().parents[1] / "demos"
TRAINED_DEMOS = ("digits", "digits-cond", "digits-flow")
#: ``digits`` converted to diffusers' pipeline format (a diffusers folder, by name).
DIFFUSERS_DEMOS = ("digits-diffusers",)
ANALYTIC_DEMOS = ("gaussian", "gmm")
DEMO_MODELS = TRAINED_DEMOS + ANALYTIC_DEMOS
EMS_NAME = "ems.safetensors"
GAUSSIAN_NAME = "gaussian_stats.safetensors"


@dataclass(frozen=True)
class LoadOptions:
    """What a command may override or add when it loads a model (all optional).

    Attributes:
        prediction: The network's prediction type instead of the declared one.
        scheduler_config: A diffusers ``scheduler_config.json`` instead of the folder's.
        shape: The sample shape ``(C, H, W)`` instead of the model's ``data_shape``.
        height, width: Image size of a text pipeline (sets its latent shape).
        prompts: Prompts of a text pipeline: sample ``i`` takes prompt ``i mod P`` (they are
            its "classes"); default: the empty prompt.
        negative_prompt: The unconditional branch of classifier-free guidance (the null
            class).
        ems: DPM-Solver-v3's statistics file instead of ``<folder>/ems.safetensors``.
        gaussian_stats: Gaussian statistics instead of ``<folder>/gaussian_stats.safetensors``.
    """

    prediction: str | None = None
    scheduler_config: str | Path | None = None
    shape: tuple[int, ...] | None = None
    height: int | None = None
    width: int | None = None
    prompts: tuple[str, ...] | None = None
    negative_prompt: str = ""
    ems: str | Path | None = None
    gaussian_stats: str | Path | None = None


@dataclass
class LoadedModel:
    """A model ready for sampling.

    Attributes:
        name: Demo name, folder path or entry point, as given.
        denoiser: The unconditional (or null-class) denoiser.
        schedule: Its noise schedule.
        data_shape: Shape of one sample, e.g. ``(1, 8, 8)`` or SD's latents ``(4, 64, 64)``.
        config: The parsed ``config.json`` (other sources: a synthetic config describing
            the model, hashed into the run fingerprint).
        network: The ``nn.Module`` (``None`` for analytic models).
        num_classes: Number of classes of a class-conditional model (a text pipeline: the
            number of prompts).
        analytic: The analytic data model (``gaussian`` / ``gmm``), if any.
        folder: The model folder (demo models included; an entry point's: its file's).
        device: Where the network runs (DPM-Solver-v3 builds its plan there).
        source: ``"demo"``, ``"folder"``, ``"diffusers"``, ``"entry-point"`` or
            ``"analytic"``.
        weight_files: The files whose bytes define the network (the run fingerprint).
        identity: Fingerprints that are not files (an entry point's parameters).
        ems_file, gaussian_file: Statistics files given instead of the folder's.
        scheduler_config: A diffusers model's scheduler config (the bench builds its
            diffusers contestants from it).
        decode: Samples → images in ``[-1, 1]`` (a latent model's VAE); ``None``: the samples
            are images themselves where they have 1 or 3 channels.
        encode: Images in ``[-1, 1]`` → samples (a latent model's VAE).
        prompts: A text pipeline's prompts (sample ``i``: prompt ``i mod P``).
        negative_prompt: Its null class (the unconditional branch of guidance).
        image_size: ``(height, width)`` of a latent model's images.
    """

    name: str
    denoiser: Denoiser
    schedule: NoiseSchedule
    data_shape: tuple[int, ...]
    config: dict[str, Any]
    network: nn.Module | None = None
    num_classes: int | None = None
    analytic: GaussianModel | GaussianMixtureModel | None = field(default=None, repr=False)
    folder: Path | None = None
    device: str = "cpu"
    source: str = "folder"
    weight_files: tuple[Path, ...] = ()
    identity: dict[str, str] = field(default_factory=dict)
    ems_file: Path | None = None
    gaussian_file: Path | None = None
    scheduler_config: dict[str, Any] | None = field(default=None, repr=False)
    decode: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    encode: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    prompts: tuple[str, ...] = ()
    negative_prompt: str | None = None
    image_size: tuple[int, int] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of its images: a latent model's decoded RGB images, else the samples'."""
        if self.image_size is not None:
            return (3, *self.image_size)
        return self.data_shape

    @property
    def ems_path(self) -> Path | None:
        """Where this model's DPM-Solver-v3 statistics live: the file given (``--ems``),
        else ``<folder>/ems.safetensors``."""
        if self.ems_file is not None:
            return self.ems_file
        return None if self.folder is None else self.folder / EMS_NAME

    @property
    def gaussian_stats_path(self) -> Path | None:
        """Where the Gaussian statistics of its data live: the file given
        (``--gaussian-stats``), else ``<folder>/gaussian_stats.safetensors``."""
        if self.gaussian_file is not None:
            return self.gaussian_file
        return None if self.folder is None else self.folder / GAUSSIAN_NAME

    @property
    def has_ems(self) -> bool:
        """Whether the model has an EMS file."""
        return self.ems_path is not None and self.ems_path.is_file()

    @property
    def is_text(self) -> bool:
        """Whether it is a text-conditioned pipeline (prompts are its classes)."""
        return self.negative_prompt is not None

    def available(self) -> frozenset[str]:
        """What the model can give solvers (see
        :class:`~diffsolve.solvers.registry.SolverContext`): ``"ems"``, ``"gaussian"``."""
        files = {"ems": self.ems_path, "gaussian": self.gaussian_stats_path}
        return frozenset(k for k, path in files.items() if path is not None and path.is_file())

    def images(self, samples: Tensor) -> Tensor | None:
        """Samples as images in ``[-1, 1]`` (decoded by the VAE of a latent model), or
        ``None`` where they are not images."""
        if self.decode is not None:
            return torch.cat([self.decode(chunk).cpu() for chunk in samples.split(8)])
        from diffsolve.app.images import image_samples

        return image_samples(samples)

    def inputs(self) -> dict[str, str]:
        """SHA-256 of what defines the network: its weight files (one hash over all of
        them), and the fingerprints of :attr:`identity`; an analytic model's own."""
        from diffsolve.app.files import file_sha256

        out = dict(self.identity)
        hashes = [(path.name, file_sha256(path)) for path in self.weight_files]
        if len(hashes) == 1:
            out["weights"] = hashes[0][1]
        elif hashes:
            text = "".join(f"{name}:{sha}\n" for name, sha in hashes)
            out["weights"] = hashlib.sha256(text.encode()).hexdigest()
        if self.analytic is not None:
            out["analytic"] = self.analytic.fingerprint()
        return out

    def load_ems(self, path: str | Path | None = None) -> EMS:
        """Load and check the model's EMS (default: :attr:`ems_path`)."""
        target = Path(path) if path is not None else self.ems_path
        if target is None or not target.is_file():
            raise ValueError(
                f"model {self.name!r} has no EMS file ({target}); compute one with "
                f"`diffsolve ems --model {self.name} --out {target or 'ems.safetensors'}`"
            )
        ems = load_ems(target)
        ems.check_compatible(self.schedule, self.data_shape, model_fingerprint(self.denoiser))
        return ems

    def load_gaussian(self, path: str | Path | None = None) -> GaussianModel:
        """Load the Gaussian statistics of the data (default: :attr:`gaussian_stats_path`)."""
        target = Path(path) if path is not None else self.gaussian_stats_path
        if target is None:
            raise ValueError(
                f"model {self.name!r} has no folder with gaussian_stats.safetensors; pass a "
                "statistics file (`diffsolve gaussian-stats`)"
            )
        return load_gaussian_stats(target, expect_shape=self.data_shape)

    def solver_context(
        self, needs: Collection[str] = (), gaussian_stats: str | Path | None = None
    ) -> SolverContext:
        """Resolve once what solvers and wrappers need from this model: the EMS and the
        Gaussian statistics among ``needs``, loaded and checked against the model."""
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        return SolverContext(
            ems=self.load_ems().to(self.device) if "ems" in needs else None,
            gaussian=self.load_gaussian(gaussian_stats) if "gaussian" in needs else None,
        )

    def label_kwargs(self, class_labels: Tensor | None) -> dict[str, Tensor] | None:
        """Network arguments for per-sample ``class_labels`` (``None`` for an unconditional
        model or no labels) — e.g. the ``conditioning`` of
        :func:`~diffsolve.stats.ems.compute.compute_ems`."""
        if self.num_classes is None or class_labels is None:
            return None
        labels = torch.as_tensor(class_labels).long()
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes - 1}] for model {self.name!r}"
            )
        return {"class_labels": labels}

    def conditional(self, class_labels: Tensor) -> Denoiser:
        """The denoiser conditioned on ``class_labels`` (shape ``(B,)``)."""
        if self.num_classes is None or not isinstance(self.denoiser, ModelWrapper):
            raise ValueError(f"model {self.name!r} is not class-conditional")
        return self.denoiser.with_kwargs(class_labels=class_labels)


def demo_path(name: str) -> Path:
    """Folder of a shipped demo model."""
    return DEMO_DIR / name


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    options: LoadOptions | None = None,
) -> LoadedModel:
    """Load a model: a demo name, a diffsolve or diffusers folder, or an entry point (see
    the module docstring).

    Args:
        name_or_path: One of :data:`DEMO_MODELS`, a folder, ``file.py:NAME`` or
            ``package.module:NAME``.
        device: Where to put the network.
        dtype: Run the network in this dtype (e.g. ``torch.float16``); solver state stays in
            at least float32.
        options: Overrides and additions (:class:`LoadOptions`).
    """
    from diffsolve.app.entry_points import is_entry_point

    options = options or LoadOptions()
    name = str(name_or_path)
    if name in ANALYTIC_DEMOS:
        _refuse_options(name, options, allowed=("ems", "gaussian_stats"))
        loaded = _load_analytic(name)
    elif name in TRAINED_DEMOS + DIFFUSERS_DEMOS or Path(name).is_dir():
        folder = demo_path(name) if name in TRAINED_DEMOS + DIFFUSERS_DEMOS else Path(name)
        from diffsolve.app.diffusers_models import is_diffusers_folder

        if is_diffusers_folder(folder):
            loaded = _load_diffusers(name, folder, options, dtype)
        else:
            _refuse_options(name, options, allowed=("prediction", "ems", "gaussian_stats"))
            loaded = _load_folder(name, folder, options, dtype)
    elif is_entry_point(name):
        _refuse_options(name, options, allowed=("prediction", "shape", "ems", "gaussian_stats"))
        loaded = _load_entry_point(name, options, dtype)
    else:
        raise ValueError(
            f"unknown model {name!r}: not a demo model ({', '.join(DEMO_MODELS)}), not an "
            "existing folder (diffsolve: config.json + model.safetensors; diffusers: "
            "model_index.json, or a model folder with scheduler_config.json) and not an entry "
            "point (path/to/file.py:NAME or package.module:NAME)"
        )
    return _finish(loaded, options, device, dtype)


#: The options each source takes (others are refused, never ignored).
_OPTION_FLAGS = {
    "prediction": "--prediction",
    "scheduler_config": "--scheduler-config",
    "shape": "--shape",
    "height": "--height",
    "width": "--width",
    "prompts": "--prompt/--prompts",
    "negative_prompt": "--negative-prompt",
    "ems": "--ems",
    "gaussian_stats": "--gaussian-stats",
}


def _refuse_options(name: str, options: LoadOptions, allowed: Sequence[str]) -> None:
    defaults = LoadOptions()
    for key, flag in _OPTION_FLAGS.items():
        if key not in allowed and getattr(options, key) != getattr(defaults, key):
            raise ValueError(f"{flag}: not used by model {name!r} (drop it)")


def _finish(
    loaded: LoadedModel,
    options: LoadOptions,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> LoadedModel:
    """Apply the statistics files given; move the network to ``device`` and ``dtype``
    (loaded networks are float32 until then; an entry point's keeps its own dtype unless
    one is given)."""
    if options.ems is not None and not Path(options.ems).is_file():  # (Gaussian: when used)
        raise ValueError(f"--ems {options.ems}: no such file")
    loaded.ems_file = Path(options.ems) if options.ems is not None else None
    loaded.gaussian_file = (
        Path(options.gaussian_stats) if options.gaussian_stats is not None else None
    )
    if loaded.network is not None:
        keep = loaded.source == "entry-point" and dtype is None
        loaded.network.to(device=device, dtype=None if keep else dtype or torch.float32)
    loaded.device = str(device)
    return loaded


def _load_folder(
    name: str, folder: Path, options: LoadOptions, dtype: torch.dtype | None
) -> LoadedModel:
    """A diffsolve model folder (the demos' format)."""
    from diffsolve.app.model_config import ConfigError, check_model_config
    from diffsolve.app.nets import load_network

    network, config = load_network(folder, check_model_config)
    try:
        schedule = schedule_from_config(config["schedule"])
    except ValueError as err:
        raise ConfigError(f"{folder / 'config.json'}: key 'schedule': {err}") from None
    if options.prediction is not None:
        config = {**config, "prediction": normalize_prediction(options.prediction)}
    if isinstance(schedule, VPDiscrete):
        schedule = schedule.for_prediction(normalize_prediction(config["prediction"]))
    # the fingerprint of the weights as stored, before a cast to half precision rounds them
    wrapper = ModelWrapper(
        network,
        schedule,
        config["prediction"],
        config.get("time_input", "auto"),
        model_dtype=dtype,
        fingerprint=network_fingerprint(network),
        data_shape=config["data_shape"],
    )
    conditioning = config.get("conditioning") or {}
    return LoadedModel(
        name=name,
        denoiser=wrapper,
        schedule=schedule,
        data_shape=tuple(config["data_shape"]),
        config=config,
        network=network,
        num_classes=conditioning.get("num_classes"),
        folder=folder,
        source="demo" if name in TRAINED_DEMOS else "folder",
        weight_files=(folder / "model.safetensors",),
    )


def _load_diffusers(
    name: str, folder: Path, options: LoadOptions, dtype: torch.dtype | None
) -> LoadedModel:
    """A diffusers pipeline or model folder (:mod:`diffsolve.app.diffusers_models`)."""
    from diffsolve.app.diffusers_models import load_diffusers, vae_codec, wrapper_for
    from diffsolve.integrations.diffusers.models import architecture_of, scheduler_conventions

    if options.shape is not None:
        raise ValueError(
            "--shape: a diffusers model's sample shape comes from its config (a text "
            "pipeline's from --height/--width); drop --shape"
        )
    parts = load_diffusers(
        folder,
        scheduler_config=options.scheduler_config,
        prompts=options.prompts,
        negative_prompt=options.negative_prompt,
        height=options.height,
        width=options.width,
    )
    text = architecture_of(parts.denoiser_class).text
    if not text and (options.height or options.width or options.negative_prompt):
        raise ValueError("--height/--width/--negative-prompt: for text pipelines only")
    seq_len = None
    if parts.image_size is not None:
        seq_len = (parts.data_shape[1] // 2) * (parts.data_shape[2] // 2)
    conventions = scheduler_conventions(parts.scheduler_config, options.prediction, seq_len)
    wrapper = wrapper_for(parts, conventions.schedule, conventions.prediction, dtype)
    decode, encode = vae_codec(parts.vae) if parts.vae is not None else (None, None)
    prompts = tuple(options.prompts or ("",)) if text else ()
    config = {
        "source": "diffusers",
        "denoiser": parts.denoiser_class,
        "scheduler_config": parts.scheduler_config,
        "schedule": conventions.schedule.to_config(),
        "prediction": conventions.prediction,
        "data_shape": list(parts.data_shape),
    }
    if parts.num_classes:
        config["conditioning"] = {"num_classes": parts.num_classes}
        if text:
            config["conditioning"]["null_class"] = parts.num_classes
    return LoadedModel(
        name=name,
        denoiser=wrapper,
        schedule=conventions.schedule,
        data_shape=parts.data_shape,
        config=config,
        network=parts.network,
        num_classes=parts.num_classes,
        folder=folder,
        source="diffusers",
        weight_files=parts.weight_files,
        scheduler_config=parts.scheduler_config,
        decode=decode,
        encode=encode,
        prompts=prompts,
        negative_prompt=options.negative_prompt if text else None,
        image_size=parts.image_size,
    )


def _load_entry_point(name: str, options: LoadOptions, dtype: torch.dtype | None) -> LoadedModel:
    """``file.py:NAME`` / ``module:NAME`` (:mod:`diffsolve.app.entry_points`)."""
    from diffsolve.app.entry_points import load_entry_point

    wrapper, file = load_entry_point(name)
    shape = options.shape or wrapper.data_shape
    if shape is None:
        raise ValueError(
            f"--model {name}: the ModelWrapper has no data_shape; give it "
            "(ModelWrapper(..., data_shape=(C, H, W))) or pass --shape C,H,W"
        )
    if options.prediction is not None:
        wrapper = ModelWrapper(
            wrapper.model,
            wrapper.schedule,
            options.prediction,
            wrapper.time_input,
            wrapper.model_kwargs,
            wrapper.model_dtype,
            wrapper.fingerprint,
            shape,
        )
    if dtype is not None:
        wrapper.model_dtype = dtype
    network = wrapper.model if isinstance(wrapper.model, nn.Module) else None
    parameters = wrapper.weights_fingerprint()
    identity = {"parameters": parameters} if parameters else {}
    if wrapper.fingerprint is None and parameters is not None:
        wrapper.fingerprint = parameters  # hashed once here, not at every EMS check
    config = {
        "source": "entry-point",
        "entry_point": name,
        "schedule": wrapper.schedule.to_config(),
        "prediction": wrapper.prediction,
        "data_shape": list(shape),
    }
    return LoadedModel(
        name=name,
        denoiser=wrapper,
        schedule=wrapper.schedule,
        data_shape=tuple(shape),
        config=config,
        network=network,
        folder=file.parent if file is not None and file.suffix == ".py" else None,
        source="entry-point",
        weight_files=(file,) if file is not None else (),
        identity=identity,
    )


def digits_schedule() -> VPDiscrete:
    """The schedule of the ``digits`` demo: DDPM linear betas 1e-4 … 0.02 over 1000 steps."""
    return VPDiscrete.from_diffusers("linear", 1e-4, 0.02, 1000)


def _load_analytic(name: str) -> LoadedModel:
    from diffsolve.app.data import load_digit_labels, load_digits

    data = load_digits("train")
    schedule = digits_schedule()
    if name == "gaussian":
        analytic: GaussianModel | GaussianMixtureModel = GaussianModel.fit(data)
        description = "Gaussian fitted to the digits training split (mean, full covariance)"
    else:
        analytic = GaussianMixtureModel.fit(data, load_digit_labels("train"))
        description = "Gaussian mixture, one full-covariance component per digit class"
    config = {
        "name": name,
        "description": description,
        "schedule": schedule.to_config(),
        "prediction": "x0",
        "data_shape": list(data.shape[1:]),
    }
    return LoadedModel(
        name=name,
        denoiser=analytic.denoiser(schedule),
        schedule=schedule,
        data_shape=tuple(data.shape[1:]),
        config=config,
        analytic=analytic,
        folder=demo_path(name),
        source="analytic",
    )
