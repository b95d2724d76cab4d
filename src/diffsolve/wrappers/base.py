"""The plumbing every model wrapper shares: a wrapper has the wrapped denoiser's schedule,
passes ``reset`` on (stateful wrappers start every run afresh) and answers ``model_time``."""

from __future__ import annotations

from typing import Any

from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete


class DenoiserWrapper:
    """Shared plumbing of the wrappers: the schedule, ``reset`` and ``model_time`` are
    passed through to the wrapped denoiser."""

    model: Any
    schedule: NoiseSchedule

    def reset(self) -> None:
        """Forget any state between runs (passed on to the wrapped denoiser)."""
        reset = getattr(self.model, "reset", None)
        if callable(reset):
            reset()

    def model_time(self, t: float) -> float:
        """The network's own time input for solver time ``t`` (from the wrapped model; for
        models without one: the training timestep on discrete VP schedules, else ``t``)."""
        inner = getattr(self.model, "model_time", None)
        if callable(inner):
            return float(inner(t))
        if isinstance(self.schedule, VPDiscrete):
            return float(self.schedule.timestep(t))
        return float(t)
