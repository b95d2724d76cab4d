r"""Fresh Gaussian noise for stochastic samplers, drawn so that a sample depends on its seed.

A stochastic step adds :math:`g\,z` with :math:`z \sim \mathcal N(0, I)` (see
:class:`diffsolve.solvers.engine.Update`). Where ``z`` comes from is a :class:`NoiseSource`,
a callable ``source(step, like) -> z`` that the sampling loop hands to the plan with the
state (:func:`diffsolve.sample`'s ``noise=``):

* :class:`SeededNoise` — one stream per sample, derived from its seed and the step alone, so
  a sample's noise does not depend on its batch, its position in it, or a resumed run;
* :class:`GeneratorNoise` — a ``torch.Generator`` (diffusers' ``generator=``), drawn in step
  order for the whole batch;
* ``None`` — torch's global generator, as ``torch.randn`` (diffusers' and k-diffusion's
  default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["GeneratorNoise", "NoiseSource", "SeededNoise", "as_noise_source"]


@runtime_checkable
class NoiseSource(Protocol):
    """``source(step, like)``: standard normal noise shaped, typed and placed like ``like``
    for the ``draw``-th draw of grid step ``step`` (a step may draw more than once)."""

    def __call__(self, step: int, like: Tensor, draw: int = 0) -> Tensor: ...


class GeneratorNoise:
    """Noise from one ``torch.Generator`` (``None``: the global one), for the whole batch,
    in the order the steps ask for it — as diffusers' schedulers draw with ``generator=``."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, step: int, like: Tensor, draw: int = 0) -> Tensor:
        device = like.device if self.generator is None else self.generator.device
        z = torch.randn(like.shape, generator=self.generator, device=device, dtype=like.dtype)
        return z.to(like.device)


def _stream_seed(seed: int, step: int, draw: int) -> int:
    """A 63-bit generator seed for ``(seed, step, draw)``: a hash, so neighbouring seeds and
    steps give unrelated streams, and never the stream of the initial noise (``seed``)."""
    digest = hashlib.blake2b(f"diffsolve-sde:{seed}:{step}:{draw}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class SeededNoise:
    """Per-sample noise: sample ``i`` of the batch draws from a generator seeded with
    ``(seeds[i], step, draw)`` only. A sample's trajectory is then a function of its seed
    (batch size, order, shards and resumes do not change it), as its initial noise is
    (:func:`diffsolve.app.seeds.noise_for_seeds`)."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("SeededNoise: give one seed per sample")

    def __call__(self, step: int, like: Tensor, draw: int = 0) -> Tensor:
        if like.shape[0] != len(self.seeds):
            raise ValueError(
                f"SeededNoise: {len(self.seeds)} seeds for a batch of {like.shape[0]}; "
                "give one seed per sample"
            )
        generator = torch.Generator()
        rows = []
        for seed in self.seeds:
            generator.manual_seed(_stream_seed(seed, step, draw))
            rows.append(torch.randn(like.shape[1:], generator=generator, dtype=torch.float64))
        return torch.stack(rows).to(like.device, like.dtype)


def as_noise_source(noise: NoiseSource | torch.Generator | Sequence[int] | None) -> NoiseSource:
    """A :class:`NoiseSource` from what a caller passes: a source, a generator, a list of
    per-sample seeds, or ``None`` (torch's global generator)."""
    if noise is None or isinstance(noise, torch.Generator):
        return GeneratorNoise(noise)
    if isinstance(noise, Sequence) and not isinstance(noise, str):
        return SeededNoise(noise)
    if callable(noise):
        return noise
    raise TypeError(
        f"noise: expected a NoiseSource, a torch.Generator, a list of seeds or None, "
        f"got {type(noise).__name__}"
    )
