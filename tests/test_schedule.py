import math

import pytest
import torch

from conftest import SCHEDULES
from diffsolve import EDM, RectifiedFlow, VPCosine, VPDiscrete, VPLinear, schedule_from_config


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lambda_roundtrip_and_monotone(name):
    s = SCHEDULES[name]()
    t_start, t_end = s.default_range
    ts = torch.linspace(t_end, t_start, 101, dtype=torch.float64)
    lam = s.lambda_(ts)
    assert lam.dtype == torch.float64
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all(), "lambda must decrease with t"
    torch.testing.assert_close(s.t_of_lambda(lam), ts, rtol=1e-10, atol=1e-12)
    # clean data at t = 0: alpha = 1, sigma = 0, lambda = +inf, and back
    assert float(s.lambda_(0.0)) == math.inf
    assert float(s.t_of_lambda(math.inf)) == 0.0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_batched_shapes_and_alpha_sigma(name):
    s = SCHEDULES[name]()
    t = torch.rand(3, 4, dtype=torch.float64) * s.t_max * 0.9 + 1e-3
    a, sg = s.alpha(t), s.sigma(t)
    assert a.shape == sg.shape == (3, 4)
    torch.testing.assert_close(s.lambda_(t), torch.log(a / sg))
    if name.startswith("vp"):
        torch.testing.assert_close(a**2 + sg**2, torch.ones_like(a))


def test_discrete_matches_diffusers_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        ours = VPDiscrete.from_diffusers(kind, 0.00085, 0.012, 1000)
        theirs = diffusers.DDPMScheduler(
            beta_schedule=kind, beta_start=0.00085, beta_end=0.012
        ).alphas_cumprod.double()
        torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=1e-5, atol=1e-7)
        # knots: t_i = (i+1)/N carry alpha_bar_i exactly
        t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
        torch.testing.assert_close(ours.alpha(t) ** 2, ours.alphas_cumprod)


def test_discrete_timestep_mapping():
    s = VPDiscrete.from_diffusers()
    assert float(s.timestep(1.0)) == 999.0
    assert float(s.timestep(1e-3)) == pytest.approx(0.0, abs=1e-12)
    assert float(s.t_of_timestep(499)) == 0.5


def test_explicit_clipping_documented_values():
    assert VPCosine().t_max == 0.9946
    assert float(VPCosine().lambda_(0.9946)) > -5.0
    assert RectifiedFlow().t_max == pytest.approx(0.999)
    zero_snr = VPDiscrete(torch.cat([torch.linspace(0.999, 0.01, 9), torch.zeros(1)]))
    assert float(zero_snr.alphas_cumprod[-1]) == 2.0**-24
    assert math.isfinite(float(zero_snr.lambda_(1.0)))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_config_roundtrip(name):
    s = SCHEDULES[name]()
    assert schedule_from_config(s.to_config()) == s
    assert schedule_from_config(s.to_config()).fingerprint() == s.fingerprint()


def test_schedule_errors_are_clear():
    with pytest.raises(ValueError, match="schedule kind must be one of"):
        schedule_from_config({"kind": "vp_fancy"})
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        VPDiscrete.from_diffusers("cubic")
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPDiscrete([0.5, 0.9])
    with pytest.raises(ValueError, match="T must lie in"):
        VPCosine(T=1.0)
    with pytest.raises(ValueError, match="t_max <= 1"):
        RectifiedFlow(t_max=1.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPLinear(beta_min=20, beta_max=0.1)


@pytest.mark.parametrize(
    "beta_schedule, start, end",
    [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0, 0)],
)
def test_zero_terminal_snr_rescale_stays_monotone_for_every_beta_schedule(
    beta_schedule, start, end
):
    """Linear betas rescaled to zero terminal SNR reach ᾱ_{N-2} ≈ 4e-9 < 2^-24: the stand-in
    for ᾱ_{N-1} = 0 must stay below it (diffusers' 2^-24 elsewhere)."""
    from diffsolve.integrations.diffusers import diffusers_schedule

    pytest.importorskip("diffusers")
    schedule = diffusers_schedule(
        beta_schedule=beta_schedule, beta_start=start, beta_end=end, rescale_betas_zero_snr=True
    )
    ac = schedule.alphas_cumprod
    assert bool((ac[1:] < ac[:-1]).all()) and float(ac[-1]) > 0
    assert float(ac[-1]) <= 2.0**-24
    assert math.isfinite(float(schedule.lambda_(1.0)))


def test_noise_prediction_on_cosine_betas_starts_where_lambda_is_minus_5_1():
    """Cosine betas end at λ = -9.9, where x̂₀ = (x - σε̂)/α amplifies ε̂'s error 2·10⁴-fold:
    a noise-predicting model samples from λ = -5.1 instead; other predictions, and betas
    that end above it (DDPM's linear, λ = -5.06), keep t = 1."""
    from diffsolve.ode.schedule import EPSILON_LAMBDA_MIN

    cosine = VPDiscrete.from_diffusers("squaredcos_cap_v2")
    clipped = cosine.for_prediction("epsilon")
    assert clipped.t_max < 1.0
    assert float(clipped.lambda_(clipped.t_max)) == pytest.approx(EPSILON_LAMBDA_MIN, abs=1e-6)
    assert cosine.for_prediction("v_prediction") is cosine
    assert clipped.for_prediction("epsilon") is clipped
    linear = VPDiscrete.from_diffusers("linear")
    assert linear.for_prediction("epsilon") is linear
    # the start travels with the config, and the process is the same one
    again = schedule_from_config(clipped.to_config())
    assert again.t_max == pytest.approx(clipped.t_max)
    assert torch.equal(again.alphas_cumprod, cosine.alphas_cumprod)
    with pytest.raises(ValueError, match="t_max"):
        VPDiscrete(cosine.alphas_cumprod, t_max=1.5)
