"""Per-layer selection frequency of each expert in the training data."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from ..features import FeatureBatch, ModelInfo
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck
from .kernels import layer_freq


class PopularityPredictor(Predictor, name="popularity"):
    """How often each expert of layer ``l + d`` was selected (Laplace-smoothed)."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha  # Laplace smoothing: experts never seen still get a score

    def _fit(self, data: FeatureBatch) -> None:
        self.freq_ = layer_freq(data, self.alpha)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        return self.freq_[x.target_layer]

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        return int(x.layer[0])

    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        c.array(a, "freq", "f", (m.n_moe, m.n_expert))

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {}, {"freq": self.freq_}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.freq_ = arrays["freq"]
