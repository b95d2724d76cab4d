"""The diffusers adapters against the schedulers they replace, in tiny real pipelines.

For the tiny Stable Diffusion (txt2img, guidance 7.5) and SD3 pipelines of
``tests/tiny_pipelines.py`` (random weights, CPU): each diffsolve adapter swapped in by
``from_config`` and the diffusers scheduler it replaces run on the same steps and the same
seed; we report the max-abs and relative difference of the final latents and the wall time
per image (median of interleaved repeats, one thread).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/adapter_pipelines.py [--repeats 5]

Writes ``docs/bench/adapters-cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import diffusers  # noqa: E402

import test_diffusers_pipelines as harness  # noqa: E402
import tiny_pipelines as tiny  # noqa: E402
from diffsolve.integrations.diffusers import (  # noqa: E402
    DiffsolveDDIMScheduler,
    DiffsolveDEISScheduler,
    DiffsolveDPMSolverPPScheduler,
    DiffsolveUniPCScheduler,
)

FLOW_OWN = {"use_flow_sigmas": True, "flow_shift": 3.0, "shift": 1.0}


def cases() -> list[tuple[str, object, str, object, str, object, int]]:
    """(pipeline, build, adapter name, adapter factory, reference name, factory, steps)."""
    sd, sd3 = tiny.sd_pipeline, tiny.sd3_pipeline
    out = []
    for adapter, sibling in harness.ADAPTERS.items():
        theirs = (lambda s: lambda c: harness.tolerant_step(s.from_config(c)))(sibling)
        out.append(("SD", sd, adapter.__name__, adapter.from_config, sibling.__name__, theirs, 25))
    euler = diffusers.FlowMatchEulerDiscreteScheduler.from_config
    out.append(
        (
            "SD3",
            sd3,
            "DiffsolveDDIMScheduler",
            DiffsolveDDIMScheduler.from_config,
            "FlowMatchEulerDiscreteScheduler",
            euler,
            28,
        )
    )
    out.append(
        (
            "SD3",
            sd3,
            "DiffsolveDPMSolverPPScheduler",
            DiffsolveDPMSolverPPScheduler.from_config,
            "DPMSolverMultistepScheduler on FlowMatch's sigmas",
            harness.FlowSigmasDPM,
            28,
        )
    )
    for adapter in (DiffsolveUniPCScheduler, DiffsolveDEISScheduler):
        sibling = harness.ADAPTERS[adapter]
        out.append(
            (
                "SD3",
                sd3,
                f"{adapter.__name__} (own flow sigmas)",
                (lambda a: lambda c: a.from_config(c, timestep_source=None, **FLOW_OWN))(adapter),
                f"{sibling.__name__} (use_flow_sigmas)",
                (
                    lambda s: (
                        lambda c: s.from_config(c, prediction_type="flow_prediction", **FLOW_OWN)
                    )
                )(sibling),
                28,
            )
        )
    return out


def timed(build, factory, steps: int) -> tuple[torch.Tensor, float]:
    pipe = build()
    pipe.scheduler = factory(pipe.scheduler.config)
    kwargs = {"guidance_scale": 7.5} if isinstance(pipe, diffusers.StableDiffusionPipeline) else {}
    start = time.perf_counter()
    out = tiny.run(pipe, steps=steps, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for pipeline, build, ours_name, ours, theirs_name, theirs, steps in cases():
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(args.repeats):  # interleaved
            a, t_a = timed(build, ours, steps)
            b, t_b = timed(build, theirs, steps)
            times["ours"].append(t_a)
            times["theirs"].append(t_b)
        rows.append(
            {
                "pipeline": pipeline,
                "steps": steps,
                "adapter": ours_name,
                "reference": theirs_name,
                "max_abs": float((a.double() - b.double()).abs().max()),
                "scale": float(b.abs().max()),
                "relative": float((a.double() - b.double()).norm() / b.double().norm()),
                "ms_adapter": 1000 * statistics.median(times["ours"]),
                "ms_reference": 1000 * statistics.median(times["theirs"]),
            }
        )
        print(rows[-1], flush=True)
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters-cpu.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| pipeline | steps | adapter | replaces | max-abs diff (latent scale) | relative | "
        "ms / image adapter | ms / image diffusers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['steps']} | {r['adapter']} | {r['reference']} | "
            f"{r['max_abs']:.1e} ({r['scale']:.2f}) | {r['relative']:.1e} | "
            f"{r['ms_adapter']:.1f} | {r['ms_reference']:.1f} |"
        )
    (out / "adapters-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
