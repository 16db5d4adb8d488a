"""Prefetch room: I/O methods, the prefetch engine, the expert buffer manager and the plugin.

``PrefetchEngine`` reads predicted experts into the page cache ahead of use;
``BufferManager`` keeps expert weights within a RAM budget; ``io`` holds the I/O methods
(``pread``, ``fadvise``, ``madvise``, ``io_uring``) and ``eviction`` the eviction calls and
the measurement that ``lab.evictprobe`` runs; ``plugin`` runs all of it inside llama.cpp's
process.
"""

from __future__ import annotations

from .buffer import POLICIES, BufferManager
from .engine import PrefetchCounters, PrefetchEngine, PrefetchStats
from .io import METHODS, make_method

__all__ = [
    "METHODS",
    "POLICIES",
    "BufferManager",
    "PrefetchCounters",
    "PrefetchEngine",
    "PrefetchStats",
    "make_method",
]
