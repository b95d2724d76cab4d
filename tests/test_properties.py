"""Property-based tests (hypothesis): schedules × prediction types × solvers × dtypes × grids.

Every accepted input yields finite output of the input's dtype and shape; every rejected input
raises a ValueError that names the offending argument. ``DIFFSOLVE_HYPOTHESIS_EXAMPLES`` sets
the number of cases per property (CI default 120; BENCHMARKS.md records a run with more).
"""

import itertools
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SCHEDULES
from diffsolve import (
    DDIM,
    DEIS,
    DPMSolver,
    DPMSolverAdaptive,
    DPMSolverPP,
    Euler,
    GaussianModel,
    Heun,
    ModelWrapper,
    UniPC,
    grids,
    sample,
)
from diffsolve.solvers import BDIA
from diffsolve.solvers.dpm_solver_v3 import DPMSolverV3
from diffsolve.stats.ems import EMS
from test_model import network_for

EXAMPLES = int(os.environ.get("DIFFSOLVE_HYPOTHESIS_EXAMPLES", "120"))
PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
GAUSSIAN = GaussianModel.random((2, 3), seed=11)
COUNTS = {"solver accepted": 0, "solver rejected": 0, "grid accepted": 0, "grid rejected": 0}


def solver_strategy(schedule):
    ems = EMS.degenerate(schedule, (2, 3), n=8)
    order = st.integers(1, 3)
    return st.one_of(
        st.just(DDIM()),
        st.just(Euler()),
        st.just(Heun()),
        st.builds(
            DPMSolver,
            order,
            st.sampled_from(["multistep", "singlestep"]),
            st.sampled_from(["midpoint", "taylor"]),
            st.booleans(),
        ),
        st.builds(
            DPMSolverPP,
            order,
            st.sampled_from(["multistep", "singlestep"]),
            st.sampled_from(["midpoint", "taylor"]),
            st.booleans(),
        ),
        st.builds(
            UniPC,
            order,
            st.sampled_from(["bh1", "bh2"]),
            st.booleans(),
            st.just(False),
            st.sampled_from(["data", "noise"]),
            st.booleans(),
        ),
        st.builds(DEIS, order, st.sampled_from(["t", "rho", "log_rho"]), st.booleans()),
        st.builds(
            DPMSolverV3,
            st.just(ems),
            order,
            st.booleans(),
            st.booleans(),
            st.booleans(),
            st.sampled_from(["off", "low_noise", "high_noise"]),
            st.booleans(),
        ),
        st.builds(BDIA, st.sampled_from([0.5, 1.0])),
        st.builds(DPMSolverAdaptive, st.sampled_from([2, 3]), st.sampled_from([0.05, 0.01])),
    )


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    schedule = SCHEDULES[name]()
    prediction = draw(st.sampled_from(["epsilon", "x0", "v", "score", "flow"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(sorted(grids.GRIDS)))
    steps = draw(st.integers(1, 25))
    to_zero = draw(st.booleans()) and kind in ("time_uniform", "time_quadratic")
    solver = draw(solver_strategy(schedule))
    batch = draw(st.integers(1, 5))
    return schedule, prediction, dtype, kind, steps, to_zero, solver, batch


@PROFILE
@given(cases())
def test_accepted_inputs_give_finite_output(case):
    schedule, prediction, dtype, kind, steps, to_zero, solver, batch = case
    t_end = schedule.default_range[1]
    grid = grids.make_grid(schedule, steps, kind, t_end=0.0 if to_zero else t_end)
    model = ModelWrapper(
        network_for(GAUSSIAN, schedule, prediction, lambda t: t), schedule, prediction, "t"
    )
    x = torch.randn(batch, 2, 3, generator=torch.Generator().manual_seed(steps)).to(dtype)
    try:
        plan = solver.plan(schedule, grid)
    except ValueError as err:  # rejected: it must say which argument and what is allowed
        message = str(err)
        assert any(
            word in message for word in ("grid", "order", "orders", "final_corrector", "range")
        )
        COUNTS["solver rejected"] += 1
        return
    out = sample(model, x * schedule.init_noise_sigma(), solver, plan=plan)
    assert out.x.dtype == dtype and out.x.shape == x.shape
    assert torch.isfinite(out.x.float()).all()
    COUNTS["solver accepted"] += 1


@st.composite
def bad_grids(draw):
    schedule = SCHEDULES[draw(st.sampled_from(sorted(SCHEDULES)))]()
    t_max = schedule.t_max
    raw = st.lists(
        st.one_of(
            st.floats(-0.5 * t_max, 1.5 * t_max, allow_nan=False),
            st.just(math.nan),
            st.just(math.inf),
            st.just(0.0),
            st.just(t_max),
        ),
        min_size=0,
        max_size=8,
    )
    decreasing = st.lists(st.floats(1e-6 * t_max, t_max), min_size=2, max_size=8).map(
        lambda v: sorted(set(v), reverse=True)
    )
    values = draw(st.one_of(raw, decreasing, decreasing.map(lambda v: [*v, 0.0])))
    return schedule, values


@PROFILE
@given(bad_grids())
def test_grids_are_accepted_only_when_valid(case):
    schedule, values = case
    valid = (
        len(values) >= 2
        and all(math.isfinite(v) and 0 <= v <= schedule.t_max for v in values)
        and all(a > b for a, b in itertools.pairwise(values))
    )
    try:
        grid = grids.custom(schedule, values)
    except ValueError as err:
        assert "grid" in str(err)
        assert not valid or (values[-1] == 0.0 and 0.0 in values[:-1])
        COUNTS["grid rejected"] += 1
        return
    assert valid and torch.all(grid[1:] < grid[:-1])
    COUNTS["grid accepted"] += 1


def test_zz_report_counts(capsys):
    """Print how many generated cases were accepted and rejected (for BENCHMARKS.md)."""
    with capsys.disabled():
        print(
            "\nproperty cases (none failed): " + ", ".join(f"{v} {k}" for k, v in COUNTS.items())
        )
