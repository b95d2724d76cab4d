r"""diffsolve's multistep solvers as drop-in diffusers schedulers, generated from the solvers'
own declarations.

Usage — one line, for any pipeline (SD, SDXL, SD3, Flux, DDPM, …)::

    from diffsolve.integrations.diffusers import DiffsolveUniPCScheduler

    pipe.scheduler = DiffsolveUniPCScheduler.from_config(pipe.scheduler.config)
    images = pipe(num_inference_steps=10).images

**The contract.** Each adapter replaces one diffusers scheduler, its *sibling*
(:attr:`DiffusersMapping.sibling`): ``DiffsolveDDIMScheduler`` → ``DDIMScheduler``,
``DiffsolveDPMSolverPPScheduler`` → ``DPMSolverMultistepScheduler`` (``algorithm_type``
``dpmsolver++`` or ``dpmsolver``), ``DiffsolveUniPCScheduler`` → ``UniPCMultistepScheduler``,
``DiffsolveDEISScheduler`` → ``DEISMultistepScheduler``; ``DPMSolverV3Scheduler`` places its
steps as ``DPMSolverMultistepScheduler``. It takes every key of the sibling's config and
honours each one, refuses it with a ``ValueError`` naming it, or — where its solver has no
such choice (v3's ``algorithm_type`` and ``solver_type``) — accepts and ignores it
(:mod:`.config`); the constructor and ``from_config`` accept the same keys. Keys a config
only carries over from another scheduler's (FlowMatch's ``shift`` after diffusers' SD3
recipe) are ignored where the step-placing scheduler has none, as diffusers ignores them.

* **Steps.** ``set_timesteps`` builds the sibling from the same config and uses its
  ``timesteps`` and ``sigmas`` (:mod:`.timesteps`): ``timestep_spacing``, ``steps_offset``,
  Karras/exponential/beta/Lu sigmas, ``final_sigmas_type``, ``lambda_min_clipped``, flow
  shifts and ``mu`` mean exactly what they mean there, and the network only ever sees
  timesteps the sibling would give it (integers in ``[0, N-1]`` for VP). ``grid="<kind>"``
  (a diffsolve grid kind) replaces the sibling's placement by the registry's grid.
* **Flow matching.** ``from_config`` of a ``FlowMatch*`` config (SD3, Flux) selects rectified
  flow, velocity prediction and FlowMatch's placement (``shift``, dynamic shifting with ``mu``,
  ``shift_terminal``, ``invert_sigmas``, Karras/exponential/beta sigmas); the first step starts
  from pure noise at σ = 1, exactly (:func:`diffsolve.solvers.engine.start_update`).
  ``set_timesteps(sigmas=..., mu=...)`` works as Flux calls it; ``scale_noise`` as flow
  img2img/inpaint pipelines call it.
* **The step.** ``step`` reads the raw output with ``prediction_type`` at the step's solver
  time, applies ``thresholding`` / ``clip_sample`` to :math:`\hat x_0` as the sibling does,
  and advances the solver's float64 coefficient plan (:mod:`.outputs`). DDIM's ``eta`` and
  ``use_clipped_model_output`` follow diffusers' DDIM, noise drawn from ``generator`` (or
  ``variance_noise``). A step finds its place as diffusers does (:mod:`.position`): the
  first step of a loop without ``set_begin_index`` starts where its timestep is (an unknown
  timestep is the last step, a repeated first timestep the first), later ones follow the
  counter; DDIM steps from any timestep. ``set_timesteps`` leaves no state from an earlier
  loop (diffusers #8711). UniPC's ``solver_p`` predicts in UniP's place.
* **Attributes pipelines read.** ``timesteps`` (int64 for VP, as diffusers), ``sigmas``,
  ``init_noise_sigma = 1``, ``order = 1``, ``betas``, ``alphas``, ``alphas_cumprod``,
  ``index_for_timestep``, ``begin_index``, ``step_index``, ``add_noise``,
  ``scale_model_input`` (identity).
* **Files.** ``save_pretrained`` copies each statistics file (DPM-Solver-v3's EMS) next to the
  config with a relative path; ``from_pretrained`` of that folder works anywhere, and so does
  ``DiffusionPipeline.from_pretrained`` of a saved pipeline (``model_index.json`` names this
  module).

**The schedule.** For VP configs, the sibling's own :math:`\bar\alpha` (float32, what
diffusers trained with) in float64, so the coefficients match diffusers to round-off; a
zero terminal :math:`\bar\alpha` gets diffsolve's monotone stand-in. A loop equals
:func:`diffsolve.sample` with the adapter's ``schedule`` on its ``grid``.

**Deliberate differences from diffusers.** DPM-Solver++ of order 3 uses diffsolve's exact
third-order weights (``tests/test_parity_diffusers.py``); DEIS computes its coefficients in
float64, where diffusers' order-3 closed form loses ~1e-4 relative to float32 cancellation from
about 50 steps (with float64 sigmas diffusers equals diffsolve to 1e-6); UniPC-bh1 and
noise-space UniPC return :math:`\hat x_0` where diffusers returns NaN at a final σ = 0; from
σ = 1 (pure noise) no corrector follows the first step (diffusers' UniPC applies bh2's
small-step value :math:`\rho = 1/2` to that infinite λ-step); a timestep the sibling repeats
(DPM-Solver's ``linspace`` placement at 1000 steps, DEIS' repeated last sigma) is a
zero-length step that returns its sample, where diffusers divides by the zero step length
(NaN at 1000 steps) — except UniPC's repeated last σ, where UniC corrects the last step with
the evaluation there, as in diffusers; DDIM steps to the next listed timestep where
diffusers' DDIM steps ``N // n`` back (``timestep_spacing="linspace"`` or ``"trailing"``
with ``n`` not dividing ``N``; from a timestep that is not listed, to the first grid point
below it), and keeps a positive :math:`\bar\alpha` at a zero terminal SNR where diffusers'
DDIM uses 0;
the state is kept in at least float32 between steps; diffusers' float32 :math:`\bar\alpha`
is continued by diffsolve's float64 values where it underflows. Refused: the SDE
``algorithm_type``\ s and ``stochastic_sampling``; betas outside (0, 1); a placement past the
trained timesteps (``leading`` + ``steps_offset=1`` at 999–1000 steps), naming the keys
and the step count that works.

**DPM-Solver-v3's statistics for a pipeline.** :func:`ems_for_pipeline` estimates them for
a pipeline's UNet or SD3 transformer under fixed text embeddings (:mod:`.pipelines`), and
:func:`differentiable_attention` switches a model's attention to plain-PyTorch processors.

**One base, one class per solver.** Every registered solver that declares a
:class:`~diffsolve.solvers.registry.DiffusersMapping` gets a class generated by
:func:`scheduler_class` (module attributes, also for solvers registered after import).

**Solver schedules.** :class:`DiffsolveSolverScheduleScheduler` runs a solver-schedule file
(``solver_schedule_path``; :mod:`.solver_schedule`): its choices on its own times, at its
NFE.
"""

from __future__ import annotations

# diffusers' pipeline loader looks a saved component's base classes up in the module that
# model_index.json names (this one): SchedulerMixin must be found here.
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffsolve.integrations.diffusers.config import (
    GRID_KEYS,
    OUTPUT_KEYS,
    SCHEDULE_KEYS,
    SIBLINGS,
    adapter_keys,
    diffusers_schedule,
    rescale_zero_terminal_snr,
    shift_flow_times,
)
from diffsolve.integrations.diffusers.pipelines import (
    ConditionedNetwork,
    denoiser_from_pipeline,
    differentiable_attention,
    ems_for_pipeline,
    pipeline_schedule,
)
from diffsolve.integrations.diffusers.scheduler import (
    DiffsolveScheduler,
    DiffsolveSchedulerOutput,
    scheduler_class,
    scheduler_classes,
    scheduler_keys,
)
from diffsolve.integrations.diffusers.solver_schedule import DiffsolveSolverScheduleScheduler


def __getattr__(name: str) -> type[DiffsolveScheduler]:
    """Scheduler classes of solvers registered after this module was imported."""
    classes = scheduler_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


globals().update(scheduler_classes())
__all__ = [
    "GRID_KEYS",
    "OUTPUT_KEYS",
    "SCHEDULE_KEYS",
    "SIBLINGS",
    "ConditionedNetwork",
    "DiffsolveScheduler",
    "DiffsolveSolverScheduleScheduler",
    "SchedulerMixin",
    "DiffsolveSchedulerOutput",
    "adapter_keys",
    "denoiser_from_pipeline",
    "differentiable_attention",
    "diffusers_schedule",
    "ems_for_pipeline",
    "pipeline_schedule",
    "rescale_zero_terminal_snr",
    "scheduler_class",
    "scheduler_classes",
    "scheduler_keys",
    "shift_flow_times",
    *scheduler_classes(),
]
