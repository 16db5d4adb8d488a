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
   predicted experts with less than ``min_rel_share / k`` of the predictor's score mass
   are not prefetched (confidence gating).

With ``async_requests=True`` (default) steps 1-3 only post records to the engine's
dispatcher thread (:meth:`PrefetchEngine.post_use` / ``post_request``, a deque append):
the engine's lock and bookkeeping stay off the inference thread, and the accounting of
step 1 happens on that thread moments after the routing is known, in the same order.
   With ``wrap=True`` targets past the last MoE layer are the *next* token's first layers:
   the oracle knows them, the predictor (whose features stop at the last layer) repeats
   this token's experts of that layer (the previous-token guess). By default only the
   oracle wraps: the predictor's guess there cost more than it saved.

Modes (:class:`Mode`): ``off`` (no callback at all: stock llama.cpp), ``d0``, ``predictor``,
``oracle``. The callback never stalls or breaks inference: prefetch I/O runs on the engine's
threads (its errors are counted there), every exception inside the callback is caught and
counted (:attr:`PluginStats.callback_errors`), and the callback always lets the compute go
on. It only reads router nodes, so the generated tokens are the same with and without it.

Using it from llama-cpp-python (the high-level ``Llama`` takes no eval callback, so
:class:`PrefetchLlama` re-creates the ``Llama``'s context with the callback installed, right
after ``Llama.__init__``, and feeds the plugin each batch's tokens from ``eval``)::

    from expertpred.prefetch.plugin import PluginConfig, PrefetchLlama, load_predictors

    preds = load_predictors("runs/predictors/tiny-mixtral/models", "model.gguf")
    cfg = PluginConfig(mode="predictor", predictor=preds)
    with PrefetchLlama("model.gguf", cfg, n_ctx=512, n_threads=2) as llm:
        out = llm("def read_config(path):", max_tokens=32, temperature=0.0)
        print(llm.prefetch_stats().engine.hit_rate)

For a raw ``llama_cpp`` context: ``plugin = PrefetchPlugin(path, config).start()``,
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

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ExpertPredError
from ..features import OnlineFeatures
from ..gguf.layout import read_layout
from ..llama import runtime
from ..llama.hook import RoutingHook
from ..llama.nodes import CapturePlan, routing_plan
from ..model import ModelInfo
from ..predictors.artifact import PredictorSet
from .engine import PrefetchEngine, Priority
from .oracle import OracleTrace
from .plugin_config import (
    DEFAULT_LOOKAHEAD,
    DEFAULT_MIN_REL_SHARE,
    DEFAULT_PREDICTOR,
    FALLBACK_PREDICTOR,
    MADV_RANDOM_MAX_EXPERT_BYTES,
    Mode,
    PluginConfig,
    PredictorProvider,
    RoutingRecorder,
)
from .plugin_stats import PluginCounters, PluginStats
from .predict_path import PredictorPath, ahead
from .predictor_io import check_predictor_model, load_predictors
from .residency import ResidencyManager
from .sysmem import madvise_file_mappings

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger(__name__)

# Callers import these from here (``from expertpred.prefetch.plugin import X``): the plugin's
# concepts live in plugin_config, plugin_stats, predictor_io and oracle; PrefetchLlama (in
# llama_plugin) is served by the module __getattr__ at the end.
__all__ = [
    "DEFAULT_LOOKAHEAD", "DEFAULT_MIN_REL_SHARE", "DEFAULT_PREDICTOR", "FALLBACK_PREDICTOR",
    "Mode", "OracleTrace",
    "PluginConfig", "PluginCounters", "PluginStats", "PredictorProvider", "PredictorSet",
    "PrefetchPlugin", "RoutingRecorder", "check_predictor_model",
    "generate_greedy", "load_predictors", "prompt_tokens",
]

# The greedy loop and prompt tokenization live with the hook; callers of the plugin use them.
generate_greedy = runtime.generate_greedy
prompt_tokens = runtime.prompt_tokens

MADV_RANDOM = 1
MADV_NORMAL = 0


class PrefetchPlugin:
    """The eval-callback side of online prefetching; owns the engine (``start``/``close``).

    ``config`` (or its fields as keywords) says what to prefetch and how; see
    :class:`PluginConfig`. Of its fields: ``min_rel_share`` gates out predicted experts
    whose share of the predictor's score mass is low (a wrong 48 MiB prefetch under memory
    pressure evicts experts still needed); ``madvise_random`` takes effect in
    :meth:`advise_mapping`, called once the model is mapped (:class:`PrefetchLlama` does);
    a ``recorder`` also asks for every row's scores and mixing weights (costs graph
    splits); ``residency`` with policy ``belady`` uses ``oracle``.
    """

    def __init__(self, gguf_path: str | os.PathLike[str], config: PluginConfig | None = None,
                 **fields: Any) -> None:
        self.gguf_path = gguf_path
        self.config = cfg = replace(config or PluginConfig(), **fields)
        # the callback reads these on every layer: plain attributes, not config lookups
        self.mode = cfg.mode
        self.predictor = cfg.predictor
        self.oracle = cfg.oracle
        self.recorder = cfg.recorder
        self.residency = cfg.residency
        self.min_rel_share = cfg.min_rel_share
        self.async_requests = cfg.async_requests
        self.wrap = cfg.mode == Mode.ORACLE if cfg.wrap is None else cfg.wrap
        self.lookahead = cfg.lookahead
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> PrefetchPlugin:
        """Read the layout, check the mode's inputs against it, start the engine (and the
        residency manager)."""
        if self._started:
            raise RuntimeError("PrefetchPlugin.start() called twice")
        # 1. the model's MoE shape
        lay = read_layout(self.gguf_path)
        self.layout_ = lay
        self.blocks_ = tuple(lay.moe_layers)
        self.n_moe_ = len(self.blocks_)
        self.k_ = lay.n_expert_used
        # 2. the lookahead D the mode's inputs allow
        self.lookahead_ = self._resolve_lookahead(self._check_inputs())
        self.pk_ = self.config.prefetch_k or self.k_
        # 3. per-sequence state, then the threads
        self._reset_state()
        self._start_threads()
        self._switch_before = sys.getswitchinterval()
        if self.config.switch_interval is not None and self.mode is not Mode.OFF:
            sys.setswitchinterval(self.config.switch_interval)
        self._started = True
        return self

    def _check_inputs(self) -> int:
        """Check the predictor / oracle the mode needs fits the model; the mode's default D."""
        if self.mode is Mode.PREDICTOR:
            if self.predictor is None:
                raise ExpertPredError("mode 'predictor' needs a predictor (--predictor)")
            self.predictor.model.check_same(ModelInfo.from_layout(self.layout_),
                                            f"predictor for {self.gguf_path}")
            if self.predictor.needs_hidden:  # else every prediction fails in the callback
                raise ExpertPredError(
                    f"predictor {getattr(self.predictor, 'source', '') or ''} reads hidden "
                    "states (router inputs), which the plugin does not capture online; "
                    "expected one trained without them (expertpred train "
                    "--mlp_use_hidden=false, --lgb_use_hidden=false)")
            return min(DEFAULT_LOOKAHEAD, max(self.predictor.offsets))
        if self.mode is Mode.ORACLE:
            if self.oracle is None:
                raise ExpertPredError("mode 'oracle' needs a recorded trace (--oracle-trace)")
            if self.oracle.experts.shape[1:] != (self.n_moe_, self.k_):
                raise ExpertPredError(
                    f"oracle trace: experts shape {self.oracle.experts.shape}, expected "
                    f"(T, {self.n_moe_}, {self.k_}) for {self.gguf_path}")
            return 1
        return 0

    def _resolve_lookahead(self, default_d: int) -> int:
        """The asked lookahead (or ``default_d``), checked against mode, layers, predictor."""
        if self.lookahead is not None and self.mode in (Mode.OFF, Mode.D0):
            raise ExpertPredError(f"lookahead {self.lookahead}: mode {self.mode.value!r} does "
                                  "not look ahead; expected a lookahead only with mode "
                                  "'predictor' or 'oracle'")
        d = default_d if self.lookahead is None else self.lookahead
        if not 0 <= d <= self.n_moe_:
            raise ExpertPredError(f"lookahead {d}: expected 0..{self.n_moe_} (the MoE layers "
                                  f"of {self.gguf_path})")
        if self.mode is Mode.PREDICTOR and d:
            assert self.predictor is not None
            missing = [x for x in range(1, d + 1) if x not in self.predictor.offsets]
            if missing:
                raise ExpertPredError(f"lookahead {d}: the predictor has no model for d="
                                      f"{missing} (has {list(self.predictor.offsets)})")
        return d

    def _reset_state(self) -> None:
        """Counters and the callback's per-ubatch / per-sequence state, all empty."""
        self._c = PluginCounters()
        self._first_error = ""
        self._madvised = 0
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
            assert self.predictor is not None
            self._features = OnlineFeatures(
                ModelInfo.from_layout(self.layout_, self.predictor.model.sha256),
                history_decay=self.predictor.history_decay)

    def _start_threads(self) -> None:
        """The engine (unless off) and the residency manager (when configured)."""
        cfg, lay = self.config, self.layout_
        self.engine_: PrefetchEngine | None = None
        if self.mode is not Mode.OFF:
            self.engine_ = PrefetchEngine(self.gguf_path, lay, method=cfg.method,
                                          queue_depth=cfg.queue_depth, **cfg.engine_kwargs)
            self.engine_.start()
        self._path: PredictorPath | None = None
        if self._features is not None:
            assert self.predictor is not None
            self._path = PredictorPath(
                self.predictor, self._features, n_moe=self.n_moe_, k=self.k_,
                lookahead=self.lookahead_, wrap=self.wrap,
                min_rel_share=self.min_rel_share,
                prefetch_k=self.pk_, counters=self._c, request=self._request,
                on_error=self._error, threaded=cfg.predict_thread)
        self.residency_: ResidencyManager | None = None
        # prefetches to post at the callback's end: (MoE layer, experts, next token)
        self._hold: list[tuple[int, list[int], bool]] | None = None
        if self.residency is not None and self.mode is not Mode.OFF:
            future = self.oracle.experts if self.oracle is not None else None
            self.residency_ = ResidencyManager(self.gguf_path, lay, self.residency,
                                               future=future).start()
    def close(self) -> None:
        """Stop the engine (bounded); the callback keeps answering "go on" afterwards."""
        if not self._started:
            return
        if self._path is not None:
            self._path.close()  # its last requests reach the engine before the engine stops
        if self.engine_ is not None:
            self.engine_.flush()
            self._final_stats = self.engine_.stats()
            self.engine_.close()
        if self.residency_ is not None:
            self.residency_.flush()
            self._final_residency = self.residency_.stats()
            self.residency_.close()
        sys.setswitchinterval(self._switch_before)
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
        ``madvise_random`` (None: when the largest expert is below
        ``MADV_RANDOM_MAX_EXPERT_BYTES``); returns the bytes advised (0 when not asked or not
        mapped)."""
        want = self.config.madvise_random
        if want is None and self.enabled:
            lay = self.layout_
            largest = max(lay.bytes_per_expert(b) for b in lay.moe_layers)
            want = largest < MADV_RANDOM_MAX_EXPERT_BYTES
        if not (want and self.enabled):
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
                if self._path is not None:
                    self._path.flush(0.5)
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
        name = getattr(self.predictor, "name", "") if self.mode is Mode.PREDICTOR else ""
        return PluginStats(mode=self.mode.value, lookahead=getattr(self, "lookahead_", 0),
                           predictor=str(name), counters=replace(self._c), engine=eng,
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
        c = self._c
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
        c.d0_requests += len(used)
        # positions of these rows: the last n rows of the ubatch (output rows at the top)
        pos0 = self._n_past + self._ub_start + self._ub_rows - n
        if self.recorder is not None:
            self._rec_pos[li] = pos0
            self.recorder.record(li, pos0, experts, scores)
        if self.config.predict_thread or self.mode is Mode.D0:
            self._post_layer(li, block, used, pos0, n, [])
            self._ahead_step(li, experts, pos0, n)  # a predict thread posts its own requests
            return
        # Inline: decide this layer's prefetches before posting anything. Every post wakes a
        # thread (the dispatcher, the residency manager) that then contends for the GIL with
        # the prediction: the callback's wall per layer was 1.9-3.5 ms with prefetching, 0.2-
        # 0.3 ms with d0 alone (docs/e2e.md). The demand reads wait for the prediction's CPU.
        self._hold = []
        try:
            self._ahead_step(li, experts, pos0, n)
        finally:
            held, self._hold = self._hold, None
        self._post_layer(li, block, used, pos0, n, held)

    def _ahead_step(self, li: int, experts: np.ndarray, pos0: int, n: int) -> None:
        if self.mode is Mode.PREDICTOR:
            self._predictor_step(li, experts, pos0)
        elif self.mode is Mode.ORACLE:
            self._oracle_step(li, pos0, n)

    def _post_layer(self, li: int, block: int, used: list[int], pos0: int, n: int,
                    held: list[tuple[int, list[int], bool]]) -> None:
        """Post layer ``li``'s demand reads of ``used``, then the ``held`` prefetches, then
        the residency manager's records in its order: token, step, the step's prefetches."""
        eng = self.engine_
        assert eng is not None
        if self.async_requests:
            eng.post_use(block, used)
        else:
            eng.advance(block)
            eng.on_use(block, used)
            eng.request(block, used, priority=Priority.DEMAND)
        for tgt, ex, nxt in held:
            self._post_request(tgt, ex, nxt)
        res = self.residency_
        if res is not None:
            i = pos0 + n - 1 - self._n_past  # the last row's token: the sampled one in decode
            if li == 0 and 0 <= i < len(self._tokens):
                res.post_token(pos0 + n - 1, self._tokens[i])
            res.post_step(pos0 + n - 1, li, used)
            for tgt, ex, _ in held:
                res.post_prefetch(tgt, ex)

    def _ahead(self, li: int, d: int) -> tuple[int, bool]:
        return ahead(li, d, self.n_moe_, self.wrap)

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
            self._request(tgt, ex, nxt)
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
        logits = self._logits[li]
        if self._ub_rows > 1:  # prompt batch: stash, replay into the features at its end
            self._rows[li] = (experts, None if logits is None else logits[-len(experts):])
            return
        assert self._path is not None
        if logits is None:
            logits = np.zeros((1, self.layout_.n_expert), np.float32)
        if li == 0:
            self._feat_pos = pos0
        # experts and logits are this callback's own copies: safe to hand to another thread
        self._path.routed(li, pos0, experts[0], logits[0], self._token_at(pos0))

    def _request(self, tgt: int, experts: list[int], next_token: bool) -> None:
        """Read ``experts`` of MoE layer ``tgt`` ahead (the predictor path's and the
        oracle's :data:`~expertpred.prefetch.predict_path.Request`)."""
        if self.residency_ is not None:
            # an expert the manager keeps needs no read; its request only cost the engine a
            # job and the manager a record, on threads that take the GIL from inference
            keep = self.residency_.not_resident(tgt, experts)
            self._c.ahead_resident += len(experts) - len(keep)
            if not keep:
                return
            experts = keep
        if self._hold is not None:  # inline, inside the callback: posted at its end
            self._hold.append((tgt, experts, next_token))
            return
        if self.residency_ is not None:
            self.residency_.post_prefetch(tgt, experts)
        self._post_request(tgt, experts, next_token)

    def _post_request(self, tgt: int, experts: list[int], next_token: bool) -> None:
        assert self.engine_ is not None
        block = self.blocks_[tgt]  # the engine reads by the model's block numbers
        if self.async_requests:
            self.engine_.post_request(block, experts, next_token)
        else:
            self.engine_.request(block, experts, next_token=next_token)

    def _finish_ubatch(self) -> None:
        """Feed a stashed multi-row ubatch (prompt) into the features, token by token."""
        if not self._rows:
            return
        rows, self._rows = self._rows, {}
        if self._path is None:
            return
        n = self._ub_rows
        pos0 = self._n_past + self._ub_start
        self._path.prompt(rows, [self._token_at(pos0 + i) for i in range(n)],
                          self.layout_.n_expert)
        self._feat_pos = pos0 + n - 1

    def _reset_sequence(self) -> None:
        self._rows = {}
        if self._path is not None:
            self._path.reset()
        self._feat_pos = -1


def __getattr__(name: str) -> Any:
    # PrefetchLlama lives in llama_plugin, which imports this module: re-exported lazily so
    # that either module can be imported first
    if name == "PrefetchLlama":
        from .llama_plugin import PrefetchLlama

        return PrefetchLlama
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
