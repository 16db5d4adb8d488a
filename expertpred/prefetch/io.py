"""Ways of bringing byte ranges of a model file into the page cache, selectable by name.

Each method is an :class:`IOMethod` subclass registered under a name (``METHODS``):

============ ================================================================ ===========
name         what a worker does per chunk                                     completes
============ ================================================================ ===========
``pread``    ``os.preadv`` into a reusable per-worker buffer (a real read:    yes
             the data is in the page cache when the call returns). Queue
             depth = number of worker threads; ``preadv`` releases the GIL.
``fadvise``  ``posix_fadvise(POSIX_FADV_WILLNEED)``: asks the kernel to start   no (hint)
             readahead and returns without waiting for the data.
``madvise``  ``madvise(MADV_WILLNEED)`` on the method's own read-only mapping    no (hint)
             of the file (ctypes; never dereferenced, so no SIGBUS risk).
``populate`` ``POSIX_FADV_WILLNEED`` of the chunk, then                      yes
             ``madvise(MADV_POPULATE_READ)`` on the method's own ``MADV_RANDOM``
             mapping (waits for exactly those pages, no copy to user space),
             then ``MADV_DONTNEED`` (our page-table entries go, the pages stay
             cached and unmapped, as reclaimable as the kernel's). >= 5.14.
``io_uring`` ``IORING_OP_READ`` through the PyPI ``liburing`` binding           yes
             (2026.3.30): one worker keeps ``queue_depth`` chunk reads in
             flight on one ring (``IOSQE_ASYNC``) and waits on an eventfd with
             ``select`` (the binding's ``io_uring_wait_cqe`` holds the GIL
             while it blocks, so it is never called).
============ ================================================================ ===========

"completes = no" means a finished fetch only says the hint was *issued*; whether the pages
arrived in time is checked with ``mincore`` by whoever needs to know (the engine does this
when it accounts a prefetch as used or late).

``liburing`` is optional: without it ``make_method("io_uring", ...)`` raises a one-line
:class:`ExpertPredError`. The methods' measured bandwidth against ``dd`` O_DIRECT, and the
binding choices, are in docs/prefetch-io.md (``benchmarks/io_bandwidth.py``).

The engine hands work to a method through the small :class:`WorkSource` protocol; a method
never decides *what* to read, only *how*.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import ClassVar, Protocol

from ..errors import ExpertPredError
from .sysmem import FileMapping, Madvice

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 21  # 2 MiB: big enough for the disk, small enough to stop fast


class ShortReadError(OSError):
    """A read returned end-of-file inside a range the layout says exists (file truncated)."""


class Cancelled(Exception):
    """A fetch was abandoned because the engine is stopping (not an I/O error)."""


class Fetch(Protocol):
    """One unit of work: absolute ``(offset, nbytes)`` file ranges to bring into memory."""

    ranges: Sequence[tuple[int, int]]


class WorkSource(Protocol):
    """What a method's worker pulls work from and reports to (the engine implements it)."""

    @property
    def stopping(self) -> bool: ...

    def take(self, timeout: float) -> Fetch | None:
        """Next fetch to do (marked in flight), or None if none arrived within ``timeout``."""
        ...

    def finish(self, item: Fetch, nbytes: int, error: BaseException | None) -> None:
        """``item`` is done: ``nbytes`` read or advised; ``error`` is an OSError/Cancelled."""
        ...


class IOMethod(ABC):
    """How a worker turns file ranges into page-cache pages.

    The constructor only stores its arguments; :meth:`open` acquires the descriptor (and
    mapping / ring); :meth:`run_worker` is the body of one worker thread; the engine starts
    :meth:`n_workers` of them.
    """

    name: ClassVar[str]
    completes_reads: ClassVar[bool]  # True: a finished fetch means the bytes are cached
    registry: ClassVar[dict[str, type[IOMethod]]] = {}

    def __init_subclass__(cls, *, method_name: str, completes_reads: bool, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls.name = method_name
        cls.completes_reads = completes_reads
        IOMethod.registry[method_name] = cls

    def __init__(self, path: str | os.PathLike[str], queue_depth: int = 4,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, readahead: bool = False) -> None:
        if queue_depth < 1:
            raise ExpertPredError(f"queue_depth={queue_depth}: expected an integer >= 1")
        if chunk_bytes < 4096:
            raise ExpertPredError(f"chunk_bytes={chunk_bytes}: expected at least 4096")
        self.path = os.fspath(path)
        self.queue_depth = int(queue_depth)
        self.chunk_bytes = int(chunk_bytes)
        self.readahead = readahead
        self.fd = -1

    # --- lifecycle -----------------------------------------------------------------
    def open(self) -> None:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        if not self.readahead:
            # Only this descriptor: reads fetch exactly the expert's pages, not the
            # neighbours kernel readahead would add (8 MiB here) that nobody asked for.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def n_workers(self) -> int:
        """Threads the engine should run for this method (queue depth for blocking calls)."""
        return self.queue_depth

    # --- work ------------------------------------------------------------------------
    def chunks(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """``ranges`` cut into pieces of at most ``chunk_bytes``."""
        out = []
        for off, n in ranges:
            for c in range(int(off), int(off) + int(n), self.chunk_bytes):
                out.append((c, min(self.chunk_bytes, int(off) + int(n) - c)))
        return out

    def run_worker(self, source: WorkSource) -> None:
        """Default worker: one fetch at a time, chunk by chunk, checking ``stopping``."""
        state = self.worker_state()
        while not source.stopping:
            item = source.take(0.05)
            if item is None:
                continue
            done = 0
            err: BaseException | None = None
            try:
                for off, n in self.chunks(item.ranges):
                    if source.stopping:
                        raise Cancelled()
                    done += self.fetch_chunk(state, off, n)
            except (OSError, Cancelled) as exc:
                err = exc
            source.finish(item, done, err)

    def worker_state(self) -> object:
        """Per-thread state (e.g. a read buffer)."""
        return None

    @abstractmethod
    def fetch_chunk(self, state: object, offset: int, nbytes: int) -> int:
        """Bring one chunk in (blocking); return the bytes read or advised."""

    def _check_size(self, offset: int, nbytes: int) -> None:
        """Hints succeed silently past EOF; check the file is still long enough."""
        size = os.fstat(self.fd).st_size
        if offset + nbytes > size:
            raise ShortReadError(errno.EIO, f"{self.path}: range {offset}+{nbytes} past end "
                                 f"of file ({size} bytes): file truncated?")


class PreadMethod(IOMethod, method_name="pread", completes_reads=True):
    """``os.preadv`` into a per-worker buffer; the copy is discarded, the page cache kept."""

    def worker_state(self) -> object:
        return memoryview(bytearray(self.chunk_bytes))

    def fetch_chunk(self, state: object, offset: int, nbytes: int) -> int:
        assert isinstance(state, memoryview)
        got = 0
        while got < nbytes:
            n = os.preadv(self.fd, [state[: nbytes - got]], offset + got)
            if n == 0:
                raise ShortReadError(errno.EIO, f"{self.path}: end of file at byte "
                                     f"{offset + got}, expected data up to {offset + nbytes}: "
                                     "file truncated?")
            got += n
        return got


class FadviseMethod(IOMethod, method_name="fadvise", completes_reads=False):
    """``posix_fadvise(WILLNEED)``: start readahead, do not wait."""

    def fetch_chunk(self, state: object, offset: int, nbytes: int) -> int:
        self._check_size(offset, nbytes)
        os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        return nbytes


class MadviseMethod(IOMethod, method_name="madvise", completes_reads=False):
    """``madvise(MADV_WILLNEED)`` on our own read-only mapping of the file."""

    def open(self) -> None:
        super().open()
        self.mapping = FileMapping(self.path)

    def close(self) -> None:
        mapping = getattr(self, "mapping", None)
        if mapping is not None:
            mapping.close()
        super().close()

    def fetch_chunk(self, state: object, offset: int, nbytes: int) -> int:
        self._check_size(offset, nbytes)
        self.mapping.madvise(offset, nbytes, Madvice.WILLNEED)
        return nbytes


class PopulateMethod(MadviseMethod, method_name="populate", completes_reads=True):
    """``madvise(MADV_POPULATE_READ)``: a blocking read into the page cache without a copy."""

    def open(self) -> None:
        super().open()
        # no fault read-around: populate must wait for the chunk's pages, never read more
        self.mapping.madvise(0, self.mapping.size, Madvice.RANDOM)

    def fetch_chunk(self, state: object, offset: int, nbytes: int) -> int:
        self._check_size(offset, nbytes)
        # the whole chunk in one readahead request first: MADV_RANDOM faults alone would
        # read it a page at a time
        os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        try:
            self.mapping.madvise(offset, nbytes, Madvice.POPULATE_READ)
        except OSError as exc:
            if exc.errno == errno.EFAULT:  # SIGBUS while populating: past end of file
                raise ShortReadError(errno.EIO, f"{self.path}: range {offset}+{nbytes} "
                                     "not readable: file truncated?") from None
            raise
        self.mapping.madvise(offset, nbytes, Madvice.DONTNEED)
        return nbytes


class _Pending:
    """io_uring bookkeeping of one fetch: chunks left to submit / complete."""

    __slots__ = ("item", "todo", "outstanding", "nbytes", "error")

    def __init__(self, item: Fetch, chunks: list[tuple[int, int]]) -> None:
        self.item = item
        self.todo = deque(chunks)
        self.outstanding = 0
        self.nbytes = 0
        self.error: BaseException | None = None


class IOUringMethod(IOMethod, method_name="io_uring", completes_reads=True):
    """Buffered ``IORING_OP_READ`` with ``queue_depth`` chunks in flight on one ring."""

    def n_workers(self) -> int:
        return 1

    def open(self) -> None:
        try:
            import liburing  # noqa: F401
        except ImportError:
            raise ExpertPredError(
                "method 'io_uring' needs the optional PyPI package liburing "
                "(pip install liburing==2026.3.30); use method 'pread' otherwise"
            ) from None
        super().open()

    def fetch_chunk(self, state: object, offset: int, nbytes: int) -> int:  # pragma: no cover
        raise NotImplementedError("io_uring reads are driven by run_worker")

    def run_worker(self, source: WorkSource) -> None:
        _RingWorker(self, source).run()


class _RingWorker:
    """The io_uring worker of one :class:`IOUringMethod`: a ring with ``queue_depth`` slots
    (a chunk buffer each), an eventfd to wait on without the GIL, and the fetches whose
    chunks are still to submit. Steps per round: submit, wait, reap."""

    def __init__(self, method: IOUringMethod, source: WorkSource) -> None:
        import liburing

        self.L = liburing  # the binding, imported only when a worker runs
        self.method = method
        self.source = source
        qd = method.queue_depth
        self.ring = liburing.Ring()
        self.cqe = liburing.Cqe()
        rc = liburing.io_uring_queue_init(max(qd, 2), self.ring)
        if rc not in (0, None):
            raise OSError(-rc, "io_uring_queue_init failed")
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        liburing.io_uring_register_eventfd(self.ring, self.efd)
        self.bufs = [bytearray(method.chunk_bytes) for _ in range(qd)]
        self.slots: list[tuple[_Pending, int, int, bytearray] | None] = [None] * qd
        self.free = list(range(qd))
        self.active: deque[_Pending] = deque()  # fetches with chunks still to submit
        self.inflight = 0  # chunks submitted and not yet reaped

    def run(self) -> None:
        try:
            while True:
                stopping = self.source.stopping
                if not stopping:
                    self._submit()  # 1. fill free slots, taking new fetches as needed
                if stopping:
                    self._abandon_unsubmitted()
                    if not self.inflight:
                        return
                elif not self.inflight:
                    continue
                self._wait()  # 2. wait for completions without holding the GIL
                self._reap()  # 3. account them
        finally:
            self._close()

    def _submit(self) -> None:
        """Prepare one read per free slot from the active fetches, then submit them all."""
        L, m = self.L, self.method
        prepared = 0
        while self.free:
            while self.active and not self.active[0].todo:
                self.active.popleft()
            if not self.active:
                item = self.source.take(0.0 if self.inflight or prepared else 0.05)
                if item is None:
                    break
                self.active.append(_Pending(item, m.chunks(item.ranges)))
                continue
            p = self.active[0]
            off, n = p.todo.popleft()
            slot = self.free.pop()
            buf = self.bufs[slot] if n == m.chunk_bytes else bytearray(n)
            sqe = L.io_uring_get_sqe(self.ring)
            L.io_uring_prep_read(sqe, m.fd, buf, off)
            # IOSQE_ASYNC: straight to the kernel's blocking io-wq workers; the inline
            # non-blocking attempt + async page-wait path is slower (docs/prefetch-io.md)
            sqe.flags = L.IOSQE_ASYNC
            L.io_uring_sqe_set_data64(sqe, slot)
            self.slots[slot] = (p, off, n, buf)
            p.outstanding += 1
            prepared += 1
        if prepared:
            L.io_uring_submit(self.ring)
            self.inflight += prepared

    def _abandon_unsubmitted(self) -> None:
        """On stop: drop chunks not yet submitted; what the kernel still writes is reaped."""
        for p in self.active:
            if not p.todo:
                continue  # fully submitted (or failed): finishes when reaped
            p.todo.clear()
            p.error = p.error or Cancelled()
            if p.outstanding == 0:
                self.source.finish(p.item, p.nbytes, p.error or Cancelled())
        self.active.clear()

    def _wait(self) -> None:
        r, _, _ = select.select([self.efd], [], [], 0.05)
        if r:
            try:
                os.read(self.efd, 8)
            except BlockingIOError:
                pass

    def _reap(self) -> None:
        """Take every completion off the ring and account it to its fetch."""
        L = self.L
        while True:
            try:
                L.io_uring_peek_cqe(self.ring, self.cqe)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break
                raise
            c = self.cqe[0]
            slot = int(c.user_data)
            try:
                res: int | BaseException = int(c.res)
            except OSError as exc:
                res = exc
            L.io_uring_cqe_seen(self.ring, c)
            entry = self.slots[slot]
            assert entry is not None
            self.slots[slot] = None
            self.free.append(slot)
            self.inflight -= 1
            self._completed(*entry[:3], res)

    def _completed(self, p: _Pending, off: int, n: int, res: int | BaseException) -> None:
        """One chunk read came back: an error, end of file, a short read or all of it."""
        p.outstanding -= 1
        if isinstance(res, BaseException):
            p.error = p.error or res
            p.todo.clear()
        elif res == 0:
            p.error = p.error or ShortReadError(
                errno.EIO, f"{self.method.path}: end of file at byte {off}, expected data "
                f"up to {off + n}: file truncated?")
            p.todo.clear()
        else:
            p.nbytes += res
            if res < n:  # short read: ask again for the rest
                p.todo.appendleft((off + res, n - res))
                if p not in self.active:
                    self.active.appendleft(p)
        if p.outstanding == 0 and not p.todo:
            self.source.finish(p.item, p.nbytes, p.error)

    def _close(self) -> None:
        """Exit the ring; after an unexpected error, first wait (bounded) for the kernel to
        stop writing into the buffers."""
        L = self.L
        if self.inflight:
            deadline = time.monotonic() + 2.0
            while self.inflight and time.monotonic() < deadline:
                try:
                    L.io_uring_peek_cqe(self.ring, self.cqe)
                    L.io_uring_cqe_seen(self.ring, self.cqe[0])
                    self.inflight -= 1
                except OSError:
                    select.select([self.efd], [], [], 0.01)
        L.io_uring_queue_exit(self.ring)
        os.close(self.efd)
        self.bufs, self.slots = [], []


METHODS: dict[str, type[IOMethod]] = IOMethod.registry


def make_method(name: str, path: str | os.PathLike[str], queue_depth: int = 4,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, readahead: bool = False) -> IOMethod:
    """The I/O method registered as ``name`` (not opened yet)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ExpertPredError(
            f"I/O method {name!r}: expected one of {', '.join(sorted(METHODS))}"
        ) from None
    return cls(path, queue_depth=queue_depth, chunk_bytes=chunk_bytes, readahead=readahead)
