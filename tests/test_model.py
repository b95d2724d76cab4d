"""Every prediction type is converted to the same (x0, eps)."""

import pytest
import torch

from conftest import SCHEDULES
from diffsolve import GaussianModel, ModelWrapper, VPDiscrete
from diffsolve.ode.model import normalize_prediction


def network_for(gaussian: GaussianModel, schedule, prediction: str, time_of):
    """A 'network' predicting ``prediction`` from the exact Gaussian denoiser."""

    def net(x, model_time):
        t = time_of(float(model_time[0]))
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        x0 = gaussian.denoise(x, a, s)
        eps = (x - a * x0) / s
        if prediction == "epsilon":
            return eps
        if prediction == "x0":
            return x0
        if prediction == "v":
            return a * eps - s * x0
        if prediction == "score":
            return -eps / s
        t_var = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        a_var, s_var = schedule.alpha(t_var), schedule.sigma(t_var)
        da = torch.autograd.grad(a_var, t_var)[0] if a_var.requires_grad else 0.0
        ds = torch.autograd.grad(s_var, t_var)[0] if s_var.requires_grad else 0.0
        return float(da) * x0 + float(ds) * eps

    return net


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "score", "flow"])
def test_all_parameterisations_agree(name, prediction, gaussian):
    schedule = SCHEDULES[name]()
    wrapper = ModelWrapper(
        network_for(gaussian, schedule, prediction, lambda t: t), schedule, prediction, "t"
    )
    x = torch.randn(5, 6, dtype=torch.float64)
    t = 0.37 * schedule.t_max
    p = wrapper(x, t)
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    x0 = gaussian.denoise(x, a, s)
    torch.testing.assert_close(p.x0, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.eps, (x - a * x0) / s, rtol=1e-10, atol=1e-10)


def test_time_input_mappings():
    d = VPDiscrete.from_diffusers()
    seen = []

    def net(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    x = torch.zeros(2, 3)
    ModelWrapper(net, d)(x, 0.5)  # auto -> timestep t*N - 1
    ModelWrapper(net, d, time_input="t")(x, 0.5)
    ModelWrapper(net, d, time_input="sigma")(x, 0.5)
    ModelWrapper(net, d, time_input=lambda t: 7 * t)(x, 0.5)
    assert seen[0] == 499.0 and seen[1] == 0.5 and seen[3] == 3.5
    assert seen[2] == pytest.approx(float(d.sigma(0.5) / d.alpha(0.5)), rel=1e-6)


def test_wrapper_unwraps_outputs_and_passes_kwargs():
    class Output:
        def __init__(self, sample):
            self.sample = sample

    def net(x, t, class_labels=None):
        assert class_labels is not None
        return Output(torch.ones_like(x))

    w = ModelWrapper(net, VPDiscrete.from_diffusers(), "eps").with_kwargs(class_labels=3)
    assert torch.equal(w(torch.zeros(2, 4), 0.5).eps, torch.ones(2, 4))
    w2 = ModelWrapper(lambda x, t: (torch.ones_like(x),), VPDiscrete.from_diffusers())
    assert torch.equal(w2(torch.zeros(2, 4), 0.5).eps, torch.ones(2, 4))


def test_wrapper_errors_name_the_problem():
    d = VPDiscrete.from_diffusers()
    with pytest.raises(ValueError, match="prediction must be one of"):
        ModelWrapper(lambda x, t: x, d, "noise_and_more")
    with pytest.raises(ValueError, match="time_input must be"):
        ModelWrapper(lambda x, t: x, d, time_input="minutes")
    with pytest.raises(ValueError, match="model must be callable"):
        ModelWrapper(3, d)
    with pytest.raises(ValueError, match="does not match its input"):
        ModelWrapper(lambda x, t: x[:, :1], d)(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match="outside the schedule's model-evaluation range"):
        ModelWrapper(lambda x, t: x, d)(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="expected a tensor"):
        ModelWrapper(lambda x, t: "nope", d)(torch.zeros(2, 3), 0.5)
    assert normalize_prediction("v_prediction") == "v"
