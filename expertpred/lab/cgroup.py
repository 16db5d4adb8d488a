"""Run a process with less memory than the model: cgroup v1 memory limits, page-cache
eviction and per-process I/O counters, shared by the end-to-end benchmark and the research
experiments.

Why a cgroup: llama.cpp maps the model and asks the kernel to read all of it
(``MAP_POPULATE`` + ``MADV_WILLNEED``); on a 24 GiB machine a few-GB model is then served
from the page cache and an SSD prefetcher has nothing to hide. Inside a memory cgroup whose
limit is below the model size, clean file pages are reclaimed within the group and expert
reads go back to the disk — the situation the prefetcher is for.

Two facts decide how to use it (see docs/memory-pressure.md):

1. A page-cache page is charged to the cgroup that first read it. Pages of the model that
   are already cached (charged to the caller's group) are *not* limited by a new group:
   :func:`evict_file` the model first.
2. ``posix_fadvise(DONTNEED)`` cannot drop pages that some process has mapped; evict
   before starting, not while llama.cpp is running.

Groups are created at the top of the v1 memory hierarchy
(``/sys/fs/cgroup/memory/expertpred-<name>-<pid>-<n>``), never inside the cgroup this
process runs in, and removed on exit.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import ExpertPredError
from ..prefetch.sysmem import file_resident_bytes, own_memory_cgroup

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
SWAPPINESS = Path("/proc/sys/vm/swappiness")
PAGE = os.sysconf("SC_PAGE_SIZE")
_counter = itertools.count()

# memory.stat keys callers care about (bytes, except the pg* event counts).
STAT_KEYS = ("cache", "rss", "mapped_file", "dirty", "pgpgin", "pgpgout", "pgfault",
             "pgmajfault", "inactive_file", "active_file", "workingset_refault_file")


# --- availability -----------------------------------------------------------------------


def why_unavailable(root: Path = CGROUP_ROOT) -> str | None:
    """None when memory cgroups can be used here, else a one-line reason."""
    if os.geteuid() != 0:
        return f"memory cgroups need root (running as uid {os.geteuid()})"
    if not (root / "memory.limit_in_bytes").is_file() or not (root / "cgroup.procs").is_file():
        return (f"{root}: no cgroup v1 memory controller (expected memory.limit_in_bytes and "
                "cgroup.procs there)")
    if not os.access(root, os.W_OK):
        return f"{root}: not writable (read-only cgroup mount?)"
    return None


def available(root: Path = CGROUP_ROOT) -> bool:
    """True when :class:`MemoryCgroup` works here. Callers that cannot limit memory should run
    without a limit only when the user asked for that, and say so."""
    return why_unavailable(root) is None


# --- per-process counters ------------------------------------------------------------------


class ProcIO(NamedTuple):
    """A process's I/O and fault counters (``/proc/<pid>/io`` + ``/proc/<pid>/stat``).

    ``read_bytes`` counts bytes the process caused to be read from storage (page faults on
    a mapping and readahead included); ``rchar`` counts read()-style syscall bytes, cached
    or not.
    """

    rchar: int
    read_bytes: int
    write_bytes: int
    syscr: int
    majflt: int
    minflt: int

    def __sub__(self, other: ProcIO) -> ProcIO:
        return ProcIO(*(a - b for a, b in zip(self, other)))


def proc_io(pid: int | None = None) -> ProcIO:
    """Counters of ``pid`` (default: this process). Reading another user's needs root."""
    base = Path("/proc") / (str(pid) if pid is not None else "self")
    io: dict[str, int] = {}
    for line in (base / "io").read_text().splitlines():
        k, _, v = line.partition(":")
        io[k.strip()] = int(v)
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may contain spaces or ")".
    rest = (base / "stat").read_text().rsplit(")", 1)[1].split()
    return ProcIO(rchar=io["rchar"], read_bytes=io["read_bytes"],
                  write_bytes=io["write_bytes"], syscr=io["syscr"],
                  majflt=int(rest[9]), minflt=int(rest[7]))


# --- page cache --------------------------------------------------------------------------


class Residency(NamedTuple):
    """How much of a file is in the page cache."""

    resident_bytes: int
    file_bytes: int

    @property
    def fraction(self) -> float:
        return self.resident_bytes / self.file_bytes if self.file_bytes else 0.0


def residency(path: str | os.PathLike[str]) -> Residency:
    """Resident bytes of ``path`` in the page cache (``mincore(2)``, see
    :func:`~expertpred.prefetch.sysmem.file_resident_bytes`)."""
    return Residency(*file_resident_bytes(path))


def evict_file(path: str | os.PathLike[str]) -> Residency:
    """Drop ``path`` from the page cache (write back dirty pages, then
    ``posix_fadvise(DONTNEED)`` over the whole file) and return what stayed resident.

    Pages mapped by a running process stay; the returned :class:`Residency` says how many.
    """
    path = Path(path)
    if not path.is_file():
        raise ExpertPredError(f"{path}: no such file to evict from the page cache")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # DONTNEED skips dirty pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = residency(path)
    if left.resident_bytes:
        log.info("%s: %d of %d bytes still resident after eviction (mapped elsewhere?)",
                 path, left.resident_bytes, left.file_bytes)
    return left


# --- swappiness ----------------------------------------------------------------------------


def get_swappiness() -> int:
    return int(SWAPPINESS.read_text())


def _set_swappiness(value: int) -> None:
    if not 0 <= value <= 200:
        raise ExpertPredError(f"swappiness {value}: expected 0..200")
    try:
        SWAPPINESS.write_text(f"{value}\n")
    except PermissionError:
        raise ExpertPredError(f"{SWAPPINESS}: setting swappiness needs root "
                              f"(running as uid {os.geteuid()})") from None


@contextmanager
def swappiness(value: int | None = None) -> Iterator[int]:
    """Set ``vm.swappiness`` to ``value`` (None: only guard it) for the block and always
    restore the original value, exceptions included. Yields the original value."""
    original = get_swappiness()
    if value is not None:
        _set_swappiness(value)
    try:
        yield original
    finally:
        if get_swappiness() != original:
            _set_swappiness(original)


# --- the cgroup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupCounters:
    """A snapshot of one group's memory accounting."""

    usage: int  # memory.usage_in_bytes
    max_usage: int  # memory.max_usage_in_bytes (peak since creation / reset_peak)
    failcnt: int  # times usage hit the limit (reclaim was forced)
    oom_kills: int  # processes the OOM killer killed in this group
    stat: Mapping[str, int] = field(default_factory=dict)  # memory.stat, STAT_KEYS subset

    def __getitem__(self, key: str) -> int:
        return self.stat[key]


@dataclass(frozen=True)
class RunResult:
    """What :meth:`MemoryCgroup.run` observed about one child process."""

    cmd: tuple[str, ...]
    returncode: int  # negative: killed by that signal (-9 = SIGKILL, e.g. the OOM killer)
    seconds: float
    io: ProcIO  # the child's own counters at exit
    max_rss: int  # bytes, from wait4's rusage
    before: CgroupCounters
    after: CgroupCounters
    stdout: str
    stderr: str

    @property
    def oom_killed(self) -> bool:
        return self.after.oom_kills > self.before.oom_kills


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit, removed on exit.

    >>> with MemoryCgroup("llama", 512 << 20) as cg:          # doctest: +SKIP
    ...     res = cg.run(["python", "bench.py"])
    ...     res.returncode, res.oom_killed, res.after.max_usage

    ``limit_bytes`` is also written to ``memory.memsw.limit_in_bytes`` when the kernel has
    it, so the group cannot fall back to swap.
    """

    def __init__(self, name: str, limit_bytes: int, *, swappiness: int | None = None,
                 root: Path = CGROUP_ROOT) -> None:
        self.name = name
        self.limit_bytes = limit_bytes
        self.swappiness = swappiness
        self.root = Path(root)
        self._path: Path | None = None

    # -- lifecycle --------------------------------------------------------------------
    @property
    def path(self) -> Path:
        if self._path is None:
            raise ExpertPredError(f"cgroup {self.name!r} is not open; use it as a context "
                                  "manager (with MemoryCgroup(...) as cg)")
        return self._path

    def open(self) -> MemoryCgroup:
        if self._path is not None:
            return self
        if reason := why_unavailable(self.root):
            raise ExpertPredError(reason)
        if self.limit_bytes < 4 * PAGE:
            raise ExpertPredError(f"cgroup limit {self.limit_bytes} bytes: expected at least "
                                  f"{4 * PAGE}")
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.name)
        path = self.root / f"expertpred-{safe}-{os.getpid()}-{next(_counter)}"
        path.mkdir()
        self._path = path
        try:
            self._write("memory.limit_in_bytes", self.limit_bytes)
            if (path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", self.limit_bytes)
            if self.swappiness is not None:
                self._write("memory.swappiness", self.swappiness)
        except BaseException:
            self.close()
            raise
        log.info("cgroup %s: limit %d bytes", path, self.limit_bytes)
        return self

    def close(self) -> None:
        """Move any remaining processes back to this process's own group, then remove the
        group (a v1 group with tasks cannot be removed)."""
        path, self._path = self._path, None
        if path is None or not path.exists():
            return
        home = self.root / own_memory_cgroup().lstrip("/")
        for attempt in range(50):
            for pid in _read_pids(path):
                try:
                    (home / "cgroup.procs").write_text(f"{pid}\n")
                except ProcessLookupError:
                    pass  # exited meanwhile
            try:
                path.rmdir()
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.02 * (attempt + 1))  # a task was exiting or just forked
        log.warning("cgroup %s could not be removed (still busy)", path)

    def __enter__(self) -> MemoryCgroup:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accounting -------------------------------------------------------------------
    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _write(self, name: str, value: int) -> None:
        try:
            (self.path / name).write_text(f"{value}\n")
        except OSError as exc:
            raise ExpertPredError(f"{self.path / name}: cannot write {value} "
                                  f"({exc.strerror})") from None

    def pids(self) -> list[int]:
        return _read_pids(self.path)

    def counters(self) -> CgroupCounters:
        stat = {}
        for line in self._read("memory.stat").splitlines():
            k, _, v = line.partition(" ")
            if k in STAT_KEYS:
                stat[k] = int(v)
        oom = 0
        for line in self._read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                oom = int(line.split()[1])
        return CgroupCounters(
            usage=int(self._read("memory.usage_in_bytes")),
            max_usage=int(self._read("memory.max_usage_in_bytes")),
            failcnt=int(self._read("memory.failcnt")), oom_kills=oom, stat=stat)

    def reset_peak(self) -> None:
        """Restart ``max_usage`` and ``failcnt`` (e.g. after the load phase)."""
        self._write("memory.max_usage_in_bytes", 0)
        self._write("memory.failcnt", 0)

    # -- running things inside --------------------------------------------------------
    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` prefixed so it joins the group before it execs: a shell writes its own pid
        to cgroup.procs and execs ``cmd`` (same pid; safe with threads, unlike preexec_fn)."""
        if not cmd:
            raise ExpertPredError("empty command to run in the cgroup")
        if shutil.which(cmd[0]) is None:
            raise ExpertPredError(f"{cmd[0]}: command not found")
        script = 'echo $$ > "$1" && shift && exec "$@"'
        return ["/bin/sh", "-c", script, "expertpred-cgroup", str(self.path / "cgroup.procs"),
                *map(str, cmd)]

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start ``cmd`` inside the group; ``kwargs`` go to :class:`subprocess.Popen`."""
        return subprocess.Popen(self.wrap(cmd), **kwargs)  # type: ignore[call-overload]

    def run(self, cmd: Sequence[str], *, timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
            ) -> RunResult:
        """Run ``cmd`` to completion inside the group and collect its counters.

        The child's ``/proc/<pid>/io`` is read after it exits but before it is reaped
        (``waitid(WNOWAIT)``), so its final I/O counters are exact. Output is captured
        through temporary files (no pipe can fill up). On ``timeout`` the child is killed
        and :class:`subprocess.TimeoutExpired` raised.
        """
        before = self.counters()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            proc = self.popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
            try:
                io = _wait_exited(proc.pid, timeout, t0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            seconds = time.perf_counter() - t0
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        return RunResult(cmd=tuple(map(str, cmd)), returncode=proc.returncode, seconds=seconds,
                         io=io, max_rss=usage.ru_maxrss * 1024, before=before,
                         after=self.counters(), stdout=stdout, stderr=stderr)


def _wait_exited(pid: int, timeout: float | None, t0: float) -> ProcIO:
    """Block until ``pid`` has exited, without reaping it, and read its final counters."""
    flags = os.WEXITED | os.WNOWAIT
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, flags | os.WNOHANG) is not None:
            return proc_io(pid)
        if timeout is not None and time.perf_counter() - t0 > timeout:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []
