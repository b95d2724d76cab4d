"""Train three small "user" models, with conventions unlike the bundled demos, on the CPU.

    python scripts/train_user_models.py
        --model {cosine-unet,cosine-eps-unet,flow-reversed,all} [--steps N] [--out DIR]

They stand in for a model someone else trained, to test and benchmark loading a user's own
model (``diffsolve sample --model ...``). Data: the "train" split (1400 images) of
:func:`diffsolve.app.data.load_digits`, upsampled bilinearly from 8x8 to 16x16 (a shape the
demos do not have), in ``[-1, 1]``. Deterministic for a fixed ``--seed`` (one CPU thread,
``torch.use_deterministic_algorithms``); writes under ``--out`` (default
``examples/models``):

* ``cosine-unet/``: a diffusers ``DDPMPipeline`` folder (``save_pretrained``, safetensors,
  float32 EMA weights only). ``UNet2DModel`` with attention blocks, ``DDPMScheduler`` with
  1000 steps, ``squaredcos_cap_v2`` betas, ``v_prediction``, ``clip_sample=True``; trained
  as diffusers' training examples do: integer timesteps ``t ~ randint(0, 1000)``,
  ``noisy = scheduler.add_noise(x0, eps, t)``, target ``scheduler.get_velocity(x0, eps, t)``,
  MSE, gradient clipping at 1, EMA with diffusers' warm-up ``min(0.999, (1+n)/(10+n))``.
  Check: 64 samples with ``DDIMScheduler`` (50 steps, eta = 0) in ``samples.png``.
* ``cosine-eps-unet/``: the same as ``cosine-unet/`` (network, scheduler, training and
  check) except ``prediction_type="epsilon"``: the target is the noise ``eps`` (MSE).
* ``flow-reversed/``: rectified flow with time reversed against diffsolve's convention:
  ``s ~ U(0, 1)`` (uniform), ``s = 0`` noise, ``s = 1`` data,
  ``x_s = (1 - s) eps + s x0``; the network predicts ``v = dx_s/ds = x0 - eps`` (MSE).
  The network and the diffsolve entry point ``load()`` live in
  ``flow-reversed/model.py`` (not written by this script); this writes
  ``model.safetensors`` (float32 EMA weights). Checks: 64 samples by 100 Euler steps of
  ``dx/ds = v`` from s = 0 to 1 with the raw network (``samples.png``), and the RMSE between
  ``diffsolve.sample(load(), ...)`` (DPM-Solver++(2M), 20 time-uniform steps) and those Euler
  samples from the same noise, which is small only if ``load()``'s conventions are right.

Training runs under ``OMP_NUM_THREADS=1`` on one thread: the defaults (steps, batch) keep
each model under ~12 minutes on one core of a 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffsolve
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))
    import diffsolve
from diffsolve.app.data import load_digits  # noqa: E402

SIZE = 16
# Defaults per model: steps and batch chosen so that each training stays under ~12 minutes
# on one CPU thread (the diffusers UNet costs ~0.53 s per step at batch 64; FlowNet ~0.31 s
# per step at batch 128).
DEFAULTS = {
    "cosine-unet": {"steps": 1250, "batch_size": 64},
    "cosine-eps-unet": {"steps": 1250, "batch_size": 64},
    "flow-reversed": {"steps": 2100, "batch_size": 128},
}


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=[*MODELS, "all"])
    p.add_argument("--steps", type=int, default=None, help="training steps (model default)")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "models")
    p.add_argument("--batch-size", type=int, default=None, help="(model default)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999, help="maximum EMA decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=250)
    return p.parse_args()


def training_data() -> torch.Tensor:
    """The 1400 training digits as ``(1400, 1, 16, 16)`` float32 in ``[-1, 1]``."""
    x = load_digits("train")
    x = nn.functional.interpolate(x, size=SIZE, mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))


class EMA:
    """Exponential moving average of the weights, with diffusers' ``EMAModel`` warm-up:
    decay ``min(max_decay, (1 + n) / (10 + n))`` at update ``n``."""

    def __init__(self, model: torch.nn.Module, max_decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step toward ``model``'s current weights."""
        self.updates += 1
        n = self.updates
        decay = min(self.max_decay, (1 + n) / (10 + n))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def train(
    name: str,
    model: torch.nn.Module,
    loss_fn: object,
    args: argparse.Namespace,
    steps: int,
    batch_size: int,
) -> tuple[torch.nn.Module, float, float]:
    """Adam + warm-up/cosine LR + grad clipping + EMA. ``loss_fn(model, x0, gen)`` returns the
    batch loss. Returns the EMA model, the mean loss of the last 100 steps and the wall time."""
    data = training_data()
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = EMA(model, args.ema)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[{name}] {n_params:,} parameters, {steps} steps, batch {batch_size}, "
        f"lr {args.lr} (warm-up {args.warmup}, cosine), EMA <= {args.ema}",
        flush=True,
    )
    model.train()
    start = time.time()
    running, recent = 0.0, []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        loss = loss_fn(model, data[idx], gen)  # type: ignore[operator]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        value = float(loss.detach())
        running += value
        recent = [*recent[-99:], value]
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            count = (step % args.log_every) + 1
            print(
                f"[{name}] step {step + 1:5d}  loss {running / count:.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:6.0f}s",
                flush=True,
            )
            running = 0.0
    wall = time.time() - start
    final = sum(recent) / len(recent)
    print(
        f"[{name}] done: final loss (mean of last {len(recent)} steps) {final:.4f}, "
        f"wall time {wall:.0f}s ({wall / 60:.1f} min)",
        flush=True,
    )
    return ema.model, final, wall


def save_grid(images: torch.Tensor, path: Path, rows: int = 8, upscale: int = 4) -> None:
    """Save ``(N, 1, H, W)`` images in ``[-1, 1]`` as a PNG grid (nearest upscaling)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    n, h, w = x.shape
    cols = math.ceil(n / rows)
    pad = 1
    canvas = torch.zeros(rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    canvas += 64  # a grey border between tiles
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = x[i]
    img = Image.fromarray(canvas.numpy(), mode="L")
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path, optimize=True)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------
# cosine-unet / cosine-eps-unet: a diffusers DDPMPipeline, cosine betas, integer timesteps,
# v-prediction / epsilon prediction


def train_cosine_unet(args: argparse.Namespace, name: str, prediction_type: str) -> None:
    """Train and save ``name/`` (a DDPMPipeline folder) and its ``samples.png``, with the
    scheduler's ``prediction_type`` ``"v_prediction"`` (target ``get_velocity(x0, eps, t)``)
    or ``"epsilon"`` (target ``eps``)."""
    import diffusers

    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    torch.manual_seed(args.seed)
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=True,
    )
    unet = diffusers.UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )

    def loss_fn(model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        noisy = scheduler.add_noise(x0, eps, t)
        target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
        return nn.functional.mse_loss(model(noisy, t).sample, target)

    defaults = DEFAULTS[name]
    steps = args.steps or defaults["steps"]
    batch = args.batch_size or defaults["batch_size"]
    ema_unet, _, _ = train(name, unet, loss_fn, args, steps, batch)
    ema_unet = ema_unet.eval()

    pipe = diffusers.DDPMPipeline(unet=ema_unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    print(f"wrote {folder}")

    # Check: 64 samples, DDIM 50 steps, eta = 0, in a manual loop.
    ddim = diffusers.DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(50)
    x = torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))
    start = time.time()
    with torch.no_grad():
        for t in ddim.timesteps:
            out = ema_unet(x, t).sample
            x = ddim.step(out, t, x, eta=0.0).prev_sample
    print(f"[{name}] DDIM 50 steps x 64 samples: {time.time() - start:.0f}s")
    save_grid(x, folder / "samples.png")


# --------------------------------------------------------------------------------------
# flow-reversed: rectified flow, s = 0 noise, s = 1 data, v = x0 - eps


def flow_module(folder: Path) -> ModuleType:
    """Import ``folder/model.py`` (the network and ``load()``) by path."""
    path = folder / "model.py"
    spec = importlib.util.spec_from_file_location("flow_reversed_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def euler_reversed(net: torch.nn.Module, noise: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Integrate ``dx/ds = net(x, s)`` from ``s = 0`` (noise) to ``s = 1`` (data)."""
    x = noise.clone()
    for i in range(steps):
        s = torch.full((x.shape[0],), i / steps)
        x = x + net(x, s) / steps
    return x


def train_flow_reversed(args: argparse.Namespace) -> None:
    """Train and save ``flow-reversed/model.safetensors``, ``samples.png``, and check
    ``model.py:load`` against the raw network."""
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    folder = args.out / "flow-reversed"
    source = ROOT / "examples" / "models" / "flow-reversed"
    if not (folder / "model.py").exists() and folder.resolve() != source.resolve():
        folder.mkdir(parents=True, exist_ok=True)  # --out elsewhere: bring the network along
        (folder / "model.py").write_text((source / "model.py").read_text())
    module = flow_module(folder)
    net = module.FlowNet()

    def loss_fn(model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.rand(x0.shape[0], generator=gen)
        sb = s[:, None, None, None]
        x_s = (1 - sb) * eps + sb * x0
        return nn.functional.mse_loss(model(x_s, s), x0 - eps)

    defaults = DEFAULTS["flow-reversed"]
    steps = args.steps or defaults["steps"]
    batch = args.batch_size or defaults["batch_size"]
    ema_net, _, _ = train("flow-reversed", net, loss_fn, args, steps, batch)
    ema_net = ema_net.eval()
    state = {k: v.detach().contiguous() for k, v in ema_net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    print(f"wrote {folder / 'model.safetensors'}")

    noise = torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))
    euler = euler_reversed(ema_net, noise, 100)
    save_grid(euler, folder / "samples.png")

    # The entry point, loaded from the file just written, against the raw-network Euler.
    wrapper = module.load()
    rf = diffsolve.RectifiedFlow()
    grid = diffsolve.grids.append_zero(rf, diffsolve.grids.time_uniform(rf, 20))
    x_start = noise[:16]
    result = diffsolve.sample(wrapper, x_start, diffsolve.DPMSolverPP(order=2), grid)
    rmse = float((result.x - euler[:16]).pow(2).mean().sqrt())
    print(
        f"[flow-reversed] RMSE(diffsolve DPM-Solver++(2M) via load(), NFE {result.nfe}; "
        f"raw Euler 100 steps) = {rmse:.4f}"
    )
    # The wrong conventions, for scale: no time reversal / no negation.
    wrong = diffsolve.ModelWrapper(ema_net, rf, prediction="flow", time_input="t")
    try:
        bad = diffsolve.sample(wrong, x_start, diffsolve.DPMSolverPP(order=2), grid).x
        wrong_rmse = f"{float((bad - euler[:16]).pow(2).mean().sqrt()):.4f}"
    except diffsolve.NonFiniteError:
        wrong_rmse = "inf (diverged)"
    print(
        f"[flow-reversed] for scale, RMSE with diffsolve's own conventions (no reversal, "
        f"no negation) = {wrong_rmse}"
    )
    if not rmse < 0.1:
        raise SystemExit(f"flow-reversed: load() disagrees with the raw network (RMSE {rmse})")


# Each model's trainer, in the order ``--model all`` runs them.
MODELS = {
    "cosine-unet": lambda args: train_cosine_unet(args, "cosine-unet", "v_prediction"),
    "cosine-eps-unet": lambda args: train_cosine_unet(args, "cosine-eps-unet", "epsilon"),
    "flow-reversed": train_flow_reversed,
}


def main() -> None:
    """Train the requested model(s)."""
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        start = time.time()
        MODELS[name](args)
        print(f"[{name}] total wall time (training + checks) {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
