"""The routing summary of a trace dataset, read shard by shard (out of core).

``expertpred analyze`` used to read the routing columns of the whole dataset into one
:class:`~.routing.RoutingData`; its peak memory grew with the trace. Here two passes stream:

1. the small columns (``seq_id``, ``phase``, ``domain``) in record batches give each
   sequence's rows, decode rows and domain (:class:`SequenceTable`: one entry per
   sequence, not per token);
2. one shard at a time (a shard holds whole sequences), the routing columns become a
   RoutingData of those sequences, and every view (all tokens, each domain) adds its
   :class:`~.summary.RoutingCounts` ingredients: integer counts, per-sequence terms of the
   shuffled baselines, and the subset counts of the independent any-expert baseline (sampled
   with the same stride over the same row order as the in-memory path).

:func:`~.summary.summary_from_counts` then gives the same numbers as the in-memory path
(``tests/analysis/test_streaming.py`` compares every array). Memory: one shard, plus tables
sized by the model (L x E x E) and by the number of sequences, plus the distinct expert
subsets of the independent baseline (at most the number of k-subsets of E per layer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...trace.dataset import TraceDataset
from ...trace.dataset.schema import column_to_numpy
from ...trace.record import Phase
from .baselines import MAX_SUBSET_KEYS, _subset_keys, shuffled_per_sequence
from .popularity import expert_counts
from .records import RoutingReport
from .routing import (
    RoutingData,
    first_to_set_counts,
    overlap_counts,
    reuse_histogram,
    transition_counts,
)
from .summary import (
    LocalityCounts,
    RoutingCounts,
    divergence_from_counts,
    heldout_folds,
    shuffled_total,
    summary_from_counts,
)

log = logging.getLogger(__name__)

COLUMNS = ["seq_id", "pos", "phase", "domain", "experts"]  # no logits: keeps memory small


@dataclass(frozen=True)
class SequenceTable:
    """One entry per sequence (sorted by seq_id): what the second pass needs up front."""

    seq_id: np.ndarray  # int64 (S,)
    n_rows: np.ndarray  # int64 (S,) tokens
    n_decode: np.ndarray  # int64 (S,) generated tokens
    domain: np.ndarray  # object (S,) the sequence's domain label

    def rows(self, decode: bool) -> np.ndarray:
        return self.n_decode if decode else self.n_rows

    def select(self, mask: np.ndarray) -> SequenceTable:
        return SequenceTable(self.seq_id[mask], self.n_rows[mask], self.n_decode[mask],
                             self.domain[mask])


def sequence_table(ds: TraceDataset, batch_rows: int = 65536) -> SequenceTable:
    """Pass 1: rows, decode rows and domain of every sequence (small columns only)."""
    rows: dict[int, list[Any]] = {}
    for b in ds.iter_batches(["seq_id", "phase", "domain"], batch_rows):
        seq = b.column("seq_id").to_numpy().astype(np.int64)
        dec = b.column("phase").to_numpy() == Phase.DECODE
        ids, first, inv, cnt = np.unique(seq, return_index=True, return_inverse=True,
                                         return_counts=True)
        n_dec = np.bincount(inv.reshape(-1), weights=dec, minlength=len(ids)).astype(np.int64)
        dom = column_to_numpy("domain", b.column("domain").take(first))
        for i, s in enumerate(ids.tolist()):
            r = rows.setdefault(s, [0, 0, str(dom[i])])
            r[0] += int(cnt[i])
            r[1] += int(n_dec[i])
    ids = np.array(sorted(rows), dtype=np.int64)
    return SequenceTable(seq_id=ids,
                         n_rows=np.array([rows[s][0] for s in ids.tolist()], dtype=np.int64),
                         n_decode=np.array([rows[s][1] for s in ids.tolist()], dtype=np.int64),
                         domain=np.array([rows[s][2] for s in ids.tolist()], dtype=object))


# --- the independent any-expert baseline from subset counts --------------------------------


@dataclass
class _SubsetCounts:
    """How many sampled top-k sets contain each expert subset, per layer and subset size.

    The in-memory baseline is -mean_t(sum_{A in S_t} (-1)^|A| c(A)) / m over m sampled
    sets; summed over tokens that is sum_A (-1)^|A| c(A)^2: exact integers, in any order.
    """

    n_layer: int
    k: int
    n_expert: int
    n_sampled: int = 0
    keys: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, sets_by_layer: np.ndarray) -> None:
        """``sets_by_layer``: (m, L, k) the sampled tokens' sets."""
        m = len(sets_by_layer)
        if m == 0:
            return
        self.n_sampled += m
        base = self.n_expert + 1
        if self.k * math.log2(base) > 62:
            raise ValueError(f"E={self.n_expert}, k={self.k}: keys do not fit in int64")
        subsets = [np.array([j for j in range(self.k) if mask >> j & 1])
                   for mask in range(1, 2 ** self.k)]
        for layer in range(self.n_layer):
            sets = np.sort(sets_by_layer[:, layer, :].astype(np.int64), axis=1)
            for size in range(1, self.k + 1):
                keys = np.concatenate([_subset_keys(sets, c, base) for c in subsets
                                       if len(c) == size])
                self._merge((layer, size), *np.unique(keys, return_counts=True))

    def _merge(self, at: tuple[int, int], keys: np.ndarray, counts: np.ndarray) -> None:
        old = self.keys.get(at)
        if old is not None:
            keys = np.concatenate([old[0], keys])
            counts = np.concatenate([old[1], counts])
            keys, inv = np.unique(keys, return_inverse=True)
            counts = np.bincount(inv.reshape(-1), weights=counts).astype(np.int64)
        self.keys[at] = (keys, counts)

    def baseline(self) -> np.ndarray:
        m = self.n_sampled
        if m == 0:
            return np.full(self.n_layer, np.nan)
        out = np.empty(self.n_layer)
        for layer in range(self.n_layer):
            total = 0
            for size in range(1, self.k + 1):
                c = self.keys[(layer, size)][1]
                total += (-1) ** size * int((c * c).sum())
            out[layer] = -(float(total) / m) / m
        return out


# --- accumulators --------------------------------------------------------------------------


class _LocalityAcc:
    """:class:`~.summary.LocalityCounts` of one view's rows (all, or decode only)."""

    def __init__(self, seqs: SequenceTable, decode: bool, n_layer: int, k: int,
                 n_expert: int) -> None:
        n = seqs.rows(decode)
        keep = n > 0
        self.seq_id, self.n_s = seqs.seq_id[keep], n[keep]
        self.offset = np.concatenate([[0], np.cumsum(self.n_s)[:-1]]).astype(np.int64)
        self.n_tokens = int(self.n_s.sum())
        # the in-memory baseline strides over the view's rows in (seq_id, pos) order
        self.step = max(1, -(-self.n_tokens * (2 ** k - 1) // MAX_SUBSET_KEYS))
        self.n_expert, self.k = n_expert, k
        self.first_v = np.zeros((n_layer, len(self.seq_id)))
        self.any_v = np.zeros((n_layer, len(self.seq_id)))
        self.n_pairs = 0
        self.first_hits = np.zeros(n_layer, dtype=np.int64)
        self.any_hits = np.zeros(n_layer, dtype=np.int64)
        self.overlap_sum = np.zeros(n_layer, dtype=np.int64)
        self.counts = np.zeros((n_layer, n_expert), dtype=np.int64)
        self.first_counts = np.zeros((n_layer, n_expert), dtype=np.int64)
        self.subsets = _SubsetCounts(n_layer, k, n_expert)

    def add(self, data: RoutingData) -> None:
        """Whole sequences of this view, rows sorted by (seq_id, pos)."""
        x = data.experts
        if len(x) == 0:
            return
        idx = np.flatnonzero(data.pairs)
        if len(idx):
            prev, cur = x[idx - 1], x[idx]
            ov = overlap_counts(prev, cur)
            self.n_pairs += len(idx)
            self.first_hits += (prev[:, :, 0] == cur[:, :, 0]).sum(axis=0)
            self.any_hits += (ov > 0).sum(axis=0)
            self.overlap_sum += ov.sum(axis=0)
        self.counts += expert_counts(x, self.n_expert)
        self.first_counts += expert_counts(x, self.n_expert, first_only=True)
        ids, rank, n_s = np.unique(data.seq_id, return_inverse=True, return_counts=True)
        rank = rank.reshape(-1)
        at = np.searchsorted(self.seq_id, ids)
        if not np.array_equal(self.n_s[at], n_s):
            raise ValueError(f"sequence {ids[0]} is split across shards; expected whole "
                             "sequences per shard")
        fv, av = shuffled_per_sequence(x, rank, n_s, self.n_expert)
        self.first_v[:, at] = fv
        self.any_v[:, at] = av
        start = np.concatenate([[0], np.cumsum(n_s)[:-1]])
        row = self.offset[at][rank] + np.arange(len(x)) - start[rank]
        self.subsets.add(x[row % self.step == 0])

    def result(self) -> LocalityCounts:
        n_layer = len(self.counts)
        return LocalityCounts(
            n_tokens=self.n_tokens, n_pairs=self.n_pairs, first_hits=self.first_hits,
            any_hits=self.any_hits, overlap_sum=self.overlap_sum, counts=self.counts,
            first_counts=self.first_counts, any_independent=self.subsets.baseline(),
            first_shuffled=shuffled_total(self.first_v, self.n_s, n_layer),
            any_shuffled=shuffled_total(self.any_v, self.n_s, n_layer))


class _ViewAcc:
    """:class:`~.summary.RoutingCounts` of one view (all sequences, or one domain)."""

    def __init__(self, seqs: SequenceTable, n_layer: int, k: int, n_expert: int,
                 max_distance: int) -> None:
        self.seqs = seqs
        self.n_layer, self.k, self.n_expert, self.max_distance = n_layer, k, n_expert, \
            max_distance
        e2 = (max(n_layer - 1, 0), n_expert, n_expert)
        self.counts = np.zeros((n_layer, n_expert), dtype=np.int64)
        self.first_counts = np.zeros((n_layer, n_expert), dtype=np.int64)
        self.hist = np.zeros((n_layer, max_distance + 2), dtype=np.int64)
        self.trans = np.zeros(e2, dtype=np.int64)
        self.f2s = np.zeros(e2, dtype=np.int64)
        self.fold_ids = heldout_folds(seqs.seq_id, seqs.domain)
        self.fold_counts = [np.zeros((n_layer, n_expert), dtype=np.int64) for _ in range(2)]
        self.fold_f2s = [np.zeros(e2, dtype=np.int64) for _ in range(2)]
        self.loc = _LocalityAcc(seqs, False, n_layer, k, n_expert)
        self.loc_decode = _LocalityAcc(seqs, True, n_layer, k, n_expert)

    def add(self, data: RoutingData) -> None:
        x, e = data.experts, self.n_expert
        self.counts += expert_counts(x, e)
        self.first_counts += expert_counts(x, e, first_only=True)
        self.hist += reuse_histogram(x, data.seq_id, data.pos, self.max_distance)
        self.trans += transition_counts(x, e)
        self.f2s += first_to_set_counts(x, e)
        if self.fold_ids is not None:
            fold = np.isin(data.seq_id, self.fold_ids)
            for i, part in enumerate((x[fold], x[~fold])):
                self.fold_counts[i] += expert_counts(part, e)
                self.fold_f2s[i] += first_to_set_counts(part, e)
        self.loc.add(data)
        self.loc_decode.add(data.select(data.phase == Phase.DECODE))

    def result(self) -> RoutingCounts:
        folds = self.fold_ids is not None
        return RoutingCounts(
            n_expert=self.n_expert, k=self.k, max_distance=self.max_distance,
            n_tokens=int(self.seqs.n_rows.sum()), n_sequences=len(self.seqs.seq_id),
            counts=self.counts, first_counts=self.first_counts, hist=self.hist,
            trans=self.trans, f2s=self.f2s,
            fold_counts=tuple(self.fold_counts) if folds else None,  # type: ignore[arg-type]
            fold_f2s=tuple(self.fold_f2s) if folds else None,  # type: ignore[arg-type]
            locality=self.loc.result(), locality_decode=self.loc_decode.result())


def stream_summary(ds: TraceDataset, max_distance: int = 64) -> tuple[RoutingReport, int]:
    """:func:`~.routing.summarize` of the whole dataset, one shard in memory at a time;
    also the number of prompt tokens. ValueError on rows RoutingData refuses."""
    seqs = sequence_table(ds)
    domains = sorted({str(d) for d in seqs.domain})
    shape = (ds.n_moe_layer, ds.n_expert_used, ds.n_expert, max_distance)
    n_layer, k, n_expert, _ = shape
    views = {None: _ViewAcc(seqs, *shape)}
    for d in domains:
        views[d] = _ViewAcc(seqs.select(seqs.domain == d), *shape)
    halves: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for d in domains:  # the divergence's noise floor: alternate sequences of each domain
        ids = seqs.seq_id[seqs.domain == d]
        if len(ids) >= 2:
            halves[d] = (ids[::2], [np.zeros((n_layer, n_expert), np.int64) for _ in "ab"])
    for i, table in enumerate(ds.iter_shards(COLUMNS)):
        cols = {c: column_to_numpy(c, table.column(c)) for c in COLUMNS}
        del table
        data = RoutingData.from_arrays(cols["experts"], cols["seq_id"], cols["pos"],
                                       cols["phase"], cols["domain"], n_expert)
        del cols
        views[None].add(data)
        for d in domains:
            rows = data.domain == d
            if rows.any():
                sub = data.select(rows)
                views[d].add(sub)
                if d in halves:
                    first, acc = halves[d]
                    half = np.isin(sub.seq_id, first)
                    acc[0] += expert_counts(sub.experts[half], n_expert)
                    acc[1] += expert_counts(sub.experts[~half], n_expert)
        log.debug("%s: shard %d added", ds.path, i)
    summary = RoutingReport(
        overall=summary_from_counts(views[None].result()),
        by_domain={d: summary_from_counts(views[d].result()) for d in domains},
        divergence=divergence_from_counts(
            domains, {d: views[d].counts for d in domains},
            {d: (a[0], a[1]) for d, (_, a) in halves.items()}, n_layer),
    )
    n_prompt = int((seqs.n_rows - seqs.n_decode).sum())
    return summary, n_prompt
