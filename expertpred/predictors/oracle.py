"""The true experts (upper bound): reads the labels, so it only works offline.

Its artifact is a marker without weights: online the plugin resolves the oracle from a
recorded trace of the same greedy run (``expertpred run --mode oracle --oracle-trace``).
"""

from __future__ import annotations

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch
from .base import Arrays, Predictor, Spec
from .kernels import rank_hot


class OraclePredictor(Predictor, name="oracle"):
    """Scores the labels of a labelled batch."""

    def __init__(self) -> None:
        pass

    def _fit(self, data: FeatureBatch) -> None:
        self.n_expert_ = data.model.n_expert

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if x.targets is None:
            raise ExpertPredError("oracle predictor needs labelled features (offline only); "
                                  "online use the plugin's oracle mode with a recorded trace "
                                  "(--mode oracle --oracle-trace)")
        return rank_hot(x.targets, self.n_expert_)

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {"resolved_by": "recorded trace (plugin oracle mode)"}, {}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.n_expert_ = self.model_.n_expert
