r"""Check a model's declared conventions by measurement, not trust (``diffsolve check-model``).

A wrong declaration — ε read as v, a flow model's time reversed, a timestep index off by one,
a time embedding that truncates fractional times — makes every solver silently wrong. The
check noises data :math:`x_0` (held-out data, or the model's own samples) to
:math:`x_t = \alpha_t x_0 + \sigma_t\epsilon` at times spread over the schedule (uniform in
λ, plus the first training steps of a discrete model, where an index off by one shows), feeds
the network under each **time map** — the declared one, reversed (:math:`t \mapsto t_{\max} +
t_{\min} - t`), and for discrete VP models shifted by one training step either way — and reads
each output under each **prediction type** (ε, :math:`x_0`, v, score, flow velocity): one
network call per (time map, time) serves every prediction type.

The score of a convention is the mean over the times of
:math:`\log(\text{err}/\text{err}_\text{triv})`: its denoising error relative to the
better of the two trivial denoisers, the data mean (:math:`\hat x_0 = \mu`) and the input
(:math:`\hat x_0 = x_t/\alpha`), so that every noise level counts alike. A trained model
under its own convention scores below 0 (an exact denoiser of Gaussian data: about
:math:`-0.1`); a wrong convention far above. The declaration **fits** when no other
convention scores better by more than :data:`MARGIN`; it is **clearly wrong** when another
convention both denoises (scores below 0) and beats it by more than :data:`WRONG_MARGIN` —
the test that ``ems``, ``tune`` and ``bench`` run first, refusing such a model with the fix
in the message. A model that denoises under no convention (untrained weights, a wrong
schedule) is reported, not refused. The readings include ``-flow``, a velocity of the other
sign. Held-out data is the reliable reference for these coarse conventions: the model's own
samples are drawn under the declaration, which, when wrong, makes them off-distribution.

A timestep index off by one changes the denoising error only at the first training steps,
by about a percent: it is judged there, sample by sample against the declared index
(:data:`INDEX_Z`), and only on the model's own samples (``self``), which it denoises
exactly; on other data its own misfit at low noise can favour an offset.

Separately, the network's response to fractional time is probed: two network times with the
same integer part that give bit-identical outputs mean the time embedding truncates (an
``int`` cast); diffsolve's solvers and DPM-Solver-v3's statistics need real-valued time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffsolve.app.loader import LoadedModel
from diffsolve.ode.model import ModelWrapper, PredictionType
from diffsolve.ode.schedule import EDM, VPDiscrete

__all__ = ["MARGIN", "WRONG_MARGIN", "CheckResult", "Convention", "check_conventions"]

#: How an output may be read: name → (prediction type, sign). ``-flow`` is a velocity of the
#: other sign (``x0 - eps``, a flow model's own ``dx/ds`` when its ``s = 0`` is noise).
READINGS: dict[str, tuple[PredictionType, float]] = {
    "epsilon": ("epsilon", 1.0),
    "x0": ("x0", 1.0),
    "v": ("v", 1.0),
    "score": ("score", 1.0),
    "flow": ("flow", 1.0),
    "-flow": ("flow", -1.0),
}
#: Score difference (mean log error ratio) within which conventions tie.
MARGIN = 0.05
#: How much better another convention must score for the declaration to be refused.
WRONG_MARGIN = 0.5
#: An index offset is named where its log error at the first training steps is lower than
#: the declared index's, paired sample by sample, by this many standard errors.
INDEX_Z = 4.0
#: Times uniform in λ over the schedule's sampling range.
LAMBDA_POINTS = 12
#: Training steps (0-based) added for discrete models: where an index off by one shows.
EARLY_STEPS = (0, 1, 2, 4, 8)


@dataclass(frozen=True)
class Convention:
    """A way to read the network: its prediction type and time map (``"declared"``,
    ``"reversed"``, ``"index+1"``, ``"index-1"``)."""

    prediction: str
    time_map: str

    def __str__(self) -> str:
        time = "declared time" if self.time_map == "declared" else f"time {self.time_map}"
        return f"{self.prediction}, {time}"


@dataclass
class CheckResult:
    """What the check measured.

    Attributes:
        declared: The model's declared convention.
        scores: Mean log error ratio to the trivial denoisers of every convention (lower is
            better; below 0 beats the trivial denoisers).
        ratios: Per convention, the error ratio at every time.
        times: The solver times checked.
        integer_time: Whether the network ignored fractional time (truncating embedding).
        data: Where the data came from (``"digits"``, ``"self"``, a path).
    """

    declared: Convention
    scores: dict[Convention, float]
    ratios: dict[Convention, list[float]] = field(repr=False)
    times: list[float] = field(repr=False)
    integer_time: bool = False
    data: str = ""
    index_z: dict[Convention, float] = field(default_factory=dict)

    @property
    def best(self) -> Convention:
        """The convention with the lowest score (the declared one on ties); a discrete
        model's timestep index offset where it is better at the first training steps
        (:data:`EARLY_STEPS`) in a paired comparison (:attr:`index_z` below
        :data:`-INDEX_Z`)."""
        coarse = {c: v for c, v in self.scores.items() if not c.time_map.startswith("index")}
        top = min(coarse.values())
        if coarse[self.declared] <= top + MARGIN:
            best = self.declared
        else:
            best = min(coarse, key=coarse.__getitem__)
        if best.time_map != "declared" or not self.index_z:
            return best
        offsets = [c for c in self.index_z if c.prediction == best.prediction]
        shifted = min(offsets, key=self.index_z.__getitem__)
        return shifted if self.index_z[shifted] < -INDEX_Z else best

    @property
    def fits(self) -> bool:
        """The declaration scores within :data:`MARGIN` of the best and beats the trivial
        denoiser."""
        return self.best == self.declared and self.scores[self.declared] < 0

    @property
    def denoises(self) -> bool:
        """Some convention beats the trivial denoisers."""
        return min(self.scores.values()) < 0

    @property
    def clearly_wrong(self) -> bool:
        """Another convention denoises and beats the declared one by :data:`WRONG_MARGIN`."""
        best = self.best
        return (
            best != self.declared
            and self.scores[best] < 0
            and self.scores[best] < self.scores[self.declared] - WRONG_MARGIN
        )

    def verdict(self) -> str:
        """One line: which convention fits, and whether the declared one does."""
        best, declared = self.best, self.declared
        ratio = math.exp(self.scores[best])
        integer = (
            "; the network ignores fractional time (its time embedding truncates t to an "
            "integer): make it embed real-valued t"
            if self.integer_time
            else ""
        )
        if not self.denoises:
            own = (
                " (its own samples are drawn under the declaration: a wrong one shows this "
                "way too; pass --data to check against real data)"
                if self.data == OWN_SAMPLES
                else ""
            )
            return (
                f"no convention denoises ({self.data} data): the best, {best}, has "
                f"{ratio:.2f}x a trivial denoiser's error — untrained weights, or another "
                f"schedule or convention than declared?{own}{integer}"
            )
        if best == declared:
            return (
                f"the declared convention fits ({declared}): {ratio:.2f}x a trivial "
                f"denoiser's error on {self.data} data, best of {len(self.scores)}{integer}"
            )
        return (
            f"the declared convention ({declared}: "
            f"{math.exp(self.scores[declared]):.3g}x a trivial denoiser's error) does not fit; "
            f"{best} does ({ratio:.2f}x on {self.data} data): {fix(best)}{integer}"
        )


def fix(convention: Convention) -> str:
    """What to change for ``convention`` to be the declared one."""
    parts = []
    if convention.time_map == "reversed":
        parts.append("the network's time runs the other way: time_input=lambda t: 1 - t")
    elif convention.time_map == "index+1":
        parts.append("its timestep index is t·N, not t·N - 1: time_input=lambda t: t * N")
    elif convention.time_map == "index-1":
        parts.append("its timestep index is t·N - 2: time_input=lambda t: t * N - 2")
    if convention.prediction == "-flow":
        parts.append(
            "its velocity has the other sign (diffsolve's is u = eps - x0, the derivative in t "
            "with t = 1 noise): negate the network's output in your ModelWrapper"
        )
    else:
        parts.append(f"--prediction {convention.prediction}")
    return "; ".join(parts)


def _time_maps(model: ModelWrapper) -> dict[str, Callable[[Tensor], Tensor]]:
    """Solver time → the solver time whose declared network time is fed, per map."""
    schedule = model.schedule
    high, low = schedule.default_range
    maps: dict[str, Callable[[Tensor], Tensor]] = {"declared": lambda t: t}
    if not isinstance(schedule, EDM):
        maps["reversed"] = lambda t: (high + low - t).clamp(low, high)
    if isinstance(schedule, VPDiscrete):
        step = 1.0 / schedule.num_train_timesteps
        maps["index+1"] = lambda t: (t + step).clamp(max=high)
        maps["index-1"] = lambda t: (t - step).clamp(min=step)
    return maps


def _times(model: ModelWrapper) -> tuple[list[float], set[float]]:
    """The times checked (noisy to clean), and which of them are a discrete model's first
    training steps."""
    schedule = model.schedule
    high, low = schedule.default_range
    ends = float(schedule.lambda_(high)), float(schedule.lambda_(low))
    lam = torch.linspace(*ends, LAMBDA_POINTS)
    spread = {min(max(float(t), low), high) for t in schedule.t_of_lambda(lam)}
    early: set[float] = set()
    if isinstance(schedule, VPDiscrete):
        n = schedule.num_train_timesteps
        early = {(k + 1) / n for k in EARLY_STEPS if k < n} - spread
    return sorted(spread | early, reverse=True), early


def _trivial_error(x0: Tensor, xt: Tensor, alpha: float, sigma: float) -> Tensor:
    """Mean squared error of the better of the two trivial denoisers: the data mean
    (:math:`\\hat x_0 = \\mu`; its in-sample error scaled by :math:`(M+1)/(M-1)` to a new
    point's) and the noisy input itself (:math:`\\hat x_0 = x_t/\alpha`)."""
    m = x0.shape[0]
    mean = (x0.mean(0, keepdim=True) - x0).pow(2).mean() * (m + 1) / max(m - 1, 1)
    identity = (xt / alpha - x0).pow(2).mean()
    return torch.minimum(mean, identity)


def check_conventions(
    loaded: LoadedModel,
    data: Tensor,
    labels: Tensor | None = None,
    *,
    source: str = "",
    seed: int = 0,
    index: bool = False,
) -> CheckResult:
    """Measure which convention fits ``loaded``'s network on ``data`` ``(M, *data_shape)``
    (conditional models: under ``labels``), see the module docstring. ``index``: also judge
    a discrete model's timestep index offset — only meaningful on the model's own samples,
    for which it is the exact denoiser (on other data its own misfit at low noise can favour
    an offset)."""
    wrapper = loaded.denoiser
    if not isinstance(wrapper, ModelWrapper):
        raise ValueError(f"model {loaded.name!r} has no network to check (an analytic model)")
    if labels is not None and loaded.num_classes:
        wrapper = wrapper.with_kwargs(class_labels=labels.to(loaded.device))
    x0 = data.to(device=loaded.device, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(loaded.device)
    times, early_times = _times(wrapper)
    maps = _time_maps(wrapper)
    readers = {
        name: (ModelWrapper(_never, wrapper.schedule, p), sign)
        for name, (p, sign) in READINGS.items()
    }
    ratios: dict[Convention, list[float]] = {Convention(p, m): [] for m in maps for p in READINGS}
    early_errors: dict[Convention, list[Tensor]] = {c: [] for c in ratios}
    with torch.inference_mode():
        for t in times:
            alpha, sigma = (float(v) for v in _alpha_sigma(wrapper, t))
            xt = alpha * x0 + sigma * noise
            trivial = _trivial_error(x0, xt, alpha, sigma)
            for name, shift in maps.items():
                mapped = _remapped(wrapper, shift)
                out = mapped.forward(xt.float(), t).double()
                for prediction, (reader, sign) in readers.items():
                    c = reader.conversion(t)
                    err = (c.px * xt + sign * c.po * out - x0).pow(2).flatten(1).mean(1)
                    ratio = float(err.mean() / trivial)
                    if t in early_times:
                        early_errors[Convention(prediction, name)].append(err / trivial)
                    ratios[Convention(prediction, name)].append(
                        ratio if math.isfinite(ratio) else 1e30
                    )
    spread = [i for i, t in enumerate(times) if t not in early_times]
    scores = {c: _mean_log(v, spread) for c, v in ratios.items()}
    declared = Convention(wrapper.prediction, "declared")
    t_mid = float(wrapper.schedule.t_of_lambda(torch.tensor(0.0)))
    alpha, sigma = (float(v) for v in _alpha_sigma(wrapper, t_mid))
    integer = wrapper.ignores_fractional_time((alpha * x0 + sigma * noise).float())
    index_z = _index_z(early_errors) if early_times and index else {}
    return CheckResult(declared, scores, ratios, times, integer, source, index_z)


def _mean_log(ratios: list[float], at: list[int]) -> float:
    return sum(math.log(max(ratios[i], 1e-30)) for i in at) / max(len(at), 1)


def _index_z(errors: dict[Convention, list[Tensor]]) -> dict[Convention, float]:
    """Per index offset, the paired z-score of its log error against the declared index of
    the same prediction type, over the first training steps and every sample (negative:
    the offset denoises better)."""
    out = {}
    for convention, values in errors.items():
        if not convention.time_map.startswith("index"):
            continue
        base = torch.stack(errors[Convention(convention.prediction, "declared")])
        diff = (torch.stack(values) + 1e-30).log() - (base + 1e-30).log()
        diff = diff[torch.isfinite(diff)].flatten()
        spread = float(diff.std()) if diff.numel() > 1 else 0.0
        mean = float(diff.mean()) if diff.numel() else 0.0
        out[convention] = mean / (spread / math.sqrt(diff.numel())) if spread > 0 else 0.0
    return out


def _never(x: Tensor, t: Tensor) -> Tensor:
    raise RuntimeError("a conversion reader is never called")


def _alpha_sigma(wrapper: ModelWrapper, t: float) -> tuple[Tensor, Tensor]:
    log_alpha, log_sigma = wrapper.schedule.log_alpha_sigma(t)
    return torch.exp(log_alpha), torch.exp(log_sigma)


def _remapped(wrapper: ModelWrapper, shift: Callable[[Tensor], Tensor]) -> ModelWrapper:
    """The wrapper feeding the network its declared time at ``shift(t)``."""
    declared = wrapper.time_input
    return ModelWrapper(
        wrapper.model,
        wrapper.schedule,
        wrapper.prediction,
        lambda t: declared(shift(torch.as_tensor(t, dtype=torch.float64))),
        wrapper.model_kwargs,
        wrapper.model_dtype,
        wrapper.fingerprint,
    )


#: How the verdict names the model's own samples as data.
OWN_SAMPLES = "own-sample"
#: Own samples the quick check of ``ems``, ``tune`` and ``bench`` draws when given no data,
#: and the evaluations each.
QUICK_SAMPLES = 16
QUICK_NFE = 20


def quick_check(
    loaded: LoadedModel,
    data: Tensor | None = None,
    labels: Tensor | None = None,
    source: str = "",
    say: Callable[[str], None] | None = None,
) -> CheckResult | None:
    """The check ``ems``, ``tune`` and ``bench`` run first: on ``data`` (at most 64 points)
    or :data:`QUICK_SAMPLES` of the model's own samples; a clearly wrong declaration is a
    ``ValueError`` whose message is the verdict and the fix. ``None`` for analytic models
    (nothing to check). ``say`` gets the verdict line."""
    if not isinstance(loaded.denoiser, ModelWrapper):
        return None
    if data is None:
        from diffsolve.app.model_data import self_samples

        data, labels = self_samples(loaded, QUICK_SAMPLES, nfe=QUICK_NFE)
        source = OWN_SAMPLES
    data = data[:64]
    labels = None if labels is None else labels[:64]
    result = check_conventions(loaded, data, labels, source=source)
    if result.clearly_wrong:
        raise ValueError(
            f"model {loaded.name!r}: {result.verdict()} (`diffsolve check-model` for details; "
            "--no-check skips this check)"
        )
    if say is not None:
        say(f"check-model: {result.verdict()}")
    return result


def format_check(result: CheckResult, top: int = 6) -> str:
    """The verdict, then the best conventions with their error against a trivial denoiser
    (geometric mean over the times checked) and the declared one."""
    coarse = [c for c in result.scores if not c.time_map.startswith("index")]
    ranked = sorted(coarse, key=result.scores.__getitem__)
    shown = ranked[:top] + ([result.declared] if result.declared not in ranked[:top] else [])
    lines = [result.verdict(), "", f"{'convention':<28} error / trivial denoiser's"]
    for convention in shown:
        mark = "  (declared)" if convention == result.declared else ""
        lines.append(f"{convention!s:<28} {math.exp(result.scores[convention]):>10.3g}{mark}")
    if result.index_z:
        best = result.best
        for convention, z in sorted(result.index_z.items(), key=lambda kv: kv[1]):
            if convention.prediction == best.prediction:
                lines.append(
                    f"timestep {convention.time_map}: paired z = {z:+.1f} at the first "
                    f"training steps (below {-INDEX_Z:g}: the offset fits better)"
                )
    return "\n".join(lines)
