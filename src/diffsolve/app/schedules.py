"""Tuned step schedules kept with a model: picked up by ``diffsolve sample`` automatically.

A model folder may hold step schedules fitted by ``diffsolve tune``, one per solver and NFE,
at ``<model folder>/schedules/<solver>-nfe<N>.json`` (``solver``: the registry name, e.g.
``dpm-solver-v3-nfe5.json``, ``unipc-bh2-3-nfe8.json``). The demo models ship theirs in the
package (``diffsolve/demos/<name>/schedules/``); for any other model folder,
``diffsolve tune --model FOLDER --solver S --nfe N --out FOLDER/schedules/S-nfeN.json`` puts
one there.

:func:`find_tuned_schedule` returns the file for a model, solver and NFE when it holds a
schedule for exactly them: the same solver and NFE, the model's noise schedule and the
model's fingerprint, a valid grid. A file that fails any of these is skipped with a
one-line warning (for a shipped file that is a packaging bug), never applied and never fatal.
``diffsolve sample`` uses the schedule found exactly as ``--schedule FILE`` would, when no
option fixes the grid itself (``--grid``, ``--schedule``, ``--teleport``) and the run is what
the schedule was fitted for (no guidance, thresholding or DualFast); ``--no-tuned-schedule``
turns the pickup off.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffsolve.app import loader
from diffsolve.app.loader import LoadedModel
from diffsolve.ode.step_schedule import StepSchedule

#: The folder of a model folder that holds its tuned step schedules.
SCHEDULES_DIR = "schedules"


def schedule_filename(solver: str, nfe: int) -> str:
    """The file name of the tuned schedule for ``solver`` at ``nfe``:
    ``<solver>-nfe<nfe>.json``."""
    return f"{solver}-nfe{nfe}.json"


@dataclass(frozen=True)
class TunedSchedule:
    """A tuned step schedule found with a model.

    Attributes:
        path: The schedule file.
        schedule: Its contents, checked against the model.
        model: The model's name (demo name or folder).
        shipped: Whether the file ships with a demo model in the package.
    """

    path: Path
    schedule: StepSchedule
    model: str
    shipped: bool

    @property
    def relative(self) -> str:
        """The file's path inside the model folder (``schedules/<solver>-nfe<N>.json``)."""
        return f"{SCHEDULES_DIR}/{self.path.name}"

    @property
    def where(self) -> str:
        """Where the file is, for messages: ``"schedules/… shipped with digits"`` or the
        full path for a model folder of the user's."""
        return _where(self.path, self.model, self.shipped)

    def skipped(self, reason: str) -> str:
        """The one-line warning for this file skipped because of ``reason``."""
        return _skipped(self.path, self.model, self.shipped, reason)

    def describe(self, default_grid: str) -> str:
        """The one line ``diffsolve sample`` says when it uses this schedule
        (``default_grid``: the solver's own grid kind at this NFE)."""
        fit = self.schedule.fit
        tuned, default = fit.get("check_rmse"), fit.get("check_rmse_default")
        if "heldout_rmse" in fit:  # measured against the 500-step reference (shipped files)
            tuned, default = fit.get("heldout_rmse"), fit.get("heldout_rmse_default")
        errors = ""
        if isinstance(tuned, (int, float)) and isinstance(default, (int, float)):
            errors = f"held-out RMSE {tuned:.3g} vs {default:.3g} on the default grid; "
        jump = ", after a Gaussian teleport" if self.schedule.teleport else ""
        return (
            f"using the tuned step schedule {self.where}{jump} ({errors}--grid {default_grid} "
            "or --no-tuned-schedule to opt out)"
        )


def tuned_schedule_path(model: LoadedModel, solver: str, nfe: int) -> Path | None:
    """Where the tuned schedule for ``solver`` at ``nfe`` would be (``None``: the model has
    no folder)."""
    if model.folder is None:
        return None
    return Path(model.folder) / SCHEDULES_DIR / schedule_filename(solver, nfe)


def is_shipped(model: LoadedModel) -> bool:
    """Whether the model's folder is a demo folder inside the package."""
    if model.folder is None:
        return False
    return Path(model.folder).resolve().parent == Path(loader.DEMO_DIR).resolve()


def find_tuned_schedule(
    model: LoadedModel,
    solver: str,
    nfe: int,
    warn: Callable[[str], None] | None = None,
) -> TunedSchedule | None:
    """The tuned step schedule kept with ``model`` for ``solver`` at ``nfe``, or ``None``.

    Looks at ``<model folder>/schedules/<solver>-nfe<nfe>.json``. A file that is not a step
    schedule, or one for another solver, NFE, noise schedule or model (fingerprint), or with
    an invalid grid, is skipped: ``warn`` (default: :func:`warnings.warn`) gets one line
    saying why.

    Args:
        model: The loaded model.
        solver: Registry name of the solver (resolved, not ``"auto"``).
        nfe: Model evaluations per sample.
        warn: Called with a one-line warning for a file that is skipped.
    """
    from diffsolve.app.tune import schedule_fingerprint

    path = tuned_schedule_path(model, solver, nfe)
    if path is None or not path.is_file():
        return None
    shipped = is_shipped(model)
    try:
        fitted = StepSchedule.load(path)
        if (fitted.solver, fitted.nfe) != (solver, nfe):
            raise ValueError(
                f"it holds a schedule for {fitted.solver} at {fitted.nfe} NFE, not {solver} "
                f"at {nfe} (the file name must say what it holds)"
            )
        fitted.grid(model.schedule, schedule_fingerprint(model))
    except (OSError, ValueError) as err:
        reason = str(err).removeprefix(f"{path}: ")
        _warn(warn, _skipped(path, model.name, shipped, reason))
        return None
    return TunedSchedule(path, fitted, model.name, shipped)


def _where(path: Path, model: str, shipped: bool) -> str:
    return f"{SCHEDULES_DIR}/{path.name} shipped with {model}" if shipped else str(path)


def _skipped(path: Path, model: str, shipped: bool, reason: str) -> str:
    fault = " (a packaging bug: please report it)" if shipped else ""
    return f"skipping the tuned step schedule {_where(path, model, shipped)}{fault}: {reason}"


def _warn(warn: Callable[[str], None] | None, line: str) -> None:
    if warn is not None:
        warn(line)
    else:
        warnings.warn(line, stacklevel=3)
