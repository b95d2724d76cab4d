"""``diffsolve bench``: every solver against diffusers' schedulers, side by side.

Protocol (DESIGN.md): same model, same initial noise, same process for every contestant; a
high-accuracy reference solve cross-checked against a second method; RMSE to the reference,
Fréchet distance to held-out data, seconds per sample and solver overhead per step.
"""

from diffsolve.app.bench.runner import BenchConfig, BenchResult, Row, run_bench

__all__ = ["BenchConfig", "BenchResult", "Row", "run_bench"]
