"""One fuzz case under limits: run a reader, classify what happened.

The outcome classes are what the hostile-input issue counts: a correct result, a clean
one-line :class:`ExpertPredError`, or a defect — a traceback (any other exception), a hang
(over the time limit), too much memory, or silent acceptance of an input the format's own
consistency checks call inconsistent.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from ...errors import ExpertPredError

log = logging.getLogger(__name__)


class Outcome(Enum):
    OK = "ok"
    CLEAN_ERROR = "clean error"
    TRACEBACK = "traceback"
    HANG = "hang"
    MEMORY = "memory"
    SILENT = "silent acceptance"

    @property
    def is_defect(self) -> bool:
        return self not in (Outcome.OK, Outcome.CLEAN_ERROR)


@dataclass(frozen=True)
class Limits:
    """What one input may cost (the issue's "~1 s or ~64 MiB per input")."""

    seconds: float = 1.0  # CPU time of the reader on one input
    peak_bytes: int = 64 << 20  # peak Python/numpy heap (tracemalloc) or Arrow pool
    kill_seconds: float = 20.0  # a case still running after this is aborted as a hang


@dataclass(frozen=True)
class Edit:
    """A mutation of one seed file: ``new = old[:lo] + data + old[hi:]``."""

    lo: int
    hi: int
    data: bytes
    label: str  # what was done, for reports (e.g. "set u32 llama.expert_count=0")

    def apply(self, old: bytes) -> bytes:
        return old[:self.lo] + self.data + old[self.hi:]


@dataclass(frozen=True)
class CaseResult:
    outcome: Outcome
    label: str  # the mutation
    detail: str  # error message, traceback tail or inconsistency
    seconds: float
    peak_bytes: int


class FuzzTarget(Protocol):
    """One format: seeded mutations of real files, a reader and its consistency check."""

    name: str

    def prepare(self, workdir: Path) -> None: ...

    def case(self, rng: random.Random) -> str:
        """Write the next mutated input into the work dir; return its label."""

    def read(self) -> object:
        """Read the current input with the reader under test."""

    def inconsistencies(self, result: object) -> list[str]:
        """Why an accepted input is inconsistent (empty: the result is correct)."""

    def restore(self) -> None:
        """Undo the current mutation."""


def _arrow_pool() -> object | None:
    """pyarrow's memory pool if pyarrow is loaded: Arrow buffers bypass tracemalloc."""
    import sys

    pa = sys.modules.get("pyarrow")
    return pa.default_memory_pool() if pa is not None else None


class _Timeout(BaseException):  # BaseException: a reader's `except Exception` must not eat it
    pass


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Abort Python code running longer than ``seconds`` (main thread only)."""
    def fire(signum: int, frame: object) -> None:
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def classify(read: Callable[[], object], check: Callable[[object], list[str]], label: str,
             limits: Limits = Limits()) -> CaseResult:
    """Run ``read`` once under ``limits`` and classify the outcome."""
    arrow = _arrow_pool()
    arrow_base = arrow.bytes_allocated() if arrow else 0
    arrow_peak0 = arrow.max_memory() if arrow else 0
    tracemalloc.start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    outcome, detail, result = Outcome.OK, "", None
    try:
        with _alarm(limits.kill_seconds):
            result = read()
    except _Timeout:
        outcome, detail = Outcome.HANG, f"killed after {limits.kill_seconds:.0f} s"
    except ExpertPredError as exc:
        msg = str(exc)
        outcome, detail = ((Outcome.CLEAN_ERROR, msg) if msg and "\n" not in msg
                           else (Outcome.TRACEBACK, f"multi-line or empty error: {msg!r}"))
    except Exception as exc:  # noqa: BLE001 - counting these is the point
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = Outcome.TRACEBACK
        detail = f"{type(exc).__name__}: {exc} ({os.path.basename(tb.filename)}:{tb.lineno})"
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if arrow and arrow.max_memory() > arrow_peak0:  # a new Arrow peak: set by this case
        peak = max(peak, arrow.max_memory() - arrow_base)
    if outcome is Outcome.OK:
        problems = check(result)
        if problems:
            outcome, detail = Outcome.SILENT, "; ".join(problems)
    if outcome in (Outcome.OK, Outcome.CLEAN_ERROR):
        # CPU time, not wall time: the machine is shared (a loaded box stretches wall time
        # 5-10x); a reader stuck in a loop burns CPU, one blocked on I/O hits kill_seconds
        if cpu > limits.seconds:
            outcome, detail = Outcome.HANG, f"{cpu:.2f} s CPU > {limits.seconds} s; {detail}"
        elif peak > limits.peak_bytes:
            outcome, detail = Outcome.MEMORY, f"peak {peak >> 20} MiB; {detail}"
    return CaseResult(outcome, label, detail[:500], seconds, peak)


def run_one(target: FuzzTarget, rng: random.Random, limits: Limits = Limits()) -> CaseResult:
    """Make one mutated input of ``target``, read it, classify, and undo the mutation."""
    label = target.case(rng)
    try:
        return classify(target.read, target.inconsistencies, label, limits)
    finally:
        target.restore()


class MutableFile:
    """A work copy of a seed file that edits are applied to and undone from, writing only
    the bytes that change (seeds are tens of MB; most edits touch a few bytes)."""

    def __init__(self, seed: Path, path: Path) -> None:
        self.seed = seed
        self.path = path
        self.original = seed.read_bytes()
        path.write_bytes(self.original)
        self._undo: Edit | None = None

    def apply(self, edit: Edit) -> None:
        assert self._undo is None, "restore() the previous edit first"
        with open(self.path, "r+b") as f:
            f.seek(edit.lo)
            if len(edit.data) == edit.hi - edit.lo:
                f.write(edit.data)
            else:
                f.write(edit.data + self.original[edit.hi:])
                f.truncate()
        self._undo = edit

    def restore(self) -> None:
        e, self._undo = self._undo, None
        if e is None:
            return
        with open(self.path, "r+b") as f:
            f.seek(e.lo)
            if len(e.data) == e.hi - e.lo:
                f.write(self.original[e.lo:e.hi])
            else:
                f.write(self.original[e.lo:])
                f.truncate()


# --- shared mutation helpers ---------------------------------------------------------------

def interesting_ints(width: int, original: int, rng: random.Random) -> int:
    """A value for an unsigned integer slot of ``width`` bytes: edges, near the original,
    or random."""
    top = (1 << (8 * width)) - 1
    picks = [0, 1, 2, top, top >> 1, (top >> 1) + 1, original + 1, max(0, original - 1),
             original * 2, original * 16, 1 << 31, 1 << 32 if width > 4 else top,
             rng.randrange(top + 1), rng.randrange(min(top, 4096) + 1)]
    return rng.choice(picks) & top


def flip_bytes(data: bytes, lo: int, hi: int, rng: random.Random, label: str,
               n_max: int = 8) -> Edit:
    """Overwrite 1..n_max random bytes inside [lo, hi) with random values."""
    pos = rng.randrange(lo, hi)
    n = min(rng.randint(1, n_max), hi - pos)
    return Edit(pos, pos + n, bytes(rng.randrange(256) for _ in range(n)),
                f"{label} flip {n} bytes at {pos}")


def truncate(size: int, lo: int, rng: random.Random, label: str) -> Edit:
    cut = rng.randrange(lo, size)
    return Edit(cut, size, b"", f"{label} truncate to {cut} of {size}")


def insert_delete(lo: int, hi: int, rng: random.Random, label: str) -> Edit:
    pos = rng.randrange(lo, hi)
    if rng.random() < 0.5:
        n = rng.randint(1, 16)
        return Edit(pos, pos, bytes(rng.randrange(256) for _ in range(n)),
                    f"{label} insert {n} bytes at {pos}")
    n = min(rng.randint(1, 16), hi - pos)
    return Edit(pos, pos + n, b"", f"{label} delete {n} bytes at {pos}")
