"""The residency manager: keeps llama.cpp's expert weights within a byte budget, in its own
process, by evicting the experts a policy values least.

The plugin's eval callback posts one record per routed layer (:meth:`ResidencyManager.
post_step`) and per speculative prefetch (:meth:`post_prefetch`); the manager's own thread
feeds them, in order, to a :class:`~expertpred.prefetch.residency_policy.ResidencySet` (the
object the cache simulator replays traces through) and executes its decisions:

- **eviction** of an expert: ``MADV_PAGEOUT`` on the page-aligned inner pages of each of its
  byte ranges in every mapping of the model in this process (llama.cpp's own ``mmap`` and
  the prefetch engine's), then ``POSIX_FADV_DONTNEED`` for pages nobody maps (read by the
  engine's fadvise but not faulted in yet). Pages another mapping holds cannot be dropped
  from outside it (docs/eviction.md); inside llama.cpp's process they can (REFERENCE.md).
  If the kernel refuses the call (``EINVAL`` on a kernel without ``MADV_PAGEOUT``,
  ``EPERM``, ...) the manager falls back to ``kernel`` residency with one warning;
- **bypass**: an expert just used and predicted not to return soon is evicted at the next
  step, once its matmul is done;
- **admission** happens through the prefetch engine (d0 and speculative reads): the manager
  only accounts what the engine and llama.cpp read.

Bookkeeping is checked against the page cache with ``mincore`` at the token boundary after
each batch of several tokens (a prompt) and every ``mincore_interval`` seconds
(:attr:`ResidencyStats.measured_resident_bytes`); kept experts the kernel's reclaim took
anyway leave the bookkeeping (``Event.LOST``, ``lost`` in the counters). If the model file
is truncated or replaced, eviction stops and the stats say why (the prefetch engine turns
itself off on the same check); inference is never touched: evicted pages fault back in from
the file.

Budget (bytes of expert weights): given by the user, or derived when the model is loaded:
the memory limit (cgroup v1 ``memory.limit_in_bytes``, else ``MemAvailable``) minus what the
process holds outside the experts (cgroup usage or ``RssAnon``, minus resident expert pages)
minus headroom for one layer's selected experts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import MoELayout
from ..learn.residency_policy import Event, Record, ResidencyCounters, ResidencySet, make_policy
from .sysmem import (
    PAGE_SIZE,
    FileMapping,
    Madvice,
    ProcessMapping,
    madvise_file_range,
    own_memory_cgroup,
)
from .sysmem import process_mappings as _process_mappings

if TYPE_CHECKING:
    from ..predictors.nextuse import NextUseModel

log = logging.getLogger(__name__)

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class ResidencyConfig:
    """What the residency manager does; the benchmark and the CLI select modes with it."""

    policy: str = "kernel"  # kernel | lru | lfu | learned | belady (residency_policy)
    budget_bytes: int | None = None  # expert bytes kept resident; None = derive at load
    nextuse_path: str = ""  # next-use model .npz (`expertpred train` writes nextuse.npz)
    evict_mappings: bool = True  # MADV_PAGEOUT on every mapping of the model, not only fadvise
    evict_advice: int = int(Madvice.PAGEOUT)  # the madvise advice that evicts (tests vary it)
    record: bool = False  # keep every applied record (`records_`) for replay checks
    # seconds between mincore checks of the bookkeeping (0: every token). One check of a
    # 3 GiB file costs ~55 ms of CPU (mincore of 787k pages + the per-expert sums); every
    # token it was most of the manager's 54-76 ms of CPU per decode token on tiny-olmoe,
    # taken from llama.cpp's compute on 2 cores (docs/e2e.md)
    mincore_interval: float = 5.0


def make_config(policy: str, budget_bytes: int | None = None,
                nextuse: str | os.PathLike[str] | None = None,
                predictor_dir: str | os.PathLike[str] | None = None) -> ResidencyConfig | None:
    """The config for ``policy`` (None: ``kernel`` without a budget, nothing to manage).
    ``learned`` takes ``nextuse``, else ``nextuse.npz`` in ``predictor_dir`` (where
    ``expertpred train`` writes it)."""
    from ..learn.residency_policy import POLICIES

    if policy not in POLICIES:
        raise ExpertPredError(f"residency policy {policy!r}: expected one of "
                              f"{', '.join(sorted(POLICIES))}")
    if policy == "kernel" and budget_bytes is None:
        return None
    path = ""
    if policy == "learned":
        if nextuse is None and predictor_dir is not None and Path(predictor_dir).is_dir():
            nextuse = Path(predictor_dir) / "nextuse.npz"
        if nextuse is None or not Path(nextuse).is_file():
            raise ExpertPredError(f"residency 'learned': next-use model {nextuse or '(none)'} "
                                  "not found; expected --nextuse PATH (expertpred train writes "
                                  "<out>/models/nextuse.npz)")
        path = str(nextuse)
    return ResidencyConfig(policy=policy, budget_bytes=budget_bytes, nextuse_path=path)


@dataclass(frozen=True)
class MemoryLimit:
    """The memory this process may use, and where the number comes from."""

    limit_bytes: int  # the cgroup limit, or MemTotal when the cgroup has none
    cgroup: str  # v1 memory cgroup path, "" when unlimited
    usage_bytes: int  # cgroup usage now (0 without a cgroup limit)
    available_bytes: int  # what may still be taken: limit - usage, or MemAvailable


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) * 1024
    return out


def memory_limit() -> MemoryLimit:
    """This process's memory limit (cgroup v1 when limited, else the machine's)."""
    group = own_memory_cgroup()
    d = CGROUP_MEMORY / group.lstrip("/")
    try:
        limit = int((d / "memory.limit_in_bytes").read_text())
        usage = int((d / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        limit, usage = NO_LIMIT, 0
    mi = _meminfo()
    if limit >= NO_LIMIT or limit >= mi["MemTotal"]:
        return MemoryLimit(mi["MemTotal"], "", 0, mi.get("MemAvailable", mi["MemFree"]))
    return MemoryLimit(limit, group, usage, max(limit - usage, 0))


def layer_selection_bytes(layout: MoELayout) -> int:
    """The most bytes one layer's selected experts take (they are needed all at once)."""
    per_expert = layout.nbytes.sum(axis=2)  # (L, E)
    top = -np.sort(-per_expert, axis=1)[:, :layout.n_expert_used]
    return int(top.sum(axis=1).max())


def check_budget(budget: int, layout: MoELayout, limit: MemoryLimit, what: str) -> None:
    """One-line error unless ``one layer's selection <= budget <= limit``."""
    low = layer_selection_bytes(layout)
    if budget < low:
        raise ExpertPredError(f"{what}: budget {budget} bytes is below one layer's selected "
                              f"experts ({low} bytes); expected at least {low}")
    if budget > limit.limit_bytes:
        src = f"cgroup {limit.cgroup}" if limit.cgroup else "MemTotal"
        raise ExpertPredError(f"{what}: budget {budget} bytes is above the memory limit "
                              f"({limit.limit_bytes} bytes, {src}); expected at most that")


SAMPLE_PAGES = 8  # pages per expert part the check after a batch reads (in its middle)


def _inner_spans(layout: MoELayout) -> tuple[np.ndarray, np.ndarray]:
    """Page-aligned (start, end) byte offsets of the pages fully inside each expert part
    (L, E, P): neighbours' shared edge pages are never evicted."""
    off, n = layout.offsets, layout.nbytes
    start = -(-off // PAGE_SIZE) * PAGE_SIZE
    end = (off + n) // PAGE_SIZE * PAGE_SIZE
    return start, np.maximum(end, start)


@dataclass(frozen=True)
class ResidencyStats:
    """A snapshot of what the manager did; exported by the plugin stats and the server."""

    policy: str  # the configured policy
    active_policy: str  # what runs now: "kernel" after a fallback
    budget_bytes: int  # expert bytes allowed resident (0 until derived)
    enabled: bool  # still evicting
    disabled_reason: str  # why not ("" while enabled)
    counters: ResidencyCounters  # the policy's decisions (bookkeeping)
    evict_calls: int  # madvise / fadvise calls issued
    evict_errors: int  # of which the kernel refused
    measured_resident_bytes: int  # expert bytes mincore found resident at the last check
    mincore_checks: int  # how many checks so far
    dropped_posts: int  # records refused because the handoff was full
    # CPU time of the manager's thread: on a 2-core box it is taken from llama.cpp's compute
    # (the learned policy re-predicts a layer's row per step)
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        from dataclasses import asdict

        d = asdict(self)
        d.update(d.pop("counters"))
        return d


@dataclass
class _Live:
    """Counters only the manager's thread writes (read racily for stats)."""

    evict_calls: int = 0
    evict_errors: int = 0
    measured_resident_bytes: int = 0
    mincore_checks: int = 0
    dropped_posts: int = 0
    cpu_seconds: float = 0.0
    mincore_at: float = float("-inf")  # time.monotonic() of the last mincore check
    pending_bypass: list[int] = field(default_factory=list)


class ResidencyManager:
    """Residency of one model file's experts in this process (see module docstring).

    ``start()`` checks the configuration (before the model loads: a bad budget costs
    nothing), ``attach()`` after llama.cpp mapped the model derives the default budget,
    adopts what is resident and starts the thread; ``close()`` stops it (bounded).
    ``future``: experts (T, L, k) of the same greedy run by position (``belady``).
    """

    def __init__(self, gguf_path: str | os.PathLike[str], layout: MoELayout,
                 config: ResidencyConfig, future: np.ndarray | None = None,
                 model: NextUseModel | None = None, max_handoff: int = 1 << 14) -> None:
        self.gguf_path = os.fspath(gguf_path)
        self.layout = layout
        self.config = config
        self.future = future
        self.model = model
        self.max_handoff = max_handoff
        self._started = False
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> ResidencyManager:
        cfg, lay = self.config, self.layout
        model = self.model
        if cfg.policy == "learned" and model is None:
            if not cfg.nextuse_path:
                raise ExpertPredError("residency 'learned' needs a next-use model "
                                      "(--nextuse PATH, written by expertpred train)")
            from ..predictors.nextuse import NextUseModel

            model = NextUseModel.load(cfg.nextuse_path)
        self.policy_ = make_policy(cfg.policy, future=self.future, model=model)
        self.limit_ = memory_limit()
        if cfg.budget_bytes is not None:
            check_budget(cfg.budget_bytes, lay, self.limit_, self.gguf_path)
        self.n_layer_, self.n_expert_ = len(lay.moe_layers), lay.n_expert
        self.set_ = ResidencySet(self.policy_, self.n_layer_, self.n_expert_,
                                 lay.nbytes.sum(axis=2), cfg.budget_bytes or 0)
        self._span_lo, self._span_hi = _inner_spans(lay)
        # bytes of each expert's inner pages (L·E,): what mincore can find resident of it
        self._inner_bytes = (self._span_hi - self._span_lo).sum(axis=2).reshape(-1)
        self._live = _Live()
        self._lock = threading.Lock()  # guards set_ (thread vs stats/adopt)
        self._ops: deque[tuple[int, int, int, tuple[int, ...]]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy = False
        self._disabled = ""
        self._active = cfg.policy
        self._recent_prefetch: set[int] = set()  # keys prefetched since the last step
        self._after_batch = False  # a step since the last token boundary was a batch's
        self.records_: list[Record] = []
        self._started = True
        return self

    def attach(self, extra: list[FileMapping] | None = None) -> int:
        """The model is mapped: find its mappings, set the budget, adopt what is resident,
        start the thread. ``extra``: our own mappings of the file (the engine's). Returns
        the budget in bytes."""
        if not self._started:
            raise RuntimeError("ResidencyManager.attach() before start()")
        st = os.stat(self.gguf_path)
        self._identity = (st.st_dev, st.st_ino)
        self.fd_ = os.open(self.gguf_path, os.O_RDONLY | os.O_CLOEXEC)
        self.map_ = FileMapping(self.gguf_path)  # for mincore; never read through
        self._extra = list(extra or [])
        self.mappings_: list[ProcessMapping] = [
            m for m in _process_mappings(self.gguf_path) if m.addr != self.map_.addr
            and all(m.addr != x.addr for x in self._extra)]
        budget = self.config.budget_bytes
        if budget is None:
            budget = self._default_budget()
            check_budget(budget, self.layout, self.limit_, f"{self.gguf_path} (default)")
        self.set_.budget_bytes = budget
        if self.set_.policy.manages:
            self._adopt()
        self._thread = threading.Thread(target=self._main, name="residency", daemon=True)
        self._thread.start()
        log.info("residency %s: budget %.0f MiB, %d llama.cpp mapping(s)", self.config.policy,
                 budget / 2**20, len(self.mappings_))
        return budget

    def close(self, timeout: float = 2.0) -> None:
        if not self._started:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("residency thread still running after %.1fs", timeout)
                return  # keep the descriptor rather than race the thread
        if hasattr(self, "map_"):
            self.map_.close()
            os.close(self.fd_)
        self._started = False

    def __enter__(self) -> ResidencyManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- posting (the inference thread: a deque append, never blocks) ----------------------
    _STEP, _PREFETCH, _TOKEN = 0, 1, 2

    def post_token(self, t: int, token: int) -> None:
        """The token at position ``t`` has id ``token`` (its first layer routes next); the
        ``learned`` policy's next-use model re-predicts with it."""
        self._post((self._TOKEN, t, -1, (int(token),)))

    def post_step(self, t: int, li: int, experts: list[int]) -> None:
        """Layer ``li`` (MoE index) of the token at position ``t`` routed ``experts``."""
        self._post((self._STEP, t, li, tuple(experts)))

    def not_resident(self, li: int, experts: list[int]) -> list[int]:
        """Those of ``experts`` of MoE layer ``li`` that the bookkeeping does not hold.
        Read without the lock, from the inference thread: a stale answer costs one hint
        that was not needed, or one expert read on demand instead of ahead."""
        if not self._started or self._disabled:  # off or fallen back: the kernel decides
            return experts
        resident, base = self.set_.resident, li * self.n_expert_
        return [e for e in experts if not resident[base + e]]

    def post_prefetch(self, li: int, experts: list[int]) -> None:
        """The engine was asked to read ``experts`` of MoE layer ``li`` ahead of use."""
        self._post((self._PREFETCH, -1, li, tuple(experts)))

    def _post(self, op: tuple[int, int, int, tuple[int, ...]]) -> None:
        if not self._started or self._thread is None:
            return
        if len(self._ops) >= self.max_handoff:
            self._live.dropped_posts += 1
            return
        self._ops.append(op)
        self._wake.set()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every posted record is applied; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._ops or self._busy:
            alive = self._thread is not None and self._thread.is_alive()
            if time.monotonic() >= deadline or not alive:
                return False
            time.sleep(0.0005)
        return True

    # --- the thread ----------------------------------------------------------------------
    def _main(self) -> None:
        t_last, li_last = -1, -1
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            cpu0 = time.thread_time()
            while self._ops and not self._stop.is_set():
                self._busy = True
                try:
                    kind, t, li, experts = self._ops.popleft()
                    if kind == self._STEP:
                        if li <= li_last or t != t_last:
                            self._token_boundary()
                        t_last, li_last = t, li
                        self._apply_step(t, li, experts)
                    elif kind == self._TOKEN:
                        self._apply_token(t, experts[0])
                    else:
                        self._apply_prefetch(t_last, li_last, li, experts)
                except Exception as exc:  # noqa: BLE001 - the thread must survive
                    log.exception("residency: applying a record failed")
                    self._disable(f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    self._busy = False
            self._live.cpu_seconds += time.thread_time() - cpu0

    def _apply_step(self, t: int, li: int, experts: tuple[int, ...]) -> None:
        self._recent_prefetch.clear()
        if len(experts) > self.layout.n_expert_used:  # a union: several tokens in one batch
            self._after_batch = True
        bypassed, self._live.pending_bypass = self._live.pending_bypass, []
        self._evict(bypassed)  # their matmuls ran before this layer routed
        if self.config.record:
            self.records_.append(Record(Event.STEP, t, li, experts))
        with self._lock:
            d = self.set_.step(t, li, experts)
        self._evict(d.evict)
        self._live.pending_bypass = list(d.bypass)

    def _apply_token(self, t: int, token: int) -> None:
        if self.config.record:
            self.records_.append(Record(Event.TOKEN, t, -1, (token,)))
        with self._lock:
            self.set_.begin_token(t, token)

    def _apply_prefetch(self, t: int, li_now: int, li: int, experts: tuple[int, ...]) -> None:
        keys = tuple(li * self.n_expert_ + e for e in experts)
        if self.config.record:
            self.records_.append(Record(Event.PREFETCH, t, li_now, keys))
        with self._lock:
            d = self.set_.prefetch(t, li_now, keys)
        self._recent_prefetch.update(keys)  # their reads may still be under way
        self._evict(d.evict)  # including prefetched keys dropped at once: nothing uses them yet
        # the routed layer's experts the prefetch displaced: its matmuls may be running now
        # (evicting mid-matmul re-reads them by faults); evict them at the next step
        self._live.pending_bypass.extend(d.bypass)

    def _token_boundary(self) -> None:
        """Once per token: check the file and measure residency."""
        if self._disabled:
            return
        why = self._check_file()
        if why:
            self._disable(why)
            return
        live, now = self._live, time.monotonic()
        manages = self.set_.policy.manages
        if (manages and now - live.mincore_at >= self.config.mincore_interval) \
                or live.mincore_checks == 0:
            have = self.measured().reshape(-1)  # the whole file: ~45 ms for 3 GiB here
            live.measured_resident_bytes = int(have.sum())
            live.mincore_checks += 1
            live.mincore_at = now
            if manages and live.mincore_checks > 1:
                with self._lock:
                    gone = self.set_.resident & (have * 2 < np.maximum(self._inner_bytes, 1))
                self._sync(gone)
        elif manages and self._after_batch:
            live.mincore_checks += 1
            self._sync(self._sampled_gone())
        self._after_batch = False

    def _sampled_gone(self) -> np.ndarray:
        """bool (L·E,) kept experts whose sampled pages are mostly gone: SAMPLE_PAGES pages
        in the middle of each part, booked experts only (~1 ms for a hundred experts,
        where mincore over the whole file costs ~45 ms). An expert's pages are read
        together and age together in the kernel's LRU, so reclaim takes them together."""
        with self._lock:
            keys = np.flatnonzero(self.set_.resident)
        gone = np.zeros(self.n_layer_ * self.n_expert_, bool)
        lo = self._span_lo.reshape(-1, self._span_lo.shape[-1])
        hi = self._span_hi.reshape(-1, self._span_hi.shape[-1])
        for k in keys.tolist():
            have = total = 0
            for a, b in zip(lo[k].tolist(), hi[k].tolist()):
                if b <= a:
                    continue
                n = min(b - a, SAMPLE_PAGES * PAGE_SIZE)
                mid = (a + b - n) // 2 // PAGE_SIZE * PAGE_SIZE
                v = self.map_.mincore(mid, n)
                have, total = have + int(v.sum()), total + v.size
            gone[k] = total > 0 and have * 2 < total
        return gone

    def _sync(self, gone: np.ndarray) -> None:
        """Stop counting kept experts the kernel's reclaim took anyway (``gone``: bool
        (L·E,)). A prompt's batch reads a union of experts per layer, several times the
        one-layer headroom of the default budget, and the cgroup's reclaim then takes pages
        the manager keeps: 14-25 of tiny-qwen3moe's 12 MiB experts over the benchmark's
        17-token prompt (in decode 0-4 per token, with 48 MiB experts or an oracle's
        prefetches; docs/e2e.md, "Session 8"). Counted as resident, they shrank the room the
        policy had for the next tokens and their reads counted as hits. The rest of a lost
        expert is evicted, so that what is resident is what is counted."""
        with self._lock:
            gone = gone & self.set_.resident
            if self._recent_prefetch:  # being read now, not lost
                gone[list(self._recent_prefetch)] = False
            keys = np.flatnonzero(gone)
            if not keys.size:
                return
            if self.config.record:
                self.records_.append(Record(Event.LOST, -1, -1, tuple(keys.tolist())))
            self.set_.lose(keys)
        self._evict(keys.tolist())

    # --- eviction ------------------------------------------------------------------------
    def _evict(self, keys: list[int] | tuple[int, ...]) -> None:
        if not keys or self._disabled or self._active == "kernel":
            return
        e_n = self.n_expert_
        for key in keys:
            li, e = divmod(int(key), e_n)
            for lo, hi in zip(self._span_lo[li, e].tolist(), self._span_hi[li, e].tolist()):
                if hi <= lo:
                    continue
                try:
                    self._evict_range(lo, hi - lo)
                except OSError as exc:
                    self._live.evict_errors += 1
                    self._fallback(f"the kernel refused eviction ({exc})")
                    return

    def _evict_range(self, offset: int, nbytes: int) -> None:
        if self.config.evict_mappings:
            for m in self.mappings_:
                if madvise_file_range(m, offset, nbytes, self.config.evict_advice):
                    self._live.evict_calls += 1
            for fm in self._extra:
                if not fm.closed:
                    fm.madvise(offset, nbytes, self.config.evict_advice)
                    self._live.evict_calls += 1
        if self.config.evict_advice == Madvice.COLD:
            # MADV_COLD only marks the pages as the next to reclaim and frees nothing: the
            # cgroup's reclaim frees them when room is needed, so dropping them now is moot
            return
        os.posix_fadvise(self.fd_, offset, nbytes, os.POSIX_FADV_DONTNEED)
        self._live.evict_calls += 1

    def _fallback(self, why: str) -> None:
        if self._active != "kernel":
            self._active = "kernel"
            self._disabled = f"fell back to kernel residency: {why}"
            log.warning("residency %s: %s; leaving residency to the kernel (output "
                        "unchanged)", self.config.policy, why)

    def _disable(self, why: str) -> None:
        if not self._disabled:
            self._disabled = why
            log.warning("residency disabled for %s: %s", self.gguf_path, why)

    def _check_file(self) -> str:
        try:
            st = os.stat(self.gguf_path)
        except OSError as exc:
            return f"file removed ({exc.strerror})"
        if (st.st_dev, st.st_ino) != self._identity:
            return "file replaced (different inode)"
        if os.fstat(self.fd_).st_size != self.layout.file_size:
            return (f"file size changed to {os.fstat(self.fd_).st_size} bytes (expected "
                    f"{self.layout.file_size})")
        return ""

    # --- measurement ---------------------------------------------------------------------
    def measured(self) -> np.ndarray:
        """int64 (L, E): bytes of each expert's inner pages resident (mincore)."""
        vec = self.map_.mincore(0, self.map_.size)
        cs = np.concatenate([[0], np.cumsum(vec, dtype=np.int64)])
        lo = np.minimum(self._span_lo // PAGE_SIZE, vec.size)
        hi = np.minimum(self._span_hi // PAGE_SIZE, vec.size)
        return ((cs[hi] - cs[lo]) * PAGE_SIZE).sum(axis=2)

    def _adopt(self) -> None:
        """Start from the page cache: experts mostly resident join the bookkeeping (the
        policy trims them to the budget), the rest of any expert is evicted."""
        have = self.measured().reshape(-1)
        mostly = have * 2 >= np.maximum(self._inner_bytes, 1)
        keys = np.flatnonzero(mostly)
        partial = np.flatnonzero(~mostly & (have > 0))
        if self.config.record:
            self.records_.append(Record(Event.ADOPT, -1, -1, tuple(keys.tolist())))
        with self._lock:
            evicted = self.set_.adopt(keys)
        self._evict(list(partial) + list(evicted))

    def _default_budget(self) -> int:
        """Limit minus the footprint outside the experts minus one layer's headroom."""
        lim = memory_limit()
        experts = int(self.measured().sum())
        if lim.cgroup:
            outside = max(lim.usage_bytes - experts, 0)
            room = lim.limit_bytes - outside
        else:
            room = lim.available_bytes + experts
        slack = layer_selection_bytes(self.layout) + lim.limit_bytes // 32
        total = int(self.layout.nbytes.sum())
        return int(max(min(room - slack, total), 0))

    # --- stats ---------------------------------------------------------------------------
    def stats(self) -> ResidencyStats:
        live = self._live
        with self._lock:
            c = replace(self.set_.counters)
        return ResidencyStats(
            policy=self.config.policy, active_policy=self._active,
            budget_bytes=int(self.set_.budget_bytes), enabled=not self._disabled,
            disabled_reason=self._disabled, counters=c, evict_calls=live.evict_calls,
            evict_errors=live.evict_errors,
            measured_resident_bytes=live.measured_resident_bytes,
            mincore_checks=live.mincore_checks, dropped_posts=live.dropped_posts,
            cpu_seconds=live.cpu_seconds)
