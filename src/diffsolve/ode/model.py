r"""Model wrappers: whatever a network predicts, as both :math:`\hat x_0` and :math:`\hat\epsilon`.

With :math:`x = \alpha_t x_0 + \sigma_t \epsilon`, every supported parameterisation is a linear
map of :math:`(x, \text{output})`, so a :class:`Prediction` stores four float64 scalars and forms
each of :math:`\hat x_0, \hat\epsilon` lazily, only when a solver asks for it:

* ``epsilon`` — :math:`\epsilon`; :math:`x_0 = (x - \sigma\epsilon)/\alpha`.
* ``x0`` — :math:`x_0`; :math:`\epsilon = (x - \alpha x_0)/\sigma`.
* ``v`` — :math:`v = \alpha\epsilon - \sigma x_0`;
  :math:`x_0 = (\alpha x - \sigma v)/(\alpha^2+\sigma^2)`,
  :math:`\epsilon = (\sigma x + \alpha v)/(\alpha^2+\sigma^2)`.
* ``score`` — :math:`\nabla\log p_t = -\epsilon/\sigma`; :math:`\epsilon = -\sigma s`.
* ``flow`` — velocity :math:`u = \dot\alpha x_0 + \dot\sigma\epsilon`; solve the 2×2 system
  with :math:`(\alpha, \sigma; \dot\alpha, \dot\sigma)` (rectified flow: :math:`u = \epsilon -
  x_0`).

The map from solver time to the network's own time input lives here too (``time_input``):
``"t"`` (solver time as is), ``"timestep"`` (discrete VP: the fractional training timestep
:math:`tN - 1`; continuous schedules: :math:`1000\,t`), ``"sigma"`` (:math:`\sigma/\alpha`,
the EDM / k-diffusion convention), or any callable from solver time (a float64 0-dim tensor)
to the network's time (a tensor or a number), e.g. ``lambda t: 1 - t`` for a flow model
trained with ``t = 0`` as noise. Solver time is continuous: a network whose time embedding
casts it to an integer sees truncated times (``diffsolve check-model`` detects it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffsolve.numerics.expint import Space
from diffsolve.ode.schedule import NoiseSchedule, VPDiscrete

PredictionType = Literal["epsilon", "x0", "v", "score", "flow"]
TimeInput = Literal["t", "timestep", "sigma"] | Callable[[Tensor], Tensor | float]

PREDICTION_ALIASES: dict[str, PredictionType] = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "noise": "epsilon",
    "x0": "x0",
    "sample": "x0",
    "x_start": "x0",
    "data": "x0",
    "v": "v",
    "v_prediction": "v",
    "score": "score",
    "flow": "flow",
    "velocity": "flow",
    "flow_prediction": "flow",
}


@dataclass(frozen=True)
class Conversion:
    """:math:`\\hat x_0 = p_x x + p_o\\,\\text{out}` and :math:`\\hat\\epsilon = e_x x +
    e_o\\,\\text{out}` at one time ``t``, with the schedule's :math:`\\alpha, \\sigma` there."""

    px: float
    po: float
    ex: float
    eo: float
    alpha: float
    sigma: float


def _lincomb(x: Tensor, cx: float, out: Tensor, co: float) -> Tensor:
    """:math:`c_x x + c_o\\,\\text{out}` with one allocation (large CPU allocations fault in
    fresh pages: each one costs more than the arithmetic)."""
    if cx == 0.0:
        return out * co
    return torch.mul(x, cx).add_(out, alpha=co)


class Prediction:
    """A model evaluation at ``(x, t)``, readable as :attr:`x0` and :attr:`eps`.

    Both are computed on first access only and cached. Solvers read them through
    :meth:`scaled`, which costs at most one pass over memory.
    """

    __slots__ = ("_eps", "_scaled", "_x0", "conversion", "out", "t", "x")

    def __init__(self, x: Tensor, out: Tensor, conversion: Conversion, t: float) -> None:
        self.x, self.out, self.conversion, self.t = x, out, conversion, t
        self._x0: Tensor | None = None
        self._eps: Tensor | None = None
        self._scaled: dict[Space, tuple[Tensor, float]] = {}

    @classmethod
    def from_x0(cls, x: Tensor, x0: Tensor, alpha: float, sigma: float, t: float) -> Prediction:
        """Wrap a data prediction (used by analytic models and guidance)."""
        return cls(x, x0, conversion_for("x0", alpha, sigma), t)

    def _coefficients(self, space: Space) -> tuple[float, float]:
        c = self.conversion
        return (c.px, c.po) if space == "data" else (c.ex, c.eo)

    def scaled(self, space: Space) -> tuple[Tensor, float]:
        """The ``"data"`` or ``"noise"`` prediction as ``(tensor, scale)`` with prediction
        :math:`= \\text{scale}\\cdot\\text{tensor}`: :math:`c_x x + c_o\\,\\text{out} =
        c_x (x + (c_o/c_x)\\,\\text{out})` is one pass over memory (none when the network
        predicts it directly), where forming it costs two; solvers fold ``scale`` into their
        weights."""
        cached = self._scaled.get(space)
        if cached is None:
            cx, co = self._coefficients(space)
            if cx == 0.0:
                cached = (self.out, co)
            elif co == 0.0:
                cached = (self.x, cx)
            else:
                cached = (torch.add(self.x, self.out, alpha=co / cx), cx)
            self._scaled[space] = cached
        return cached

    def _full(self, space: Space) -> Tensor:
        """The prediction itself: from :meth:`scaled` if it was read, else formed directly."""
        cached = self._scaled.get(space)
        if cached is not None:
            tensor, scale = cached
            return tensor if scale == 1.0 else tensor * scale
        cx, co = self._coefficients(space)
        return self.out if cx == 0.0 and co == 1.0 else _lincomb(self.x, cx, self.out, co)

    @property
    def x0(self) -> Tensor:
        """Data prediction :math:`\\hat x_0`."""
        if self._x0 is None:
            self._x0 = self._full("data")
        return self._x0

    @property
    def eps(self) -> Tensor:
        """Noise prediction :math:`\\hat\\epsilon`."""
        if self._eps is None:
            self._eps = self._full("noise")
        return self._eps

    def get(self, space: Space) -> Tensor:
        """The ``"data"`` (:attr:`x0`) or ``"noise"`` (:attr:`eps`) prediction."""
        return self.x0 if space == "data" else self.eps


def normalize_prediction(prediction: str) -> PredictionType:
    """Map a prediction name (including diffusers' and DPM-Solver's spellings) to ours."""
    try:
        return PREDICTION_ALIASES[prediction]
    except (KeyError, TypeError):
        raise ValueError(
            f"prediction must be one of {sorted(set(PREDICTION_ALIASES.values()))} "
            f"(aliases: {sorted(PREDICTION_ALIASES)}); got {prediction!r}"
        ) from None


def conversion_for(
    prediction: PredictionType,
    alpha: float,
    sigma: float,
    d_alpha: float = math.nan,
    d_sigma: float = math.nan,
) -> Conversion:
    """The linear map from ``(x, out)`` to ``(x0, eps)`` for one prediction type."""
    a, s = alpha, sigma
    if prediction == "epsilon":
        return Conversion(1.0 / a, -s / a, 0.0, 1.0, a, s)
    if prediction == "x0":
        return Conversion(0.0, 1.0, 1.0 / s, -a / s, a, s)
    if prediction == "v":
        n = a * a + s * s
        return Conversion(a / n, -s / n, s / n, a / n, a, s)
    if prediction == "score":
        return Conversion(1.0 / a, s * s / a, 0.0, -s, a, s)
    if prediction == "flow":
        det = a * d_sigma - s * d_alpha
        return Conversion(d_sigma / det, -s / det, -d_alpha / det, a / det, a, s)
    raise ValueError(f"unknown prediction type {prediction!r}")


@runtime_checkable
class Denoiser(Protocol):
    """What a solver needs from a model: its schedule and ``(x, t) -> Prediction``."""

    schedule: NoiseSchedule

    def __call__(self, x: Tensor, t: float) -> Prediction: ...


class ModelWrapper:
    """Wrap a network ``net(x, time, **model_kwargs)`` into a :class:`Denoiser`.

    Args:
        model: The network. Its output may be a tensor, a tuple (first item used) or an
            object with ``.sample`` (diffusers' output classes).
        schedule: The noise schedule the network was trained with.
        prediction: What the network predicts (see the module docstring for aliases).
        time_input: How solver time maps to the network's time argument; ``"auto"`` picks
            ``"timestep"`` for discrete VP schedules, ``"sigma"`` for EDM, ``"t"`` otherwise.
        model_kwargs: Extra keyword arguments for every call (e.g. ``class_labels``).
        model_dtype: The dtype the network runs in: inputs are cast to it for the call;
            outputs are always cast back to the solver state's dtype. Default: the dtype of
            an ``nn.Module``'s first floating-point parameter (so float64 solver state drives
            a float32 network), else the input's dtype.
        fingerprint: The weights' fingerprint (:func:`network_fingerprint`), when known —
            e.g. computed by :func:`diffsolve.app.loader.load_model` from the weights as
            stored, before casting them to half precision. DPM-Solver-v3 checks it against
            its statistics' ``model_fingerprint`` at no cost; without it only the sample
            shape is checked (:meth:`weights_fingerprint` hashes the network on request).
        data_shape: The shape of one sample, e.g. ``(1, 28, 28)`` or SD's ``(4, 64, 64)``:
            what the command line samples (``diffsolve sample --model file.py:NAME``) and
            the EMS are estimated for. Optional for the library, which takes the shape of
            the ``x`` it is given.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        time_input: TimeInput | Literal["auto"] = "auto",
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        fingerprint: str | None = None,
        data_shape: Sequence[int] | None = None,
    ) -> None:
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.model = model
        self.schedule = schedule
        self.prediction: PredictionType = normalize_prediction(prediction)
        self.time_input = _resolve_time_input(time_input, schedule)
        self.model_kwargs = dict(model_kwargs or {})
        self.model_dtype = model_dtype
        self.fingerprint = fingerprint
        self.data_shape = _check_shape(data_shape)
        self._conversions: dict[float, Conversion] = {}
        self._model_times: dict[float, float] = {}

    def with_kwargs(self, **model_kwargs: Any) -> ModelWrapper:
        """A copy that passes extra keyword arguments (e.g. ``class_labels``)."""
        return ModelWrapper(
            self.model,
            self.schedule,
            self.prediction,
            self.time_input,
            {**self.model_kwargs, **model_kwargs},
            self.model_dtype,
            self.fingerprint,
            self.data_shape,
        )

    def weights_fingerprint(self) -> str | None:
        """The network's fingerprint: the one given (:attr:`fingerprint`), else
        :func:`network_fingerprint` of the network (hashing every weight)."""
        if self.fingerprint is not None:
            return self.fingerprint
        return network_fingerprint(self.model)

    def network_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the network is called in (see ``model_dtype``)."""
        if self.model_dtype is not None:
            return self.model_dtype
        if isinstance(self.model, nn.Module):
            for parameter in self.model.parameters():
                if parameter.is_floating_point():
                    return parameter.dtype
        return x.dtype

    def model_time(self, t: float) -> float:
        """The network's own time input for solver time ``t``."""
        model_t = self._model_times.get(t)
        if model_t is None:
            value = self.time_input(torch.tensor(float(t), dtype=torch.float64))
            model_t = self._model_times[t] = float(value)
        return model_t

    def conversion(self, t: float) -> Conversion:
        """The output-to-(x0, eps) map at solver time ``t`` (cached per ``t``)."""
        conversion = self._conversions.get(t)
        if conversion is None:
            conversion = self._conversions[t] = self._conversion(t)
        return conversion

    def __call__(self, x: Tensor, t: float) -> Prediction:
        return Prediction(x, self.forward(x, t), self.conversion(t), t)

    def forward(self, x: Tensor, t: float) -> Tensor:
        """The network's raw output at solver time ``t``, in ``x``'s dtype (no range check
        beyond the time map itself: peers may evaluate where λ is infinite, e.g. flow t = 1)."""
        model_t = self.model_time(t)
        dtype = self.network_dtype(x)
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        t_in = torch.full((x.shape[0],), model_t, dtype=t_dtype, device=x.device)
        out = _unwrap_output(self.model(x.to(dtype), t_in, **self.model_kwargs))
        if out.shape != x.shape:
            raise ValueError(
                f"model output shape {tuple(out.shape)} does not match its input "
                f"{tuple(x.shape)}; a model must return a tensor shaped like x"
            )
        return out.to(x.dtype)

    def network_time_unit(self, t: float) -> float:
        """The solver time one unit of the network's own time spans at ``t`` (discrete VP
        with ``"timestep"``: one training step, ``1/N``): ``1 / |dτ/dt|``, numerically."""
        h = 1e-6 * max(abs(t), 1e-3)
        hi, lo = (torch.tensor(v, dtype=torch.float64) for v in (t + h, t - h))
        slope = abs(float(self.time_input(hi)) - float(self.time_input(lo))) / (2 * h)
        return 1.0 / slope if slope > 0 else math.inf

    def ignores_fractional_time(self, x: Tensor) -> bool:
        """Whether the network returns bit-identical outputs at two network times with the
        same integer part (``k + 0.2`` and ``k + 0.7``) but not at the next integer
        (``k + 1.2``), at three times along the schedule: a time embedding that casts its
        input to an integer. Its forward-mode time derivative is then zero, and the
        solvers' fractional times are truncated. (A network that ignores time altogether
        is not flagged.)"""
        high, low = self.schedule.default_range
        found = []
        with torch.inference_mode():
            for fraction in (0.25, 0.5, 0.75):
                t = low + fraction * (high - low)
                base = math.floor(float(self.time_input(torch.tensor(t, dtype=torch.float64))))
                a, b, c = (self._at_network_time(x, base + f) for f in (0.2, 0.7, 1.2))
                found.append(torch.equal(a, b) and not torch.equal(a, c))
        return all(found)

    def _at_network_time(self, x: Tensor, network_time: float) -> Tensor:
        """The network's raw output at a time in its own units."""
        t_in = torch.full((x.shape[0],), network_time, dtype=torch.float32, device=x.device)
        return _unwrap_output(self.model(x.to(self.network_dtype(x)), t_in, **self.model_kwargs))

    def differentiable_eps(self, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`\hat\epsilon(x, t)` differentiable in both ``x`` and a float64 0-dim ``t``
        (forward- and reverse-mode), for estimating DPM-Solver-v3's statistics."""
        log_alpha, log_sigma = self.schedule.log_alpha_sigma(t)
        alpha, sigma = torch.exp(log_alpha), torch.exp(log_sigma)
        dtype = self.network_dtype(x)
        model_t = torch.as_tensor(self.time_input(t), dtype=torch.float64)
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        t_in = model_t.to(device=x.device, dtype=t_dtype).expand(x.shape[0])
        out = _unwrap_output(self.model(x.to(dtype), t_in, **self.model_kwargs)).to(x.dtype)
        if self.prediction == "flow":
            d_alpha, d_sigma = torch.func.jacfwd(
                lambda u: torch.stack([torch.exp(v) for v in self.schedule.log_alpha_sigma(u)])
            )(t)
            c = conversion_for("flow", alpha, sigma, d_alpha, d_sigma)  # type: ignore[arg-type]
        else:
            c = conversion_for(self.prediction, alpha, sigma)  # type: ignore[arg-type]
        return c.ex * x + c.eo * out

    def _conversion(self, t: float) -> Conversion:
        if not 0.0 < t <= self.schedule.t_max * (1 + 1e-12):
            raise ValueError(
                f"t={t} is outside the schedule's model-evaluation range "
                f"(0, {self.schedule.t_max}]"
            )
        if self.prediction != "flow":
            alpha, sigma = (float(v) for v in _alpha_sigma(self.schedule, t))
            return conversion_for(self.prediction, alpha, sigma)
        closed_form = self.schedule.d_alpha_sigma(t)
        if closed_form is not None:
            alpha, sigma = (float(v) for v in _alpha_sigma(self.schedule, t))
            return conversion_for("flow", alpha, sigma, *closed_form)
        with torch.inference_mode(False), torch.enable_grad():
            t_var = torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
            alpha_t, sigma_t = _alpha_sigma(self.schedule, t_var)
            d_alpha, d_sigma = _derivatives(alpha_t, sigma_t, t_var)
        return conversion_for(
            "flow", float(alpha_t.detach()), float(sigma_t.detach()), d_alpha, d_sigma
        )


def _derivatives(alpha: Tensor, sigma: Tensor, t: Tensor) -> tuple[float, float]:
    r""":math:`(\dot\alpha, \dot\sigma)` at ``t`` by autograd (zero where constant)."""

    def d(v: Tensor) -> float:
        if not v.requires_grad:
            return 0.0
        return float(torch.autograd.grad(v, t, retain_graph=True)[0])

    return d(alpha), d(sigma)


def _alpha_sigma(schedule: NoiseSchedule, t: float | Tensor) -> tuple[Tensor, Tensor]:
    log_alpha, log_sigma = schedule.log_alpha_sigma(t)
    return torch.exp(log_alpha), torch.exp(log_sigma)


def _check_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """``data_shape`` as a tuple of positive ints, or a clear error."""
    if shape is None:
        return None
    try:
        dims = tuple(int(d) for d in shape)
        valid = bool(dims) and all(d > 0 and d == e for d, e in zip(dims, shape, strict=True))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"data_shape must be a sequence of positive integers, got {shape!r}")
    return dims


def _unwrap_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(
        f"model returned {type(out).__name__}; expected a tensor, a tuple whose first item is "
        "a tensor, or an object with a .sample tensor"
    )


def _resolve_time_input(
    time_input: TimeInput | Literal["auto"], schedule: NoiseSchedule
) -> Callable[[float], float]:
    if callable(time_input):
        return time_input
    if time_input == "auto":
        time_input = (
            "timestep"
            if isinstance(schedule, VPDiscrete)
            else "sigma"
            if schedule.kind == "edm"
            else "t"
        )
    if time_input == "t":
        return lambda t: t
    if time_input == "timestep":
        if isinstance(schedule, VPDiscrete):
            n = schedule.num_train_timesteps
            return lambda t: t * n - 1.0
        if schedule.kind == "edm":
            raise ValueError(
                "time_input='timestep' is undefined for the EDM schedule; use 'sigma'"
            )
        return lambda t: 1000.0 * t
    if time_input == "sigma":
        return schedule.edm_sigma
    raise ValueError(
        f"time_input must be 'auto', 't', 'timestep', 'sigma' or a callable; got {time_input!r}"
    )


_FULL_PRECISION = (torch.float32, torch.float64)


def network_fingerprint(network: object) -> str | None:
    """A short hash identifying a network's weights: SHA-256 of the state dict's names and
    values in float32, so that a network in float64 keeps the fingerprint of its float32
    file. A network held in float16/bfloat16 has none (``None``): its rounded weights
    cannot be told from the original's, so give the fingerprint of the weights as stored
    (``ModelWrapper(fingerprint=...)``, as ``load_model`` does)."""
    if not isinstance(network, nn.Module):  # a callable holding tensors: their raw bytes
        tensors = [v for v in getattr(network, "__dict__", {}).values() if isinstance(v, Tensor)]
        digest = hashlib.sha256()
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
        return digest.hexdigest()[:16] if tensors else None
    return _hash_tensors(sorted(network.state_dict().items()))


def _hash_tensors(named: list[tuple[str, Tensor]]) -> str | None:
    digest = hashlib.sha256()
    for name, tensor in named:
        value = tensor.detach().cpu()
        if value.is_floating_point():
            if value.dtype not in _FULL_PRECISION:
                return None
            value = value.float()
        digest.update(name.encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
