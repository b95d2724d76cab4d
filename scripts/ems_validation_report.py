"""The EMS validation (``diffsolve ems``'s last step) of statistics already made: v3 with them
against DPM-Solver++(2M) on held-out noise at 5 and 10 NFE, against a 100-step reference.

    python scripts/ems_validation_report.py digits digits-cond digits-flow \
        examples/models/cosine-unet=/tmp/diffsolve-user-models/cosine-unet-ems.safetensors
"""

from __future__ import annotations

import sys

import torch

from diffsolve.app.ems_validation import validate_ems
from diffsolve.app.loader import LoadOptions, load_model


def main() -> None:
    torch.set_num_threads(1)
    for spec in sys.argv[1:]:
        name, _, ems = spec.partition("=")
        model = load_model(name, options=LoadOptions(ems=ems or None))
        validation = validate_ems(model, model.load_ems())
        v3 = " / ".join(f"{e:.4f}" for e in validation.v3)
        rival = " / ".join(f"{e:.4f}" for e in validation.rival)
        print(f"{name}: v3 {v3}, DPM-Solver++(2M) {rival} — {validation.summary()}")


if __name__ == "__main__":
    main()
