"""Property: read_layout on a mutated shipped GGUF is a correct layout or a clean error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertpred.lab.fuzz.targets import make_target

from .conftest import check_case


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = make_target("gguf")
    t.prepare(tmp_path_factory.mktemp("fuzz-gguf"))
    return t


@settings(settings.get_profile("fuzz-ci"))
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_gguf_reads_or_fails_cleanly(target, rnd):
    check_case(target, rnd)
