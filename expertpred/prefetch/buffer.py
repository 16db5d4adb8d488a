"""The buffer manager: a RAM budget for expert weights, with a pluggable eviction policy.

``BufferManager`` keeps its own bookkeeping of which experts are resident (admitted and
not evicted) and their bytes; admitting an expert past the budget evicts others chosen by
the policy (``lru``, ``lfu``, or ``predictive`` = evict what a caller-provided score
function ranks lowest) with an *evictor* from :mod:`expertpred.prefetch.eviction`.
``residency()`` checks the bookkeeping against the kernel with ``mincore``.

Which eviction calls really drop pages was measured on this machine (Linux 6.18, ext4,
``python -m expertpred.lab.evictprobe --mib 4``; share of resident pages dropped,
1024 pages per cell; details in ``docs/eviction.md``):

================== ========== ============= ============ ========
evictor            own-mapped shared-mapped other-mapped unmapped
================== ========== ============= ============ ========
fadvise_dontneed   0%         0%            0%           100%
madvise_dontneed   0%         0%            0%           0%
madvise_cold       0%         0%            0%           0%
madvise_pageout    100%       0%            0%           0%
dontneed_both      100%       0%            0%           100%
pageout_fadvise    100%       0%            0%           100%
================== ========== ============= ============ ========

Under memory pressure (cgroup limit) ``MADV_COLD`` on our mapping makes the kernel
reclaim those pages first — a soft eviction (docs/eviction.md has the measurement).

So: pages that *another* mapping holds (llama.cpp's mmap of the model) cannot be evicted
from outside that mapping by any of these calls; ``POSIX_FADV_DONTNEED`` alone drops only
unmapped pages; ``MADV_DONTNEED`` only unmaps (the page cache keeps the pages);
``MADV_COLD`` frees nothing by itself. The default evictor,
``dontneed_both`` (``MADV_DONTNEED`` on our mapping, then ``POSIX_FADV_DONTNEED``), drops
everything only we map or nobody maps; ``pageout_fadvise`` is equivalent here.

Eviction works on the pages *fully inside* an expert's byte ranges (an expert's first and
last page may be shared with its neighbours in the file); ``residency()`` measures the
same pages.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import MoELayout
from .eviction import EVICTORS, Evictor
from .sysmem import PAGE_SIZE, FileMapping

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)
ScoreFn = Callable[[np.ndarray], np.ndarray]  # (n, 2) int (layer, expert) -> (n,) scores


class EvictionPolicy(ABC):
    """Chooses which resident expert to evict. Registered by name (``POLICIES``)."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[EvictionPolicy]]] = {}

    def __init_subclass__(cls, *, policy_name: str, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls.name = policy_name
        EvictionPolicy.registry[policy_name] = cls

    def __init__(self, score_fn: ScoreFn | None = None) -> None:
        self.score_fn = score_fn
        self.order: OrderedDict[Key, None] = OrderedDict()  # resident, least recent first

    def admitted(self, key: Key) -> None:
        self.order[key] = None

    def touched(self, key: Key) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def removed(self, key: Key) -> None:
        self.order.pop(key, None)

    @abstractmethod
    def victim(self, exclude: Key) -> Key | None:
        """The resident key to evict next (never ``exclude``), or None if there is none."""


class LRUPolicy(EvictionPolicy, policy_name="lru"):
    """Evict the least recently admitted or used expert."""

    def victim(self, exclude: Key) -> Key | None:
        for key in self.order:
            if key != exclude:
                return key
        return None


class LFUPolicy(EvictionPolicy, policy_name="lfu"):
    """Evict the least frequently used expert (uses counted over the manager's life);
    ties go to the least recently used."""

    def __init__(self, score_fn: ScoreFn | None = None) -> None:
        super().__init__(score_fn)
        self.counts: dict[Key, int] = {}

    def admitted(self, key: Key) -> None:
        super().admitted(key)
        self.counts.setdefault(key, 0)

    def touched(self, key: Key) -> None:
        super().touched(key)
        self.counts[key] = self.counts.get(key, 0) + 1

    def victim(self, exclude: Key) -> Key | None:
        best, best_count = None, None
        for key in self.order:  # LRU order: the first minimum wins ties
            if key == exclude:
                continue
            c = self.counts.get(key, 0)
            if best_count is None or c < best_count:
                best, best_count = key, c
        return best


class PredictivePolicy(EvictionPolicy, policy_name="predictive"):
    """Evict the expert the score function ranks lowest (e.g. predicted probability of use
    in the next tokens); ties go to the least recently used."""

    def victim(self, exclude: Key) -> Key | None:
        if self.score_fn is None:
            raise ExpertPredError("policy 'predictive' needs a score_fn")
        keys = [k for k in self.order if k != exclude]
        if not keys:
            return None
        scores = np.asarray(self.score_fn(np.array(keys, dtype=np.int64)), dtype=np.float64)
        if scores.shape != (len(keys),):
            raise ExpertPredError(f"score_fn returned shape {scores.shape}, "
                                  f"expected ({len(keys)},)")
        return keys[int(np.argmin(scores))]  # argmin returns the first (least recent) minimum


POLICIES: dict[str, type[EvictionPolicy]] = EvictionPolicy.registry


def _inner_pages(offsets: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and end page index of the pages fully inside each range (outer span if none)."""
    start = -(-offsets // PAGE_SIZE)
    end = (offsets + nbytes) // PAGE_SIZE
    small = end <= start
    start = np.where(small, offsets // PAGE_SIZE, start)
    end = np.where(small, -(-(offsets + nbytes) // PAGE_SIZE), end)
    return start, end


class BufferManager:
    """A budget of ``budget_bytes`` of expert weights in RAM, enforced by eviction.

    ``open()`` / ``close()`` (or ``with``) hold a descriptor and a read-only mapping of the
    file. Thread-safe: the prefetch engine's workers call :meth:`admit`, the inference
    thread :meth:`touch`.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        layout: MoELayout,
        budget_bytes: int,
        policy: str = "lru",
        evictor: str = "dontneed_both",
        score_fn: ScoreFn | None = None,
    ) -> None:
        self.gguf_path = gguf_path
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.evictor = evictor
        self.score_fn = score_fn
        largest = int(layout.nbytes.sum(axis=2).max())
        if budget_bytes < largest:
            raise ExpertPredError(
                f"{gguf_path}: buffer budget {budget_bytes} bytes is smaller than one expert "
                f"({largest} bytes); expected at least {largest}")
        if policy not in POLICIES:
            raise ExpertPredError(f"eviction policy {policy!r}: expected one of "
                                  f"{', '.join(sorted(POLICIES))}")
        if evictor not in EVICTORS:
            raise ExpertPredError(f"evictor {evictor!r}: expected one of "
                                  f"{', '.join(sorted(EVICTORS))}")
        if policy == "predictive" and score_fn is None:
            raise ExpertPredError("eviction policy 'predictive' needs a score_fn")
        self._opened = False

    # --- lifecycle -------------------------------------------------------------------
    def open(self) -> BufferManager:
        lay = self.layout
        self.fd_ = os.open(os.fspath(self.gguf_path), os.O_RDONLY | os.O_CLOEXEC)
        self.mapping_ = FileMapping(self.gguf_path)
        self.policy_ = POLICIES[self.policy](self.score_fn)
        self.evict_fn_: Evictor = EVICTORS[self.evictor]
        self._row = {layer: i for i, layer in enumerate(lay.moe_layers)}
        self._bytes = lay.nbytes.sum(axis=2)  # (n_moe_layer, n_expert)
        self._pstart, self._pend = _inner_pages(lay.offsets, lay.nbytes)
        self._resident: dict[Key, int] = {}  # key -> bytes
        self.used_bytes = 0
        self.evictions = 0
        self.evict_errors = 0
        self._lock = threading.Lock()
        self._opened = True
        return self

    def close(self) -> None:
        if self._opened:
            self.mapping_.close()
            os.close(self.fd_)
            self._opened = False

    def __enter__(self) -> BufferManager:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bookkeeping -------------------------------------------------------------------
    def _key_bytes(self, key: Key) -> int:
        try:
            return int(self._bytes[self._row[key[0]], key[1]])
        except (KeyError, IndexError):
            raise KeyError(f"layer {key[0]} expert {key[1]} not in {self.gguf_path}") from None

    def admit(self, layer: int, expert: int) -> list[Key]:
        """Account ``(layer, expert)`` as resident; evict by policy to stay within budget.

        Returns the evicted keys (the engine forgets them). Admitting a resident expert
        counts as a use.
        """
        key = (layer, expert)
        nbytes = self._key_bytes(key)
        evicted: list[Key] = []
        with self._lock:
            if key in self._resident:
                self.policy_.touched(key)
                return evicted
            while self.used_bytes + nbytes > self.budget_bytes:
                victim = self.policy_.victim(exclude=key)
                if victim is None:
                    break
                self._evict_locked(victim)
                evicted.append(victim)
            self._resident[key] = nbytes
            self.used_bytes += nbytes
            self.policy_.admitted(key)
        return evicted

    def touch(self, layer: int, expert: int) -> None:
        """``(layer, expert)`` was used (LRU recency, LFU count)."""
        with self._lock:
            self.policy_.touched((layer, expert))

    def forget(self, layer: int, expert: int) -> None:
        """Drop ``(layer, expert)`` from the bookkeeping without evicting (failed read)."""
        with self._lock:
            nbytes = self._resident.pop((layer, expert), None)
            if nbytes is not None:
                self.used_bytes -= nbytes
                self.policy_.removed((layer, expert))

    def evict(self, layer: int, expert: int) -> None:
        """Evict ``(layer, expert)`` now (if resident by the bookkeeping)."""
        with self._lock:
            if (layer, expert) in self._resident:
                self._evict_locked((layer, expert))

    def _evict_locked(self, key: Key) -> None:
        li = self._row[key[0]]
        for p in range(len(self.layout.parts)):
            start = int(self._pstart[li, key[1], p]) * PAGE_SIZE
            n = int(self._pend[li, key[1], p]) * PAGE_SIZE - start
            try:
                self.evict_fn_(self.fd_, self.mapping_, start, n)
            except OSError as exc:
                self.evict_errors += 1
                log.warning("evicting layer %d expert %d (%s) failed: %s", *key,
                            self.evictor, exc)
        self.used_bytes -= self._resident.pop(key)
        self.policy_.removed(key)
        self.evictions += 1

    def resident(self) -> set[Key]:
        """Keys resident by the bookkeeping."""
        with self._lock:
            return set(self._resident)

    def bookkeeping(self) -> np.ndarray:
        """Bool (n_moe_layer, n_expert): resident by the bookkeeping."""
        out = np.zeros(self._bytes.shape, dtype=bool)
        with self._lock:
            for layer, e in self._resident:
                out[self._row[layer], e] = True
        return out

    def residency(self) -> np.ndarray:
        """Float (n_moe_layer, n_expert): share of each expert's pages in the page cache
        (``mincore`` over the pages fully inside its ranges)."""
        vec = self.mapping_.mincore(0, self.mapping_.size)
        cs = np.concatenate([[0], np.cumsum(vec, dtype=np.int64)])
        end = np.minimum(self._pend, vec.size)
        start = np.minimum(self._pstart, end)
        hit = (cs[end] - cs[start]).sum(axis=2)
        total = (end - start).sum(axis=2)
        return np.where(total > 0, hit / np.maximum(total, 1), 0.0)
