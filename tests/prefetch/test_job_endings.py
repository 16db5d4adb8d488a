"""JobBook: each job ends exactly once, whatever the order of worker finishes and clock
advances (the jobs ledger counts every ending, so a second ending unbalances it)."""

from __future__ import annotations

from expertpred.prefetch.jobs import JobState

from .test_jobs import book, req, run_chunk, snapshot


def test_a_job_that_finished_is_not_dropped_when_its_target_passes_later():
    # A worker reads both chunks of a speculative job (it ends: completed, resident) and
    # no worker asks for a chunk again, so nothing else touches the job; then the
    # computation passes the job's layer. The finished job must not also be stopped.
    b = book()
    b.advance(0)
    req(b, 1, [0])
    job = run_chunk(b)
    assert run_chunk(b) is job and job.state is JobState.RESIDENT
    b.advance(2)  # the job's target (token 0, layer 1) passed
    st = snapshot(b)
    assert job.state is JobState.RESIDENT and b.resident[job.key] is job
    assert (st.counters.completed, st.counters.dropped_stale) == (1, 0)
    assert not st.unbalanced(), st.ledgers()


def test_a_job_that_failed_is_not_dropped_when_its_target_passes_later():
    # The same race with a read error: the job ends failed, then its layer passes.
    b = book()
    b.advance(0)
    req(b, 1, [0])
    job, _, _ = b.next_chunk(0)
    assert b.finish_chunk(job, 0, OSError("EIO"), False) is JobState.FAILED
    b.advance(2)
    st = snapshot(b)
    assert job.state is JobState.FAILED
    assert (st.counters.failed, st.counters.dropped_stale) == (1, 0)
    assert not st.unbalanced(), st.ledgers()


def test_a_job_stopped_with_chunks_in_flight_ends_once_when_they_finish():
    # Two workers hold both chunks when the layer passes: the job is stopped, and ends
    # (dropped stale) only when the last chunk finishes, not also when it is stopped.
    b = book()
    b.advance(0)
    req(b, 1, [0])
    job, (_, n1), _ = b.next_chunk(0)
    again, (_, n2), _ = b.next_chunk(0)
    assert again is job and not job.chunks and job.outstanding == 2
    b.advance(2)
    assert b.finish_chunk(job, n1, None, False) is None
    assert b.finish_chunk(job, n2, None, False) is JobState.DROPPED
    b.advance(3)
    st = snapshot(b)
    assert (st.counters.completed, st.counters.dropped_stale) == (0, 1)
    assert not st.unbalanced(), st.ledgers()
