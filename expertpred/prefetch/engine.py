"""The prefetch engine: turns "expert e of layer L will be needed" into page-cache reads.

``PrefetchEngine`` owns its worker threads (``start`` / ``close`` / ``with``). The
inference thread only calls cheap, non-blocking bookkeeping methods:

- ``request(layer, experts, current_layer=None, next_token=False)``: predicted experts.
  Each (layer, expert) becomes one job whose byte ranges come from the layout. A job that
  is already queued, in flight or resident is *coalesced* (no new I/O). A request for a
  layer the computation has already passed is *dropped* (``dropped_stale``) unless
  ``next_token=True`` says it is for the next token's pass over that layer.
- ``advance(layer)``: the computation reached ``layer``; a layer lower than the previous
  one starts a new token. Queued jobs whose (token, layer) is now in the past are dropped,
  completed prefetches whose target passed without a use are counted *wasted*.
- ``on_use(layer, experts)`` (alias ``touch(layer, expert)``): the router chose these
  experts. Each use is counted *used* (prefetch complete in time: a hit), *late* (queued
  or in flight — a queued one is removed, the page fault will read it anyway) or a *miss*.
  For hint methods (fadvise / madvise) "complete" is checked with ``mincore``.

The queue is bounded (``max_queue``). ``drop="oldest"`` (default) discards the oldest
queued job when a new one arrives at a full queue: the oldest targets the nearest layer,
is the least likely to finish before it is needed, and the newest predictions are the
freshest. ``drop="newest"`` refuses the new job instead. Jobs start in FIFO order and a
started job is cut into ``chunk_bytes`` pieces that *all* workers take before the next job
starts, so the expert needed soonest completes first and one expert gets the whole queue
depth. For the hint methods (fadvise / madvise) a job "completes" when its hints are
issued: their latencies are issue times, and whether the pages arrived is judged by
``mincore`` when the expert is used.

Failure handling: an I/O error (EIO, a short read because the file was truncated, ...)
marks that expert failed (never retried), is counted and logged, and never reaches the
caller's thread. A short read, ``max_errors`` errors, or the monitor thread seeing the file
truncated or replaced (``stat(path)`` inode differs from the open descriptor's) disables
prefetching: the queue is dropped, workers exit, and further requests are counted
``dropped_disabled``. ``close()`` is bounded: reads are chunked and workers check a stop
flag between chunks.

Off the caller's thread: ``post_use(layer, experts)`` (``advance`` + ``on_use`` +
``request`` of the same experts: d0) and ``post_request(layer, experts, next_token)`` only
append a small record to a ``collections.deque`` and wake the engine's dispatcher thread,
which applies them in order (the lock, the bookkeeping and the job creation happen there).
The handoff is bounded (``max_handoff`` records; more are counted ``dropped_handoff``).
``flush(timeout)`` waits until the dispatcher has applied everything posted so far.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import MoELayout
from .io import DEFAULT_CHUNK_BYTES, Cancelled, IOMethod, ShortReadError, make_method
from .sysmem import PAGE_SIZE, FileMapping

if TYPE_CHECKING:
    from .buffer import BufferManager

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)
Target = tuple[int, int]  # (token, layer): when a prefetch is needed


@dataclass(eq=False)
class _Job:
    """One (layer, expert) prefetch: its ranges and its life in the engine."""

    key: Key
    ranges: tuple[tuple[int, int], ...]
    target: Target
    t_request: int  # monotonic ns
    t_start: int = 0
    state: str = "queued"  # queued -> inflight -> resident | failed | cancelled
    used: bool = False  # a use was accounted against this job's current target
    judged: bool = False  # used / wasted already decided for the current target
    chunks: deque[tuple[int, int]] = field(default_factory=deque)  # not yet handed out
    outstanding: int = 0  # chunks handed to workers, not finished
    nbytes: int = 0
    error: BaseException | None = None


class _Task(NamedTuple):
    """One chunk of a job, as handed to an I/O method's worker (``io.Fetch``)."""

    job: _Job
    ranges: tuple[tuple[int, int], ...]


@dataclass
class PrefetchCounters:
    """Event counts since ``start()``. Copied into each :class:`PrefetchStats`."""

    requests: int = 0  # (layer, expert) pairs passed to request()
    issued: int = 0  # jobs queued for I/O
    coalesced: int = 0  # requests merged into a queued / in-flight / resident job
    dropped_stale: int = 0  # requested layer already passed, or passed while queued
    dropped_full: int = 0  # queue full (see ``drop``)
    dropped_failed: int = 0  # expert whose range failed before
    dropped_disabled: int = 0  # requests while disabled, plus the queue dropped on disable
    invalid: int = 0  # layer / expert not in the layout
    completed: int = 0  # jobs whose reads finished (or hints were issued)
    cancelled: int = 0  # jobs abandoned at close()
    errors: int = 0  # jobs that failed with an I/O error
    bytes_read: int = 0  # bytes read (pread / io_uring) or advised (fadvise / madvise)
    uses: int = 0  # experts passed to on_use()
    used: int = 0  # uses of a prefetch that was complete (and resident) in time: hits
    late: int = 0  # uses of a prefetch still queued / in flight / not yet resident
    misses: int = 0  # uses of an expert never requested
    wasted: int = 0  # completed prefetches whose target passed without a use
    evicted: int = 0  # resident prefetches evicted by the buffer manager
    posted: int = 0  # records posted to the dispatcher (post_use / post_request)
    dropped_handoff: int = 0  # records refused because the handoff was full


@dataclass(frozen=True)
class PrefetchStats:
    """A snapshot of the engine's counters, latencies and queue-depth samples."""

    method: str
    queue_depth: int
    enabled: bool
    disabled_reason: str
    counters: PrefetchCounters
    latency_ms: np.ndarray  # request -> completion, per completed job (recent, bounded)
    service_ms: np.ndarray  # start of the read -> completion
    queue_samples: np.ndarray  # (n, 3): seconds since start, queued, in flight

    @property
    def hit_rate(self) -> float:
        """Share of uses served by a prefetch that was complete in time."""
        c = self.counters
        return c.used / c.uses if c.uses else 0.0

    def latency_percentiles(self, qs: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
        if not self.latency_ms.size:
            return {}
        return {f"p{q:g}": float(np.percentile(self.latency_ms, q)) for q in qs}

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"method": self.method, "queue_depth": self.queue_depth,
                                "enabled": self.enabled, "disabled_reason": self.disabled_reason}
        d.update(dataclasses.asdict(self.counters))
        d["hit_rate"] = self.hit_rate
        d.update({f"latency_{k}_ms": v for k, v in self.latency_percentiles().items()})
        if self.queue_samples.size:
            d["mean_queued"] = float(self.queue_samples[:, 1].mean())
            d["mean_inflight"] = float(self.queue_samples[:, 2].mean())
        return d


class _Ring:
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


class _Source:
    """The engine as seen by an I/O method's worker (see ``io.WorkSource``)."""

    def __init__(self, engine: PrefetchEngine) -> None:
        self._engine = engine

    @property
    def stopping(self) -> bool:
        return self._engine._stopping()

    def take(self, timeout: float) -> _Task | None:
        return self._engine._take(timeout)

    def finish(self, item: object, nbytes: int, error: BaseException | None) -> None:
        assert isinstance(item, _Task)
        self._engine._finish(item, nbytes, error)


@dataclass
class _State:
    """Everything guarded by the engine's lock."""

    queue: OrderedDict[Key, _Job] = field(default_factory=OrderedDict)  # not started
    active: deque[_Job] = field(default_factory=deque)  # started, chunks left to hand out
    inflight: dict[Key, _Job] = field(default_factory=dict)  # started, not finished
    resident: dict[Key, _Job] = field(default_factory=dict)
    failed: set[Key] = field(default_factory=set)
    pending_judgement: list[tuple[Target, int, _Job]] = field(default_factory=list)  # heap
    token: int = 0
    layer: int = -1


class PrefetchEngine:
    """Background prefetch of expert weights into the page cache (see module docstring).

    ``buffer``: an optional :class:`~expertpred.prefetch.buffer.BufferManager`; each job is
    admitted to it before its read (which may evict other experts) and uses touch it.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        layout: MoELayout,
        method: str = "pread",
        queue_depth: int = 4,
        max_queue: int = 256,
        drop: str = "oldest",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        readahead: bool = False,
        max_errors: int = 8,
        sample_interval: float = 0.005,
        watch_interval: float = 0.05,
        buffer: BufferManager | None = None,
        history: int = 1 << 16,
        max_handoff: int = 4096,
    ) -> None:
        self.gguf_path = gguf_path
        self.layout = layout
        self.method = method
        self.queue_depth = queue_depth
        self.max_queue = max_queue
        self.drop = drop
        self.chunk_bytes = chunk_bytes
        self.readahead = readahead
        self.max_errors = max_errors
        self.sample_interval = sample_interval
        self.watch_interval = watch_interval
        self.buffer = buffer
        self.history = history
        self.max_handoff = max_handoff
        self._threads: list[threading.Thread] = []
        self._started = False

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> PrefetchEngine:
        """Open the file, check it matches the layout, start the workers and the monitor."""
        if self._started:
            raise RuntimeError("PrefetchEngine.start() called twice")
        if self.drop not in ("oldest", "newest"):
            raise ExpertPredError(f"drop={self.drop!r}: expected 'oldest' or 'newest'")
        if self.max_queue < 1:
            raise ExpertPredError(f"max_queue={self.max_queue}: expected an integer >= 1")
        path = os.fspath(self.gguf_path)
        self.io_: IOMethod = make_method(self.method, path, self.queue_depth, self.chunk_bytes,
                                         self.readahead)
        self.io_.open()
        st = os.fstat(self.io_.fd)
        if st.st_size != self.layout.file_size:
            self.io_.close()
            raise ExpertPredError(
                f"{path}: file has {st.st_size} bytes, expected {self.layout.file_size} "
                "from its layout (a different or modified file?)")
        self._identity = (st.st_dev, st.st_ino)
        try:
            self._map = FileMapping(path)  # for mincore checks; never read through
        except OSError:
            self.io_.close()
            raise
        self._ranges = self._build_ranges()
        self._lock = threading.Condition(threading.Lock())
        self._s = _State()
        self._c = PrefetchCounters()
        self._seq = itertools.count()
        self._lat = _Ring(self.history, 2)
        self._samples = _Ring(self.history, 3)
        self._stop = threading.Event()
        self._disabled = ""
        self._t0 = time.monotonic_ns()
        self._ops: deque[tuple[int, int, list[int], bool]] = deque()
        self._ops_wake = threading.Event()
        self._ops_busy = False
        source = _Source(self)
        for i in range(self.io_.n_workers()):
            t = threading.Thread(target=self._worker_main, args=(source,),
                                 name=f"prefetch-{self.method}-{i}", daemon=True)
            self._threads.append(t)
        self._threads.append(threading.Thread(target=self._monitor_main,
                                              name="prefetch-monitor", daemon=True))
        self._threads.append(threading.Thread(target=self._dispatch_main,
                                              name="prefetch-dispatch", daemon=True))
        self._started = True
        for t in self._threads:
            t.start()
        log.info("prefetch engine started: %s, queue depth %d, %d workers, %s",
                 self.method, self.queue_depth, len(self._threads) - 1, path)
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop the threads (bounded by ``timeout`` overall) and release the file."""
        if not self._started:
            return
        self._stop.set()
        self._ops_wake.set()
        with self._lock:
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        alive = []
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                alive.append(t.name)
        if alive:  # a read stuck in the kernel: keep its descriptor open rather than race it
            log.warning("prefetch threads still running after %.1fs: %s", timeout, alive)
        else:
            self.io_.close()
            with self._lock:  # jobs whose remaining chunks no worker will take now
                for job in self._s.inflight.values():
                    job.state = "cancelled"
                    self._c.cancelled += 1
                self._s.inflight.clear()
                self._s.active.clear()
        self._map.close()
        self._started = False

    def __enter__(self) -> PrefetchEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    @property
    def enabled(self) -> bool:
        return self._started and not self._disabled

    @property
    def disabled_reason(self) -> str:
        return self._disabled

    # --- caller API (non-blocking, never raises for I/O reasons) ---------------------
    _USE, _REQUEST = 0, 1

    def post_use(self, layer: int, experts: list[int]) -> None:
        """``advance(layer)``, ``on_use(layer, experts)``, ``request(layer, experts)``, applied
        by the dispatcher thread: the caller only appends to a deque."""
        self._post((self._USE, layer, experts, False))

    def post_request(self, layer: int, experts: list[int], next_token: bool = False) -> None:
        """``request(layer, experts, next_token=next_token)`` on the dispatcher thread."""
        self._post((self._REQUEST, layer, experts, next_token))

    def _post(self, op: tuple[int, int, list[int], bool]) -> None:
        if not self._started:
            return
        if len(self._ops) >= self.max_handoff:
            self._c.dropped_handoff += 1  # racy increment: a statistic only
            return
        self._c.posted += 1
        self._ops.append(op)
        self._ops_wake.set()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every posted record has been applied; False on timeout."""
        if not self._started:
            return True
        deadline = time.monotonic() + timeout
        while self._ops or self._ops_busy:
            if time.monotonic() >= deadline or not self._dispatcher_alive():
                return False
            time.sleep(0.0005)
        return True

    def _dispatcher_alive(self) -> bool:
        return any(t.name == "prefetch-dispatch" and t.is_alive() for t in self._threads)

    def _dispatch_main(self) -> None:
        ops = self._ops
        while True:
            self._ops_wake.wait(0.05)
            self._ops_wake.clear()
            if self._stop.is_set():
                return
            while ops:
                self._ops_busy = True
                try:
                    kind, layer, experts, nxt = ops.popleft()
                except IndexError:
                    break
                try:
                    if kind == self._USE:
                        self.advance(layer)
                        self.on_use(layer, experts)
                        self.request(layer, experts)
                    else:
                        self.request(layer, experts, next_token=nxt)
                except Exception:  # noqa: BLE001 - the dispatcher must survive
                    log.exception("prefetch: dispatching a posted record failed")
                finally:
                    self._ops_busy = False
                if self._stop.is_set():
                    return

    def request(self, layer: int, experts: Iterable[int], current_layer: int | None = None,
                next_token: bool = False) -> None:
        """Queue prefetches of ``experts`` of ``layer`` (see module docstring)."""
        experts = [int(e) for e in experts]
        if current_layer is not None:
            self.advance(current_layer)
        if not self._started:
            return
        notify = 0
        with self._lock:
            s, c = self._s, self._c
            c.requests += len(experts)
            if self._disabled:
                c.dropped_disabled += len(experts)
                return
            if next_token:
                target = (s.token + 1, layer)
            elif layer < s.layer:
                c.dropped_stale += len(experts)
                return
            else:
                target = (s.token, layer)
            now = time.monotonic_ns()
            for e in experts:
                key = (layer, e)
                ranges = self._ranges.get(key)
                if ranges is None:
                    c.invalid += 1
                    continue
                if key in s.failed:
                    c.dropped_failed += 1
                    continue
                job = s.queue.get(key) or s.inflight.get(key)
                if job is not None:
                    c.coalesced += 1
                    self._retarget(job, target)
                    continue
                job = s.resident.get(key)
                if job is not None and self._looks_resident(job):
                    c.coalesced += 1
                    self._retarget(job, target)
                    continue
                s.resident.pop(key, None)
                if len(s.queue) >= self.max_queue:
                    c.dropped_full += 1
                    if self.drop == "newest":
                        continue
                    s.queue.popitem(last=False)
                s.queue[key] = _Job(key, ranges, target, now)
                c.issued += 1
                notify += 1
            if notify:
                self._lock.notify(notify)

    def advance(self, layer: int) -> None:
        """The computation reached ``layer``; a lower layer than before starts a new token."""
        if not self._started:
            return
        with self._lock:
            s, c = self._s, self._c
            if layer < s.layer:
                s.token += 1
            s.layer = layer
            now = (s.token, layer)
            stale = [k for k, j in s.queue.items() if j.target < now]
            for k in stale:
                del s.queue[k]
            c.dropped_stale += len(stale)
            heap = s.pending_judgement
            while heap and heap[0][0] < now:
                target, _, job = heapq.heappop(heap)
                if job.judged or job.target != target or job.state != "resident":
                    continue
                job.judged = True
                c.wasted += 1

    def on_use(self, layer: int, experts: Iterable[int]) -> None:
        """The router used ``experts`` of ``layer``: account hits, late prefetches, misses."""
        experts = [int(e) for e in experts]
        if not self._started:
            return
        with self._lock:
            s, c = self._s, self._c
            for e in experts:
                key = (layer, e)
                c.uses += 1
                job = s.queue.pop(key, None)
                if job is not None:
                    c.late += 1  # the page fault will read it; drop our copy of the work
                    continue
                job = s.inflight.get(key)
                if job is not None:
                    c.late += 1
                    job.used = job.judged = True
                    continue
                job = s.resident.get(key)
                if job is None:
                    c.misses += 1
                    continue
                if self.io_.completes_reads or self._looks_resident(job):
                    c.used += 1
                else:
                    c.late += 1
                job.used = job.judged = True
        if self.buffer is not None:
            for e in experts:
                self._guard(self.buffer.touch, layer, e)

    def touch(self, layer: int, expert: int) -> None:
        """``on_use`` for a single expert."""
        self.on_use(layer, (expert,))

    def forget(self, layer: int, expert: int) -> None:
        """Someone evicted this expert: the next request reads it again."""
        if not self._started:
            return
        with self._lock:
            if self._s.resident.pop((layer, expert), None) is not None:
                self._c.evicted += 1

    def stats(self) -> PrefetchStats:
        """A consistent snapshot of counters, latencies and queue-depth samples."""
        if not hasattr(self, "_lock"):
            raise RuntimeError("PrefetchEngine.stats() before start()")
        with self._lock:
            lat = self._lat.snapshot()
            return PrefetchStats(
                method=self.method, queue_depth=self.queue_depth,
                enabled=not self._disabled,
                disabled_reason=self._disabled,
                counters=dataclasses.replace(self._c),
                latency_ms=lat[:, 0] / 1e6, service_ms=lat[:, 1] / 1e6,
                queue_samples=self._samples.snapshot(),
            )

    def idle(self) -> bool:
        """True when nothing is queued or in flight."""
        with self._lock:
            return (not self._s.queue and not self._s.inflight and not self._ops
                    and not self._ops_busy)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until nothing is queued or in flight (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle() or not self.enabled:
                return True
            time.sleep(0.001)
        return self.idle()

    # --- internals -------------------------------------------------------------------
    def _build_ranges(self) -> dict[Key, tuple[tuple[int, int], ...]]:
        lay = self.layout
        out = {}
        for li, layer in enumerate(lay.moe_layers):
            for e in range(lay.n_expert):
                out[(layer, e)] = tuple(
                    (int(o), int(n)) for o, n in zip(lay.offsets[li, e], lay.nbytes[li, e])
                )
        return out

    def _retarget(self, job: _Job, target: Target) -> None:
        if target > job.target:
            job.target = target
            job.used = job.judged = False
            if job.state == "resident":
                heapq.heappush(self._s.pending_judgement, (target, next(self._seq), job))

    def _looks_resident(self, job: _Job) -> bool:
        """Sampled mincore: first, middle and last page of each range are cached."""
        try:
            for off, n in job.ranges:
                for p in (off, off + n // 2, off + n - 1):
                    if not self._map.mincore(p - p % PAGE_SIZE, 1)[0]:
                        return False
            return True
        except (OSError, ValueError):
            return False

    def _stopping(self) -> bool:
        return self._stop.is_set() or bool(self._disabled)

    def _guard(self, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - nothing may escape into the caller's thread
            log.exception("prefetch: %s failed", getattr(fn, "__name__", fn))
            return None

    def _take(self, timeout: float) -> _Task | None:
        """Next chunk: of the oldest started job first, so all workers cooperate on the
        expert needed soonest; else start the oldest queued job."""
        deadline = time.monotonic() + timeout
        started = None
        with self._lock:
            s = self._s
            while True:
                if self._stopping():
                    return None
                while s.active and not s.active[0].chunks:
                    s.active.popleft()
                if s.active:
                    job = s.active[0]
                    break
                if s.queue:
                    _, job = s.queue.popitem(last=False)
                    job.state = "inflight"
                    job.t_start = time.monotonic_ns()
                    job.chunks = deque(self.io_.chunks(job.ranges))
                    s.inflight[job.key] = job
                    s.active.append(job)
                    started = job
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)
            chunk = job.chunks.popleft()
            job.outstanding += 1
        if started is not None and self.buffer is not None:
            evicted = self._guard(self.buffer.admit, *started.key) or []
            if evicted:
                with self._lock:
                    for k in evicted:  # type: ignore[attr-defined]
                        if self._s.resident.pop(k, None) is not None:
                            self._c.evicted += 1
        return _Task(job, (chunk,))

    def _finish(self, task: _Task, nbytes: int, error: BaseException | None) -> None:
        t = time.monotonic_ns()
        job = task.job
        disable = ""
        with self._lock:
            s, c = self._s, self._c
            c.bytes_read += nbytes
            job.nbytes += nbytes
            job.outstanding -= 1
            if error is not None:
                job.error = job.error or error
                job.chunks.clear()  # hand out no more chunks of a failed / cancelled job
            if job.outstanding or job.chunks:
                return  # other chunks of this job are still being read
            s.inflight.pop(job.key, None)
            error = job.error
            if isinstance(error, Cancelled):
                job.state = "cancelled"
                c.cancelled += 1
            elif error is not None:
                job.state = "failed"
                s.failed.add(job.key)
                c.errors += 1
                log.warning("prefetch of layer %d expert %d failed: %s", *job.key, error)
                if isinstance(error, ShortReadError):
                    disable = f"file truncated ({error})"
                elif c.errors >= self.max_errors:
                    disable = f"{c.errors} I/O errors, last: {error}"
            else:
                job.state = "resident"
                c.completed += 1
                s.resident[job.key] = job
                self._lat.add(t - job.t_request, t - job.t_start)
                if not job.judged:
                    heapq.heappush(s.pending_judgement, (job.target, next(self._seq), job))
                    now = (s.token, s.layer)
                    if job.target < now:  # finished after its layer passed, unused
                        job.judged = True
                        c.wasted += 1
        if disable:
            self._disable(disable)
        if self.buffer is not None and error is not None:  # release the admission
            self._guard(self.buffer.forget, *job.key)

    def _disable(self, reason: str) -> None:
        with self._lock:
            if self._disabled:
                return
            self._disabled = reason
            self._c.dropped_disabled += len(self._s.queue)
            self._s.queue.clear()
            self._lock.notify_all()
        log.error("prefetch disabled for %s: %s", self.gguf_path, reason)

    def _worker_main(self, source: _Source) -> None:
        try:
            self.io_.run_worker(source)
        except BaseException as exc:  # noqa: BLE001 - a worker must never kill the process
            log.exception("prefetch worker crashed")
            self._disable(f"worker crashed: {type(exc).__name__}: {exc}")

    def _monitor_main(self) -> None:
        path = os.fspath(self.gguf_path)
        next_watch = time.monotonic() + self.watch_interval  # start() checked the file
        while not self._stop.wait(self.sample_interval):
            now = time.monotonic()
            with self._lock:
                self._samples.add((time.monotonic_ns() - self._t0) / 1e9,
                                  len(self._s.queue), len(self._s.inflight))
            if self._disabled or now < next_watch:
                continue
            next_watch = now + self.watch_interval
            reason = self._check_file(path)
            if reason:
                self._disable(reason)

    def _check_file(self, path: str) -> str:
        try:
            st = os.stat(path)
        except OSError as exc:
            return f"file removed ({exc.strerror})"
        if (st.st_dev, st.st_ino) != self._identity:
            return "file replaced (different inode)"
        try:
            size = os.fstat(self.io_.fd).st_size
        except OSError as exc:
            return f"fstat failed ({exc.strerror})"
        if size != self.layout.file_size:
            return f"file size changed to {size} bytes (expected {self.layout.file_size})"
        return ""
