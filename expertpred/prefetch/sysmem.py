"""Thin ctypes wrappers over the libc memory calls expertpred needs: the only libc binding.

Python's ``mmap`` module cannot give us what we need here: it has no ``MADV_COLD`` /
``MADV_PAGEOUT`` constants, no ``mincore``, and a read-only ``mmap.mmap`` does not expose
its address. So :class:`FileMapping` maps a file read-only with ``libc.mmap`` and offers
``madvise`` and ``mincore`` over byte ranges of the *file* (offsets are file offsets;
page alignment is done here). The mapping is never dereferenced by Python code, so a file
truncated underneath it cannot raise SIGBUS in our process: ``madvise`` / ``mincore`` only
look at page tables and the page cache.

ctypes releases the GIL around foreign calls, so ``madvise(MADV_WILLNEED)`` issued from a
worker thread does not stall the inference thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import mmap
import os
from functools import lru_cache
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


class Madvice(enum.IntEnum):
    """``madvise`` advice values (Linux, x86-64 / generic)."""

    NORMAL = 0
    RANDOM = 1
    SEQUENTIAL = 2
    WILLNEED = 3
    DONTNEED = 4
    COLD = 20  # deactivate: move to the inactive LRU, do not free (Linux >= 5.4)
    PAGEOUT = 21  # reclaim now if possible (Linux >= 5.4)
    POPULATE_READ = 22  # fault the pages in (read them), blocking (Linux >= 5.14)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    # lru_cache instead of a module global: loaded once, on first use.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _advice_name(advice: int) -> str:
    try:
        return Madvice(advice).name
    except ValueError:
        return str(int(advice))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def page_span(offset: int, nbytes: int) -> tuple[int, int]:
    """Page-aligned ``(start, length)`` covering ``[offset, offset + nbytes)``.

    >>> page_span(PAGE_SIZE + 1, 10) == (PAGE_SIZE, PAGE_SIZE)
    True
    >>> page_span(0, 0)
    (0, 0)
    """
    if nbytes <= 0:
        return offset - offset % PAGE_SIZE, 0
    start = offset - offset % PAGE_SIZE
    end = -(-(offset + nbytes) // PAGE_SIZE) * PAGE_SIZE
    return start, end - start


class FileMapping:
    """A read-only shared mapping of a whole file, addressed by file offsets.

    ``size`` defaults to the file's current size; a mapping may be longer than the file
    (pages past EOF are then simply never resident).
    """

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(fd).st_size if size is None else int(size)
            if self.size <= 0:
                raise OSError(22, f"{self.path}: cannot map an empty file")
            addr = _libc().mmap(None, self.size, _PROT_READ, _MAP_SHARED, fd, 0)
            if addr is None or addr == _MAP_FAILED:
                _check(-1, f"mmap {self.path}")
            self.addr: int = int(addr)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file

    @property
    def closed(self) -> bool:
        return self.addr == 0

    def close(self) -> None:
        if self.addr:
            _check(_libc().munmap(self.addr, self.size), f"munmap {self.path}")
            self.addr = 0

    def __enter__(self) -> FileMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _span(self, offset: int, nbytes: int) -> tuple[int, int]:
        if self.closed:
            raise ValueError(f"{self.path}: mapping is closed")
        start, length = page_span(offset, nbytes)
        end = min(start + length, self.size)
        if start < 0 or start >= self.size:
            raise ValueError(f"{self.path}: range at {offset} outside the {self.size}-byte mapping")
        return start, end - start

    def madvise(self, offset: int, nbytes: int, advice: Madvice | int) -> None:
        """``madvise`` over the pages covering the file range; raises OSError on failure."""
        start, length = self._span(offset, nbytes)
        if length:
            _check(_libc().madvise(self.addr + start, length, int(advice)),
                   f"madvise({_advice_name(advice)}) {self.path}@{offset}+{nbytes}")

    def mincore(self, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """Per-page residency (bool array) of the file range, from the page cache.

        For a shared file mapping the kernel answers from the page cache, whether or not
        this mapping has faulted the pages in.
        """
        if nbytes is None:
            nbytes = self.size - offset
        start, length = self._span(offset, nbytes)
        vec = np.zeros(length // PAGE_SIZE + (length % PAGE_SIZE > 0), dtype=np.uint8)
        if length:
            _check(_libc().mincore(self.addr + start, length, vec.ctypes.data),
                   f"mincore {self.path}@{offset}+{nbytes}")
        return (vec & 1).astype(bool)

    def resident_fraction(self, ranges: list[tuple[int, int]] | np.ndarray) -> float:
        """Fraction of the pages of ``ranges`` ((offset, nbytes) pairs) that are resident."""
        hit = total = 0
        for off, n in ranges:
            v = self.mincore(int(off), int(n))
            hit += int(v.sum())
            total += v.size
        return hit / total if total else 1.0

    def touch(self, offset: int, nbytes: int) -> int:
        """Read one byte per page of the range through this mapping (faults pages in).

        Used by tests and the eviction measurement to create pages that are *mapped*;
        returns the number of pages touched. Only call on ranges inside the file.
        """
        start, length = self._span(offset, nbytes)
        n = length // PAGE_SIZE
        buf = (ctypes.c_ubyte * length).from_address(self.addr + start)
        arr = np.frombuffer(buf, dtype=np.uint8)
        _ = int(arr[::PAGE_SIZE].sum())  # the read faults every page in
        return n


def fadvise(fd: int, offset: int, nbytes: int, advice: int) -> None:
    """``posix_fadvise`` (raises OSError); a tiny wrapper so callers name one module."""
    os.posix_fadvise(fd, offset, nbytes, advice)


class ProcessMapping(NamedTuple):
    """One mapping of a file in this process (a line of ``/proc/self/maps``)."""

    addr: int  # start address
    length: int  # bytes
    file_offset: int  # file offset mapped at ``addr``


def process_mappings(path: str | os.PathLike[str]) -> list[ProcessMapping]:
    """Every mapping of ``path`` in this process (llama.cpp's ``mmap`` of a model, ours)."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append(ProcessMapping(lo, hi - lo, int(fields[2], 16)))
    return out


def madvise_file_mappings(path: str | os.PathLike[str], advice: Madvice | int) -> int:
    """``madvise`` every mapping of ``path`` in this process (found in /proc/self/maps),
    e.g. the one llama.cpp made; returns the bytes advised (0: the file is not mapped)."""
    done = 0
    for m in process_mappings(path):
        _check(_libc().madvise(m.addr, m.length, int(advice)),
               f"madvise({os.path.realpath(path)})")
        done += m.length
    return done


def madvise_file_range(mapping: ProcessMapping, offset: int, nbytes: int,
                       advice: Madvice | int) -> int:
    """``madvise`` the part of file range ``[offset, offset + nbytes)`` that ``mapping``
    covers (page-aligned inward by the caller); returns the bytes advised, raises OSError."""
    lo = max(offset, mapping.file_offset)
    hi = min(offset + nbytes, mapping.file_offset + mapping.length)
    if hi <= lo:
        return 0
    addr = mapping.addr + (lo - mapping.file_offset)
    _check(_libc().madvise(addr, hi - lo, int(advice)),
           f"madvise({_advice_name(advice)}) at file offset {lo}+{hi - lo}")
    return hi - lo


def file_resident_bytes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(resident bytes, file size)`` of ``path`` per ``mincore(2)`` over a fresh read-only
    mapping (mapping a file does not fault its pages in, so this does not change what it
    measures)."""
    size = os.stat(path).st_size
    if size == 0:
        return 0, 0
    with FileMapping(path) as m:
        pages = int(m.mincore().sum())
    return min(pages * PAGE_SIZE, size), size


def own_memory_cgroup() -> str:
    """This process's path in the v1 memory hierarchy (``/`` when none is listed), from
    /proc/self/cgroup."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return "/"
