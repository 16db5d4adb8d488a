"""Property: load_artifact on a mutated exported artifact is a clean error, or an artifact
that predicts (finite scores; the seed's exact scores unless the checksum was recomputed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertpred.lab.fuzz.targets import make_target

from .conftest import check_case


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = make_target("artifact")
    t.prepare(tmp_path_factory.mktemp("fuzz-artifact"))
    return t


@settings(settings.get_profile("fuzz-ci"))
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_artifact_loads_or_fails_cleanly(target, rnd):
    check_case(target, rnd)
