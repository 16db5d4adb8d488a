"""Scoring predictors and building the cache simulation's inputs out of core.

``expertpred evaluate`` used to build every test example of an offset in memory at once (a
:class:`~expertpred.features.FeatureBatch` of all test tokens x layers), and indexed the
access stream with a Python dict per (sequence, position). Here the test sequences stream
one dataset shard at a time, examples are built in bounded batches
(:func:`~expertpred.features.iter_feature_batches`), every predictor ranks a batch, and
:class:`ScoreSums` adds up the metrics' numerators per target layer. The per-row values are
multiples of 1/k (recall, precision) or 0/1 (exact set), so their sums are exact for k a
power of two (every shipped model) and the report equals the in-memory one bit for bit.

The cache simulation streams too, in chunks of whole sequences (:mod:`.cachestream`);
:func:`access_stream` builds one chunk's accesses (or, on the in-memory path, all of them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..features import FeatureBatch, FeatureConfig, ModelInfo, iter_feature_batches
from ..predictors import Predictor
from .metrics import exact_set_hit, precision_at_k, recall_at_k

log = logging.getLogger(__name__)

# examples per scored batch: bounds memory (~E+L*E floats per row, ~2.4 KB with the
# predictors' temporaries at 8 layers x 32 experts). Small enough that the batch is no
# larger than a small test split's examples: then memory does not grow with the split
BATCH_ROWS = 1 << 13


@dataclass
class ScoreSums:
    """Running sums of one predictor's metrics at one offset and one k, per target layer."""

    n_layer: int  # target layers (MoE layers)
    n_rows: int = 0  # examples scored
    # per target layer: rows with a target (recall's denominator), all rows (precision's
    # and exact set's, as the in-memory means had it), and the sums of the per-row metrics
    count: np.ndarray = field(init=False)
    count_all: np.ndarray = field(init=False)
    recall: np.ndarray = field(init=False)
    precision: np.ndarray = field(init=False)
    exact: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        for name in ("count", "count_all"):
            setattr(self, name, np.zeros(self.n_layer, dtype=np.int64))
        for name in ("recall", "precision", "exact"):
            setattr(self, name, np.zeros(self.n_layer))

    def add(self, top: np.ndarray, x: FeatureBatch, k: int) -> None:
        """Add the ranked predictions ``top`` of batch ``x`` (targets required)."""
        assert x.targets is not None
        tl, n = x.target_layer, self.n_layer
        rec = recall_at_k(top, x.targets, k)
        ok = ~np.isnan(rec)
        self.n_rows += len(x)
        self.count += np.bincount(tl[ok], minlength=n)[:n]
        self.count_all += np.bincount(tl, minlength=n)[:n]
        self.recall += np.bincount(tl[ok], weights=rec[ok], minlength=n)[:n]
        for name, v in (("precision", precision_at_k(top, x.targets, k)),
                        ("exact", exact_set_hit(top, x.targets, k))):
            getattr(self, name)[:] += np.bincount(tl, weights=v, minlength=n)[:n]

    def _count(self, name: str) -> np.ndarray:
        return self.count if name == "recall" else self.count_all

    def mean(self, name: str) -> float:
        """Mean over the rows (with a target, for recall); nan without any."""
        n = int(self._count(name).sum())
        return float(getattr(self, name).sum() / n) if n else float("nan")

    def per_layer(self, name: str) -> np.ndarray:
        c = self._count(name)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, getattr(self, name) / np.maximum(c, 1), np.nan)


def feature_batches(sequences: Iterator, model: ModelInfo, config: FeatureConfig,
                    phase: int | None) -> Iterator[FeatureBatch]:
    """Test examples in batches of about :data:`BATCH_ROWS` (whole sequences each)."""
    return iter_feature_batches(sequences, model, config, max_rows=BATCH_ROWS, phase=phase)


def score_offset(batches: Iterator[FeatureBatch], fitted: dict[str, dict[int, Predictor]],
                 d: int, ks: Sequence[int], n_layer: int) -> dict[str, dict[int, ScoreSums]]:
    """Every predictor fitted for offset ``d`` on every batch: sums by predictor and k."""
    sums = {p: {k: ScoreSums(n_layer) for k in ks} for p, by_d in fitted.items() if d in by_d}
    for x in batches:
        for pname, by_k in sums.items():
            top = fitted[pname][d].predict_topk(x, max(ks))
            for k, acc in by_k.items():
                acc.add(top, x, k)
    return sums


@dataclass(frozen=True)
class AccessIndex:
    """Where each kept (sequence, position) sits in the cache simulation's access stream:
    row ``offset[s] + rank of the position among the sequence's kept positions``."""

    offset: dict[int, int]  # seq_id -> first row of the sequence in the stream
    positions: dict[int, np.ndarray]  # seq_id -> its kept positions, ascending (int32)

    def rows(self, seq: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Stream rows of examples (seq_id, position); every pair must have been kept."""
        out = np.empty(len(seq), dtype=np.int64)
        for s in np.unique(seq).tolist():
            m = seq == s
            pos = self.positions[s]
            out[m] = self.offset[s] + np.searchsorted(pos, position[m])
        return out


def access_stream(sequences: Iterator, keep: int | None) -> tuple[np.ndarray, np.ndarray,
                                                                  AccessIndex]:
    """The test tokens' experts (T, L, k) int64 and token ids (T,) in execution order
    (sequences one after another), and the index of each kept (sequence, position)."""
    chunks, tok_chunks = [], []
    offset: dict[int, int] = {}
    positions: dict[int, np.ndarray] = {}
    n = 0
    for t in sequences:
        pos = np.arange(t.n_tokens) if keep is None else np.flatnonzero(t.phase == keep)
        offset[t.seq_id] = n
        positions[t.seq_id] = pos.astype(np.int32)
        n += len(pos)
        chunks.append(t.experts[pos].astype(np.int64))
        tok_chunks.append(t.tokens[pos].astype(np.int64))
    return (np.concatenate(chunks), np.concatenate(tok_chunks),
            AccessIndex(offset=offset, positions=positions))
