r"""Jacobian-vector products of a network, by whichever differentiation path the network
supports: the derivatives behind DPM-Solver-v3's empirical model statistics.

The estimator needs, for a noise prediction :math:`\epsilon_\theta(x, t)` and a tangent
:math:`(\dot x, \dot t)`, the pair :math:`(\epsilon_\theta(x, t),\;
\partial_x\epsilon_\theta\,\dot x + \partial_t\epsilon_\theta\,\dot t)`. Not every network can
be differentiated every way — PyTorch's CPU flash attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``), custom CUDA kernels and some pickled
models have no forward-mode AD — so the paths are tried in a fixed order (:data:`PATHS`):

1. ``"forward"``: forward-mode AD, ``torch.func.jvp`` (one dual-number pass, no stored
   activations).
2. ``"forward_math_attention"``: the same under
   ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: ``scaled_dot_product_attention``
   runs as matmul/softmax, which supports forward AD (slower attention, same result), and
   ``group_norm`` takes contiguous inputs (its forward-AD rule fails on the transposed view
   diffusers' attention blocks normalise: ``UNet2DModel`` with attention fell back to finite
   differences without it). Attention that does not go through
   ``scaled_dot_product_attention`` (xformers, custom kernels) is not affected: for diffusers
   models see
   :func:`diffsolve.integrations.diffusers.differentiable_attention`.
3. ``"double_backward"``: ``torch.autograd.functional.jvp``, the double-vjp trick
   :math:`J\dot x = \nabla_u\langle J^\top u, \dot x\rangle` (reverse mode twice; stores
   activations).
4. ``"finite_difference"``: differences of forward passes only, extrapolated by Ridders'
   method (and ``"step_difference"``, chosen explicitly only: the same along ``x``, but in
   time one plain central difference across a training step, for networks that take
   integer timesteps — every finer difference of theirs is zero). A central difference
   :math:`D(h) = (\epsilon(x + h\dot x) - \epsilon(x - h\dot x))/(2h)` has truncation error
   :math:`O(h^2)` and rounding error :math:`O(\varepsilon\lVert\epsilon\rVert/h)`,
   :math:`\varepsilon` the machine epsilon of the dtype the network runs in; both balance
   at a relative step :math:`\varepsilon^{1/3}` (float32: 5e-3) for an error
   :math:`O(\varepsilon^{2/3})` — but only if the function varies on the scale of its
   input, which networks do not promise (at low noise
   :math:`\epsilon_\theta` varies on the scale :math:`\sigma`; in time, a sinusoidal embedding
   turns about one radian per *training timestep*, 1/1000 of the time range). So
   differences at steps :math:`h_k = h_0/2^k` are extrapolated to :math:`h \to 0` in a
   Neville tableau (Ridders), keeping per sample the entry whose estimated error is
   smallest — per sample, so the result does not depend on the other samples of the batch:

   * along ``x``, sample by sample: :math:`h_0 = 4\varepsilon^{1/3}\max(\lVert x\rVert,
     \sqrt D)/\lVert\dot x\rVert` (:math:`D` the sample's size), 4 levels;
   * along ``t`` (one time for the batch): :math:`h_0 = \min(\varepsilon^{1/3}
     \max(|t|, 0.1), |t|/2)`, 10 levels (down to 1/512 of :math:`h_0`); where
     :math:`t + h_0` would leave the schedule (``t_max``) the second-order backward
     difference :math:`(3\epsilon(t) - 4\epsilon(t-h) + \epsilon(t-2h))/(2h)` replaces the
     central one.

   Measured against forward-mode AD on float32 networks: 2e-5 – 2e-4 relative along ``x``,
   1e-4 – 3e-3 along ``t`` (limited by the float32 time input). Cost per call: 9 network
   evaluations without a time tangent, 29 with one — the price of needing nothing but
   forward passes.

Measured cost of one JVP along ``(x, t)`` in plain forward passes of the same batch
(``scripts/ems_derivative_cost.py``, CPU, one thread, batch 64, ``digits``): forward 5.6,
forward with math attention 5.3, double backward 6.3, finite differences 28; on the tiny
attention UNet (batch 16) forward with math attention 7.6, finite differences 27. A float64
   network (``ModelWrapper(net.double(), ..., model_dtype=torch.float64)``) makes the
   differences nearly exact; float16/bfloat16 ones give about 1e-2.

:class:`JVP` runs one path, or in ``"auto"`` mode probes them in order on its first call and
keeps the first one that returns finite values; when none does, the error lists what each
path raised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

#: ``fn(x, t) -> out`` with ``t`` a float64 0-dim tensor.
Function = Callable[[Tensor, Tensor], Tensor]
#: ``(fn, x, t, tx, tt) -> (fn(x, t), J_x tx + J_t tt)``.
JVPRule = Callable[[Function, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
PathName = Literal[
    "forward", "forward_math_attention", "double_backward", "finite_difference", "step_difference"
]
JVPMode = Literal[
    "auto",
    "forward",
    "forward_math_attention",
    "double_backward",
    "finite_difference",
    "step_difference",
]

logger = logging.getLogger("diffsolve.ems")


def forward_jvp(
    fn: Function, x: Tensor, t: Tensor, tx: Tensor, tt: Tensor
) -> tuple[Tensor, Tensor]:
    """Forward-mode AD: ``torch.func.jvp`` of ``fn`` at ``(x, t)`` along ``(tx, tt)``."""
    with torch.no_grad():
        out, tangent = torch.func.jvp(fn, (x, t), (tx, tt))
    return out, tangent


@contextmanager
def _contiguous_group_norm() -> Iterator[None]:
    """``torch.nn.functional.group_norm`` on a contiguous copy of its input, for the block.

    The forward-mode rule of ``group_norm`` views the input's tangent, which fails on a
    non-contiguous input; diffusers' attention blocks (``UNet2DModel``'s
    ``AttnDownBlock2D``, ``Attention(group_norm=...)``) normalise a transposed ``(B, C, HW)``
    view. The result is the same; only the layout of the input changes."""
    functional = torch.nn.functional
    original = functional.group_norm

    def group_norm(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return original(input.contiguous(), *args, **kwargs)

    functional.group_norm = group_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.group_norm = original  # type: ignore[assignment]


def forward_math_attention_jvp(
    fn: Function, x: Tensor, t: Tensor, tx: Tensor, tt: Tensor
) -> tuple[Tensor, Tensor]:
    """Forward-mode AD with ``scaled_dot_product_attention`` restricted to its math backend
    (matmul + softmax, which forward AD supports), and ``group_norm`` on contiguous inputs
    (:func:`_contiguous_group_norm`): together they give an exact derivative path for
    diffusers' attention UNets."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), _contiguous_group_norm():
        return forward_jvp(fn, x, t, tx, tt)


def double_backward_jvp(
    fn: Function, x: Tensor, t: Tensor, tx: Tensor, tt: Tensor
) -> tuple[Tensor, Tensor]:
    """Reverse mode twice (``torch.autograd.functional.jvp``, the double-vjp trick)."""
    with torch.enable_grad():
        out, tangent = torch.autograd.functional.jvp(fn, (x, t), (tx, tt))
    return out.detach(), tangent.detach()


def _rms(values: Tensor) -> Tensor:
    """Per-sample root mean square, shaped to broadcast against ``values``."""
    flat = values.detach().double().flatten(1)
    rms = flat.square().mean(1).sqrt()
    return rms.reshape(-1, *([1] * (values.ndim - 1)))


@dataclass(frozen=True)
class FiniteDifference:
    r"""Central-difference JVP (module docstring, path 4).

    Args:
        precision: The dtype the network computes in (its machine epsilon sets the step);
            ``None``: the input's dtype. A callable gets the input and returns it (e.g.
            :meth:`diffsolve.ModelWrapper.network_dtype`).
        t_max: The largest time the function accepts: a time step that would pass it is
            taken backwards (second-order one-sided difference).
        x_levels, t_levels: Steps of Ridders' extrapolation along ``x`` and ``t``.
        t_step: ``t -> h``: differences in ``t`` over exactly ``h`` instead (no
            extrapolation): one training step of a network that takes integer timesteps
            (the ``"step_difference"`` path), whose finer differences are zero.
    """

    precision: torch.dtype | Callable[[Tensor], torch.dtype] | None = None
    t_max: float = math.inf
    x_levels: int = 4
    t_levels: int = 10
    t_step: Callable[[float], float] | None = None

    def epsilon(self, x: Tensor) -> float:
        """Machine epsilon of the network's dtype (never finer than ``x``'s). A float32
        network on CUDA with TF32 allowed (cuDNN's default for convolutions) computes with
        10 mantissa bits: :math:`2^{-10}` (measured on an H100: finite differences at
        float32's epsilon disagree with forward mode by 3% there, by 3e-4 without TF32)."""
        dtype = self.precision(x) if callable(self.precision) else self.precision
        eps = torch.finfo(dtype or x.dtype).eps
        if (dtype or x.dtype) == torch.float32 and x.device.type == "cuda" and _tf32_allowed():
            eps = max(eps, TF32_EPSILON)
        return max(eps, torch.finfo(x.dtype).eps)

    def __call__(
        self, fn: Function, x: Tensor, t: Tensor, tx: Tensor, tt: Tensor
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            out = fn(x, t)
            root = self.epsilon(x) ** (1.0 / 3.0)
            tangent = self._along_x(fn, x, t, tx, root, out)
            if float(tt) != 0.0:
                tangent = tangent + float(tt) * self._along_t(fn, x, t, root, out)
        return out, tangent

    def _along_x(
        self, fn: Function, x: Tensor, t: Tensor, tx: Tensor, root: float, out: Tensor
    ) -> Tensor:
        """:math:`J_x\\dot x` by Ridders-extrapolated central differences, per sample."""
        size = math.sqrt(x[0].numel()) if x.shape[0] else 1.0
        norm_x = torch.clamp(_rms(x), min=1.0) * size  # max(||x||, sqrt(D))
        norm_tx = _rms(tx) * size
        h = 4 * root * norm_x / torch.where(norm_tx > 0, norm_tx, torch.ones_like(norm_tx))
        direction = tx.double()

        def difference(step: Tensor) -> Tensor:
            shift = (step * direction).to(x.dtype)
            return (fn(x + shift, t).double() - fn(x - shift, t).double()) / (2 * step)

        return _ridders(difference, h, self.x_levels)[0].to(out.dtype)

    def _along_t(self, fn: Function, x: Tensor, t: Tensor, root: float, out: Tensor) -> Tensor:
        """:math:`\\partial_t\\epsilon` by Ridders' extrapolation of differences (module
        docstring), chosen per sample."""
        t0 = float(t)
        h = min(root * max(abs(t0), 0.1), abs(t0) / 2)
        if self.t_step is not None:
            h = min(self.t_step(t0), abs(t0) / 2)
        at = lambda s: fn(x, torch.as_tensor(s, dtype=t.dtype, device=t.device)).double()  # noqa: E731
        central = t0 + h <= self.t_max
        base = out.double()

        def difference(step: float) -> Tensor:
            if central:
                return (at(t0 + step) - at(t0 - step)) / (2 * step)
            return (3 * base - 4 * at(t0 - step) + at(t0 - 2 * step)) / (2 * step)

        if self.t_step is not None:  # across training steps: the finer differences are zero
            return difference(h).to(out.dtype)
        return _ridders(difference, h, self.t_levels)[0].to(out.dtype)


#: Machine epsilon of TF32 (10 explicit mantissa bits).
TF32_EPSILON = 2.0**-10


def _tf32_allowed() -> bool:
    """Whether float32 convolutions or matrix products may run in TF32 on CUDA."""
    return bool(
        torch.backends.cudnn.allow_tf32
        or torch.backends.cuda.matmul.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    )


def _ridders(
    difference: Callable[[Any], Tensor], h: float | Tensor, levels: int, shrink: float = 2.0
) -> tuple[Tensor, Tensor]:
    r"""Ridders' method: differences at steps :math:`h, h/c, \dots, h/c^{L-1}` extrapolated
    to :math:`h \to 0` (Neville tableau, error :math:`O(h^2)` removed column by column),
    keeping per sample the entry whose estimated error (its change from its neighbours,
    RMS over the sample) is smallest. Returns the estimate and that error."""
    factor = shrink * shrink
    previous: list[Tensor] = [difference(h)]
    best = previous[0]
    error = torch.full(_per_sample(best).shape, math.inf, dtype=best.dtype, device=best.device)
    for _ in range(1, levels):
        h /= shrink
        row = [difference(h)]
        fac = factor
        for j in range(1, len(previous) + 1):
            row.append((row[j - 1] * fac - previous[j - 1]) / (fac - 1))
            fac *= factor
            change = torch.maximum(
                _per_sample(row[j] - row[j - 1]), _per_sample(row[j] - previous[j - 1])
            )
            better = change < error
            error = torch.where(better, change, error)
            best = torch.where(better, row[j], best)
        previous = row
    return best, error


def _per_sample(values: Tensor) -> Tensor:
    """Per-sample RMS shaped to broadcast against ``values``."""
    return _rms(values)


@dataclass(frozen=True)
class DerivativePath:
    """One way to take a JVP: its name, what it is, and the rule."""

    name: PathName
    description: str
    rule: JVPRule


def derivative_paths(
    precision: torch.dtype | Callable[[Tensor], torch.dtype] | None = None,
    t_max: float = math.inf,
    t_step: Callable[[float], float] | None = None,
) -> tuple[DerivativePath, ...]:
    """The paths, in the order ``"auto"`` tries them (finite differences configured with the
    network's ``precision`` and the largest time ``t_max``), then ``"step_difference"``,
    which ``"auto"`` never takes: differences in time across ``t_step(t)`` (one training
    step), for networks that take integer timesteps (given only with ``t_step``)."""
    step = () if t_step is None else (
        DerivativePath(
            "step_difference",
            "finite differences, in time across one training step",
            FiniteDifference(precision, t_max, t_step=t_step),
        ),
    )  # fmt: skip
    return (
        DerivativePath("forward", "forward-mode AD (torch.func.jvp)", forward_jvp),
        DerivativePath(
            "forward_math_attention",
            "forward-mode AD, scaled_dot_product_attention on its math backend",
            forward_math_attention_jvp,
        ),
        DerivativePath(
            "double_backward",
            "double backward (torch.autograd.functional.jvp)",
            double_backward_jvp,
        ),
        DerivativePath(
            "finite_difference",
            "central finite differences, step cbrt(eps) relative",
            FiniteDifference(precision, t_max),
        ),
        *step,
    )


#: The path names in the order ``"auto"`` tries them.
PATHS: tuple[PathName, ...] = tuple(p.name for p in derivative_paths())


def _reason(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()


class JVPError(RuntimeError, ValueError):
    """The requested derivative path (or every path) fails on this model: a one-line
    message naming the paths to try (a ``ValueError`` too: the command line reports it as
    a usage error, not a traceback)."""


class JVP:
    """Jacobian-vector products of ``fn(x, t)`` by a named path, or the first that works.

    Args:
        fn: The function (e.g. :meth:`diffsolve.ModelWrapper.differentiable_eps`); may be
            reassigned between calls (per-batch conditioning), the chosen path stays.
        mode: ``"auto"`` or one of :data:`PATHS`.
        precision: The network's dtype for the finite-difference step (see
            :class:`FiniteDifference`).
        t_max: The largest time ``fn`` accepts (finite differences in ``t`` stay below it).
        t_step: ``t -> h``, one training step in solver time: enables the
            ``"step_difference"`` path (never taken by ``"auto"``).
        on_select: Called once with the path ``"auto"`` chose and what the earlier paths
            raised (``{name: reason}``); without it the choice goes to the
            ``diffsolve.ems`` logger (INFO).

    Attributes:
        path: The path in use (``None`` until an ``"auto"`` probe has run).
        failures: What each path tried before it raised.
    """

    def __init__(
        self,
        fn: Function,
        mode: JVPMode = "auto",
        *,
        precision: torch.dtype | Callable[[Tensor], torch.dtype] | None = None,
        t_max: float = math.inf,
        t_step: Callable[[float], float] | None = None,
        on_select: Callable[[str, dict[str, str]], None] | None = None,
    ) -> None:
        paths = {p.name: p for p in derivative_paths(precision, t_max, t_step)}
        if mode != "auto" and mode not in paths:
            raise ValueError(f"jvp must be 'auto' or one of {list(paths)}, got {mode!r}")
        self.paths = {k: v for k, v in paths.items() if k in PATHS or k == mode}
        self.fn, self.mode = fn, mode
        self.path: PathName | None = None if mode == "auto" else mode  # type: ignore[assignment]
        self.failures: dict[str, str] = {}
        self.on_select = on_select

    def __call__(self, x: Tensor, t: Tensor, tx: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        """``(fn(x, t), J_x tx + J_t tt)``."""
        if self.path is None:
            return self._probe(x, t, tx, tt)
        try:
            return self.paths[self.path].rule(self.fn, x, t, tx, tt)
        except (RuntimeError, NotImplementedError) as err:
            if self.mode == "auto" or _is_out_of_memory(err):
                raise
            others = [p for p in PATHS if p != self.path]
            raise JVPError(
                f"the {self.path} JVP failed for this model ({_reason(err)}); try jvp='auto' "
                f"or one of {others}"
            ) from err

    def _probe(self, x: Tensor, t: Tensor, tx: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        """Try every path in order; keep the first whose values are finite."""
        for name, path in self.paths.items():
            try:
                out, tangent = path.rule(self.fn, x, t, tx, tt)
            except Exception as err:  # any failure moves on to the next path
                if _is_out_of_memory(err):
                    raise
                self.failures[name] = _reason(err)
                continue
            if not (torch.isfinite(out).all() and torch.isfinite(tangent).all()):
                self.failures[name] = "non-finite values"
                continue
            self.path = name
            if self.on_select is not None:
                self.on_select(name, dict(self.failures))
            else:
                logger.info("EMS derivatives: %s", describe(name, self.failures))
            return out, tangent
        listed = "; ".join(f"{name}: {reason}" for name, reason in self.failures.items())
        raise JVPError(f"no derivative path works for this model ({listed})")


def describe(path: str, failures: dict[str, str] | None = None) -> str:
    """One line naming the path taken and why the earlier ones were passed over."""
    line = f"JVP by {path}"
    if failures:
        line += " (" + "; ".join(f"{k} failed: {v}" for k, v in failures.items()) + ")"
    return line


__all__ = [
    "JVP",
    "PATHS",
    "DerivativePath",
    "FiniteDifference",
    "JVPError",
    "JVPMode",
    "PathName",
    "derivative_paths",
    "describe",
    "double_backward_jvp",
    "forward_jvp",
    "forward_math_attention_jvp",
]
