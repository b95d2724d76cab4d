r"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver
with Empirical Model Statistics", arXiv 2310.13268).

With the empirical model statistics :math:`l, s, b` (:mod:`diffsolve.stats.ems`), the ODE is solved
for the reparameterised prediction :math:`f_\theta = (\sigma\epsilon_\theta - l x)/\alpha` and
the step :math:`s \to t` reads (paper eq. 14 and App. C.1.2, in local integrals)

.. math::

    x_t = \frac{\alpha_t}{\alpha_s} A\, x_s - \alpha_t A\Big[I\,g_s + C
          + \sum_{k=1}^{n} E^{(k)} \hat g^{(k)}\Big],

with :math:`A = e^{-\int_s^t l}`, :math:`I = \int_s^t e^{\int_s^\lambda (l+s)}`,
:math:`C = \int_s^t e^{\int_s^\lambda (l+s)} B_s(\lambda)`,
:math:`E^{(k)} = \int_s^t e^{\int_s^\lambda (l+s)} (\lambda-\lambda_s)^k/k!`, and the
derivatives :math:`\hat g^{(k)}` of :math:`g_j = e^{-(S_j - S_s)} f_j - B_s(\lambda_j)` estimated
from ``n`` other points — by the full Vandermonde solve, or with ``pseudo`` by Newton divided
differences where the k-th derivative uses only the first k + 1 points (Thm. 3.4).

The global method (Alg. 2) is multistep: one model evaluation per step; after each evaluation
an optional corrector recomputes the point just reached, using the new evaluation as an extra
point (order ``p + 1`` with ``corrector_pseudo``) and keeping :math:`N_\theta` fixed, so it
costs no evaluation. Every update is linear in the stored :math:`f`'s with per-dimension
coefficients, which the plan precomputes in float64 from exact integrals of the interpolated
statistics (:class:`~diffsolve.stats.ems.EMSTable`): sampling times need not sit on the EMS grid.

**Half corrector.** The official README and paper say "use the corrector only for t ≤ 0.5";
the official code applies it only when t > 0.5. ``half_corrector`` offers both:
``"low_noise"`` (README, corrector where ``t ≤ 0.5 t_max``) and ``"high_noise"`` (code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from diffsolve.stats.ems.statistics import EMS
from diffsolve.stats.ems.table import EMSTable
from diffsolve.ode.model import Denoiser
from diffsolve.ode.schedule import NoiseSchedule
from diffsolve.solvers.engine import (
    GridValues,
    Plan,
    Solver,
    State,
    check_choice,
    check_order,
    multistep_orders,
)

HalfCorrector = Literal["off", "low_noise", "high_noise"]


@dataclass(frozen=True, eq=False)
class V3Update:
    """:math:`x_{new} = a \\odot x_{base} + \\sum_j w_j \\odot f_{h_j} + c` with ``h_j``
    indices into the history of :math:`f` (newest first)."""

    a: Tensor
    w: tuple[Tensor, ...]
    idx: tuple[int, ...]
    c: Tensor

    def to(self, device: torch.device, dtype: torch.dtype) -> V3Update:
        """Coefficients on the state's device and dtype."""
        return V3Update(
            self.a.to(device, dtype),
            tuple(w.to(device, dtype) for w in self.w),
            self.idx,
            self.c.to(device, dtype),
        )

    def apply(self, x: Tensor, history: tuple[Tensor, ...]) -> Tensor:
        """Evaluate the update (coefficients broadcast over the batch)."""
        out = torch.addcmul(self.c, self.a, x)
        for w, i in zip(self.w, self.idx, strict=True):
            out = out.addcmul_(w, history[i])
        return out


@dataclass(frozen=True, eq=False)
class V3Step:
    """One grid interval: evaluate at ``t``, form :math:`f = -\\hat x_0 + f_x \\odot x`
    (:math:`f_x = (1 - l)/\\alpha`), optionally correct, then predict ``t_next``."""

    t: float
    t_next: float
    f_x: Tensor
    predictor: V3Update
    corrector: V3Update | None

    def to(self, device: torch.device, dtype: torch.dtype) -> V3Step:
        """Coefficients on the state's device and dtype."""
        corrector = None if self.corrector is None else self.corrector.to(device, dtype)
        return V3Step(
            self.t,
            self.t_next,
            self.f_x.to(device, dtype),
            self.predictor.to(device, dtype),
            corrector,
        )


@dataclass(frozen=True)
class V3State(State):
    """History of :math:`f` (newest first) and the previous sample (the corrector's base)."""

    history: tuple[Tensor, ...] = ()
    x_prev: Tensor | None = None
    steps: tuple[V3Step, ...] = ()


@dataclass(frozen=True, eq=False)
class V3Plan(Plan):
    """The float64 coefficient plan of DPM-Solver-v3 on one grid."""

    schedule: NoiseSchedule
    grid: Tensor
    steps: tuple[V3Step, ...]
    memory: int
    _cache: dict[tuple[torch.device, torch.dtype], tuple[V3Step, ...]] = field(
        default_factory=dict, repr=False
    )

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        return len(self.steps)

    def init(self, x: Tensor) -> V3State:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(s.to(x.device, x.dtype) for s in self.steps)
        return V3State(x=x, t=self.steps[0].t, steps=self._cache[key])

    def step(self, model: Denoiser, state: State) -> V3State:
        assert isinstance(state, V3State)
        c = state.steps[state.step]
        prediction = model(state.x, c.t)
        f = torch.addcmul(-prediction.x0, c.f_x, state.x)
        history = (f, *state.history[: self.memory - 1])
        x = state.x
        if c.corrector is not None and state.x_prev is not None:
            x = c.corrector.apply(state.x_prev, history)
        x_next = c.predictor.apply(x, history)
        return V3State(
            x=x_next,
            t=c.t_next,
            step=state.step + 1,
            denoised=prediction.x0,
            done=state.step + 1 == len(state.steps),
            history=history,
            x_prev=x,
            steps=state.steps,
        )


def derivative_weights(deltas: list[float], pseudo: bool) -> list[list[float]]:
    """Weights ``M[k-1][j]`` with :math:`\\hat g^{(k)} = \\sum_j M_{kj} g_j` for points at
    ``deltas`` (``deltas[0] = 0`` is the base), ``k = 1..n``: the Vandermonde solve, or Newton
    divided differences (``pseudo``; the k-th derivative from the first k + 1 points)."""
    n = len(deltas) - 1
    if n == 0:
        return []
    if pseudo:
        rows = []
        for k in range(1, n + 1):
            row = [0.0] * (n + 1)
            for j in range(k + 1):
                prod = math.prod(deltas[j] - deltas[m] for m in range(k + 1) if m != j)
                row[j] = math.factorial(k) / prod
            rows.append(row)
        return rows
    vander = torch.tensor(
        [[d**k for k in range(1, n + 1)] for d in deltas[1:]], dtype=torch.float64
    )
    inverse = torch.linalg.inv(vander)  # rows k: g^(k)/k! from (g_j - g_0)
    rows = []
    for k in range(1, n + 1):
        tail = [math.factorial(k) * float(inverse[k - 1, j]) for j in range(n)]
        rows.append([-sum(tail), *tail])
    return rows


@dataclass(frozen=True, eq=False)
class DPMSolverV3(Solver):
    """DPM-Solver-v3 multistep predictor(–corrector).

    Args:
        ems: The model's statistics (:func:`diffsolve.stats.ems.load_ems`; ``EMS.degenerate`` gives
            DPM-Solver++).
        order: Predictor order 1, 2 or 3.
        predictor_pseudo: Pseudo-order predictor (official ``p_pseudo``; helps at 5 NFE).
        corrector: Apply the corrector after every evaluation.
        corrector_pseudo: Corrector of order ``p + 1`` with pseudo-order derivatives
            (official ``c_pseudo``, recommended); otherwise order ``p``.
        half_corrector: ``"off"``, ``"low_noise"`` (README: only where ``t <= t_max/2``) or
            ``"high_noise"`` (official code: only where ``t > t_max/2``).
        lower_order_final: ``min(order, steps_left)`` on the last steps (v3's rule).
    """

    ems: EMS
    order: int = 3
    predictor_pseudo: bool = False
    corrector: bool = True
    corrector_pseudo: bool = True
    half_corrector: HalfCorrector = "off"
    lower_order_final: bool = True

    name: ClassVar[str] = "dpm-solver-v3"

    def __post_init__(self) -> None:
        check_order(self.order, (1, 2, 3), "DPMSolverV3")
        check_choice(self.half_corrector, ("off", "low_noise", "high_noise"), "half_corrector")
        if not isinstance(self.ems, EMS):
            raise ValueError(
                f"ems must be an EMS (see diffsolve.stats.ems.load_ems), got {type(self.ems).__name__}"
            )

    def min_steps(self) -> int:
        return self.order

    def build_plan(self, schedule: NoiseSchedule, grid: Tensor) -> V3Plan:
        v = GridValues.of(schedule, grid)
        n = len(v.t) - 1
        finite = [lam for lam in v.lam if math.isfinite(lam)]
        self.ems.check_compatible(schedule)
        self.ems.check_range(finite)
        table = EMSTable(self.ems, finite)
        orders = multistep_orders(n, self.order, self.lower_order_final, v.ends_at_zero)
        steps, previous = [], 0
        for i, p in enumerate(orders):
            l_i = table.values(v.lam[i])[0]
            f_x = (1.0 - l_i) / v.alpha[i]
            if v.sigma[i + 1] == 0.0:  # step to clean data: x0 = -f + f_x x
                predictor = V3Update(f_x, (-torch.ones_like(f_x),), (0,), torch.zeros_like(f_x))
            else:
                extras = [(i - j, j) for j in range(1, p)]  # (grid point, history index)
                predictor = self._update(table, v, i, i + 1, (i, 0), extras, self.predictor_pseudo)
            steps.append(
                V3Step(v.t[i], v.t[i + 1], f_x, predictor, self._corrector(table, v, i, previous))
            )
            previous = p if v.sigma[i + 1] > 0 else 0
        return V3Plan(schedule, grid, tuple(steps), memory=self.order + 2)

    def _corrector(self, table: EMSTable, v: GridValues, i: int, p_prev: int) -> V3Update | None:
        """Corrector of the step ``i-1 → i``, applied after evaluating at point ``i``."""
        c_order = p_prev + int(self.corrector_pseudo)
        if not self.corrector or i == 0 or c_order <= 1:
            return None
        t_frac = v.t[i] / v.schedule.t_max
        if (self.half_corrector == "low_noise" and t_frac > 0.5) or (
            self.half_corrector == "high_noise" and t_frac <= 0.5
        ):
            return None
        # base: point i-1 (history index 1); extras: the new point i, then i-2, i-3, ...
        extras = [(i, 0)] + [(i - 1 - j, j + 1) for j in range(1, c_order - 1)]
        return self._update(table, v, i - 1, i, (i - 1, 1), extras, self.corrector_pseudo)

    @staticmethod
    def _update(
        table: EMSTable,
        v: GridValues,
        s: int,
        t: int,
        base: tuple[int, int],
        extras: list[tuple[int, int]],
        pseudo: bool,
    ) -> V3Update:
        lam_s = v.lam[s]
        _, _, big_s, big_b = table.values(lam_s)
        integrals = table.step(lam_s, v.lam[t], max(len(extras), 1))
        weights = derivative_weights([0.0] + [v.lam[p] - lam_s for p, _ in extras], pseudo)
        q = (
            [
                sum(integrals.moments[k] * row[j] for k, row in enumerate(weights))
                for j in range(len(extras) + 1)
            ]
            if extras
            else [torch.zeros_like(integrals.i0)]
        )
        scale = -v.alpha[t] * integrals.decay
        w_base = scale * (integrals.i0 + q[0])
        w, idx, const = [], [], integrals.c0.clone()
        for (point, hist), q_j in zip(extras, q[1:], strict=True):
            _, _, big_s_j, big_b_j = table.values(v.lam[point])
            w.append(scale * q_j * torch.exp(big_s - big_s_j))
            idx.append(hist)
            const = const - q_j * torch.exp(big_s) * (big_b_j - big_b)
        a = v.alpha[t] / v.alpha[s] * integrals.decay
        return V3Update(a, (w_base, *w), (base[1], *idx), scale * const)
