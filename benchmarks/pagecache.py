"""Page-cache state between benchmark rounds: start a file cold, or warm it.

Every benchmark that compares cold and cached runs uses these two, so "cold" means the
same thing in all of them: dirty pages written back, ``posix_fadvise(DONTNEED)`` over the
whole file (:func:`expertpred.lab.cgroup.evict_file`), optionally the global drop_caches.
"""

from __future__ import annotations

from pathlib import Path

from expertpred.lab.cgroup import evict_file


def evict(path: Path, drop_caches: bool = False) -> None:
    """Drop ``path`` from the page cache; with ``drop_caches`` (root) every clean page too,
    for a first read that no readahead of a neighbouring file can help."""
    evict_file(path)
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


def warm(path: Path) -> None:
    """Read the whole file once so its pages are cached (and charged to this process)."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
