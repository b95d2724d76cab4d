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

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsolve.ode.schedule import NoiseSchedule, schedule_from_config

FORMAT = "diffsolve-ems"
VERSION = 1
_F64 = torch.float64


@dataclass(eq=False)
class EMS:
    """Statistics :math:`l, s, b` on an increasing λ grid (arrays ``(N+1, *data_shape)``)."""

    lambdas: Tensor
    l: Tensor
    s: Tensor
    b: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lambdas = self.lambdas.detach().to("cpu", _F64).flatten()
        for name in ("l", "s", "b"):
            setattr(self, name, getattr(self, name).detach().to("cpu", _F64))
        n = self.lambdas.numel()
        if n < 2:
            raise ValueError("EMS: the λ grid needs at least 2 points")
        if not (self.lambdas[1:] > self.lambdas[:-1]).all():
            raise ValueError("EMS: lambdas must be strictly increasing (index 0 = noisiest)")
        for name in ("l", "s", "b"):
            array = getattr(self, name)
            if array.shape[0] != n or array.shape[1:] != self.l.shape[1:]:
                raise ValueError(
                    f"EMS: array {name!r} has shape {tuple(array.shape)}; expected "
                    f"({n}, *data_shape) like l {tuple(self.l.shape)}"
                )
            if not torch.isfinite(array).all():
                raise ValueError(f"EMS: array {name!r} contains NaN or inf")

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

    # ---- properties --------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.l.shape[1:])

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
        if made_for is not None and schedule_from_config(made_for) != schedule:
            raise ValueError(
                f"EMS were computed for the schedule {schedule_from_config(made_for)!r}, but the "
                f"model uses {schedule!r}; compute EMS for this model (`diffsolve ems`)"
            )
        if data_shape is not None and tuple(data_shape) != self.data_shape:
            raise ValueError(
                f"EMS were computed for data of shape {self.data_shape}, but the model's samples "
                f"have shape {tuple(data_shape)}; EMS are per-pixel and tied to the resolution"
            )
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
        """Write a safetensors file atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}
        meta = {
            "format": FORMAT,
            "diffsolve_ems": json.dumps({**self.metadata, "version": VERSION}),
        }
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files
        tmp.replace(path)
        return path


def load_ems(path: str | Path) -> EMS:
    """Load statistics written by :meth:`EMS.save`, with clear errors for a missing, truncated
    or corrupt file."""
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
    missing = [k for k in ("lambdas", "l", "s", "b") if k not in arrays]
    if missing:
        raise ValueError(f"EMS file {path} lacks the arrays {missing}")
    try:
        metadata = json.loads(meta["diffsolve_ems"])
    except json.JSONDecodeError as err:
        raise ValueError(f"EMS file {path} has corrupt metadata: {err}") from None
    try:
        return EMS(arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"], metadata)
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
    """A short hash identifying a network's weights (or an analytic model's parameters)."""
    target = getattr(model, "model", model)  # unwrap a ModelWrapper
    target = getattr(target, "gaussian", target)  # unwrap a GaussianDenoiser
    if callable(getattr(target, "fingerprint", None)):  # analytic models
        return target.fingerprint()
    digest = hashlib.sha256()
    if isinstance(target, nn.Module):
        for name, tensor in sorted(target.state_dict().items()):
            digest.update(name.encode())
            digest.update(_canonical_bytes(tensor))
        return digest.hexdigest()[:16]
    tensors = [v for v in vars(target).values() if isinstance(v, Tensor)]
    if not tensors:
        return None
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _canonical_bytes(tensor: Tensor) -> bytes:
    """A weight's bytes in float32, so that a network loaded in float64 (or any dtype its
    float32 weights convert to exactly) keeps the fingerprint of its file."""
    value = tensor.detach().cpu()
    if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()
    return value.contiguous().numpy().tobytes()


def _range(
    schedule: NoiseSchedule, t_start: float | None, t_end: float | None
) -> tuple[float, float]:
    default_start, default_end = schedule.default_range
    return (
        default_start if t_start is None else float(t_start),
        default_end if t_end is None else float(t_end),
    )
