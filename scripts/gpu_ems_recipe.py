"""The EMS recipe's cost on a GPU at Stable Diffusion 1.5's size, through ``compute_ems`` itself.

    python scripts/gpu_ems_recipe.py [--device cuda] [--size 64] [--batch 12] [--points 3]

Builds SD-1.5's UNet (its published config, random weights: nothing is downloaded), wraps
it as a diffsolve model (scaled-linear VP schedule, ε prediction, one fixed 77×768 text
embedding), and times ``compute_ems`` with the recommended recipe's samples per point
(K = 24) on ``--points`` λ points of the N = 1200 grid, after a warm-up. Prints the
derivative path ``jvp="auto"`` took, seconds per λ point, and the projections for the whole
grid: the new recipe (1201 points × 24 samples) and the paper's (1201 × 256).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ems_projection import sd15_unet

from diffsolve import ModelWrapper
from diffsolve.ode.schedule import VPDiscrete
from diffsolve.stats.ems.compute import RECIPE, compute_ems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64, help="Latent side (64: 512² images).")
    parser.add_argument("--batch", type=int, default=12, help="JVP micro-batch.")
    parser.add_argument("--points", type=int, default=3, help="λ points timed (>= 3).")
    parser.add_argument("--jvp", default="auto")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    unet = sd15_unet(args.device)
    text = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)).to(args.device)

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample

    schedule = VPDiscrete.from_diffusers(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    model = ModelWrapper(network, schedule, "epsilon", "timestep", fingerprint="sd15-random")
    k, n = RECIPE["samples"], RECIPE["grid_size"]
    data = torch.randn(k, 4, args.size, args.size, generator=torch.Generator().manual_seed(1))
    lam = torch.linspace(
        float(schedule.lambda_(schedule.default_range[0])),
        float(schedule.lambda_(schedule.default_range[1])),
        n + 1,
        dtype=torch.float64,
    )
    t_start = float(schedule.t_of_lambda(lam[600]))

    def run(points: int) -> tuple[float, str]:
        t_end = float(schedule.t_of_lambda(lam[600 + points - 1]))
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        ems = compute_ems(
            model,
            data,
            samples=k,
            grid_size=points - 1,
            t_start=t_start,
            t_end=t_end,
            batch_size=args.batch,
            jvp=args.jvp,
            device=args.device,
            progress=True,
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, str(ems.metadata.get("derivative"))

    run(3)  # warm-up: kernels, the derivative path's probe
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, path = run(args.points)
    per_point = seconds / args.points
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"{name}: SD-1.5 UNet at 4x{args.size}x{args.size}, path {path}, batch {args.batch}, "
        f"{per_point:.2f} s per λ point of {k} samples ({per_point / (2 * k) * 1e3:.1f} ms per "
        f"JVP-sample), peak {peak:.1f} GiB"
    )
    for label, samples in (("new recipe (K=24, N=1200)", k), ("paper (K=256, N=1200)", 256)):
        total = per_point * (n + 1) * samples / k
        print(
            f"  {label}: {n + 1} points x {samples} samples x 2 JVPs = "
            f"{2 * samples * (n + 1):,} JVPs -> {total / 3600:.2f} h"
        )


if __name__ == "__main__":
    main()
