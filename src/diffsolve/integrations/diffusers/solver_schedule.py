r"""A solver-schedule file as a diffusers scheduler: :class:`DiffsolveSolverScheduleScheduler`.

A solver schedule (``diffsolve tune --method solver-schedule``;
:mod:`diffsolve.solvers.solver_schedule`) fixes a solving strategy per step and the step
times, fitted to one model. The scheduler runs the file given by its config key
``solver_schedule_path`` (as ``DPMSolverV3Scheduler`` takes ``ems_path``)::

    from diffsolve.integrations.diffusers import DiffsolveSolverScheduleScheduler

    pipe.scheduler = DiffsolveSolverScheduleScheduler.from_config(
        pipe.scheduler.config, solver_schedule_path="solver-schedule-nfe5.json"
    )
    images = pipe(num_inference_steps=5).images  # the file's NFE

* **Steps.** ``set_timesteps(num_inference_steps)`` must ask for the file's NFE (else a
  ``ValueError`` naming it); the steps are the file's own times (the network sees their
  fractional timesteps, as with ``grid=<kind>``). Custom ``timesteps`` / ``sigmas`` (Flux
  passes its sigmas) are placed as the step-placing diffusers scheduler places them and must
  give one step per choice: the choices then apply per step on them.
* **Checks.** The file must have been fitted under the config's noise schedule (diffusers'
  float32 :math:`\bar\alpha` match a model's float64 ones), and, where a step integrates
  DPM-Solver-v3's feature, with the EMS ``ems_path`` names (their digest). A schedule that
  starts with a Gaussian teleport is refused: a pipeline evaluates the network on its initial
  noise before the scheduler could jump (run it with ``diffsolve sample`` or
  :func:`diffsolve.sample`). ``grid`` is refused (the file has its own times).
* **The rest** — the schedule and output keys, flow matching, img2img (``set_begin_index``:
  the remaining choices from that step, their history afresh), ``save_pretrained`` (the file
  is copied next to the config) — is every adapter's (:mod:`diffsolve.integrations.diffusers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from diffsolve.integrations.diffusers.config import adapter_keys
from diffsolve.integrations.diffusers.scheduler import DiffsolveScheduler, adapter_class
from diffsolve.integrations.diffusers.timesteps import Steps, diffusers_sigmas, model_times
from diffsolve.ode.plan import Solver
from diffsolve.solvers.registry import DiffusersMapping
from diffsolve.solvers.solver_schedule import (
    ScheduledSolver,
    SolverSchedule,
    load_solver_schedule,
)

__all__ = ["FILE_KEY", "DiffsolveSolverScheduleScheduler", "SolverScheduleScheduler"]

#: The config key that names the solver-schedule file.
FILE_KEY = "solver_schedule_path"
MAPPING = DiffusersMapping("DiffsolveSolverScheduleScheduler", "schedule:FILE")


class SolverScheduleScheduler(DiffsolveScheduler):
    """Base of :class:`DiffsolveSolverScheduleScheduler`: the file's solver on its times."""

    _file: SolverSchedule
    #: The step the current plan starts from (img2img): its choices are the file's from there.
    _offset: int = 0

    def _setup(self) -> None:
        """Load and check the file, then every adapter's setup; the file's noise schedule
        and EMS digest against the config's."""
        name = type(self).__name__
        path = self.config.get(FILE_KEY)
        if path is None:
            raise ValueError(
                f"{FILE_KEY}: {name} runs a solver-schedule file (`diffsolve tune --method "
                f"solver-schedule`); pass {FILE_KEY}=... to from_config / the constructor"
            )
        self._file, self._offset = load_solver_schedule(path), 0
        if self._file.teleport:
            raise ValueError(
                f"{FILE_KEY}: {path} starts with a Gaussian teleport, which a diffusers "
                "pipeline cannot take (it evaluates the network on its initial noise first); "
                "run it with `diffsolve sample --solver schedule:FILE` or diffsolve.sample"
            )
        if self.config.grid is not None:
            raise ValueError(
                f"grid={self.config.grid!r}: the solver schedule {path} comes with its own "
                "times; drop grid"
            )
        if self.config.get("ems_path") is not None and "ems" not in self._file.needs:
            raise ValueError(
                f"ems_path: the solver schedule {path} does not use DPM-Solver-v3's feature "
                "(no step in space 'f'); drop ems_path"
            )
        super()._setup()
        self._file.check(self.schedule, None, self._needs.get("ems"))
        self._file.grid(self.schedule)

    def solver_needs(self) -> tuple[str, ...]:
        """What the file's steps take from the model (its EMS where a step uses v3's
        feature)."""
        return self._file.needs

    def _files(self) -> list[str]:
        return [FILE_KEY, *super()._files()]

    def build_solver(self, num_steps: int, trailing: int = 0) -> Solver:
        """The file's solver, from the step the plan starts at."""
        return ScheduledSolver(self._file.steps[self._offset :], **self._needs)

    def _build(self, start: int) -> None:
        self._offset = start
        super()._build(start)

    def _make_steps(
        self,
        n: int | None,
        timesteps: Sequence[float] | Tensor | None,
        sigmas: Sequence[float] | Tensor | None,
        mu: float | None,
    ) -> Steps:
        """The file's times, or custom ones with one step per choice."""
        nfe, path = self._file.nfe, self.config[FILE_KEY]
        if timesteps is not None or sigmas is not None:
            steps = super()._make_steps(n, timesteps, sigmas, mu)
            if len(steps.timesteps) != nfe:
                raise ValueError(
                    f"set_timesteps: the solver schedule {path} takes {nfe} steps, one per "
                    f"choice; the custom timesteps/sigmas give {len(steps.timesteps)}"
                )
            return steps
        if n != nfe:
            raise ValueError(
                f"set_timesteps({n!r}): the solver schedule {path} spends {nfe} model "
                f"evaluations on its own times; use num_inference_steps={nfe}"
            )
        if mu is not None:
            raise ValueError(
                f"set_timesteps: mu (dynamic shifting) does not apply to the solver schedule "
                f"{path}: it comes with its own times"
            )
        invert = bool(self.config.invert_sigmas) and self._flow
        grid = self._file.grid(self.schedule)
        times = model_times(self.schedule, grid[:-1], self.config.num_train_timesteps, invert)
        return Steps(grid, times, diffusers_sigmas(self.schedule, grid, invert))


def _keys() -> dict[str, Any]:
    """The scheduler's config keys: the file first, then every adapter's (with
    ``ems_path``)."""
    return {FILE_KEY: None, **adapter_keys(MAPPING, ("ems",))}


DiffsolveSolverScheduleScheduler = adapter_class(
    SolverScheduleScheduler,
    ScheduledSolver,
    MAPPING,
    _keys(),
    "A solver-schedule file (a solving strategy and time per step, `diffsolve tune --method "
    "solver-schedule`) as a diffusers scheduler; the file in ``solver_schedule_path`` (see "
    ":mod:`diffsolve.integrations.diffusers.solver_schedule`). Config keys: "
    f"{', '.join(_keys())}.",
)
