"""Guidance and thresholding wrappers: CFG, classifier guidance, APG, dynamic thresholding."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SCHEDULES
from diffsolve import DDIM, DEIS, DPMSolver, DPMSolverPP, GaussianModel, Heun, ModelWrapper, UniPC
from diffsolve import grids as grid_lib
from diffsolve.app.classifier import classifier_accuracy, load_classifier
from diffsolve.ode.model import Prediction
from diffsolve.ode.sampling import sample
from diffsolve.wrappers.guidance import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    class_conditioning,
    projected_guidance,
)
from diffsolve.wrappers.thresholding import DynamicThresholding, row_quantile

SOLVERS = {
    "ddim": DDIM(),
    "heun": Heun(),
    "dpmsolver-2s": DPMSolver(2, method="singlestep"),
    "dpmsolver++-3m": DPMSolverPP(3),
    "unipc-2": UniPC(2, "bh2"),
    "deis-3": DEIS(3),
}


class ToyNet(torch.nn.Module):
    """A small deterministic class-conditional "network" that records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        self.calls.append((x.shape[0], class_labels.clone()))
        y = class_labels.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(0.7 * x + 0.1 * y - 0.3) * (1 + 1e-4 * t.view_as(y)) + 0.05 * y


def toy_model(prediction: str = "epsilon", schedule: str = "vp_discrete") -> ModelWrapper:
    return ModelWrapper(ToyNet(), SCHEDULES[schedule](), prediction)


def state(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 3, 3, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 3, 7, 9])


def test_cfg_is_one_batched_call_and_the_guided_combination():
    model = toy_model()
    cond, uncond = class_conditioning(LABELS, 10)
    cfg = ClassifierFreeGuidance(model, 3.0, cond, uncond)
    x = state()
    out = cfg(x, 0.5)
    assert len(model.model.calls) == 1
    batch, labels = model.model.calls[0]
    assert batch == 8 and labels.tolist() == [10] * 4 + LABELS.tolist()
    ref_c = model.with_kwargs(class_labels=LABELS)(x, 0.5)
    ref_u = model.with_kwargs(class_labels=torch.full_like(LABELS, 10))(x, 0.5)
    torch.testing.assert_close(out.eps, ref_u.eps + 3.0 * (ref_c.eps - ref_u.eps))
    torch.testing.assert_close(out.x0, ref_u.x0 + 3.0 * (ref_c.x0 - ref_u.x0))


def test_cfg_scale_one_is_a_single_conditional_call():
    model = toy_model()
    cond, uncond = class_conditioning(LABELS, 10)
    out = ClassifierFreeGuidance(model, 1.0, cond, uncond)(state(), 0.3)
    assert [c[0] for c in model.model.calls] == [4]
    torch.testing.assert_close(out.x0, model.with_kwargs(class_labels=LABELS)(state(), 0.3).x0)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "flow"])
def test_cfg_combination_holds_in_x0_space_for_every_prediction_type(prediction):
    schedule = "rectified_flow" if prediction == "flow" else "vp_linear"
    model = toy_model(prediction, schedule)
    cond, uncond = class_conditioning(LABELS, 10)
    x = state()
    out = ClassifierFreeGuidance(model, 4.5, cond, uncond)(x, 0.4)
    d_c = model.with_kwargs(**cond)(x, 0.4).x0
    d_u = model.with_kwargs(**uncond)(x, 0.4).x0
    torch.testing.assert_close(out.x0, d_u + 4.5 * (d_c - d_u))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_guidance_pair_counts_once_with_every_solver(name):
    model = toy_model()
    cond, uncond = class_conditioning(LABELS, 10)
    cfg = ClassifierFreeGuidance(model, 2.0, cond, uncond)
    grid = grid_lib.time_uniform(model.schedule, 6, 1.0, 0.0)
    out = sample(cfg, state(), SOLVERS[name], grid)
    assert out.nfe == len(model.model.calls) == SOLVERS[name].plan(model.schedule, grid).nfe
    assert all(batch == 8 for batch, _ in model.model.calls)


def test_conditioning_broadcast_and_validation():
    model = toy_model()
    cfg = ClassifierFreeGuidance(
        model, 2.0, {"class_labels": torch.tensor(3)}, {"class_labels": torch.tensor([10])}
    )
    cfg(state(5), 0.5)
    assert model.model.calls[0][1].tolist() == [10] * 5 + [3] * 5
    with pytest.raises(ValueError, match="same keys"):
        ClassifierFreeGuidance(model, 2.0, {"class_labels": LABELS}, {})
    with pytest.raises(ValueError, match="batch size 4"):
        ClassifierFreeGuidance(model, 2.0, *class_conditioning(LABELS, 10))(state(3), 0.5)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        ClassifierFreeGuidance(model, -1.0, *class_conditioning(LABELS, 10))
    with pytest.raises(ValueError, match="ModelWrapper"):
        ClassifierFreeGuidance(GaussianModel.random((4,)).denoiser(model.schedule), 2.0, {}, {})
    with pytest.raises(ValueError, match="both are tensors"):
        ClassifierFreeGuidance(model, 2.0, {"class_labels": LABELS}, {"class_labels": 10})


# ---- APG -------------------------------------------------------------------------------
def reference_apg(d_c, d_u, w, eta, r, beta, m):
    """Algorithm 1 of Sadat et al. (2024), written out sample by sample in float64."""
    out, new_m = [], []
    for i in range(d_c.shape[0]):
        delta = (d_c[i] - d_u[i]).double().flatten()
        mi = delta + (beta * m[i].double().flatten() if m is not None else 0)
        new_m.append(mi.clone())
        delta = mi * min(1.0, r / float(mi.norm())) if r is not None else mi
        c = d_c[i].double().flatten()
        par = (delta @ c) / (c @ c) * c
        out.append((c + (w - 1) * (delta - par + eta * par)).reshape(d_c[i].shape))
    return torch.stack(out), torch.stack(new_m).reshape(d_c.shape)


@pytest.mark.parametrize(
    ("eta", "r", "beta"), [(0.0, 0.8, -0.5), (0.3, None, -0.75), (1.0, 2.0, 0)]
)
def test_projected_guidance_is_algorithm_1(eta, r, beta):
    g = torch.Generator().manual_seed(1)
    d_c, d_u = torch.randn(2, 5, 2, 4, 4, generator=g, dtype=torch.float64)
    m0 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    guided, m = projected_guidance(d_c, d_u, 4.0, eta, r, beta, m0)
    ref, ref_m = reference_apg(d_c, d_u, 4.0, eta, r, beta, m0)
    torch.testing.assert_close(guided, ref)
    torch.testing.assert_close(m, ref_m)
    if eta == 0.0:  # the update is orthogonal to D_c
        inner = ((guided - d_c) * d_c).flatten(1).sum(1)
        torch.testing.assert_close(inner, torch.zeros(5, dtype=torch.float64))
    if r is not None:  # and rescaled to norm <= (w - 1) r
        assert float((guided - d_c).flatten(1).norm(dim=1).max()) <= 3.0 * r * (1 + 1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
@pytest.mark.parametrize("name", ["dpmsolver++-3m", "heun"])
def test_apg_with_eta_one_no_momentum_no_rescale_is_cfg(prediction, name):
    schedule = "rectified_flow" if prediction == "flow" else "vp_discrete"
    model = toy_model(prediction, schedule)
    cond, uncond = class_conditioning(LABELS, 10)
    grid = grid_lib.time_uniform(model.schedule, 8, model.schedule.t_max, 0.0)
    x = state().double()  # float64, so that the comparison is not float32 round-off
    cfg = sample(ClassifierFreeGuidance(model, 5.0, cond, uncond), x, SOLVERS[name], grid)
    apg = AdaptiveProjectedGuidance(
        model, 5.0, cond, uncond, eta=1.0, norm_threshold=None, momentum=0.0
    )
    out = sample(apg, x, SOLVERS[name], grid)
    torch.testing.assert_close(out.x, cfg.x, atol=1e-6, rtol=1e-6)
    assert out.nfe == cfg.nfe


def test_apg_momentum_state_and_resets():
    model = toy_model()
    cond, uncond = class_conditioning(LABELS, 10)
    apg = AdaptiveProjectedGuidance(model, 3.0, cond, uncond, momentum=-0.5)
    x = state()
    apg(x, 0.8)
    first = apg._running.clone()
    apg(x, 0.8)  # equal time (Heun's second evaluation): momentum kept, m = D + beta m
    torch.testing.assert_close(apg._running, first - 0.5 * first)
    apg(x, 0.9)  # time went up: a new trajectory
    fresh = AdaptiveProjectedGuidance(model, 3.0, cond, uncond, momentum=-0.5)
    fresh(x, 0.9)
    torch.testing.assert_close(apg._running, fresh._running)
    apg.reset()
    assert apg._running is None and apg._last_t is None
    # sample() resets it: two identical runs give identical samples
    grid = grid_lib.time_uniform(model.schedule, 5, 1.0, 0.0)
    a = sample(apg, state(), DPMSolverPP(2), grid).x
    b = sample(apg, state(), DPMSolverPP(2), grid).x
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_apg_auto_threshold_scales_with_sqrt_numel_and_validation():
    model = toy_model()
    cond, uncond = class_conditioning(LABELS, 10)
    apg = AdaptiveProjectedGuidance(model, 3.0, cond, uncond)
    assert apg.threshold_for(torch.zeros(4, 1, 8, 8)) == pytest.approx(0.5)
    assert apg.threshold_for(torch.zeros(1, 4, 128, 128)) == pytest.approx(16.0)
    for bad in ({"norm_threshold": 0.0}, {"momentum": 1.0}, {"eta": math.nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdaptiveProjectedGuidance(model, 3.0, cond, uncond, **bad)


# ---- classifier guidance ---------------------------------------------------------------
class QuadraticClassifier(torch.nn.Module):
    """logits_c = -|x - mu_c|^2 / 2: grad log p(c|x) = mu_c - sum_k p_k mu_k."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.means = torch.nn.Parameter(means, requires_grad=False)
        self.times: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(t)
        return -0.5 * ((x.flatten(1)[:, None] - self.means.flatten(1)[None]) ** 2).sum(-1)


def test_classifier_guidance_shifts_eps_by_the_log_prob_gradient_under_inference_mode():
    schedule = SCHEDULES["vp_discrete"]()
    base = GaussianModel.random((1, 3, 3), seed=3).denoiser(schedule)
    means = torch.randn(
        3, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    clf = QuadraticClassifier(means)
    labels = torch.tensor([0, 2, 1, 2])
    guided = ClassifierGuidance(base, clf, labels, scale=2.0)
    x, t = state().double(), 0.35
    with torch.inference_mode():
        out = guided(x, t)
    probs = torch.softmax(clf(x, torch.zeros(4)), -1)
    grad = means[labels] - torch.einsum("bk,kchw->bchw", probs, means)
    sigma = float(schedule.sigma(t))
    torch.testing.assert_close(out.eps, base(x, t).eps - 2.0 * sigma * grad)
    assert float(clf.times[0][0]) == pytest.approx(0.35 * 1000 - 1)  # digits' timestep
    assert ClassifierGuidance(base, clf, labels, 0.0)(x, t).x0.equal(base(x, t).x0)


def test_classifier_guidance_raises_accuracy_of_digits_samples():
    """The shipped classifier guides the unconditional digits model towards the labels."""
    from diffsolve.app.loader import load_model

    loaded = load_model("digits")
    clf = load_classifier()
    labels = torch.arange(10).repeat(3)
    x_t = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = grid_lib.time_quadratic(loaded.schedule, 10, 1.0, 0.0)
    accuracy = {}
    for scale in (0.0, 4.0):
        guided = ClassifierGuidance(loaded.denoiser, clf, labels, scale)
        with torch.inference_mode():
            x = sample(guided, x_t, DPMSolverPP(2), grid).x
        accuracy[scale] = classifier_accuracy(clf, x, labels)
    assert accuracy[0.0] < 0.4 and accuracy[4.0] > 0.8, accuracy


def test_shipped_classifier_accuracy():
    from diffsolve.app.data import load_digit_labels, load_digits

    clf = load_classifier("digits-classifier")
    assert classifier_accuracy(clf, load_digits("test"), load_digit_labels("test")) >= 0.95
    with pytest.raises(ValueError, match="unknown classifier"):
        load_classifier("no-such-classifier")


# ---- dynamic thresholding ----------------------------------------------------------------
def test_row_quantile_matches_torch_quantile():
    v = torch.randn(3, 1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.995, 1.0):
        torch.testing.assert_close(row_quantile(v, q), torch.quantile(v, q, dim=1))


def test_dynamic_thresholding_formula_half_precision_and_range():
    schedule = SCHEDULES["vp_linear"]()
    base = GaussianModel.random((1, 4, 4), seed=0, eig_range=(1.0, 9.0)).denoiser(schedule)
    wrapped = DynamicThresholding(base, ratio=0.9, max_value=1.0)
    x = 3 * state(6).repeat(1, 1, 2, 2)[:, :, :4, :4].double()
    x0 = base(x, 0.2).x0
    q = torch.quantile(x0.abs().flatten(1), 0.9, dim=1).clamp(min=1.0).view(-1, 1, 1, 1)
    out = wrapped(x, 0.2)
    torch.testing.assert_close(out.x0, x0.clamp(-q, q) / q)
    assert float(out.x0.abs().max()) <= 1.0
    # half precision: computed in float32, returned in half
    half = DynamicThresholding(base).threshold(x0.half())
    assert half.dtype == torch.float16
    full = DynamicThresholding(base).threshold(x0.float())
    torch.testing.assert_close(half.float(), full, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="ratio"):
        DynamicThresholding(base, ratio=0.0)
    with pytest.raises(ValueError, match="max_value"):
        DynamicThresholding(base, max_value=-1.0)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_thresholded_cfg_composes_with_every_solver(name):
    model = toy_model("x0")
    cond, uncond = class_conditioning(LABELS, 10)
    wrapped = DynamicThresholding(ClassifierFreeGuidance(model, 7.0, cond, uncond), 0.995, 1.0)
    grid = grid_lib.time_uniform(model.schedule, 6, 1.0, 0.0)
    out = sample(wrapped, 4 * state(), SOLVERS[name], grid)
    assert out.nfe == len(model.model.calls)
    assert float(out.x.abs().max()) <= 1.0 + 1e-6  # the last step returns a thresholded x0
    pred = wrapped(state(), 0.5)
    assert isinstance(pred, Prediction) and wrapped.schedule is model.schedule
