"""Compute the EMS (DPM-Solver-v3 statistics) shipped with every demo model.

    python scripts/make_demo_ems.py [NAME ...]
    python scripts/make_demo_ems.py --smooth-only [NAME ...]   # smooth the shipped files

Trained models and the Gaussian mixture use the estimator (`diffsolve ems`, K = 256 data
points of the training split, N = 1200 logSNR intervals as in the official code; BENCHMARKS.md
shows that the grid size N matters and K beyond 256 does not on these models);
the `gaussian` model ships its exact closed-form optimum (`diffsolve.stats.ems.exact`).
`digits-cond` is measured under the training labels (the conditional model, unguided).
"""

from __future__ import annotations

import sys
import time

from diffsolve.app.data import load_digit_labels, load_digits
from diffsolve.app.loader import DEMO_MODELS, load_model
from diffsolve.stats.ems import load_ems
from diffsolve.stats.ems.compute import compute_ems
from diffsolve.stats.ems.exact import gaussian_ems

#: The shipped files use the paper's per-point estimator (bandwidth 0) at K = 256, made before
#: the grid points rotated through the data (a rerun gives an equally good, not identical,
#: file). `diffsolve ems`'s default recipe (K = 24, smoothed) costs a tenth: BENCHMARKS.md §11.
SETTINGS = {"samples": 256, "grid_size": 1200, "batch_size": 256, "bandwidth": 0.0}
#: Then l, s and b are smoothed in λ (`EMS.smoothed`): the per-point noise otherwise stalls v3's
#: convergence (BENCHMARKS.md §12; the trained networks' files, not the Gaussian mixture's).
SMOOTHING = {"digits": 0.2, "digits-cond": 0.2, "digits-flow": 0.2}


def smooth_only(names: list[str]) -> None:
    """Smooth shipped files made by the estimator alone (what the 2026-11-27 files are)."""
    for name in names or list(SMOOTHING):
        model = load_model(name)
        ems = load_ems(model.ems_path)
        if "smoothing_bandwidth" in ems.metadata:
            raise SystemExit(f"{name}: {model.ems_path} is smoothed already")
        ems.smoothed(SMOOTHING[name]).save(model.ems_path)
        print(f"{name}: smoothed (bandwidth {SMOOTHING[name]}) → {model.ems_path}")


def main(names: list[str]) -> None:
    if names[:1] == ["--smooth-only"]:
        smooth_only(names[1:])
        return
    for name in names or [n for n in DEMO_MODELS]:
        model = load_model(name)
        start = time.perf_counter()
        if name == "gaussian":
            ems = gaussian_ems(model.analytic, model.schedule, SETTINGS["grid_size"])
        else:
            ems = compute_ems(
                model.denoiser,
                load_digits("train"),
                samples=SETTINGS["samples"],
                grid_size=SETTINGS["grid_size"],
                batch_size=SETTINGS["batch_size"],
                bandwidth=SETTINGS["bandwidth"],
                checkpoint=f"{model.ems_path}.partial",
                progress=True,
                model_name=name,
                conditioning=model.label_kwargs(load_digit_labels("train")),
            )
        ems = ems.smoothed(SMOOTHING.get(name, 0.0))
        ems.save(model.ems_path)
        model.ems_path.with_name(model.ems_path.name + ".partial").unlink(missing_ok=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s → {model.ems_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
