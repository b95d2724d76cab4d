"""EMS estimation on a CUDA device: the checks CPU tests cannot make (issue 14, part 2).

Run on a machine with a GPU (about 1-2 minutes):

    python scripts/gpu_ems_check.py [device]

1. ``digits``: the statistics on CUDA equal the CPU's (float32 round-off), with
   ``batch_size="auto"`` (sized from the measured peak, logged) and with a fixed batch.
2. ``digits`` in float16 and bfloat16 on CUDA: finite, close to float32.
3. A tiny diffusers attention UNet (SD) on CUDA: which derivative path ``jvp="auto"`` takes
   (CUDA's flash/memory-efficient SDPA kernels have no forward AD either), agreement with the
   other paths, and the memory budget honoured (``memory_budget``).
Exits non-zero on a failed check; prints timings and the chosen paths and batches.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffsolve.app.data import load_digits
from diffsolve.app.loader import load_model
from diffsolve.stats.ems.compute import compute_ems

FAILED: list[str] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm())


def check(name: str, ok: bool, detail: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def timed(label: str, fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    print(f"  {label}: {time.perf_counter() - start:.2f} s", flush=True)
    return out


def main(device: str = "cuda") -> None:
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    print(torch.cuda.get_device_name(device), torch.__version__)
    data = load_digits("train")[:64]
    settings = {"grid_size": 10, "samples": 64}
    cpu = timed("digits CPU", lambda: compute_ems(load_model("digits").denoiser, data, **settings))
    gpu_model = load_model("digits", device=device).denoiser
    auto = timed(
        "digits CUDA auto batch",
        lambda: compute_ems(gpu_model, data, device=device, batch_size="auto", **settings),
    )
    fixed = compute_ems(gpu_model, data, device=device, batch_size=16, **settings)
    for name, ems in (("auto batch", auto), ("batch 16", fixed)):
        diffs = [rel(getattr(ems, k), getattr(cpu, k)) for k in "lsb"]
        check(f"digits CUDA = CPU ({name})", max(diffs) < 1e-3, f"l, s, b rel {diffs}")
    for dtype in (torch.float16, torch.bfloat16):
        half = compute_ems(
            load_model("digits", device=device, dtype=dtype).denoiser,
            data,
            device=device,
            batch_size="auto",
            **settings,
        )
        finite = bool(torch.isfinite(half.s).all() and torch.isfinite(half.b).all())
        diffs = [rel(getattr(half, k), getattr(cpu, k)) for k in "lsb"]
        check(f"digits {dtype}", finite and diffs[0] < 0.1, f"finite {finite}, rel {diffs}")

    import tiny_pipelines as tiny
    from diffsolve.integrations.diffusers import denoiser_from_pipeline

    pipe = tiny.sd_pipeline().to(device)
    model = denoiser_from_pipeline(pipe, tiny.conditioning(pipe)["negative_prompt_embeds"])
    latents = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = {"grid_size": 6, "device": device}
    chosen = timed("UNet auto", lambda: compute_ems(model, latents, batch_size="auto", **unet))
    print(f"  auto took {chosen.metadata['derivative']}")
    for path in ("forward_math_attention", "double_backward", "finite_difference"):
        try:
            other = compute_ems(model, latents, batch_size=32, jvp=path, **unet)
        except RuntimeError as err:
            print(f"  {path}: fails on CUDA ({str(err)[:100]})")
            continue
        diffs = [rel(getattr(other, k), getattr(chosen, k)) for k in "lsb"]
        tol = 2e-2 if path == "finite_difference" else 1e-3
        check(f"UNet {path} agrees with auto", max(diffs) < tol, f"rel {diffs}")
    budget = 64 << 20
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    compute_ems(model, latents, batch_size="auto", memory_budget=budget, **unet)
    used = torch.cuda.max_memory_allocated(device) - base
    check("memory_budget honoured", used <= 1.1 * budget, f"peak {used / 2**20:.1f} MiB")
    if FAILED:
        sys.exit(f"failed: {FAILED}")
    print("all EMS GPU checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:2])
