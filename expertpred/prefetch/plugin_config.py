"""What the prefetch plugin is told: its mode, its defaults and one frozen :class:`PluginConfig`.

``PrefetchPlugin`` and ``PrefetchLlama`` both take a ``PluginConfig`` (or its fields by
name), so a new plugin option is added here once and reaches every caller.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch
from ..model import ModelInfo

if TYPE_CHECKING:
    from .oracle import OracleTrace
    from .residency import ResidencyConfig

# The default predictor and lookahead of `expertpred run`, `load_predictors` and
# benchmarks/e2e_prefetch.py. An online layer-step on the inference thread has a budget of
# ~20 µs. fast-mlp, a learned predictor, fits it (13.6-17.9 µs, recall@k 0.90-0.94 at d = 1
# on the shipped traces against the lookup's 0.59-0.80; docs/export.md) and end to end it
# ran 1.16x and 1.05x the lookup's tok/s with the k-scaled gate (docs/e2e.md, "Session 7";
# 0.95-1.05x before it). D = 1 is the lookahead validated end to end.
DEFAULT_PREDICTOR = "fast-mlp"
# What the default falls back to, with a warning, where a predictor directory has no usable
# fast-mlp (trained before it existed, or with router inputs, which the plugin does not
# capture online): the most accurate table, 5 µs per layer-step.
FALLBACK_PREDICTOR = "previous-token+transition"
DEFAULT_LOOKAHEAD = 1
# Confidence gating (PrefetchPlugin min_rel_share): prefetch a predicted expert only if its
# share of the predictor's score mass for its layer is at least this many times 1/k, the
# share of a uniform member of the top k, so that low-confidence guesses do not spend disk
# bandwidth. In units of 1/k because a share is bounded by the mass k experts split: the
# absolute 0.25 chosen on tiny-mixtral's top-2 gated every lookup guess of the top-4 and
# top-8 models. At 0.5 (0.25 at k = 2, as before) the lookup's kept guesses at d = 1 on the
# shipped test decode tokens have precision 0.83 / 0.94 / 0.98 (tiny-mixtral / qwen3moe /
# olmoe, 20 / 3 / 26 % kept), fast-mlp's 0.98 / 0.97 / 0.99 (76 % kept; benchmarks/
# gate_precision.py, docs/e2e.md "Session 7").
DEFAULT_MIN_REL_SHARE = 0.5
# The GIL switch interval while the plugin runs (Python's own is 5 ms). The callback runs
# on llama.cpp's thread beside the engine's and the manager's Python threads, and a thread
# waiting for the GIL makes its holder yield only after this interval. Measured under the
# e2e memory limit: a lookup prediction costs 0.26-0.29 ms of CPU but 2.7-3.9 ms of wall,
# with 0 major faults and ~1 voluntary context switch each; at 0.5 ms the wall time fell to
# 2.2-2.6 ms and decode tok/s was 1.01-1.16x in four side-by-side runs (docs/e2e.md,
# "Where the callback's time goes").
DEFAULT_SWITCH_INTERVAL = 0.0005
# madvise_random=None turns MADV_RANDOM on for models whose experts are smaller than this.
# With the prefetcher, fault read-around mostly reads neighbouring experts nobody asked for;
# without it the kernel keeps only what was read or touched. Measured side by side (docs/
# e2e.md, "MADV_RANDOM on llama.cpp's mapping"): 3 MiB experts d0 / (c) / (d) 1.13x / 1.09x
# / 1.19x, 12 MiB 1.32x / 1.02x / 1.05x, 48 MiB 1.23x / 0.92x / 0.63x (a page the engine
# has not read yet becomes a synchronous 4 KiB fault). The cut between 12 and 48 MiB is an
# interpolation; nothing between was measured.
MADV_RANDOM_MAX_EXPERT_BYTES = 32 << 20


class Mode(enum.StrEnum):
    """What the plugin prefetches."""

    OFF = "off"  # no callback: stock llama.cpp
    D0 = "d0"  # the experts layer l selected, as soon as they are known
    PREDICTOR = "predictor"  # d0 + predicted experts of layers l+1 .. l+D
    ORACLE = "oracle"  # d0 + true experts of layers l+1 .. l+D from a recorded trace

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        try:
            return cls(value)
        except ValueError:
            raise ExpertPredError(f"prefetch mode {value!r}: expected one of "
                                  f"{', '.join(m.value for m in cls)}") from None


class RoutingRecorder(Protocol):
    """Receives the routing of every token row the callback sees (``expertpred serve
    --trace-out``). Rows are positions ``pos0 .. pos0 + n - 1`` of the context's sequence;
    for the last layer to have every row, every token of a batch must be an output."""

    def record(self, li: int, pos0: int, experts: np.ndarray,
               scores: np.ndarray | None) -> None:
        """MoE layer ``li`` routed rows (n, k) ``experts`` on (n, E) ``scores``."""

    def record_weights(self, li: int, pos0: int, weights: np.ndarray) -> None:
        """The (n, k) mixing weights of the experts :meth:`record` got for those rows."""


class PredictorProvider(Protocol):
    """What the plugin needs from a predictor: per-offset top-k (and score shares, for
    confidence gating) on one feature row. Implemented by
    :class:`~expertpred.predictors.artifact.PredictorSet`."""

    model: ModelInfo  # the model the predictor was trained on
    history_decay: float  # feature config the predictor expects
    needs_hidden: bool  # features must carry the router input

    @property
    def offsets(self) -> tuple[int, ...]: ...

    def topk(self, d: int, x: FeatureBatch, k: int) -> np.ndarray: ...

    def topk_shares(self, d: int, x: FeatureBatch,
                    k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class PluginConfig:
    """How the plugin prefetches. Every field can also be given to ``PrefetchPlugin`` and
    ``PrefetchLlama`` by name; ``str`` modes and ``None`` min_rel_share are normalized."""

    mode: Mode = Mode.D0  # d0 needs neither predictor nor trace and only reads what is used
    predictor: PredictorProvider | None = None  # mode predictor: guesses layers l+1 .. l+D
    oracle: OracleTrace | None = None  # mode oracle / belady residency: the run's true future
    # D, the farthest layer offset prefetched; None: the mode's own (predictor:
    # DEFAULT_LOOKAHEAD within its offsets, oracle: 1, d0/off: 0)
    lookahead: int | None = None
    prefetch_k: int | None = None  # experts per look-ahead layer; None: the model's top-k
    # offsets past the last layer reach the next token's first layers. None: the oracle
    # does (it knows the next token), the predictor does not: its guess there is this
    # token's experts of that layer, unscored and never gated, and without it (c) ran
    # 1.15x / 1.05x / 1.00x on tiny-mixtral / tiny-qwen3moe / tiny-olmoe with fewer wasted
    # bytes (docs/e2e.md, "Session 6 runs")
    wrap: bool | None = None
    method: str = "fadvise"  # io.METHODS name: fadvise hints the page cache, no user copy
    queue_depth: int = 8  # reads in flight: one layer's experts issued together
    # MADV_RANDOM on llama.cpp's mapping: no fault read-around. None: on when the largest
    # expert is below MADV_RANDOM_MAX_EXPERT_BYTES
    madvise_random: bool | None = None
    # confidence gate: least share of the score mass, in units of 1/k; 0 prefetches every
    # prediction, k or more only experts holding all of it
    min_rel_share: float = DEFAULT_MIN_REL_SHARE
    async_requests: bool = True  # post to the dispatcher: the engine's lock stays off inference
    # features + predictor on a thread of their own: the callback only posts the routing, so
    # a learned predictor's cost leaves the inference thread; predictions finished after
    # their target layer routed are counted (late_predictions) and not requested
    predict_thread: bool = False
    # sys.setswitchinterval while started, restored at close; None leaves Python's
    switch_interval: float | None = DEFAULT_SWITCH_INTERVAL
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)  # more EngineConfig fields
    recorder: RoutingRecorder | None = None  # serve --trace-out: receives every row's routing
    residency: ResidencyConfig | None = None  # expert residency manager; None: kernel reclaim

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        share = DEFAULT_MIN_REL_SHARE if self.min_rel_share is None else self.min_rel_share
        if not (isinstance(share, int | float) and share >= 0):
            raise ExpertPredError(f"min_rel_share={share!r}: expected a number >= 0 (a share "
                                  "of the score mass in units of 1/k)")
        object.__setattr__(self, "min_rel_share", float(share))
        object.__setattr__(self, "engine_kwargs", dict(self.engine_kwargs or {}))
        si = self.switch_interval
        if si is not None and not (isinstance(si, int | float) and 0 < si <= 1):
            raise ExpertPredError(f"switch_interval={si!r}: expected seconds in (0, 1] or "
                                  "None")
