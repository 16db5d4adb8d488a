"""Precision of the plugin's d = 1 guesses by the confidence gate, on held-out decode tokens.

The plugin reads a predicted expert ahead only when its share of the predictor's score mass
is at least ``min_rel_share / k`` (``PluginConfig.min_rel_share``). This replays the shipped
trace's test split through the saved predictor and prints, per gate value, the share of
guesses kept and their precision (was the expert routed at layer l + 1?): the table the
default gate was chosen from (docs/e2e.md, "Session 7").

    python benchmarks/gate_precision.py --model-name tiny-olmoe \\
        --predictors /tmp/olmoe-bench/predictors/c28edad80655/models \\
        [--predictor-name previous-token+transition]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from expertpred.features import Phase, iter_feature_batches
from expertpred.predictors.base import top_shares
from expertpred.prefetch.plugin import DEFAULT_MIN_REL_SHARE, load_predictors
from expertpred.trace.dataset.reader import TraceDataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-name", required=True, help="a shipped model: models/<name>")
    ap.add_argument("--predictors", type=Path, required=True,
                    help="expertpred train's <out>/models (or an exported artifact)")
    ap.add_argument("--predictor-name", default=None,
                    help="which saved predictor (default: the plugin's, as expertpred run "
                         "loads it)")
    ap.add_argument("--gates", default="0,0.3,0.35,0.4,0.45,0.5,0.55,0.6",
                    help="min_rel_share values, comma-separated")
    a = ap.parse_args()
    ps = load_predictors(a.predictors, ROOT / "models" / a.model_name / "model.gguf",
                         name=a.predictor_name)
    p = ps.by_d[1]
    k = p.model_.n_expert_used
    rel: list[np.ndarray] = []
    hit: list[np.ndarray] = []
    ds = TraceDataset(ROOT / "datasets" / "traces" / a.model_name)
    for b in iter_feature_batches(ds.sequences(split="test"), p.model_, p.feature_config_,
                                  phase=int(Phase.DECODE)):
        scores = p.predict_scores(b).astype(np.float64)
        for i in range(len(b)):
            top, share = top_shares(scores[i], k)
            rel.append(share * k)
            hit.append(np.isin(top, b.targets[i]))
    r, h = np.concatenate(rel), np.concatenate(hit)
    print(f"{a.model_name}, {ps.name}: top-{k}, {len(r)} guesses at d = 1 on the test "
          f"split's decode tokens (default gate {DEFAULT_MIN_REL_SHARE})")
    for g in (float(x) for x in a.gates.split(",")):
        keep = r >= g
        prec = f"{h[keep].mean():.3f}" if keep.any() else "-"
        print(f"  min_rel_share {g:<5}: keeps {keep.mean():.2f}, precision {prec}")


if __name__ == "__main__":
    main()
