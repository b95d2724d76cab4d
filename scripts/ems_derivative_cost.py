"""Per-sample cost of each EMS derivative path, in plain forward passes (issue 14).

Times one JVP batch (tangent in x and t, as the estimator's second JVP) per path against one
plain forward pass of the same batch, interleaved (forward, path, forward, path, ...), median
of the repeats, on the ``digits`` demo model, a tiny attention UNet (``unet``) or any model
``diffsolve --model`` takes (e.g. ``examples/models/cosine-unet``, diffusers' ``UNet2DModel``
with attention blocks).

    OMP_NUM_THREADS=1 python scripts/ems_derivative_cost.py [digits|unet|MODEL] [batch] [repeats]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from diffsolve.stats.ems.derivatives import JVP, PATHS


def model_and_input(name: str, batch: int):
    if name != "unet":  # a demo or any --model (e.g. examples/models/cosine-unet)
        from diffsolve.app.loader import load_model

        model = load_model(name)
        return model.denoiser, torch.randn(batch, *model.data_shape)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_pipelines as tiny
    from diffsolve.integrations.diffusers import denoiser_from_pipeline

    pipe = tiny.sd_pipeline()
    embeds = tiny.conditioning(pipe)["negative_prompt_embeds"]
    return denoiser_from_pipeline(pipe, embeds), torch.randn(batch, 4, 8, 8)


def main(name: str = "digits", batch: int = 64, repeats: int = 7) -> None:
    model, x = model_and_input(name, batch)
    t = torch.tensor(0.5, dtype=torch.float64)
    tx, tt = torch.randn_like(x), torch.tensor(0.7, dtype=torch.float64)
    fn = model.differentiable_eps
    jvps = {}
    for path in PATHS:
        try:
            jvp = JVP(fn, path)
            jvp(x, t, tx, tt)  # warm-up
            jvps[path] = jvp
        except RuntimeError as err:
            print(f"{path}: fails ({str(err)[:80]}...)")

    def forward() -> None:
        with torch.no_grad():
            fn(x, t)

    forward()
    ratios: dict[str, list[float]] = {p: [] for p in jvps}
    for _ in range(repeats):
        for path, jvp in jvps.items():
            start = time.perf_counter()
            forward()
            base = time.perf_counter() - start
            start = time.perf_counter()
            jvp(x, t, tx, tt)
            ratios[path].append((time.perf_counter() - start) / base)
    print(f"{name}, batch {batch}, {torch.get_num_threads()} thread(s): cost of one JVP")
    print("| path | plain forward passes (median) |\n|---|---|")
    for path, values in ratios.items():
        print(f"| {path} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "digits", *(int(a) for a in args[1:3]))
