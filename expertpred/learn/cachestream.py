"""The expert-cache simulation of ``evaluate``, out of core: the test tokens in chunks.

:func:`~.evaluate.cache_report` used to build the whole access stream (T, L, k), every
prefetch plan (T, L, P) and Belady's next-use index of every access before simulating.
Here the test sequences stream in chunks of about :data:`CHUNK_TOKENS` tokens (whole
sequences, in the stream order), and every simulated cache — one
:class:`~.residency_policy.ResidencySet` per (budget, policy), one
:class:`~.cachesim.PrefetchLRU` per (budget, prefetching predictor) — is fed chunk by chunk:

1. LRU, LFU, the learned policy and the predictive LRU are online: their state is sized by
   the model (layers x experts), never by the stream;
2. the prefetch plans are built per chunk from the chunk's own examples (features are per
   sequence, so a chunk's rows are the rows the whole stream has there);
3. Belady needs the future. A first pass records each expert's first use in each chunk; a
   backward pass over those rows turns them into each expert's first use *after* each
   chunk, kept in a temporary file (one row of layers x experts steps per chunk). While
   chunk ``c`` is simulated, Belady looks next uses up in the chunk's own index and, past
   it, in row ``c`` (:class:`~.residency_policy.UseIndex`): the very values the whole
   index gives.

The same policy objects and the same step records as the in-memory path, in the same order,
so the counters are equal bit for bit (``tests/test_evaluate_streaming.py``). Memory: one
chunk (its sequences, accesses, examples and plans) plus the simulators' state; the test
sequences are read twice (the first-use pass, then the simulation).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..features import FeatureConfig, ModelInfo
from ..predictors import Predictor
from ..trace.record import SequenceTrace
from .cachesim import CacheResult, PrefetchLRU, prefetch_plan
from .residency_policy import (
    NEVER,
    BeladyPolicy,
    ResidencySet,
    apply,
    make_policy,
    step_records,
    use_index,
)
from .scoring import AccessIndex, access_stream, feature_batches

if TYPE_CHECKING:
    from ..predictors.nextuse import NextUseModel

log = logging.getLogger(__name__)

CHUNK_TOKENS = 1024  # test tokens per chunk (whole sequences): bounds the stream in memory


@dataclass(frozen=True)
class Chunk:
    """Consecutive test sequences of the access stream."""

    t0: int  # stream position of the chunk's first token
    experts: np.ndarray  # int64 (T, L, k) the kept tokens' experts
    tokens: np.ndarray  # int64 (T,) their token ids
    index: AccessIndex  # (sequence, position) -> row of this chunk
    sequences: tuple[SequenceTrace, ...]  # for the prefetch plans' examples


def _kept(t: SequenceTrace, keep: int | None) -> int:
    return int(t.n_tokens if keep is None else np.count_nonzero(t.phase == keep))


def _detached(t: SequenceTrace) -> SequenceTrace:
    """``t`` with arrays of its own: the reader's are views of the whole shard's Arrow
    buffers, so a chunk of sequences from several shards would keep all of them alive."""
    arrays = ("tokens", "phase", "experts", "weights", "logits", "hidden")
    return replace(t, **{f: np.array(getattr(t, f)) for f in arrays
                         if getattr(t, f) is not None})


def chunks(sequences: Iterator[SequenceTrace], keep: int | None,
           chunk_tokens: int | None = None) -> Iterator[Chunk]:
    """The access stream of ``sequences`` (tokens of phase ``keep``) in chunks of whole
    sequences, each at least ``chunk_tokens`` tokens (but the last)."""
    size = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    pending: list[SequenceTrace] = []
    n = t0 = 0
    for t in sequences:
        pending.append(_detached(t))
        n += _kept(t, keep)
        if n >= size:
            yield Chunk(t0, *access_stream(iter(pending), keep), tuple(pending))
            t0, pending, n = t0 + n, [], 0
    if pending:
        yield Chunk(t0, *access_stream(iter(pending), keep), tuple(pending))


class LaterUses:
    """Each expert's first use step after each chunk, one int64 row of ``n_layer *
    n_expert`` per chunk in a temporary file (see the module docstring, step 3)."""

    def __init__(self, stream: Iterator[Chunk], n_layer: int, n_expert: int) -> None:
        self.n_keys = n_layer * n_expert
        self.row_bytes = 8 * self.n_keys
        self._f = tempfile.TemporaryFile(prefix="expertpred-belady-")
        n = 0
        for ch in stream:  # 1. each chunk's first use of each key
            t_idx, l_idx, _ = np.nonzero(ch.experts >= 0)
            keys = l_idx.astype(np.int64) * n_expert + ch.experts[ch.experts >= 0]
            first = np.full(self.n_keys, NEVER, np.int64)
            np.minimum.at(first, keys, (t_idx.astype(np.int64) + ch.t0) * n_layer + l_idx)
            self._f.write(first.tobytes())
            n += 1
        self.n_chunks = n
        later = np.full(self.n_keys, NEVER, np.int64)
        for c in reversed(range(n)):  # 2. backwards: row c := first use after chunk c
            first = self.row(c)
            self._f.seek(c * self.row_bytes)
            self._f.write(later.tobytes())
            later = np.minimum(later, first)

    def row(self, c: int) -> np.ndarray:
        self._f.seek(c * self.row_bytes)
        return np.frombuffer(self._f.read(self.row_bytes), np.int64).copy()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> LaterUses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunk_plans(ch: Chunk, by_name: dict[str, dict[int, Predictor]], model: ModelInfo,
                 depth: int, history_decay: float, keep: int | None,
                 pk: int) -> dict[str, np.ndarray]:
    """Each predictor's prefetch plan (T, L, P) for the chunk's tokens."""
    t_len, n_l, _ = ch.experts.shape
    predicted: dict[str, dict[int, np.ndarray]] = {p: {} for p in by_name}
    for d in range(1, depth + 1):
        fc = FeatureConfig(d=d, history_decay=history_decay)
        for p in by_name:
            predicted[p][d] = np.full((t_len, n_l, pk), -1, dtype=np.int64)
        for x in feature_batches(iter(ch.sequences), model, fc, keep):
            rows, layer = ch.index.rows(x.seq, x.position), x.layer.astype(np.int64)
            for p, by_d in by_name.items():
                predicted[p][d][rows, layer] = by_d[d].predict_topk(x, pk)
    return {p: prefetch_plan(predicted[p], model.n_expert, experts=ch.experts, wrap=depth)
            for p in by_name}


@dataclass(frozen=True)
class StreamSpec:
    """What to simulate: the budgets, the policies and the prefetching predictors."""

    capacities: tuple[int, ...]  # cache bytes, one simulation set per budget
    policies: tuple[str, ...]  # residency policies (lru, lfu, learned, belady)
    prefetchers: dict[str, dict[int, Predictor]]  # name -> fitted by d (1 .. depth)
    depth: int  # layers predicted ahead
    prefetch_k: int  # experts prefetched per predicted layer
    history_decay: float  # the predictors' feature config
    keep: int | None  # the phase of the simulated tokens (None = all)


def simulate_stream(sequences: Callable[[], Iterator[SequenceTrace]], model: ModelInfo,
                    sizes: np.ndarray, spec: StreamSpec, nextuse: NextUseModel | None = None,
                    ) -> tuple[int, list[list[CacheResult]]]:
    """(tokens, results per capacity: the policies', then the prefetchers' in order).

    ``sequences()`` streams the test sequences in execution order; it is called twice."""
    n_l, n_e = model.n_moe, model.n_expert
    # Belady without a future: it gets one window per chunk
    sets = [[ResidencySet(BeladyPolicy(None) if pol == "belady" else
                          make_policy(pol, model=nextuse), n_l, n_e, sizes, cap)
             for pol in spec.policies] for cap in spec.capacities]
    belady = [rs.policy for row in sets for rs in row if isinstance(rs.policy, BeladyPolicy)]
    lrus = [[PrefetchLRU(cap, sizes, n_e) for _ in spec.prefetchers] for cap in spec.capacities]
    n_tokens = 0
    with LaterUses(chunks(sequences(), spec.keep), n_l, n_e) as later:
        for c, ch in enumerate(chunks(sequences(), spec.keep)):
            index = use_index(ch.experts, n_l, n_e, ch.t0, later.row(c))
            for pol in belady:
                pol.window(index)
            for row in sets:
                for rs in row:
                    for r in step_records(ch.experts, ch.tokens, ch.t0):
                        apply(rs, r)
            if spec.prefetchers:
                plans = _chunk_plans(ch, spec.prefetchers, model, spec.depth,
                                     spec.history_decay, spec.keep, spec.prefetch_k)
                for row in lrus:
                    for lru, plan in zip(row, plans.values()):
                        lru.feed(ch.experts, plan)
            n_tokens = ch.t0 + len(ch.experts)
    out = []
    for cap, row, lru_row in zip(spec.capacities, sets, lrus):
        res = [CacheResult(pol, cap, n_tokens, rs.counters.accesses, rs.counters.hits,
                           rs.counters.miss_bytes, 0) for pol, rs in zip(spec.policies, row)]
        out.append(res + [lru.result("predictive") for lru in lru_row])
    return n_tokens, out
