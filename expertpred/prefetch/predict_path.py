"""The plugin's predictor side: online features -> predictor -> speculative requests.

It runs on the inference thread (inside llama.cpp's eval callback), or, with
``PluginConfig.predict_thread``, on a thread of its own: the callback then only posts the
routing it saw, and a learned predictor's cost (tens of µs per layer-step in numpy) leaves
the inference thread. A prediction that the thread finishes after its target layer has
already routed is useless (that layer's experts were read on demand): it is counted as late
and not requested.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from ..features import OnlineFeatures
from ..trace.record import Phase
from .handoff import Handoff
from .plugin_config import PredictorProvider
from .plugin_stats import PluginCounters

log = logging.getLogger(__name__)

# records the predict thread may hold: a whole prompt is one record, a decode layer-step one
# more; when it falls this far behind, routing is dropped (counted) instead of queued
PREDICT_BACKLOG = 4096

Request = Callable[[int, list[int], bool], None]  # (target MoE layer, experts, next token)


def ahead(li: int, d: int, n_moe: int, wrap: bool) -> tuple[int, bool]:
    """(target MoE layer, next_token) of offset ``d`` from layer ``li``; (-1, _) if none."""
    tgt = li + d
    if tgt < n_moe:
        return tgt, False
    if wrap and tgt - n_moe < li:
        return tgt - n_moe, True
    return -1, False


class PredictorPath:
    """Feeds the online features and turns predictions into requests, in token order.

    ``request(target_layer, experts, next_token)`` is the plugin's; ``on_error`` counts an
    exception raised on the predict thread (inline, the callback's own handler does)."""

    def __init__(self, predictor: PredictorProvider, features: OnlineFeatures, *, n_moe: int,
                 k: int, lookahead: int, wrap: bool, min_rel_share: float, prefetch_k: int,
                 counters: PluginCounters, request: Request,
                 on_error: Callable[[BaseException], None], threaded: bool) -> None:
        self.predictor = predictor
        self.features = features
        self.n_moe, self.lookahead, self.wrap = n_moe, lookahead, wrap
        self.min_share, self.pk = min_rel_share / k, prefetch_k  # the gate as a share
        self.c = counters
        self.request = request
        self.on_error = on_error
        self.cur = np.zeros((n_moe, k), np.int64)  # this token's experts, per layer
        # inference thread: pos * n_moe + li of the last layer routed (an int store is atomic)
        self.progress = -1
        self._thread: Handoff[tuple[int, Callable[[], None]]] | None = None
        if threaded:
            self._thread = Handoff(self._apply, PREDICT_BACKLOG, name="prefetch-predict")
            self._thread.start()

    # --- called on the inference thread --------------------------------------------------------
    def routed(self, li: int, pos: int, experts: np.ndarray, logits: np.ndarray,
               token: int) -> None:
        """Decode: layer ``li`` routed ``experts`` (k,) on ``logits`` (E,) for the token
        ``token`` at position ``pos``."""
        self.progress = pos * self.n_moe + li
        self._run(partial(self._step, li, pos, experts, logits, token))

    def prompt(self, rows: dict[int, tuple[np.ndarray, np.ndarray | None]],
               tokens: list[int], n_expert: int) -> None:
        """A prompt ubatch of ``len(tokens)`` rows has routed: ``rows[li]`` = (experts
        (m, k), logits (m, E) or None) of its last m rows."""
        self._run(partial(self._prompt, rows, tokens, n_expert))

    def reset(self) -> None:
        """A new sequence: the features forget the old one."""
        self._run(self.features.reset)

    def flush(self, timeout: float) -> bool:
        return self._thread is None or self._thread.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.flush(timeout)
            self._thread.stop()
            self._thread.thread.join(timeout)

    def _run(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            job()
        elif not self._thread.post((time.perf_counter_ns(), job)):
            self.c.predict_posts_refused += 1

    # --- on the predict thread (or inline) ------------------------------------------------------
    def _apply(self, record: tuple[int, Callable[[], None]]) -> None:
        t_post, job = record
        self.c.predict_lag_seconds += (time.perf_counter_ns() - t_post) / 1e9
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - counted like a callback error
            self.on_error(exc)

    def _prompt(self, rows: dict[int, tuple[np.ndarray, np.ndarray | None]],
                tokens: list[int], n_expert: int) -> None:
        n, f = len(tokens), self.features
        zeros = np.zeros(n_expert, np.float32)
        for i, tok in enumerate(tokens):
            f.next_token(tok, Phase.PROMPT)
            for li in range(self.n_moe):
                got = rows.get(li)
                if got is None:
                    continue
                ex, lg = got
                j = i - (n - len(ex))  # layers with fewer rows hold the last rows
                if j >= 0:
                    f.update(li, lg[j] if lg is not None else zeros, ex[j])

    def _step(self, li: int, pos: int, experts: np.ndarray, logits: np.ndarray,
              token: int) -> None:
        f = self.features
        if li == 0:
            f.next_token(token, Phase.DECODE)
        f.update(li, logits, experts)
        self.cur[li] = experts
        t0 = time.perf_counter()
        for d in range(1, self.lookahead + 1):
            tgt, nxt = ahead(li, d, self.n_moe, self.wrap)
            if tgt < 0:
                continue
            if nxt:  # beyond the last layer: this token's experts there (previous-token guess)
                ex = self.cur[tgt].tolist()
            else:
                ex = self._predict(d, f)
                if not ex:
                    continue
            if self._thread is not None and self.progress >= (pos + nxt) * self.n_moe + tgt:
                self.c.late_predictions += 1  # its layer has routed: read on demand already
                continue
            self.request(tgt, ex, nxt)
            self.c.ahead_requests += len(ex)
        self.c.predict_seconds += time.perf_counter() - t0

    def _predict(self, d: int, f: OnlineFeatures) -> list[int]:
        x = f.features(d)
        if x is None:
            return []
        self.c.predictions += 1
        if self.min_share > 0:
            top, share = self.predictor.topk_shares(d, x, self.pk)
            ex = top[share >= self.min_share].tolist()
            self.c.gated += len(top) - len(ex)
            return ex
        return self.predictor.topk(d, x, self.pk).tolist()
