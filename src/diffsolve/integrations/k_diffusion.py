r"""k-diffusion-style entry points: sample a denoiser :math:`D(x, \sigma)` on a σ list.

k-diffusion, ComfyUI and EDM call a model in the EDM convention: :math:`x = x_0 + \sigma n`
and ``model(x, sigma * s_in, **extra_args)`` returns :math:`\hat x_0` (Karras et al. 2022).
That is diffsolve's :class:`~diffsolve.EDM` schedule (:math:`\alpha = 1`, :math:`\sigma = t`)
with a :class:`~diffsolve.ModelWrapper` predicting ``"x0"`` from time input ``"sigma"``; the
σ list is the step grid itself (a trailing 0 makes the last step return :math:`\hat x_0`, as in
k-diffusion). So every fixed-grid diffsolve solver runs on k-diffusion's σ lists::

    from diffsolve.integrations.k_diffusion import sample_denoiser

    x = sample_denoiser(denoiser, noise * sigmas[0], sigmas, solver="unipc-bh2-3")

:func:`make_sampler` turns any registry name into a function with k-diffusion's sampler
signature, and :func:`samplers` gives one per registry name (``sample_<name>``, as
k-diffusion's ``sample_dpmpp_2m``), so every registered solver is a k-diffusion sampler. A
solver that needs model statistics (DPM-Solver-v3) takes them from ``context``; for EMS of an
EDM model the EMS's own schedule is used, and the σ list must lie inside its range. A solver
schedule (``solver="schedule:FILE"``) applies its per-step choices on the σ list, which must
have its number of steps.

Nothing here imports k-diffusion. Differences from k-diffusion's ``sample_*`` functions: no
progress bar unless ``disable=False`` (library code has no side effects), and the callback's
``x`` is the sample *after* the step (k-diffusion passes the one before it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from diffsolve.ode.model import ModelWrapper
from diffsolve.ode.noise import NoiseSource
from diffsolve.ode.plan import Solver
from diffsolve.ode.sampling import StepInfo, sample
from diffsolve.ode.schedule import EDM, schedule_from_config
from diffsolve.solvers import DPMSolverPP
from diffsolve.solvers.registry import SOLVERS, SolverContext, preset
from diffsolve.solvers.solver_schedule import PREFIX, ems_digest, load_solver_schedule

__all__ = ["edm_schedule_for", "make_sampler", "resolve_solver", "sample_denoiser", "samplers"]

KCallback = Callable[[dict[str, Any]], None]
KSampler = Callable[..., Tensor]


def _sigmas(sigmas: Tensor | Sequence[float]) -> Tensor:
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError(f"sigmas: need at least 2 noise levels (1 step), got {s.numel()}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("sigmas: noise levels must be finite and >= 0")
    if not (s[1:] < s[:-1]).all():
        raise ValueError("sigmas: noise levels must be strictly decreasing (noisy to clean)")
    return s


def edm_schedule_for(
    sigmas: Tensor | Sequence[float], context: SolverContext | None = None
) -> EDM:
    """The :class:`~diffsolve.EDM` schedule of a σ list: the EMS's own when ``context``
    holds EMS (made for an EDM schedule), else the list's range (its largest σ and smallest
    positive one)."""
    if context is not None and context.ems is not None:
        return _ems_schedule(context)
    s = _sigmas(sigmas)
    sigma_max = float(s[0])
    sigma_min = float(s[s > 0].min())
    if not sigma_min < sigma_max:  # a single positive level: [sigma_max, 0]
        sigma_min = sigma_max / 2
    return EDM(sigma_min=sigma_min, sigma_max=sigma_max)


def _ems_schedule(context: SolverContext) -> EDM:
    """The EDM schedule the context's EMS were computed for (their λ range is checked by the
    solver's plan)."""
    made_for = (context.ems.metadata if context.ems is not None else {}).get("schedule")
    schedule = schedule_from_config(made_for) if made_for else None
    if not isinstance(schedule, EDM):
        raise ValueError(
            "the EMS were computed for a non-EDM schedule; the k-diffusion entry point "
            "samples D(x, sigma) in the EDM convention, so compute EMS for the model under "
            "diffsolve's EDM schedule"
        )
    return schedule


def resolve_solver(
    solver: Solver | str, steps: int, context: SolverContext | None = None
) -> Solver:
    """A :class:`~diffsolve.ode.plan.Solver`, or a registry name (``diffsolve solvers``)
    configured for a grid of ``steps`` steps (its needs read from ``context``)."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver.startswith(f"{PREFIX}:"):
        return _solver_schedule(solver, steps, context)
    spec = preset(solver)
    for nfe in range(max(2, steps), 3 * steps + 2):
        if spec.steps(nfe) == steps:
            return spec.build(nfe, context)
    raise ValueError(f"solver {solver!r} cannot run on a grid of {steps} step(s)")


def _solver_schedule(name: str, steps: int, context: SolverContext | None) -> Solver:
    """A solver-schedule file (``schedule:FILE``) on a σ list of its number of steps: its
    step choices apply per step on the user's σ (its own times are not used), with the EMS it
    was fitted with where a step integrates v3's feature."""
    fitted = load_solver_schedule(name.partition(":")[2])
    needed = len(fitted.times) - 1
    if steps != needed:
        jump = " (a Gaussian teleport, then one per evaluation)" if fitted.teleport else ""
        raise ValueError(
            f"solver {name!r} takes {needed} steps{jump}, one choice per step: pass "
            f"{needed + 1} sigmas (the last one 0 to return x0), not {steps + 1}"
        )
    ems = None if context is None else context.ems
    if ems is not None and fitted.ems is not None and ems_digest(ems) != fitted.ems:
        raise ValueError(
            f"solver {name!r} was fitted with other EMS ({fitted.ems}) than the context's "
            f"({ems_digest(ems)}); pass the EMS it was fitted with"
        )
    return preset(name).build(fitted.nfe, context)


def sample_denoiser(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    *,
    solver: Solver | str | None = None,
    context: SolverContext | None = None,
    grad: bool = False,
    noise_sampler: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    r"""Solve the probability-flow ODE (or, with a stochastic solver, the reverse SDE) of a
    k-diffusion denoiser with a diffsolve solver.

    Args:
        model: ``model(x, sigma, **extra_args) -> x0`` with ``sigma`` of shape ``(B,)``.
        x: The initial sample at ``sigmas[0]`` (noise already scaled: ``randn * sigmas[0]``).
        sigmas: Strictly decreasing noise levels, the step grid; may end with 0.
        extra_args: Keyword arguments for every model call (e.g. ``cond``).
        callback: Called after every step with k-diffusion's dict ``{"x", "i", "sigma",
            "sigma_hat", "denoised"}`` (``x`` after the step).
        disable: Show a progress bar only when ``False``.
        solver: A :class:`~diffsolve.ode.plan.Solver` or a registry name; default
            DPM-Solver++(2M) (:class:`~diffsolve.DPMSolverPP`, order 2). ``schedule:FILE``
            runs a solver schedule (``diffsolve tune --method solver-schedule``): its step
            choices on ``sigmas``, which must have one step per choice (and one for its
            teleport, which needs ``context.gaussian``).
        context: What a registry solver needs from the model (DPM-Solver-v3: ``ems``, made
            for diffsolve's EDM schedule).
        grad: Record autograd graphs (default: sample under ``no_grad``, as k-diffusion's
            samplers do).
        noise_sampler: A stochastic solver's noise, k-diffusion's
            ``noise_sampler(sigma, sigma_next)`` (default: ``torch.randn_like``, the global
            generator, as k-diffusion).

    Returns:
        The sample at ``sigmas[-1]``, in ``x``'s dtype.
    """
    s = _sigmas(sigmas)
    schedule = edm_schedule_for(s, context)
    method = resolve_solver(DPMSolverPP(2) if solver is None else solver, s.numel() - 1, context)
    denoiser = ModelWrapper(model, schedule, "x0", "sigma", model_kwargs=extra_args)
    step_callback = None if callback is None else _k_callback(callback, s)
    progress = disable is False
    noise = None if noise_sampler is None else _noise_source(noise_sampler, s)
    return sample(
        denoiser, x, method, s, callback=step_callback, progress=progress, grad=grad, noise=noise
    ).x


def _noise_source(
    noise_sampler: Callable[[Tensor, Tensor], Tensor], sigmas: Tensor
) -> NoiseSource:
    """k-diffusion's ``noise_sampler(sigma, sigma_next)`` as a :class:`NoiseSource`."""

    def source(step: int, like: Tensor, draw: int = 0) -> Tensor:
        return noise_sampler(sigmas[step], sigmas[step + 1]).to(like.device, like.dtype)

    return source


def _k_callback(callback: KCallback, sigmas: Tensor) -> Callable[[StepInfo], None]:
    def call(info: StepInfo) -> None:
        i = info.step - 1
        sigma = float(sigmas[i])
        callback(
            {"x": info.x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": info.denoised}
        )

    return call


def make_sampler(solver: Solver | str, context: SolverContext | None = None) -> KSampler:
    """A function with k-diffusion's sampler signature
    ``(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None)``
    running ``solver`` (for tools that accept a k-diffusion sampler function)."""

    def sampler(
        model: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor | Sequence[float],
        extra_args: Mapping[str, Any] | None = None,
        callback: KCallback | None = None,
        disable: bool | None = None,
        noise_sampler: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        return sample_denoiser(
            model,
            x,
            sigmas,
            extra_args,
            callback,
            disable,
            solver=solver,
            context=context,
            noise_sampler=noise_sampler,
        )

    name = solver if isinstance(solver, str) else type(solver).__name__
    sampler.__name__ = sampler_name(name)
    return sampler


def sampler_name(solver: str) -> str:
    """k-diffusion's spelling of a sampler: ``dpm-solver++-2m`` → ``sample_dpm_solverpp_2m``."""
    return f"sample_{solver}".replace("-", "_").replace("+", "p")


def samplers(context: SolverContext | None = None) -> dict[str, KSampler]:
    """One k-diffusion sampler per registry name, keyed by :func:`sampler_name` (solvers
    whose needs ``context`` cannot meet are left out)."""
    provided = (context or SolverContext()).provides()
    return {
        sampler_name(name): make_sampler(name, context)
        for name, spec in SOLVERS.items()
        if set(spec.needs) <= provided
    }
