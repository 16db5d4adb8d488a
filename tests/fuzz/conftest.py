"""Bounded fuzz profile: a few seconds per format, derandomized (the same cases every run).

Long campaigns: ``python benchmarks/fuzz.py --format FORMAT --cases N``.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings

from expertpred.lab.fuzz.core import FuzzTarget, Limits, Outcome, run_one

# Time is bounded by the case count; the 1 s per-input limit is checked by the campaign
# (benchmarks/fuzz.py) — CI here only guards against hangs with a generous kill limit.
CI_LIMITS = Limits(seconds=float("inf"), peak_bytes=64 << 20, kill_seconds=30.0)

settings.register_profile(
    "fuzz-ci", max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def check_case(target: FuzzTarget, rnd: random.Random) -> None:
    """The property: a correct result or one clean error line; nothing else."""
    res = run_one(target, rnd, CI_LIMITS)
    assert res.outcome in (Outcome.OK, Outcome.CLEAN_ERROR), \
        f"{res.outcome.value}: {res.label} -> {res.detail}"
