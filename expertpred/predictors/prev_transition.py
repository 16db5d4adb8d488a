"""``w·previous-token + (1-w)·transition``: the most accurate lookup rung."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from ..features import FeatureBatch, ModelInfo
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck
from .kernels import by_layer, layer_freq, mean_recall, normalised_current, rank_hot
from .transition import transition_table

WEIGHT_ROWS = 20000  # training rows the weight is chosen on (a uniform sample)


def weight_rows(n: int) -> np.ndarray:
    """Which of ``n`` training rows choose the weight, in the order they are scored."""
    return np.random.default_rng(0).permutation(n)[:WEIGHT_ROWS]


class PreviousTokenTransitionPredictor(Predictor, name="previous-token+transition"):
    """``w`` is picked on the training data unless given."""

    def __init__(self, alpha: float = 1.0, weight: float | None = None) -> None:
        self.alpha = alpha
        self.weight = weight  # None: choose from a grid by recall@k on the training rows

    def _fit(self, data: FeatureBatch) -> None:
        self.table_ = transition_table(data, self.alpha)
        self.freq_ = layer_freq(data, self.alpha)
        self.weight_ = (float(self.weight) if self.weight is not None
                        else self.choose_weight(data.take(weight_rows(len(data)))))

    def choose_weight(self, sample: FeatureBatch) -> float:
        """The grid weight with the best recall@k on ``sample`` (the rows of
        :func:`weight_rows`), given the fitted ``table_`` and ``freq_``."""
        p, t = self._parts(sample)
        k = sample.model.n_expert_used
        best, best_w = -1.0, 0.5
        for w in np.linspace(0.0, 1.0, 11):
            top = np.argsort(-(w * p + (1 - w) * t), axis=1, kind="stable")[:, :k]
            r = mean_recall(top, sample.targets)
            if r > best + 1e-9:
                best, best_w = r, float(w)
        return best_w

    def _parts(self, x: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        tl = x.target_layer
        p = rank_hot(x.prev_experts[np.arange(len(x)), tl], x.model.n_expert)
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1.0)
        t = by_layer(normalised_current(x), x.layer.astype(np.int64), self.table_)
        return p, t + 1e-4 * self.freq_[tl]

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1:
            return self._scores_row(x)
        p, t = self._parts(x)
        return self.weight_ * p + (1.0 - self.weight_) * t

    def _ready(self) -> None:
        super()._ready()
        k, e = self.model_.n_expert_used, self.model_.n_expert
        self._ranks = np.arange(k, 0, -1, dtype=np.float32)  # rank_hot's k - rank
        self._p = np.zeros(e + 1, dtype=np.float32)  # [e]: trash slot for padding ids
        self._w = np.zeros(e + 1, dtype=np.float32)
        self._one = np.float32(1.0)

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """One row, the same float32 operations as :meth:`_parts` without (n, ·) temporaries
        (a cache miss of the online path)."""
        e = self.model_.n_expert
        li = int(x.layer[0])
        tl = li + x.config.d
        ids = x.prev_experts[0, tl]
        p, w = self._p, self._w
        p.fill(0.0)
        p[np.where(ids >= 0, ids, e)] = self._ranks
        pv = p[:e] / max(p[:e].sum(), self._one)
        cur = x.experts[0, li]
        w.fill(0.0)
        w[np.where(cur >= 0, cur, e)] = 1.0
        wv = w[None, :e] / max(w[:e].sum(), self._one)
        t = wv @ self.table_[li]
        t = t + 1e-4 * self.freq_[tl]
        return self.weight_ * pv + (1.0 - self.weight_) * t

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        li = int(x.layer[0])
        return li, x.experts[0, li].tobytes(), x.prev_experts[0, li + x.d].tobytes()

    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        w = c.typed(spec, "weight", (int, float), "spec")
        if not 0.0 <= w <= 1.0:
            raise c.fail(f"spec.weight {w!r}, expected 0..1")
        c.array(a, "table", "f", (m.n_moe, m.n_expert, m.n_expert))
        c.array(a, "freq", "f", (m.n_moe, m.n_expert))

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {"weight": float(self.weight_)}, {"table": self.table_, "freq": self.freq_}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.table_, self.freq_ = arrays["table"], arrays["freq"]
        self.weight_ = float(spec["weight"])
