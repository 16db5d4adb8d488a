"""Property: the trace dataset reader on a mutated shipped dataset (manifest or shard) is a
consistent read or one clean error line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertpred.lab.fuzz.targets import make_target

from .conftest import check_case


@pytest.fixture(scope="module", params=["manifest", "shard"])
def target(request, tmp_path_factory):
    t = make_target(request.param)
    t.prepare(tmp_path_factory.mktemp(f"fuzz-{request.param}"))
    return t


@settings(settings.get_profile("fuzz-ci"))
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_dataset_reads_or_fails_cleanly(target, rnd):
    check_case(target, rnd)
