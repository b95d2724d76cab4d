"""Property-based tests (hypothesis) of the command line.

``test_sample_never_crashes_nor_ignores_an_option``: every combination of model, solver,
NFE, grid, guidance, scale, label, teleportation, thresholding, seeds and batch size either
exits 0 with finite samples and a manifest that records exactly what was applied, or fails
with a one-line error — never a traceback, never an option accepted and ignored.
``DIFFSOLVE_HYPOTHESIS_EXAMPLES`` sets the number of combinations (default 40).

``test_every_command_and_option_is_safe`` (issue 24): invocations of every command with any
of its options (valid or not; the demos, a diffusers pipeline folder, a ``.py`` entry
point; now and then a broken torchrun environment), run in-process one after another in one
working folder that holds the user's own files (:mod:`cli_cases`). Each exits 0 with a
complete result or with a one-line error; none ends in a traceback or runs past its timeout;
no file outside its ``--out``/``--json``/``--plot``/``--checkpoint`` (or their defaults) is
created, changed or removed — in the working folder, the installed package (its ``.py``
sources aside) and the model folders — and no file of the user's is replaced without
``--force``. ``DIFFSOLVE_PROPERTY_CASES`` sets the number of invocations (default 100; the
recorded run in BENCHMARKS.md §17 used 10,000), ``DIFFSOLVE_PROPERTY_TIMEOUT`` the seconds
per invocation (default 120), ``DIFFSOLVE_PROPERTY_REPORT`` a JSON file for the counts.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import cli_cases
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
        assert len(re.findall(r"^Error: ", result.output, re.M)) == 1, (args, result.output)
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


# ---------------------------------------------------------------------------------------
# Every command and option: no traceback, no hang, no file outside the outputs (issue 24)
CASES = int(os.environ.get("DIFFSOLVE_PROPERTY_CASES", "100"))
CASE_SECONDS = int(os.environ.get("DIFFSOLVE_PROPERTY_TIMEOUT", "120"))


class CaseTimeout(BaseException):
    """An invocation ran past its timeout (a ``BaseException``: no ``except Exception`` in
    the code under test swallows it)."""


def _invoke(case: cli_cases.Case) -> tuple[Any, float]:
    """Run one invocation in-process under a per-case alarm; ``None`` when it timed out."""

    def alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    started = time.perf_counter()
    try:
        result = CliRunner(env=case.env).invoke(main, case.args)
    except CaseTimeout:
        result = None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return result, time.perf_counter() - started


def _outcome(case: cli_cases.Case, result: Any) -> tuple[str, list[str]]:
    """``ran`` or ``refused``, and the problems of the result (none expected)."""
    if result is None:
        return "hang", [f"no result within {CASE_SECONDS} s"]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        error = result.exception
        return "traceback", [f"traceback: {type(error).__name__}: {error}"]
    output = result.output
    if result.exit_code == 0:
        return "ran", cli_cases.result_problems(case, output)
    errors = list(re.finditer(r"^Error: ", output, re.M))
    if case.command == "check-model" and result.exit_code == 1 and not errors:
        return "ran", []  # the verdict "the declared convention does not fit", exit 1
    lines = output[errors[-1].end() :].strip().splitlines() if errors else []
    if len(errors) != 1 or len(lines) != 1 or "Traceback" in output:
        return "refused", [f"not a one-line error: {output[-600:]!r}"]
    return "refused", []


def _reason(output: str) -> str:
    """A refusal's message, its file names and numbers dropped (to count kinds of refusal)."""
    line = output.split("Error: ")[-1].strip()
    return re.sub(r"(/|\.)[\w./-]+|\d+(\.\d+)?", "…", line)[:90]


def test_every_command_and_option_is_safe(tmp_path_factory, monkeypatch, capsys):
    from tiny_folders import ddpm_folder, reversed_flow_file

    base = tmp_path_factory.mktemp("property")
    models = {
        "ddpm": str(ddpm_folder(base / "models" / "ddpm")),
        "py": reversed_flow_file(base / "models" / "py"),
    }
    world = cli_cases.make_world(base / "work", models, base / "scratch")
    monkeypatch.chdir(world.root)
    cli_cases.small_validation(monkeypatch)
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    timing: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    slowest = [0.0, ""]

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def cases(data: Any) -> None:
        case = cli_cases.draw_case(data, world)
        before = cli_cases.snapshot(world.watched)
        result, seconds = _invoke(case)
        kind, found = _outcome(case, result)
        found += cli_cases.file_problems(world, case, before, cli_cases.snapshot(world.watched))
        counts[kind] += 1
        counts[f"{case.command}: {kind}"] += 1
        if kind == "refused" and result is not None:
            reason = f"{case.command}: {_reason(result.output)}"
            reasons[reason] += 1
            examples.setdefault(reason, " ".join(case.args))
        if found:
            counts["cases with a problem"] += 1
            problems.append(f"{' '.join(case.args)} (env {case.env}): {'; '.join(found)}")
        timing[case.command] += seconds
        if seconds > slowest[0]:
            slowest[:] = [seconds, " ".join(case.args)]
        cli_cases.clean_fresh(world, case)

    started = time.perf_counter()
    cases()
    summary = {
        "cases": CASES,
        "seconds": round(time.perf_counter() - started, 1),
        "slowest": slowest,
        "seconds_by_command": {k: round(v, 1) for k, v in timing.most_common()},
        "counts": dict(sorted(counts.items())),
        "problems": problems[:50],
        "refusals": {k: [n, examples[k]] for k, n in reasons.most_common()},
    }
    with capsys.disabled():
        print("\ncli property run:", json.dumps(summary["counts"]), f"{summary['seconds']} s")
    if os.environ.get("DIFFSOLVE_PROPERTY_REPORT"):
        Path(os.environ["DIFFSOLVE_PROPERTY_REPORT"]).write_text(json.dumps(summary, indent=2))
    assert not problems, "\n".join(problems[:20])
    assert counts["ran"] and counts["refused"]
    assert not counts["traceback"] and not counts["hang"]
