"""BufferManager: budget, admission/eviction bookkeeping per policy, and mincore agreement."""

from __future__ import annotations

import os

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.prefetch import BufferManager, PrefetchEngine
from expertpred.prefetch.sysmem import FileMapping

from .conftest import expert_ranges, wait_resident


def read_experts(path, layout, keys) -> None:
    """Bring experts into the page cache with plain reads (pages mapped by nobody)."""
    fd = os.open(path, os.O_RDONLY)
    # no readahead: pages still being read ahead asynchronously are locked, and an eviction
    # racing with them would (correctly) leave them resident
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        for layer, e in keys:
            for off, n in expert_ranges(layout, layer, e):
                os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_budget_smaller_than_one_expert_is_a_one_line_error(model_file, layout):
    one = layout.bytes_per_expert()
    with pytest.raises(ExpertPredError, match=f"smaller than one expert \\({one} bytes\\)") as ei:
        BufferManager(model_file, layout, budget_bytes=one - 1)
    assert "\n" not in str(ei.value) and str(model_file) in str(ei.value)
    BufferManager(model_file, layout, budget_bytes=one)  # exactly one expert is fine


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "fifo"}, "eviction policy 'fifo'"),
    ({"evictor": "munmap"}, "evictor 'munmap'"),
    ({"policy": "predictive"}, "needs a score_fn"),
])
def test_bad_options_are_one_line_errors(model_file, layout, kwargs, match):
    with pytest.raises(ExpertPredError, match=match):
        BufferManager(model_file, layout, budget_bytes=10 * layout.bytes_per_expert(), **kwargs)


def _score_by_expert(keys: np.ndarray) -> np.ndarray:
    return keys[:, 1].astype(float)  # lower expert index = less likely to be needed


# (policy, script of (op, layer, expert), expected evictions on the last admit)
CASES = [
    ("lru", [("admit", 0, 1), ("admit", 0, 2), ("admit", 0, 3), ("touch", 0, 1)], [(0, 2)]),
    ("lru", [("admit", 0, 1), ("admit", 0, 2), ("admit", 0, 3)], [(0, 1)]),
    ("lfu", [("admit", 0, 1), ("admit", 0, 2), ("admit", 0, 3), ("touch", 0, 1),
             ("touch", 0, 1), ("touch", 0, 3), ("touch", 0, 2), ("touch", 0, 2)], [(0, 3)]),
    ("lfu", [("admit", 0, 1), ("admit", 0, 2), ("admit", 0, 3)], [(0, 1)]),  # tie -> LRU
    ("predictive", [("admit", 0, 5), ("admit", 0, 2), ("admit", 0, 7), ("touch", 0, 2)],
     [(0, 2)]),
]


@pytest.mark.parametrize("policy, script, expected", CASES)
def test_policy_chooses_victim(model_file, layout, policy, script, expected):
    budget = 3 * layout.bytes_per_expert()
    with BufferManager(model_file, layout, budget, policy=policy,
                       score_fn=_score_by_expert) as buf:
        for op, layer, e in script:
            assert getattr(buf, op)(layer, e) in (None, [])
        before = buf.resident()
        evicted = buf.admit(1, 0)
        assert evicted == expected
        assert buf.resident() == (before - set(expected)) | {(1, 0)}
        assert buf.used_bytes == 3 * layout.bytes_per_expert() <= budget
        assert buf.evictions == 1
        assert buf.admit(1, 0) == []  # already resident: a use, no eviction


def test_residency_agrees_with_bookkeeping_for_unmapped_pages(cold_model, layout):
    keys = [(2, e) for e in range(6)]
    read_experts(cold_model, layout, keys)
    with BufferManager(cold_model, layout, 4 * layout.bytes_per_expert()) as buf:
        evicted = [k for key in keys for k in buf.admit(*key)]
        assert evicted == [(2, 0), (2, 1)]
        book = buf.bookkeeping()
        res = buf.residency()
        assert book.sum() == 4
        assert (res[book] == 1.0).all()
        for layer, e in evicted:
            assert res[layout.layer_index(layer), e] == 0.0
        buf.evict(2, 5)
        assert buf.residency()[layout.layer_index(2), 5] == 0.0
        assert not buf.bookkeeping()[layout.layer_index(2), 5]


@pytest.mark.parametrize("evictor, dropped", [
    ("dontneed_both", True), ("pageout_fadvise", True), ("madvise_pageout", True),
    ("fadvise_dontneed", False), ("madvise_dontneed", False), ("madvise_cold", False),
])
def test_eviction_of_pages_mapped_by_our_mapping(cold_model, layout, evictor, dropped):
    """What docs/eviction.md reports for 'own-mapped' pages, checked through the manager."""
    with BufferManager(cold_model, layout, layout.bytes_per_expert(), evictor=evictor) as buf:
        buf.admit(1, 3)
        for off, n in expert_ranges(layout, 1, 3):
            buf.mapping_.touch(off, n)  # fault the pages into the manager's own mapping
        li = layout.layer_index(1)
        assert buf.residency()[li, 3] == 1.0
        assert buf.admit(1, 4) == [(1, 3)]
        assert bool(buf.residency()[li, 3] == 0.0) is dropped


def test_engine_with_buffer_stays_within_budget(cold_model, layout):
    budget = 4 * layout.bytes_per_expert()
    with BufferManager(cold_model, layout, budget) as buf, PrefetchEngine(
            cold_model, layout, queue_depth=1, buffer=buf) as eng:
        for e in range(8):
            eng.request(3, [e])
            assert eng.wait_idle()
        eng.on_use(3, [7])
        res = buf.residency()[layout.layer_index(3)]
        c = eng.stats().counters
        assert buf.used_bytes <= budget
        assert buf.resident() == {(3, e) for e in range(4, 8)}
        assert (res[4:] == 1.0).all() and (res[:4] == 0.0).all()
        assert c.evicted == 4 and c.hits == 1
        eng.request(3, [0])  # evicted: read again, not coalesced
        assert eng.wait_idle()
        assert eng.stats().counters.issued == 9
        with FileMapping(cold_model) as fm:
            assert wait_resident(fm, layout, [(3, 0)]) == 1.0
