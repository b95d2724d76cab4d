"""Loading models: the shipped demo models and any folder in the same format.

A model folder holds ``config.json`` (network, schedule, prediction type, time input, data
shape, conditioning) and ``model.safetensors``. :func:`load_model` turns it into a
:class:`LoadedModel` whose :attr:`~LoadedModel.denoiser` every solver can drive. The names
``digits``, ``digits-cond`` and ``digits-flow`` resolve to the demo folders shipped in the
package; ``gaussian`` and ``gmm`` are analytic models fitted to the digits training split,
with exact denoisers and no training.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsolve.ode.model import Denoiser, ModelWrapper, network_fingerprint
from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete, schedule_from_config
from diffsolve.solvers.registry import NEEDS, SolverContext
from diffsolve.stats.ems import EMS, load_ems, model_fingerprint
from diffsolve.stats.gaussian import GaussianMixtureModel, GaussianModel, load_gaussian_stats

DEMO_DIR = Path(__file__).resolve().parents[1] / "demos"
TRAINED_DEMOS = ("digits", "digits-cond", "digits-flow")
ANALYTIC_DEMOS = ("gaussian", "gmm")
DEMO_MODELS = TRAINED_DEMOS + ANALYTIC_DEMOS


@dataclass
class LoadedModel:
    """A model ready for sampling.

    Attributes:
        name: Demo name or folder path.
        denoiser: The unconditional (or null-class) denoiser.
        schedule: Its noise schedule.
        data_shape: Shape of one sample, e.g. ``(1, 8, 8)``.
        config: The parsed ``config.json`` (analytic models: a synthetic config).
        network: The ``nn.Module`` (``None`` for analytic models).
        num_classes: Number of classes of a class-conditional model.
        analytic: The analytic data model (``gaussian`` / ``gmm``), if any.
        folder: The model folder (demo models included).
        device: Where the network runs (DPM-Solver-v3 builds its plan there).
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

    @property
    def ems_path(self) -> Path | None:
        """Where this model's DPM-Solver-v3 statistics live (``<folder>/ems.safetensors``)."""
        return None if self.folder is None else self.folder / "ems.safetensors"

    @property
    def gaussian_stats_path(self) -> Path | None:
        """Where the Gaussian statistics of its data live (``gaussian_stats.safetensors``)."""
        return None if self.folder is None else self.folder / "gaussian_stats.safetensors"

    @property
    def has_ems(self) -> bool:
        """Whether the model folder holds an EMS file."""
        return self.ems_path is not None and self.ems_path.is_file()

    def available(self) -> frozenset[str]:
        """What the model folder can give solvers (see
        :class:`~diffsolve.solvers.registry.SolverContext`): ``"ems"``, ``"gaussian"``."""
        files = {"ems": self.ems_path, "gaussian": self.gaussian_stats_path}
        return frozenset(k for k, path in files.items() if path is not None and path.is_file())

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
    name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a demo model by name or a model folder by path.

    Args:
        name_or_path: One of :data:`DEMO_MODELS`, or a folder with ``config.json`` and
            ``model.safetensors``.
        device: Where to put the network.
        dtype: Run the network in this dtype (e.g. ``torch.float16``); solver state stays in
            at least float32.
    """
    name = str(name_or_path)
    if name in ANALYTIC_DEMOS:
        return _load_analytic(name)
    folder = demo_path(name) if name in TRAINED_DEMOS else Path(name_or_path)
    if not folder.exists():
        raise ValueError(
            f"unknown model {name!r}: not a demo model ({', '.join(DEMO_MODELS)}) and not an "
            "existing folder with config.json and model.safetensors"
        )
    from diffsolve.app.model_config import ConfigError, check_model_config
    from diffsolve.app.nets import load_network

    network, config = load_network(folder, check_model_config)
    try:
        schedule = schedule_from_config(config["schedule"])
    except ValueError as err:
        raise ConfigError(f"{folder / 'config.json'}: key 'schedule': {err}") from None
    # the fingerprint of the weights as stored, before a cast to half precision rounds them
    fingerprint = network_fingerprint(network)
    network = network.to(device=device, dtype=dtype or torch.float32)
    wrapper = ModelWrapper(
        network,
        schedule,
        config["prediction"],
        config.get("time_input", "auto"),
        model_dtype=dtype,
        fingerprint=fingerprint,
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
        device=str(device),
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
    )
