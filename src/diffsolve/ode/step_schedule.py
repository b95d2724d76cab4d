"""Fitted step schedules as files: a grid tuned for one model, solver and NFE.

A :class:`StepSchedule` is what ``diffsolve tune`` (:func:`diffsolve.app.tune.tune_schedule`)
produces: the solver times of the grid (ending at ``t = 0`` as the registry's grids do), the
solver (registry name and the options the tuning chose), the NFE, the method (``dp`` or
``search``) with its settings and cost, and the identity of what it was fitted to — the
model's fingerprint and its noise schedule. It is stored as JSON. :meth:`StepSchedule.grid`
(and :func:`diffsolve.ode.grids.from_file`) hands the grid back only for the same noise
schedule and, when the caller knows it, the same model fingerprint: a schedule fitted to
another model is refused with a one-line error, never silently applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from diffsolve.ode.grids import validate_grid
from diffsolve.ode.schedule import NoiseSchedule

#: The ``format`` field of a schedule file.
SCHEDULE_FORMAT = "diffsolve-step-schedule-1"


@dataclass(frozen=True)
class StepSchedule:
    """A step schedule fitted to one model.

    Attributes:
        times: Solver times :math:`t_0 > \\dots > t_N = 0` (``N`` grid steps; with
            ``teleport``, the first interval is the jump and ``N - 1`` steps evaluate).
        solver: Registry name of the solver it was fitted for.
        nfe: Model evaluations per sample on this grid.
        method: How it was found: ``"dp"``, ``"search"`` (or ``"default"`` when the tuning
            kept the solver's default grid).
        noise_schedule: The model's :meth:`~diffsolve.ode.schedule.NoiseSchedule.to_config`.
        fingerprint: The model's :func:`~diffsolve.stats.ems.model_fingerprint` (``None``:
            unknown, not checked).
        options: Solver options that differ from the registry preset's at this NFE.
        teleport: The first interval ``times[0] → times[1]`` is taken by analytic Gaussian
            teleportation (0 NFE; :class:`~diffsolve.wrappers.teleport.Teleported`, with
            the model's Gaussian statistics), the solver runs on ``times[1:]``.
        model: The model's name or folder (informative).
        cost: ``{"model_evaluations": …, "seconds": …}`` of the tuning.
        config: The tuning settings (candidates, teacher steps, trajectories, seeds, …).
        fit: Measured errors (RMSE to the teacher, tuned and the default grid, fit and
            held-out seeds).
    """

    times: tuple[float, ...]
    solver: str
    nfe: int
    method: str
    noise_schedule: dict[str, Any]
    fingerprint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    teleport: bool = False
    model: str = ""
    cost: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """JSON text (floats written exactly, as Python's ``repr``)."""
        data = {"format": SCHEDULE_FORMAT, **asdict(self), "times": list(self.times)}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "schedule file") -> StepSchedule:
        """Parse :meth:`to_json` output; a clear ``ValueError`` for anything else."""
        solver_schedule = (
            "a solver schedule (a solver per step), not a step schedule; run it with "
            f"--solver schedule:{source.removeprefix('schedule file ')}"
        )
        data = read_json_format(
            text, source, SCHEDULE_FORMAT, "step schedule",
            {"diffsolve-solver-schedule-1": solver_schedule},
        )  # fmt: skip
        try:
            data["times"] = tuple(float(t) for t in data["times"])
            return cls(**data)
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{source}: malformed step schedule: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write the schedule as JSON to ``path``, atomically
        (:func:`diffsolve.numerics.files.write_text_atomic`)."""
        from diffsolve.numerics.files import write_text_atomic

        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> StepSchedule:
        """Read a schedule file."""
        return cls.from_json(Path(path).read_text(), str(path))

    def check(self, schedule: NoiseSchedule, fingerprint: str | None = None) -> None:
        """Raise a one-line ``ValueError`` when this schedule was fitted to another noise
        schedule or (``fingerprint`` given and recorded) to another model."""
        if _process(schedule.to_config()) != _process(self.noise_schedule):
            raise ValueError(
                f"step schedule for {self.model or 'another model'} was fitted under the noise "
                f"schedule {self.noise_schedule}, not this model's {schedule.to_config()}; "
                "tune one for this model (`diffsolve tune`)"
            )
        if None not in (fingerprint, self.fingerprint) and fingerprint != self.fingerprint:
            raise ValueError(
                f"step schedule was fitted to model {self.model or '?'} (fingerprint "
                f"{self.fingerprint}), not this one ({fingerprint}); tune one for this "
                "model (`diffsolve tune`)"
            )

    def grid(self, schedule: NoiseSchedule, fingerprint: str | None = None) -> Tensor:
        """The grid as a validated float64 tensor, after :meth:`check`."""
        self.check(schedule, fingerprint)
        return validate_grid(schedule, self.times)


def read_json_format(
    text: str, source: str, fmt: str, what: str, others: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The fields (without ``format``) of a diffsolve JSON file of format ``fmt``; a
    one-line ``ValueError`` naming ``source`` for anything else (``what``: the kind of file
    expected; ``others``: a message per format of another kind of file)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not JSON ({err.msg}, line {err.lineno})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if others and found in others:
        raise ValueError(f"{source}: {others[found]}")
    if found != fmt:
        raise ValueError(f"{source}: not a diffsolve {what} ({fmt})")
    data.pop("format")
    return data


def _process(config: dict[str, Any]) -> dict[str, Any]:
    """A schedule config without a flow's sampling ``shift``: the shift places default
    grids, not the process, and a fitted schedule lists its own times."""
    return {k: v for k, v in config.items() if k != "shift"}
