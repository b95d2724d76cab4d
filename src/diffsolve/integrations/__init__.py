"""Bridges to other sampling ecosystems; each submodule imports its peer lazily.

* :mod:`diffsolve.integrations.diffusers` — diffsolve's multistep solvers as drop-in diffusers
  schedulers (``pipe.scheduler = DiffsolveUniPCScheduler.from_config(pipe.scheduler.config)``),
  and the conversion of the demo ``DigitsUNet`` into a diffusers ``UNet2DModel``. It is the only
  module of diffsolve that imports diffusers.
* :mod:`diffsolve.integrations.k_diffusion` — k-diffusion-style entry points: sample a denoiser
  :math:`D(x, \\sigma)` on a σ list with any diffsolve solver. Needs no k-diffusion install.

Importing this package imports neither peer.
"""
