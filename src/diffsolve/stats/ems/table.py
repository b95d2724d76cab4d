r"""DPM-Solver-v3's per-dimension step integrals on a sampling grid, from the EMS arrays.

The reformulated ODE is exact for *any* statistics, provided the linear part is consistent:
the :math:`l` inside :math:`f = (\sigma\epsilon - l x)/\alpha` must be the derivative of the
:math:`L = \int l` in the exponential factors, at every λ. :math:`S` and :math:`B` only need to
be the same functions in :math:`g` and in the integrals. So, from the samples on the EMS grid:

* :math:`l`, :math:`s` and :math:`q = e^{-S} b` are interpolated piecewise-linearly and
  :math:`L, S, B` are their exact integrals (piecewise quadratic, continuously differentiable;
  at the grid points they are the official code's trapezoid sums). A merely continuous
  :math:`S` or :math:`B` would put kinks into :math:`g` that no polynomial extrapolation
  removes: an error floor independent of the step size.

A step :math:`s \to t` of a sampling grid needs, per dimension, with :math:`E = L + S`,

.. math::

    A = e^{-(L_t - L_s)},\quad
    I = \int_s^t e^{E - E_s},\quad
    C = \int_s^t e^{E - E_s} e^{S_s}(B - B_s),\quad
    M_k = \int_s^t e^{E - E_s}\frac{(\lambda - \lambda_s)^k}{k!}.

Sampling times need not sit on the EMS grid (the official code snaps them to the nearest grid
point). Each step is cut at the EMS nodes (and, where :math:`l + s` is steep, between them,
so that :math:`|z| = \Delta\,|l + s| \le 0.1` on every piece); on a piece the integrand is
:math:`e^{E_j + z\theta + c\theta^2}` times a polynomial of degree ≤ 3, which
:data:`GAUSS_POINTS`-point Gauss–Legendre quadrature integrates to ~1e-13 relative.

**Cost.** Everything per dimension is a linear combination of the EMS arrays with scalar (λ)
coefficients, an ``exp``, and weighted sums over the pieces of each step, which are small
matrix products. The work is done in float64 in chunks of dimensions, on the EMS's device, so
memory stays a few times one chunk (at 4×64×64 with N = 1200: 0.2 s on 2 CPU cores, against
~60 s for one series of φ-functions per piece and step). The piece layout depends on the EMS
only and is computed once per EMS.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffsolve.stats.ems.statistics import EMS

_F64 = torch.float64
#: Largest :math:`|z| = \Delta |l + s|` on one piece; pieces are refined to stay below it.
MAX_Z = 0.05
#: Gauss–Legendre points per piece (exact for degree 7).
GAUSS_POINTS = 3
#: Dimensions per chunk: the working set is about 12 arrays of (pieces × chunk) float64.
CHUNK_ELEMENTS = 1 << 18


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


@dataclass(frozen=True)
class PointValues:
    """Per-dimension statistics at one grid point: :math:`l`, and the integrals
    :math:`S = \\int s`, :math:`B = \\int e^{-S} b`."""

    l: Tensor
    S: Tensor
    B: Tensor


@dataclass(frozen=True)
class _Pieces:
    """How the steps of a grid are cut into pieces and quadrature points (scalars only).

    ``interval[p]``: the EMS interval holding piece ``p`` (whose ``G`` quadrature points sit at
    offsets ``offset[p, g]`` from the interval's left node); ``weight[p, g]``: the quadrature
    weight (piece width × Gauss weight, negative on steps that run backwards in λ);
    ``distance[p, g]``: λ minus the step's start; ``first[k]:first[k+1]``: the pieces of step k.
    """

    interval: Tensor
    offset: Tensor
    weight: Tensor
    distance: Tensor
    first: list[int]


class EMSTable:
    """The EMS turned into what DPM-Solver-v3's plan needs on one sampling grid.

    Args:
        ems: The statistics.
        lambdas: The grid's finite λ in sampling order (decreasing noise or, for inversion,
            increasing); every one must lie in the EMS range.
        max_moment: Highest :math:`k` of the moments :math:`M_k` the plan uses.
        offset: Grid index of ``lambdas[0]`` (1 when the grid starts from pure noise, whose
            λ = −∞ has no statistics).

    :meth:`point` gives the statistics at grid point ``i``, :meth:`step` the integrals of the
    step from point ``i`` to ``i + 1``; all are computed once, in float64, on the EMS's device.
    """

    def __init__(
        self, ems: EMS, lambdas: Sequence[float], max_moment: int, offset: int = 0
    ) -> None:
        self.lambdas = [float(v) for v in lambdas]
        self.offset = offset
        self.max_moment = max(int(max_moment), 1)
        lam_e = ems.lambdas.to(ems.one_minus_l.device)
        pieces = _cut(lam_e.cpu(), self.lambdas, _refinement(ems))
        points, steps = _evaluate(ems, lam_e, self.lambdas, pieces, self.max_moment)
        self._points, self._steps = points, steps

    def point(self, i: int) -> PointValues:
        """:math:`l, S, B` at grid point ``i``."""
        l, big_s, big_b, _ = self._points
        i -= self.offset
        return PointValues(l[i], big_s[i], big_b[i])

    def step(self, i: int) -> StepIntegrals:
        """The integrals of the step from grid point ``i`` to ``i + 1``."""
        decay, i0, c0, moments = self._steps
        i -= self.offset
        higher = tuple(moments[i, k] for k in range(1, self.max_moment + 1))
        return StepIntegrals(decay[i], i0[i], c0[i], higher)


# ---------------------------------------------------------------------------------------
# Where the pieces go (λ only, shared by every dimension)
#: Most pieces one EMS interval is cut into (statistics that need more are broken).
MAX_PIECES = 100_000


def _refinement(ems: EMS) -> Tensor:
    """Pieces per EMS interval so that :math:`|z| \\le` :data:`MAX_Z` everywhere (the largest
    :math:`|l + s|` over the dimensions at either end of the interval); cached on the EMS."""
    cached = ems.cache.get("refinement")
    if cached is not None:
        return cached
    # |l + s| = |1 - (1 - l) + s|, in the stored precision (only a bound is needed)
    rate = torch.cat(
        [
            (m - s).sub_(1.0).abs_().flatten(1).amax(1).double().cpu()
            for m, s in zip(ems.one_minus_l.split(64), ems.s.split(64), strict=True)
        ]
    )
    width = ems.lambdas[1:] - ems.lambdas[:-1]
    peak = torch.maximum(rate[1:], rate[:-1])
    pieces = torch.clamp(torch.ceil(width * peak / MAX_Z), min=1).long()
    if int(pieces.max()) > MAX_PIECES:
        k = int(pieces.argmax())
        raise ValueError(
            f"EMS statistics out of range: |l + s| reaches {float(peak[k]):.3g} at λ = "
            f"{float(ems.lambdas[k]):.3g} (a well-estimated EMS stays within a few hundred); "
            f"they were estimated from too few samples (K = {ems.metadata.get('samples', '?')}) "
            "or a broken derivative — re-estimate them with the recipe (diffsolve ems: K = 24, "
            "N = 1200)"
        )
    ems.cache["refinement"] = pieces
    return pieces


def _cut(lam_e: Tensor, lambdas: list[float], refine: Tensor) -> _Pieces:
    """Cut every step ``lambdas[k] → lambdas[k+1]`` at the EMS nodes, split each cut into
    the EMS interval's ``refine`` equal pieces, and place the Gauss points."""
    nodes = lam_e.numpy()
    x, w = np.polynomial.legendre.leggauss(GAUSS_POINTS)
    theta, gauss = 0.5 * (x + 1.0), 0.5 * w
    parts: list[tuple[np.ndarray, ...]] = []
    first = [0]
    for start, end in itertools.pairwise(lambdas):
        lo, hi = min(start, end), max(start, end)
        cuts = np.concatenate([[lo], nodes[(nodes > lo) & (nodes < hi)], [hi]])
        mids = 0.5 * (cuts[:-1] + cuts[1:])
        interval = np.clip(np.searchsorted(nodes, mids) - 1, 0, len(nodes) - 2)
        count = refine.numpy()[interval]
        width = np.repeat((cuts[1:] - cuts[:-1]) / count, count)
        rank = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        left = np.repeat(cuts[:-1], count) + width * rank
        u = left[:, None] + width[:, None] * theta  # (pieces, G)
        interval = np.repeat(interval, count)
        sign = 1.0 if end >= start else -1.0
        parts.append(
            (interval, u - nodes[interval, None], sign * width[:, None] * gauss, u - start)
        )
        first.append(first[-1] + len(interval))
    if not parts:
        empty = torch.zeros(0, GAUSS_POINTS, dtype=_F64)
        return _Pieces(torch.zeros(0, dtype=torch.long), empty, empty, empty, first)
    interval, offset, weight, distance = (np.concatenate(p) for p in zip(*parts, strict=True))
    as64 = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))  # noqa: E731
    return _Pieces(
        torch.from_numpy(interval).long(), as64(offset), as64(weight), as64(distance), first
    )


# ---------------------------------------------------------------------------------------
# The per-dimension work, chunk by chunk
def _cumulative(rate: Tensor, lam: Tensor) -> Tensor:
    """Exact integral of the piecewise-linear ``rate`` from the first node (trapezoids)."""
    widths = (0.5 * (lam[1:] - lam[:-1])).reshape(-1, *([1] * (rate.ndim - 1)))
    out = torch.empty_like(rate)
    out[0] = 0.0
    torch.cumsum((rate[1:] + rate[:-1]).mul_(widths), 0, out=out[1:])
    return out


class _Interpolant:
    """A piecewise-linear rate and its exact integral, evaluated at λ given as (EMS interval,
    offset in it): :math:`\\int^{\\lambda} r = R_i + a\\,r_i + b\\,r_{i+1}` with
    :math:`a = d - d^2/2w`, :math:`b = d^2/2w`. Offsets are ``(points,)`` or ``(points, G)``;
    values come out as ``(G, points, dims)``."""

    def __init__(self, lam_e: Tensor, interval: Tensor, offset: Tensor) -> None:
        width = lam_e[interval + 1] - lam_e[interval]
        offset = (offset if offset.ndim == 2 else offset[:, None]).T  # (G, points)
        self.interval = interval
        self.b = (0.5 * offset * offset / width).unsqueeze(-1)  # (G, points, 1)
        self.a = offset.unsqueeze(-1) - self.b
        self.frac = (offset / width).unsqueeze(-1)

    def gather(self, rate: Tensor, total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:math:`(R_i, r_i, r_{i+1})` of every point, each ``(points, dims)``."""
        i = self.interval
        return total[i], rate[i], rate[i + 1]

    def integral(self, gathered: tuple[Tensor, Tensor, Tensor], g: int = 0) -> Tensor:
        """:math:`R(\\lambda)` at quadrature point ``g`` of every point, ``(points, dims)``."""
        base, r0, r1 = gathered
        return torch.addcmul(base, self.a[g], r0).addcmul_(self.b[g], r1)

    def rate(self, rate: Tensor) -> Tensor:
        """:math:`r(\\lambda)`."""
        r0, r1 = rate[self.interval], rate[self.interval + 1]
        return r0 + self.frac * (r1 - r0)


def _locate(lam_e: Tensor, lambdas: list[float]) -> tuple[Tensor, Tensor]:
    """(EMS interval, offset) of each grid λ."""
    lam = torch.tensor(lambdas, dtype=_F64, device=lam_e.device)
    i = (torch.searchsorted(lam_e, lam, right=True) - 1).clamp(0, lam_e.numel() - 2)
    return i, lam - lam_e[i]


def _evaluate(
    ems: EMS, lam_e: Tensor, lambdas: list[float], pieces: _Pieces, max_moment: int
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Point values ``(l, S, B, L)`` and step integrals ``(decay, i0, c0, moments)``, each
    ``(points or steps, *data_shape)`` (moments: ``(steps, K + 1, *data_shape)``)."""
    device, shape = lam_e.device, ems.data_shape
    dims = math.prod(shape)
    n_points, n_steps = len(lambdas), len(lambdas) - 1
    at_points = _Interpolant(lam_e, *_locate(lam_e, lambdas))
    at_pieces = _Interpolant(lam_e, pieces.interval.to(device), pieces.offset.to(device))
    powers = (
        torch.stack([pieces.distance**k / math.factorial(k) for k in range(max_moment + 1)])
        * pieces.weight
    )  # (K+1, pieces, G)
    powers = powers.permute(2, 0, 1).contiguous().to(device)  # (G, K+1, pieces)
    out_points = [torch.empty(n_points, dims, dtype=_F64, device=device) for _ in range(4)]
    out_steps = [torch.empty(n_steps, dims, dtype=_F64, device=device) for _ in range(3)]
    moments = torch.empty(n_steps, max_moment + 1, dims, dtype=_F64, device=device)
    rows = max(pieces.interval.numel(), lam_e.numel())
    chunk = max(1, CHUNK_ELEMENTS // rows)
    for c0 in range(0, dims, chunk):
        cols = slice(c0, min(dims, c0 + chunk))
        stats = _cumulatives(ems, lam_e, cols, device)
        points, steps, step_moments = _chunk(lam_e, stats, at_points, at_pieces, powers, pieces)
        for target, value in zip(out_points, points, strict=True):
            target[:, cols] = value
        for target, value in zip(out_steps, steps, strict=True):
            target[:, cols] = value
        moments[:, :, cols] = step_moments
    reshape = lambda t: t.reshape(t.shape[0], *shape)  # noqa: E731
    return (
        tuple(reshape(t) for t in out_points),
        (*(reshape(t) for t in out_steps), moments.reshape(n_steps, max_moment + 1, *shape)),
    )


#: Largest size of the cumulative statistics kept on an EMS between tables (a search builds
#: thousands of tables on one EMS; an SD-sized EMS is recomputed per table instead).
CUMULATIVE_CACHE_BYTES = 64 << 20


def _cumulatives(ems: EMS, lam_e: Tensor, cols: slice, device: torch.device) -> tuple[Tensor, ...]:
    """:math:`l, s, L, S, q = e^{-S} b, B` on the EMS nodes for the dimensions ``cols``:
    computed once per EMS where they are small, else per chunk."""
    key = ("cumulatives", str(device))
    full = ems.cache.get(key)
    if (
        full is None
        and ems.lambdas.numel() * math.prod(ems.data_shape) * 48 <= CUMULATIVE_CACHE_BYTES
    ):
        full = ems.cache[key] = _cumulatives_of(ems, lam_e, slice(None), device)
    if full is not None:
        return tuple(a[:, cols] for a in full)
    return _cumulatives_of(ems, lam_e, cols, device)


def _cumulatives_of(
    ems: EMS, lam_e: Tensor, cols: slice, device: torch.device
) -> tuple[Tensor, ...]:
    l, s, b = (a.flatten(1)[:, cols].to(device, _F64) for a in (ems.one_minus_l, ems.s, ems.b))
    l = 1.0 - l
    big_l, big_s = _cumulative(l, lam_e), _cumulative(s, lam_e)
    q = torch.exp(-big_s) * b
    return l, s, big_l, big_s, q, _cumulative(q, lam_e)


def _chunk(
    lam_e: Tensor,
    stats: list[Tensor],
    at_points: _Interpolant,
    at_pieces: _Interpolant,
    powers: Tensor,
    pieces: _Pieces,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """:func:`_evaluate` on one chunk of dimensions (``stats``: :func:`_cumulatives`)."""
    l, s, big_l, big_s, q, big_b = stats
    rho, big_e = l + s, big_l + big_s
    # at the grid points
    l_p = at_points.rate(l)[0]
    big_l_p = at_points.integral(at_points.gather(l, big_l))
    big_s_p = at_points.integral(at_points.gather(s, big_s))
    big_b_p = at_points.integral(at_points.gather(q, big_b))
    # at the quadrature points of every piece: sums of e^{E - E_start} and of e^{...} B
    starts = torch.repeat_interleave(
        torch.arange(len(pieces.first) - 1, device=lam_e.device),
        torch.tensor(np.diff(pieces.first), device=lam_e.device),
    )
    big_e_start = (big_l_p + big_s_p)[starts]
    n_steps, dims = len(pieces.first) - 1, l.shape[1]
    moments = torch.zeros(n_steps, powers.shape[1], dims, dtype=_F64, device=l.device)
    c_sum = torch.zeros(n_steps, dims, dtype=_F64, device=l.device)
    e_nodes, b_nodes = at_pieces.gather(rho, big_e), at_pieces.gather(q, big_b)
    e_nodes[0].sub_(big_e_start)  # E relative to the start of each piece's step
    for g in range(powers.shape[0]):
        e_rel = at_pieces.integral(e_nodes, g).exp_()
        weighted_b = at_pieces.integral(b_nodes, g).mul_(e_rel)
        for k in range(n_steps):
            rows = slice(pieces.first[k], pieces.first[k + 1])
            moments[k].addmm_(powers[g, :, rows], e_rel[rows])
            c_sum[k].addmv_(weighted_b[rows].T, powers[g, 0, rows])
    i0 = moments[:, 0]
    c0 = torch.exp(big_s_p[:-1]) * (c_sum - big_b_p[:-1] * i0)
    decay = torch.exp(-(big_l_p[1:] - big_l_p[:-1]))
    return [l_p, big_s_p, big_b_p, big_l_p], [decay, i0, c0], moments
