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

A model folder may also hold *solver* schedules (a solving strategy per step, fitted by
``diffsolve tune --method solver-schedule``; :mod:`diffsolve.solvers.solver_schedule`), one
per NFE, at ``<model folder>/schedules/solver-schedule-nfe<N>.json``. With the default
solver (``--solver auto``) ``diffsolve sample`` runs the one for its NFE as
``--solver schedule:FILE`` would (:func:`find_tuned_solver_schedule`), under the same
conditions, and says so with the file's held-out numbers; a file that does not fit the model
is skipped with a one-line warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from diffsolve.app import loader
from diffsolve.app.loader import LoadedModel
from diffsolve.ode.plan import Solver
from diffsolve.ode.step_schedule import StepSchedule
from diffsolve.solvers.registry import setup_solver
from diffsolve.solvers.solver_schedule import SolverSchedule, load_solver_schedule

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


def _skipped(
    path: Path, model: str, shipped: bool, reason: str, what: str = "step schedule"
) -> str:
    fault = " (a packaging bug: please report it)" if shipped else ""
    return f"skipping the tuned {what} {_where(path, model, shipped)}{fault}: {reason}"


# ---------------------------------------------------------------------------------------
# Solver schedules kept with a model
def solver_schedule_filename(nfe: int) -> str:
    """The file name of the tuned solver schedule at ``nfe``:
    ``solver-schedule-nfe<nfe>.json``."""
    return f"solver-schedule-nfe{nfe}.json"


@dataclass(frozen=True)
class TunedSolverSchedule:
    """A tuned solver schedule found with a model (attributes as :class:`TunedSchedule`)."""

    path: Path
    schedule: SolverSchedule
    model: str
    shipped: bool

    @property
    def where(self) -> str:
        """Where the file is, for messages (as :attr:`TunedSchedule.where`)."""
        return _where(self.path, self.model, self.shipped)

    def skipped(self, reason: str) -> str:
        """The one-line warning for this file skipped because of ``reason``."""
        return _skipped(self.path, self.model, self.shipped, reason, "solver schedule")

    def describe(self) -> str:
        """The one line ``diffsolve sample`` says when it uses this schedule: the file's
        held-out RMSE to the reference against the best shipped configuration of one
        solver (``fit["best_step_schedule"]``: its name)."""
        fit = self.schedule.fit
        tuned, best = fit.get("heldout_rmse"), fit.get("heldout_rmse_best_step_schedule")
        errors = ""
        if isinstance(tuned, (int, float)) and isinstance(best, (int, float)):
            rival = fit.get("best_step_schedule") or "the best step schedule"
            errors = f"held-out RMSE {tuned:.3g} vs {best:.3g} for {rival}; "
        jump = ", after a Gaussian teleport" if self.schedule.teleport else ""
        return (
            f"using the tuned solver schedule {self.where}{jump} ({self.schedule.nfe} NFE; "
            f"{errors}--solver NAME or --no-tuned-schedule to opt out)"
        )


def find_tuned_solver_schedule(
    model: LoadedModel, nfe: int, warn: Callable[[str], None] | None = None
) -> TunedSolverSchedule | None:
    """The tuned solver schedule kept with ``model`` at ``nfe``
    (``<model folder>/schedules/solver-schedule-nfe<nfe>.json``), or ``None``. A file that
    is not a solver schedule, holds another NFE, was fitted to another noise schedule or
    model, or needs statistics the model folder lacks is skipped: ``warn`` (default:
    :func:`warnings.warn`) gets one line saying why. (The EMS digest is checked when the
    run loads the EMS, :func:`solver_schedule_setup`.)"""
    from diffsolve.app.tune import schedule_fingerprint

    if model.folder is None:
        return None
    path = Path(model.folder) / SCHEDULES_DIR / solver_schedule_filename(nfe)
    if not path.is_file():
        return None
    shipped = is_shipped(model)
    try:
        fitted = load_solver_schedule(path)
        if fitted.nfe != nfe:
            raise ValueError(
                f"it holds a solver schedule for {fitted.nfe} NFE, not {nfe} (the file name "
                "must say what it holds)"
            )
        settings = fitted.config if isinstance(fitted.config, dict) else None
        if settings is None or not isinstance(settings.get("scale", 1.0), (int, float)):
            raise ValueError("its config (the search's settings) is malformed")
        missing = sorted(set(fitted.needs) - model.available())
        if missing:
            raise ValueError(f"it needs {' and '.join(missing)}, which the model folder lacks")
        fitted.check(model.schedule, schedule_fingerprint(model))
        fitted.grid(model.schedule)
    except (OSError, ValueError) as err:
        reason = str(err).removeprefix(f"solver schedule {path}: ")
        _warn(warn, _skipped(path, model.name, shipped, reason, "solver schedule"))
        return None
    return TunedSolverSchedule(path, fitted, model.name, shipped)


def solver_schedule_setup(
    name: str, model: LoadedModel, nfe: int
) -> tuple[SolverSchedule, Solver, Tensor]:
    """The file, solver and grid of the registry name ``schedule:FILE`` for ``model``: the
    file checked against the model (noise schedule, fingerprint, and the digest of the EMS
    it integrates with), its needs loaded from the model, its own times."""
    from diffsolve.app.tune import schedule_fingerprint

    fitted = load_solver_schedule(name.partition(":")[2])
    if nfe != fitted.nfe:
        raise ValueError(
            f"--nfe {nfe} contradicts --solver {name}: it spends {fitted.nfe} model "
            f"evaluations; pass --nfe {fitted.nfe} or drop --nfe"
        )
    context = model.solver_context(fitted.needs)
    fitted.check(model.schedule, schedule_fingerprint(model), context.ems)
    solver, grid = setup_solver(name, model.schedule, nfe, context=context)
    return fitted, solver, grid


def _warn(warn: Callable[[str], None] | None, line: str) -> None:
    if warn is not None:
        warn(line)
    else:
        warnings.warn(line, stacklevel=3)
