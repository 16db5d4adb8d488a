"""Online expert prefetching inside llama.cpp inference, attached through the eval callback.

When layer ``l``'s routing is known (its ``ffn_moe_argsort-l`` node is ready, before the
expert matmuls run) the plugin

1. tells the :class:`~expertpred.prefetch.PrefetchEngine` which experts layer ``l`` uses
   (``on_use``: hit if a prefetch had completed, late if still queued / in flight, miss if
   never requested) — accounted *before* the use, which is what "in time" means;
2. enqueues layer ``l``'s actually selected experts at once (``d0``, what ik_llama.cpp's
   ``--prefetch-experts`` does): llama.cpp would otherwise fault the expert pages in one
   readahead window at a time, while the engine issues them with queue depth;
3. in ``predictor`` mode asks the predictor for layers ``l+1 .. l+D`` (features from the
   shared :class:`~expertpred.features.OnlineFeatures`), in ``oracle`` mode reads the true
   experts of those layers from a recorded trace of the same greedy run, and enqueues them;
   predicted experts with less than ``min_share`` of the predictor's score mass are not
   prefetched (confidence gating).

With ``async_requests=True`` (default) steps 1-3 only post records to the engine's
dispatcher thread (:meth:`PrefetchEngine.post_use` / ``post_request``, a deque append):
the engine's lock and bookkeeping stay off the inference thread, and the accounting of
step 1 happens on that thread moments after the routing is known, in the same order.
   With ``wrap=True`` targets past the last MoE layer are the *next* token's first layers:
   the oracle knows them, the predictor (whose features stop at the last layer) repeats
   this token's experts of that layer (the previous-token guess).

Modes (:class:`Mode`): ``off`` (no callback at all: stock llama.cpp), ``d0``, ``predictor``,
``oracle``. The callback never stalls or breaks inference: prefetch I/O runs on the engine's
threads (its errors are counted there), every exception inside the callback is caught and
counted (:attr:`PluginStats.callback_errors`), and the callback always lets the compute go
on. It only reads router nodes, so the generated tokens are the same with and without it.

Using it from llama-cpp-python (the high-level ``Llama`` takes no eval callback, so
:class:`PrefetchLlama` re-creates the ``Llama``'s context with the callback installed, right
after ``Llama.__init__``, and feeds the plugin each batch's tokens from ``eval``)::

    from expertpred.prefetch.plugin import PrefetchLlama, load_predictors

    preds = load_predictors("runs/predictors/tiny-mixtral/models", "model.gguf")
    with PrefetchLlama("model.gguf", mode="predictor", predictor=preds,
                       n_ctx=512, n_threads=2) as llm:
        out = llm("def read_config(path):", max_tokens=32, temperature=0.0)
        print(llm.prefetch_stats().engine.hit_rate)

For a raw ``llama_cpp`` context: ``plugin = PrefetchPlugin(path, ...).start()``,
``plugin.install(context_params)`` before ``llama_init_from_model``, ``plugin.begin(tokens,
n_past)`` before each ``llama_decode`` (optional: gives token ids and positions to the
features and the oracle), ``plugin.close()`` after freeing the context.

Assumptions (checked where cheap): one sequence per context; the router nodes are named as
``build_moe_ffn`` names them (``ffn_moe_logits-L``, ``ffn_moe_argsort-L``); in a batch
whose last layer computes only output rows, those rows are the batch's last ones (true for
``Llama.eval``). Prompt tokens the last layer skipped enter the features' history without
that layer (the trace-built features have it): a small online/offline difference limited
to the prompt's contribution to the decayed history at the last layer.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from llama_cpp import Llama

from ..errors import ExpertPredError
from ..features import FeatureBatch, OnlineFeatures
from ..gguf.layout import GGUFFile, MoELayout, check_file_complete, read_layout
from ..llama import ggml, runtime
from ..llama.hook import RoutingHook
from ..llama.nodes import CapturePlan, routing_plan, trace_plan
from ..model import ModelInfo, check_identity
from ..predictors.artifact import PredictorSet, load_artifact
from ..predictors.base import load_all
from ..trace.record import Phase, SequenceTrace
from .engine import PrefetchEngine, PrefetchStats, Priority
from .residency import ResidencyConfig, ResidencyManager, ResidencyStats
from .sysmem import madvise_file_mappings

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger(__name__)

# The greedy loop and prompt tokenization live with the hook; callers of the plugin use them.
generate_greedy = runtime.generate_greedy
prompt_tokens = runtime.prompt_tokens

# The default predictor and lookahead of `expertpred run`, `load_predictors` and
# benchmarks/e2e_prefetch.py. An online layer-step on the inference thread has a budget of
# ~20 µs; this lookup predictor is the most accurate one that fits it (the learned ones,
# fast-mlp the closest, cost more), and D = 1 is the lookahead validated end to end. The
# per-step latencies and recall of each, and the end-to-end ratios, with the commands that
# measured them, are in docs/export.md and docs/e2e.md.
DEFAULT_PREDICTOR = "previous-token+transition"
DEFAULT_LOOKAHEAD = 1
# Confidence gating (PrefetchPlugin min_share): prefetch a predicted expert only if it holds
# at least this share of the predictor's score mass for its layer, so that low-confidence
# guesses do not spend disk bandwidth (precision per threshold measured in docs/e2e.md).
DEFAULT_MIN_SHARE = 0.25
MADV_RANDOM = 1
MADV_NORMAL = 0


class RoutingRecorder(Protocol):
    """Receives the routing of every token row the callback sees (``expertpred serve
    --trace-out``). Rows are positions ``pos0 .. pos0 + n - 1`` of the context's sequence;
    for the last layer to have every row, every token of a batch must be an output."""

    def record(self, li: int, pos0: int, experts: np.ndarray,
               scores: np.ndarray | None) -> None:
        """MoE layer ``li`` routed rows (n, k) ``experts`` on (n, E) ``scores``."""

    def record_weights(self, li: int, pos0: int, weights: np.ndarray) -> None:
        """The (n, k) mixing weights of the experts :meth:`record` got for those rows."""


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


# --- predictor providers -----------------------------------------------------------------------


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


def load_predictors(path: str | os.PathLike[str], gguf_path: str | os.PathLike[str],
                    name: str = DEFAULT_PREDICTOR, offsets: Sequence[int] = (1, 2, 3, 4),
                    source_model: str | os.PathLike[str] | None = None) -> PredictorSet:
    """Predictors for ``gguf_path`` from ``path``: a directory of saved predictors
    (``expertpred train``'s ``<out>/models``, files ``<name>-d<d>.npz``) or an exported
    artifact (``expertpred.predictors.export``), checked against the model by the one
    identity policy (:func:`expertpred.model.check_identity`; ``source_model``: the model
    ``gguf_path`` was widened from)."""
    p = Path(path)
    if not p.exists():
        raise ExpertPredError(f"{p}: no such predictor directory or artifact")
    if not (p.is_dir() and any(p.glob("*-d*.npz"))):
        return load_artifact(p, gguf_path=str(gguf_path), source_model=source_model)
    target = GGUFFile(gguf_path)
    try:
        by_name = load_all(p, target.info, [name], offsets)
    except ExpertPredError as exc:
        raise ExpertPredError(f"predictor {p} does not fit {gguf_path}: {exc}") from None
    if name not in by_name:
        raise ExpertPredError(f"{p}: no saved {name!r} predictor (expected files "
                              f"{name}-d<d>.npz for d in {list(offsets)})")
    pset = PredictorSet.from_predictors(by_name[name], source=str(p))
    check_predictor_model(pset, gguf_path, source_model=source_model, layout=target.layout)
    return pset


def check_predictor_model(pset: PredictorProvider, gguf_path: str | os.PathLike[str],
                          source_model: str | os.PathLike[str] | None = None,
                          layout: MoELayout | None = None) -> None:
    """Raise a one-line :class:`ExpertPredError` unless ``pset`` may run on ``gguf_path``:
    :func:`expertpred.model.check_identity` (exact sha256, or a widened copy of
    ``source_model`` with its routing fingerprint)."""
    what = f"predictor {getattr(pset, 'source', '') or ''} for {gguf_path}".replace("  ", " ")
    source = GGUFFile(source_model) if source_model is not None else None
    check_identity(pset.model, GGUFFile(gguf_path, layout), source=source, what=what)


# --- oracle -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleTrace:
    """True routing of one greedy run: ``experts[t, l]`` = the k experts of MoE layer l at
    position t; ``tokens[t]`` the token at position t (prompt then generated)."""

    tokens: np.ndarray  # int32 (T,)
    experts: np.ndarray  # int16 (T, L, k)

    @classmethod
    def from_sequence(cls, seq: SequenceTrace) -> OracleTrace:
        return cls(np.asarray(seq.tokens, np.int32), np.asarray(seq.experts, np.int16))

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, tokens=self.tokens, experts=self.experts)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], prompt_tokens: Sequence[int] | None = None,
             ) -> OracleTrace:
        """From an ``.npz`` written by :meth:`save`, or a trace dataset directory (the
        sequence whose tokens start with ``prompt_tokens``; the first one without)."""
        p = Path(path)
        if p.is_file():
            try:
                with np.load(p, allow_pickle=False) as z:
                    return cls(z["tokens"].astype(np.int32), z["experts"].astype(np.int16))
            except (OSError, ValueError, KeyError) as exc:
                raise ExpertPredError(f"{p}: not an oracle trace .npz ({exc})") from None
        from ..trace.dataset import TraceDataset

        want = list(prompt_tokens or [])
        for seq in TraceDataset(p).sequences():
            if list(seq.tokens[:len(want)]) == want:
                return cls.from_sequence(seq)
        raise ExpertPredError(f"{p}: no traced sequence starts with the prompt's "
                              f"{len(want)} tokens (trace the same prompt, greedy)")


# --- the plugin ---------------------------------------------------------------------------------


@dataclass
class PluginCounters:
    batches: int = 0  # begin() calls (llama eval calls)
    ubatches: int = 0  # graph passes seen (first MoE layer routed)
    tokens: int = 0  # token rows routed through the first MoE layer
    layer_events: int = 0  # argsort nodes handled
    d0_requests: int = 0  # experts enqueued for the layer being computed
    ahead_requests: int = 0  # experts enqueued for layers ahead (predicted / oracle)
    predictions: int = 0  # predictor calls
    oracle_misses: int = 0  # positions the oracle trace did not cover / disagreed on
    callback_errors: int = 0  # exceptions caught inside the callback
    callback_seconds: float = 0.0  # time spent inside the callback's ready phase
    predict_seconds: float = 0.0  # of which in the predictor
    gated: int = 0  # predicted experts not prefetched (share below min_share)


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

    def as_dict(self) -> dict[str, object]:
        from dataclasses import asdict

        d: dict[str, object] = {"mode": self.mode, "lookahead": self.lookahead,
                                "madvised_bytes": self.madvised_bytes,
                                "first_error": self.first_error}
        d.update(asdict(self.counters))
        if self.engine is not None:
            d.update({f"engine_{k}": v for k, v in self.engine.as_dict().items()})
        if self.residency is not None:
            d.update({f"residency_{k}": v for k, v in self.residency.as_dict().items()})
        return d


class PrefetchPlugin:
    """The eval-callback side of online prefetching; owns the engine (``start``/``close``).

    ``predictor``: a :class:`PredictorProvider` (mode ``predictor``); ``oracle``: an
    :class:`OracleTrace` (mode ``oracle``); ``lookahead``: D, the farthest layer offset
    prefetched (default: :data:`DEFAULT_LOOKAHEAD`, at most the predictor's largest offset;
    1 for the oracle); ``prefetch_k``: experts per look-ahead layer (default
    n_expert_used); ``min_share``: predicted experts whose share of the predictor's score
    mass for that layer is below this are not prefetched (confidence gating: a wrong 48 MiB
    prefetch under memory pressure evicts experts still needed; default
    :data:`DEFAULT_MIN_SHARE`, 0 prefetches all ``prefetch_k``); ``async_requests``: the
    callback posts its engine calls to the engine's dispatcher thread
    (:meth:`PrefetchEngine.post_use`) instead of taking the engine's lock itself;
    ``madvise_random``: after the model is mapped,
    ``madvise(MADV_RANDOM)`` llama.cpp's mapping of the file (no fault
    read-around; the plugin's reads replace it) — call :meth:`advise_mapping` once the
    model is loaded (:class:`PrefetchLlama` does); ``engine_kwargs`` go to
    :class:`PrefetchEngine`; ``recorder``: a :class:`RoutingRecorder` that also gets every
    row's scores and mixing weights (asks for those nodes too: costs graph splits);
    ``residency``: a :class:`~expertpred.prefetch.residency.ResidencyConfig` (policy and
    byte budget for the expert weights; ``belady`` uses ``oracle``), None leaves residency
    to the kernel.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        *,
        mode: str | Mode = Mode.D0,
        predictor: PredictorProvider | None = None,
        oracle: OracleTrace | None = None,
        lookahead: int | None = None,
        prefetch_k: int | None = None,
        wrap: bool = True,
        method: str = "fadvise",
        queue_depth: int = 8,
        madvise_random: bool = False,
        min_share: float | None = None,
        async_requests: bool = True,
        engine_kwargs: Mapping[str, Any] | None = None,
        recorder: RoutingRecorder | None = None,
        residency: ResidencyConfig | None = None,
    ) -> None:
        self.gguf_path = gguf_path
        self.recorder = recorder
        self.residency = residency
        self.min_share = DEFAULT_MIN_SHARE if min_share is None else float(min_share)
        self.async_requests = async_requests
        self.mode = Mode.parse(mode)
        self.predictor = predictor
        self.oracle = oracle
        self.lookahead = lookahead
        self.prefetch_k = prefetch_k
        self.wrap = wrap
        self.method = method
        self.queue_depth = queue_depth
        self.madvise_random = madvise_random
        self.engine_kwargs = dict(engine_kwargs or {})
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> PrefetchPlugin:
        if self._started:
            raise RuntimeError("PrefetchPlugin.start() called twice")
        lay = read_layout(self.gguf_path)
        self.layout_ = lay
        self.blocks_ = tuple(lay.moe_layers)
        self.n_moe_ = len(self.blocks_)
        self.k_ = lay.n_expert_used
        if self.mode is Mode.PREDICTOR:
            if self.predictor is None:
                raise ExpertPredError("mode 'predictor' needs a predictor (--predictor)")
            self.predictor.model.check_same(ModelInfo.from_layout(lay),
                                            f"predictor for {self.gguf_path}")
            default_d = min(DEFAULT_LOOKAHEAD, max(self.predictor.offsets))
        elif self.mode is Mode.ORACLE:
            if self.oracle is None:
                raise ExpertPredError("mode 'oracle' needs a recorded trace (--oracle-trace)")
            if self.oracle.experts.shape[1:] != (self.n_moe_, self.k_):
                raise ExpertPredError(
                    f"oracle trace: experts shape {self.oracle.experts.shape}, expected "
                    f"(T, {self.n_moe_}, {self.k_}) for {self.gguf_path}")
            default_d = 1
        else:
            default_d = 0
        if self.lookahead is not None and self.mode in (Mode.OFF, Mode.D0):
            raise ExpertPredError(f"lookahead {self.lookahead}: mode {self.mode.value!r} does "
                                  "not look ahead; expected a lookahead only with mode "
                                  "'predictor' or 'oracle'")
        d = default_d if self.lookahead is None else self.lookahead
        if not 0 <= d <= self.n_moe_:
            raise ExpertPredError(f"lookahead {d}: expected 0..{self.n_moe_} (the MoE layers "
                                  f"of {self.gguf_path})")
        if self.mode is Mode.PREDICTOR and d:
            missing = [x for x in range(1, d + 1) if x not in self.predictor.offsets]
            if missing:
                raise ExpertPredError(f"lookahead {d}: the predictor has no model for d="
                                      f"{missing} (has {list(self.predictor.offsets)})")
        self.lookahead_ = d
        self.pk_ = self.prefetch_k or self.k_
        self._c = PluginCounters()
        self._first_error = ""
        self._madvised = 0
        self._cur_experts = np.zeros((self.n_moe_, self.k_), np.int64)  # this token's
        self._rec_pos = [0] * self.n_moe_  # recorder: first position of li's last rows
        self._logits: list[np.ndarray | None] = [None] * self.n_moe_
        self._rows: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # prompt stash
        self._tokens: list[int] = []
        self._n_past = 0
        self._cursor = 0
        self._ub_start = 0
        self._ub_rows = 0
        self._pos = -1  # position of the single decode row being processed
        self._features: OnlineFeatures | None = None
        self._feat_pos = -1  # last position fed to the features
        if self.mode is Mode.PREDICTOR:
            self._features = OnlineFeatures(ModelInfo.from_layout(lay, self.predictor.model.sha256),
                                            history_decay=self.predictor.history_decay)
        self.engine_: PrefetchEngine | None = None
        if self.mode is not Mode.OFF:
            self.engine_ = PrefetchEngine(self.gguf_path, lay, method=self.method,
                                          queue_depth=self.queue_depth, **self.engine_kwargs)
            self.engine_.start()
        self.residency_: ResidencyManager | None = None
        if self.residency is not None and self.mode is not Mode.OFF:
            future = self.oracle.experts if self.oracle is not None else None
            self.residency_ = ResidencyManager(self.gguf_path, lay, self.residency,
                                               future=future).start()
        self._started = True
        return self

    def close(self) -> None:
        """Stop the engine (bounded); the callback keeps answering "go on" afterwards."""
        if not self._started:
            return
        if self.engine_ is not None:
            self.engine_.flush()
            self._final_stats = self.engine_.stats()
            self.engine_.close()
        if self.residency_ is not None:
            self.residency_.flush()
            self._final_residency = self.residency_.stats()
            self.residency_.close()
        self._started = False

    def __enter__(self) -> PrefetchPlugin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- wiring -----------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.mode is not Mode.OFF

    def install(self, params: llama_cpp.llama_context_params,
                plan: CapturePlan | None = None) -> None:
        """Install the routing hook (``llama.hook.RoutingHook``) as ``cb_eval`` on
        ``params``, before the context is created. ``plan``: the nodes to capture; default:
        experts at each layer's argsort node plus router logits in predictor mode. A
        ``recorder`` needs the arch's score and weight nodes: pass
        ``llama.nodes.trace_plan`` of a probed graph (:class:`PrefetchLlama` does). Keep this
        plugin alive as long as the context: it owns the hook."""
        if not self.enabled:
            return
        if not self._started:
            raise RuntimeError("PrefetchPlugin.install() before start()")
        if plan is None:
            plan = routing_plan(scores=self.mode is Mode.PREDICTOR or self.recorder is not None)
        lay = self.layout_
        self._plan = plan
        self.hook_ = RoutingHook(
            n_layer=lay.n_layer, moe_layers=self.blocks_, n_expert=lay.n_expert, k=self.k_,
            n_embd=lay.n_embd, n_rows=int(params.n_ubatch), plan=plan, ring=True,
            notify=self._on_layer)
        self.hook_.install(params)

    def advise_mapping(self) -> int:
        """``madvise(MADV_RANDOM)`` every mapping of the model file in this process, if
        ``madvise_random``; returns the bytes advised (0 when not asked or not mapped)."""
        if not (self.madvise_random and self.enabled):
            return 0
        try:
            self._madvised = madvise_file_mappings(self.gguf_path, MADV_RANDOM)
        except OSError as exc:
            log.warning("madvise(MADV_RANDOM) on %s failed: %s", self.gguf_path, exc)
        return self._madvised

    def attach_residency(self) -> int:
        """The model is mapped: start the residency manager on its mappings (llama.cpp's and
        the engine's); returns the budget in bytes (0 without a manager)."""
        if self.residency_ is None or self.engine_ is None:
            return 0
        return self.residency_.attach(extra=[self.engine_._map])

    def begin(self, tokens: Sequence[int], n_past: int) -> None:
        """The next ``llama_decode`` calls evaluate ``tokens`` at positions ``n_past ..``."""
        if not self.enabled:
            return
        try:
            hook = getattr(self, "hook_", None)
            if hook is not None:
                hook.raise_errors()  # what went wrong in the last batch's callback: counted
            self._finish_ubatch()
            if n_past == 0 or n_past <= self._feat_pos:
                self._reset_sequence()
            self._tokens = [int(t) for t in tokens]
            self._n_past = int(n_past)
            self._cursor = 0
            self._ub_rows = 0
            self._c.batches += 1
        except Exception as exc:  # noqa: BLE001 - never break the caller's inference
            self._error(exc)

    def stats(self) -> PluginStats:
        eng = None
        if self.engine_ is not None:
            if self._started:
                self.engine_.flush(0.5)
                eng = self.engine_.stats()
            else:
                eng = getattr(self, "_final_stats", None)
        res = None
        if getattr(self, "residency_", None) is not None:
            if self._started:
                self.residency_.flush(0.5)
                res = self.residency_.stats()
            else:
                res = getattr(self, "_final_residency", None)
        return PluginStats(mode=self.mode.value, lookahead=getattr(self, "lookahead_", 0),
                           counters=replace(self._c), engine=eng,
                           madvised_bytes=self._madvised, first_error=self._first_error,
                           residency=res)

    # --- the callback -----------------------------------------------------------------------------
    def _on_layer(self, li: int, row: int, n: int) -> None:
        """The hook's notify: MoE layer ``li`` routed rows ``row .. row+n`` of this ubatch
        (before its expert matmuls). Never raises: errors are counted."""
        if not self._started:
            return
        try:
            t0 = time.perf_counter()
            hook, plan = self.hook_, self._plan
            scores = hook.scores[li, row:row + n].copy() if plan.score_node else None
            if self.mode is Mode.PREDICTOR:
                self._logits[li] = scores
            self._on_routed(li, hook.experts[li, row:row + n].copy(), scores)
            if self.recorder is not None and plan.weight_node:
                self.recorder.record_weights(li, self._rec_pos[li],
                                             hook.weights[li, row:row + n].copy())
            self._c.callback_seconds += time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - an exception must not unwind through C
            self._error(exc)

    def _error(self, exc: BaseException) -> None:
        self._c.callback_errors += 1
        if not self._first_error:
            self._first_error = f"{type(exc).__name__}: {exc}"
            log.warning("prefetch plugin: callback error (counted, inference continues): %s",
                        self._first_error, exc_info=exc)

    def _on_routed(self, li: int, experts: np.ndarray, scores: np.ndarray | None) -> None:
        """Layer ``li`` (MoE index) has routed ``experts`` (n, k) on ``scores`` (n, E; when
        captured) for this ubatch's rows."""
        c, eng = self._c, self.engine_
        assert eng is not None
        n = len(experts)
        block = self.blocks_[li]
        c.layer_events += 1
        if li == 0:
            self._finish_ubatch()
            self._ub_start, self._ub_rows = self._cursor, n
            self._cursor += n
            c.ubatches += 1
            c.tokens += n
        used = np.unique(experts).tolist()
        if self.async_requests:
            eng.post_use(block, used)
        else:
            eng.advance(block)
            eng.on_use(block, used)
            eng.request(block, used, priority=Priority.DEMAND)
        c.d0_requests += len(used)
        # positions of these rows: the last n rows of the ubatch (output rows at the top)
        pos0 = self._n_past + self._ub_start + self._ub_rows - n
        if self.recorder is not None:
            self._rec_pos[li] = pos0
            self.recorder.record(li, pos0, experts, scores)
        if self.residency_ is not None:
            i = pos0 + n - 1 - self._n_past  # the last row's token: the sampled one in decode
            if li == 0 and 0 <= i < len(self._tokens):
                self.residency_.post_token(pos0 + n - 1, self._tokens[i])
            self.residency_.post_step(pos0 + n - 1, li, used)
        if self.mode is Mode.PREDICTOR:
            self._predictor_step(li, experts, pos0)
        elif self.mode is Mode.ORACLE:
            self._oracle_step(li, pos0, n)

    def _ahead(self, li: int, d: int) -> tuple[int, bool]:
        """(target MoE layer, next_token) of offset ``d`` from ``li``; (-1, _) if none."""
        tgt = li + d
        if tgt < self.n_moe_:
            return tgt, False
        if self.wrap and tgt - self.n_moe_ < li:
            return tgt - self.n_moe_, True
        return -1, False

    def _oracle_step(self, li: int, pos0: int, n: int) -> None:
        assert self.oracle is not None and self.engine_ is not None
        o = self.oracle
        for d in range(1, self.lookahead_ + 1):
            tgt, nxt = self._ahead(li, d)
            if tgt < 0:
                continue
            lo, hi = pos0 + int(nxt), pos0 + n + int(nxt)
            if hi > len(o.tokens) or not self._oracle_agrees(pos0, n):
                self._c.oracle_misses += 1
                continue
            ex = np.unique(o.experts[lo:hi, tgt]).tolist()
            self._request(self.blocks_[tgt], ex, nxt)
            self._c.ahead_requests += len(ex)

    def _oracle_agrees(self, pos0: int, n: int) -> bool:
        """The trace has the tokens this run evaluates at these positions (when known)."""
        assert self.oracle is not None
        start = pos0 - self._n_past
        if not self._tokens or start < 0:
            return True
        ours = self._tokens[start:start + n]
        theirs = self.oracle.tokens[pos0:pos0 + len(ours)].tolist()
        return ours == theirs

    # --- predictor path -----------------------------------------------------------------------
    def _token_at(self, pos: int) -> int:
        i = pos - self._n_past
        return self._tokens[i] if 0 <= i < len(self._tokens) else 0

    def _predictor_step(self, li: int, experts: np.ndarray, pos0: int) -> None:
        if self._ub_rows > 1:  # prompt batch: stash, replay into the features at its end
            logits = self._logits[li]
            self._rows[li] = (experts, None if logits is None else logits[-len(experts):])
            return
        f = self._features
        assert f is not None and self.predictor is not None and self.engine_ is not None
        if li == 0:
            f.next_token(self._token_at(pos0), Phase.DECODE)
            self._feat_pos = pos0
        logits = self._logits[li]
        if logits is None:
            logits = np.zeros((1, self.layout_.n_expert), np.float32)
        f.update(li, logits[0], experts[0])
        self._cur_experts[li] = experts[0]
        t0 = time.perf_counter()
        for d in range(1, self.lookahead_ + 1):
            tgt, nxt = self._ahead(li, d)
            if tgt < 0:
                continue
            if nxt:  # beyond the last layer: this token's experts there (previous-token guess)
                ex = self._cur_experts[tgt].tolist()
            else:
                x = f.features(d)
                if x is None:
                    continue
                self._c.predictions += 1
                if self.min_share > 0:
                    top, share = self.predictor.topk_shares(d, x, self.pk_)
                    ex = top[share >= self.min_share].tolist()
                    self._c.gated += len(top) - len(ex)
                else:
                    ex = self.predictor.topk(d, x, self.pk_).tolist()
                if not ex:
                    continue
            self._request(self.blocks_[tgt], ex, nxt)
            self._c.ahead_requests += len(ex)
        self._c.predict_seconds += time.perf_counter() - t0

    def _request(self, block: int, experts: list[int], next_token: bool) -> None:
        assert self.engine_ is not None
        if self.residency_ is not None:
            self.residency_.post_prefetch(self.blocks_.index(block), experts)
        if self.async_requests:
            self.engine_.post_request(block, experts, next_token)
        else:
            self.engine_.request(block, experts, next_token=next_token)

    def _finish_ubatch(self) -> None:
        """Feed a stashed multi-row ubatch (prompt) into the features, token by token."""
        if not self._rows:
            return
        rows, self._rows = self._rows, {}
        f = self._features
        if f is None:
            return
        n = self._ub_rows
        pos0 = self._n_past + self._ub_start
        for i in range(n):
            f.next_token(self._token_at(pos0 + i), Phase.PROMPT)
            for li in range(self.n_moe_):
                got = rows.get(li)
                if got is None:
                    continue
                ex, lg = got
                j = i - (n - len(ex))  # layers with fewer rows hold the last rows
                if j < 0:
                    continue
                zeros = np.zeros(self.layout_.n_expert, np.float32)
                f.update(li, lg[j] if lg is not None else zeros, ex[j])
        self._feat_pos = pos0 + n - 1

    def _reset_sequence(self) -> None:
        self._rows = {}
        if self._features is not None:
            self._features.reset()
        self._feat_pos = -1


# --- llama-cpp-python integration ---------------------------------------------------------------


class PrefetchLlama(Llama):  # type: ignore[misc]
    """A ``llama_cpp.Llama`` whose context runs the prefetch plugin's eval callback.

    ``PrefetchLlama(model_path, mode=..., predictor=..., oracle=..., lookahead=...,
    method=..., queue_depth=..., madvise_random=..., **llama_kwargs)``: the plugin keywords
    go to :class:`PrefetchPlugin`, the rest to ``Llama`` (``verbose`` defaults to False).
    ``Llama.__init__`` creates a context without a callback; this class frees it and creates
    the same context (same ``context_params``) with ``cb_eval`` set, attached to a
    persistent ggml threadpool (the callback splits each token's graph into one compute per
    MoE layer; the pool avoids respawning threads for each). ``eval`` tells the plugin which
    tokens each batch holds. ``close()`` frees the context before the plugin.
    """

    def __init__(self, model_path: str | os.PathLike[str], *, mode: str | Mode = Mode.D0,
                 predictor: PredictorProvider | None = None, oracle: OracleTrace | None = None,
                 lookahead: int | None = None, prefetch_k: int | None = None,
                 wrap: bool = True, method: str = "fadvise", queue_depth: int = 8,
                 madvise_random: bool = False, min_share: float | None = None,
                 async_requests: bool = True,
                 engine_kwargs: Mapping[str, Any] | None = None,
                 recorder: RoutingRecorder | None = None,
                 residency: ResidencyConfig | None = None, **llama_kwargs: Any) -> None:
        runtime.quiet_logs()
        self.plugin = PrefetchPlugin(model_path, mode=mode, predictor=predictor, oracle=oracle,
                                     lookahead=lookahead, prefetch_k=prefetch_k, wrap=wrap,
                                     method=method, queue_depth=queue_depth,
                                     madvise_random=madvise_random, min_share=min_share,
                                     async_requests=async_requests,
                                     engine_kwargs=engine_kwargs, recorder=recorder,
                                     residency=residency)
        self._pool: ggml.Threadpool | None = None
        self._closed = False
        self.plugin.start()
        try:
            # llama.cpp maps the file: a page past a shortened file's end is a SIGBUS
            check_file_complete(model_path, self.plugin.layout_)
            llama_kwargs.setdefault("verbose", False)
            errors = runtime._LoadErrors()
            try:
                with errors:
                    super().__init__(model_path=str(model_path), **llama_kwargs)
            except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
                why = errors.lines[0] if errors.lines else str(exc)
                raise ExpertPredError(f"{model_path}: llama.cpp failed to load the model "
                                      f"({why})") from None
            if self.plugin.enabled:
                self._swap_context()
                self.plugin.advise_mapping()
                self.plugin.attach_residency()
        except BaseException:
            self.plugin.close()
            raise

    def _swap_context(self) -> None:
        plan = self._probe_plan() if self.plugin.recorder is not None else None
        self._pool = runtime.hook_llama(self, lambda params: self.plugin.install(params, plan))

    def _probe_plan(self) -> CapturePlan:
        """The tracer's plan (the arch's score and weight nodes) from a one-token probe of
        this model's graph: what a recorder needs to record what the tracer would."""
        lay = self.plugin.layout_
        what = f"{self.model_path}: arch {lay.arch!r}"
        params = runtime.context_params(64, 1, int(self.n_threads))
        token = int(self.token_bos()) if 0 <= int(self.token_bos()) < self.n_vocab() else 0
        with ggml.Threadpool(int(self.n_threads)) as pool, runtime.probe_nodes(
                self._model.model, params, pool, token, what) as found:
            return trace_plan(found, lay.moe_layers[0], False, what)

    def eval(self, tokens: Sequence[int]) -> None:
        self.plugin.begin(tokens, self.n_tokens)
        return super().eval(tokens)

    def prefetch_stats(self) -> PluginStats:
        """The plugin's counters and the engine's statistics so far."""
        return self.plugin.stats()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        super().close()  # frees the context (and the callback's last user) first
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.plugin.close()

    def __enter__(self) -> PrefetchLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        """No work here (``Llama.__del__`` would close): the one lifecycle is ``with`` /
        :meth:`close`; a forgotten instance's llama.cpp objects free themselves."""
