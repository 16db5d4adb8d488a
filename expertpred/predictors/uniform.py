"""The floor of the ladder: uniformly random scores, reproducible from ``seed``."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from ..features import FeatureBatch, ModelInfo
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck


class RandomPredictor(Predictor, name="random"):
    """Uniformly random scores, reproducible from ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _fit(self, data: FeatureBatch) -> None:
        self.n_expert_ = data.model.n_expert

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.random((len(x), self.n_expert_), dtype=np.float32)

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        return 0  # the same seeded stream for every call: one row is always the same

    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        c.typed(spec, "seed", int, "spec")

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {"seed": int(self.seed)}, {}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.n_expert_ = self.model_.n_expert
