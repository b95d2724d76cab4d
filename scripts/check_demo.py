"""Quick visual (and optional Fréchet-distance) check of a trained digits demo model.

    python scripts/check_demo.py --model digits            # -> docs/img/digits-check.png
    python scripts/check_demo.py --model digits-cond --fd  # also FD of 1000 samples vs test
    python scripts/check_demo.py --data                    # -> docs/img/digits-data.png

Uses a tiny deterministic sampler written here (a sanity check only, not the library's
sampler): DDIM (eta = 0) over evenly spaced integer timesteps for the VP models, with
classifier-free guidance for ``digits-cond`` (labels 0..9 repeated); Euler from t = 1 to
t = 0 for the rectified-flow model.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffsolve.app.nets  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from diffsolve.app.data import load_digits  # noqa: E402
from diffsolve.app.metrics import frechet_distance  # noqa: E402
from diffsolve.app.nets import load_network  # noqa: E402


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    config: dict,
    n: int,
    steps: int,
    guidance: float = 2.0,
    seed: int = 0,
    batch: int = 500,
) -> torch.Tensor:
    """Draw ``n`` samples (in [-1, 1] up to model error) with DDIM / Euler."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *config["data_shape"]), generator=gen)
    cond = config["conditioning"]
    labels = torch.arange(n) % cond["num_classes"] if cond is not None else None
    outs = []
    for s in range(0, n, batch):
        x = noise[s : s + batch]
        y = labels[s : s + batch] if labels is not None else None
        outs.append(_sample_batch(model, config, x, y, steps, guidance))
    return torch.cat(outs)


def _sample_batch(
    model: torch.nn.Module,
    config: dict,
    x: torch.Tensor,
    y: torch.Tensor | None,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Integrate one batch from noise ``x`` to data."""
    kind = config["schedule"]["kind"]
    if kind == "rectified_flow":
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for t, t_next in itertools.pairwise(ts):
            v = model(x, t.expand(x.shape[0]))
            x = x + (t_next - t) * v
        return x
    if kind != "vp_discrete":
        raise ValueError(f"unsupported schedule {kind!r}")
    sched = config["schedule"]
    betas = torch.linspace(
        sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"], dtype=torch.float64
    )
    abar = torch.cumprod(1.0 - betas, dim=0)
    n_train = sched["num_train_timesteps"]
    timesteps = np.unique(np.round(np.linspace(0, n_train - 1, steps)).astype(np.int64))[::-1]
    null = None
    if y is not None:
        null = torch.full_like(y, config["conditioning"]["null_class"])
    for k, i in enumerate(timesteps):
        t_in = torch.full((x.shape[0],), float(i))
        eps = model(x, t_in, y)
        if y is not None and guidance != 1.0:
            eps_u = model(x, t_in, null)
            eps = eps_u + guidance * (eps - eps_u)
        a_t = abar[i].float()
        a_prev = abar[timesteps[k + 1]].float() if k + 1 < len(timesteps) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def save_grid(
    images: torch.Tensor, path: Path, scale: int = 4, gap: int = 2, ncol: int = 8
) -> None:
    """Write (N, 1, 8, 8) images in [-1, 1] as a grey PNG grid (nearest upscaling)."""
    from PIL import Image

    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    n, h, w = imgs.shape
    nrow = (n + ncol - 1) // ncol
    hs, ws = h * scale, w * scale
    canvas = np.full((nrow * (hs + gap) + gap, ncol * (ws + gap) + gap), 90, dtype=np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, ncol)
        big = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
        y0, x0 = gap + r * (hs + gap), gap + c * (ws + gap)
        canvas[y0 : y0 + hs, x0 : x0 + ws] = big
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas, mode="L").save(path)
    print(f"wrote {path}")


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["digits", "digits-cond", "digits-flow"])
    p.add_argument("--folder", type=Path, default=None, help="model folder (default: demos)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="PNG path for the model samples")
    p.add_argument("--fd", action="store_true", help="also FD of 1000 samples (100 steps)")
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--fd-steps", type=int, default=100)
    p.add_argument("--data", action="store_true", help="write the real test-digit grid")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.data:
        test = load_digits("test")
        save_grid(test[:64], ROOT / "docs" / "img" / "digits-data.png")
        print(f"FD(train 1400, test 397) = {frechet_distance(load_digits('train'), test):.4f}")
        if args.model is None:
            return
    if args.model is None:
        p.error("--model is required unless --data is given")

    folder = args.folder or ROOT / "src" / "diffsolve" / "demos" / args.model
    model, config = load_network(folder)
    x = sample(model, config, 64, args.steps, args.guidance, args.seed)
    out = args.out or ROOT / "docs" / "img" / f"{args.model}-check.png"
    save_grid(x, out)
    print(f"sample range [{x.min():.2f}, {x.max():.2f}]")
    if args.fd:
        xs = sample(model, config, args.fd_samples, args.fd_steps, args.guidance, args.seed + 1)
        fd = frechet_distance(xs.clamp(-1, 1), load_digits("test"))
        fd_raw = frechet_distance(xs, load_digits("test"))
        print(
            f"FD({args.model}, {args.fd_samples} samples, {args.fd_steps} steps, "
            f"guidance {args.guidance}) vs test = {fd:.4f} (unclamped {fd_raw:.4f})"
        )


if __name__ == "__main__":
    main()
