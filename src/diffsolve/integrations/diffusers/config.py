r"""diffusers scheduler configs in diffsolve terms: the schedule a config describes, the
config keys each adapter takes, and what becomes of each key.

Every key an adapter takes is **honoured** or **refused** with a ``ValueError`` naming it:

* *schedule keys* (``num_train_timesteps``, ``beta_*``, ``trained_betas``,
  ``rescale_betas_zero_snr``, ``prediction_type``, ``variance_type``, ``use_flow_sigmas``)
  define the :class:`~diffsolve.NoiseSchedule` and how the network's output reads;
* *grid keys* (:data:`GRID_KEYS`: ``timestep_spacing``, ``steps_offset``, the Karras /
  exponential / beta / Lu sigmas, ``final_sigmas_type``, ``lambda_min_clipped``, the flow
  shifts, …) go to the diffusers scheduler whose ``set_timesteps`` places the steps (the
  adapter's *sibling*, or ``timestep_source``), so they mean exactly what they mean there;
  a grid key that scheduler does not have must keep its default;
* *output keys* (``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``,
  ``clip_sample``, ``clip_sample_range``) act on :math:`\hat x_0` as the sibling does;
* *step keys* (:data:`STEP_KEYS`: UniPC's ``solver_p``) act on the step as the sibling's do;
* *solver keys* (``solver_order``, ``solver_type``, ``algorithm_type``, …) become the solver's
  options through its :class:`~diffsolve.solvers.registry.DiffusersMapping`; a sibling's
  ``algorithm_type`` / ``solver_type`` that the solver has no choice of (DPM-Solver-v3) is
  accepted and ignored (:data:`IGNORED`).

Refused: the SDE variants of ``algorithm_type`` and FlowMatch's ``stochastic_sampling``
(diffsolve's solvers are ODE solvers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diffusers
import numpy as np
import torch
from torch import Tensor

from diffsolve.ode.schedule import NoiseSchedule, RectifiedFlow, VPDiscrete
from diffsolve.solvers.registry import SIBLING_SOLVER_TYPES, DiffusersMapping

_F64 = torch.float64

#: The diffusers schedulers whose step placement (``set_timesteps``) the adapters reproduce.
SIBLINGS = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"

SCHEDULE_KEYS = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "rescale_betas_zero_snr",
        "prediction_type",
        "variance_type",
        "use_flow_sigmas",
        "flow_shift",
    }
)
#: Keys that place the steps: handed to the scheduler that builds the grid.
GRID_KEYS = frozenset(
    {
        "timestep_spacing",
        "steps_offset",
        "set_alpha_to_one",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "final_sigmas_type",
        "lambda_min_clipped",
        "use_dynamic_shifting",
        "time_shift_type",
        "sigma_min",
        "sigma_max",
        "shift_terminal",
        "shift",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
        "invert_sigmas",
    }
)
OUTPUT_KEYS = frozenset(
    {
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "clip_sample",
        "clip_sample_range",
    }
)
#: Keys the adapter applies at each step itself: UniPC's ``solver_p`` (a diffusers scheduler
#: that predicts in UniP's place; UniC still corrects).
STEP_KEYS = frozenset({"solver_p"})
#: Keys of a sibling's config an adapter accepts and ignores where its solver has no such
#: choice (DPM-Solver-v3: its update is set by its statistics), with the values accepted:
#: the sibling's own and those of the configs ``from_config`` takes over from other
#: schedulers.
IGNORED: dict[str, tuple[Any, ...]] = {
    "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver", "deis"),
    "solver_type": SIBLING_SOLVER_TYPES,
}
#: Values refused, with the reason.
REFUSED: dict[str, dict[Any, str]] = {
    "stochastic_sampling": {
        True: "stochastic sampling is not implemented (diffsolve's solvers are ODE solvers)"
    },
}
#: ``variance_type`` values: ``learned*`` outputs carry a variance half that is dropped.
VARIANCE_TYPES = (
    None,
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)


def sibling_class(name: str) -> type:
    """The diffusers scheduler class ``name`` (one of :data:`SIBLINGS`)."""
    if name not in SIBLINGS:
        raise ValueError(f"timestep_source must be one of {list(SIBLINGS)}, got {name!r}")
    return getattr(diffusers, name)


def init_defaults(cls: type) -> dict[str, Any]:
    """The constructor keys of a diffusers scheduler and their defaults."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}


def adapter_keys(mapping: DiffusersMapping, needs: Sequence[str]) -> dict[str, Any]:
    """An adapter's config keys with their defaults: its sibling's schedule, grid and output
    keys, flow matching's keys (any adapter runs a FlowMatch config), ``algorithm_type``
    where the mapping names algorithms, the solver's keys, ``<need>_path`` per statistic
    the solver needs, and diffsolve's ``grid`` and ``timestep_source``."""
    sibling = init_defaults(sibling_class(mapping.sibling))
    ours = SCHEDULE_KEYS | GRID_KEYS | OUTPUT_KEYS | STEP_KEYS
    keys = {k: v for k, v in sibling.items() if k in ours}
    for k, v in init_defaults(sibling_class(FLOW_MATCH)).items():
        keys.setdefault(k, v)
    keys.setdefault("prediction_type", "epsilon")
    keys.setdefault("variance_type", None)
    keys.setdefault("use_flow_sigmas", False)
    keys.setdefault("flow_shift", 1.0)
    if mapping.algorithms:
        keys["algorithm_type"] = sibling.get("algorithm_type", next(iter(mapping.algorithms)))
    keys.update({f"{need}_path": None for need in needs})
    keys.update({k: key.default for k, key in mapping.keys.items()})
    for key in ignored_keys(mapping):
        keys[key] = sibling[key]
    keys.update({"grid": None, "timestep_source": None})
    return keys


def ignored_keys(mapping: DiffusersMapping) -> list[str]:
    """The :data:`IGNORED` keys of an adapter: its sibling's that its solver's mapping does
    not take."""
    taken = set(mapping.keys) | ({"algorithm_type"} if mapping.algorithms else set())
    sibling = init_defaults(sibling_class(mapping.sibling))
    return [key for key in IGNORED if key in sibling and key not in taken]


def check_ignored(config: Mapping[str, Any], mapping: DiffusersMapping) -> None:
    """An ignored key (:func:`ignored_keys`) must still hold one of its accepted values."""
    for key in ignored_keys(mapping):
        if config.get(key) not in IGNORED[key]:
            raise ValueError(
                f"{key} must be one of {list(IGNORED[key])} (accepted and ignored: this "
                f"scheduler has no {key} choice), got {config.get(key)!r}"
            )


def check_refused(config: Mapping[str, Any], ignored: Sequence[str] = ()) -> None:
    """Raise for a refused value (:data:`REFUSED`; not of an ``ignored`` key) or an unknown
    ``variance_type``."""
    for key, values in REFUSED.items():
        value = None if key in ignored else config.get(key)
        if isinstance(value, (str, bool)) and value in values:
            raise ValueError(f"{key}={value!r}: {values[value]}")
    if config.get("variance_type") not in VARIANCE_TYPES:
        raise ValueError(
            f"variance_type must be one of {list(VARIANCE_TYPES)}, got "
            f"{config.get('variance_type')!r}"
        )


def check_grid_keys(config: Mapping[str, Any], source: str, defaults: Mapping[str, Any]) -> None:
    """Grid keys the step-placing scheduler ``source`` does not have must keep their
    defaults (else they would be ignored)."""
    theirs = init_defaults(sibling_class(source))
    for key in sorted(GRID_KEYS & set(config)):
        if key not in theirs and key in defaults and config[key] != defaults[key]:
            having = [s for s in SIBLINGS if key in init_defaults(sibling_class(s))]
            raise ValueError(
                f"{key}={config[key]!r}: the steps are placed by {source}, which has no "
                f"{key!r}; leave it at {defaults[key]!r}, or pick a timestep_source that "
                f"has it ({', '.join(having)})"
            )


# ---------------------------------------------------------------------------------------
# Schedules
def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    r"""Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Alg. 1: shift and scale :math:`\sqrt{\bar\alpha}` so that its last value is 0 and its first
    is unchanged (zero terminal SNR). Computed in float64; :class:`~diffsolve.VPDiscrete` then
    stands in a small positive value for the final :math:`\bar\alpha = 0` (diffusers'
    :math:`2^{-24}` where that keeps the schedule decreasing)."""
    root = alphas_cumprod.to(_F64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def diffusers_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | np.ndarray | Tensor | None = None,
    rescale_betas_zero_snr: bool = False,
    use_flow_sigmas: bool = False,
) -> NoiseSchedule:
    """The :class:`~diffsolve.NoiseSchedule` a diffusers scheduler config describes.

    Discrete VP schedules are computed in float64 (diffusers uses float32), exactly as
    :meth:`VPDiscrete.from_diffusers` does for diffsolve's own model folders; with
    ``use_flow_sigmas`` the schedule is :class:`~diffsolve.RectifiedFlow` up to ``t = 1``
    (flow matching starts from pure noise).
    """
    if use_flow_sigmas:
        return RectifiedFlow(t_max=1.0)
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(
            f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}"
        )
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps is "
                f"{num_train_timesteps}; they must match"
            )
        schedule = _betas_checked(lambda: VPDiscrete.from_betas(betas), "trained_betas")
    else:
        schedule = _betas_checked(
            lambda: VPDiscrete.from_diffusers(
                beta_schedule,  # type: ignore[arg-type]
                beta_start,
                beta_end,
                num_train_timesteps,
            ),
            f"beta_start={beta_start!r}, beta_end={beta_end!r}",
        )
    if rescale_betas_zero_snr:
        schedule = VPDiscrete(rescale_zero_terminal_snr(schedule.alphas_cumprod))
    return schedule


def _betas_checked(build: Callable[[], VPDiscrete], keys: str) -> VPDiscrete:
    """``build()``, with betas outside (0, 1) refused naming the config keys."""
    try:
        return build()
    except ValueError as err:
        if not str(err).startswith("betas"):
            raise
        raise ValueError(
            f"{keys}: every beta must lie in (0, 1) (1 - beta is the signal a training step "
            "keeps; diffusers' alphas_cumprod turns negative beyond, and its sigmas NaN); "
            "pick betas below 1"
        ) from None


def shift_flow_times(t: Tensor, shift: float, t_max: float) -> Tensor:
    r"""The resolution shift of SD3/Flux, :math:`t \mapsto st/(1 + (s - 1)t)`, rescaled so that
    ``t_max`` stays fixed. ``t = 0`` stays 0; monotonicity is preserved."""
    if not shift > 0:
        raise ValueError(f"flow_shift must be > 0, got {shift!r}")

    def f(x: Tensor) -> Tensor:
        return shift * x / (1.0 + (shift - 1.0) * x)

    return f(t) * (t_max / float(f(torch.tensor(t_max, dtype=_F64))))
