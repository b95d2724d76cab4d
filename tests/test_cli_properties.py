"""Property-based test (hypothesis) of ``diffsolve sample`` over combinations of its options.

Every combination of model, solver, NFE, grid, guidance, scale, label, teleportation,
thresholding, seeds and batch size either exits 0 with finite samples and a manifest that
records exactly what was applied, or fails with a one-line error — never a traceback, never
an option accepted and ignored. ``DIFFSOLVE_HYPOTHESIS_EXAMPLES`` sets the number of
combinations (default 40).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffsolve.app.cli import main
from diffsolve.app.scale import read_manifest

EXAMPLES = int(os.environ.get("DIFFSOLVE_HYPOTHESIS_EXAMPLES", "40"))
COUNTS: collections.Counter[str] = collections.Counter()
pytestmark = pytest.mark.usefixtures("single_thread")

OPTIONS = st.fixed_dictionaries(
    {
        "--model": st.sampled_from(["gaussian", "digits", "digits-cond", "digits-flow"]),
        "--solver": st.sampled_from(["auto", "ddim", "dpm-solver++-2m", "unipc-bh2-3", "heun"]),
        "--nfe": st.integers(2, 6),
        "--grid": st.sampled_from([None, "logsnr", "time_uniform", "time_quadratic", "karras"]),
        "--guidance": st.sampled_from(["none", "cfg", "apg", "classifier"]),
        "--scale": st.sampled_from([None, 1.0, 2.5]),
        "--label": st.sampled_from([None, 0, 7, 12]),
        "--teleport": st.sampled_from([None, 0.1, 0.3]),
        "--threshold": st.sampled_from([None, 0.995]),
        "--seeds": st.sampled_from(["0", "0-2", "3,5"]),
        "--batch-size": st.integers(1, 3),
    }
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(options=OPTIONS)
def test_sample_never_crashes_nor_ignores_an_option(options, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["sample", "--out", str(out)]
    for flag, value in options.items():
        if value is not None:
            args += [flag, str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        result.output,
        result.exception,
    )
    assert "Traceback" not in result.output
    if result.exit_code:
        assert result.output.count("Error:") == 1, (args, result.output)
        COUNTS["refused with a one-line error"] += 1
        return
    COUNTS["ran"] += 1
    with np.load(out / "samples.npz") as data:
        assert np.isfinite(data["samples"]).all()
    _check_manifest(out, options)


def _check_manifest(out, options: dict) -> None:
    """The manifest records exactly what was asked for and applied."""
    manifest = read_manifest(out)
    applied = json.loads(manifest.conditioning)
    assert manifest.nfe_budget == options["--nfe"]
    if options["--solver"] != "auto":
        assert manifest.solver == options["--solver"]
    if options["--grid"] is not None:
        assert manifest.grid == options["--grid"]
    assert applied["guidance"]["method"] == options["--guidance"]
    assert applied["guidance"]["scale"] == (options["--scale"] or 1.0)
    assert applied["guidance"]["threshold"] == options["--threshold"]
    assert applied["class_label"] == options["--label"]
    assert applied["teleport"] == (options["--teleport"] or 0.0)
    assert manifest.batch_size == options["--batch-size"]
    if options["--teleport"]:
        assert manifest.solver_options.startswith("Teleported(")


def test_zz_report_counts(capsys):
    """Print how many combinations ran and how many were refused (for BENCHMARKS.md)."""
    with capsys.disabled():
        print(
            "\ncli property cases (no traceback, no ignored option): "
            + ", ".join(f"{v} {k}" for k, v in sorted(COUNTS.items()))
        )
