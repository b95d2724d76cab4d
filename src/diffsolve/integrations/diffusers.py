r"""diffsolve's multistep solvers as drop-in diffusers schedulers.

This is the only module of diffsolve that imports diffusers. Usage::

    from diffsolve.integrations.diffusers import DiffsolveUniPCScheduler

    pipe.scheduler = DiffsolveUniPCScheduler.from_config(pipe.scheduler.config)
    images = pipe(num_inference_steps=10).images

**How a scheduler maps onto diffsolve** (``reference/style-anchors.md``, "Diffusers adapter").
The diffusers config (``num_train_timesteps``, ``beta_*``, ``trained_betas``,
``prediction_type``, …; unknown keys are ignored) defines the :class:`~diffsolve.NoiseSchedule`.
:meth:`DiffsolveScheduler.set_timesteps` builds the step grid (by default the registry's policy,
:func:`diffsolve.solvers.registry.nfe_grid`: ``num_inference_steps`` model evaluations, the last step
returning :math:`\hat x_0` at ``t = 0``), the solver's float64 coefficient plan, and a fresh
state: nothing from an earlier loop survives (the stale-state bug class of diffusers #8711).
:meth:`DiffsolveScheduler.step` reads the raw model output with the configured prediction type
at the current solver time (:class:`~diffsolve.ode.model.Conversion`) and advances the plan by an
internal step counter; the ``timestep`` argument is only checked, never looked up, so repeated
timesteps cannot confuse it (diffusers #12771). The result equals :func:`diffsolve.sample` on
the same grid (``tests/test_integrations_diffusers.py``).

**Time units.** ``timesteps`` are what the network takes: for a discrete VP schedule the
fractional training timestep :math:`tN - 1` (solver time :math:`t = (i + 1)/N`); for rectified
flow (``use_flow_sigmas=True``) :math:`1000\,\sigma = 1000\,t`. ``sigmas`` are diffusers'
sigmas: :math:`\sigma/\alpha` for VP, the flow σ for flow, with a trailing 0.

**Deliberate differences from diffusers' schedulers.** ``init_noise_sigma`` is the schedule's
:math:`\sigma` at the first grid time (:math:`\approx 0.99998` for DDPM's linear betas, not 1.0),
as in :func:`diffsolve.sample`; the state is kept in at least float32 between steps even when the
pipeline runs in float16; ``clip_sample`` / ``thresholding`` are not applied (thresholding wraps
the model in diffsolve, it is not a solver flag); ``timestep_spacing`` / ``steps_offset`` are
ignored in favour of diffsolve's grids (pass ``timesteps=`` or ``sigmas=`` for a custom one).

The module also converts the demo :class:`~diffsolve.app.nets.DigitsUNet` into diffusers' own
``UNet2DModel`` (:func:`digits_unet_to_diffusers`): same layers, renamed weights, so a
``DDPMPipeline`` folder needs no custom code (``scripts/export_diffusers_demo.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

try:
    from diffusers import UNet2DModel
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import (
        KarrasDiffusionSchedulers,
        SchedulerMixin,
        SchedulerOutput,
    )
except ImportError as _err:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "diffsolve.integrations.diffusers needs the diffusers package; install it with "
        "`pip install 'diffusers>=0.30'` (or `pip install 'diffsolve[bench]'`)"
    ) from _err

from diffsolve.ode import grids
from diffsolve.stats.ems import EMS, load_ems
from diffsolve.ode.model import ModelWrapper, Prediction, normalize_prediction
from diffsolve.app.nets import DigitsUNet
from diffsolve.solvers.registry import SOLVERS, nfe_grid
from diffsolve.ode.sampling import state_dtype
from diffsolve.ode.schedule import NoiseSchedule, RectifiedFlow, VPDiscrete
from diffsolve.solvers import DDIM, DEIS, DPMSolverPP, Solver, UniPC
from diffsolve.solvers.engine import Plan, State, check_choice
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3

__all__ = [
    "DPMSolverV3Scheduler",
    "DiffsolveDDIMScheduler",
    "DiffsolveDEISScheduler",
    "DiffsolveDPMSolverPPScheduler",
    "DiffsolveScheduler",
    "DiffsolveSchedulerOutput",
    "DiffsolveUniPCScheduler",
    "diffusers_schedule",
    "digits_unet_to_diffusers",
    "rescale_zero_terminal_snr",
]

_F64 = torch.float64
GRID_KINDS = tuple(grids.GRIDS)
#: Grid kind when neither the config nor the registry names one.
DEFAULT_GRID = "time_quadratic"
#: ``solver_type`` values of diffusers' and diffsolve's multistep schedulers.
_SOLVER_TYPES = ("midpoint", "heun", "taylor", "logrho", "bh1", "bh2")


# ---------------------------------------------------------------------------------------
# Schedules from diffusers configs
def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    r"""Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Alg. 1: shift and scale :math:`\sqrt{\bar\alpha}` so that its last value is 0 and its first
    is unchanged (zero terminal SNR). Computed in float64; :class:`~diffsolve.VPDiscrete` then
    raises the final :math:`\bar\alpha = 0` to :math:`2^{-24}`, as diffusers does."""
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
    ``use_flow_sigmas`` the schedule is :class:`~diffsolve.RectifiedFlow`.
    """
    if use_flow_sigmas:
        return RectifiedFlow()
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
        schedule = VPDiscrete.from_betas(betas)
    else:
        schedule = VPDiscrete.from_diffusers(
            beta_schedule,
            beta_start,
            beta_end,
            num_train_timesteps,  # type: ignore[arg-type]
        )
    if rescale_betas_zero_snr:
        schedule = VPDiscrete(rescale_zero_terminal_snr(schedule.alphas_cumprod))
    return schedule


def shift_flow_times(t: Tensor, shift: float, t_max: float) -> Tensor:
    r"""The resolution shift of SD3/Flux, :math:`t \mapsto st/(1 + (s - 1)t)`, rescaled so that
    ``t_max`` stays fixed (the shift alone would push it past the clipped end of
    :class:`~diffsolve.RectifiedFlow`). ``t = 0`` stays 0; monotonicity is preserved."""
    if not shift > 0:
        raise ValueError(f"flow_shift must be > 0, got {shift!r}")

    def f(x: Tensor) -> Tensor:
        return shift * x / (1.0 + (shift - 1.0) * x)

    return f(t) * (t_max / float(f(torch.tensor(t_max, dtype=_F64))))


# ---------------------------------------------------------------------------------------
@dataclass
class DiffsolveSchedulerOutput(SchedulerOutput):
    """Output of :meth:`DiffsolveScheduler.step`.

    Attributes:
        prev_sample: The sample at the next grid time, in the input sample's dtype.
        pred_original_sample: The model's data prediction :math:`\\hat x_0` at this step.
    """

    pred_original_sample: Tensor | None = None


class _ReplayModel:
    """A :class:`~diffsolve.ode.model.Denoiser` that answers the plan's single model call of a
    multistep step with the output the pipeline already computed."""

    def __init__(self, wrapper: ModelWrapper, output: Tensor) -> None:
        self.schedule = wrapper.schedule
        self._wrapper, self._output = wrapper, output
        self.calls = 0

    def __call__(self, x: Tensor, t: float) -> Prediction:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("a multistep plan evaluated the model twice in one step")
        return Prediction(x, self._output, self._wrapper.conversion(t), t)


def _no_network(*args: Any, **kwargs: Any) -> Tensor:
    raise RuntimeError("the scheduler adapter never calls a network")


class DiffsolveScheduler(SchedulerMixin, ConfigMixin):
    """Base of the diffsolve schedulers: drives any diffsolve *multistep* plan from a
    diffusers pipeline loop (one model evaluation per step, diffusers' ``order = 1``).

    A concrete scheduler is a diffusers-style ``__init__`` decorated with
    ``@register_to_config`` (it lists the shared config keys below plus its own and ends with
    ``self._setup()``) and :meth:`build_solver`. A DPM-Solver-v3 scheduler adds an EMS path to
    its config and loads the statistics in :meth:`build_solver`.

    Shared config keys:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr: the discrete VP schedule, as in ``DDPMScheduler``.
        prediction_type: ``epsilon``, ``sample``, ``v_prediction``, ``flow_prediction`` (and
            diffsolve's names, see :func:`diffsolve.ode.model.normalize_prediction`).
        variance_type: ``learned`` / ``learned_range`` drop the variance half of a model
            output with twice the sample's channels; other values are ignored.
        use_flow_sigmas, flow_shift: rectified flow (σ = t; network time 1000 σ) and the
            SD3-style resolution shift of its grid.
        grid: diffsolve grid kind (``logsnr``, ``time_uniform``, ``time_quadratic``,
            ``karras``); ``None`` takes the registry's default for the solver.
        lower_order_final: lower the order on the last steps (see the solvers).
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order: ClassVar[int] = 1
    #: Registry entry whose default grid kind the scheduler uses (see ``diffsolve solvers``).
    registry_name: ClassVar[str] = "ddim"

    # ---- construction ----------------------------------------------------------------
    def _setup(self) -> None:
        """Build the schedule and time map from ``self.config``; no plan until
        :meth:`set_timesteps`."""
        c = self.config
        self.schedule: NoiseSchedule = diffusers_schedule(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas,
            c.rescale_betas_zero_snr,
            c.use_flow_sigmas,
        )
        if c.grid is not None:
            check_choice(c.grid, GRID_KINDS, "grid")
        if c.use_flow_sigmas:
            n = c.num_train_timesteps
            time_input: Any = lambda t: t * n  # noqa: E731 - network time 1000 σ for flow
        else:
            time_input = "timestep"
        self._wrapper = ModelWrapper(
            _no_network, self.schedule, normalize_prediction(c.prediction_type), time_input
        )
        self.init_noise_sigma = self.schedule.init_noise_sigma()
        self._reset()
        self.build_solver(1 << 20)  # check the solver options now, not at the first loop

    def _reset(self) -> None:
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._grid: Tensor | None = None
        self._plan: Plan | None = None
        self._state: State | None = None
        self._last_output: Tensor | None = None
        self._begin_index = 0

    def _adopt_solver_type(self, value: str, allowed: Sequence[str], default: str) -> None:
        """Check ``solver_type``. A value that belongs to a sibling scheduler (a config taken
        over with ``from_config`` from, say, UniPC's ``bh2`` into DPM-Solver++) becomes this
        scheduler's default, as diffusers does; anything else is an error."""
        if value in allowed:
            return
        if value in _SOLVER_TYPES:
            self.register_to_config(solver_type=default)
            return
        check_choice(value, allowed, "solver_type")

    def build_solver(self, num_steps: int) -> Solver:
        """The multistep solver for a grid of ``num_steps`` steps (subclasses)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ---- time maps ---------------------------------------------------------------------
    def solver_time(self, timesteps: Tensor | Sequence[float] | float) -> Tensor:
        """Solver time ``t`` (float64) of network timesteps (inverse of :attr:`timesteps`)."""
        ts = torch.as_tensor(timesteps).detach().to("cpu", _F64)
        if self.config.use_flow_sigmas:
            return ts / self.config.num_train_timesteps
        assert isinstance(self.schedule, VPDiscrete)
        return self.schedule.t_of_timestep(ts)

    def _diffusers_sigmas(self, t: Tensor) -> Tensor:
        """diffusers' sigmas: σ/α for VP, the flow σ (= t) for flow; 0 at t = 0."""
        if self.config.use_flow_sigmas:
            return t.clone()
        out = torch.zeros_like(t)
        positive = t > 0
        out[positive] = self.schedule.edm_sigma(t[positive])
        return out

    # ---- timesteps ---------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid, the solver's plan and a fresh state (nothing survives from an
        earlier loop).

        Args:
            num_inference_steps: Model evaluations; the grid is the registry's
                (:func:`~diffsolve.solvers.registry.nfe_grid`) and ends at ``t = 0``.
            device: Where :attr:`timesteps` and :attr:`sigmas` live.
            timesteps: Custom, strictly decreasing network timesteps (e.g. integers
                ``[999, 759, …]``); the model is evaluated at each, then the last step
                returns :math:`\\hat x_0`.
            sigmas: Custom, strictly decreasing diffusers sigmas (σ/α for VP, flow σ); a
                trailing 0 is optional.
            mu: Flux-style dynamic shift (flow only): the grid is shifted by ``exp(mu)``
                instead of ``flow_shift``.
        """
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError(
                "set_timesteps: pass exactly one of num_inference_steps, timesteps, sigmas"
            )
        if mu is not None and not self.config.use_flow_sigmas:
            raise ValueError("set_timesteps: mu (dynamic shifting) needs use_flow_sigmas=True")
        if timesteps is not None:
            grid = self._custom_grid(self.solver_time(timesteps))
        elif sigmas is not None:
            grid = self._custom_grid(self._t_of_sigmas(sigmas))
        else:
            grid = self._default_grid(num_inference_steps, mu)
        self._reset()
        self._grid = grid
        self._build(0)
        # a multistep plan evaluates the model once per step, at the step's start
        model_times = [self._wrapper.model_time(float(t)) for t in grid[:-1]]
        self.timesteps = torch.tensor(model_times, dtype=torch.float32, device=device)
        self.sigmas = self._diffusers_sigmas(grid).to(device=device, dtype=torch.float32)
        self.num_inference_steps = len(model_times)
        self.init_noise_sigma = self.schedule.init_noise_sigma(float(grid[0]))

    def _default_grid(self, num_inference_steps: int | None, mu: float | None) -> Tensor:
        n = num_inference_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
        spec = SOLVERS.get(self.registry_name)
        kind = self.config.grid
        if kind is None and spec is not None:  # the registry's kind: a name or nfe -> name
            kind = spec.grid_kind(n)
        kind = kind or DEFAULT_GRID
        grid = nfe_grid(self.schedule, n, kind)
        if self.config.use_flow_sigmas:
            shift = float(np.exp(mu)) if mu is not None else float(self.config.flow_shift)
            if shift != 1.0:
                grid = shift_flow_times(grid, shift, self.schedule.t_max)
                grid[0] = min(float(grid[0]), self.schedule.t_max)
        return grids.validate_grid(self.schedule, grid)

    def _t_of_sigmas(self, sigmas: Sequence[float] | Tensor) -> Tensor:
        s = torch.as_tensor(sigmas).detach().to("cpu", _F64).flatten()
        if self.config.use_flow_sigmas:
            return s
        t = torch.zeros_like(s)
        t[s > 0] = self.schedule.t_of_edm_sigma(s[s > 0])
        return t

    def _custom_grid(self, t: Tensor) -> Tensor:
        t = t.flatten()
        if t.numel() == 0:
            raise ValueError("set_timesteps: custom timesteps/sigmas must not be empty")
        if float(t[-1]) != 0.0:
            t = torch.cat([t, torch.zeros(1, dtype=_F64)])
        return grids.validate_grid(self.schedule, t)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` (img2img): the plan is rebuilt on the rest of the
        grid, starting afresh at first order, as diffusers' multistep schedulers do."""
        if self._grid is None:
            raise ValueError("set_begin_index: call set_timesteps() first")
        n = self._grid.numel() - 1
        if not isinstance(begin_index, int) or not 0 <= begin_index < n:
            raise ValueError(
                f"begin_index must be an integer in [0, {n - 1}], got {begin_index!r}"
            )
        self._build(begin_index)

    def _build(self, begin_index: int) -> None:
        assert self._grid is not None
        grid = self._grid[begin_index:]
        plan = self.build_solver(grid.numel() - 1).plan(self.schedule, grid)
        if plan.num_steps is None or plan.nfe != plan.num_steps:
            raise ValueError(
                f"{type(self).__name__}: the solver must take one model evaluation per step "
                f"(a multistep method) to run as a diffusers scheduler; its plan "
                f"{type(plan).__name__} takes {plan.nfe} for {plan.num_steps} steps"
            )
        self._plan, self._state, self._last_output = plan, None, None
        self._begin_index = begin_index

    @property
    def begin_index(self) -> int:
        """Index of the first step of the current loop (see :meth:`set_begin_index`)."""
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """Index into :attr:`timesteps` of the next step (``None`` before the first)."""
        if self._state is None:
            return None
        return self._begin_index + self._state.step

    # ---- the loop ------------------------------------------------------------------------
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Identity: the network takes :math:`x_t` as it is (VP and flow)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DiffsolveSchedulerOutput | tuple[Tensor]:
        """Advance one grid interval with the network output at ``(sample, timestep)``.

        Args:
            model_output: Raw network output, shaped like ``sample`` (or with twice its
                channels when ``variance_type`` is ``learned``/``learned_range``).
            timestep: The timestep the network was called with; checked against the
                expected one (the step is chosen by an internal counter).
            sample: The current sample. When it is the tensor the previous step returned,
                the scheduler continues from its own float32 copy.
            generator: Ignored (these solvers are deterministic); accepted for pipelines.
            return_dict: Return a :class:`DiffsolveSchedulerOutput` (else a tuple).
        """
        plan, state = self._plan, self._state
        if plan is None:
            raise ValueError(f"{type(self).__name__}.step: call set_timesteps() before step()")
        if state is not None and state.done:
            raise ValueError(
                f"{type(self).__name__}.step: all {plan.num_steps} steps are done; call "
                "set_timesteps() to start a new loop"
            )
        output = self._model_output(model_output, sample)
        if state is None:
            state = plan.init(sample.to(state_dtype(sample.dtype)))
        elif sample is not self._last_output:  # the pipeline changed the sample (e.g. masks)
            state = replace(state, x=sample.to(state.x.dtype))
        self._check_timestep(timestep, state.step)
        new = plan.step(_ReplayModel(self._wrapper, output.to(state.x.dtype)), state)
        self._state = new
        prev = new.x.to(sample.dtype)
        self._last_output = prev
        if not return_dict:
            return (prev,)
        denoised = None if new.denoised is None else new.denoised.to(sample.dtype)
        return DiffsolveSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

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
        return model_output

    def _check_timestep(self, timestep: float | Tensor, step: int) -> None:
        expected = float(self.timesteps[self._begin_index + step])
        ts = torch.as_tensor(timestep).detach().to("cpu", _F64).flatten()
        if ts.numel() == 0:
            raise ValueError("step: timestep is empty")
        # 1% covers timesteps rounded to bfloat16/float16 by a pipeline.
        if not torch.allclose(ts, torch.full_like(ts, expected), rtol=1e-2, atol=0.5):
            raise ValueError(
                f"{type(self).__name__}.step: expected timestep {expected:g} (step "
                f"{self._begin_index + step} of {len(self.timesteps)}), got "
                f"{ts[0].item():g}; loop over scheduler.timesteps in order and call "
                "set_timesteps() before every new loop"
            )

    # ---- img2img ---------------------------------------------------------------------------
    def add_noise(
        self, original_samples: Tensor, noise: Tensor, timesteps: float | Tensor
    ) -> Tensor:
        """Forward process :math:`x_t = \\alpha_t x_0 + \\sigma_t \\epsilon` at network
        ``timesteps`` (a scalar or one per sample)."""
        t = self.solver_time(timesteps)
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(
                f"add_noise: got {t.numel()} timesteps for a batch of "
                f"{original_samples.shape[0]}; pass one or one per sample"
            )
        if (t <= 0).any() or (t > self.schedule.t_max * (1 + 1e-12)).any():
            raise ValueError(
                f"add_noise: timesteps map outside the schedule's range (0, {self.schedule.t_max}]"
            )
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        log_alpha, log_sigma = self.schedule.log_alpha_sigma(t)
        alpha = log_alpha.exp().reshape(shape).to(original_samples.device, original_samples.dtype)
        sigma = log_sigma.exp().reshape(shape).to(original_samples.device, original_samples.dtype)
        return alpha * original_samples + sigma * noise.to(original_samples.dtype)


# ---------------------------------------------------------------------------------------
# Concrete schedulers. Each lists the shared keys (see DiffsolveScheduler) and its own.
class DiffsolveDDIMScheduler(DiffsolveScheduler):
    """DDIM (η = 0) from diffsolve, first order (:class:`diffsolve.DDIM`)."""

    registry_name: ClassVar[str] = "ddim"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        grid: str | None = None,
        lower_order_final: bool = True,
    ) -> None:
        self._setup()

    def build_solver(self, num_steps: int) -> Solver:
        return DDIM()


class DiffsolveDPMSolverPPScheduler(DiffsolveScheduler):
    """DPM-Solver++ multistep (Lu et al. 2022b) from diffsolve (:class:`diffsolve.DPMSolverPP`).

    ``solver_type`` is ``"midpoint"`` or ``"taylor"`` (diffusers' ``"heun"`` is accepted as
    ``"taylor"``, the form it computes). At order 3 diffsolve's 3M is truly third order,
    unlike diffusers' (see :mod:`diffsolve.solvers.dpm_solver_pp`).
    """

    registry_name: ClassVar[str] = "dpm-solver++-2m"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        grid: str | None = None,
        lower_order_final: bool = True,
        solver_order: int = 2,
        solver_type: str = "midpoint",
    ) -> None:
        self._adopt_solver_type(solver_type, ("midpoint", "taylor", "heun"), "midpoint")
        self._setup()

    def build_solver(self, num_steps: int) -> Solver:
        c = self.config
        return DPMSolverPP(
            min(c.solver_order, num_steps),
            solver_type="taylor" if c.solver_type in ("taylor", "heun") else "midpoint",
            lower_order_final=c.lower_order_final,
        )


class DPMSolverV3Scheduler(DiffsolveScheduler):
    """DPM-Solver-v3 (Zheng et al. 2023) from diffsolve (:class:`diffsolve.solvers.
    dpm_solver_v3.DPMSolverV3`), with the model's empirical model statistics.

    ``ems_path`` is an EMS file made by ``diffsolve ems`` for this model; it is checked against
    the scheduler's schedule when loaded, and against the sampling grid's λ range in
    :meth:`set_timesteps`. Options follow the solver: ``solver_order`` (1–3),
    ``use_corrector``, ``predictor_pseudo``, ``corrector_pseudo``, ``half_corrector``.
    """

    registry_name: ClassVar[str] = "dpm-solver-v3"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        grid: str | None = None,
        lower_order_final: bool = True,
        ems_path: str | None = None,
        solver_order: int = 2,
        use_corrector: bool = True,
        predictor_pseudo: bool = False,
        corrector_pseudo: bool = True,
        half_corrector: str = "off",
    ) -> None:
        self._ems: EMS | None = None
        if ems_path is not None:
            self._ems = load_ems(ems_path)
        self._setup()
        if self._ems is not None:
            self._ems.check_compatible(self.schedule)

    def build_solver(self, num_steps: int) -> Solver:
        c = self.config
        if self._ems is None:
            raise ValueError(
                "ems_path: DPMSolverV3Scheduler needs the model's EMS file; compute one with "
                "`diffsolve ems` and pass ems_path=... to from_config / the constructor"
            )
        return DPMSolverV3(
            self._ems,
            order=min(c.solver_order, num_steps),
            predictor_pseudo=c.predictor_pseudo,
            corrector=c.use_corrector,
            corrector_pseudo=c.corrector_pseudo,
            half_corrector=c.half_corrector,
            lower_order_final=c.lower_order_final,
        )


class DiffsolveUniPCScheduler(DiffsolveScheduler):
    """UniPC multistep predictor–corrector (Zhao et al. 2023) from diffsolve
    (:class:`diffsolve.UniPC`); ``solver_type`` is ``"bh1"`` or ``"bh2"``, ``predict_x0``
    integrates the data prediction, ``use_corrector`` switches UniC off entirely and
    ``disable_corrector`` lists steps without it. Unlike diffusers' bh1 with
    ``final_sigmas_type="zero"``, the last step returns :math:`\\hat x_0`, never NaN."""

    registry_name: ClassVar[str] = "unipc-bh2-2"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        grid: str | None = None,
        lower_order_final: bool = True,
        solver_order: int = 2,
        solver_type: str = "bh2",
        predict_x0: bool = True,
        use_corrector: bool = True,
        disable_corrector: list[int] | None = None,
    ) -> None:
        self._adopt_solver_type(solver_type, ("bh1", "bh2"), "bh2")
        self._setup()

    def build_solver(self, num_steps: int) -> Solver:
        c = self.config
        return UniPC(
            min(c.solver_order, num_steps),
            c.solver_type,
            corrector=c.use_corrector,
            predict="data" if c.predict_x0 else "noise",
            lower_order_final=c.lower_order_final,
            disable_corrector=tuple(c.disable_corrector or ()),
        )


class DiffsolveDEISScheduler(DiffsolveScheduler):
    """DEIS multistep (Zhang & Chen 2023) from diffsolve (:class:`diffsolve.DEIS`);
    ``basis`` is the interpolation variable ``"t"`` (tAB), ``"rho"`` or ``"log_rho"``."""

    registry_name: ClassVar[str] = "deis-2"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        grid: str | None = None,
        lower_order_final: bool = True,
        solver_order: int = 2,
        basis: str = "t",
    ) -> None:
        self._setup()

    def build_solver(self, num_steps: int) -> Solver:
        c = self.config
        return DEIS(
            min(c.solver_order, num_steps), basis=c.basis, lower_order_final=c.lower_order_final
        )


# ---------------------------------------------------------------------------------------
# The digits demo network as a diffusers UNet2DModel
_RES_LAYERS = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("emb", "time_emb_proj"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("skip", "conv_shortcut"),
)


def digits_unet_to_diffusers(network: DigitsUNet) -> UNet2DModel:
    """The same network as a diffusers ``UNet2DModel`` (weights copied, eval mode, float32).

    ``DigitsUNet``'s layers are diffusers' ``ResnetBlock2D`` with
    ``resnet_time_scale_shift="scale_shift"``, ``Downsample2D``/``Upsample2D`` with convs, the
    mid-block attention (one group norm, per-head softmax, residual) and the sinusoidal
    embedding with ``flip_sin_to_cos=True, freq_shift=0``; only the names differ. Supported:
    no attention outside the middle block, ``time_scale = 1``, channel counts divisible by
    ``num_groups``.
    """
    cfg = _unet_config(network)
    unet = UNet2DModel(**cfg)
    state = _unet_state(network, len(cfg["block_out_channels"]), cfg["layers_per_block"])
    unet.load_state_dict(state, strict=True)
    return unet.eval().float()


def _unet_config(net: DigitsUNet) -> dict[str, Any]:
    downsamplers = sum(1 for block in net.down if isinstance(block[0], torch.nn.Conv2d))
    res_blocks = [block for block in net.down if not isinstance(block[0], torch.nn.Conv2d)]
    levels = downsamplers + 1
    if any(len(block) > 1 for block in res_blocks):
        raise ValueError(
            "digits_unet_to_diffusers: attention outside the mid block is unsupported"
        )
    if net.time_scale != 1.0:
        raise ValueError("digits_unet_to_diffusers: time_scale must be 1 (diffusers has none)")
    per_level = len(res_blocks) // levels
    channels = [res_blocks[level * per_level][0].conv1.out_channels for level in range(levels)]
    groups = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    if len(groups) != 1:
        raise ValueError(
            f"digits_unet_to_diffusers: every GroupNorm needs the same group count, got {groups}"
        )
    group = groups.pop()
    mid = net.mid_attn
    return {
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "down_block_types": ["DownBlock2D"] * levels,
        "up_block_types": ["UpBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "attention_head_dim": channels[-1] // getattr(mid, "heads", 1),
        "norm_num_groups": group,
        "attn_norm_num_groups": group,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift",
        "add_attention": not isinstance(mid, torch.nn.Identity),
        "time_embedding_dim": net.time_mlp[0].out_features,
        "num_class_embeds": None if net.num_classes is None else net.num_classes + 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def _unet_state(net: DigitsUNet, levels: int, per_level: int) -> dict[str, Tensor]:
    src = net.state_dict()
    out: dict[str, Tensor] = {}

    def copy(a: str, b: str) -> None:
        for p in ("weight", "bias"):
            if f"{a}.{p}" in src:
                out[f"{b}.{p}"] = src[f"{a}.{p}"]

    def res(a: str, b: str) -> None:
        for x, y in _RES_LAYERS:
            copy(f"{a}.{x}", f"{b}.{y}")

    for a, b in (
        ("conv_in", "conv_in"),
        ("time_mlp.0", "time_embedding.linear_1"),
        ("time_mlp.2", "time_embedding.linear_2"),
        ("class_emb", "class_embedding"),
        ("norm_out", "conv_norm_out"),
        ("conv_out", "conv_out"),
    ):
        copy(a, b)
    i = 0
    for level in range(levels):
        for j in range(per_level):
            res(f"down.{i}.0", f"down_blocks.{level}.resnets.{j}")
            i += 1
        if level != levels - 1:
            copy(f"down.{i}.0", f"down_blocks.{level}.downsamplers.0.conv")
            i += 1
    res("mid1", "mid_block.resnets.0")
    res("mid2", "mid_block.resnets.1")
    if "mid_attn.qkv.weight" in src:
        copy("mid_attn.norm", "mid_block.attentions.0.group_norm")
        w, b = src["mid_attn.qkv.weight"].flatten(1), src["mid_attn.qkv.bias"]
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"mid_block.attentions.0.{name}.weight"] = w.chunk(3)[k].clone()
            out[f"mid_block.attentions.0.{name}.bias"] = b.chunk(3)[k].clone()
        out["mid_block.attentions.0.to_out.0.weight"] = src["mid_attn.proj.weight"].flatten(1)
        out["mid_block.attentions.0.to_out.0.bias"] = src["mid_attn.proj.bias"]
    i = 0
    for k in range(levels):
        for j in range(per_level + 1):
            res(f"up.{i}.0", f"up_blocks.{k}.resnets.{j}")
            if k != levels - 1 and j == per_level:
                copy(f"up.{i}.2", f"up_blocks.{k}.upsamplers.0.conv")
            i += 1
    return out
