"""Training rows that live on Dask workers: one partition per trace shard.

:class:`RowSet` is what :func:`~expertpred.features.build_features` is on one machine,
spread over a cluster: every shard's training sequences go through the one feature builder
on a worker (the batch stays there, a future), and the driver holds only row counts.

Sampling is the single-process one, distributed. ``build_features(max_rows=m, seed=s)``
keeps the ``m`` rows with the smallest keys of ``default_rng(s).random``, drawn in stream
order; row ``j``'s key is the stream's ``j``-th double, so a partition draws its own keys
after ``advance(offset)``, and the ``m``-th smallest key is found by a tree of merges on
the workers. The kept rows are then the very rows one process keeps, and every table
counted over them is bit-identical. The learned rungs' own sub-samples (``max_rows`` of
LightGBM and the MLP: ``default_rng(seed).permutation(n)[:m]``) are drawn by one worker
task and cut per partition, so they too are the single-process rows.

The functions prefixed ``task_`` run on the workers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, FeatureConfig, ModelInfo, concat, iter_feature_batches
from ..trace.record import SequenceTrace
from .cluster import workers

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a blocked driver looks for lost workers
HEAD_ROWS = 64  # rows fetched to the driver to fit the data-free parts (designs, gates)


class Progress(Protocol):
    """Where distributed training reports its steps (a CLI progress bar, a log, nothing)."""

    def start(self, step: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NoProgress:
    def start(self, step: str, total: int) -> None:
        log.info("%s (%d)", step, total)

    def advance(self, n: int = 1) -> None:
        pass


class WorkerLostError(ExpertPredError):
    """A worker of the cluster went away while training: nothing was saved."""


class Guard:
    """Runs the driver's blocking calls while watching the cluster: a worker that dies
    mid-step turns into one :class:`WorkerLostError` instead of a hang (LightGBM's and
    torch's collectives wait for a peer that is gone) or a retried-but-misplaced task."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.workers = workers(client)  # the set training started with; rank i = [i]

    def lost(self) -> list[str]:
        if self.client.status != "running":  # the scheduler itself is gone
            return list(self.workers)
        now = set(workers(self.client))
        return [w for w in self.workers if w not in now]

    def check(self, step: str) -> None:
        gone = self.lost()
        if gone:
            raise WorkerLostError(f"dask worker {gone[0]} died during {step}; training "
                                  "stopped and no model was written (restart the command)")

    def run(self, fn: Callable[[], Any], step: str,
            on_poll: Callable[[], None] | None = None) -> Any:
        """``fn()`` in a daemon thread, polled: its result, its error, or the lost worker
        (``on_poll``: called at each poll, e.g. to move a progress bar)."""
        self.check(step)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the driver thread below
                box["error"] = exc

        t = threading.Thread(target=target, name=f"expertpred-{step}", daemon=True)
        t.start()
        while t.is_alive():
            t.join(POLL_S)
            if t.is_alive():
                self.check(step)
                if on_poll is not None:
                    on_poll()
        if "error" in box:
            self.check(step)  # a worker death surfaces as many error types: name the cause
            raise box["error"]
        return box["value"]

    def gather(self, futures: Any, step: str) -> Any:
        return self.run(lambda: self.client.gather(futures), step)


# --- worker tasks -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInput:
    """One partition's sequences: a dataset shard's training sequences (read by the worker),
    or synthetic traces sent along."""

    dataset: str  # trace dataset directory; "" = ``traces`` holds the sequences
    seq_ids: tuple[int, ...]  # in the shard's order
    traces: tuple[SequenceTrace, ...] = ()


def _sequences(inp: ShardInput) -> Any:
    if not inp.dataset:
        return iter(inp.traces)
    from ..trace.dataset import TraceDataset

    return TraceDataset(inp.dataset).sequences(seq_ids=list(inp.seq_ids))


def task_sequences(inputs: Sequence[ShardInput]) -> Any:
    """The partitions' sequences one after another (the stream order)."""
    return (t for inp in inputs for t in _sequences(inp))


def dataset_identity(dataset: str) -> str:
    """sha256 of the trace dataset's manifest as this process opens it (``error: why``
    when it cannot): run on every worker by :func:`check_dataset`."""
    from ..trace.dataset import TraceDataset

    try:
        return hashlib.sha256(TraceDataset(dataset).manifest_path.read_bytes()).hexdigest()
    except (ExpertPredError, OSError) as exc:
        return "error: " + " ".join(str(exc).split())[:200]


def check_dataset(client: Any, dataset: str) -> None:
    """Every worker opens ``dataset`` (an absolute path) and finds the driver's manifest:
    workers read their shards themselves, so a missing path (no shared filesystem) or
    another dataset there is one error line now, not a failed task later."""
    want = dataset_identity(dataset)
    if want.startswith("error: "):
        raise ExpertPredError(want[len("error: "):])
    theirs = client.run(dataset_identity, dataset)
    for addr in sorted(theirs):
        got = theirs[addr]
        if got != want:
            why = got[len("error: "):] if got.startswith("error: ") else \
                "its manifest differs from this driver's (another dataset at that path)"
            raise ExpertPredError(f"dask worker {addr} cannot read the trace dataset "
                                  f"{dataset}: {why}; every worker reads its shards itself, "
                                  "so the dataset must be at this path on every worker (a "
                                  "shared filesystem)")


def task_count_rows(inp: ShardInput, n_src: int, phase: int | None) -> int:
    """Rows the feature builder makes of the partition: ``n_src`` source layers for every
    token (of ``phase``); :func:`task_features` checks the count it then builds."""
    if n_src <= 0:
        return 0
    return n_src * sum(int(t.n_tokens if phase is None else np.count_nonzero(t.phase == phase))
                       for t in _sequences(inp))


def _keys(seed: int, offset: int, n: int) -> np.ndarray:
    """Keys of stream rows ``offset .. offset + n``: ``build_features``' draws for them."""
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(offset)
    return rng.random(n)


def task_bottom_keys(seed: int, offset: int, n: int, m: int) -> np.ndarray:
    return np.sort(_keys(seed, offset, n))[:m]


def task_merge_keys(a: np.ndarray, b: np.ndarray, m: int) -> np.ndarray:
    return np.sort(np.concatenate([a, b]))[:m]


def task_features(inp: ShardInput, model: ModelInfo, config: FeatureConfig,
                  phase: int | None, n_expected: int, seed: int, offset: int,
                  threshold: float | None) -> FeatureBatch | None:
    """The partition's examples (the one feature builder), only those whose key is at most
    ``threshold`` when sampling; None if none. Holds one partition's rows at a time."""
    batches = list(iter_feature_batches(_sequences(inp), model, config, phase=phase))
    b = concat(batches) if batches else None
    if task_len(b) != n_expected:
        raise ExpertPredError(f"{inp.dataset or 'synthetic traces'}: built {task_len(b)} "
                              f"rows for d={config.d}, counted {n_expected}")
    if b is None or threshold is None:
        return b
    keep = np.flatnonzero(_keys(seed, offset, len(b)) <= threshold)
    return b.take(keep) if len(keep) else None


def task_len(b: FeatureBatch | None) -> int:
    return 0 if b is None else len(b)


def task_perm_rows(n: int, m: int, seed: int) -> np.ndarray:
    """``default_rng(seed).permutation(n)[:m]`` sorted: a learned rung's row sample."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:m])


def task_take_global(b: FeatureBatch | None, rows: np.ndarray, offset: int) -> FeatureBatch | None:
    """The partition's rows among the global row numbers ``rows`` (sorted)."""
    if b is None:
        return None
    lo, hi = np.searchsorted(rows, [offset, offset + len(b)])
    return b.take(rows[lo:hi] - offset) if hi > lo else None


def task_take_ordered(b: FeatureBatch | None, rows: np.ndarray,
                      offset: int) -> tuple[np.ndarray, FeatureBatch] | None:
    """(positions in ``rows``, rows) of the partition, for a sample in ``rows``' order;
    without the wide columns (hidden states, every layer's logits) nobody reads there."""
    if b is None:
        return None
    where = np.flatnonzero((rows >= offset) & (rows < offset + len(b)))
    if not len(where):
        return None
    return where, replace(b.take(rows[where] - offset), hidden=None, layer_logits=None)


def task_head(b: FeatureBatch | None, n: int) -> FeatureBatch | None:
    return None if b is None else b.take(slice(0, n))


# --- the row set --------------------------------------------------------------------------------

def tree_reduce(client: Any, futures: Sequence[Any], fn: Callable[..., Any],
                *args: Any) -> Any:
    """Pairwise ``fn(a, b, *args)`` on the workers down to one future."""
    level = list(futures)
    while len(level) > 1:
        nxt = [client.submit(fn, a, b, *args, pure=False)
               for a, b in zip(level[0::2], level[1::2])]
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return level[0]


@dataclass
class RowSet:
    """Training rows of one offset ``d``: one future per partition, in stream order."""

    client: Any
    guard: Guard
    model: ModelInfo
    config: FeatureConfig
    parts: list[Any]  # futures of FeatureBatch | None
    counts: list[int]  # rows per partition

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int).tolist()

    @classmethod
    def build(cls, client: Any, guard: Guard, inputs: Sequence[Any], model: ModelInfo,
              config: FeatureConfig, phase: int | None, max_rows: int | None,
              seed: int) -> RowSet:
        """``build_features(max_rows=, seed=)`` per partition on the workers (``inputs``:
        ShardInput futures): rows counted first, the sample's key threshold found, then each
        partition built and cut at once, so a worker never holds unsampled rows of more than
        one partition."""
        d = config.d
        counts = [int(n) for n in guard.gather(
            [client.submit(task_count_rows, i, model.n_moe - d, phase) for i in inputs],
            f"counting rows (d={d})")]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        threshold = None
        if max_rows is not None and sum(counts) > max_rows:
            keys = [client.submit(task_bottom_keys, seed, o, n, max_rows)
                    for o, n in zip(offsets, counts) if n]
            merged = tree_reduce(client, keys, task_merge_keys, max_rows)
            threshold = float(guard.run(lambda: merged.result()[max_rows - 1],
                                        f"sampling {max_rows} of {sum(counts)} rows (d={d})"))
        parts = [client.submit(task_features, i, model, config, phase, n, seed, o, threshold,
                               pure=False)
                 for i, n, o in zip(inputs, counts, offsets)]
        kept = guard.gather([client.submit(task_len, p) for p in parts],
                            f"feature building (d={d})")
        return cls(client, guard, model, config, parts, [int(c) for c in kept])

    def _with(self, parts: list[Any], step: str) -> RowSet:
        counts = self.guard.gather([self.client.submit(task_len, p) for p in parts], step)
        return RowSet(self.client, self.guard, self.model, self.config, parts,
                      [int(c) for c in counts])

    def permuted_subset(self, max_rows: int, seed: int, step: str) -> RowSet:
        """A learned rung's ``data.take(sort(default_rng(seed).permutation(n)[:m]))``."""
        if self.n <= max_rows:
            return self
        rows = self.client.submit(task_perm_rows, self.n, max_rows, seed, pure=False)
        parts = [self.client.submit(task_take_global, p, rows, o)
                 for p, o in zip(self.parts, self.offsets)]
        return self._with(parts, step)

    def gather_ordered(self, rows: Any, step: str) -> FeatureBatch:
        """Rows ``rows`` (a future of global row numbers in any order, made on a worker:
        it may be O(n)) on the driver, in that order."""
        got = self.guard.gather([self.client.submit(task_take_ordered, p, rows, o)
                                 for p, o in zip(self.parts, self.offsets)], step)
        got = [g for g in got if g is not None]
        where = np.concatenate([w for w, _ in got])
        batch = concat([b for _, b in got])
        order = np.empty(len(where), dtype=np.int64)
        order[where] = np.arange(len(where))  # position in rows -> row of the batch
        return batch.take(order)

    def head(self, step: str) -> FeatureBatch:
        """A few rows on the driver: what fits predictors that read no rows' values."""
        for p, n in zip(self.parts, self.counts):
            if n:
                return self.guard.gather(self.client.submit(task_head, p, HEAD_ROWS), step)
        raise ExpertPredError("no examples: the trace selection is empty (or every sequence "
                              f"is shorter than needed for d={self.config.d})")

    def reduce(self, per_part: Callable[..., Any], combine: Callable[..., Any],
               step: str, *args: Any) -> Any:
        """``combine``-tree of ``per_part(batch, *args)`` over the non-empty partitions."""
        futs = [self.client.submit(per_part, p, *args) for p, n in zip(self.parts, self.counts)
                if n]
        return self.guard.gather(tree_reduce(self.client, futs, combine), step)

    def by_worker(self) -> dict[str, list[Any]]:
        """The non-empty partitions grouped by the worker holding them."""
        live = [p for p, n in zip(self.parts, self.counts) if n]
        who = self.guard.run(lambda: self.client.who_has(live), "locating partitions")
        out: dict[str, list[Any]] = {}
        for p in live:
            holders = sorted(who.get(p.key, ()))
            if not holders:
                raise WorkerLostError(f"partition {p.key} has no holder (a worker died)")
            out.setdefault(holders[0], []).append(p)
        return out

    def release(self) -> None:
        for p in self.parts:
            p.release()


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
