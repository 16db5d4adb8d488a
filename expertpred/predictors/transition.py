"""P(expert j at l + d | expert i at l), Laplace-smoothed, averaged over the chosen i."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, ModelInfo
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck
from .kernels import by_layer, normalised_current


def transition_counts(data: FeatureBatch) -> np.ndarray:
    """float64 (L, E, E): how often expert j at l + d follows expert i at l (whole numbers,
    so partial counts of disjoint row sets add up exactly)."""
    n_l, e = data.model.n_moe, data.model.n_expert
    counts = np.zeros((n_l, e, e), dtype=np.float64)
    rows = np.arange(len(data))
    src = data.experts[rows, data.layer.astype(np.int64)].astype(np.int64)  # (n, k)
    tgt = data.targets.astype(np.int64)
    lay = data.layer.astype(np.int64)
    for a in range(src.shape[1]):
        for b in range(tgt.shape[1]):
            ok = (src[:, a] >= 0) & (tgt[:, b] >= 0)
            np.add.at(counts, (lay[ok], src[ok, a], tgt[ok, b]), 1.0)
    return counts


def table_from_counts(counts: np.ndarray, alpha: float) -> np.ndarray:
    """float32 (L, E, E) row-normalised, Laplace-smoothed :func:`transition_counts`."""
    c = counts + alpha
    return (c / c.sum(axis=2, keepdims=True)).astype(np.float32)


def transition_table(data: FeatureBatch, alpha: float) -> np.ndarray:
    """float32 (L, E, E): row i of layer l = P(expert j at l + d | expert i at l)."""
    return table_from_counts(transition_counts(data), alpha)


class TransitionPredictor(Predictor, name="transition"):
    """``source="experts"`` averages the rows of the k chosen experts; ``"probs"`` weights every
    row by softmax(router logits at l)."""

    def __init__(self, alpha: float = 1.0, source: str = "experts") -> None:
        self.alpha = alpha
        self.source = source

    def _fit(self, data: FeatureBatch) -> None:
        if self.source not in ("experts", "probs"):
            raise ExpertPredError(f"transition source={self.source!r}: expected experts|probs")
        self.table_ = transition_table(data, self.alpha)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if self.source == "probs":
            z = x.logits - x.logits.max(axis=1, keepdims=True)
            w = np.exp(z)
            w /= w.sum(axis=1, keepdims=True)
        else:
            w = normalised_current(x)
        return by_layer(w.astype(np.float32), x.layer.astype(np.int64), self.table_)

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        if self.source == "probs":
            return None
        li = int(x.layer[0])
        return li, x.experts[0, li].tobytes()

    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        if c.typed(spec, "source", str, "spec") not in ("experts", "probs"):
            raise c.fail(f"spec.source {spec['source']!r}, expected 'experts' or 'probs'")
        c.array(a, "table", "f", (m.n_moe, m.n_expert, m.n_expert))

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {"source": str(self.source)}, {"table": self.table_}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.table_ = arrays["table"]
