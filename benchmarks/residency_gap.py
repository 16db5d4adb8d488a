"""Where the learned residency policy's gap to Belady lies: Belady told only so much.

Runs, in the cache simulator over the in-domain test decode tokens (the stream
``expertpred evaluate`` uses) at the config's budgets: LRU, the learned policy (next-use
model fitted as ``expertpred train`` fits it), Belady-MIN, and Belady whose knowledge of
each expert's next use is cut at ``--caps`` tokens (farther uses all look equally far; ties
go to the least recently used). The cap at which capped Belady reaches the learned
policy's bytes says how far ahead the learned policy effectively sees. Prints MiB read per
token and the ratio to Belady.

    python benchmarks/residency_gap.py --config training/configs/predictors-tiny-mixtral.toml
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nextuse_tokens import test_stream  # noqa: E402 - the same evaluated stream

from expertpred.learn.evaluate import _expert_bytes  # noqa: E402
from expertpred.learn.residency_policy import (  # noqa: E402
    BeladyPolicy,
    ResidencyPolicy,
    make_policy,
    simulate_steps,
)
from expertpred.learn.train import (  # noqa: E402
    PredictorsConfig,
    fit_nextuse,
    open_source,
)

log = logging.getLogger("residency_gap")


class CappedBelady(BeladyPolicy, policy_name="belady-capped"):
    """Belady that knows next uses only up to ``cap_tokens`` tokens ahead."""

    def __init__(self, future: np.ndarray, cap_tokens: int) -> None:
        super().__init__(future)
        self.cap_tokens = cap_tokens
        self.now_ = 0

    def observe(self, t: int, li: int, experts: np.ndarray, clock: int) -> None:
        super().observe(t, li, experts, clock)
        self.now_ = t * self.n_layer_ + li

    def value(self) -> np.ndarray:
        ahead = self.next_use_.astype(np.float64) - self.now_
        return -np.minimum(ahead, self.cap_tokens * self.n_layer_ + 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a training/configs/predictors-*.toml")
    ap.add_argument("--caps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        cfg = PredictorsConfig(**tomllib.load(f))
    src = open_source(cfg)
    experts, tokens = test_stream(cfg, src)
    sizes = _expert_bytes(src)
    total = int(sizes.sum()) * src.model.n_expert
    model = fit_nextuse(cfg, src, src.select(split="train"))

    def mib(make: Callable[[], ResidencyPolicy]) -> list[float]:
        return [simulate_steps(experts, make(), int(b * total), sizes, src.model.n_expert,
                               tokens).counters.miss_bytes / len(experts) / 2**20
                for b in cfg.cache_budgets]

    rows = [("lru", mib(lambda: make_policy("lru"))),
            ("learned", mib(lambda: make_policy("learned", model=model))),
            ("belady", mib(lambda: make_policy("belady", future=experts)))]
    rows += [(f"belady, {c} token{'s' * (c > 1)} ahead", mib(
        lambda c=c: CappedBelady(experts, c))) for c in a.caps]
    floor = rows[2][1]
    print(f"{cfg.dataset}: {len(experts)} test tokens; MiB read per token (÷ Belady) at "
          + " / ".join(f"{b:.0%}" for b in cfg.cache_budgets))
    for name, m in rows:
        print(f"  {name:26s} " + " / ".join(f"{x:.3f} ({x / f:.2f}x)"
                                           for x, f in zip(m, floor, strict=True)))


if __name__ == "__main__":
    main()
