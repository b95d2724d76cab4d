r"""Exact integrals of DPM-Solver-v3's coefficients between any two λ, from the EMS arrays.

The reformulated ODE is exact for *any* statistics, provided the linear part is consistent:
the :math:`l` inside :math:`f = (\sigma\epsilon - l x)/\alpha` must be the derivative of the
:math:`L = \int l` in the exponential factors, at every λ. :math:`S` and :math:`B` only need to
be the same functions in :math:`g` and in the integrals. So, from the samples on the EMS grid:

* :math:`l`, :math:`s` and :math:`q = e^{-S} b` are interpolated piecewise-linearly and
  :math:`L, S, B` are their exact integrals (piecewise quadratic, continuously differentiable;
  at the grid points they are the official code's trapezoid sums). A merely continuous
  :math:`S` or :math:`B` would put kinks into :math:`g` that no polynomial extrapolation
  removes: an error floor independent of the step size.

Sampling times need not sit on the EMS grid (the official code snaps them to the nearest grid
point). On each sub-interval :math:`u = u_0 + \Delta\theta` the exponent is
:math:`E = E_0 + z\theta + c\theta^2` with small :math:`c = \Delta^2 (l' + s')/2`, and

.. math::

    \int_{u_0}^{u_1} e^{E}\theta^m du = \Delta e^{E_0}\sum_{r\ge0} \frac{c^r}{r!} J_{m+2r}(z),
    \qquad J_n(z) = \int_0^1 e^{z\theta}\theta^n d\theta = e^{z}\, n!\,\varphi_{n+1}(-z),

summed in float64 until the terms are below rounding (sub-intervals are refined so that
:math:`|z| \le 1/2`, :math:`|c| \le 1/20`). Degenerate statistics (l = 1, s = b = 0) make
every integral exact and v3 equal to DPM-Solver++ to rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsolve.numerics.phi import phi_tensor
from diffsolve.stats.ems.statistics import EMS

_F64 = torch.float64
_MAX_Z = 0.5
_MAX_C = 0.05
_C_TERMS = 9  # 0.05^9 / 9! ~ 5e-18


def _cumulative_trapezoid(values: Tensor, lambdas: Tensor) -> Tensor:
    widths = (lambdas[1:] - lambdas[:-1]).reshape(-1, *([1] * (values.ndim - 1)))
    increments = 0.5 * (values[1:] + values[:-1]) * widths
    return torch.cat([torch.zeros_like(values[:1]), torch.cumsum(increments, 0)])


def _flat(x: Tensor, like: Tensor) -> Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class StepIntegrals:
    """Per-dimension coefficients of one step :math:`s \\to t` (shapes: one sample).

    Attributes:
        decay: :math:`A = e^{-(L_t - L_s)}`.
        i0: :math:`\\int_s^t e^{E - E_s}`.
        c0: :math:`\\int_s^t e^{E - E_s} B_s(\\lambda)`, :math:`B_s(\\lambda) =
            e^{S_s}(B(\\lambda) - B_s)`.
        moments: :math:`E^{(k)} = \\int_s^t e^{E - E_s}(\\lambda - \\lambda_s)^k/k!`,
            ``k = 1, 2, …``.
    """

    decay: Tensor
    i0: Tensor
    c0: Tensor
    moments: tuple[Tensor, ...]


class EMSTable:
    """The EMS refined with the λ's of a sampling grid, ready for exact step integrals."""

    def __init__(self, ems: EMS, query: Sequence[float]) -> None:
        lam_e = ems.lambdas
        self._lam_e, self._l_e, self._s_e = lam_e, ems.l, ems.s
        self._big_l_e = _cumulative_trapezoid(ems.l, lam_e)  # exact for piecewise-linear l
        self._big_s_e = _cumulative_trapezoid(ems.s, lam_e)
        self._q_e = torch.exp(-self._big_s_e) * ems.b
        self._big_b_e = _cumulative_trapezoid(self._q_e, lam_e)
        q = torch.tensor(sorted({float(v) for v in query}), dtype=_F64)
        nodes = torch.unique(torch.cat([lam_e, q, self._refinement()]))
        lo, hi = ems.lambda_range
        self.nodes = nodes[(nodes >= min(lo, float(q.min()))) & (nodes <= max(hi, float(q.max())))]
        (self.l, self.L), (self.s, self.S), (self.q, self.B) = self._evaluate(self.nodes)
        # slopes of l + s and of q on the EMS interval holding each sub-interval
        i = self._interval(0.5 * (self.nodes[1:] + self.nodes[:-1]))
        width = _flat(lam_e[i + 1] - lam_e[i], self._l_e)
        self._d_ls = ((self._l_e + self._s_e)[i + 1] - (self._l_e + self._s_e)[i]) / width
        self._d_q = (self._q_e[i + 1] - self._q_e[i]) / width

    def _interval(self, u: Tensor) -> Tensor:
        return (torch.searchsorted(self._lam_e, u.contiguous(), right=True) - 1).clamp(
            0, self._lam_e.numel() - 2
        )

    def _evaluate(self, u: Tensor) -> tuple[tuple[Tensor, Tensor], ...]:
        """``(l, L), (s, S), (q, B)`` at ``u``: each rate linear, its integral exact."""
        i = self._interval(u)
        d = _flat(u - self._lam_e[i], self._l_e)
        w = d / _flat(self._lam_e[i + 1] - self._lam_e[i], self._l_e)
        out = []
        for rate, total in (
            (self._l_e, self._big_l_e),
            (self._s_e, self._big_s_e),
            (self._q_e, self._big_b_e),
        ):
            r0, r1 = rate[i], rate[i + 1]
            out.append((r0 + w * (r1 - r0), total[i] + d * r0 + 0.5 * d * w * (r1 - r0)))
        return tuple(out)

    def _refinement(self) -> Tensor:
        """Extra nodes so that every sub-interval has |z| <= 1/2 and |c| <= 1/20."""
        width = self._lam_e[1:] - self._lam_e[:-1]
        rate = (self._l_e + self._s_e).abs()
        dims = tuple(range(1, rate.ndim))
        peak = torch.maximum(rate[1:], rate[:-1])
        jump = (rate[1:] - rate[:-1]).abs()
        if dims:
            peak, jump = peak.amax(dims), jump.amax(dims)
        z, c = width * peak, 0.5 * width * jump
        pieces = torch.maximum(torch.ceil(z / _MAX_Z), torch.ceil(torch.sqrt(c / _MAX_C)))
        extra = []
        for i in torch.nonzero(pieces > 1).flatten().tolist():
            n = int(pieces[i])
            extra.append(self._lam_e[i] + width[i] * torch.arange(1, n, dtype=_F64) / n)
        return torch.cat(extra) if extra else torch.zeros(0, dtype=_F64)

    def index(self, lam: float) -> int:
        """Node index of ``lam`` (which must be a node: an EMS or query λ)."""
        i = int(torch.searchsorted(self.nodes, torch.tensor(lam, dtype=_F64)))
        for j in (i, i - 1):
            if 0 <= j < self.nodes.numel() and abs(float(self.nodes[j]) - lam) <= 1e-12 * max(
                1.0, abs(lam)
            ):
                return j
        raise KeyError(f"λ = {lam} is not a node of this table")

    def values(self, lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(l, L, S, B)`` at a node."""
        i = self.index(lam)
        return self.l[i], self.L[i], self.S[i], self.B[i]

    def step(self, lam_s: float, lam_t: float, max_moment: int) -> StepIntegrals:
        """Exact integrals of one step (either direction)."""
        a, b = self.index(lam_s), self.index(lam_t)
        forward = b >= a
        lo, hi = (a, b) if forward else (b, a)
        u = self.nodes[lo : hi + 1]
        delta = _flat(u[1:] - u[:-1], self.L)
        # exponent E = (L - L_s) + (S - S_s) on each sub-interval, theta = (u - u_j) / delta:
        # E = E_j + z theta + c theta^2
        e_left = (self.L[lo:hi] - self.L[a]) + (self.S[lo:hi] - self.S[a])
        z = delta * (self.l[lo:hi] + self.s[lo:hi])
        c = 0.5 * delta * delta * self._d_ls[lo:hi]
        scale = delta * torch.exp(e_left + z)  # Δ e^{E_j + z}
        n_max = max_moment + 2 + 2 * (_C_TERMS - 1)
        j = [float(math.factorial(n)) * phi_tensor(n + 1, -z) for n in range(n_max + 1)]

        def integral(power: int) -> Tensor:  # ∫_0^1 e^{z θ + c θ²} θ^power dθ / e^{z}
            total, c_pow = torch.zeros_like(z), torch.ones_like(c)
            for r in range(_C_TERMS):
                total = total + c_pow / math.factorial(r) * j[power + 2 * r]
                c_pow = c_pow * c
            return total

        ints = [integral(m) for m in range(max(max_moment, 2) + 1)]
        sign = 1.0 if forward else -1.0
        i0 = sign * (scale * ints[0]).sum(0)
        # B_s(u) = e^{S_s} (B(u) - B_s), quadratic in theta on each sub-interval
        e_s = torch.exp(self.S[a])
        beta0 = e_s * (self.B[lo:hi] - self.B[a])
        beta1 = e_s * delta * self.q[lo:hi]
        beta2 = e_s * 0.5 * delta * delta * self._d_q[lo:hi]
        c0 = sign * (scale * (beta0 * ints[0] + beta1 * ints[1] + beta2 * ints[2])).sum(0)
        offset = _flat(u[:-1] - float(self.nodes[a]), self.L)
        moments = []
        for k in range(1, max_moment + 1):
            total = torch.zeros_like(i0)
            for m in range(k + 1):
                weight = math.comb(k, m) * offset ** (k - m) * delta**m / math.factorial(k)
                total = total + (scale * weight * ints[m]).sum(0)
            moments.append(sign * total)
        decay = torch.exp(-(self.L[b] - self.L[a]))
        return StepIntegrals(decay, i0, c0, tuple(moments))
