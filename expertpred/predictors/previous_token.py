"""The experts the previous token used at layer l + d (rank order); popularity breaks ties."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from ..features import FeatureBatch
from .kernels import rank_hot
from .popularity import PopularityPredictor


class PreviousTokenPredictor(PopularityPredictor, name="previous-token"):
    """Routing repeats across consecutive tokens: guess the previous token's experts. Fits
    and stores what :class:`PopularityPredictor` does (the tie-breaking frequencies)."""

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        tl = x.target_layer
        prev = x.prev_experts[np.arange(len(x)), tl]
        return rank_hot(prev, x.model.n_expert) + 1e-3 * self.freq_[tl]

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        li = int(x.layer[0])
        return li, x.prev_experts[0, li + x.d].tobytes()
