r"""Noise schedules: :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` and the log-SNR
:math:`\lambda_t = \log(\alpha_t / \sigma_t)`.

Every schedule works in float64 on tensors of any shape and exposes :math:`\alpha(t)`,
:math:`\sigma(t)`, :math:`\lambda(t)` and the inverse :math:`t(\lambda)`.

**Time domain and clipping.** A schedule's solver time runs over ``[0, t_max]``:

* ``t = 0`` is clean data (:math:`\alpha = 1, \sigma = 0, \lambda = +\infty`). A step grid may end
  there (the last step then returns the model's :math:`\hat x_0`), but the model is never
  evaluated at it.
* ``t_max`` is the noisiest usable time, chosen so that :math:`\lambda` is finite. Where the
  schedule's own endpoint has :math:`\lambda = -\infty` it is clipped explicitly:

  - VP cosine: ``T = 0.9946`` (as in DPM-Solver), :math:`\lambda_T \approx -4.8`;
  - rectified flow: ``t_max = 1 - 1e-3`` (:math:`\lambda \approx -6.9`), the value diffusers uses
    for flow sigmas in its DPM-Solver and UniPC schedulers;
  - VP discrete with zero terminal SNR (:math:`\bar\alpha_{N-1} = 0`): the last
    :math:`\bar\alpha` is raised to :math:`2^{-24}`, as in diffusers, or below
    :math:`\bar\alpha_{N-2}` where that is smaller (:func:`_terminal_alphabar`).

``default_range`` gives the conventional sampling interval ``(t_start, t_end)`` of each kind.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

Number = float | int
TimeLike = Tensor | Number | Sequence[Number]

_F64 = torch.float64
_MIN_TERMINAL_ALPHABAR = 2.0**-24
#: The lowest λ a noise- or score-predicting discrete model samples from
#: (:meth:`VPDiscrete.for_prediction`): just below DDPM's linear betas (λ = -5.06 at t = 1).
EPSILON_LAMBDA_MIN = -5.1


def _as_f64(t: TimeLike) -> Tensor:
    if isinstance(t, Tensor):
        return t.detach().to(device="cpu", dtype=_F64) if t.dtype != _F64 else t
    return torch.as_tensor(t, dtype=_F64)


def _terminal_alphabar(ac: Tensor) -> Tensor:
    r"""The positive stand-in for a zero terminal :math:`\bar\alpha_{N-1}`: diffusers'
    :math:`2^{-24}` (PR #7097) when that stays below :math:`\bar\alpha_{N-2}`; otherwise
    (linear betas rescaled to zero terminal SNR reach :math:`\bar\alpha_{N-2} \approx
    4\cdot10^{-9}`) the geometric continuation :math:`\bar\alpha_{N-2}^2/\bar\alpha_{N-3}`,
    which keeps the schedule strictly decreasing."""
    floor = torch.tensor(_MIN_TERMINAL_ALPHABAR, dtype=_F64)
    if ac.numel() < 3 or ac[-2] <= 0 or floor < ac[-2]:
        return floor
    return torch.minimum(floor, ac[-2] ** 2 / ac[-3])


def _log_sigma_vp(log_alpha: Tensor) -> Tensor:
    """:math:`\\log\\sigma = \\tfrac12 \\log(1 - \\alpha^2)`, computed with ``expm1``."""
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _log_alpha_vp_from_lambda(lam: Tensor) -> Tensor:
    """Invert :math:`\\lambda` for VP schedules: :math:`\\log\\alpha = -\\tfrac12
    \\mathrm{softplus}(-2\\lambda)`."""
    return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


class NoiseSchedule(ABC):
    """A diffusion noise schedule in solver time ``t`` (see the module docstring)."""

    kind: str
    #: ``(t_start, t_end)``: the noisiest usable solver time (λ finite) and the conventional
    #: cleanest one; set by every schedule.
    t_range: tuple[float, float]

    @property
    def t_max(self) -> float:
        """Noisiest usable solver time (λ finite)."""
        return self.t_range[0]

    @property
    def t_bound(self) -> float:
        """The largest time statistics may be computed at (λ finite): ``t_max``, or beyond
        it where ``t_max`` only clips sampling (rectified flow: any ``t < 1``)."""
        return self.t_max

    @property
    def default_range(self) -> tuple[float, float]:
        """Conventional ``(t_start, t_end)`` for sampling."""
        return self.t_range

    # ---- abstract interface ------------------------------------------------------------
    @abstractmethod
    def log_alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Return :math:`(\\log\\alpha_t, \\log\\sigma_t)` in float64."""

    @abstractmethod
    def t_of_lambda(self, lam: TimeLike) -> Tensor:
        """Inverse of :math:`\\lambda(t)`; :math:`\\lambda = +\\infty` maps to ``t = 0``."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description; :func:`schedule_from_config` inverts it."""

    # ---- derived quantities ------------------------------------------------------------
    def alpha(self, t: TimeLike) -> Tensor:
        """:math:`\\alpha_t` (float64)."""
        return torch.exp(self.log_alpha_sigma(t)[0])

    def sigma(self, t: TimeLike) -> Tensor:
        """:math:`\\sigma_t` (float64)."""
        return torch.exp(self.log_alpha_sigma(t)[1])

    def lambda_(self, t: TimeLike) -> Tensor:
        """Log-SNR :math:`\\lambda_t = \\log\\alpha_t - \\log\\sigma_t` (float64)."""
        log_alpha, log_sigma = self.log_alpha_sigma(t)
        return log_alpha - log_sigma

    def edm_sigma(self, t: TimeLike) -> Tensor:
        """The EDM / k-diffusion noise level :math:`\\sigma_t/\\alpha_t = e^{-\\lambda_t}`."""
        return torch.exp(-self.lambda_(t))

    def t_of_edm_sigma(self, rho: TimeLike) -> Tensor:
        """Inverse of :meth:`edm_sigma`."""
        return self.t_of_lambda(-torch.log(_as_f64(rho)))

    def init_noise_sigma(self, t: float | None = None) -> float:
        """Scale of the initial noise at ``t`` (default ``t_start``): :math:`x_T = \\sigma_T z`."""
        t = self.default_range[0] if t is None else t
        return float(self.sigma(t))

    def d_alpha_sigma(self, t: float) -> tuple[float, float] | None:
        """:math:`(\\dot\\alpha_t, \\dot\\sigma_t)` in closed form where a schedule has it
        (rectified flow: also at ``t = 1``, where autograd of :math:`\\log\\alpha` fails);
        ``None``: use autograd."""
        return None

    def same_process(self, other: NoiseSchedule) -> bool:
        """Whether ``other`` describes the same :math:`\\alpha_t, \\sigma_t` (statistics
        of one are valid for the other); by default, equal configs."""
        return self == other

    def fingerprint(self) -> str:
        """Short stable hash of :meth:`to_config`, used to tie files to a schedule."""
        return hashlib.sha256(repr(sorted(self.to_config().items())).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        items = ", ".join(
            f"{k}={v}"
            for k, v in self.to_config().items()
            if k != "kind" and k != "alphas_cumprod"
        )
        return f"{type(self).__name__}({items})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(self.fingerprint())


# ---------------------------------------------------------------------------------------
class VPDiscrete(NoiseSchedule):
    r"""Variance-preserving schedule of a discrete-time model (DDPM and diffusers' schedulers).

    The model was trained on ``N`` steps with :math:`\bar\alpha_i`, ``i = 0..N-1``. As in
    DPM-Solver, step ``i`` sits at solver time :math:`t_i = (i+1)/N` and
    :math:`\log\alpha_t` is interpolated piecewise-linearly between the knots
    :math:`(t_i, \tfrac12\log\bar\alpha_i)`, with the extra knot ``(0, 0)`` for clean data.
    The model's own time input for solver time ``t`` is the fractional timestep ``t·N - 1``
    (see :mod:`diffsolve.ode.model`).

    Args:
        alphas_cumprod: :math:`\bar\alpha_i`, strictly decreasing in ``(0, 1]``.
        t_max: Where sampling starts (default 1, the last training step): below it where
            the last steps' :math:`\bar\alpha` are too small for the model's prediction
            (:meth:`for_prediction`). Not part of the process (:meth:`same_process`).
    """

    kind = "vp_discrete"

    def __init__(self, alphas_cumprod: Tensor | Sequence[float], t_max: float = 1.0) -> None:
        ac = _as_f64(alphas_cumprod).flatten().clone()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod: need at least 2 training steps")
        if not torch.isfinite(ac).all() or (ac < 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod: values must be finite and in [0, 1]")
        if ac[-1] <= 0:  # zero terminal SNR
            ac[-1] = _terminal_alphabar(ac)
        if (ac[1:] >= ac[:-1]).any() or ac[-1] <= 0:
            raise ValueError("alphas_cumprod: must be strictly decreasing and positive")
        self.alphas_cumprod = ac
        self.num_train_timesteps = int(ac.numel())
        n = self.num_train_timesteps
        self._knots_t = torch.cat([torch.zeros(1, dtype=_F64), torch.arange(1, n + 1) / n])
        self._knots_log_alpha = torch.cat([torch.zeros(1, dtype=_F64), 0.5 * torch.log(ac)])
        if not 1.0 / n < t_max <= 1.0:
            raise ValueError(f"VPDiscrete: t_max must lie in (1/N, 1], got {t_max!r}")
        self.t_range = (float(t_max), 1.0 / n)

    @classmethod
    def from_betas(cls, betas: Tensor | Sequence[float], t_max: float = 1.0) -> VPDiscrete:
        """Build from :math:`\\beta_i`: :math:`\\bar\\alpha_i = \\prod_{j \\le i}(1-\\beta_j)`."""
        b = _as_f64(betas).flatten()
        if (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas: values must lie in (0, 1)")
        return cls(torch.cumprod(1.0 - b, dim=0), t_max)

    def for_prediction(self, prediction: str) -> VPDiscrete:
        r"""This schedule as a model predicting ``prediction`` samples it: noise and score
        predictions give :math:`\hat x_0 = (x - \sigma\hat\epsilon)/\alpha`, which
        amplifies the network's error by :math:`1/\alpha`; where the last training step's
        λ lies below :data:`EPSILON_LAMBDA_MIN` (cosine betas: λ = -9.9, an amplification
        of 2·10⁴) sampling starts where λ reaches it instead, as DPM-Solver clips its
        continuous cosine schedule (DDPM's linear betas end at λ = -5.06 and keep t = 1)."""
        if prediction not in ("epsilon", "score") or self.t_max < 1.0:
            return self
        if float(self.lambda_(1.0)) >= EPSILON_LAMBDA_MIN:
            return self
        start = float(self.t_of_lambda(torch.tensor(EPSILON_LAMBDA_MIN, dtype=_F64)))
        clipped = VPDiscrete(self.alphas_cumprod, start)
        if getattr(self, "_config", None) is not None:
            clipped._config = {**self._config, "t_max": start}
        return clipped

    @classmethod
    def from_diffusers(
        cls,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        t_max: float = 1.0,
    ) -> VPDiscrete:
        """The beta schedules of diffusers' ``DDPMScheduler`` family, computed in float64."""
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=_F64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=_F64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":

            def abar(x: float) -> float:
                return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor(
                [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=_F64
            )
        else:
            raise ValueError(
                f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'; "
                f"got {beta_schedule!r}"
            )
        schedule = cls.from_betas(betas, t_max)
        schedule._config = {
            "kind": cls.kind,
            "beta_schedule": beta_schedule,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "num_train_timesteps": n,
        }
        if t_max != 1.0:
            schedule._config["t_max"] = t_max
        return schedule

    def log_alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        log_alpha = _interp(_as_f64(t), self._knots_t, self._knots_log_alpha)
        return log_alpha, _log_sigma_vp(log_alpha)

    def t_of_lambda(self, lam: TimeLike) -> Tensor:
        log_alpha = _log_alpha_vp_from_lambda(_as_f64(lam))
        # log alpha decreases with t: interpolate on the reversed (increasing) knots
        return _interp(log_alpha, self._knots_log_alpha.flip(0), self._knots_t.flip(0))

    def same_process(self, other: NoiseSchedule) -> bool:
        """Equal :math:`\\bar\\alpha` to float32 round-off (diffusers computes them in
        float32; statistics of one are valid for the other)."""
        if not isinstance(other, VPDiscrete):
            return False
        if other.num_train_timesteps != self.num_train_timesteps:
            return False
        return bool(torch.allclose(self.alphas_cumprod, other.alphas_cumprod, rtol=1e-5, atol=0))

    def timestep(self, t: TimeLike) -> Tensor:
        """The model's fractional training timestep :math:`tN - 1` for solver time ``t``."""
        return _as_f64(t) * self.num_train_timesteps - 1.0

    def t_of_timestep(self, timestep: TimeLike) -> Tensor:
        """Solver time of a (fractional) training timestep: :math:`t = (i + 1)/N`."""
        return (_as_f64(timestep) + 1.0) / self.num_train_timesteps

    def to_config(self) -> dict[str, Any]:
        config = getattr(self, "_config", None)
        if config is not None:
            return dict(config)
        config = {"kind": self.kind, "alphas_cumprod": self.alphas_cumprod.tolist()}
        return config if self.t_max == 1.0 else {**config, "t_max": self.t_max}


class VPLinear(NoiseSchedule):
    r"""Continuous VP schedule with linear :math:`\beta(t) = \beta_0 + t(\beta_1-\beta_0)`
    (ScoreSDE): :math:`\log\alpha_t = -\tfrac14 t^2(\beta_1-\beta_0) - \tfrac12 t\beta_0`."""

    kind = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError("VPLinear: need 0 < beta_min < beta_max")
        self.beta_min, self.beta_max, self.T = float(beta_min), float(beta_max), float(T)
        self.t_range = (self.T, 1e-3)

    def log_alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        t = _as_f64(t)
        log_alpha = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return log_alpha, _log_sigma_vp(log_alpha)

    def t_of_lambda(self, lam: TimeLike) -> Tensor:
        # -2 log alpha = t^2 (b1-b0)/2 + t b0 = log(1 + e^{-2 lam}); stable root of the quadratic
        db = self.beta_max - self.beta_min
        tmp = 2.0 * db * torch.logaddexp(-2.0 * _as_f64(lam), torch.zeros((), dtype=_F64))
        return tmp / (torch.sqrt(self.beta_min**2 + tmp) + self.beta_min) / db

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "T": self.T,
        }


class VPCosine(NoiseSchedule):
    r"""Continuous cosine VP schedule (Nichol & Dhariwal 2021):
    :math:`\alpha_t = \cos\!\big(\tfrac{t+s}{1+s}\tfrac\pi2\big) / \cos\!\big(\tfrac{s}{1+s}
    \tfrac\pi2\big)`, clipped at ``T = 0.9946`` where λ is still finite."""

    kind = "vp_cosine"

    def __init__(self, s: float = 0.008, T: float = 0.9946) -> None:
        if not 0 < T < 1:
            raise ValueError("VPCosine: T must lie in (0, 1); T = 1 has lambda = -inf")
        self.s, self.T = float(s), float(T)
        self._log_alpha_0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        self.t_range = (self.T, 1e-3)

    def log_alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        angle = (_as_f64(t) + self.s) / (1 + self.s) * math.pi / 2
        log_alpha = (torch.log(torch.cos(angle)) - self._log_alpha_0).clamp(max=0.0)
        return log_alpha, _log_sigma_vp(log_alpha)

    def t_of_lambda(self, lam: TimeLike) -> Tensor:
        log_alpha = _log_alpha_vp_from_lambda(_as_f64(lam))
        angle = torch.arccos(torch.exp(log_alpha + self._log_alpha_0))
        return (angle * 2 * (1 + self.s) / math.pi - self.s).clamp(min=0.0)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "s": self.s, "T": self.T}


class EDM(NoiseSchedule):
    r"""EDM / variance-exploding schedule: :math:`\alpha_t = 1,\ \sigma_t = t`,
    :math:`\lambda = -\log t` (Karras et al. 2022)."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError("EDM: need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_range = (self.sigma_max, self.sigma_min)

    def log_alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        t = _as_f64(t)
        return torch.zeros_like(t), torch.log(t)

    def t_of_lambda(self, lam: TimeLike) -> Tensor:
        return torch.exp(-_as_f64(lam))

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class RectifiedFlow(NoiseSchedule):
    r"""Rectified flow / flow matching: :math:`\alpha_t = 1 - t,\ \sigma_t = t`,
    :math:`\lambda = \log\frac{1-t}{t}`, clipped at ``t_max = 1 - 1e-3``.

    ``t_max = 1`` (pure noise, λ = −∞) is allowed, as flow-matching schedulers start there:
    a grid may then start at ``t = 1``, and its first step is the exact first-order limit
    (:func:`diffsolve.solvers.engine.start_update`). The clipping changes only where grids
    may start, not the process: :meth:`same_process` ignores it.

    ``shift`` is the model's own sampling shift where it has one (diffusers' ``shift`` /
    ``flow_shift``: SD3's 3.0; Flux's resolution-dependent :math:`e^\mu`): not part of the
    process either (:meth:`same_process` ignores it), it is where the model's default grid
    puts its steps (:func:`~diffsolve.ode.grids.time_shifted` with this shift)."""

    kind = "rectified_flow"

    def __init__(
        self, t_max: float = 1.0 - 1e-3, t_min: float = 1e-3, shift: float | None = None
    ) -> None:
        if not 0 < t_min < t_max <= 1:
            raise ValueError("RectifiedFlow: need 0 < t_min < t_max <= 1")
        if shift is not None and not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"RectifiedFlow: shift must be a finite number > 0, got {shift!r}")
        self.t_range = (float(t_max), float(t_min))
        self.shift = None if shift is None else float(shift)

    def same_process(self, other: NoiseSchedule) -> bool:
        return isinstance(other, RectifiedFlow)

    def d_alpha_sigma(self, t: float) -> tuple[float, float] | None:
        return (-1.0, 1.0)

    @property
    def t_bound(self) -> float:
        return math.nextafter(1.0, 0.0)

    def log_alpha_sigma(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        t = _as_f64(t)
        return torch.log1p(-t), torch.log(t)

    def t_of_lambda(self, lam: TimeLike) -> Tensor:
        return torch.sigmoid(-_as_f64(lam))

    def to_config(self) -> dict[str, Any]:
        config = {"kind": self.kind, "t_max": self.t_range[0], "t_min": self.t_range[1]}
        return config if self.shift is None else {**config, "shift": self.shift}


# ---------------------------------------------------------------------------------------
SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.kind: cls for cls in (VPDiscrete, VPLinear, VPCosine, EDM, RectifiedFlow)
}


def schedule_from_config(config: dict[str, Any]) -> NoiseSchedule:
    """Rebuild a schedule from :meth:`NoiseSchedule.to_config` output (or a demo config)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {sorted(SCHEDULES)}, got {kind!r}")
    if kind == VPDiscrete.kind:
        t_max = float(config.pop("t_max", 1.0))
        if "alphas_cumprod" in config:
            return VPDiscrete(config["alphas_cumprod"], t_max)
        if "betas" in config:
            return VPDiscrete.from_betas(config["betas"], t_max)
        return VPDiscrete.from_diffusers(**config, t_max=t_max)
    try:
        return SCHEDULES[kind](**config)
    except TypeError as err:
        raise ValueError(f"invalid parameters for schedule {kind!r}: {err}") from None


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation on increasing ``xp`` with linear extrapolation."""
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)
