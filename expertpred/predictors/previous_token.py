"""The experts the previous token used at layer l + d (rank order); popularity breaks ties."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from ..features import FeatureBatch
from .base import Arrays, Predictor, Spec
from .kernels import layer_freq, rank_hot


class PreviousTokenPredictor(Predictor, name="previous-token"):
    """Routing repeats across consecutive tokens: guess the previous token's experts."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def _fit(self, data: FeatureBatch) -> None:
        self.freq_ = layer_freq(data, self.alpha)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        tl = x.target_layer
        prev = x.prev_experts[np.arange(len(x)), tl]
        return rank_hot(prev, x.model.n_expert) + 1e-3 * self.freq_[tl]

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        li = int(x.layer[0])
        return li, x.prev_experts[0, li + x.d].tobytes()

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {}, {"freq": self.freq_}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.freq_ = arrays["freq"]
