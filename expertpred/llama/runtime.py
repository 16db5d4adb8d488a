"""llama.cpp models and contexts with the routing hook installed, and the one decode loop.

What the tracer (raw ``llama_cpp`` API) and the plugin (a ``llama_cpp.Llama`` subclass)
share: quiet logs, loading a model with a one-line error, a context with ``cb_eval`` set
(:func:`new_context` for the raw API, :func:`hook_llama` for a ``Llama``), probing the graph's
node names once (:func:`probe_nodes`), a reusable batch, the sampler chain and the
sample → stop-at-end-of-generation → decode loop (:func:`sample_loop`).

Every context gets a persistent ggml threadpool: the eval callback splits each graph into
one compute per hooked node, and without a pool ggml spawns and joins its worker threads at
every one of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from . import ggml
from .hook import RoutingHook

log = logging.getLogger(__name__)

GGML_LOG_LEVEL_ERROR = 4  # ggml.h (llama_cpp._logger maps it wrong)


def quiet_logs() -> None:
    """llama-cpp-python prints every llama.cpp log line unless its logger has a level."""
    lg = logging.getLogger("llama-cpp-python")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.ERROR)


class _LoadErrors:
    """Collect llama.cpp's error log lines while loading (to name the reason in the error)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> _LoadErrors:
        import llama_cpp

        def keep(level: int, text: bytes, user_data: int | None) -> None:
            if level == GGML_LOG_LEVEL_ERROR:
                line = text.decode("utf-8", errors="replace").strip()
                if line:
                    self.lines.append(line)

        self._cb = llama_cpp.llama_log_callback(keep)
        llama_cpp.llama_log_set(self._cb, None)
        return self

    def __exit__(self, *exc: object) -> None:
        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, None)


_PARAMS_LOCK = threading.Lock()  # the patched default is process-wide while a model loads


@contextlib.contextmanager
def weights_in_file_mapping() -> Iterator[None]:
    """``llama_cpp.Llama`` objects created inside keep every weight in the file mapping.

    llama.cpp's CPU backend repacks quantized weights (q4_0, iq4_nl, ...) into anonymous
    "extra buffer types" at load: a private copy of the model that prefetch reads into the
    page cache do not feed, that residency eviction on the mapping cannot drop, and that a
    memory limit below the model's size turns into an OOM kill. llama-cpp-python does not
    expose ``use_extra_bufts``, so the default-params call ``Llama.__init__`` makes is
    wrapped while it runs. Costs the repacked layout's faster matmuls on in-RAM models."""
    import llama_cpp.llama_cpp as low  # the module Llama.__init__ calls

    with _PARAMS_LOCK:
        default = low.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = default


def load_model(path: str | os.PathLike[str]) -> Any:
    """``llama_model *`` of ``path`` (free with ``llama_model_free``); one-line error naming
    llama.cpp's reason when it cannot load."""
    import llama_cpp

    quiet_logs()
    llama_cpp.llama_backend_init()
    errors = _LoadErrors()
    with errors:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                     llama_cpp.llama_model_default_params())
    if not model:
        why = errors.lines[0] if errors.lines else "no reason logged"
        raise ExpertPredError(f"{path}: llama.cpp failed to load the model ({why})")
    return model


def context_params(n_ctx: int, n_batch: int, n_threads: int,
                   extra: Mapping[str, Any] | None = None) -> Any:
    """``llama_context_params`` for one sequence; ``extra`` sets further fields by name."""
    import llama_cpp

    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_batch
    cp.n_seq_max = 1
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    cp.no_perf = True
    for key, value in (extra or {}).items():
        if not hasattr(cp, key):
            raise ExpertPredError(f"context_params: llama_context_params has no field {key!r}")
        setattr(cp, key, value)
    return cp


def new_context(model: Any, params: Any, pool: ggml.Threadpool, *, cb: Any = None,
                hook: RoutingHook | None = None, what: str = "model") -> Any:
    """``llama_context *`` on ``pool`` with ``hook`` (or a bare ``cb``) as eval callback."""
    import llama_cpp

    if hook is not None:
        hook.install(params)
    elif cb is not None:
        params.cb_eval, params.cb_eval_user_data = cb, None
    # else: context_params() starts from llama.cpp's defaults, which have no callback
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise ExpertPredError(f"{what}: llama.cpp could not create a context "
                              f"(n_ctx={params.n_ctx})")
    pool.attach(ctx)
    return ctx


def hook_llama(llm: Any, install: Callable[[Any], None]) -> ggml.Threadpool:
    """Give a ``llama_cpp.Llama`` a context with the eval callback that ``install`` sets on
    its ``context_params`` (``RoutingHook.install``): free the context ``Llama.__init__``
    made and create the same with ``cb_eval`` set, on a new threadpool the caller closes
    after the Llama."""
    from llama_cpp import _internals

    install(llm.context_params)
    ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params,
                                  verbose=llm.verbose)
    old, llm._ctx = llm._ctx, llm._stack.enter_context(contextlib.closing(ctx))
    old.close()
    # one pool serves decode (n_threads) and batches (n_threads_batch, which Llama defaults
    # to the core count): a pool smaller than either crashes llama.cpp (SIGSEGV)
    pool = ggml.Threadpool(max(int(llm.n_threads), int(llm.n_threads_batch)))
    pool.attach(llm._ctx.ctx)
    return pool


@contextlib.contextmanager
def probe_nodes(model: Any, params: Any, pool: ggml.Threadpool, token: int,
                what: str) -> Iterator[dict[bytes, int]]:
    """Node name -> ``ggml_tensor *`` of one decoded token's graph, valid inside the
    ``with`` (a throw-away context whose callback records every node name)."""
    import llama_cpp

    found: dict[bytes, int] = {}
    error: list[BaseException] = []

    def record(t: int, ask: bool, user_data: int | None) -> bool:
        try:
            if not found:
                ggml.check_layout(t)
            found[ctypes.string_at(t + ggml.OFF_NAME)] = t
            return not ask
        except BaseException as exc:  # an exception must not unwind through C
            error.append(exc)
            return False

    cb = llama_cpp.ggml_backend_sched_eval_callback(record)
    ctx = new_context(model, params, pool, cb=cb, what=what)
    try:
        with Batch(1) as batch:
            rc = batch.decode(ctx, [token], 0, "all")
        if error:
            raise RuntimeError(f"eval callback failed: {error[0]!r}") from error[0]
        if rc != 0:
            raise ExpertPredError(f"{what}: llama_decode returned {rc} probing the graph")
        yield found
    finally:
        llama_cpp.llama_free(ctx)


class Batch:
    """A reusable ``llama_batch`` of one sequence with numpy views of its arrays."""

    def __init__(self, n: int) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self.n = n
        self.batch = llama_cpp.llama_batch_init(n, 0, 1)
        b = self.batch
        self._token = np.ctypeslib.as_array(b.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n,))
        self._logits = np.ctypeslib.as_array(b.logits, shape=(n,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):
            b.seq_id[i][0] = 0

    def decode(self, ctx: Any, tokens: Sequence[int], pos0: int, outputs: str) -> int:
        """``llama_decode`` ``tokens`` at ``pos0..``; its return code (0: ok). ``outputs``:
        "all" (every token's last layer runs), "last" or "none"."""
        n = len(tokens)
        self._token[:n] = tokens
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._logits[:n] = 1 if outputs == "all" else 0
        if outputs == "last":
            self._logits[n - 1] = 1
        self.batch.n_tokens = n
        return int(self._llama.llama_decode(ctx, self.batch))

    def close(self) -> None:
        if self.batch is not None:
            self._llama.llama_batch_free(self.batch)
            self.batch = None

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sampler(greedy: bool, temperature: float, top_k: int, top_p: float, seed: int) -> Any:
    """A llama.cpp sampler chain: greedy, or top-k → top-p → temperature → seeded draw."""
    import llama_cpp as llama

    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    if greedy:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(top_k))
    if 0.0 < top_p < 1.0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def sample_loop(ctx: Any, vocab: Any, smpl: Any, max_tokens: int,
                step: Callable[[int], None], *, decode_last: bool = True,
                on_token: Callable[[int], None] | None = None) -> list[int]:
    """Sample from ``ctx``'s last logits, stop *before* an end-of-generation token, feed
    each token with ``step``; ``decode_last=False`` skips the last token's decode (its
    logits are not needed). Frees ``smpl``. The one generation loop of expertpred."""
    import llama_cpp as llama

    out: list[int] = []
    try:
        while len(out) < max_tokens:
            tok = int(llama.llama_sampler_sample(smpl, ctx, -1))
            if llama.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(out) == max_tokens and not decode_last:
                break
            step(tok)
    finally:
        llama.llama_sampler_free(smpl)
    return out


def tokenize(vocab: Any, text: str, add_special: bool = True) -> list[int]:
    import llama_cpp as llama

    data = text.encode("utf-8")
    n_max = len(data) + 16
    arr = (llama.llama_token * n_max)()
    n = llama.llama_tokenize(vocab, data, len(data), arr, n_max, add_special, False)
    if n < 0:
        arr = (llama.llama_token * -n)()
        n = llama.llama_tokenize(vocab, data, len(data), arr, -n, add_special, False)
    return list(arr[:n])


def detokenize(vocab: Any, tokens: Sequence[int]) -> str:
    import llama_cpp as llama

    out = bytearray()
    buf = ctypes.create_string_buffer(256)
    for t in tokens:
        n = llama.llama_token_to_piece(vocab, int(t), buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(vocab, int(t), buf, len(buf), 0, False)
        out += buf.raw[:n]
    return out.decode("utf-8", errors="replace")


# --- the high-level Llama side (the plugin and its benchmarks) ---------------------------------


def prompt_tokens(gguf_path: str | os.PathLike[str], prompt: str) -> list[int]:
    """``prompt``'s token ids as :func:`generate_greedy` evaluates them (vocab-only load)."""
    from llama_cpp import Llama

    quiet_logs()
    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(prompt.encode("utf-8"), add_bos=True))
    finally:
        llm.close()


def generate_greedy(llm: Any, prompt: str, max_tokens: int,
                    on_token: Callable[[int], None] | None = None,
                    ) -> tuple[list[int], int, float, float]:
    """Greedy decode of a ``llama_cpp.Llama`` through ``Llama.eval`` and :func:`sample_loop`:
    (generated ids, prompt length, prompt s, decode s). Stops before an end-of-generation
    token or when the context (n_ctx) is full, so fewer than ``max_tokens`` may come back.
    The same loop with and without the plugin."""
    import llama_cpp

    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    # llama.cpp pads its context (8 -> 256), but Llama.eval keeps token ids in an array of
    # the requested n_ctx and silently drops ids past it: the smaller one is the real limit
    n_ctx = min(int(llm.n_ctx()), len(llm.input_ids))
    if not ids:  # llama_decode of an empty batch aborts the process (GGML_ASSERT)
        raise ExpertPredError(f"prompt {prompt!r} has no tokens; expected a non-empty prompt")
    if len(ids) > n_ctx:
        raise ExpertPredError(f"prompt has {len(ids)} tokens; expected at most n_ctx={n_ctx} "
                              "(raise --n-ctx or shorten the prompt)")
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    t1 = time.perf_counter()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    # the token that fills the context is sampled but not evaluated (its eval would not fit)
    n_max = min(max_tokens, n_ctx - len(ids) + 1)
    out = sample_loop(llm.ctx, vocab, llama_cpp.llama_sampler_init_greedy(), n_max,
                      lambda tok: llm.eval([tok]), decode_last=False, on_token=on_token)
    return out, len(ids), t1 - t0, time.perf_counter() - t1
