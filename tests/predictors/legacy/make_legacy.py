"""Write the legacy fixtures of tests/predictors/test_legacy.py with the code of commit
be481dc (before predictors had one artifact format): run from a checkout of that commit,

    git archive be481dc | tar -x -C /tmp/old && cd /tmp/old && \
        PYTHONPATH=$PWD python /path/to/make_legacy.py /path/to/tests/predictors/legacy

Per rung: ``<case>-d1.npz`` (``Predictor.save``: the ``__meta__`` format), ``<case>.artifact``
(``export_predictors``: the ``__header__`` format, d = 1 and 2) and, in ``expected.npz``,
the features they were scored on and the scores the old code gave.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from expertpred.features import FeatureConfig, build_features
from expertpred.gguf.layout import router_weight
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.predictors import make_predictor
from expertpred.predictors.export import export_predictors
from expertpred.predictors.synthetic import SyntheticTraceSpec, synthetic_model, synthetic_traces

SPEC = SyntheticTraceSpec(n_layer=4, n_expert=8, n_expert_used=2, n_embd=16, n_seq=10,
                          seq_len=16, prompt_len=4)
GGUF = SyntheticSpec(arch="llama", n_layer=4, n_embd=16, n_head=2, n_head_kv=1, n_expert=8,
                     n_expert_used=2, n_ff=8)
CASES = {
    "random": ("random", {"seed": 3}),
    "popularity": ("popularity", {}),
    "transition-probs": ("transition", {"source": "probs"}),
    "previous-token": ("previous-token", {}),
    "previous-token+transition": ("previous-token+transition", {}),
    "gate-lookahead": ("gate-lookahead", {"gguf": True}),
    "lightgbm": ("lightgbm", {"n_estimators": 3, "gguf": True}),
    "lightgbm-shared": ("lightgbm", {"n_estimators": 3, "shared": True, "use_hidden": True,
                                     "min_child_samples": 5}),
    "mlp": ("mlp", {"epochs": 1, "hidden_size": 8, "gguf": True}),
    "oracle": ("oracle", {}),
}
FEATURES = ("position", "token", "phase", "layer", "logits", "experts", "prev_experts",
            "history", "hidden", "targets")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gguf = write_random_moe(out / "tmp-model.gguf", GGUF)
    routers = np.stack([router_weight(gguf, i) for i in range(SPEC.n_layer)])
    traces = synthetic_traces(SPEC, routers=routers)
    model = synthetic_model(SPEC)
    data = {d: (build_features(traces[:8], model, FeatureConfig(d, 0.6)),
                build_features(traces[8:], model, FeatureConfig(d, 0.6))) for d in (1, 2)}
    expected = {f"feat.{k}": getattr(data[1][1], k) for k in FEATURES}
    for case, (name, params) in CASES.items():
        params = dict(params)
        if params.pop("gguf", False):
            params["gguf_path"] = str(gguf)
        by_d = {d: make_predictor(name, **params).fit(tr) for d, (tr, _) in data.items()}
        by_d[1].save(out / f"{case}-d1.npz")
        export_predictors(by_d, out / f"{case}.artifact")
        expected[f"scores.{case}"] = by_d[1].predict_scores(data[1][1])
    np.savez_compressed(out / "expected.npz", **expected)
    gguf.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
