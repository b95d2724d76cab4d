"""Export the `digits` demo model as a diffusers DDPMPipeline folder (no retraining).

The demo's DigitsUNet is made of layers diffusers has under other names, so its weights are
copied into a stock `UNet2DModel` (`diffsolve.app.diffusers_export.digits_unet_to_diffusers`)
and saved with a `DDPMScheduler` holding the training schedule (linear betas 1e-4 … 0.02 over
1000 steps, epsilon prediction). The folder then loads with plain diffusers, no custom code:

    DiffusionPipeline.from_pretrained("src/diffsolve/demos/digits-diffusers")

The script checks the converted network against the original before and after saving
(max |difference| of the outputs, float32 round-off only) and refuses to write otherwise.

Usage: python scripts/export_diffusers_demo.py [--out src/diffsolve/demos/digits-diffusers]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffsolve.app.diffusers_export import digits_unet_to_diffusers
from diffsolve.app.loader import demo_path
from diffsolve.app.nets import load_network

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "diffsolve" / "demos" / "digits-diffusers"
TOLERANCE = 1e-5


def max_difference(net: torch.nn.Module, unet: UNet2DModel) -> float:
    """Largest output difference over random inputs at timesteps across the whole range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, net.in_channels, net.image_size, net.image_size, generator=g)
    worst = 0.0
    with torch.no_grad():
        for t in (0.0, 0.5, 17.25, 250.0, 640.5, 999.0):
            ts = torch.full((x.shape[0],), t)
            worst = max(worst, float((net(x, ts) - unet(x, ts).sample).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()

    net, config = load_network(demo_path("digits"))
    schedule = config["schedule"]
    if config["prediction"] != "epsilon" or schedule["kind"] != "vp_discrete":
        raise SystemExit("the digits demo is expected to be an epsilon DDPM model")
    unet = digits_unet_to_diffusers(net)
    diff = max_difference(net, unet)
    if diff > TOLERANCE:
        raise SystemExit(f"conversion check failed: max |difference| {diff:.3g} > {TOLERANCE}")
    scheduler = DDPMScheduler(
        num_train_timesteps=schedule["num_train_timesteps"],
        beta_start=schedule["beta_start"],
        beta_end=schedule["beta_end"],
        beta_schedule=schedule["beta_schedule"],
        prediction_type="epsilon",
        clip_sample=True,  # the data lie in [-1, 1] (x/8 - 1)
    )
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        staging = Path(tmp) / "pipeline"
        pipe.save_pretrained(staging)
        reloaded = DDPMPipeline.from_pretrained(staging)
        diff_reloaded = max_difference(net, reloaded.unet)
        if diff_reloaded > TOLERANCE:
            raise SystemExit(f"reload check failed: max |difference| {diff_reloaded:.3g}")
        readme = {
            "source": "diffsolve demo 'digits' (src/diffsolve/demos/digits), weights converted "
            "to diffusers' UNet2DModel by scripts/export_diffusers_demo.py; no retraining",
            "max_abs_output_difference": diff_reloaded,
        }
        (staging / "diffsolve_export.json").write_text(json.dumps(readme, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.move(str(staging), args.out)
    print(f"wrote {args.out} (max |output difference| vs DigitsUNet: {diff_reloaded:.2e})")


if __name__ == "__main__":
    main()
