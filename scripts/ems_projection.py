"""Project the wall time of DPM-Solver-v3's EMS estimation for Stable Diffusion 1.5 at 512²
(4×64×64 latents) on one GPU, from the measured cost of one forward pass.

SD-1.5's ``UNet2DConditionModel`` is built from its published config (random weights, nothing
downloaded; diffusers' defaults are SD-1.5's but for ``cross_attention_dim=768`` and
``sample_size=64``). Measured:

1. FLOPs of one forward at batch 1 (``torch.utils.flop_counter.FlopCounterMode``, 64×64 latent,
   77×768 text embedding), on the meta device (no arithmetic is run).
2. Wall time of one forward on ``--device`` (CPU: batch 1, ``OMP_NUM_THREADS`` threads), and
   of one forward-mode JVP (``torch.func.jvp`` in ``(x, t)``) under
   ``sdpa_kernel(SDPBackend.MATH)`` (forward AD has no formula for the fused attention
   kernels), at ``--ratio-size`` (64: the real latent).

Projection: ``FLOPs / (peak × utilisation) × JVP/forward ratio × JVPs`` for the old recipe
(K = 256 samples × 1201 λ points × 2 JVPs) and for ``--points × --samples × 2`` (the new
recipe, being designed; default 121 × 256). On a GPU (``--device cuda``) the JVP itself is
timed at ``--batch`` samples and the measured projection is printed beside the assumed one.

Usage: ``OMP_NUM_THREADS=2 python scripts/ems_projection.py --ratio-size 32`` (CPU, several
minutes; the JVP at 64×64 takes minutes per call on two cores) or ``python
scripts/ems_projection.py --device cuda --batch 1,8,16`` (float32 weights, TF32 matmuls; about
a minute on an H100). Weights in bfloat16 fail the JVP on CUDA (torch 2.11, diffusers 0.42: a
float32 tensor meets bfloat16 weights in the cross-attention under forward AD); ``--autocast
bfloat16`` runs float32 weights under autocast, where the JVP works on CUDA (not on CPU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

OLD_RECIPE = (1201, 256)  # λ points, samples per point (K = 256, N = 1200, as the paper)
JVPS_PER_SAMPLE = 2


def sd15_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """SD-1.5's UNet (config of runwayml/stable-diffusion-v1-5's ``unet/config.json``)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=(
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def inputs(batch: int, size: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)  # float32, as pipelines pass it
    return x, t, text


def count_flops(size: int) -> float:
    """FLOPs of one forward at batch 1 (a multiply-add counts 2), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = sd15_unet("meta")
    x, t, text = (v.to("meta") for v in inputs(1, size, "cpu", torch.float32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, encoder_hidden_states=text)
    return float(counter.get_total_flops())


def wall(fn: Callable[[], torch.Tensor], repeats: int, device: str) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure(
    unet, batch: int, size: int, device: str, dtype: torch.dtype, repeats: int, autocast=None
) -> dict:
    """Forward (default and math attention) and forward-mode JVP (math attention) seconds;
    ``autocast``: a dtype to run float32 weights in (``torch.autocast``)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, t, text = inputs(batch, size, device, dtype)
    vx, vt = torch.randn_like(x), torch.ones_like(t)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(torch.device(device).type, autocast) if autocast else nullcontext()
        with cast:
            return unet(x, t, encoder_hidden_states=text).sample

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return eps(x, t)

    def forward_math() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return forward()

    def jvp() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            return torch.func.jvp(eps, (x, t), (vx, vt))[1]

    result = {}
    for name, fn in (("forward", forward), ("forward_math", forward_math), ("jvp_math", jvp)):
        times = wall(fn, repeats, device)
        result[name] = min(times)
        shown = ", ".join(f"{s:.3f}" for s in times)
        print(f"  {name:13s} batch {batch:3d} {size}×{size}: {shown} s (min {min(times):.3f})")
    if device.startswith("cuda"):
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return result


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def project(flops: float, ratio: float, peak: float, utilisation: float, recipes) -> None:
    sustained = peak * utilisation
    forward = flops / sustained
    print(
        f"\nAssumed GPU forward: {flops / 1e9:.0f} GFLOP / ({utilisation:.0%} × {peak / 1e12:.0f}"
        f" TFLOP/s = {sustained / 1e12:.0f} TFLOP/s) = {forward * 1e3:.2f} ms/sample; "
        f"JVP = {ratio:.2f} × forward = {forward * ratio * 1e3:.2f} ms/sample"
    )
    for name, (points, samples) in recipes:
        jvps = points * samples * JVPS_PER_SAMPLE
        seconds = jvps * forward * ratio
        print(
            f"  {name}: {points} λ × {samples} samples × {JVPS_PER_SAMPLE} JVPs = {jvps:,} JVPs"
            f" × {forward * ratio * 1e3:.2f} ms = {seconds:,.0f} s = {hours(seconds)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=121, help="New recipe: λ points.")
    parser.add_argument("--samples", type=int, default=256, help="New recipe: samples/point.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", type=int, default=64, help="Latent side (64: 512² images).")
    parser.add_argument("--ratio-size", type=int, default=None, help="Latent side of timings.")
    parser.add_argument("--batch", default="1", help="Batch sizes of the timings, e.g. 1,8.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--autocast",
        default=None,
        choices=["bfloat16", "float16"],
        help="float32 weights under torch.autocast (bf16 weights fail forward AD on CUDA).",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense.")
    parser.add_argument("--utilisation", type=float, default=0.4)
    parser.add_argument("--ratio", type=float, default=None, help="Skip timing; JVP/forward.")
    args = parser.parse_args()
    recipes = [("old", OLD_RECIPE), ("new", (args.points, args.samples))]
    dtype = getattr(torch, args.dtype)
    autocast = getattr(torch, args.autocast) if args.autocast else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size = args.ratio_size or args.size

    start = time.perf_counter()
    flops = count_flops(args.size)
    print(
        f"SD-1.5 UNet forward, batch 1, 4×{args.size}×{args.size} latent, 77×768 text: "
        f"{flops / 1e9:.1f} GFLOP (FlopCounterMode, {time.perf_counter() - start:.1f} s)"
    )
    ratio = args.ratio
    if ratio is None:
        start = time.perf_counter()
        unet = sd15_unet(args.device, dtype)
        params = sum(p.numel() for p in unet.parameters())
        print(
            f"built on {args.device} ({args.dtype}, autocast {args.autocast}): "
            f"{params / 1e6:.1f}M parameters "
            f"({time.perf_counter() - start:.1f} s); threads {torch.get_num_threads()}"
        )
        measured = {}
        for batch in (int(b) for b in args.batch.split(",")):
            measured[batch] = measure(
                unet, batch, size, args.device, dtype, args.repeats, autocast
            )
        for batch, m in measured.items():
            print(
                f"batch {batch}: JVP/forward = {m['jvp_math'] / m['forward']:.2f} (vs default "
                f"attention), {m['jvp_math'] / m['forward_math']:.2f} (vs math attention); "
                f"forward {m['forward'] / batch * 1e3:.1f} ms/sample, "
                f"{flops * (size / args.size) ** 2 * batch / m['forward'] / 1e12:.2f} TFLOP/s"
                + (f"; peak {m['peak_gib']:.1f} GiB" if "peak_gib" in m else "")
            )
        best = measured[max(measured)]
        ratio = best["jvp_math"] / best["forward"]
        if args.device.startswith("cuda"):
            batch = max(measured)
            per_jvp = best["jvp_math"] / batch
            print(f"\nMeasured on {torch.cuda.get_device_name()} at batch {batch}:")
            for name, (points, samples) in recipes:
                jvps = points * samples * JVPS_PER_SAMPLE
                print(
                    f"  {name}: {jvps:,} JVPs × {per_jvp * 1e3:.2f} ms/JVP-sample = "
                    f"{jvps * per_jvp:,.0f} s = {hours(jvps * per_jvp)}"
                )
    project(flops, ratio, args.peak_tflops * 1e12, args.utilisation, recipes)


if __name__ == "__main__":
    main()
