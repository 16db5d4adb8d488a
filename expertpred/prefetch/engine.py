"""The prefetch engine: turns "expert e of layer L will be needed" into page-cache reads.

``PrefetchEngine`` is a context manager that owns its threads (``with`` / ``close``,
bounded). The inference thread only calls cheap, non-blocking methods:

- ``request(layer, experts, next_token=False, priority=SPECULATIVE)``: each (layer,
  expert) becomes one job whose byte ranges come from the layout. A job already queued, in
  flight or resident is *coalesced*; a demand request for a speculative job raises it.
  A request for a layer the computation has passed is refused (``refused_stale``) unless
  ``next_token=True`` says it is for the next token's pass over that layer.
- ``advance(layer)``: the computation reached ``layer``; a lower layer than before starts a
  new token. Jobs whose (token, layer) target passed are stopped, queued or in flight
  (``dropped_stale``); a speculative job is judged *unused* then.
- ``on_use(layer, experts)``: the router chose these experts: a *hit* (prefetch complete in
  time; for the hint methods checked with ``mincore``), *late* (queued / in flight) or a
  *miss*.
- ``post_use`` / ``post_request``: the same, applied on the engine's dispatcher thread
  (:mod:`.handoff`): the callback only appends to a deque.

Bandwidth goes to demand first: workers take chunks of demand jobs (the layer being
computed, d0) before any speculative chunk, and all workers cooperate on the oldest
started job of the highest priority (:class:`~.jobs.JobBook`). With a hint method
(``fadvise`` / ``madvise``) and ``inline_demand`` the demand hints do not wait for a
thread: ``post_use`` issues them on the caller's thread (off by default, see
``EngineConfig.inline_demand``). Counters form ledgers that
balance (:meth:`PrefetchStats.ledgers`).

Failure handling: an I/O error marks that expert failed (never retried), is counted and
logged, and never reaches the caller's thread. A short read, ``max_errors`` errors, or the
monitor seeing the file truncated or replaced disables prefetching: the queue is dropped,
workers exit, further requests are refused (``refused_disabled``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import MoELayout
from .handoff import Handoff, Op, OpKind
from .io import DEFAULT_CHUNK_BYTES, Cancelled, IOMethod, ShortReadError, make_method
from .jobs import (
    DropPolicy,
    DropReason,
    Job,
    JobBook,
    JobState,
    Key,
    PrefetchCounters,
    PrefetchStats,
    Priority,
    Ranges,
    Ring,
)
from .sysmem import PAGE_SIZE, FileMapping

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "PrefetchCounters", "PrefetchEngine", "PrefetchStats", "Priority"]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine reads. Every field can also be given to ``PrefetchEngine`` by name."""

    method: str = "pread"  # io.METHODS name: pread completes reads, fadvise/madvise only hint
    queue_depth: int = 4  # reads in flight: one expert's chunks spread over this many
    max_queue: int = 256  # bounded memory; far more than one token's experts
    drop: DropPolicy = DropPolicy.OLDEST  # full queue: the oldest is least likely in time
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # unit of work: big for the disk, small to stop
    readahead: bool = False  # kernel readahead would add neighbours nobody asked for
    max_errors: int = 8  # a failing disk: stop adding load to it
    sample_interval: float = 0.005  # queue-depth samples, for plots
    watch_interval: float = 0.05  # how soon a truncated / replaced file is noticed
    history: int = 1 << 16  # latency / sample rows kept (ring buffers: bounded memory)
    max_handoff: int = 4096  # posted records held; a stalled dispatcher must not grow RAM
    close_timeout: float = 2.0  # close() waits this long for threads, then leaves them
    # hint methods: post_use issues the current layer's hints on the caller's thread (no
    # thread hop before the read). Off by default: under cgroup pressure one fadvise call
    # allocates and reclaims for the whole expert, and the 8 workers do that in parallel
    # (docs/e2e.md: issue p50 110 ms queued vs 390 ms inline, tok/s 0.21 vs 0.17)
    inline_demand: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "drop", DropPolicy(self.drop))
        except ValueError:
            raise ExpertPredError(f"drop={self.drop!r}: expected 'oldest' or 'newest'") from None
        for name in ("queue_depth", "max_queue", "max_handoff", "history"):
            if int(getattr(self, name)) < 1:
                raise ExpertPredError(f"{name}={getattr(self, name)}: expected an integer >= 1")


class Admission(Protocol):
    """A residency manager the engine admits jobs to before reading them."""

    def admit(self, layer: int, expert: int) -> list[Key]: ...  # returns evicted keys

    def touch(self, layer: int, expert: int) -> None: ...

    def forget(self, layer: int, expert: int) -> None: ...


class _Task(NamedTuple):
    """One chunk of a job, as handed to an I/O method's worker (``io.Fetch``)."""

    job: Job
    ranges: Ranges


class PrefetchEngine:
    """Background prefetch of expert weights into the page cache (see module docstring).

    ``config`` (or its fields as keywords) says how to read; ``buffer`` is an optional
    :class:`Admission` (e.g. :class:`~.buffer.BufferManager`): each job is admitted to it
    before its read, and uses touch it.
    """

    def __init__(self, gguf_path: str | os.PathLike[str], layout: MoELayout,
                 config: EngineConfig | None = None, *, buffer: Admission | None = None,
                 **fields: object) -> None:
        self.gguf_path = gguf_path
        self.layout = layout
        self.config = dataclasses.replace(config or EngineConfig(), **fields)
        self.buffer = buffer
        self._threads: list[threading.Thread] = []
        self._started = False

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def queue_depth(self) -> int:
        return self.config.queue_depth

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> PrefetchEngine:
        """Open the file, check it matches the layout, start the threads."""
        if self._started:
            raise RuntimeError("PrefetchEngine.start() called twice")
        cfg, path = self.config, os.fspath(self.gguf_path)
        self.io_: IOMethod = make_method(cfg.method, path, cfg.queue_depth, cfg.chunk_bytes,
                                         cfg.readahead)
        self.io_.open()
        try:
            st = os.fstat(self.io_.fd)
            if st.st_size != self.layout.file_size:
                raise ExpertPredError(
                    f"{path}: file has {st.st_size} bytes, expected {self.layout.file_size} "
                    "from its layout (a different or modified file?)")
            self._identity = (st.st_dev, st.st_ino)
            self._map = FileMapping(path)  # for mincore checks; never read through
        except BaseException:
            self.io_.close()
            raise
        self._lock = threading.Condition(threading.Lock())
        self._book = JobBook(expert_ranges(self.layout), self.io_.chunks, cfg.max_queue, cfg.drop)
        self._lat, self._samples = Ring(cfg.history, 3), Ring(cfg.history, 3)
        self._stop = threading.Event()
        self._disabled = ""
        self._t0 = time.monotonic_ns()
        self._handoff = Handoff(self._apply, cfg.max_handoff)
        source = _Source(self)
        self._threads = [threading.Thread(target=self._worker_main, args=(source,),
                                          name=f"prefetch-{cfg.method}-{i}", daemon=True)
                         for i in range(self.io_.n_workers())]
        self._threads += [threading.Thread(target=self._monitor_main, name="prefetch-monitor",
                                           daemon=True), self._handoff.thread]
        self._started = True
        for t in self._threads:
            t.start()
        log.info("prefetch engine started: %s, queue depth %d, %s", cfg.method,
                 cfg.queue_depth, path)
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop the threads (bounded by ``timeout`` overall) and release the file."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        self._handoff.stop()
        with self._lock:
            self._lock.notify_all()
        deadline = time.monotonic() + (self.config.close_timeout if timeout is None else timeout)
        alive = []
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                alive.append(t.name)
        if alive:  # a read stuck in the kernel: keep its descriptor open rather than race it
            log.warning("prefetch threads still running at close: %s", alive)
        else:
            self.io_.close()
            with self._lock:
                self._book.cancel_all()
        self._map.close()

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
    def post_use(self, layer: int, experts: list[int]) -> None:
        """``advance(layer)``, ``on_use`` and a demand ``request`` of ``experts``, applied
        by the dispatcher thread: the caller only appends to a deque. With
        ``inline_demand`` and a hint method the caller first notes which experts look
        cached (for the hit accounting) and then hints all of them itself."""
        if not self._started:
            return
        t = time.monotonic_ns()
        cached = None
        if self.config.inline_demand and not self.io_.completes_reads and not self._disabled:
            cached = self._hint_now(layer, experts)
        self._handoff.post(Op(OpKind.USE, layer, experts, False, t, cached,
                              time.monotonic_ns()))

    def _hint_now(self, layer: int, experts: list[int]) -> tuple[bool, ...] | None:
        """Hint every expert's ranges now (the kernel skips cached pages; holes left by
        reclaim get filled); per expert, did it look cached before? None when a hint
        failed (the dispatcher then queues them, and the workers see the error)."""
        cached = []
        try:
            for e in experts:
                ranges = self._book.ranges.get((layer, e), ())
                cached.append(bool(ranges) and ranges_resident(self._map, ranges))
                for off, n in ranges:
                    self.io_.fetch_chunk(None, off, n)
        except (OSError, ValueError) as exc:
            log.debug("prefetch: inline hint failed, queueing instead: %s", exc)
            return None
        return tuple(cached)

    def post_request(self, layer: int, experts: list[int], next_token: bool = False) -> None:
        """A speculative ``request`` on the dispatcher thread."""
        if self._started:
            self._handoff.post(Op(OpKind.REQUEST, layer, experts, next_token,
                                  time.monotonic_ns()))

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every posted record has been applied; False on timeout."""
        return not self._threads or self._handoff.flush(timeout)

    def _apply(self, op: Op) -> None:
        if op.kind is OpKind.USE and op.cached is not None:
            self.advance(op.layer)
            self._use(op.layer, op.experts, op.cached)
            with self._lock:
                new = self._book.hinted(op.layer, op.experts, op.cached, op.t_ns, op.t_done)
                for _ in new:
                    self._lat.add(op.t_done - op.t_ns, op.t_done - op.t_ns, Priority.DEMAND)
            if self.buffer is not None:
                for job in new:
                    for k in self._guard(self.buffer.admit, *job.key) or []:  # type: ignore
                        self.forget(*k)
        elif op.kind is OpKind.USE:
            self.advance(op.layer)
            self.on_use(op.layer, op.experts)
            self._request(op.layer, op.experts, False, Priority.DEMAND, op.t_ns)
        else:
            self._request(op.layer, op.experts, op.next_token, Priority.SPECULATIVE, op.t_ns)

    def request(self, layer: int, experts: Iterable[int], next_token: bool = False,
                priority: Priority = Priority.SPECULATIVE) -> None:
        """Queue prefetches of ``experts`` of ``layer`` (see module docstring)."""
        self._request(layer, experts, next_token, priority, time.monotonic_ns())

    def _request(self, layer: int, experts: Iterable[int], next_token: bool,
                 priority: Priority, t_ns: int) -> None:
        experts = [int(e) for e in experts]
        if not self._started:
            return
        with self._lock:
            new = self._book.request(layer, experts, next_token, priority, t_ns,
                                     bool(self._disabled), self._looks_resident)
            if new:
                self._lock.notify(new)

    def advance(self, layer: int) -> None:
        """The computation reached ``layer``; a lower layer than before starts a new token."""
        if self._started:
            with self._lock:
                self._book.advance(layer)

    def on_use(self, layer: int, experts: Iterable[int]) -> None:
        """The router used ``experts`` of ``layer``: account hits, late prefetches, misses."""
        self._use(layer, [int(e) for e in experts], None)

    def _use(self, layer: int, experts: list[int], cached: tuple[bool, ...] | None) -> None:
        if not self._started:
            return
        with self._lock:
            self._book.use(layer, experts, self.io_.completes_reads, self._looks_resident,
                           cached)
        if self.buffer is not None:
            for e in experts:
                self._guard(self.buffer.touch, layer, e)

    def forget(self, layer: int, expert: int) -> None:
        """Someone evicted this expert: the next request reads it again."""
        if self._started:
            with self._lock:
                self._book.forget((layer, expert))

    def stats(self) -> PrefetchStats:
        """A consistent snapshot of counters, latencies and queue-depth samples."""
        if not hasattr(self, "_lock"):
            raise RuntimeError("PrefetchEngine.stats() before start()")
        with self._lock:
            b, lat = self._book, self._lat.snapshot()
            c = dataclasses.replace(b.c, posted=self._handoff.posted,
                                    dropped_handoff=self._handoff.refused)
            return PrefetchStats(
                method=self.method, queue_depth=self.queue_depth,
                enabled=not self._disabled, disabled_reason=self._disabled, counters=c,
                pending=b.n_queued() + len(b.inflight), spec_pending=b.spec_pending(),
                latency_ms=lat[:, 0] / 1e6, service_ms=lat[:, 1] / 1e6,
                latency_priority=lat[:, 2].astype(np.int8),
                queue_samples=self._samples.snapshot())

    def idle(self) -> bool:
        """True when nothing is posted, queued or in flight."""
        with self._lock:
            return not self._book.n_queued() and not self._book.inflight \
                and self._handoff.idle()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until nothing is queued or in flight (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle() or not self.enabled:
                return True
            time.sleep(0.001)
        return self.idle()

    # --- workers ---------------------------------------------------------------------
    def _take(self, timeout: float) -> _Task | None:
        """The next chunk to read (see JobBook.next_chunk), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self._stopping():
                    return None
                got = self._book.next_chunk(time.monotonic_ns())
                if got is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)
        job, chunk, started = got
        if started and self.buffer is not None:
            evicted = self._guard(self.buffer.admit, *job.key) or []
            for k in evicted:  # type: ignore[attr-defined]
                self.forget(*k)
        return _Task(job, (chunk,))

    def _finish(self, task: _Task, nbytes: int, error: BaseException | None) -> None:
        t, job, disable = time.monotonic_ns(), task.job, ""
        with self._lock:
            state = self._book.finish_chunk(job, nbytes, error, isinstance(error, Cancelled))
            if state is JobState.RESIDENT:
                self._lat.add(t - job.t_request, t - job.t_start, job.priority)
            elif state is JobState.FAILED:
                log.warning("prefetch of layer %d expert %d failed: %s", *job.key, job.error)
                if isinstance(job.error, ShortReadError):
                    disable = f"file truncated ({job.error})"
                elif self._book.c.failed >= self.config.max_errors:
                    disable = f"{self._book.c.failed} I/O errors, last: {job.error}"
        if disable:
            self._disable(disable)
        if self.buffer is not None and state in (JobState.FAILED, JobState.CANCELLED):
            self._guard(self.buffer.forget, *job.key)  # release the admission

    def _worker_main(self, source: _Source) -> None:
        try:
            self.io_.run_worker(source)
        except BaseException as exc:  # noqa: BLE001 - a worker must never kill the process
            log.exception("prefetch worker crashed")
            self._disable(f"worker crashed: {type(exc).__name__}: {exc}")

    # --- internals -------------------------------------------------------------------
    def _looks_resident(self, job: Job) -> bool:
        return ranges_resident(self._map, job.ranges)

    def _stopping(self) -> bool:
        return self._stop.is_set() or bool(self._disabled)

    def _guard(self, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - nothing may escape into the caller's thread
            log.exception("prefetch: %s failed", getattr(fn, "__name__", fn))
            return None

    def _disable(self, reason: str) -> None:
        with self._lock:
            if self._disabled:
                return
            self._disabled = reason
            self._book.drop_all(DropReason.DISABLED)
            self._lock.notify_all()
        log.error("prefetch disabled for %s: %s", self.gguf_path, reason)

    def _monitor_main(self) -> None:
        next_watch = time.monotonic() + self.config.watch_interval  # start() checked it
        while not self._stop.wait(self.config.sample_interval):
            with self._lock:
                self._samples.add((time.monotonic_ns() - self._t0) / 1e9,
                                  self._book.n_queued(), len(self._book.inflight))
            if self._disabled or time.monotonic() < next_watch:
                continue
            next_watch = time.monotonic() + self.config.watch_interval
            if reason := check_file(os.fspath(self.gguf_path), self._identity, self.io_.fd,
                                    self.layout.file_size):
                self._disable(reason)


class _Source:
    """The engine as seen by an I/O method's worker (``io.WorkSource``)."""

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


def expert_ranges(lay: MoELayout) -> dict[Key, Ranges]:
    """(layer, expert) -> the absolute file ranges of its parts."""
    return {(layer, e): tuple((int(o), int(n)) for o, n in
                              zip(lay.offsets[li, e], lay.nbytes[li, e]))
            for li, layer in enumerate(lay.moe_layers) for e in range(lay.n_expert)}


def ranges_resident(mapping: FileMapping, ranges: Ranges) -> bool:
    """Sampled mincore: the first, middle and last page of each range are cached. Cheap
    (a full check of a 48 MiB expert costs ~1 ms), so good for accounting hits and for
    not re-reading speculative experts; demand reads never rely on it (reclaim takes
    single pages, and one missing page is a fault reading read_ahead_kb around it)."""
    try:
        for off, n in ranges:
            for p in (off, off + n // 2, off + n - 1):
                if not mapping.mincore(p - p % PAGE_SIZE, 1)[0]:
                    return False
        return True
    except (OSError, ValueError):
        return False


def check_file(path: str, identity: tuple[int, int], fd: int, size: int) -> str:
    """Why the file at ``path`` is no longer the one opened as ``fd`` ("" if it is)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"file removed ({exc.strerror})"
    if (st.st_dev, st.st_ino) != identity:
        return "file replaced (different inode)"
    try:
        now = os.fstat(fd).st_size
    except OSError as exc:
        return f"fstat failed ({exc.strerror})"
    if now != size:
        return f"file size changed to {now} bytes (expected {size})"
    return ""
