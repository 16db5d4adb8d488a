"""What one prefetch plugin did: its counters and the snapshot it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .engine import PrefetchStats
from .residency import ResidencyStats


@dataclass
class PluginCounters:
    batches: int = 0  # begin() calls (llama eval calls)
    ubatches: int = 0  # graph passes seen (first MoE layer routed)
    tokens: int = 0  # token rows routed through the first MoE layer
    layer_events: int = 0  # argsort nodes handled
    d0_requests: int = 0  # experts enqueued for the layer being computed
    ahead_requests: int = 0  # experts enqueued for layers ahead (predicted / oracle)
    ahead_resident: int = 0  # of which not read: the residency manager holds them
    predictions: int = 0  # predictor calls
    oracle_misses: int = 0  # positions the oracle trace did not cover / disagreed on
    callback_errors: int = 0  # exceptions caught inside the callback
    callback_seconds: float = 0.0  # time spent inside the callback's ready phase
    predict_seconds: float = 0.0  # of which in the predictor
    gated: int = 0  # predicted experts not prefetched (share below min_rel_share / k)
    # predict_thread: predictions finished after their target layer had routed (not requested)
    late_predictions: int = 0
    predict_lag_seconds: float = 0.0  # predict_thread: callback post -> prediction start, summed
    predict_posts_refused: int = 0  # predict_thread: routing not handed over (thread behind)


@dataclass(frozen=True)
class PluginStats:
    """What one plugin did: its own counters and the engine's snapshot (None when off)."""

    mode: str
    lookahead: int
    counters: PluginCounters
    engine: PrefetchStats | None
    madvised_bytes: int = 0
    first_error: str = ""
    residency: ResidencyStats | None = None  # the residency manager's, when one runs
    predictor: str = ""  # mode predictor: the predictor's registry name (which one ran)

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"mode": self.mode, "lookahead": self.lookahead,
                                "predictor": self.predictor,
                                "madvised_bytes": self.madvised_bytes,
                                "first_error": self.first_error}
        d.update(asdict(self.counters))
        if self.engine is not None:
            d.update({f"engine_{k}": v for k, v in self.engine.as_dict().items()})
        if self.residency is not None:
            d.update({f"residency_{k}": v for k, v in self.residency.as_dict().items()})
        return d
