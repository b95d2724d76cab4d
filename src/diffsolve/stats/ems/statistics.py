r"""Empirical model statistics (EMS) of DPM-Solver-v3: arrays on a λ grid, with metadata.

DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023, arXiv 2310.13268, §3.1) rewrites the ODE with
three per-dimension statistics of the model, each a function of λ with the shape of one
sample:

* :math:`l_\lambda = \mathbb E[\mathrm{diag}(\sigma\nabla_x\epsilon_\theta)]` — the linear part
  taken out of the noise prediction;
* :math:`s_\lambda, b_\lambda` — the least-squares fit :math:`f' \approx s f + b` of the
  derivative of :math:`f_\theta = (\sigma\epsilon_\theta - l x)/\alpha` along the ODE.

``l = 1, s = b = 0`` ("degenerate") is DPM-Solver++. An :class:`EMS` carries its own λ grid
(increasing: index 0 is the noisiest point) and metadata — the schedule, the time range, the
number of samples ``K`` and grid intervals ``N``, the data shape and a fingerprint of the model
— so that statistics are never silently applied to another model, schedule or λ.
Files are safetensors with arrays ``lambdas``, ``l``, ``s``, ``b`` and a JSON metadata entry.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsolve.ode.model import network_fingerprint
from diffsolve.ode.schedule import NoiseSchedule, schedule_from_config
from diffsolve.stats.ems.smoothing import local_polynomial, smooth

FORMAT = "diffsolve-ems"
#: The statistics are held and stored in float32, the λ grid in float64: at 4×128×128 with
#: N = 1200 that is 0.95 GB instead of 1.9 GB. :math:`l` is kept as :math:`1 - l`, whose
#: float32 rounding is relative to :math:`1 - l` itself: at high noise, where
#: :math:`l \to 1` and v3 divides by a small :math:`\alpha`, rounding :math:`l` would move
#: the outputs by up to 2e-5 relative (rectified flow), rounding :math:`1 - l` by ≤ 5e-8
#: (BENCHMARKS.md). Every integral over the statistics is computed in float64.
STORAGE_DTYPE = torch.float32
VERSION = 2
_F64 = torch.float64
_ARRAYS = ("one_minus_l", "s", "b")


class EMS:
    """Statistics :math:`l, s, b` on an increasing λ grid (arrays ``(N+1, *data_shape)``).

    Args:
        lambdas: The λ grid, increasing (index 0 = noisiest).
        l, s, b: The statistics at each λ.
        metadata: Schedule, time range, K, N, data shape, model fingerprint (see
            :func:`make_metadata`).
        one_minus_l: ``1 - l`` instead of ``l`` (pass ``l=None``), as stored.

    Attributes:
        one_minus_l, s, b: The arrays as held, float32.
        cache: What solvers derive from the statistics once (the quadrature layout, device
            copies).
    """

    def __init__(
        self,
        lambdas: Tensor,
        l: Tensor | None,
        s: Tensor,
        b: Tensor,
        metadata: dict[str, Any] | None = None,
        *,
        one_minus_l: Tensor | None = None,
    ) -> None:
        self.lambdas = lambdas.detach().to("cpu", _F64).flatten()
        if (l is None) == (one_minus_l is None):
            raise ValueError("EMS: pass exactly one of l and one_minus_l")
        complement = 1.0 - l.detach().to(_F64) if one_minus_l is None else one_minus_l
        self.one_minus_l = complement.detach().to(dtype=STORAGE_DTYPE)
        self.s = s.detach().to(dtype=STORAGE_DTYPE)
        self.b = b.detach().to(dtype=STORAGE_DTYPE)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.cache: dict[Any, Any] = {}
        self._check()

    def _check(self) -> None:
        n = self.lambdas.numel()
        if n < 2:
            raise ValueError("EMS: the λ grid needs at least 2 points")
        if not (self.lambdas[1:] > self.lambdas[:-1]).all():
            raise ValueError("EMS: lambdas must be strictly increasing (index 0 = noisiest)")
        shape = self.one_minus_l.shape
        for name in _ARRAYS:
            array = getattr(self, name)
            if array.shape[0] != n or array.shape[1:] != shape[1:]:
                label = "l" if name == "one_minus_l" else name
                raise ValueError(
                    f"EMS: array {label!r} has shape {tuple(array.shape)}; expected "
                    f"({n}, *data_shape) like l {tuple(shape)}"
                )
            if not torch.isfinite(array).all():
                label = "l" if name == "one_minus_l" else name
                raise ValueError(f"EMS: array {label!r} contains NaN or inf")

    @property
    def l(self) -> Tensor:
        """:math:`l`, in float64 (computed from the stored :math:`1 - l`)."""
        return 1.0 - self.one_minus_l.to(_F64)

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def degenerate(
        cls,
        schedule: NoiseSchedule,
        data_shape: Sequence[int],
        t_start: float | None = None,
        t_end: float | None = None,
        n: int = 2,
    ) -> EMS:
        """``l = 1, s = b = 0`` on ``[t_end, t_start]``: DPM-Solver-v3 becomes DPM-Solver++."""
        t_start, t_end = _range(schedule, t_start, t_end)
        lambdas = torch.linspace(
            float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end)), n + 1, dtype=_F64
        )
        shape = (n + 1, *data_shape)
        meta = make_metadata(
            schedule,
            t_start,
            t_end,
            data_shape,
            samples=0,
            model=None,
            description="degenerate statistics (l=1, s=b=0): DPM-Solver++",
        )
        return cls(
            lambdas,
            torch.ones(shape, dtype=_F64),
            torch.zeros(shape, dtype=_F64),
            torch.zeros(shape, dtype=_F64),
            meta,
        )

    def smoothed(self, bandwidth: float) -> EMS:
        r"""The statistics smoothed in λ: :math:`l, s` and :math:`e^{\lambda} b` by a local
        quadratic regression with a Gaussian kernel of standard deviation ``bandwidth``
        (:func:`~diffsolve.stats.ems.smoothing.local_polynomial`).

        Why: v3's update integrates :math:`s` and :math:`b` exactly as piecewise-linear
        functions, so the estimator's per-point noise becomes a rough (random-walk-like)
        component of the transformed model output :math:`g` that no polynomial step can
        follow: the error stops falling with the steps (on ``digits``, 2.4e-3 at 160 NFE
        with the paper's estimator, 8e-4 for DPM-Solver++). The statistics themselves are
        smooth in λ, so smoothing removes noise at a bias of order ``bandwidth²``
        (BENCHMARKS.md §12). ``bandwidth = 0`` returns the statistics unchanged."""
        if bandwidth == 0:
            return self
        lam = self.lambdas
        value, _ = local_polynomial(lam, lam, bandwidth)
        unit = torch.exp(lam - lam.max()).reshape(-1, *([1] * len(self.data_shape)))
        device = self.one_minus_l.device
        ones, s, b = (
            smooth(v.cpu(), value)
            for v in (self.one_minus_l, self.s, self.b.double().cpu() * unit)
        )
        meta = {**self.metadata, "smoothing_bandwidth": float(bandwidth)}
        return EMS(
            lam, None, s.to(device), (b / unit).to(device), meta, one_minus_l=ones.to(device)
        )

    def to(self, device: str | torch.device) -> EMS:
        """The statistics on ``device`` (DPM-Solver-v3 computes its plan where they live)."""
        if self.one_minus_l.device == torch.device(device):
            return self
        key = ("device", str(device))
        if key not in self.cache:
            s, b, complement = (getattr(self, n).to(device) for n in ("s", "b", "one_minus_l"))
            self.cache[key] = EMS(self.lambdas, None, s, b, self.metadata, one_minus_l=complement)
        return self.cache[key]

    # ---- properties --------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.one_minus_l.shape[1:])

    @property
    def num_intervals(self) -> int:
        """``N``: intervals of the λ grid."""
        return self.lambdas.numel() - 1

    @property
    def lambda_range(self) -> tuple[float, float]:
        """``(λ_min, λ_max)`` covered by the statistics."""
        return float(self.lambdas[0]), float(self.lambdas[-1])

    # ---- checks ------------------------------------------------------------------------
    def check_compatible(
        self,
        schedule: NoiseSchedule,
        data_shape: Sequence[int] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """Raise a clear ``ValueError`` if these statistics were made for another schedule,
        data shape or model."""
        made_for = self.metadata.get("schedule")
        if made_for is not None and not schedule_from_config(made_for).same_process(schedule):
            raise ValueError(
                f"EMS were computed for the schedule {schedule_from_config(made_for)!r}, but the "
                f"model uses {schedule!r}; compute EMS for this model (`diffsolve ems`)"
            )
        if data_shape is not None:
            self.check_data_shape(data_shape, "the model's samples")
        self.check_fingerprint(fingerprint)

    def check_data_shape(self, data_shape: Sequence[int], what: str = "the samples") -> None:
        """Raise a clear ``ValueError`` unless ``data_shape`` (of ``what``) is the shape the
        statistics were computed for."""
        if tuple(data_shape) != self.data_shape:
            raise ValueError(
                f"EMS were computed for data of shape {self.data_shape}, but {what} have "
                f"shape {tuple(data_shape)}; EMS are per-pixel and tied to the model's "
                "channels and resolution: use the EMS of this model (`diffsolve ems`)"
            )

    def check_fingerprint(self, fingerprint: str | None) -> None:
        """Raise a clear ``ValueError`` if the statistics record another model's
        fingerprint (no check when either is unknown)."""
        theirs = self.metadata.get("model_fingerprint")
        if fingerprint is not None and theirs is not None and theirs != fingerprint:
            name = self.metadata.get("model_name", "another model")
            raise ValueError(
                f"EMS were computed for {name} (fingerprint {theirs}), not for this model "
                f"(fingerprint {fingerprint}); compute EMS for it with `diffsolve ems`"
            )

    def check_range(self, lambdas: Sequence[float], tolerance: float = 1e-6) -> None:
        """Raise if a sampling grid needs statistics outside the EMS λ range."""
        lo, hi = self.lambda_range
        values = [float(v) for v in lambdas]
        bad = [v for v in values if v < lo - tolerance or v > hi + tolerance]
        if bad:
            raise ValueError(
                f"the sampling grid reaches λ = {bad[0]:.4f}, outside the EMS range "
                f"[{lo:.4f}, {hi:.4f}] (t in [{self.metadata.get('t_end')}, "
                f"{self.metadata.get('t_start')}]); use a grid inside that range or compute EMS "
                "covering it"
            )

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically (:func:`diffsolve.numerics.files.atomic_path`:
        a ``.<name>.diffsolve-<random>.tmp`` beside it, renamed into place, the umask's
        permissions)."""
        from safetensors.torch import save_file

        from diffsolve.numerics.files import atomic_path

        path = Path(path)
        tensors = {"lambdas": self.lambdas, **{n: getattr(self, n) for n in _ARRAYS}}
        meta = {
            "format": FORMAT,
            "diffsolve_ems": json.dumps({**self.metadata, "version": VERSION}),
        }
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=meta
            )
        return path


def validation_summary(entry: dict[str, Any]) -> str:
    """A stored ``"validation"`` entry (``diffsolve ems``: v3 against DPM-Solver++(2M) on
    held-out noise) as one line."""
    parts = ", ".join(
        f"{ratio:.2f}x at {nfe} NFE"
        for nfe, ratio in zip(entry["nfes"], entry["ratios"], strict=True)
    )
    verdict = "passed" if entry["passed"] else "FAILED: v3 loses to DPM-Solver++(2M)"
    return (
        f"EMS validation {verdict} — v3's RMSE / DPM-Solver++(2M)'s: {parts} "
        f"({entry['samples']} held-out samples, {entry['reference_steps']}-step reference)"
    )


def validation_advice(metadata: dict[str, Any]) -> str:
    """What to change when v3 loses with statistics of this ``metadata``."""
    samples, grid = metadata.get("samples"), metadata.get("grid_size")
    return (
        f"re-estimate them with more samples per λ point (now K = {samples}; the recipe is "
        f"24, noisy networks need 48-96) or a finer λ grid (now N = {grid}; the recipe is "
        "1200), and check the model's conventions (`diffsolve check-model`); until then "
        "DPM-Solver++(2M) or UniPC sample better"
    )


#: EMS files whose failed validation was reported in this process.
_REPORTED: set[str] = set()


def _report_failed_validation(path: Path, metadata: dict[str, Any]) -> None:
    """Warn once per file when its stored validation failed."""
    entry = metadata.get("validation")
    key = str(path.resolve())
    if not isinstance(entry, dict) or entry.get("passed", True) or key in _REPORTED:
        return
    _REPORTED.add(key)
    warnings.warn(
        f"{path}: {validation_summary(entry)}; {validation_advice(metadata)}",
        stacklevel=3,
    )


def load_ems(path: str | Path) -> EMS:
    """Load statistics written by :meth:`EMS.save`, with clear errors for a missing, truncated
    or corrupt file; statistics that failed their validation (``diffsolve ems``) are loaded
    with a warning, once per file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EMS file not found: {path}; compute one with `diffsolve ems`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:
        raise ValueError(
            f"EMS file {path} is corrupt or truncated ({err}); recompute it with `diffsolve ems`"
        ) from None
    if meta.get("format") != FORMAT or "diffsolve_ems" not in meta:
        raise ValueError(f"{path} is not a diffsolve EMS file (no '{FORMAT}' metadata)")
    if "l" in arrays:  # version 1 files: l itself, in float64
        arrays["one_minus_l"] = 1.0 - arrays.pop("l").to(_F64)
    missing = [k for k in ("lambdas", *_ARRAYS) if k not in arrays]
    if missing:
        raise ValueError(f"EMS file {path} lacks the arrays {missing}")
    try:
        metadata = json.loads(meta["diffsolve_ems"])
    except json.JSONDecodeError as err:
        raise ValueError(f"EMS file {path} has corrupt metadata: {err}") from None
    metadata.pop("version", None)
    _report_failed_validation(path, metadata)
    try:
        return EMS(
            arrays["lambdas"],
            None,
            arrays["s"],
            arrays["b"],
            metadata,
            one_minus_l=arrays["one_minus_l"],
        )
    except ValueError as err:
        raise ValueError(f"EMS file {path}: {err}") from None


def make_metadata(
    schedule: NoiseSchedule,
    t_start: float,
    t_end: float,
    data_shape: Sequence[int],
    samples: int,
    model: str | None,
    description: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The metadata every EMS file carries."""
    return {
        "schedule": schedule.to_config(),
        "t_start": float(t_start),
        "t_end": float(t_end),
        "data_shape": list(data_shape),
        "samples": int(samples),
        "model_fingerprint": model,
        "description": description,
        **extra,
    }


def model_fingerprint(model: object) -> str | None:
    """A short hash identifying a network's weights (or an analytic model's parameters):
    the fingerprint a denoiser exposes (``weights_fingerprint()``, e.g.
    :class:`~diffsolve.ode.model.ModelWrapper`'s, which is independent of the dtype
    ``load_model`` loaded the weights in), else that of the network it wraps."""
    exposed = getattr(model, "weights_fingerprint", None)
    if callable(exposed):
        return exposed()
    target = getattr(model, "model", model)  # unwrap a ModelWrapper
    target = getattr(target, "gaussian", target)  # unwrap a GaussianDenoiser
    if callable(getattr(target, "fingerprint", None)):  # analytic models
        return target.fingerprint()
    return network_fingerprint(target)


def exposed_fingerprint(denoiser: object, depth: int = 16) -> str | None:
    """The fingerprint a denoiser, or the diffsolve denoiser it wraps (through ``.model``:
    counting, guidance and other wrappers), already knows — a
    :class:`~diffsolve.ode.model.ModelWrapper`'s given ``fingerprint`` (every model from
    ``load_model`` has one), an analytic model's — without hashing any weights; ``None``
    when there is none (a user's wrapper without one, the diffusers adapter's outputs)."""
    target = denoiser
    for _ in range(depth):
        if hasattr(target, "weights_fingerprint"):  # a diffsolve denoiser: the last stop
            known = getattr(target, "fingerprint", None)
            return known if isinstance(known, str) else None
        target = getattr(target, "model", None)
        if target is None:
            return None
    return None


def _range(
    schedule: NoiseSchedule, t_start: float | None, t_end: float | None
) -> tuple[float, float]:
    default_start, default_end = schedule.default_range
    return (
        default_start if t_start is None else float(t_start),
        default_end if t_end is None else float(t_end),
    )
