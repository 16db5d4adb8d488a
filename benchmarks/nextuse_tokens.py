"""How much the token ids buy the ``learned`` residency policy, per smoothing strength.

Fits the next-use model on a trace's train split without token ids and with them (one fit
per ``--prior``, the pseudo-rows of popularity each id's table is smoothed with), then runs
the ``learned`` policy in the cache simulator over the in-domain test decode tokens (the
stream ``expertpred evaluate`` uses) at the config's budgets. Prints MiB read per token.

    python benchmarks/nextuse_tokens.py --config training/configs/predictors-tiny-mixtral.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tomllib
from typing import Any

import numpy as np

from expertpred.learn.cachesim import simulate
from expertpred.learn.evaluate import _expert_bytes
from expertpred.learn.train import PredictorsConfig, open_source, phase_value
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel

log = logging.getLogger(__name__)


def test_stream(cfg: PredictorsConfig, src: Any) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated stream: the test split's (experts, token ids) in execution order, only
    the positions of ``cfg.eval_phase`` (what ``expertpred evaluate`` simulates)."""
    keep = phase_value(cfg.eval_phase)
    ex, tk = [], []
    for t in src.sequences(src.select(split="test")):
        pos = np.arange(t.n_tokens) if keep is None else np.flatnonzero(t.phase == keep)
        ex.append(t.experts[pos])
        tk.append(t.tokens[pos])
    return np.concatenate(ex).astype(np.int64), np.concatenate(tk).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a training/configs/predictors-*.toml")
    ap.add_argument("--prior", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        cfg = PredictorsConfig(**tomllib.load(f))
    src = open_source(cfg)
    train = list(src.sequences(src.select(split="train")))
    experts, tokens = test_stream(cfg, src)
    sizes = _expert_bytes(src)
    total = int(sizes.sum()) * src.model.n_expert
    base = NextUseConfig(horizon=cfg.residency_horizon, history_decay=cfg.history_decay,
                         seed=cfg.seed)
    variants = [("no ids", dataclasses.replace(base, token_features=False))]
    variants += [(f"ids, prior {p:g}", dataclasses.replace(base, token_prior=p))
                 for p in a.prior]
    print(f"{cfg.dataset}: learned MiB per token at "
          + " / ".join(f"{b:.0%}" for b in cfg.cache_budgets))
    for name, nc in variants:
        model = NextUseModel(src.model.n_moe, src.model.n_expert, nc).fit(
            [t.experts for t in train], [t.tokens for t in train])
        mib = [simulate(experts, "learned", int(b * total), sizes, src.model.n_expert,
                        model=model, tokens=tokens).demand_bytes / len(experts) / 2**20
               for b in cfg.cache_budgets]
        print(f"  {name:16s} " + " / ".join(f"{m:.3f}" for m in mib))


if __name__ == "__main__":
    main()
