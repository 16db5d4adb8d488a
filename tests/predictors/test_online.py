"""The online path the prefetch plugin uses gives the same predictions as offline evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from expertpred.features import FeatureConfig, OnlineFeatures, build_features, sequence_features
from expertpred.predictors import make_predictor
from expertpred.predictors.synthetic import SyntheticTraceSpec, synthetic_model, synthetic_traces

SPEC = SyntheticTraceSpec(n_layer=5, n_expert=8, n_expert_used=2, n_embd=16, n_seq=8,
                          seq_len=20, prompt_len=5)


@pytest.mark.parametrize("name,params", [
    ("previous-token+transition", {}),
    ("lightgbm", {"n_estimators": 3}),
    ("mlp", {"epochs": 1, "hidden_size": 16}),
    ("fast-mlp", {"epochs": 1, "hidden_size": 16}),
])
def test_online_predictions_equal_batch(name, params):
    traces = synthetic_traces(SPEC)
    model = synthetic_model(SPEC)
    d = 2
    cfg = FeatureConfig(d=d, history_decay=0.6)
    p = make_predictor(name, **params).fit(build_features(traces[:6], model, cfg))
    seq = traces[7]
    batch_top = p.predict_topk(sequence_features(seq, model, cfg), 3)
    online = OnlineFeatures(model, history_decay=p.feature_config_.history_decay)
    got = []
    for t in range(seq.n_tokens):
        online.next_token(int(seq.tokens[t]), int(seq.phase[t]))
        for li in range(SPEC.n_layer):
            online.update(li, seq.logits[t, li], seq.experts[t, li], seq.hidden[t, li])
            x = online.features(d)
            if x is not None:
                got.append(p.predict_topk(x, 3)[0])
    np.testing.assert_array_equal(np.array(got), batch_top)
