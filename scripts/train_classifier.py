"""Train the time-conditional digits classifier used for classifier guidance.

    python scripts/train_classifier.py [--steps N] [--out DIR] [--threads 1]

The classifier sees noisy digits x_t = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps under the
``digits`` model's schedule (DDPM linear betas 1e-4..0.02, 1000 steps) with its network time
input, the integer timestep i. Timesteps are drawn uniformly over 0..999 with probability
``1 - --low-noise-frac`` and uniformly over 0..99 otherwise, so that the classifier is sharp on
(nearly) clean inputs, where it doubles as the accuracy meter of guided samples (evaluated at
timestep 0). Inputs are shifted by up to one pixel (background -1 fills in) half of the time.

Only the "train" split of :func:`diffsolve.app.data.load_digits` is used for training. Writes
``config.json`` (with the test-split accuracy at several timesteps) and ``model.safetensors``
(EMA weights, float32) to ``src/diffsolve/demos/digits-classifier/`` (or ``--out``).
Deterministic for a fixed ``--seed`` and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as fn

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffsolve.app.classifier  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from diffsolve.app.classifier import DigitsClassifier, classifier_accuracy  # noqa: E402
from diffsolve.app.data import load_digit_labels, load_digits  # noqa: E402

NETWORK = {
    "class": "DigitsClassifier",
    "in_channels": 1,
    "num_classes": 10,
    "channels": [16, 32, 32],
    "emb_channels": 64,
    "num_groups": 8,
    "dropout": 0.0,
    "time_scale": 1.0,
}

SCHEDULE = {
    "kind": "vp_discrete",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
}

EVAL_TIMESTEPS = (0, 100, 250, 500, 750, 999)


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--low-noise-frac", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=1000)
    return p.parse_args()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def alphas_cumprod() -> torch.Tensor:
    """:math:`\\bar\\alpha_i` of the digits schedule (float64 product, float32 result)."""
    betas = torch.linspace(
        SCHEDULE["beta_start"],
        SCHEDULE["beta_end"],
        SCHEDULE["num_train_timesteps"],
        dtype=torch.float64,
    )
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixels per axis (half the batch unshifted)."""
    b = x.shape[0]
    padded = fn.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    keep = torch.rand(b, generator=gen) < 0.5
    dy[keep], dx[keep] = 1, 1
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return torch.gather(out, 3, cols)


@torch.no_grad()
def evaluate(model: DigitsClassifier, abar: torch.Tensor, seed: int) -> dict[str, float]:
    """Test-split accuracy at :data:`EVAL_TIMESTEPS`: timestep 0 on the clean images, other
    timesteps averaged over 4 noise draws."""
    x0, labels = load_digits("test"), load_digit_labels("test")
    gen = torch.Generator().manual_seed(seed + 1)
    result = {"clean": classifier_accuracy(model, x0, labels, 0.0)}
    for i in EVAL_TIMESTEPS:
        accs = []
        for _ in range(4):
            a = abar[i]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
            accs.append(classifier_accuracy(model, xt, labels, float(i)))
        result[f"t={i}"] = sum(accs) / len(accs)
    return result


def main() -> None:
    """Train the classifier and write its folder."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    out = args.out or ROOT / "src" / "diffsolve" / "demos" / "digits-classifier"
    kwargs = {k: v for k, v in NETWORK.items() if k != "class"}
    model = DigitsClassifier(**kwargs)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[classifier] {n_params:,} parameters, {args.steps} steps, batch {args.batch_size}")

    data, labels = load_digits("train"), load_digit_labels("train")
    n = data.shape[0]
    abar = alphas_cumprod()
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    perm, pos, running, start = torch.randperm(n, generator=gen), 0, 0.0, time.time()
    for step in range(args.steps):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        b = idx.numel()
        x0 = random_shift(data[idx], gen)
        i = torch.randint(0, abar.numel(), (b,), generator=gen)
        low = torch.rand(b, generator=gen) < args.low_noise_frac
        i[low] = torch.randint(0, 100, (int(low.sum()),), generator=gen)
        a = abar[i].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = fn.cross_entropy(model(xt, i.to(torch.float32)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = step % args.log_every + 1
            print(
                f"[classifier] step {step + 1:6d}/{args.steps}  loss {running / k:.4f}  "
                f"{time.time() - start:6.1f}s",
                flush=True,
            )
            running = 0.0
    seconds = time.time() - start
    metrics = evaluate(ema, abar, args.seed)
    print("[classifier] test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "name": "digits-classifier",
        "description": "Time-conditional classifier of noisy 8x8 digits (labels 0..9) for "
        "classifier guidance of the digits models; network time input: the digits model's "
        "training timestep 0..999 (VP discrete, linear betas 1e-4..0.02). Evaluated at "
        "timestep 0 it classifies clean samples.",
        "network": NETWORK,
        "schedule": SCHEDULE,
        "time_input": "timestep",
        "data_shape": [1, 8, 8],
        "data": "sklearn digits, train split, x/8-1",
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "ema": args.ema,
            "low_noise_frac": args.low_noise_frac,
            "seed": args.seed,
            "seconds": round(seconds, 1),
        },
        "test_accuracy": {k: round(v, 4) for k, v in metrics.items()},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"[classifier] wrote {out} ({seconds:.0f}s)")


if __name__ == "__main__":
    main()
