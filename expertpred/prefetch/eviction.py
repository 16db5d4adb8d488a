"""Ways to drop a file range from memory, and a probe that measures which ones work.

An *evictor* gets the file descriptor, the caller's own read-only mapping of the file and
a byte range, and asks the kernel to let go of those pages. Which calls actually free the
page cache depends on who else maps the pages, so it is measured, not assumed:
:func:`measure` sets pages up in each situation, applies each evictor and counts the pages
``mincore`` still reports resident. ``python -m expertpred.lab.evictprobe [FILE]``
prints the table; the numbers from this machine are in ``docs/eviction.md`` and in
``expertpred.prefetch.buffer``'s docstring.

Situations:

- ``own-mapped``: pages faulted in through our mapping only;
- ``shared-mapped``: faulted in through our mapping *and* a child process's mapping;
- ``other-mapped``: mapped only by another process (llama.cpp's mmap of the model, seen
  from the prefetcher);
- ``unmapped``: in the page cache because of ``pread``, mapped by nobody.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .sysmem import PAGE_SIZE, FileMapping, Madvice

log = logging.getLogger(__name__)

Evictor = Callable[[int, FileMapping, int, int], None]


def fadvise_dontneed(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    """``posix_fadvise(POSIX_FADV_DONTNEED)``: drops clean, unmapped page-cache pages."""
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def madvise_dontneed(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    """``MADV_DONTNEED`` on our mapping: unmaps our page-table entries only."""
    mapping.madvise(offset, nbytes, Madvice.DONTNEED)


def madvise_cold(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    """``MADV_COLD`` (20): deactivate the pages (reclaim them first under pressure)."""
    mapping.madvise(offset, nbytes, Madvice.COLD)


def madvise_pageout(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    """``MADV_PAGEOUT`` (21): reclaim the pages mapped by our mapping now."""
    mapping.madvise(offset, nbytes, Madvice.PAGEOUT)


def dontneed_both(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    """``MADV_DONTNEED`` on our mapping, then ``POSIX_FADV_DONTNEED``."""
    madvise_dontneed(fd, mapping, offset, nbytes)
    fadvise_dontneed(fd, mapping, offset, nbytes)


def pageout_fadvise(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    """``MADV_PAGEOUT`` on our mapping, then ``POSIX_FADV_DONTNEED`` for unmapped pages."""
    madvise_pageout(fd, mapping, offset, nbytes)
    fadvise_dontneed(fd, mapping, offset, nbytes)


EVICTORS: dict[str, Evictor] = {
    "fadvise_dontneed": fadvise_dontneed,
    "madvise_dontneed": madvise_dontneed,
    "madvise_cold": madvise_cold,
    "madvise_pageout": madvise_pageout,
    "dontneed_both": dontneed_both,
    "pageout_fadvise": pageout_fadvise,
}

SITUATIONS = ("own-mapped", "shared-mapped", "other-mapped", "unmapped")

_CHILD = """
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
off, n = int(sys.argv[2]), int(sys.argv[3])
s = sum(m[i] for i in range(off, off + n, mmap.PAGESIZE))
print("ready", flush=True)
sys.stdin.readline()
"""


class _OtherProcess:
    """A child process that maps the file and faults a range in until closed."""

    def __init__(self, path: str, offset: int, nbytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, path, str(offset), str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"mapping child failed to start: {line!r}")

    def close(self) -> None:
        try:
            self.proc.communicate("\n", timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class ProbeRow:
    """Pages of one range resident before and after one evictor in one situation."""

    situation: str
    evictor: str
    pages: int
    before: int
    after: int

    @property
    def dropped(self) -> float:
        return 1.0 - self.after / self.before if self.before else 0.0


def _reset(fd: int, mapping: FileMapping, offset: int, nbytes: int) -> None:
    mapping.madvise(offset, nbytes, Madvice.DONTNEED)
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def measure(path: str | os.PathLike[str], nbytes: int = 4 << 20,
            evictors: dict[str, Evictor] | None = None) -> list[ProbeRow]:
    """Measure each evictor in each situation on ``nbytes`` of ``path`` (file must be clean).

    Every cell uses its own range of the file, so cells do not disturb each other; the file
    needs ``len(evictors) * len(SITUATIONS) * nbytes`` bytes.
    """
    path = os.fspath(path)
    evictors = EVICTORS if evictors is None else evictors
    nbytes -= nbytes % PAGE_SIZE
    size = os.path.getsize(path)
    cells = len(evictors) * len(SITUATIONS)
    if cells * nbytes > size:
        nbytes = (size // cells) // PAGE_SIZE * PAGE_SIZE
        if nbytes < PAGE_SIZE:
            raise ValueError(f"{path}: {size} bytes is too small for {cells} probe ranges")
    rows = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    mapping = FileMapping(path)
    try:
        os.fsync(fd) if os.access(path, os.W_OK) else None
        cell = 0
        for situation in SITUATIONS:
            for name, evict in evictors.items():
                off = cell * nbytes
                cell += 1
                _reset(fd, mapping, off, nbytes)
                other = None
                if situation in ("own-mapped", "shared-mapped"):
                    mapping.touch(off, nbytes)
                if situation in ("shared-mapped", "other-mapped"):
                    other = _OtherProcess(path, off, nbytes)
                if situation == "unmapped":
                    os.pread(fd, nbytes, off)
                try:
                    before = int(mapping.mincore(off, nbytes).sum())
                    evict(fd, mapping, off, nbytes)
                    after = int(mapping.mincore(off, nbytes).sum())
                finally:
                    if other is not None:
                        other.close()
                rows.append(ProbeRow(situation, name, nbytes // PAGE_SIZE, before, after))
                _reset(fd, mapping, off, nbytes)
    finally:
        mapping.close()
        os.close(fd)
    return rows


def format_table(rows: list[ProbeRow]) -> str:
    """Markdown table: evictors as rows, situations as columns, cells 'dropped %'."""
    sits = [s for s in SITUATIONS if any(r.situation == s for r in rows)]
    names = list(dict.fromkeys(r.evictor for r in rows))
    cell = {(r.evictor, r.situation): r for r in rows}
    lines = ["| evictor | " + " | ".join(sits) + " |",
             "| --- | " + " | ".join("---" for _ in sits) + " |"]
    for n in names:
        vals = []
        for s in sits:
            r = cell.get((n, s))
            vals.append("" if r is None else
                        f"{100 * r.dropped:.0f}% ({r.before}->{r.after})")
        lines.append(f"| {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
