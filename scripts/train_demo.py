"""Train one of the bundled 8x8-digits demo models on the CPU.

    python scripts/train_demo.py --model {digits,digits-cond,digits-flow} [--steps N] [--out DIR]

Writes ``model.safetensors`` (EMA weights, float32) and ``config.json`` to
``src/diffsolve/demos/<name>/`` (or ``--out``). Training uses the "train" split of
:func:`diffsolve.app.data.load_digits` only, runs on one CPU thread by default and is
deterministic for a fixed ``--seed`` (and thread count).

Models:

* ``digits``: unconditional, epsilon prediction, DDPM VP schedule (linear betas 1e-4..0.02,
  1000 steps); network time input = integer timestep i in 0..999 as float.
* ``digits-cond``: as ``digits``, class-conditional (labels 0..9, null class 10, label
  dropout 10%) for classifier-free guidance.
* ``digits-flow``: rectified flow x_t = (1 - t) x0 + t eps, velocity v = eps - x0,
  network time input = t in [0, 1] (``time_scale`` 1000).
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

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffsolve.app.nets  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from diffsolve.app.data import load_digit_labels, load_digits  # noqa: E402
from diffsolve.app.nets import build_network  # noqa: E402

NETWORK = {
    "class": "DigitsUNet",
    "in_channels": 1,
    "out_channels": 1,
    "image_size": 8,
    "base_channels": 32,
    "channel_mult": [1, 1, 1],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "mid_attention": True,
    "num_heads": 4,
    "num_groups": 8,
    "dropout": 0.0,
    "num_classes": None,
    "time_scale": 1.0,
    "emb_channels": 128,
}

VP_SCHEDULE = {
    "kind": "vp_discrete",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
}

PRESETS = {
    "digits": {
        "description": "Unconditional DDPM (epsilon prediction, linear-beta VP schedule, "
        "1000 steps) on the sklearn 8x8 digits. Network time input: integer timestep "
        "0..999 as float.",
        "network": {},
        "schedule": VP_SCHEDULE,
        "prediction": "epsilon",
        "time_input": "timestep",
        "conditioning": None,
        "steps": 12000,
    },
    "digits-cond": {
        "description": "Class-conditional DDPM (epsilon prediction, linear-beta VP schedule, "
        "1000 steps) on the sklearn 8x8 digits, labels 0..9, null class 10 (label dropout "
        "0.1) for classifier-free guidance. Network time input: integer timestep 0..999.",
        "network": {"num_classes": 10},
        "schedule": VP_SCHEDULE,
        "prediction": "epsilon",
        "time_input": "timestep",
        "conditioning": {"num_classes": 10, "null_class": 10, "label_dropout": 0.1},
        "steps": 12000,
    },
    "digits-flow": {
        "description": "Unconditional rectified flow on the sklearn 8x8 digits: "
        "x_t = (1 - t) x0 + t eps, network predicts v = eps - x0; sample by integrating "
        "dx/dt = v from t=1 (noise) to t=0 (data). Network time input: t in [0, 1].",
        "network": {"time_scale": 1000.0},
        "schedule": {"kind": "rectified_flow"},
        "prediction": "flow",
        "time_input": "t",
        "conditioning": None,
        "steps": 12000,
    },
}


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="training steps (preset default)")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument(
        "--network", type=json.loads, default={}, help="JSON dict overriding network kwargs"
    )
    return p.parse_args()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def main() -> None:
    """Train the requested model and write its folder."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    preset = PRESETS[args.model]
    steps = args.steps if args.steps is not None else preset["steps"]
    out = args.out if args.out is not None else ROOT / "src" / "diffsolve" / "demos" / args.model

    net_cfg = {**NETWORK, **preset["network"], **args.network}
    model = build_network(net_cfg)
    ema_model = copy.deepcopy(model).eval()
    for p in ema_model.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{args.model}] {n_params:,} parameters, {steps} steps, batch {args.batch_size}")

    data = load_digits("train")
    labels = load_digit_labels("train")
    n = data.shape[0]
    gen = torch.Generator().manual_seed(args.seed)

    kind = preset["schedule"]["kind"]
    if kind == "vp_discrete":
        sched = preset["schedule"]
        betas = torch.linspace(
            sched["beta_start"],
            sched["beta_end"],
            sched["num_train_timesteps"],
            dtype=torch.float64,
        )
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    cond = preset["conditioning"]

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t_start = time.time()
    running = 0.0
    for step in range(steps):
        if pos + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0 = data[idx]
        b = x0.shape[0]
        eps = torch.randn(x0.shape, generator=gen)
        if kind == "vp_discrete":
            i = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=gen)
            abar = alphas_cumprod[i].view(b, 1, 1, 1)
            xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
            t_in = i.to(torch.float32)
            target = eps
        else:
            t = torch.rand((b,), generator=gen)
            tt = t.view(b, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * eps
            t_in = t
            target = eps - x0
        y = None
        if cond is not None:
            y = labels[idx].clone()
            drop = torch.rand((b,), generator=gen) < cond["label_dropout"]
            y[drop] = cond["null_class"]

        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup)
        loss = (model(xt, t_in, y) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema_model.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema_model.buffers(), model.buffers(), strict=True):
                be.copy_(bm)

        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            k = (step % args.log_every) + 1
            print(
                f"[{args.model}] step {step + 1:6d}/{steps}  loss {running / k:.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t_start:7.1f}s",
                flush=True,
            )
            running = 0.0
    seconds = time.time() - t_start

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float32).contiguous() for k, v in ema_model.state_dict().items()
    }
    save_file(state, str(out / "model.safetensors"))
    config = {
        "name": args.model,
        "description": preset["description"],
        "network": net_cfg,
        "schedule": preset["schedule"],
        "prediction": preset["prediction"],
        "time_input": preset["time_input"],
        "data_shape": [1, 8, 8],
        "conditioning": cond,
        "data": "sklearn digits, train split, x/8-1",
        "training": {
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "ema": args.ema,
            "seed": args.seed,
            "seconds": round(seconds, 1),
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"[{args.model}] wrote {out} ({seconds:.0f}s)")


if __name__ == "__main__":
    main()
