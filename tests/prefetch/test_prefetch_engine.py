"""PrefetchEngine behaviour on a real file with real threads: coalescing, dropping,
accounting, bounded shutdown, truncated / replaced files."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
import time

import pytest

from expertpred.errors import ExpertPredError
from expertpred.gguf.layout import read_layout
from expertpred.prefetch import METHODS, PrefetchEngine
from expertpred.prefetch.handoff import Handoff, Op, OpKind
from expertpred.prefetch.sysmem import FileMapping

from .conftest import inner_resident, wait_resident

HAVE_URING = importlib.util.find_spec("liburing") is not None
ALL_METHODS = [pytest.param(m, marks=pytest.mark.skipif(
    m == "io_uring" and not HAVE_URING, reason="liburing not installed")) for m in sorted(METHODS)]


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_duplicates_are_coalesced(cold_model, layout):
    with PrefetchEngine(cold_model, layout, queue_depth=2) as eng:
        eng.request(0, [1, 2, 1])  # duplicate inside one request: queued
        eng.request(0, [2])  # queued, in flight or resident: coalesced either way
        eng.wait_idle()
        eng.request(0, [1])  # resident now
        c = eng.stats().counters
    assert (c.requests, c.issued, c.coalesced, c.completed) == (5, 2, 3, 2)


@pytest.mark.parametrize("drop, kept", [("oldest", [6, 7]), ("newest", [0, 1])])
def test_bounded_queue_drops_by_policy(cold_model, layout, drop, kept):
    with FileMapping(cold_model) as fm, PrefetchEngine(
            cold_model, layout, queue_depth=1, max_queue=2, drop=drop) as eng:
        eng.request(1, range(8))  # one call holds the lock: workers take nothing meanwhile
        assert eng.wait_idle()
        c = eng.stats().counters
        if drop == "oldest":
            assert (c.issued, c.dropped_full, c.refused_full, c.completed) == (8, 6, 0, 2)
        else:
            assert (c.issued, c.dropped_full, c.refused_full, c.completed) == (2, 0, 6, 2)
        assert not eng.stats().unbalanced()
        assert wait_resident(fm, layout, [(1, e) for e in kept]) == 1.0
        gone = [e for e in range(8) if e not in kept and abs(e - kept[0]) > 1
                and abs(e - kept[-1]) > 1]
        for e in gone:
            assert inner_resident(fm, layout, 1, e) == 0.0


def test_requests_for_passed_layers_are_dropped(cold_model, layout):
    with PrefetchEngine(cold_model, layout, queue_depth=1) as eng:
        eng.advance(2)
        eng.request(1, [0, 1])  # layer 1 already passed in this token
        eng.request(1, [2], next_token=True)  # ... but wanted for the next token: kept
        eng.request(3, range(8))
        eng.advance(3)  # fine: layer 3 is now, nothing stale
        eng.advance(0)  # new token; layer-3 jobs of the old token still queued are stale
        assert eng.wait_idle()
        c = eng.stats().counters
    assert (c.requests, c.refused_stale, c.issued) == (11, 2, 9)
    # layer-3 jobs still queued or in flight at the token boundary were stopped
    assert c.dropped_stale >= 1
    assert c.completed + c.dropped_stale == c.issued


def test_used_late_wasted_and_misses(cold_model, layout):
    with PrefetchEngine(cold_model, layout, queue_depth=1) as eng:
        eng.advance(0)
        eng.request(0, [1, 2])
        assert eng.wait_idle()
        eng.on_use(0, [1, 3])  # 1: prefetched in time; 3: never requested
        eng.request(1, range(8))
        eng.on_use(1, [7])  # still queued behind 7 others on one worker: late
        eng.advance(2)  # expert (0, 2) was never used: wasted
        assert eng.wait_idle()
        assert wait_until(lambda: eng.stats().queue_samples.shape[0] > 2)
        st = eng.stats()
    c = st.counters
    assert (c.uses, c.hits, c.misses, c.late) == (3, 1, 1, 1)
    assert c.spec_unused >= 1 and c.wasted_bytes >= layout.bytes_per_expert()
    assert not st.unbalanced()
    assert st.hit_rate == pytest.approx(1 / 3)
    assert st.latency_ms.size == c.completed
    assert (st.latency_ms >= st.service_ms).all()
    assert st.queue_samples.shape[1] == 3 and st.queue_samples.shape[0] > 0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_close_with_requests_in_flight_joins_every_thread(cold_model, layout, method):
    eng = PrefetchEngine(cold_model, layout, method=method, queue_depth=4,
                         chunk_bytes=1 << 14).start()
    assert all(t.is_alive() for t in eng.threads)
    for layer in layout.moe_layers:
        eng.request(layer, range(layout.n_expert))
    eng.close()
    assert not any(t.is_alive() for t in eng.threads)
    c = eng.stats().counters
    # every issued job either completed, was cancelled mid-read, or was still queued
    assert c.completed + c.cancelled <= c.issued == 32
    eng.request(0, [1])  # after close: ignored, no exception
    eng.close()  # idempotent


@pytest.mark.parametrize("method", ALL_METHODS)
def test_truncated_file_disables_prefetch_without_raising(model_copy, method, caplog):
    layout = read_layout(model_copy)
    last = layout.moe_layers[-1]
    # watch_interval long: the worker's short read (not the monitor) must notice
    with PrefetchEngine(model_copy, layout, method=method, queue_depth=2,
                        watch_interval=3600) as eng:
        eng.request(0, [0])
        assert eng.wait_idle()
        os.truncate(model_copy, int(layout.offsets[0, 0, 0]) + 1)
        with caplog.at_level(logging.WARNING, logger="expertpred.prefetch"):
            eng.request(last, range(layout.n_expert))
            assert wait_until(lambda: not eng.enabled)
        eng.request(last, [0])  # disabled: counted, never raised
        eng.on_use(last, [0, 1])
        st = eng.stats()
    assert not st.enabled and "truncated" in st.disabled_reason
    assert st.counters.failed >= 1
    assert st.counters.refused_disabled >= 1
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert not any(t.is_alive() for t in eng.threads)


def test_monitor_notices_truncation(model_copy):
    layout = read_layout(model_copy)
    with PrefetchEngine(model_copy, layout, watch_interval=0.01) as eng:
        os.truncate(model_copy, layout.file_size // 2)
        assert wait_until(lambda: not eng.enabled)
        assert "size changed" in eng.disabled_reason


def test_replaced_file_disables_prefetch(model_copy, model_file, tmp_path):
    layout = read_layout(model_copy)
    with PrefetchEngine(model_copy, layout, watch_interval=0.01) as eng:
        eng.request(0, [0, 1])
        other = tmp_path / "new.gguf"
        shutil.copyfile(model_file, other)
        os.replace(other, model_copy)  # same size and content, different file
        assert wait_until(lambda: not eng.enabled)
        assert "replaced" in eng.disabled_reason
        eng.request(1, [0])
        c = eng.stats().counters
    assert c.refused_disabled >= 1


def test_layout_of_another_file_is_a_one_line_error(model_copy, layout):
    with open(model_copy, "ab") as f:
        f.write(b"\0" * 10)
    eng = PrefetchEngine(model_copy, layout)
    with pytest.raises(ExpertPredError, match=r"file has \d+ bytes, expected \d+ from its layout"):
        eng.start()
    assert not eng.threads


def test_invalid_keys_are_counted_not_raised(cold_model, layout):
    with PrefetchEngine(cold_model, layout) as eng:
        eng.request(99, [0])
        eng.request(0, [99])
        c = eng.stats().counters
    assert c.invalid == 2 and c.issued == 0


def test_posted_records_apply_in_order_on_the_dispatcher(cold_model, layout):
    with PrefetchEngine(cold_model, layout, queue_depth=1) as eng:
        eng.post_use(2, [0])  # advance(2) + on_use (a miss) + d0 request of expert 0
        eng.post_request(1, [1])  # layer 1 already passed: stale
        eng.post_request(1, [2], next_token=True)  # for the next token: kept
        eng.post_request(3, [3, 4])
        assert eng.flush()
        assert eng.wait_idle()
        c = eng.stats().counters
        assert [t.name for t in eng.threads].count("prefetch-dispatch") == 1
    assert (c.posted, c.dropped_handoff) == (4, 0)
    assert (c.uses, c.misses) == (1, 1)
    assert (c.requests, c.issued, c.refused_stale) == (5, 4, 1)


def test_bounded_handoff_and_close(cold_model, layout):
    eng = PrefetchEngine(cold_model, layout, queue_depth=1, max_handoff=2).start()
    eng.close()  # stops the dispatcher; posting afterwards is a no-op
    eng.post_request(0, [0])
    assert eng.flush()
    release = threading.Event()
    seen: list[Op] = []

    def apply(op: Op) -> None:  # the first record blocks the dispatcher
        seen.append(op)
        release.wait(10)

    h = Handoff(apply, capacity=2).start()
    assert h.post(Op(OpKind.REQUEST, 0, [0], False, 0))
    assert wait_until(lambda: len(seen) == 1)
    posted = [h.post(Op(OpKind.REQUEST, 0, [e], False, 0)) for e in range(1, 5)]
    assert posted == [True, True, False, False] and (h.posted, h.refused) == (3, 2)
    assert not h.flush(0.2)  # the dispatcher is stuck: bounded wait, False
    release.set()
    assert h.flush(5.0) and [op.experts for op in seen] == [[0], [1], [2]]
    h.stop()
    h.thread.join(5.0)
    assert not h.alive


def test_close_cancels_queued_jobs_and_ledgers_balance(cold_model, layout):
    eng = PrefetchEngine(cold_model, layout, queue_depth=1, chunk_bytes=1 << 14).start()
    for layer in layout.moe_layers:
        eng.request(layer, range(layout.n_expert))
    eng.close()
    st = eng.stats()
    assert st.pending == 0 and st.spec_pending == 0
    assert st.counters.cancelled >= 1
    assert not st.unbalanced(), st.ledgers()
