"""GPU checks that CPU-only CI cannot make: every registry solver on CUDA against the CPU, and
the diffusers pipeline with every diffsolve scheduler on CUDA. Run by ``scripts/gpu_check.sh``.

    python scripts/gpu_check.py OUT_DIR
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import torch

from diffsolve import sample
from diffsolve.app.loader import demo_path, load_model
from diffsolve.app.seeds import noise_for_seeds
from diffsolve.solvers.registry import SOLVERS, setup_solver


def solvers_cuda_vs_cpu() -> list[dict]:
    """Every registry solver at 10 NFE on the digits network in float64, CUDA against CPU."""
    rows = []
    cpu, gpu = (load_model("digits", device=d, dtype=torch.float64) for d in ("cpu", "cuda"))
    context = cpu.solver_context(cpu.available())
    for name in sorted(SOLVERS):
        solver, grid = setup_solver(name, cpu.schedule, 10, context=context)
        x = noise_for_seeds(range(64), cpu.data_shape, dtype=torch.float64)
        a = sample(cpu.denoiser, x, solver, grid).x
        start = time.perf_counter()
        b = sample(gpu.denoiser, x.cuda(), solver, grid).x.cpu()
        seconds = time.perf_counter() - start
        error = float((a - b).abs().max() / a.abs().max())
        rows.append({"solver": name, "max_rel_diff": error, "cuda_seconds": seconds})
        print(f"{name:<18} CUDA vs CPU max relative difference {error:.2e}", flush=True)
    return rows


def pipeline_on_cuda() -> list[dict]:
    """The digits DDPMPipeline with each diffsolve scheduler on CUDA, against sample()."""
    import diffusers

    from diffsolve.integrations import diffusers as integration

    rows = []
    pipe = diffusers.DiffusionPipeline.from_pretrained(demo_path("digits-diffusers")).to("cuda")
    loaded = load_model("digits", device="cuda")
    for cls_name, cls in integration.scheduler_classes().items():
        needs_ems = "ems_path" in inspect.signature(cls.__init__).parameters
        extra = {"ems_path": str(loaded.ems_path)} if needs_ems else {}
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
        x = noise_for_seeds(range(16), loaded.data_shape, device="cuda")
        pipe.scheduler.set_timesteps(10, device="cuda")
        y = x * pipe.scheduler.init_noise_sigma
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                out = pipe.unet(pipe.scheduler.scale_model_input(y, t), t).sample
                y = pipe.scheduler.step(out, t, y).prev_sample
        solver = pipe.scheduler.build_solver(10)
        x_start = x * pipe.scheduler.init_noise_sigma
        ours = sample(loaded.denoiser, x_start, solver, pipe.scheduler.grid).x
        error = float((y - ours).abs().max())
        rows.append({"scheduler": cls_name, "max_abs_diff_vs_sample": error})
        print(f"{cls_name:<32} pipeline on CUDA vs sample(): {error:.2e}", flush=True)
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "solvers": solvers_cuda_vs_cpu(),
        "pipelines": pipeline_on_cuda(),
    }
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2))
    worst = max(r["max_rel_diff"] for r in result["solvers"])
    verdict = "within" if worst <= 1e-6 else "ABOVE"
    count = len(result["solvers"])
    print(f"worst CUDA/CPU difference, {count} solvers: {worst:.2e} ({verdict} 1e-6)")


if __name__ == "__main__":
    main()
