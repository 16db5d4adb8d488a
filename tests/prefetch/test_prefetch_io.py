"""Each I/O method brings exactly the requested experts into the page cache (mincore)."""

from __future__ import annotations

import importlib.util

import pytest

from expertpred.errors import ExpertPredError
from expertpred.prefetch import METHODS, PrefetchEngine, make_method
from expertpred.prefetch.sysmem import PAGE_SIZE, FileMapping, page_span

from .conftest import inner_resident, wait_resident

HAVE_URING = importlib.util.find_spec("liburing") is not None
ALL_METHODS = [pytest.param(m, marks=pytest.mark.skipif(
    m == "io_uring" and not HAVE_URING, reason="liburing not installed")) for m in sorted(METHODS)]

REQUESTED = [(0, 1), (0, 6), (2, 3), (3, 0)]
NOT_REQUESTED = [(1, 4), (2, 7), (3, 5)]  # not adjacent to any requested expert's ranges


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("queue_depth", [1, 4])
def test_requested_experts_land_in_page_cache(cold_model, layout, method, queue_depth):
    with FileMapping(cold_model) as fm, PrefetchEngine(
            cold_model, layout, method=method, queue_depth=queue_depth,
            chunk_bytes=1 << 16) as eng:
        for layer, e in REQUESTED:
            eng.request(layer, [e])
        assert eng.wait_idle(10)
        assert wait_resident(fm, layout, REQUESTED) == 1.0
        for layer, e in NOT_REQUESTED:
            assert inner_resident(fm, layout, layer, e) == 0.0, (layer, e)
        c = eng.stats().counters
    assert c.issued == c.completed == len(REQUESTED)
    assert c.failed == 0
    assert c.bytes_read == sum(layout.bytes_per_expert(layer) for layer, _ in REQUESTED)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_reads_a_range_directly(cold_model, layout, method):
    """The method objects work without the engine (one fetch through a tiny source)."""

    class Source:
        def __init__(self, items):
            self.items = list(items)
            self.done = []

        @property
        def stopping(self):
            return not self.items and len(self.done) == self.n

        def take(self, timeout):
            return self.items.pop(0) if self.items else None

        def finish(self, item, nbytes, error):
            self.done.append((item, nbytes, error))

    class Item:
        def __init__(self, ranges):
            self.ranges = ranges

    ranges = [(s.offset, s.nbytes) for s in layout.expert_slices(1, 2)]
    src = Source([Item(ranges)])
    src.n = 1
    io = make_method(method, cold_model, queue_depth=2, chunk_bytes=1 << 16)
    io.open()
    try:
        io.run_worker(src)
    finally:
        io.close()
    [(item, nbytes, error)] = src.done
    assert error is None and nbytes == sum(n for _, n in ranges)
    with FileMapping(cold_model) as fm:
        assert wait_resident(fm, layout, [(1, 2)]) == 1.0


def test_unknown_method_and_bad_depth_are_one_line_errors(model_file):
    with pytest.raises(ExpertPredError, match="I/O method 'mmap'.*expected one of"):
        make_method("mmap", model_file)
    with pytest.raises(ExpertPredError, match="queue_depth=0"):
        make_method("pread", model_file, queue_depth=0)


def test_page_span_covers_partial_pages():
    start, length = page_span(PAGE_SIZE + 1, 2 * PAGE_SIZE)
    assert start == PAGE_SIZE and length == 3 * PAGE_SIZE
