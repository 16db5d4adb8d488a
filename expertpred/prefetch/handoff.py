"""A bounded handoff from the inference thread to one dispatcher thread.

The llama.cpp eval callback must not take the engine's lock (the I/O workers contend for
it). It appends a small :class:`Op` record to a ``collections.deque`` (atomic under the
GIL) and sets an event; the dispatcher thread applies the records in order. The plugin's
off-thread predictor uses the same class with callables as records.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

log = logging.getLogger(__name__)


class OpKind(enum.Enum):
    USE = "use"  # advance + on_use + demand request of the same experts (d0)
    REQUEST = "request"  # a speculative request


class Op(NamedTuple):
    kind: OpKind
    layer: int
    experts: list[int]
    next_token: bool
    t_ns: int  # monotonic ns when posted: job latencies start at the callback, not here
    cached: tuple[bool, ...] | None = None  # USE: the caller hinted the uncached experts
    t_done: int = 0  # USE with cached: when the caller's hints were issued


T = TypeVar("T")


class Handoff(Generic[T]):
    """Owns the dispatcher thread (``start`` / ``close``, bounded)."""

    def __init__(self, apply: Callable[[T], None], capacity: int,
                 name: str = "prefetch-dispatch") -> None:
        self.apply = apply  # called on the dispatcher thread, in posting order
        self.capacity = capacity  # records held at most; more are refused (counted)
        self.name = name
        self.posted = 0
        self.refused = 0
        self._ops: deque[T] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy = False
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> Handoff:
        self.thread.start()
        return self

    def post(self, op: T) -> bool:
        """Append ``op``; False (counted) when the handoff is full or closed."""
        if self._stop.is_set() or len(self._ops) >= self.capacity:
            self.refused += 1  # racy increment: a statistic only
            return False
        self.posted += 1
        self._ops.append(op)
        self._wake.set()
        return True

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def idle(self) -> bool:
        return not self._ops and not self._busy

    def flush(self, timeout: float) -> bool:
        """Wait until every posted record has been applied; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline or not self.alive:
                return False
            time.sleep(0.0005)
        return True

    def stop(self) -> None:
        """Ask the thread to exit at its next wake (the caller joins it)."""
        self._stop.set()
        self._wake.set()

    def _main(self) -> None:
        ops = self._ops
        while True:
            self._wake.wait(0.05)
            self._wake.clear()
            while ops and not self._stop.is_set():
                self._busy = True
                try:
                    self.apply(ops.popleft())
                except Exception:  # noqa: BLE001 - the dispatcher must survive
                    log.exception("prefetch: dispatching a posted record failed")
                finally:
                    self._busy = False
            if self._stop.is_set():
                return
