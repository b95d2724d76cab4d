r"""The shared exponential-integrator kernel.

Every solver in diffsolve integrates the diffusion ODE in :math:`\lambda = \log(\alpha/\sigma)`
with the linear part solved exactly. For a step :math:`s \to t`, :math:`h = \lambda_t-\lambda_s`,
the two classic forms are (Lu et al. 2022, DPM-Solver, eq. 3.4; Lu et al. 2022, DPM-Solver++,
eq. 9)

.. math::

    \text{data:}\quad x_t = \frac{\sigma_t}{\sigma_s} x_s
        + \alpha_t \int_0^h e^{-(h-u)}\, \hat x_0(\lambda_s+u)\, du, \\
    \text{noise:}\quad x_t = \frac{\alpha_t}{\alpha_s} x_s
        - \sigma_t \int_0^h e^{\,h-u}\, \hat\epsilon(\lambda_s+u)\, du.

Expanding the prediction :math:`D(\lambda_s + \tau h) = \sum_n d_n \tau^n / n!` in the normalised
step variable :math:`\tau`, with :math:`d_n = h^n \partial_\lambda^n D(\lambda_s)`, gives

.. math::

    x_t = a\, x_s + c \sum_n h\,\varphi_{n+1}(z)\, d_n,

with :math:`(a, c, z) = (\sigma_t/\sigma_s, \alpha_t, -h)` in data space and
:math:`(\alpha_t/\alpha_s, -\sigma_t, h)` in noise space. :class:`ExpStep` holds
:math:`a, c, h, z`; a solver only decides how to estimate the :math:`d_n` from the predictions
it has (its history points) — :func:`taylor_weights` does it by polynomial interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from diffsolve.numerics.phi import phi

Space = Literal["data", "noise"]


@dataclass(frozen=True)
class ExpStep:
    """Coefficients of one exponential-integrator step ``s → t`` (all float64).

    Attributes:
        a: Multiplier of :math:`x_s`: :math:`\\sigma_t/\\sigma_s` (data) or
            :math:`\\alpha_t/\\alpha_s` (noise).
        c: :math:`\\alpha_t` (data) or :math:`-\\sigma_t` (noise).
        h: Step length in λ (positive when denoising, negative when inverting).
        z: Argument of the φ-functions: ``-h`` (data) or ``h`` (noise).
        space: Which prediction the step integrates.
    """

    a: float
    c: float
    h: float
    z: float
    space: Space

    @classmethod
    def between(
        cls,
        space: Space,
        alpha_s: float,
        sigma_s: float,
        alpha_t: float,
        sigma_t: float,
    ) -> ExpStep:
        """Build the step from the schedule's values at both ends.

        ``sigma_t == 0`` (a step to clean data, λ = +∞) is allowed in data space, where
        the step returns :math:`\\hat x_0` exactly: ``a = 0, c·hφ₁ = α_t``. So is
        ``alpha_s == 0`` (a start from pure noise, λ = −∞, as flow matching's σ = 1): the
        first-order weight :math:`\\alpha_t(1 - e^{-h}) \\to \\alpha_t` is its exact limit,
        :math:`x_t = \\frac{\\sigma_t}{\\sigma_s} x_s + \\alpha_t \\hat x_0`, and every
        higher-order weight diverges, so only first order is defined there.
        """
        if space not in ("data", "noise"):
            raise ValueError(f"space must be 'data' or 'noise', got {space!r}")
        if sigma_t == 0.0 or alpha_s == 0.0:
            if space == "noise":
                raise ValueError(
                    "a noise-space step cannot end at sigma = 0 or start at alpha = 0; "
                    "use data space"
                )
            return cls(a=sigma_t / sigma_s, c=alpha_t, h=math.inf, z=-math.inf, space=space)
        lam_s = math.log(alpha_s) - math.log(sigma_s)
        h = math.log(alpha_t) - math.log(sigma_t) - lam_s
        if space == "data":
            return cls(a=sigma_t / sigma_s, c=alpha_t, h=h, z=-h, space=space)
        return cls(a=alpha_t / alpha_s, c=-sigma_t, h=h, z=h, space=space)

    def coef(self, n: int) -> float:
        """Weight :math:`c\\,h\\,\\varphi_{n+1}(z)` of the normalised derivative :math:`d_n`."""
        if math.isinf(self.h):
            # Step to sigma = 0 or from alpha = 0: only the zeroth-order term is defined,
            # with weight alpha_t (higher orders are refused by the plan builders).
            return self.c if n == 0 else 0.0
        return self.c * self.h * phi(n + 1, self.z)


def solve_vandermonde(nodes: Sequence[float], rhs: Sequence[float]) -> tuple[float, ...]:
    """Solve :math:`\\sum_j w_j\\, \\tau_j^{\\,n} = r_n` for ``n = 0..len(nodes)-1`` (float64).

    This is the transposed Vandermonde system that turns "weights on derivatives" into
    "weights on samples": if :math:`D(\\tau) = \\sum_n c_n \\tau^n` interpolates the samples
    :math:`D_j` at nodes :math:`\\tau_j`, then :math:`\\sum_n r_n c_n = \\sum_j w_j D_j`.
    """
    nodes_arr = np.asarray(nodes, dtype=np.float64)
    if len(nodes_arr) != len(rhs):
        raise ValueError("solve_vandermonde: nodes and rhs must have the same length")
    if len(set(nodes_arr.tolist())) != len(nodes_arr):
        raise ValueError(f"solve_vandermonde: nodes must be distinct, got {nodes_arr.tolist()}")
    powers = np.arange(len(nodes_arr))
    matrix = nodes_arr[None, :] ** powers[:, None]  # row n: tau_j^n
    return tuple(float(w) for w in np.linalg.solve(matrix, np.asarray(rhs, dtype=np.float64)))


def taylor_weights(step: ExpStep, nodes: Sequence[float]) -> tuple[float, ...]:
    """Weights on predictions at ``nodes`` for the full-order exponential integrator.

    ``nodes`` are the normalised positions :math:`\\tau_j = (\\lambda_j - \\lambda_s)/h` of
    the available predictions (``nodes[0]`` must be 0, the step's start). The prediction is
    replaced by its interpolating polynomial through all nodes and the integral is taken
    exactly, so with ``p`` nodes the step has local error :math:`O(h^{p+1})`. Returns
    ``w`` with :math:`x_t = a x_s + \\sum_j w_j D_j`.
    """
    if not nodes or nodes[0] != 0.0:
        raise ValueError("taylor_weights: the first node must be 0 (the step's start)")
    # sum_n coef(n) d_n with d_n = n! c_n  =>  r_n = n! coef(n)
    rhs = [math.factorial(n) * step.coef(n) for n in range(len(nodes))]
    if len(nodes) == 1:
        return (rhs[0],)
    return solve_vandermonde(nodes, rhs)
