"""The prefetch engine's bookkeeping: jobs, priorities, and counters that add up.

:class:`JobBook` is everything the engine's lock guards, with no threads and no I/O: it
decides which chunk a worker reads next and accounts every request, job, use and byte.
The engine (:mod:`.engine`) calls it under its lock; tests can drive it directly.

Every counter belongs to exactly one ledger, and each ledger balances at any snapshot
(:meth:`PrefetchStats.ledgers`):

- requests: ``requests = issued + coalesced + refused_stale + refused_failed +
  refused_disabled + refused_full + invalid`` (what happened to each (layer, expert) pair
  passed to ``request``);
- jobs: ``issued = completed + failed + cancelled + dropped_stale + dropped_full +
  dropped_disabled + pending`` (how each job ended; ``pending`` = queued + in flight);
- uses: ``uses = hits + late + misses``;
- speculative jobs: ``spec_issued = spec_used + spec_unused + spec_pending``; each
  speculative job is judged once, *used* if its expert was used before its target
  (token, layer) passed, else *unused*; ``wasted_bytes`` are the bytes read (or advised)
  for unused ones;
- bytes: ``bytes_read = demand_bytes + spec_bytes``.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

Key = tuple[int, int]  # (layer, expert)
Target = tuple[int, int]  # (token, layer): when a prefetch is needed
Ranges = tuple[tuple[int, int], ...]  # absolute (offset, nbytes) file ranges


class Priority(enum.IntEnum):
    """Which reads go first. Lower value = taken first by the workers."""

    DEMAND = 0  # the current layer's routed experts (d0): the compute waits on them
    SPECULATIVE = 1  # predicted / oracle experts of layers ahead


class JobState(enum.Enum):
    QUEUED = "queued"  # not started
    INFLIGHT = "inflight"  # some chunks handed to workers
    RESIDENT = "resident"  # every chunk read (or advised)
    FAILED = "failed"  # an I/O error; the key is never requested again
    CANCELLED = "cancelled"  # abandoned at close()
    DROPPED = "dropped"  # stopped before completion (see DropReason)


class Outcome(enum.Enum):
    """The one judgement of a speculative job."""

    PENDING = "pending"
    USED = "used"  # its expert was used before its target passed
    UNUSED = "unused"  # its target passed (or it ended) without a use
    NOT_SPECULATIVE = "demand"  # issued as a demand read: never judged


class DropReason(enum.Enum):
    STALE = "stale"  # its (token, layer) target passed
    FULL = "full"  # pushed out of a full queue
    DISABLED = "disabled"  # prefetching was disabled


class DropPolicy(enum.StrEnum):
    """What a full queue gives up (speculative jobs always go before demand ones)."""

    OLDEST = "oldest"  # the oldest queued job: nearest target, least likely to be in time
    NEWEST = "newest"  # refuse the new job


@dataclass(eq=False)
class Job:
    """One (layer, expert) prefetch and its life in the engine."""

    key: Key
    ranges: Ranges
    target: Target
    priority: Priority
    t_request: int  # monotonic ns
    outcome: Outcome
    t_start: int = 0
    state: JobState = JobState.QUEUED
    chunks: deque[tuple[int, int]] = field(default_factory=deque)  # not yet handed out
    outstanding: int = 0  # chunks handed to workers, not finished
    nbytes: int = 0
    error: BaseException | None = None
    stop: DropReason | None = None  # set when stopped while chunks were in flight


@dataclass
class PrefetchCounters:
    """Event counts since ``start()``; the ledgers they form are in the module docstring."""

    requests: int = 0  # (layer, expert) pairs passed to request()
    issued: int = 0  # new jobs
    coalesced: int = 0  # merged into a queued / in-flight / resident job (no new I/O)
    promoted: int = 0  # of coalesced: a demand request that raised a speculative job
    refused_stale: int = 0  # requested layer already passed in this token
    refused_failed: int = 0  # expert whose read failed before
    refused_disabled: int = 0  # requests while prefetching is disabled
    refused_full: int = 0  # queue full, drop policy "newest"
    invalid: int = 0  # layer / expert not in the layout
    completed: int = 0  # jobs whose reads finished (or hints were issued)
    failed: int = 0  # jobs that ended with an I/O error
    cancelled: int = 0  # jobs abandoned at close()
    dropped_stale: int = 0  # jobs stopped because their target passed
    dropped_full: int = 0  # queued jobs pushed out of a full queue (policy "oldest")
    dropped_disabled: int = 0  # queued jobs dropped when prefetching was disabled
    uses: int = 0  # experts passed to on_use()
    hits: int = 0  # uses of a prefetch that was complete (and resident) in time
    late: int = 0  # uses of a prefetch still queued / in flight / not yet resident
    misses: int = 0  # uses of an expert the engine had no job for
    spec_issued: int = 0  # jobs issued as speculative
    spec_used: int = 0  # speculative jobs whose expert was used before their target passed
    spec_unused: int = 0  # speculative jobs judged unused
    bytes_read: int = 0  # bytes read (pread / io_uring) or advised (fadvise / madvise)
    demand_bytes: int = 0  # of bytes_read: chunks of demand jobs
    spec_bytes: int = 0  # of bytes_read: chunks of jobs issued as speculative
    wasted_bytes: int = 0  # of spec_bytes: chunks of jobs judged unused
    evicted: int = 0  # resident jobs evicted by a residency manager (forget / admit)
    posted: int = 0  # records posted to the dispatcher (post_use / post_request)
    dropped_handoff: int = 0  # records refused because the handoff was full


@dataclass(frozen=True)
class PrefetchStats:
    """A snapshot of the engine's counters, latencies and queue-depth samples."""

    method: str  # I/O method name
    queue_depth: int  # the method's queue depth
    enabled: bool  # False once disabled (file changed, errors)
    disabled_reason: str  # why, or ""
    counters: PrefetchCounters  # a copy
    pending: int  # jobs queued or in flight at the snapshot (the jobs ledger's rest)
    spec_pending: int  # speculative jobs not judged yet (the speculative ledger's rest)
    latency_ms: np.ndarray  # request (posted) -> completion, per completed job (recent)
    service_ms: np.ndarray  # start of the read -> completion
    latency_priority: np.ndarray  # int8 Priority of each latency row
    queue_samples: np.ndarray  # (n, 3): seconds since start, queued, in flight

    @property
    def hit_rate(self) -> float:
        """Share of uses served by a prefetch that was complete in time."""
        c = self.counters
        return c.hits / c.uses if c.uses else 0.0

    def ledgers(self) -> dict[str, tuple[int, int]]:
        """Each ledger's (left side, sum of the right side); equal when it balances."""
        c = self.counters
        return {
            "requests": (c.requests, c.issued + c.coalesced + c.refused_stale
                         + c.refused_failed + c.refused_disabled + c.refused_full + c.invalid),
            "jobs": (c.issued, c.completed + c.failed + c.cancelled + c.dropped_stale
                     + c.dropped_full + c.dropped_disabled + self.pending),
            "uses": (c.uses, c.hits + c.late + c.misses),
            "speculative": (c.spec_issued, c.spec_used + c.spec_unused + self.spec_pending),
            "bytes": (c.bytes_read, c.demand_bytes + c.spec_bytes),
        }

    def unbalanced(self) -> dict[str, tuple[int, int]]:
        """The ledgers that do not balance (empty when all do)."""
        return {k: v for k, v in self.ledgers().items() if v[0] != v[1]}

    def latency_percentiles(self, qs: Iterable[float] = (50, 90, 99),
                            priority: Priority | None = None) -> dict[str, float]:
        """Percentiles of request -> completion (ms), of one priority's jobs if given."""
        lat = self.latency_ms
        if priority is not None:
            lat = lat[self.latency_priority == int(priority)]
        if not lat.size:
            return {}
        return {f"p{q:g}": float(np.percentile(lat, q)) for q in qs}

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"method": self.method, "queue_depth": self.queue_depth,
                                "enabled": self.enabled, "disabled_reason": self.disabled_reason,
                                "pending": self.pending, "spec_pending": self.spec_pending}
        d.update(dataclasses.asdict(self.counters))
        d["hit_rate"] = self.hit_rate
        d.update({f"latency_{k}_ms": v for k, v in self.latency_percentiles().items()})
        d.update({f"demand_latency_{k}_ms": v for k, v in
                  self.latency_percentiles(priority=Priority.DEMAND).items()})
        if self.queue_samples.size:
            d["mean_queued"] = float(self.queue_samples[:, 1].mean())
            d["mean_inflight"] = float(self.queue_samples[:, 2].mean())
        return d


class Ring:
    """A fixed-size ring of float rows (latencies, queue samples): bounded memory."""

    def __init__(self, capacity: int, width: int) -> None:
        self.data = np.zeros((capacity, width), dtype=np.float64)
        self.n = 0

    def add(self, *row: float) -> None:
        self.data[self.n % len(self.data)] = row
        self.n += 1

    def snapshot(self) -> np.ndarray:
        if self.n <= len(self.data):
            return self.data[: self.n].copy()
        i = self.n % len(self.data)
        return np.concatenate([self.data[i:], self.data[:i]])


Chunker = Callable[[Ranges], Sequence[tuple[int, int]]]
ResidentCheck = Callable[[Job], bool]


class JobBook:
    """Queues by priority, in-flight and resident jobs, the (token, layer) clock, counters.

    Not thread-safe: the engine holds its lock around every call.
    """

    def __init__(self, ranges: dict[Key, Ranges], chunker: Chunker, max_queue: int,
                 drop: DropPolicy) -> None:
        self.ranges = ranges
        self.chunker = chunker
        self.max_queue = max_queue
        self.drop = drop
        self.c = PrefetchCounters()
        self.queues: dict[Priority, OrderedDict[Key, Job]] = {p: OrderedDict() for p in Priority}
        self.active: dict[Priority, deque[Job]] = {p: deque() for p in Priority}  # chunks left
        self.inflight: dict[Key, Job] = {}  # started, not finished
        self.resident: dict[Key, Job] = {}
        self.failed: set[Key] = set()
        self._judge: list[tuple[Target, int, Job]] = []  # heap of speculative targets
        self._seq = itertools.count()
        self.token = 0
        self.layer = -1

    # --- views -----------------------------------------------------------------------
    @property
    def now(self) -> Target:
        return (self.token, self.layer)

    def n_queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def queued(self, key: Key) -> Job | None:
        for q in self.queues.values():
            if key in q:
                return q[key]
        return None

    def spec_pending(self) -> int:
        jobs = itertools.chain(*(q.values() for q in self.queues.values()),
                               self.inflight.values(), self.resident.values())
        return sum(j.outcome is Outcome.PENDING for j in jobs)

    # --- requests ----------------------------------------------------------------------
    def request(self, layer: int, experts: Sequence[int], next_token: bool,
                priority: Priority, now_ns: int, disabled: bool,
                looks_resident: ResidentCheck) -> int:
        """Account a request; returns the number of new jobs queued."""
        c = self.c
        c.requests += len(experts)
        if disabled:
            c.refused_disabled += len(experts)
            return 0
        if next_token:
            target = (self.token + 1, layer)
        elif layer < self.layer:
            c.refused_stale += len(experts)
            return 0
        else:
            target = (self.token, layer)
        new = 0
        for e in experts:
            key = (layer, e)
            ranges = self.ranges.get(key)
            if self._settled(key, ranges, target, priority):
                continue
            elif (priority is Priority.SPECULATIVE and (job := self.resident.get(key))
                  is not None and looks_resident(job)):
                c.coalesced += 1  # demand never trusts the sampled check: read it again
                self._retarget(job, target, priority)
            else:
                if key in self.resident:  # completed once, evicted (maybe in part) since
                    self._unresident(key)
                new += self._issue(Job(key, ranges, target, priority, now_ns,
                                       Outcome.PENDING if priority is Priority.SPECULATIVE
                                       else Outcome.NOT_SPECULATIVE))
        return new

    def hinted(self, layer: int, experts: Sequence[int], cached: Sequence[bool],
               t_post: int, t_done: int) -> list[Job]:
        """The caller already hinted the experts of the current layer: account them as
        demand jobs issued and completed (no queue), except those that looked ``cached``
        and were resident from an earlier job (coalesced). Returns the new jobs."""
        c, target, new = self.c, (self.token, layer), []
        c.requests += len(experts)
        for e, was_cached in zip(experts, cached):
            key = (layer, e)
            ranges = self.ranges.get(key)
            if self._settled(key, ranges, target, Priority.DEMAND):
                continue  # a queued / in-flight job: the hint only doubled the request
            elif was_cached and key in self.resident:
                c.coalesced += 1
            else:
                if key in self.resident:  # completed once, evicted since: read again
                    self._unresident(key)
                job = Job(key, ranges, target, Priority.DEMAND, t_post,
                          Outcome.NOT_SPECULATIVE, t_start=t_post, state=JobState.RESIDENT)
                job.nbytes = sum(n for _, n in ranges)
                c.issued += 1
                c.completed += 1
                c.bytes_read += job.nbytes
                c.demand_bytes += job.nbytes
                self.resident[key] = job
                new.append(job)
        return new

    def _settled(self, key: tuple[int, int], ranges: Ranges | None, target: tuple[int, int],
                 priority: Priority) -> bool:
        """Account a requested expert that needs no new job: not in the layout, failed
        before, or already queued / in flight (then retargeted). The request and hint paths
        share these outcomes; True when one applied."""
        c = self.c
        if ranges is None:
            c.invalid += 1
        elif key in self.failed:
            c.refused_failed += 1
        elif (job := self.queued(key) or self.inflight.get(key)) is not None:
            c.coalesced += 1
            self._retarget(job, target, priority)
        else:
            return False
        return True

    def _issue(self, job: Job) -> int:
        c = self.c
        if self.n_queued() >= self.max_queue:
            spec = self.queues[Priority.SPECULATIVE]
            if spec and (self.drop is DropPolicy.OLDEST or job.priority is Priority.DEMAND):
                self._drop(spec.popitem(last=False)[1], DropReason.FULL)
            elif self.drop is DropPolicy.OLDEST:
                self._drop(self.queues[Priority.DEMAND].popitem(last=False)[1],
                           DropReason.FULL)
            else:
                c.refused_full += 1
                return 0
        self.queues[job.priority][job.key] = job
        c.issued += 1
        if job.priority is Priority.SPECULATIVE:
            c.spec_issued += 1
            heapq.heappush(self._judge, (job.target, next(self._seq), job))
        return 1

    def _retarget(self, job: Job, target: Target, priority: Priority) -> None:
        if target > job.target:
            job.target = target
            if job.outcome is Outcome.PENDING:
                heapq.heappush(self._judge, (target, next(self._seq), job))
        if priority < job.priority:  # a demand request for a speculative job: raise it
            self.c.promoted += 1
            if job.state is JobState.QUEUED:
                del self.queues[job.priority][job.key]
                self.queues[priority][job.key] = job
            elif job in self.active[job.priority]:
                self.active[job.priority].remove(job)
                self.active[priority].append(job)
            job.priority = priority

    # --- the clock ---------------------------------------------------------------------
    def advance(self, layer: int) -> None:
        """The computation reached ``layer``; a lower layer than before starts a new token.
        Jobs whose target passed are stopped; speculative ones are judged."""
        if layer < self.layer:
            self.token += 1
        self.layer = layer
        now = self.now
        for q in self.queues.values():
            for key in [k for k, j in q.items() if j.target < now]:
                self._drop(q.pop(key), DropReason.STALE)
        for p in Priority:
            for job in [j for j in self.active[p] if j.target < now]:
                self.active[p].remove(job)
                self._stop(job, DropReason.STALE)
        heap = self._judge
        while heap and heap[0][0] < now:
            target, _, job = heapq.heappop(heap)
            if job.outcome is Outcome.PENDING and job.target == target:
                self._judge_unused(job)

    # --- uses ----------------------------------------------------------------------------
    def use(self, layer: int, experts: Sequence[int], completes_reads: bool,
            looks_resident: ResidentCheck, cached: Sequence[bool] | None = None) -> None:
        """The router used ``experts`` of ``layer``: hits, late prefetches, misses.
        ``cached``: per expert, whether its pages were cached when the router chose it
        (checked by the caller before it hinted them); else checked now."""
        c = self.c
        for i, e in enumerate(experts):
            key = (layer, e)
            c.uses += 1
            job = self.queued(key) or self.inflight.get(key)
            if job is not None:
                c.late += 1  # kept: a demand request right after raises it, reads finish
            elif (job := self.resident.get(key)) is None:
                c.misses += 1
                continue
            elif completes_reads or (cached[i] if cached is not None else looks_resident(job)):
                c.hits += 1
            else:
                c.late += 1
            if job.outcome is Outcome.PENDING:
                job.outcome = Outcome.USED
                c.spec_used += 1

    def forget(self, key: Key) -> bool:
        """A residency manager evicted ``key``; True if it was resident here."""
        if key not in self.resident:
            return False
        self._unresident(key)
        self.c.evicted += 1
        return True

    # --- workers -------------------------------------------------------------------------
    def next_chunk(self, now_ns: int) -> tuple[Job, tuple[int, int], bool] | None:
        """(job, chunk, started): demand before speculative; within a priority, the
        started job first (all workers cooperate on the expert needed soonest), then the
        oldest queued one."""
        for p in Priority:
            active = self.active[p]
            while active and not active[0].chunks:
                active.popleft()
            started = False
            if not active and self.queues[p]:
                _, job = self.queues[p].popitem(last=False)
                job.state = JobState.INFLIGHT
                job.t_start = now_ns
                job.chunks = deque(self.chunker(job.ranges))
                self.inflight[job.key] = job
                active.append(job)
                started = True
            if active:
                job = active[0]
                job.outstanding += 1
                return job, job.chunks.popleft(), started
        return None

    def finish_chunk(self, job: Job, nbytes: int, error: BaseException | None,
                     cancelled: bool) -> JobState | None:
        """A worker finished one chunk; returns the job's final state once it ended."""
        c = self.c
        c.bytes_read += nbytes
        if job.outcome is Outcome.NOT_SPECULATIVE:
            c.demand_bytes += nbytes
        else:
            c.spec_bytes += nbytes
            if job.outcome is Outcome.UNUSED:
                c.wasted_bytes += nbytes
        job.nbytes += nbytes
        job.outstanding -= 1
        if error is not None:
            job.error = job.error or error
            job.chunks.clear()  # hand out no more chunks of a failed / cancelled job
        if job.outstanding or job.chunks:
            return None
        self.inflight.pop(job.key, None)
        # next_chunk only pops ended jobs off the head of a started list, and only when a
        # worker asks again: left there, advance() would stop (drop) this job a second time
        if job in self.active[job.priority]:
            self.active[job.priority].remove(job)
        if job.error is not None:
            if cancelled:
                self._end(job, JobState.CANCELLED)
                c.cancelled += 1
            else:
                self._end(job, JobState.FAILED)
                self.failed.add(job.key)
                c.failed += 1
        elif job.stop is not None:
            self._end(job, JobState.DROPPED)
            self._count_drop(job.stop)
        else:
            job.state = JobState.RESIDENT
            c.completed += 1
            self.resident[job.key] = job
            if job.outcome is Outcome.PENDING and job.target < self.now:
                self._judge_unused(job)  # finished after its layer passed, unused
        return job.state

    # --- endings -----------------------------------------------------------------------
    def drop_all(self, reason: DropReason) -> None:
        """Drop every queued job (prefetching disabled)."""
        for q in self.queues.values():
            while q:
                self._drop(q.popitem(last=False)[1], reason)

    def cancel_all(self) -> None:
        """close(): queued and started jobs no worker will finish."""
        for q in self.queues.values():
            while q:
                job = q.popitem(last=False)[1]
                self._end(job, JobState.CANCELLED)
                self.c.cancelled += 1
        for job in list(self.inflight.values()):
            self._end(job, JobState.CANCELLED)
            self.c.cancelled += 1
        self.inflight.clear()
        for a in self.active.values():
            a.clear()

    def _drop(self, job: Job, reason: DropReason) -> None:
        self._end(job, JobState.DROPPED)
        self._count_drop(reason)

    def _count_drop(self, reason: DropReason) -> None:
        if reason is DropReason.STALE:
            self.c.dropped_stale += 1
        elif reason is DropReason.FULL:
            self.c.dropped_full += 1
        else:
            self.c.dropped_disabled += 1

    def _stop(self, job: Job, reason: DropReason) -> None:
        """Stop a started job: no more chunks; it ends when its outstanding ones finish."""
        job.chunks.clear()
        job.stop = reason
        if job.outcome is Outcome.PENDING:
            self._judge_unused(job)
        if not job.outstanding:
            self.inflight.pop(job.key, None)
            self._drop(job, reason)

    def _end(self, job: Job, state: JobState) -> None:
        job.state = state
        if job.outcome is Outcome.PENDING:
            self._judge_unused(job)

    def _unresident(self, key: Key) -> None:
        job = self.resident.pop(key)
        if job.outcome is Outcome.PENDING:  # evicted before its use
            self._judge_unused(job)

    def _judge_unused(self, job: Job) -> None:
        job.outcome = Outcome.UNUSED
        self.c.spec_unused += 1
        self.c.wasted_bytes += job.nbytes
