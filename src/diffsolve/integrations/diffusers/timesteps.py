r"""Where a diffusers loop steps: the grid in diffsolve's solver time, the network
timesteps and diffusers' sigmas, from the scheduler that places the steps.

By default the steps are exactly the sibling diffusers scheduler's: the adapter builds that
scheduler from the same config and calls its ``set_timesteps``, so every grid key means what
it means there. Its sigmas become solver times — :math:`t = \sigma` for flow matching
(:math:`1 - \sigma` with ``invert_sigmas``); for VP the time whose :math:`\sigma/\alpha` is the
sigma, which is the training step :math:`t = (i + 1)/N` itself wherever the sigma is that
step's — and its ``timesteps`` are handed to the network unchanged (integers for VP). DDIM,
which has no sigmas, steps from timestep to timestep and ends at :math:`\bar\alpha = 1`
(``set_alpha_to_one``, ``t = 0``) or :math:`\bar\alpha_0` (``t = 1/N``).

With ``grid=<kind>`` (a diffsolve grid kind) the registry's grid replaces the sibling's, and
the timesteps are the fractional network times of its points.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsolve.integrations.diffusers.config import (
    FLOW_MATCH,
    GRID_KEYS,
    SCHEDULE_KEYS,
    init_defaults,
    shift_flow_times,
    sibling_class,
)
from diffsolve.ode import grids
from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete
from diffsolve.solvers.registry import nfe_grid

_F64 = torch.float64


@dataclass(frozen=True)
class Steps:
    """One loop's steps.

    Attributes:
        grid: Solver times, float64, one more than the steps; the model is evaluated at all
            but the last.
        timesteps: What the network is called with at each step.
        sigmas: diffusers' sigmas at the grid points (σ/α for VP, σ for flow).
    """

    grid: Tensor
    timesteps: Tensor
    sigmas: Tensor


def build_sibling(source: str, config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler ``source`` built from the config's schedule and grid keys
    (its own errors become ``ValueError``\\ s that name it)."""
    cls = sibling_class(source)
    theirs = init_defaults(cls)
    keys = (SCHEDULE_KEYS | GRID_KEYS) - {"prediction_type", "variance_type"}
    kwargs = {k: config[k] for k in keys if k in theirs and k in config}
    try:
        return cls(**kwargs)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise ValueError(f"{source} rejects this config: {err}") from None


def sibling_steps(
    sibling: Any,
    schedule: NoiseSchedule,
    num_inference_steps: int | None,
    custom: Mapping[str, Any],
    invert: bool = False,
) -> Steps:
    """The steps of ``sibling.set_timesteps(num_inference_steps, **custom)`` (``custom``:
    the ``timesteps`` / ``sigmas`` / ``mu`` arguments it accepts)."""
    try:
        sibling.set_timesteps(num_inference_steps, device="cpu", **custom)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise ValueError(f"set_timesteps: {type(sibling).__name__} refuses: {err}") from None
    timesteps = sibling.timesteps.detach().cpu()
    if isinstance(schedule, VPDiscrete):
        check_placement(sibling, schedule, num_inference_steps, custom)
    if type(sibling).__name__ == "DDIMScheduler":
        return _ddim_steps(sibling, schedule, timesteps)
    sigmas = sibling.sigmas.detach().to("cpu", torch.float32)
    if not isinstance(schedule, VPDiscrete):  # flow matching: t = sigma
        t = sigmas.to(_F64)
        return Steps(_checked(schedule, 1.0 - t if invert else t), timesteps, sigmas)
    ac = sibling.alphas_cumprod.detach().to("cpu", _F64)
    return Steps(_vp_times(schedule, sigmas.to(_F64), timesteps, ac), timesteps, sigmas)


def _placement_problem(timesteps: Tensor, n_trained: int) -> str | None:
    """What is wrong with a VP placement: a timestep past the trained ones, or every step at
    one timestep (``leading`` spacing with more steps than training steps per step)."""
    top = int(timesteps.max())
    if top >= n_trained:
        return f"places timestep {top}, beyond the trained ones (0 to {n_trained - 1})"
    if timesteps.numel() > 1 and bool((timesteps == timesteps[0]).all()):
        return f"places all {timesteps.numel()} steps at timestep {int(timesteps[0])}"
    return None


def check_placement(
    sibling: Any, schedule: VPDiscrete, steps: int | None, custom: Mapping[str, Any]
) -> None:
    """Refuse a VP placement the schedule cannot run (:func:`_placement_problem`): SD 1.5 /
    SDXL configs (``leading`` spacing, ``steps_offset=1``) at 999 or 1000 steps, or
    ``trained_betas`` fewer than ``num_train_timesteps`` — naming the keys and the step count
    that works."""
    n_trained = schedule.num_train_timesteps
    problem = _placement_problem(sibling.timesteps.detach().cpu(), n_trained)
    if problem is None:
        return
    c, name = sibling.config, type(sibling).__name__
    if c.get("trained_betas") is not None and n_trained != c.num_train_timesteps:
        raise ValueError(
            f"set_timesteps: {name} {problem}: trained_betas has {n_trained} values but "
            f"num_train_timesteps is {c.num_train_timesteps}; make them equal"
        )
    fewer = _fewest_fix(sibling, steps, n_trained) if not custom else None
    fixes = [f"use at most {fewer} steps" if fewer else "use fewer steps"]
    if "beyond" in problem and c.get("steps_offset"):
        fixes.append("steps_offset=0")
    fixes.append("timestep_spacing='trailing'")
    raise ValueError(
        f"set_timesteps({steps}): {name} {problem} (timestep_spacing="
        f"{c.get('timestep_spacing')!r}, steps_offset={c.get('steps_offset')}); "
        + ", ".join(fixes[:-1])
        + f" or {fixes[-1]}"
    )


def _fewest_fix(sibling: Any, steps: int | None, n_trained: int) -> int | None:
    """The largest step count below ``steps`` (up to 8 fewer) the sibling places well."""
    if steps is None:
        return None
    fresh = type(sibling).from_config(sibling.config)
    for fewer in range(steps - 1, max(steps - 9, 0), -1):
        fresh.set_timesteps(fewer, device="cpu")
        if _placement_problem(fresh.timesteps.detach().cpu(), n_trained) is None:
            return fewer
    return None


def _vp_times(schedule: VPDiscrete, sigmas: Tensor, timesteps: Tensor, ac: Tensor) -> Tensor:
    """Solver times of diffusers' VP sigmas: the training step :math:`(i + 1)/N` where the
    sigma is that step's own (to float32 round-off; an infinite one where diffusers' float32
    :math:`\bar\alpha` underflowed), else the time of that σ/α."""
    n = schedule.num_train_timesteps
    own = ((1.0 - ac) / ac).sqrt()
    t = torch.zeros_like(sigmas)
    for j, sigma in enumerate(sigmas.tolist()):
        if sigma == 0.0:
            continue
        i = int(timesteps[j]) if j < timesteps.numel() else 0  # the final sigma_min: step 0
        close = abs(sigma - float(own[i])) <= 1e-6 * float(own[i]) + 1e-12
        close = close or math.isinf(sigma)
        t[j] = (i + 1) / n if close else float(schedule.t_of_edm_sigma(sigma))
    return _checked(schedule, _clamp_start(schedule, t))


def _checked(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """``t`` after checking it as a grid with its repeated points (zero-length steps, which
    the scheduler skips) taken once."""
    grids.validate_grid(schedule, t.unique_consecutive())
    return t


def _clamp_start(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Times past ``t_max`` by float32 round-off of a sigma (``< 1e-6``) are ``t_max``."""
    over = (t > schedule.t_max) & (t <= schedule.t_max * (1 + 1e-6))
    return torch.where(over, torch.full_like(t, schedule.t_max), t)


def _ddim_steps(sibling: Any, schedule: NoiseSchedule, timesteps: Tensor) -> Steps:
    """DDIM steps from timestep to timestep, then to :math:`\\bar\\alpha = 1` (``t = 0``)
    or :math:`\\bar\\alpha_0` (``t = 1/N``) as ``set_alpha_to_one`` says. A last timestep
    0 with ``set_alpha_to_one=False`` (``steps_offset=0``) is a zero-length last step, as in
    diffusers: its sample is returned, with :math:`\\hat x_0` clipped where the config
    clips."""
    assert isinstance(schedule, VPDiscrete)
    n = schedule.num_train_timesteps
    t = (timesteps.to(_F64) + 1.0) / n
    end = 0.0 if float(sibling.final_alpha_cumprod) == 1.0 else 1.0 / n
    grid = _checked(schedule, torch.cat([t, torch.tensor([end], dtype=_F64)]))
    return Steps(grid, timesteps, diffusers_sigmas(schedule, grid, invert=False))


def custom_steps(
    schedule: NoiseSchedule,
    timesteps: Sequence[float] | Tensor | None,
    sigmas: Sequence[float] | Tensor | None,
    n_train: int,
    invert: bool,
) -> Steps:
    """Steps on a user's ``timesteps`` or ``sigmas`` (strictly decreasing noise; a trailing
    zero sigma is optional: the last step then returns :math:`\\hat x_0`)."""
    if timesteps is not None:
        given = torch.as_tensor(timesteps).detach().cpu()
        t = solver_time(schedule, given, n_train, invert)
    else:
        s = torch.as_tensor(sigmas).detach().to("cpu", _F64).flatten()
        t = t_of_sigmas(schedule, s, invert)
        given = None
    t = t.flatten()
    if t.numel() == 0:
        raise ValueError("set_timesteps: custom timesteps/sigmas must not be empty")
    if float(t[-1]) != 0.0:
        t = torch.cat([t, torch.zeros(1, dtype=_F64)])
    grid = grids.validate_grid(schedule, t)
    if given is None or given.numel() != grid.numel() - 1:
        given = model_times(schedule, grid[:-1], n_train, invert)
    return Steps(grid, given, diffusers_sigmas(schedule, grid, invert))


def kind_steps(
    schedule: NoiseSchedule,
    steps: int,
    kind: str,
    n_train: int,
    shift: float = 1.0,
    flow_t_start: float = 1.0 - 1e-3,
) -> Steps:
    """Steps on the registry's grid of ``kind`` (:func:`~diffsolve.solvers.registry.nfe_grid`),
    with the flow resolution ``shift`` applied to flow grids (started at ``flow_t_start``)."""
    if isinstance(schedule, VPDiscrete):
        grid = nfe_grid(schedule, steps, kind)
    else:
        grid = nfe_grid(schedule, steps, kind, t_start=flow_t_start)
        if shift != 1.0:
            grid = shift_flow_times(grid, shift, flow_t_start)
    grid = grids.validate_grid(schedule, grid)
    timesteps = model_times(schedule, grid[:-1], n_train, False)
    return Steps(grid, timesteps, diffusers_sigmas(schedule, grid, False))


# ---------------------------------------------------------------------------------------
# Time maps
def solver_time(
    schedule: NoiseSchedule, timesteps: Any, n_train: int, invert: bool = False
) -> Tensor:
    """Solver time of network timesteps: :math:`(i + 1)/N` for VP, :math:`i/N` for flow
    (:math:`1 - i/N` with ``invert_sigmas``)."""
    ts = torch.as_tensor(timesteps).detach().to("cpu", _F64)
    if isinstance(schedule, VPDiscrete):
        return schedule.t_of_timestep(ts)
    return 1.0 - ts / n_train if invert else ts / n_train


def model_times(schedule: NoiseSchedule, t: Tensor, n_train: int, invert: bool) -> Tensor:
    """The network timesteps of solver times (inverse of :func:`solver_time`), float32."""
    if isinstance(schedule, VPDiscrete):
        return schedule.timestep(t).to(torch.float32)
    return ((1.0 - t if invert else t) * n_train).to(torch.float32)


def t_of_sigmas(schedule: NoiseSchedule, sigmas: Tensor, invert: bool) -> Tensor:
    """Solver times of diffusers' sigmas (σ/α for VP, σ for flow)."""
    if not isinstance(schedule, VPDiscrete):
        return 1.0 - sigmas if invert else sigmas.clone()
    t = torch.zeros_like(sigmas)
    t[sigmas > 0] = schedule.t_of_edm_sigma(sigmas[sigmas > 0])
    return _clamp_start(schedule, t)


def diffusers_sigmas(schedule: NoiseSchedule, t: Tensor, invert: bool) -> Tensor:
    """diffusers' sigmas of solver times: σ/α for VP (0 at ``t = 0``), σ for flow."""
    if not isinstance(schedule, VPDiscrete):
        return (1.0 - t if invert else t).to(torch.float32)
    out = torch.zeros_like(t)
    out[t > 0] = schedule.edm_sigma(t[t > 0])
    return out.to(torch.float32)


def accepted(sibling: Any, **arguments: Any) -> dict[str, Any]:
    """The ``set_timesteps`` arguments (not ``None``) that the sibling accepts."""
    params = inspect.signature(sibling.set_timesteps).parameters
    return {k: v for k, v in arguments.items() if v is not None and k in params}


__all__ = [
    "FLOW_MATCH",
    "Steps",
    "accepted",
    "build_sibling",
    "custom_steps",
    "diffusers_sigmas",
    "kind_steps",
    "model_times",
    "sibling_steps",
    "solver_time",
    "t_of_sigmas",
]
