"""Files of the two formats before the one artifact still load and predict what the old code
predicted: ``<case>-d1.npz`` (saved predictors, ``__meta__``) and ``<case>.artifact``
(exported, ``__header__``), written by commit be481dc (``legacy/make_legacy.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertpred.features import FeatureBatch, FeatureConfig
from expertpred.predictors import Predictor
from expertpred.predictors.artifact import load_artifact

LEGACY = Path(__file__).parent / "legacy"
CASES = sorted(p.name[:-len(".artifact")] for p in LEGACY.glob("*.artifact"))


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(LEGACY / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def _features(expected: dict[str, np.ndarray], pset_model, decay: float) -> FeatureBatch:
    cols = {k[len("feat."):]: v for k, v in expected.items() if k.startswith("feat.")}
    return FeatureBatch(model=pset_model, config=FeatureConfig(1, decay),
                        seq=np.zeros(len(cols["layer"]), np.int64), **cols)


def test_every_rung_has_a_legacy_fixture():
    assert {"random", "popularity", "transition-probs", "previous-token",
            "previous-token+transition", "gate-lookahead", "lightgbm", "mlp",
            "oracle"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_legacy_header_artifact_predicts_as_before(case, expected):
    art = load_artifact(LEGACY / f"{case}.artifact")
    assert art.offsets == (1, 2)
    x = _features(expected, art.model, art.history_decay)
    np.testing.assert_allclose(art.by_d[1].predict_scores(x), expected[f"scores.{case}"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_legacy_saved_predictor_predicts_as_before(case, expected, tmp_path):
    p = Predictor.load(LEGACY / f"{case}-d1.npz")
    x = _features(expected, p.model_, p.feature_config_.history_decay)
    want = expected[f"scores.{case}"]
    np.testing.assert_allclose(p.predict_scores(x), want, rtol=1e-5, atol=1e-6)
    # re-saved in the one format, it still predicts the same
    q = Predictor.load(p.save(tmp_path / "resaved.npz"))
    np.testing.assert_array_equal(q.predict_scores(x), p.predict_scores(x))
