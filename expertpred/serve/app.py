"""``expertpred serve``: the prefetching model behind llama-cpp-python's OpenAI server.

The endpoints are llama-cpp-python's own (``llama_cpp.server.app.router``:
``/v1/completions`` and ``/v1/chat/completions`` with SSE streaming, ``/v1/models``, ...);
this module only puts a :class:`ServedLlama` (a :class:`~expertpred.prefetch.plugin.PrefetchLlama`)
behind them and adds ``/metrics``:

- ``llama_cpp.server.app.create_app`` would load a plain ``Llama`` through ``LlamaProxy``;
  :func:`build_app` does what it does (same middleware, same router) but installs a
  :class:`PrefetchProxy` holding our model in the module's proxy slot, which is where
  every route takes its model from (``get_llama_proxy``).
- One context serves one request at a time: the routes hold llama-cpp-python's two anyio
  locks for a whole request; anyio locks hand over in FIFO order, so concurrent clients
  queue in arrival order. ``interrupt_requests`` is off: with it on, a queued request
  would cut the running stream short.
- Requests are checked before they queue (:class:`RequestCheck`): malformed JSON, a body
  the route's own request model rejects, an unknown model name, a negative ``max_tokens``
  (the chat schema allows it: "until the context is full") and a prompt longer than the
  context get a 4xx with an OpenAI-style JSON error, streamed requests too, whose errors
  could otherwise only end the stream after its 200 header.

Request boundaries come from ``create_completion``, which both routes reach (the chat
handlers call it). With ``trace_out`` every batch is evaluated with every token an
output, so that the last layer routes every prompt token (llama.cpp otherwise computes
it only for output rows); the routing is recorded by the plugin's callback
(:class:`~expertpred.serve.trace.ContextRouting`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ExpertPredError
from ..prefetch.plugin import PluginConfig, PrefetchLlama
from .metrics import ServeCollector, ServeStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``expertpred serve`` needs; plugin options go to ``PrefetchLlama``."""

    model: Path  # the GGUF served
    alias: str = ""  # model name clients use; "" = the file's stem
    host: str = "127.0.0.1"  # loopback by default: no auth unless api_key is set
    port: int = 8000
    n_ctx: int = 2048  # one context: the longest prompt + completion served
    n_batch: int = 512  # prompt tokens per llama_decode
    n_threads: int = 2
    api_key: str | None = None  # llama_cpp.server's bearer token check
    trace_out: Path | None = None  # append served routing to this trace dataset
    trace_text: bool = False  # keep prompt / completion text in the trace (private!)
    trace_shard_rows: int = 4096  # rows per trace shard: what a crash can lose at most
    # PluginConfig fields (mode, predictor, lookahead, method, queue_depth, min_rel_share,
    # madvise_random, residency, ...): checked against its fields by build_model
    plugin_kwargs: dict[str, Any] = field(default_factory=dict)


class ServedLlama(PrefetchLlama):
    """A :class:`PrefetchLlama` that counts served requests and records their routing.

    ``stats``: the :class:`ServeStats` it updates; ``routing`` / ``sink``: the recorder the
    plugin fills and the trace sink finished requests go to (both or neither)."""

    def __init__(self, model_path: str | os.PathLike[str], *, stats: ServeStats,
                 routing: Any = None, sink: Any = None, **kwargs: Any) -> None:
        import threading

        self.serve_stats = stats
        self.routing = routing
        self.sink = sink
        self._req_lock = threading.Lock()
        self._req: _Request | None = None
        super().__init__(model_path, recorder=routing, **kwargs)

    # --- request boundaries --------------------------------------------------------------
    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        req = self._begin_request()
        try:
            out = super().create_completion(*args, **kwargs)
        except BaseException:
            self._end_request(req)
            raise
        if isinstance(out, Iterator):
            return self._watch(out, req)
        self._end_request(req)
        return out

    def _watch(self, chunks: Iterator[Any], req: _Request) -> Iterator[Any]:
        # A client that disconnects leaves this generator unfinished; its finally runs when
        # it is collected, maybe after the next request began: _end_request ignores it then.
        try:
            yield from chunks
        finally:
            self._end_request(req)

    def _begin_request(self) -> _Request:
        with self._req_lock:
            if self._req is not None:  # an abandoned stream: finish it first
                self._finish_locked(self._req)
            self._req = _Request()
            self.serve_stats.started()
            return self._req

    def _end_request(self, req: _Request) -> None:
        with self._req_lock:
            if self._req is req:
                self._finish_locked(req)

    def _finish_locked(self, req: _Request) -> None:
        self._req = None
        n_gen = len(req.token_times)
        decode = req.token_times[-1] - req.token_times[0] if n_gen >= 2 else 0.0
        self.serve_stats.finished(max(req.n_prompt, 0), n_gen, decode)
        if self.sink is not None and req.n_prompt >= 0:
            toks = self.input_ids[:self.n_tokens]
            self.sink.add(self.routing, toks, req.n_prompt,
                          lambda ids: self.detokenize(ids).decode("utf-8", errors="replace"))

    # --- evaluation and sampling ---------------------------------------------------------
    def eval(self, tokens: Sequence[int]) -> None:
        req = self._req
        if req is not None and req.n_prompt < 0:  # the request's first eval: its prompt
            req.n_prompt = self.n_tokens + len(tokens)
        if self.routing is None:
            return super().eval(tokens)
        self.routing.forget(self.n_tokens)
        return self._eval_all_outputs(tokens)

    def _eval_all_outputs(self, tokens: Sequence[int]) -> None:
        """``Llama.eval`` with every token an output (the last layer then routes every row);
        logits stay in llama.cpp (``logits_all`` would copy them all to Python)."""
        self.plugin.begin(tokens, self.n_tokens)
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i:min(len(tokens), i + self.n_batch)]
            n_past = self.n_tokens
            self._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
            self._ctx.decode(self._batch)
            self.input_ids[n_past:n_past + len(batch)] = batch
            self.n_tokens += len(batch)
            self._requires_eval = False

    def sample(self, *args: Any, **kwargs: Any) -> int:
        tok = super().sample(*args, **kwargs)
        req = self._req
        if req is not None:
            req.token_times.append(time.perf_counter())
            self.serve_stats.token()
        return tok


@dataclass
class _Request:
    """One request in progress (mutable: filled as it runs)."""

    n_prompt: int = -1  # context length after the prompt's eval; -1 before it
    token_times: list[float] = field(default_factory=list)  # perf_counter per sampled token


def build_model(cfg: ServeConfig, stats: ServeStats) -> ServedLlama:
    """Load the served model with the plugin options and, with ``trace_out``, the sink."""
    if not cfg.model.is_file():
        raise ExpertPredError(f"{cfg.model}: no such model file (expected a MoE GGUF)")
    known = {f.name for f in fields(PluginConfig)}
    unknown = sorted(k for k in cfg.plugin_kwargs if k not in known)
    if unknown:
        k = unknown[0]
        raise ExpertPredError(f"plugin option {k}={cfg.plugin_kwargs[k]!r}: this build's "
                              "PluginConfig has no such option")
    routing = sink = None
    if cfg.trace_out is not None:
        from ..gguf.layout import read_layout
        from .trace import ContextRouting, ServedTraceSink

        if str(cfg.plugin_kwargs.get("mode", "d0")) == "off":
            raise ExpertPredError("--trace-out needs the plugin's callback: not with --mode off")
        lay = read_layout(cfg.model)
        routing = ContextRouting(cfg.n_ctx, len(lay.moe_layers), lay.n_expert,
                                 lay.n_expert_used)
        sink = ServedTraceSink(cfg.trace_out, cfg.model, n_ctx=cfg.n_ctx,
                               n_threads=cfg.n_threads, keep_text=cfg.trace_text,
                               shard_rows=cfg.trace_shard_rows)
    try:
        return ServedLlama(cfg.model, stats=stats, routing=routing, sink=sink,
                           n_ctx=cfg.n_ctx, n_batch=min(cfg.n_batch, cfg.n_ctx),
                           n_threads=cfg.n_threads, seed=0,
                           config=PluginConfig(**cfg.plugin_kwargs))
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file: ..."
        if sink is not None:
            sink.close()
        raise ExpertPredError(f"{cfg.model}: llama.cpp could not load it ({exc})") from None
    except BaseException:
        if sink is not None:
            sink.close()
        raise


def _proxy_class() -> type:
    from llama_cpp.server.model import LlamaProxy

    return LlamaProxy


class PrefetchProxy(_proxy_class()):  # type: ignore[misc]
    """llama_cpp.server's model proxy holding one already-loaded model under ``alias``
    (``LlamaProxy.__init__`` would load a plain ``Llama`` from settings)."""

    def __init__(self, llama: ServedLlama, alias: str, model_path: str) -> None:
        from llama_cpp.server.settings import ModelSettings

        settings = ModelSettings(model=model_path, model_alias=alias, n_ctx=llama.n_ctx())
        self._model_settings_dict = {alias: settings}
        self._current_model = llama
        self._current_model_alias = alias
        self._default_model_settings = settings
        self._default_model_alias = alias

    def __call__(self, model: str | None = None) -> ServedLlama:
        return self._current_model  # the name was checked before the request queued


def build_app(cfg: ServeConfig, llama: ServedLlama, stats: ServeStats) -> Any:
    """The FastAPI app: llama_cpp.server's router and middleware, our model, ``/metrics``."""
    from fastapi import FastAPI
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from llama_cpp.server import app as lapp
    from llama_cpp.server.settings import ServerSettings
    from prometheus_client import CollectorRegistry
    from starlette.responses import Response
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    alias = cfg.alias or model_alias(cfg.model)
    lapp.set_server_settings(ServerSettings(host=cfg.host, port=cfg.port, api_key=cfg.api_key,
                                            interrupt_requests=False))
    app = FastAPI(middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),)),
                              Middleware(RequestCheck, llama=llama, stats=stats,
                                         names={alias, str(cfg.model)})],
                  title="expertpred serve", version=_version())
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.include_router(lapp.router)
    lapp._llama_proxy = PrefetchProxy(llama, alias, str(cfg.model))  # what routes serve

    registry = CollectorRegistry()
    sink = llama.sink
    registry.register(ServeCollector(stats, llama.prefetch_stats,
                                     None if sink is None else (lambda: sink.counters)))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:  # sync: the plugin's stats() may wait briefly for its thread
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


@dataclass(frozen=True)
class RequestError:
    """Why a request is refused before it queues (OpenAI error fields)."""

    status: int  # HTTP status
    message: str
    param: str | None  # the offending field
    code: str  # OpenAI-style machine-readable code


MAX_BODY = 16 << 20  # bytes: a bigger request body is refused (413) before it is parsed
# path -> (llama_cpp.server request model name, what it carries)
_CHECKED = {"/v1/completions": "CreateCompletionRequest",
            "/v1/chat/completions": "CreateChatCompletionRequest"}


class RequestCheck:
    """ASGI middleware: check a completion request's body before the route sees it.

    llama_cpp.server's routes turn every exception, request validation errors included,
    into a 500 (``RouteErrorHandler``), and a malformed JSON body into a 500 without a JSON
    body; a streamed request's errors can only end the stream after its 200. So the body
    is read here (bounded), validated with llama_cpp.server's own request models and the
    checks of :func:`body_error`, refused with a 4xx OpenAI-style JSON error, or replayed
    unchanged to the app."""

    def __init__(self, app: Any, llama: ServedLlama, stats: ServeStats,
                 names: set[str]) -> None:
        self.app, self.llama, self.stats, self.names = app, llama, stats, names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        model = _CHECKED.get(scope.get("path", "")) if scope["type"] == "http" else None
        if model is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > MAX_BODY:
                return await _send_error(scope, receive, send, RequestError(
                    413, f"request body over {MAX_BODY} bytes", None, "body_too_large"))
            if not msg.get("more_body", False):
                break
        err = body_error(bytes(body), model, self.llama, self.names)
        if err is not None:
            return await _send_error(scope, receive, send, err)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        self.stats.admitted(+1)  # queued until the model takes it (requests_queued)
        try:
            await self.app(scope, replay, send)
        finally:
            self.stats.admitted(-1)


async def _send_error(scope: dict, receive: Any, send: Any, err: RequestError) -> None:
    from starlette.responses import JSONResponse

    resp = JSONResponse({"error": {"message": err.message, "type": "invalid_request_error",
                                   "param": err.param, "code": err.code}},
                        status_code=err.status)
    await resp(scope, receive, send)


def body_error(body: bytes, model_name: str, llama: ServedLlama,
               names: set[str]) -> RequestError | None:
    """Why a completion request body is refused, or None (see :class:`RequestCheck`)."""
    import json

    from llama_cpp.server import types
    from pydantic import ValidationError

    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return RequestError(400, f"request body is not valid JSON ({exc})", None,
                            "invalid_json")
    if not isinstance(raw, dict):
        return RequestError(400, "request body: expected a JSON object", None, "invalid_json")
    try:
        req = getattr(types, model_name).model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return RequestError(400, f"{loc or 'body'}: {first.get('msg')}", loc or None,
                            "invalid_value")
    if req.model is not None and req.model not in names:
        return RequestError(404, f"The model `{req.model}` does not exist; this server serves "
                            f"`{min(names, key=len)}`", "model", "model_not_found")
    if req.max_tokens is not None and req.max_tokens < 0:
        return RequestError(400, f"max_tokens={req.max_tokens}: expected >= 0", "max_tokens",
                            "invalid_value")
    n = _prompt_tokens(req, llama)
    if n > llama.n_ctx():
        return RequestError(400, f"This model's maximum context length is {llama.n_ctx()} "
                            f"tokens, however you requested at least {n} tokens in the "
                            "prompt", "prompt" if hasattr(req, "prompt") else "messages",
                            "context_length_exceeded")
    return None


def _prompt_tokens(req: Any, llama: ServedLlama) -> int:
    """Tokens of the prompt, or for a chat a lower bound: its messages' text without the
    template. Tokenizing only reads the vocabulary: safe beside a running decode."""
    texts: list[str] = []
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, list):
        texts += [p for p in prompt if isinstance(p, str)]
    elif isinstance(prompt, str):
        texts.append(prompt)
    for m in getattr(req, "messages", None) or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
    return sum(len(llama.tokenize(t.encode("utf-8"), add_bos=False, special=True))
               for t in texts if t)


def model_alias(path: Path) -> str:
    """The name clients use by default: the file's stem, or its directory's name for the
    shipped layout ``models/<name>/model.gguf``."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def _version() -> str:
    from .. import __version__

    return __version__


def check_port(host: str, port: int) -> None:
    """One-line error now rather than uvicorn's log line after the model loaded."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ExpertPredError(f"--host {host} --port {port}: cannot listen ({why}); "
                                  "expected a free local address") from None


def serve(cfg: ServeConfig, on_ready: Any = None) -> None:
    """Load the model, serve until SIGINT / SIGTERM, then close the model and the trace."""
    import uvicorn

    check_port(cfg.host, cfg.port)
    stats = ServeStats()
    llama = build_model(cfg, stats)
    try:
        app = build_app(cfg, llama, stats)
        if on_ready is not None:
            on_ready(cfg)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                    timeout_graceful_shutdown=10)
    finally:
        llama.close()
        if llama.sink is not None:
            llama.sink.close()
