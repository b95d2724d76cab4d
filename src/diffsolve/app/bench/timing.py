"""A denoiser wrapper that accounts the time spent inside the model."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from diffsolve.ode.model import Denoiser, ModelWrapper, Prediction


def synchronize(x: Tensor) -> None:
    """Wait for queued device work, so wall-clock timings are honest on GPUs."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


class TimedModel:
    """Counts evaluations and accumulates seconds spent in the model.

    ``__call__`` serves diffsolve's solvers; :meth:`raw` serves diffusers' schedulers with the
    network's own output (``prediction`` tells them what it is).
    """

    def __init__(self, model: Denoiser) -> None:
        self.model = model
        self.schedule = model.schedule
        self.seconds = 0.0
        self.calls = 0
        self.prediction = model.prediction if isinstance(model, ModelWrapper) else "x0"
        #: The samples' seeds, where a stochastic sampler draws its noise from them.
        self.seeds: list[int] | None = None

    def reset(self) -> None:
        """Zero the counters before a run."""
        self.seconds, self.calls = 0.0, 0

    def __call__(self, x: Tensor, t: float) -> Prediction:
        start = time.perf_counter()
        prediction = self.model(x, t)
        synchronize(prediction.out)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return prediction

    def raw(self, x: Tensor, t: float) -> Tensor:
        """The network output at solver time ``t`` (analytic models: :math:`\\hat x_0`)."""
        start = time.perf_counter()
        if isinstance(self.model, ModelWrapper):
            out = self.model.forward(x, t)
        else:
            out = self.model(x, t).x0
        synchronize(out)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out
