"""Routing of served requests, appended to a trace dataset (``expertpred serve --trace-out``).

:class:`ContextRouting` is the plugin's
:class:`~expertpred.prefetch.plugin.RoutingRecorder`: it keeps the routing of every position
of the one sequence the llama.cpp context holds, like the KV cache does. A request that
reuses a cached prompt prefix (llama-cpp-python evaluates only the new suffix) still gets
the prefix's routing: the rows of those positions were recorded when the prefix was
evaluated, and a token's routing depends only on the tokens before it.

:class:`ServedTraceSink` turns a finished request (the context's tokens, how many were
prompt) into a :class:`~expertpred.trace.record.SequenceTrace` and hands it to the one
trace writer (:class:`~expertpred.trace.dataset.TraceWriter`): same format, same crash
safety (finished shards are fsynced and renamed before the manifest names it). Served
traffic is private: ``prompt_id`` is a hash of the prompt's tokens and no text is kept,
unless ``keep_text`` (then ``prompt_id`` is the prompt text and ``text`` the completion).
The token ids themselves are stored: predictors need them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..trace.record import Phase, SequenceTrace

log = logging.getLogger(__name__)

DOMAIN = "served"  # the dataset's domain label for served traffic


class ContextRouting:
    """Per-position routing of the context's sequence: experts, weights, scores.

    ``capacity`` = n_ctx rows; positions past it are ignored (llama.cpp refuses them
    anyway). Called on the inference thread only (through the eval callback)."""

    def __init__(self, capacity: int, n_moe: int, n_expert: int, k: int) -> None:
        self.capacity = capacity
        self.experts = np.full((capacity, n_moe, k), -1, np.int16)
        self.weights = np.zeros((capacity, n_moe, k), np.float32)
        self.scores = np.zeros((capacity, n_moe, n_expert), np.float32)

    def record(self, li: int, pos0: int, experts: np.ndarray,
               scores: np.ndarray | None) -> None:
        hi = min(pos0 + len(experts), self.capacity)
        if pos0 < 0 or hi <= pos0:
            return
        self.experts[pos0:hi, li] = experts[:hi - pos0]
        if scores is not None:
            self.scores[pos0:hi, li] = scores[:hi - pos0]

    def record_weights(self, li: int, pos0: int, weights: np.ndarray) -> None:
        hi = min(pos0 + len(weights), self.capacity)
        if pos0 >= 0 and hi > pos0:
            self.weights[pos0:hi, li] = weights[:hi - pos0]

    def forget(self, start: int) -> None:
        """Positions ``start ..`` are about to be re-evaluated: mark them unrouted."""
        self.experts[max(0, start):] = -1

    def complete(self, n: int) -> bool:
        """Every layer of positions ``0 .. n-1`` has routing."""
        return 0 < n <= self.capacity and bool((self.experts[:n] >= 0).all())


@dataclass(frozen=True)
class SinkCounters:
    """What the sink did; read by the metrics collector."""

    sequences: int = 0  # sequences handed to the writer
    rows: int = 0  # their token rows
    skipped: int = 0  # requests not written (routing incomplete, e.g. a callback error)
    errors: int = 0  # writer failures (the writer then stops; serving goes on)


class ServedTraceSink:
    """Append served requests to a trace dataset directory; ``close()`` flushes.

    ``out_dir`` is created, or continued when it already holds a served trace of this
    model (new ``seq_id`` values follow the existing ones)."""

    def __init__(self, out_dir: str | os.PathLike[str], model_path: str | os.PathLike[str],
                 *, n_ctx: int, n_threads: int, keep_text: bool = False,
                 shard_rows: int = 4096) -> None:
        from ..gguf.layout import model_info
        from ..trace.dataset import (
            DecodingInfo,
            ManifestInfo,
            TraceWriter,
            find_manifest,
        )

        self.out_dir = Path(out_dir)
        self.keep_text = keep_text
        info = ManifestInfo(model=model_info(model_path),
                            # each request brings its own sampling; "served" says so
                            decoding=DecodingInfo(mode="served", temperature=0.0,
                                                  max_tokens=0, n_ctx=n_ctx,
                                                  n_threads=n_threads))
        resume = find_manifest(self.out_dir) is not None
        self._writer = TraceWriter(self.out_dir, info, shard_rows=shard_rows, resume=resume)
        self._next_id = max(self._writer.done_seq_ids, default=-1) + 1
        self._lock = threading.Lock()
        self._c = SinkCounters()
        self._failed = False

    @property
    def counters(self) -> SinkCounters:
        return self._c

    def add(self, routing: ContextRouting, tokens: np.ndarray, n_prompt: int,
            detokenize: Any) -> bool:
        """Write the sequence ``tokens`` (prompt then generated, as evaluated) whose routing
        ``routing`` holds; False when skipped. ``detokenize(ids) -> str``."""
        from dataclasses import replace

        t = len(tokens)
        if t == 0:
            return False
        if not routing.complete(t):
            self._c = replace(self._c, skipped=self._c.skipped + 1)
            log.warning("served request of %d tokens: routing incomplete, not traced", t)
            return False
        n_prompt = max(0, min(n_prompt, t))
        prompt = np.asarray(tokens[:n_prompt], np.int32)
        if self.keep_text:
            prompt_id = detokenize(prompt.tolist())
            text = detokenize(np.asarray(tokens[n_prompt:]).tolist())
        else:
            prompt_id = "sha256:" + hashlib.sha256(prompt.tobytes()).hexdigest()[:16]
            text = ""
        phase = np.full(t, Phase.DECODE, np.int8)
        phase[:n_prompt] = Phase.PROMPT
        with self._lock:
            if self._failed:
                return False
            seq = SequenceTrace(seq_id=self._next_id, prompt_id=prompt_id, domain=DOMAIN,
                                tokens=np.asarray(tokens, np.int32).copy(), phase=phase,
                                experts=routing.experts[:t].copy(),
                                weights=routing.weights[:t].copy(),
                                logits=routing.scores[:t].copy(), text=text)
            try:
                self._writer.write(seq)
            except (ExpertPredError, OSError) as exc:
                self._failed = True
                self._c = replace(self._c, errors=self._c.errors + 1)
                log.error("trace writer failed, tracing stops (serving goes on): %s", exc)
                return False
            self._next_id += 1
            self._c = replace(self._c, sequences=self._c.sequences + 1,
                              rows=self._c.rows + t)
        return True

    def close(self) -> None:
        """Flush the buffered sequences into a finished shard and release the directory."""
        with self._lock:
            try:
                self._writer.close(complete=not self._failed)
            except ExpertPredError as exc:
                log.error("closing the trace writer: %s", exc)
