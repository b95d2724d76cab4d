"""How much do DPM-Solver-v3's EMS depend on the prompt? (issue 14, part 3a)

Tiny random-weight ``StableDiffusionPipeline`` (tests/tiny_pipelines.py), data = K of its own
guided samples (DPM-Solver++ 25 steps). EMS of the network under: the empty prompt (a fixed
embedding), the same with another seed (the estimator's noise floor), one other prompt,
a different random prompt per data point, and the CFG-combined model (scale 7.5). Prints the
relative L2 differences of l, s, b against the empty-prompt EMS.

    OMP_NUM_THREADS=1 python scripts/ems_prompt_dependence.py [K] [N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_pipelines as tiny
from diffsolve.integrations.diffusers import (
    DiffsolveDPMSolverPPScheduler,
    ems_for_pipeline,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(k: int = 32, n: int = 40) -> None:
    pipe = tiny.sd_pipeline()
    sampler = tiny.swap(tiny.sd_pipeline(), DiffsolveDPMSolverPPScheduler)
    data = torch.cat([tiny.run(sampler, steps=25, seed=100 + i) for i in range(k)])
    cond = tiny.conditioning(pipe)
    empty, prompt = cond["negative_prompt_embeds"], cond["prompt_embeds"]
    many = torch.randn(k, *prompt.shape[1:], generator=torch.Generator().manual_seed(7))
    common = {"grid_size": n, "batch_size": k}
    runs = {
        "empty prompt": ems_for_pipeline(pipe, data, prompt_embeds=empty, **common),
        "empty prompt, other seed": ems_for_pipeline(
            pipe, data, prompt_embeds=empty, seed=1, **common
        ),
        "one other prompt": ems_for_pipeline(pipe, data, prompt_embeds=prompt, **common),
        "a random prompt per sample": ems_for_pipeline(
            pipe,
            data,
            prompt_embeds=empty,
            conditioning={"encoder_hidden_states": many},
            **common,
        ),
        "CFG 7.5 (prompt, empty)": ems_for_pipeline(
            pipe,
            data,
            prompt_embeds=prompt,
            negative_prompt_embeds=empty,
            guidance_scale=7.5,
            **common,
        ),
    }
    base = runs["empty prompt"]
    print(f"K={k}, N={n}; relative L2 difference to the empty-prompt EMS")
    print("| EMS under | l | s | b |\n|---|---|---|---|")
    for name, ems in runs.items():
        if ems is not base:
            print(
                f"| {name} | {rel(ems.l, base.l):.3f} | {rel(ems.s, base.s):.3f} "
                f"| {rel(ems.b, base.b):.3f} |"
            )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
