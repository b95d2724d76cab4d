import math

import pytest

from diffsolve.numerics import ExpStep, phi, solve_vandermonde, taylor_weights


def phi_closed(k: int, z: float) -> float:
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1 / math.factorial(j)) / z
    return value


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("z", [-3.0, -1.2, -1.0, -0.999, 0.999, 1.0, 2.5])
def test_phi_series_and_closed_form_agree(k, z):
    assert phi(k, z) == pytest.approx(phi_closed(k, z), rel=1e-13)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_phi_near_zero_is_series_limit(k):
    assert phi(k, 0.0) == pytest.approx(1 / math.factorial(k), rel=1e-15)
    # the naive recurrence loses ~k digits per decade; the series does not
    z = 1e-6
    expected = 1 / math.factorial(k) + z / math.factorial(k + 1)
    assert phi(k, z) == pytest.approx(expected, rel=1e-12)


def test_phi_limits_and_errors():
    assert phi(0, 0.3) == pytest.approx(math.exp(0.3))
    assert phi(2, -math.inf) == 0.0
    with pytest.raises(ValueError, match="k must be >= 0"):
        phi(-1, 0.1)


def test_expstep_data_and_noise_first_order_are_ddim():
    a_s, s_s, a_t, s_t = 0.6, 0.8, 0.8, 0.6
    data = ExpStep.between("data", a_s, s_s, a_t, s_t)
    noise = ExpStep.between("noise", a_s, s_s, a_t, s_t)
    h = math.log(a_t / s_t) - math.log(a_s / s_s)
    assert data.a == pytest.approx(s_t / s_s)
    assert data.coef(0) == pytest.approx(a_t * -math.expm1(-h))
    assert noise.coef(0) == pytest.approx(-s_t * math.expm1(h))


def test_expstep_to_clean_data_returns_x0():
    e = ExpStep.between("data", 0.6, 0.8, 1.0, 0.0)
    assert (e.a, e.coef(0), e.coef(1)) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="noise-space step cannot end at sigma = 0"):
        ExpStep.between("noise", 0.6, 0.8, 1.0, 0.0)


def test_taylor_weights_are_exact_on_polynomials():
    e = ExpStep.between("data", 0.3, 0.95, 0.9, 0.43)
    nodes = [0.0, -0.7, -1.5]
    w = taylor_weights(e, nodes)
    for degree in range(3):  # D(tau) = tau^degree  ->  integral = degree! coef(degree)
        exact = math.factorial(degree) * e.coef(degree)
        integral = sum(wj * tj**degree for wj, tj in zip(w, nodes, strict=True))
        assert integral == pytest.approx(exact, rel=1e-12)


def test_vandermonde_rejects_duplicate_nodes():
    with pytest.raises(ValueError, match="distinct"):
        solve_vandermonde([0.0, 0.0], [1.0, 2.0])
