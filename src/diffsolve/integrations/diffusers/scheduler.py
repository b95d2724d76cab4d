"""The scheduler base every diffsolve adapter shares, and the generation of one class per
solver (see :mod:`diffsolve.integrations.diffusers` for the contract)."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import (
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffsolve.integrations.diffusers import position
from diffsolve.integrations.diffusers.config import (
    FLOW_MATCH,
    GRID_KEYS,
    SIBLINGS,
    adapter_keys,
    check_grid_keys,
    check_ignored,
    check_refused,
    diffusers_schedule,
    ignored_keys,
    init_defaults,
    sibling_class,
)
from diffsolve.integrations.diffusers.outputs import Clipping, ddim_step
from diffsolve.integrations.diffusers.timesteps import (
    Steps,
    accepted,
    build_sibling,
    custom_steps,
    kind_steps,
    sibling_steps,
    solver_time,
)
from diffsolve.numerics.files import copy_atomic
from diffsolve.ode import grids
from diffsolve.ode.model import ModelWrapper, Prediction, normalize_prediction
from diffsolve.ode.plan import Plan, Solver, State
from diffsolve.ode.sampling import state_dtype
from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete
from diffsolve.solvers.engine import MultistepStep, StepPlan, check_choice
from diffsolve.solvers.registry import NEEDS, DiffusersMapping, solver_classes

GRID_KINDS = tuple(grids.GRIDS)
#: ``algorithm_type`` values of the sibling schedulers: a config taken over from one of them
#: falls back to the adapter's default, as diffusers does.
SIBLING_ALGORITHMS = ("dpmsolver", "dpmsolver++", "deis")
#: Where a flow-matching config's grid starts when a diffsolve grid kind replaces it.
FLOW_GRID_START = 1.0 - 1e-3


@dataclass
class DiffsolveSchedulerOutput(SchedulerOutput):
    """Output of :meth:`DiffsolveScheduler.step`.

    Attributes:
        prev_sample: The sample at the next grid time, in the input sample's dtype.
        pred_original_sample: The data prediction :math:`\\hat x_0` the step used (after
            thresholding or clipping).
    """

    pred_original_sample: Tensor | None = None


class _ReplayModel:
    """A :class:`~diffsolve.ode.model.Denoiser` that answers the plan's single model call of
    a multistep step with the prediction the adapter formed from the pipeline's output."""

    def __init__(self, schedule: NoiseSchedule, prediction: Prediction) -> None:
        self.schedule, self._prediction, self.calls = schedule, prediction, 0

    def __call__(self, x: Tensor, t: float) -> Prediction:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("a multistep plan evaluated the model twice in one step")
        return self._prediction


def _carried_over(config: Mapping[str, Any], source: str) -> list[str]:
    """Grid keys a scheduler config only carries over from another scheduler's (diffusers
    keeps the keys a class does not take in its config, and ignores them) that the
    step-placing ``source`` does not take either. The config's own class is the diffusers
    class its ``_class_name`` names (a saved config); a VP config built in code carries
    FlowMatch's own keys over (diffusers' SD3 recipe: the ``shift`` in
    ``DPMSolverMultistepScheduler.from_config(flow_match.config, use_flow_sigmas=True)``)."""
    name = config.get("_class_name")
    origin = getattr(diffusers, str(name), None) if name else None
    if isinstance(origin, type):
        theirs = set(init_defaults(origin))
    elif name or _is_flow_match(dict(config)):  # an adapter's own config, or FlowMatch's
        return []
    else:
        vp = [s for s in SIBLINGS if s != FLOW_MATCH]
        theirs = set().union(*(init_defaults(sibling_class(s)) for s in vp))
    placing = init_defaults(sibling_class(source))
    return sorted(k for k in GRID_KEYS & set(config) if k not in theirs and k not in placing)


def _is_flow_match(config: dict[str, Any]) -> bool:
    """Whether a config is a flow-matching scheduler's: by its class name, or (a scheduler
    built in code has none until saved) by FlowMatch's own keys without betas."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return True
    return "beta_start" not in config and bool({"shift", "base_shift"} & set(config))


def _check_decreasing(**custom: Sequence[float] | Tensor | None) -> None:
    """Custom timesteps or sigmas must be strictly decreasing (noisy to clean)."""
    for name, values in custom.items():
        if values is None:
            continue
        v = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
        bad = (v[1:] >= v[:-1]).nonzero().flatten()
        if bad.numel():
            i = int(bad[0]) + 1
            what = "duplicate time point" if v[i] == v[i - 1] else "rising value"
            raise ValueError(
                f"set_timesteps: custom {name} must be strictly decreasing; {what} "
                f"{float(v[i]):g} at index {i}"
            )


def _fit(solver: Solver, steps: int, trailing: int) -> Solver:
    """The solver for a plan of ``steps`` steps: its order at most ``steps`` (a loop started
    near its end: img2img, an unknown first timestep), and, before a repeated last point, its
    last step corrected with the evaluation there where it can (``final_corrector``)."""
    names = {f.name for f in fields(solver)} if is_dataclass(solver) else set()
    changes: dict[str, Any] = {}
    if "order" in names and solver.order > steps:
        changes["order"] = steps
    if trailing and "final_corrector" in names and getattr(solver, "corrector", True):
        changes["final_corrector"] = True
    return replace(solver, **changes) if changes else solver  # type: ignore[type-var]


def _second_order_last(plan: Plan[State], solver: Solver, moving: Tensor) -> Plan[State]:
    """Before a repeated last point, diffusers' ``lower_order_final`` lowers the last real
    step to order 2 at most (its zero-length step counts as the last): that step's
    predictor, and the final corrector after it, from the same solver at order 2."""
    n = moving.numel() - 1
    if solver.order < 3 or not isinstance(plan, StepPlan):
        return plan
    low = replace(solver, order=2).plan(plan.schedule, moving)  # type: ignore[type-var]
    assert isinstance(low, StepPlan)
    steps = list(plan.steps)
    last, lowered = steps[n - 1], low.steps[n - 1]
    if not (isinstance(last, MultistepStep) and isinstance(lowered, MultistepStep)):
        return plan
    steps[n - 1] = replace(last, predictor=lowered.predictor)
    return StepPlan(plan.schedule, plan.grid, (*steps[:n], *low.steps[n:]))


def _predictor(solver_p: Any) -> Any:
    """UniPC's ``solver_p``: a diffusers scheduler that takes UniP's place as the predictor
    (UniC still corrects), or ``None``."""
    if solver_p is not None and not all(
        callable(getattr(solver_p, name, None)) for name in ("set_timesteps", "step")
    ):
        raise ValueError(
            f"solver_p must be a diffusers scheduler (with set_timesteps and step) or None, "
            f"got {type(solver_p).__name__}"
        )
    return solver_p


#: Below this, diffusers' float32 :math:`\\bar\\alpha` is taken to have underflowed.
UNDERFLOW = 1e-30


def _exact_tail(ac: Tensor, exact: Tensor) -> Tensor:
    """diffusers' float32 :math:`\\bar\\alpha` (``ac``, in float64), continued by diffsolve's
    float64 values (``exact``) from the first one that underflowed (below
    :data:`UNDERFLOW` or no longer decreasing: linear betas from 0.01 to 0.2 reach 1e-49,
    0 in float32)."""
    ok = ac >= UNDERFLOW
    ok[1:] &= ac[1:] < ac[:-1]
    bad = (~ok).nonzero().flatten()
    if bad.numel() == 0 or exact.numel() != ac.numel():
        return ac
    j = int(bad[0])
    return torch.cat([ac[:j], exact[j:].to(ac)])


def _no_network(*args: Any, **kwargs: Any) -> Tensor:
    raise RuntimeError("the scheduler adapter never calls a network")


class DiffsolveScheduler(SchedulerMixin, ConfigMixin):
    """Base of the diffsolve schedulers: drives any diffsolve *multistep* plan from a
    diffusers pipeline loop (one model evaluation per step, diffusers' ``order = 1``).

    Concrete classes are generated per solver by :func:`scheduler_class`.
    """

    _compatibles: ClassVar[list[str]] = [
        *(e.name for e in KarrasDiffusionSchedulers),
        FLOW_MATCH,
    ]
    order: ClassVar[int] = 1
    #: The initial noise is standard normal, as for diffusers' VP and flow schedulers.
    init_noise_sigma: ClassVar[float] = 1.0
    #: Set to True to differentiate through :meth:`step` (it runs under ``no_grad``
    #: otherwise).
    differentiable: bool = False
    #: The solver the scheduler runs by default, and how its config maps onto the solver.
    solver_class: ClassVar[type[Solver]]
    mapping: ClassVar[DiffusersMapping]

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """diffusers' ``from_config``; a flow-matching scheduler's config (SD3, Flux) becomes
        rectified flow with velocity prediction and FlowMatch's step placement. A flow config
        without ``clip_sample`` does not clip (x0 in flow space, often latents, is not in
        [-1, 1]), and grid keys the config only carries over from another scheduler's (the
        ``shift`` of a FlowMatch config in the ``DPMSolverMultistepScheduler`` config of
        diffusers' SD3 recipe) are ignored where the step-placing scheduler has none, as
        diffusers ignores them; passed as keywords, they are checked."""
        config = dict(config or {})
        if "timestep_source" not in config and _is_flow_match(config):
            config.update(prediction_type="flow_prediction", timestep_source=FLOW_MATCH)
        merged = {**config, **kwargs}
        flow = _is_flow_match(config) or bool(merged.get("use_flow_sigmas"))
        if flow and "clip_sample" in inspect.signature(cls.__init__).parameters:
            config.setdefault("clip_sample", False)
        for key in _carried_over(config, cls._source_of(merged)):
            del config[key]
        return super().from_config(config, return_unused_kwargs, **kwargs)

    def _setup(self) -> None:
        """Check every key, build the step-placing sibling, the schedule and the solver's
        needs; no plan until :meth:`set_timesteps`."""
        c = self.config
        check_refused(c, ignored_keys(self.mapping))
        check_ignored(c, self.mapping)
        self._adopt_solver_keys()
        self._source = self._grid_source()
        if c.grid is not None:
            check_choice(c.grid, GRID_KINDS, "grid")
        check_grid_keys(c, self._source, self._key_defaults())
        self._flow = bool(c.use_flow_sigmas) or self._source == FLOW_MATCH
        checked = self._checked_schedule()
        self._sibling = build_sibling(self._source, c)
        self.schedule: NoiseSchedule = self._make_schedule(checked)
        self._wrapper = ModelWrapper(
            _no_network, self.schedule, normalize_prediction(c.prediction_type)
        )
        self._clipping = Clipping.from_config(c)
        self._solver_p = _predictor(c.get("solver_p"))
        self._solver_cls = self._algorithm()
        self._needs = {need: self._load_need(need) for need in self.solver_needs()}
        self._reset()
        self.build_solver(1 << 20)  # check the solver options now, not at the first loop

    @classmethod
    def _key_defaults(cls) -> dict[str, Any]:
        """The adapter's config keys and their defaults."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.default is not p.empty}

    def _grid_source(self) -> str:
        """The diffusers scheduler whose ``set_timesteps`` places the steps."""
        return self._source_of(self.config)

    @classmethod
    def _source_of(cls, config: Mapping[str, Any]) -> str:
        """The step-placing scheduler of a config: ``timestep_source``, else the sibling
        (DPM-Solver's for flow sigmas where the sibling has none)."""
        source = config.get("timestep_source")
        if source is not None:
            check_choice(source, SIBLINGS, "timestep_source")
            return str(source)
        sibling = cls.mapping.sibling
        has_flow = "use_flow_sigmas" in init_defaults(sibling_class(sibling))
        if config.get("use_flow_sigmas") and not has_flow:
            return "DPMSolverMultistepScheduler"  # DDIM has no flow sigmas
        return sibling

    def _checked_schedule(self) -> NoiseSchedule:
        """diffsolve's float64 schedule of the config (built first, for clear errors).
        ``trained_betas`` define it whatever their number: diffusers takes betas whose
        length differs from ``num_train_timesteps``, and so do the adapters, until a
        placement reaches past them (:func:`~.timesteps.sibling_steps`)."""
        c = self.config
        n = c.num_train_timesteps if c.trained_betas is None else len(c.trained_betas)
        return diffusers_schedule(
            n,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas,
            c.get("rescale_betas_zero_snr", False),
            self._flow,
        )

    def _make_schedule(self, checked: NoiseSchedule) -> NoiseSchedule:
        """Rectified flow up to ``t = 1``, or the VP schedule of the sibling's own
        :math:`\\bar\\alpha` (what the model was trained with) — continued by ``checked``'s
        float64 values where diffusers' float32 ones underflow."""
        c = self.config
        ac = getattr(self._sibling, "alphas_cumprod", None)
        if self._flow or ac is None:
            return checked
        ac = ac.detach().to("cpu", torch.float64).clone()
        if c.get("rescale_betas_zero_snr", False):
            ac[-1] = 0.0  # diffsolve's monotone stand-in replaces diffusers' 2^-24
            return VPDiscrete(ac)
        assert isinstance(checked, VPDiscrete)
        return VPDiscrete(_exact_tail(ac, checked.alphas_cumprod))

    def _adopt_solver_keys(self) -> None:
        """Check the solver's keys with a list of choices. A value that belongs to a sibling
        scheduler (a config taken over with ``from_config`` from, say, UniPC's ``bh2`` into
        DPM-Solver++) becomes this scheduler's default, as diffusers does; anything else is
        an error."""
        for name, key in self.mapping.keys.items():
            value = self.config[name]
            if key.choices is None or value in key.choices:
                continue
            if value in key.siblings:
                self.register_to_config(**{name: key.default})
            else:
                check_choice(value, key.choices, name)
        algorithms = self.mapping.algorithms
        if algorithms and self.config.algorithm_type not in algorithms:
            if self.config.algorithm_type in SIBLING_ALGORITHMS:
                self.register_to_config(algorithm_type=next(iter(algorithms)))
            else:
                check_choice(self.config.algorithm_type, list(algorithms), "algorithm_type")

    def _algorithm(self) -> type[Solver]:
        """The solver ``algorithm_type`` names (the default solver where it names none)."""
        if not self.mapping.algorithms:
            return self.solver_class
        name = self.mapping.algorithms[self.config.algorithm_type]
        return next(cls for cls in solver_classes() if cls.name == name)

    def solver_needs(self) -> tuple[str, ...]:
        """What the solver takes from the model (a ``<need>_path`` key loads each)."""
        return tuple(self._solver_cls.needs)

    def _files(self) -> list[str]:
        """The config keys that name files :meth:`save_pretrained` copies next to the
        config."""
        return [f"{need}_path" for need in self.solver_needs()]

    def _load_need(self, need: str) -> Any:
        """Load the file ``<need>_path`` names and check it against the schedule."""
        path, spec = self.config[f"{need}_path"], NEEDS[need]
        if path is None:
            raise ValueError(
                f"{need}_path: {type(self).__name__} needs {spec.what}; {spec.hint}, and pass "
                f"{need}_path=... to from_config / the constructor"
            )
        value = spec.load(path)
        spec.check(value, self.schedule)
        return value

    def _reset(self) -> None:
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._steps: Steps | None = None
        self._plan: Plan[State] | None = None
        self._state: State | None = None
        self._last_output: Tensor | None = None
        self._start = 0
        self._index: int | None = None
        self._begin_index: int | None = None
        #: Zero-length steps (a repeated grid point) the plan leaves out: they return their
        #: sample.
        self._skipped: frozenset[int] = frozenset()

    def build_solver(self, num_steps: int, trailing: int = 0) -> Solver:
        """The solver for a loop of ``num_steps`` steps: the config's options, the order
        capped at the number of steps, diffusers' rule for ``lower_order_final``. With
        ``trailing`` zero-length last steps (DEIS repeats its last sigma), diffusers' lowered
        last step is one of those, and the last real step keeps its order, at most 2
        (:func:`_second_order_last`)."""
        options = self.mapping.options(self.config)
        if "order" in options:
            options["order"] = min(options["order"], num_steps)
        below = self.mapping.lower_order_final_below
        if below is not None and "lower_order_final" in options:
            options["lower_order_final"] = options["lower_order_final"] and num_steps < below
        if trailing and "lower_order_final" in options:
            options["lower_order_final"] = False
        return self._solver_cls(**self._needs, **options)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ---- diffusers attributes pipelines read --------------------------------------------
    def _tables(self) -> Any:
        """A diffusers scheduler holding the config's ``betas``, ``alphas``,
        ``alphas_cumprod``: the sibling, or (FlowMatch has none) a ``DDPMScheduler`` of the
        config's beta keys, as diffusers' DPM-Solver keeps for its flow mode."""
        if hasattr(self._sibling, "betas"):
            return self._sibling
        c = self.config
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        return diffusers.DDPMScheduler(**{k: c[k] for k in keys if k in c})

    @property
    def alphas_cumprod(self) -> Tensor:
        """:math:`\\bar\\alpha_i` of the config's betas (float32, diffusers' own)."""
        return self._tables().alphas_cumprod

    @property
    def alphas(self) -> Tensor:
        """:math:`1 - \\beta_i`."""
        return self._tables().alphas

    @property
    def betas(self) -> Tensor:
        """:math:`\\beta_i`."""
        return self._tables().betas

    # ---- time maps ---------------------------------------------------------------------
    def solver_time(self, timesteps: Tensor | Sequence[float] | float) -> Tensor:
        """Solver time ``t`` (float64) of network timesteps (inverse of :attr:`timesteps`)."""
        invert = bool(self.config.invert_sigmas) and self._flow
        return solver_time(self.schedule, timesteps, self.config.num_train_timesteps, invert)

    def index_for_timestep(
        self, timestep: float | Tensor, schedule_timesteps: Tensor | None = None
    ) -> int:
        """Index of ``timestep`` in :attr:`timesteps`, as diffusers' multistep schedulers find
        it: the second match when it repeats (so that an img2img start never skips a step),
        the last index when it is not there."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        found = position.matches(schedule, timestep, rtol=1e-4, atol=1e-3)
        if not found:
            return len(schedule) - 1
        return found[1 if len(found) > 1 else 0]

    # ---- timesteps ---------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Place the steps, build the solver's plan and a fresh state (nothing survives from
        an earlier loop).

        Args:
            num_inference_steps: Model evaluations; placed as the sibling scheduler places
                them (or on the diffsolve grid ``grid`` names).
            device: Where :attr:`timesteps` and :attr:`sigmas` live (and the solver's
                statistics: DPM-Solver-v3 plans there).
            timesteps: Custom, strictly decreasing network timesteps.
            sigmas: Custom, strictly decreasing diffusers sigmas (σ/α for VP, flow σ); a
                trailing 0 is optional.
            mu: Dynamic shift (``use_dynamic_shifting``, Flux).
        """
        steps = self._make_steps(num_inference_steps, timesteps, sigmas, mu)
        self._reset()
        self._steps = steps
        if device is not None:  # statistics where the pipeline runs: v3 plans there
            self._needs = {
                k: v.to(device) if hasattr(v, "to") else v for k, v in self._needs.items()
            }
        self._build(0)
        self.timesteps = steps.timesteps.to(device)
        self.sigmas = steps.sigmas.to(device)
        self.num_inference_steps = len(steps.timesteps)
        if self._solver_p is not None:  # as diffusers' UniPC sets its solver_p's steps
            self._solver_p.set_timesteps(self.num_inference_steps, device=device)

    def _make_steps(
        self,
        n: int | None,
        timesteps: Sequence[float] | Tensor | None,
        sigmas: Sequence[float] | Tensor | None,
        mu: float | None,
    ) -> Steps:
        given = timesteps is not None or sigmas is not None
        _check_decreasing(timesteps=timesteps, sigmas=sigmas)
        if timesteps is not None and sigmas is not None and self._source != FLOW_MATCH:
            raise ValueError("set_timesteps: pass timesteps or sigmas, not both")
        if not given and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
        invert = bool(self.config.invert_sigmas) and self._flow
        n_train = self.config.num_train_timesteps
        # diffusers' VP schedulers take custom sigmas only for flow (UniPC); diffsolve maps
        # VP sigmas itself
        flow_sigmas = sigmas if self._flow else None
        custom = accepted(self._sibling, timesteps=timesteps, sigmas=flow_sigmas, mu=mu)
        if given and n is not None and not ({"timesteps", "sigmas"} & set(custom)):
            raise ValueError(
                "set_timesteps: pass exactly one of num_inference_steps, timesteps, sigmas"
            )
        if mu is not None and "mu" not in custom:
            raise ValueError(
                f"set_timesteps: mu (dynamic shifting) is not a {self._source} argument; use a "
                "flow-matching config with use_dynamic_shifting=True"
            )
        delegated = (timesteps is None or "timesteps" in custom) and (
            sigmas is None or "sigmas" in custom
        )
        if self.config.grid is None and delegated:
            return sibling_steps(self._sibling, self.schedule, n, custom, invert)
        if given:
            return custom_steps(self.schedule, timesteps, sigmas, n_train, invert)
        kind = self.config.grid
        shift = self.config.shift if self._source == FLOW_MATCH else self.config.flow_shift
        shift = float(np.exp(mu)) if mu is not None else float(shift)
        return kind_steps(self.schedule, n, kind, n_train, shift, FLOW_GRID_START)  # type: ignore[arg-type]

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` (img2img): the plan is rebuilt on the rest of the
        grid, starting afresh at first order, as diffusers' multistep schedulers do."""
        if self._steps is None:
            raise ValueError("set_begin_index: call set_timesteps() first")
        n = len(self._steps.timesteps)
        if not isinstance(begin_index, int) or not 0 <= begin_index < n:
            raise ValueError(
                f"begin_index must be an integer in [0, {n - 1}], got {begin_index!r}"
            )
        self._build(begin_index)
        self._begin_index = begin_index

    def _build(self, start: int) -> None:
        """The plan from pipeline step ``start`` on. A timestep the sibling repeats (DPM-Solver's
        ``linspace`` placement at 1000 steps, a repeated last sigma) is a zero-length step: it
        is left out of the plan, and :meth:`step` returns its sample unchanged — except at a
        repeated last point, where a solver that can correct its last step with one more
        evaluation (UniPC's ``final_corrector``) does so with the evaluation there, as
        diffusers' UniPC applies its corrector there."""
        assert self._steps is not None
        grid = self._steps.grid[start:]
        same = grid[1:] == grid[:-1]
        moving = torch.cat([grid[:1], grid[1:][~same]])
        zero = [start + int(j) for j in same.nonzero().flatten()]
        trailing = int(grid.numel() > 1 and bool(same[-1]))
        plan = None
        if moving.numel() > 1:  # else every step left is zero-length
            n = len(self._steps.timesteps)
            solver = _fit(self.build_solver(n, trailing), moving.numel() - 1, trailing)
            plan = solver.plan(self.schedule, moving)
            if trailing and getattr(self.build_solver(n), "lower_order_final", False):
                plan = _second_order_last(plan, solver, moving)
            if plan.num_steps is None or plan.nfe != plan.num_steps:
                raise ValueError(
                    f"{type(self).__name__}: the solver must take one model evaluation per "
                    f"step (a multistep method) to run as a diffusers scheduler; its plan "
                    f"{type(plan).__name__} takes {plan.nfe} for {plan.num_steps} steps"
                )
            if getattr(solver, "final_corrector", False):
                zero = zero[:-1]
        self._plan, self._state, self._last_output, self._start = plan, None, None, start
        self._index, self._skipped = None, frozenset(zero)

    @property
    def grid(self) -> Tensor | None:
        """The current loop's grid in diffsolve solver time (``None`` before
        :meth:`set_timesteps`): ``sample()`` on it equals the loop (a repeated point, a
        zero-length step, is taken once)."""
        return None if self._steps is None else self._steps.grid.unique_consecutive()

    @property
    def begin_index(self) -> int | None:
        """The first step set by :meth:`set_begin_index` (``None`` if it was not called)."""
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """Index into :attr:`timesteps` of the next step (``None`` before the first)."""
        return self._index

    # ---- the loop ------------------------------------------------------------------------
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Identity: the network takes :math:`x_t` as it is (VP and flow)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> DiffsolveSchedulerOutput | tuple[Tensor, ...]:
        """Advance one step with the network output at ``(sample, timestep)``.

        Args:
            model_output: Raw network output, shaped like ``sample`` (or with twice its
                channels when ``variance_type`` is ``learned``/``learned_range``).
            timestep: The timestep the network was called with. The first step of a loop
                without :meth:`set_begin_index` starts where this timestep is (img2img, as
                diffusers; a timestep not in :attr:`timesteps` is the last step, as in
                diffusers' multistep schedulers); later ones must follow :attr:`timesteps`.
                DDIM adapters step from any timestep, as diffusers' DDIM: from its grid
                point to the next (a listed one), or to the first grid point below it.
            sample: The current sample. When it is the tensor the previous step returned,
                the scheduler continues from its own float32 copy.
            eta: DDIM's stochasticity (DDIM adapters; 0 elsewhere).
            use_clipped_model_output: DDIM: recompute :math:`\\hat\\epsilon` from the clipped
                :math:`\\hat x_0` (DDIM adapters; ``None``/``False`` elsewhere).
            generator: Draws the noise of ``eta > 0`` (DDIM) or of a stochastic solver's
                step (``algorithm_type="sde-dpmsolver++"``), as diffusers draws it.
            variance_noise: That noise itself, instead of drawing it.
            return_dict: Return a :class:`DiffsolveSchedulerOutput` (else a tuple).

        The step runs under ``torch.no_grad()`` unless :attr:`differentiable` is set.
        """
        self._check_step_options(eta, use_clipped_model_output)
        i, state = self._current_state(timestep, sample)
        s, t_next = self._interval(i, state)
        output = self._model_output(model_output, sample).to(state.x.dtype)
        raw = Prediction(state.x, output, self._wrapper.conversion(s), s)
        used = self._clipping.apply(raw)
        with contextlib.nullcontext() if self.differentiable else torch.no_grad():
            base = state.x
            if i is not None and i not in self._skipped:
                assert self._plan is not None
                state = self._with_noise(state, model_output, generator, variance_noise)
                state = self._plan.step(_ReplayModel(self.schedule, used), state)
                base = state.x_prev if state.x_prev is not None else base
            if self.mapping.sibling == "DDIMScheduler":
                noise = self._ddim_noise(eta, model_output, generator, variance_noise)
                mixed = self._clipping.active and not use_clipped_model_output
                state = self._ddim_update(
                    state, i is None, raw, used, (s, t_next), eta, mixed, noise
                )
            if self._solver_p is not None:  # UniPC's solver_p: it predicts, UniC corrects
                prev = self._solver_p.step(model_output, timestep, base.clone()).prev_sample
                state = replace(state, x=prev.to(state.x.dtype))
        self._index = i + 1 if i is not None else position.ddim_target(self._steps.grid, s)
        self._state = state if i is not None else None
        prev = state.x.to(sample.dtype)
        self._last_output = prev
        if not return_dict:
            return (prev,)
        return DiffsolveSchedulerOutput(
            prev_sample=prev, pred_original_sample=used.x0.to(sample.dtype)
        )

    def _with_noise(
        self,
        state: State,
        model_output: Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: Tensor | None,
    ) -> State:
        """A stochastic solver's state with this step's noise: ``variance_noise``, or one
        float32 draw from ``generator`` shaped like ``model_output`` — diffusers' draw, at
        every step, so the same generator gives the same samples."""
        if not getattr(self._plan, "stochastic", False):
            return state
        if variance_noise is None:
            shape, device = model_output.shape, model_output.device
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            noise = variance_noise.to(model_output.device, torch.float32)

        def source(step: int, like: Tensor, draw: int = 0) -> Tensor:
            return noise.to(like.device, like.dtype).reshape(like.shape)

        return replace(state, noise=source)

    def _check_step_options(self, eta: float, use_clipped: bool | None) -> None:
        if self.mapping.sibling == "DDIMScheduler":
            if not (isinstance(eta, (int, float)) and 0.0 <= eta < math.inf):
                raise ValueError(f"eta must be a number >= 0, got {eta!r}")
            return
        if eta:
            raise ValueError(
                f"eta={eta!r}: {type(self).__name__} is deterministic; eta applies to DDIM "
                "(DiffsolveDDIMScheduler)"
            )
        if use_clipped:
            raise ValueError(
                "use_clipped_model_output applies to DDIM's step (DiffsolveDDIMScheduler)"
            )

    def _current_state(self, timestep: float | Tensor, sample: Tensor) -> tuple[int | None, State]:
        """This step's index into :attr:`timesteps` and the state it starts from (the first
        step finds its index from ``timestep`` when no begin index was set; ``None``: a DDIM
        step from a timestep off the grid)."""
        if self._steps is None:
            raise ValueError(f"{type(self).__name__}.step: call set_timesteps() before step()")
        if self.mapping.sibling == "DDIMScheduler":
            return self._ddim_state(timestep, sample)
        if self._index == len(self.timesteps):
            raise ValueError(
                f"{type(self).__name__}.step: all {len(self.timesteps)} steps are done; call "
                "set_timesteps() to start a new loop"
            )
        state, i = self._state, self._index
        if i is None:
            i, known = self._start, True
            if self._begin_index is None:
                i, known = position.first_index(self.timesteps, timestep)
                if i != self._start:
                    self._build(i)
            state = self._init_state(sample)
            if not known:  # diffusers' multistep schedulers: the last step
                return i, state
        elif sample is not self._last_output:  # the pipeline changed the sample (e.g. masks)
            state = replace(state, x=sample.to(state.x.dtype))  # type: ignore[union-attr]
        self._check_timestep(timestep, i)
        return i, state  # type: ignore[return-value]

    def _ddim_state(self, timestep: float | Tensor, sample: Tensor) -> tuple[int | None, State]:
        """DDIM steps from any timestep, as diffusers' DDIM: a listed one from its grid point
        (the plan restarts there unless it is the next step), another one from its own
        solver time (index ``None``)."""
        found = position.matches(self.timesteps, timestep)
        if not found:
            t = float(self.solver_time(position.timestep_value(timestep)).flatten()[0])
            if not 0.0 < t <= self.schedule.t_max * (1 + 1e-12):
                raise ValueError(
                    f"step: timestep {position.timestep_value(timestep):g} lies outside the "
                    f"schedule (solver time {t:g} not in (0, {self.schedule.t_max:g}]); pass "
                    "one of scheduler.timesteps"
                )
            return None, State(x=sample.to(state_dtype(sample.dtype)), t=t)
        k = found[0]
        if k == self._index and self._state is not None:
            state = self._state
            if sample is not self._last_output:
                state = replace(state, x=sample.to(state.x.dtype))
            return k, state
        if self._index is not None or k != self._start:
            self._build(k)
        return k, self._init_state(sample)

    def _init_state(self, sample: Tensor) -> State:
        """The state a loop starts from at step :attr:`_start`."""
        x = sample.to(state_dtype(sample.dtype))
        if self._plan is not None:
            return self._plan.init(x)
        assert self._steps is not None
        return State(x=x, t=float(self._steps.grid[self._start]))

    def _interval(self, i: int | None, state: State) -> tuple[float, float]:
        """Solver times this step goes from and to (a DDIM step off the grid: from its own
        time to the first grid point below)."""
        assert self._steps is not None
        grid = self._steps.grid
        if i is None:
            return state.t, float(grid[position.ddim_target(grid, state.t)])
        return float(grid[i]), float(grid[i + 1])

    def _ddim_update(
        self,
        state: State,
        off_grid: bool,
        raw: Prediction,
        used: Prediction,
        interval: tuple[float, float],
        eta: float,
        mixed: bool,
        noise: Tensor | None,
    ) -> State:
        """diffusers' DDIM step where it is not the plan's ODE step: off the grid, with
        ``eta > 0``, or with a clipped :math:`\\hat x_0` and the unclipped
        :math:`\\hat\\epsilon` (``mixed``: clipping without ``use_clipped_model_output``),
        zero-length steps included (``set_alpha_to_one=False`` with ``steps_offset=0``)."""
        if not (off_grid or eta or mixed):
            return state
        eps = raw.eps if mixed else used.eps
        return replace(state, x=self._ddim(used.x0, eps, *interval, eta, noise))

    def _ddim(
        self, x0: Tensor, eps: Tensor, s: float, t: float, eta: float, noise: Tensor | None
    ) -> Tensor:
        log_s = self.schedule.log_alpha_sigma(torch.tensor(s, dtype=torch.float64))
        log_t = self.schedule.log_alpha_sigma(torch.tensor(t, dtype=torch.float64))
        a_s, s_s, a_t, s_t = (float(torch.exp(v)) for v in (*log_s, *log_t))
        return ddim_step(x0, eps, a_s, s_s, a_t, s_t, float(eta), noise)

    @staticmethod
    def _ddim_noise(
        eta: float, like: Tensor, generator: Any, variance_noise: Tensor | None
    ) -> Tensor | None:
        if not eta:
            return None
        if variance_noise is not None:
            return variance_noise
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _get_variance(self, timestep: int | Tensor, prev_timestep: int | Tensor) -> Tensor:
        """diffusers' ``DDIMScheduler._get_variance``: the variance of DDIM's step from
        ``timestep`` to ``prev_timestep`` at :math:`\\eta = 1` (Song et al. 2021, eq. 16),
        :math:`(1 - \\bar\\alpha_{prev})/(1 - \\bar\\alpha_t)\\,(1 - \\bar\\alpha_t/
        \\bar\\alpha_{prev})`, on the config's float32 :math:`\\bar\\alpha` (a negative
        ``prev_timestep``: the final :math:`\\bar\\alpha` of ``set_alpha_to_one``)."""
        tables = self._tables()
        ac = tables.alphas_cumprod
        final = getattr(tables, "final_alpha_cumprod", torch.tensor(1.0))
        a_t = ac[timestep]
        a_prev = ac[prev_timestep] if int(prev_timestep) >= 0 else final
        return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

    def _model_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        if (
            self.config.variance_type in ("learned", "learned_range")
            and model_output.ndim >= 2
            and model_output.shape[1] == 2 * sample.shape[1]
        ):
            model_output = model_output[:, : sample.shape[1]]
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has "
                f"{tuple(sample.shape)}; they must match"
            )
        if self._flow and self.config.invert_sigmas:
            return -model_output  # velocity in inverted time
        return model_output

    def _check_timestep(self, timestep: float | Tensor, i: int) -> None:
        expected = float(self.timesteps[i])
        ts = torch.as_tensor(timestep).detach().to("cpu", torch.float64).flatten()
        if ts.numel() == 0:
            raise ValueError("step: timestep is empty")
        # 1% covers timesteps rounded to bfloat16/float16 by a pipeline.
        close = torch.full_like(ts, expected)
        if not torch.allclose(ts, close, rtol=position.RTOL, atol=position.ATOL):
            raise ValueError(
                f"{type(self).__name__}.step: expected timestep {expected:g} (step "
                f"{i} of {len(self.timesteps)}), got "
                f"{ts[0].item():g}; loop over scheduler.timesteps in order and call "
                "set_timesteps() before every new loop"
            )

    # ---- img2img ---------------------------------------------------------------------------
    def _noise_levels(self, timesteps: float | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`\\alpha, \\sigma` at network ``timesteps`` (the grid's own point for this
        loop's timesteps), shaped to broadcast against ``like``."""
        ts = torch.as_tensor(timesteps).detach().flatten()
        if ts.numel() not in (1, like.shape[0]):
            raise ValueError(
                f"got {ts.numel()} timesteps for a batch of {like.shape[0]}; pass one or one "
                "per sample"
            )
        t = self.solver_time(ts)
        if self._steps is not None and self.timesteps.numel():
            for j, value in enumerate(ts):
                found = position.matches(self.timesteps, value, rtol=1e-4, atol=1e-3)
                if found:  # this loop's own grid point (the second of repeated ones)
                    t[j] = self._steps.grid[found[1 if len(found) > 1 else 0]]
        if (t <= 0).any() or (t > self.schedule.t_max * (1 + 1e-12)).any():
            raise ValueError(
                f"timesteps map outside the schedule's range (0, {self.schedule.t_max}]"
            )
        shape = (-1,) + (1,) * (like.ndim - 1)
        log_alpha, log_sigma = self.schedule.log_alpha_sigma(t)
        alpha = log_alpha.exp().reshape(shape).to(like.device, like.dtype)
        return alpha, log_sigma.exp().reshape(shape).to(like.device, like.dtype)

    def add_noise(
        self, original_samples: Tensor, noise: Tensor, timesteps: float | Tensor
    ) -> Tensor:
        """Forward process :math:`x_t = \\alpha_t x_0 + \\sigma_t \\epsilon` at network
        ``timesteps`` (a scalar or one per sample)."""
        alpha, sigma = self._noise_levels(timesteps, original_samples)
        return alpha * original_samples + sigma * noise.to(original_samples.dtype)

    def scale_noise(
        self, sample: Tensor, timestep: float | Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """Flow matching's forward process, :math:`x_t = (1 - \\sigma) x_0 + \\sigma
        \\epsilon` (FlowMatch's ``scale_noise``; any schedule's :math:`\\alpha, \\sigma`)."""
        if noise is None:
            raise ValueError("scale_noise: pass the noise to mix in")
        return self.add_noise(sample, noise, timestep)

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """Save the config and copy each file it names (the statistics' ``<need>_path``, a
        solver schedule's file) next to it, stored as a path relative to the folder, so the
        folder works on any machine (each copy written atomically,
        :mod:`diffsolve.numerics.files`)."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_pretrained: {folder} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        saved = {}
        for key in self._files():
            source = self.config[key]
            target = folder / Path(source).name
            if Path(source).resolve() != target.resolve():
                copy_atomic(source, target)
            saved[key] = target.name
        original = {k: self.config[k] for k in saved}
        self.register_to_config(**saved)
        try:
            super().save_pretrained(folder, push_to_hub=push_to_hub, **kwargs)
        finally:
            self.register_to_config(**original)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str] | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """diffusers' ``from_pretrained``; relative statistics paths resolve against the
        folder the config is in."""
        config, kwargs = cls.load_config(
            pretrained_model_name_or_path,
            subfolder=subfolder,
            return_unused_kwargs=True,
            return_commit_hash=False,
            **kwargs,
        )
        folder = Path(str(pretrained_model_name_or_path)) / (subfolder or "")
        for key, value in list(config.items()):
            relative = isinstance(value, str) and not Path(value).is_absolute()
            if key.endswith("_path") and relative and (folder / value).exists():
                config[key] = str(folder / value)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)


# ---------------------------------------------------------------------------------------
# One scheduler class per solver, generated from its declaration
def scheduler_keys(solver: type[Solver]) -> dict[str, Any]:
    """A solver's scheduler config keys and their defaults
    (:func:`~diffsolve.integrations.diffusers.config.adapter_keys`)."""
    return adapter_keys(solver.diffusers, solver.needs)  # type: ignore[attr-defined]


_GENERATED: dict[type[Solver], type[DiffsolveScheduler]] = {}


def scheduler_class(solver: type[Solver]) -> type[DiffsolveScheduler]:
    """The diffusers scheduler class of a solver that declares a
    :class:`~diffsolve.solvers.registry.DiffusersMapping` (made once, then cached)."""
    if solver in _GENERATED:
        return _GENERATED[solver]
    mapping = getattr(solver, "diffusers", None)
    if not isinstance(mapping, DiffusersMapping):
        raise ValueError(f"{solver.__name__} declares no diffusers mapping")
    keys = scheduler_keys(solver)
    summary = next(iter((solver.__doc__ or "").strip().splitlines()), solver.__name__)
    doc = (
        f"{solver.__name__} ({summary}) as a drop-in for diffusers' {mapping.sibling}. "
        f"Config keys: {', '.join(keys)} (see :mod:`diffsolve.integrations.diffusers` and "
        f":class:`{solver.__module__}.{solver.__name__}`)."
    )
    cls = adapter_class(DiffsolveScheduler, solver, mapping, keys, doc)
    _GENERATED[solver] = cls
    return cls


def adapter_class(
    base: type[DiffsolveScheduler],
    solver: type[Solver],
    mapping: DiffusersMapping,
    keys: Mapping[str, Any],
    doc: str,
) -> type[DiffsolveScheduler]:
    """A scheduler class ``mapping.scheduler`` derived from ``base``, whose constructor takes
    the config ``keys`` (with their defaults) and registers them with diffusers."""
    signature = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [
            inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
            for k, v in keys.items()
        ]
    )

    def init(self: DiffsolveScheduler, *args: Any, **kwargs: Any) -> None:
        signature.bind(self, *args, **kwargs)  # a TypeError names an unknown argument
        self._setup()

    init.__signature__ = signature  # type: ignore[attr-defined]
    init.__name__ = "__init__"
    init.__qualname__ = f"{mapping.scheduler}.__init__"
    return type(
        mapping.scheduler,
        (base,),
        {
            "__init__": register_to_config(init),
            "__doc__": doc,
            "__module__": "diffsolve.integrations.diffusers",
            "solver_class": solver,
            "mapping": mapping,
        },
    )


def scheduler_classes() -> dict[str, type[DiffsolveScheduler]]:
    """Every registered solver's scheduler class, by class name."""
    out = {}
    for solver in solver_classes():
        if isinstance(getattr(solver, "diffusers", None), DiffusersMapping):
            cls = scheduler_class(solver)
            out[cls.__name__] = cls
    return out
