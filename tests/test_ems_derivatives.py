"""EMS derivative paths (issue 14 part 1): every path estimates the same statistics.

Each path of :mod:`diffsolve.stats.ems.derivatives` runs ``compute_ems`` with the same data,
seed, K and N, on the ``digits`` demo model (convolutions, no attention) and on a tiny diffusers
``UNet2DConditionModel`` with cross-attention (random weights). Tolerances (relative L2 against
forward-mode AD): exact AD paths 1e-4; finite differences 1e-3 on ``l`` and 2e-2 on ``s``, ``b``
(measured: digits 8e-6 / 3e-3 / 2e-3, UNet 1e-4 / 3e-4 / 4e-4; ``s`` is a covariance ratio that
amplifies derivative errors where the variance of ``f`` is small).
"""

from __future__ import annotations

import logging

import pytest
import torch

import tiny_pipelines as tiny
from diffsolve.app.data import load_digits
from diffsolve.app.loader import load_model
from diffsolve.integrations.diffusers import denoiser_from_pipeline, differentiable_attention
from diffsolve.stats.ems.compute import compute_ems
from diffsolve.stats.ems.derivatives import JVP, PATHS

K, N = 8, 4
#: The per-point estimator on a tiny grid, K = all the data (the paths must agree).
TINY = {"samples": None, "grid_size": N, "bandwidth": 0}
EXACT, FD_L, FD_SB = 1e-4, 1e-3, 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_agreement(stats: dict, reference: str) -> None:
    ref = stats[reference]
    for path, ems in stats.items():
        assert ems.metadata["derivative"] == path
        tol_l, tol_sb = (FD_L, FD_SB) if path == "finite_difference" else (EXACT, EXACT)
        assert rel(ems.l, ref.l) <= tol_l, path
        assert rel(ems.s, ref.s) <= tol_sb, path
        assert rel(ems.b, ref.b) <= tol_sb, path


@pytest.fixture(scope="module")
def digits():
    return load_model("digits").denoiser, load_digits("train")[:K]


@pytest.fixture(scope="module")
def attention_unet():
    pipe = tiny.sd_pipeline()
    model = denoiser_from_pipeline(pipe, tiny.conditioning(pipe)["negative_prompt_embeds"])
    data = torch.randn(K, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe.unet, model, data


def test_every_path_agrees_on_digits(digits):
    model, data = digits
    stats = {p: compute_ems(model, data, **TINY, jvp=p, batch_size=K) for p in PATHS}
    check_agreement(stats, "forward")
    assert compute_ems(model, data, **TINY).metadata["derivative"] == "forward"


def test_every_path_agrees_on_an_attention_unet(attention_unet):
    """With diffusers' plain attention processors every path works; the SDPA-based one
    (the default) needs math attention for forward mode on CPU."""
    unet, model, data = attention_unet
    with differentiable_attention(unet):
        stats = {p: compute_ems(model, data, **TINY, jvp=p, batch_size=K) for p in PATHS}
    check_agreement(stats, "forward")
    default = compute_ems(model, data, **TINY, jvp="forward_math_attention")
    assert rel(default.s, stats["forward"].s) <= EXACT


def test_auto_takes_math_attention_where_forward_mode_fails(attention_unet, caplog):
    unet, model, data = attention_unet
    x, t = data[:2], torch.tensor(0.5, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"forward JVP failed.*flash_attention"):
        JVP(model.differentiable_eps, "forward")(x, t, torch.ones_like(x), zero)
    with caplog.at_level(logging.INFO, logger="diffsolve.ems"):
        ems = compute_ems(model, data, **TINY, batch_size=K)
    assert ems.metadata["derivative"] == "forward_math_attention"
    assert "JVP by forward_math_attention (forward failed: NotImplementedError" in caplog.text
    with differentiable_attention(unet):  # plain processors: forward mode works
        assert compute_ems(model, data, **TINY).metadata["derivative"] == "forward"
    assert type(next(iter(unet.attn_processors.values()))).__name__ == "AttnProcessor2_0"


def test_no_working_path_lists_what_each_raised():
    def broken(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this")

    x, t = torch.zeros(2, 3), torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="no derivative path works") as err:
        JVP(broken)(x, t, x, torch.zeros((), dtype=torch.float64))
    for path in PATHS:
        assert f"{path}: RuntimeError: no kernel for this" in str(err.value)
    with pytest.raises(ValueError, match="jvp must be"):
        JVP(broken, "reverse")  # type: ignore[arg-type]


def test_finite_differences_are_accurate_in_x_and_t():
    """Ridders-extrapolated differences of a function with fast time oscillation (as a
    sinusoidal time embedding) and its exact derivative; one-sided at ``t_max``."""
    from diffsolve.stats.ems.derivatives import FiniteDifference

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * torch.cos(1000 * t) + x**3

    x = torch.randn(4, 5, dtype=torch.float64)
    tx = torch.randn(4, 5, dtype=torch.float64)
    for t0, t_max in ((0.5, 1.0), (1.0, 1.0)):
        t, tt = torch.tensor(t0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
        exact = (torch.cos(x) * torch.cos(1000 * t) + 3 * x**2) * tx - 0.3 * 1000 * torch.sin(
            x
        ) * torch.sin(1000 * t)
        _, approx = FiniteDifference(torch.float32, t_max)(fn, x, t, tx, tt)
        assert rel(approx, exact) < 1e-5
