"""Router traces out of stock llama.cpp, through its graph eval callback.

API (the ``trace`` CLI and the dataset writer call exactly this)::

    with LlamaTracer("model.gguf", n_ctx=2048, n_threads=2, n_batch=512,
                     capture_hidden=False, seed=0) as tracer:
        tr = tracer.trace("some text" or [token ids], max_tokens=64,
                          greedy=True, temperature=0.8, top_k=40, top_p=0.95, seed=None,
                          seq_id=0, prompt_id="p0", domain="prose")   # -> SequenceTrace
        gen = tracer.generate("some text", max_tokens=64)  # same run without the callback

``trace`` processes the prompt (in chunks of ``n_batch``) and then generates up to
``max_tokens`` tokens one at a time; generation stops early *before* an end-of-generation
token (it is not part of the trace). Every token in ``SequenceTrace.tokens`` — prompt and
generated, including the last generated one, which gets one extra decode step — has its
routing at every MoE layer. ``max_tokens=0`` traces just the given tokens (teacher
forcing). ``context_params`` sets extra ``llama_context_params`` fields on both contexts,
e.g. ``{"flash_attn_type": 0, "type_k": 0, "type_v": 0}`` (no flash attention, f32 KV
cache): with llama.cpp's defaults (flash attention on CPU, f16 KV cache) router logits
differ from an f32 transformers run by up to ~2e-2; with those three fields by ~2e-5.
``generate`` does the same work (same decode steps, same sampler) on a second llama.cpp
context that has no eval callback: it is the untraced baseline.

What is captured, per MoE layer ``L`` (node names from ``build_moe_ffn`` in
llama.cpp's ``src/llama-graph.cpp``):

* ``logits`` — the scores the arch *selects* on: ``ffn_moe_logits-L`` (raw router logits;
  llama, Mixtral, Qwen-MoE, OLMoE select on their softmax, sigmoid-gated archs on their
  sigmoid — both monotonic, so the top-k of the logits is the selection); if the graph has
  ``ffn_moe_logits_biased-L`` (router bias, gpt-oss) that instead; if it has
  ``ffn_moe_probs_biased-L`` (DeepSeek-V3-style selection bias, GroveMoE) those biased
  *probabilities* instead. Models that feed precomputed probabilities (no logits node) fall
  back to ``ffn_moe_probs-L``. Group-limited routing (``ffn_moe_probs_masked``) is not
  applied to the captured scores. :attr:`LlamaTracer.score_node_` names the choice.
* ``experts`` — the first ``k`` columns of ``ffn_moe_argsort-L`` (descending), i.e. the
  selected experts in rank order (``ffn_moe_topk-L`` is a non-contiguous view of it).
* ``weights`` — the final mixing weights: the last of ``ffn_moe_weights``,
  ``ffn_moe_weights_softmax``, ``ffn_moe_weights_norm``, ``ffn_moe_weights_scaled`` the
  arch builds (:attr:`weight_node_`), so renormalisation and scaling are included.
* ``hidden`` (``capture_hidden=True``) — the router input (``src[1]`` of the router matmul,
  which is ``ffn_norm-L``), stored as float16.

Cost control: the scheduler asks the eval callback about every graph node (~50 per
layer); it says yes to two nodes per MoE layer — every yes splits the graph and
synchronises. The score node must be read at once (ggml's allocator lets the softmax
overwrite the logits in place); the argsort and the router input are read at the weights
node through pointers remembered in the ask phase: both stay alive until the expert matmuls
that come later use them. The callback itself is C (``ggml.CAPTURE_C``, compiled once per
machine and cached; a Python twin is the fallback without a C compiler, or with
``EXPERTPRED_PY_CALLBACK=1``): it copies with ``ggml_backend_tensor_get`` straight into
preallocated numpy buffers laid out (layer, token, ·), one call per ubatch. Both contexts
share one persistent ggml threadpool — without it ggml spawns and joins worker threads at
every graph compute, i.e. at every split. :attr:`callback_` says which callback runs.

Prompt schedule (the same traced and untraced): all prompt tokens but the last in batches
of ``n_batch``, then the last prompt token alone (its logits sample the first generated
token). To capture the last layer for every token, traced batches request outputs for every
token — without that llama.cpp computes the last layer only for output rows — and, when the
last MoE layer is the model's last block, the callback stops the compute right after that
layer's routing is captured (returning false from the eval callback ends the graph; the KV
cache is complete by then), so prompt tokens cost no extra expert matmuls and no vocab
projection. Not thread-safe: one tracer per thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import read_layout
from ..llama import ggml
from .record import Phase, SequenceTrace

log = logging.getLogger(__name__)

# Score nodes in graph order; the last one present is what the arch selects on.
SCORE_CHAIN = ("ffn_moe_logits", "ffn_moe_logits_biased", "ffn_moe_probs_biased")
SCORE_FALLBACK = "ffn_moe_probs"  # when the arch passes precomputed probabilities
# Weight nodes in graph order; the last one present holds the final mixing weights.
WEIGHT_CHAIN = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm",
                "ffn_moe_weights_scaled")
ARGSORT = "ffn_moe_argsort"
ROUTER_MATMUL = "ffn_moe_logits"

# What the callback does with a node (bit flags of the ``_want`` table).
_YES_SCORE = 1  # say yes, copy the scores when ready
_YES_WEIGHTS = 2  # say yes, copy weights + argsort (+ router input) when ready
_REM_ARGSORT = 4  # remember the pointer in the ask phase
_REM_ROUTER_IN = 8  # remember src[1] (router input) in the ask phase


class Generation(NamedTuple):
    """An untraced run: the prompt + generated tokens and the generated text."""

    tokens: np.ndarray  # int32 (T,), prompt then generated
    n_prompt: int
    text: str


class _Buffers:
    """Reused capture buffers, laid out (layer, token, ·) so one ubatch is one copy."""

    def __init__(self, n_moe: int, n_expert: int, k: int, n_embd: int, n_batch: int,
                 hidden: bool) -> None:
        self.shape = (n_moe, n_expert, k, n_embd)
        self.hidden_on = hidden
        self.cap = 0
        self.scratch_i32 = np.empty((n_batch, n_expert), dtype=np.int32)
        self.scratch_f32 = np.empty((n_batch, n_embd), dtype=np.float32) if hidden else None
        self.ensure(256)

    def ensure(self, cap: int) -> None:
        if cap <= self.cap:
            return
        n_moe, n_expert, k, n_embd = self.shape
        self.cap = max(cap, 2 * self.cap)
        self.scores = np.empty((n_moe, self.cap, n_expert), dtype=np.float32)
        self.experts = np.empty((n_moe, self.cap, k), dtype=np.int32)
        self.weights = np.empty((n_moe, self.cap, k), dtype=np.float32)
        self.hidden = (np.empty((n_moe, self.cap, n_embd), dtype=np.float16)
                       if self.hidden_on else None)
        self.scores_addr = self.scores.ctypes.data
        self.experts_addr = self.experts.ctypes.data
        self.weights_addr = self.weights.ctypes.data


class LlamaTracer:
    """A llama.cpp model with a traced and an untraced context; see the module docstring."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        capture_hidden: bool = False,
        seed: int = 0,
        context_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_batch = n_batch
        self.capture_hidden = capture_hidden
        self.seed = seed
        self.context_params = dict(context_params or {})

        layout = read_layout(self.model_path)  # GGUFError (an ExpertPredError) if not MoE
        self.layout_ = layout
        self.n_expert_ = layout.n_expert
        self.n_expert_used_ = layout.n_expert_used
        self.moe_layers_ = layout.moe_layers
        if self.n_expert_used_ <= 0:
            raise ExpertPredError(
                f"{self.model_path}: {layout.arch}.expert_used_count is "
                f"{self.n_expert_used_}, expected > 0"
            )

        import llama_cpp as llama

        self._llama = llama
        _quiet_llama_logs()
        llama.llama_backend_init()
        self._model = None
        errors = _load_errors()
        with errors:
            mparams = llama.llama_model_default_params()
            self._model = llama.llama_model_load_from_file(str(self.model_path).encode(),
                                                           mparams)
        if not self._model:
            why = errors.lines[0] if errors.lines else "no reason logged"
            raise ExpertPredError(f"{self.model_path}: llama.cpp failed to load the model ({why})")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_embd_ = int(llama.llama_model_n_embd(self._model))
        self.n_vocab_ = int(llama.llama_vocab_n_tokens(self._vocab))
        self._ggml = ggml.ggml_lib()
        self._tensor_get = self._ggml.tensor_get

        n_moe = len(self.moe_layers_)
        self._buf = _Buffers(n_moe, self.n_expert_, self.n_expert_used_, self.n_embd_,
                             n_batch, capture_hidden)
        self._rows = np.zeros(n_moe, dtype=np.int64)  # tokens captured per MoE layer
        self._argsort_ptr = [0] * n_moe
        self._router_in_ptr = [0] * n_moe
        self._want: dict[bytes, tuple[int, int]] = {}
        self._stop_after = -1  # Python callback's twin of CaptureState.stop_after
        self._probe: dict[bytes, int] = {}
        self._cb_error: BaseException | None = None
        self.score_node_ = ""
        self.weight_node_ = ""

        # ctypes objects llama.cpp keeps pointers to: must live as long as the contexts.
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self._batch_views()
        self._ctx_plain: Any = None
        self._ctx_traced: Any = None
        self._pool = ggml.Threadpool(self.n_threads or os.cpu_count() or 1)
        self._py_cb = llama.ggml_backend_sched_eval_callback(self._callback)
        self._probe_cb = llama.ggml_backend_sched_eval_callback(self._probe_callback)
        self._clib = ggml.capture_lib()
        self._state: ggml.CaptureState | None = None
        try:
            self._discover_nodes()
            if self._clib is not None:
                self._state = self._c_state()
                self._cb = ctypes.cast(self._clib.ep_callback,
                                       llama.ggml_backend_sched_eval_callback)
                self._cb_data = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)
            else:
                self._cb, self._cb_data = self._py_cb, None
            self._ctx_traced = self._new_context(self._cb, self._cb_data)
        except BaseException:
            self.close()
            raise
        self.callback_ = "C" if self._state is not None else "python"

    # --- setup ---------------------------------------------------------------------------
    def _new_context(self, cb: Any = None, cb_data: Any = None) -> Any:
        llama = self._llama
        cp = llama.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch
        cp.n_seq_max = 1
        cp.n_threads = self._pool.n_threads
        cp.n_threads_batch = self._pool.n_threads
        cp.no_perf = True
        for key, value in self.context_params.items():
            if not hasattr(cp, key):
                raise ExpertPredError(f"context_params: llama_context_params has no field {key!r}")
            setattr(cp, key, value)
        if cb is not None:
            cp.cb_eval = cb
            cp.cb_eval_user_data = cb_data
        ctx = llama.llama_init_from_model(self._model, cp)
        if not ctx:
            raise ExpertPredError(
                f"{self.model_path}: llama.cpp could not create a context (n_ctx={self.n_ctx})"
            )
        self._pool.attach(ctx)
        return ctx

    def _batch_views(self) -> None:
        b, n = self._batch, self.n_batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(n,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(n,))
        self._b_nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(n,))
        self._b_logits = np.ctypeslib.as_array(b.logits, shape=(n,))
        self._b_nseq[:] = 1
        for i in range(n):
            b.seq_id[i][0] = 0

    def _discover_nodes(self) -> None:
        """Decode one token in a throw-away context whose callback records every node name,
        then choose the nodes to capture (``_want``) and check their types and shapes."""
        self._probe = {}
        ctx = self._new_context(self._probe_cb)
        try:
            self._decode(ctx, [self._probe_token()], 0, "all")
            self._plan(self._probe)  # node pointers stay valid until ctx is freed
        finally:
            self._llama.llama_free(ctx)
            self._probe = {}

    def _plan(self, probe: dict[bytes, int]) -> None:
        names = set(probe)
        il0 = self.moe_layers_[0]
        present = [s for s in SCORE_CHAIN if f"{s}-{il0}".encode() in names]
        self.score_node_ = present[-1] if present else SCORE_FALLBACK
        present = [w for w in WEIGHT_CHAIN if f"{w}-{il0}".encode() in names]
        if not present:
            raise ExpertPredError(
                f"{self.model_path}: arch {self.layout_.arch!r}: llama.cpp graph has no "
                f"ffn_moe_weights-{il0} node (expected build_moe_ffn routing)"
            )
        self.weight_node_ = present[-1]
        want: dict[bytes, tuple[int, int]] = {}
        for li, il in enumerate(self.moe_layers_):
            for base, flags in self._node_flags().items():
                name = f"{base}-{il}"
                t = probe.get(name.encode())
                if t is None:
                    raise ExpertPredError(
                        f"{self.model_path}: arch {self.layout_.arch!r}: llama.cpp graph has "
                        f"no node {name!r} (MoE layer {il}); cannot trace this model"
                    )
                self._check_node(name, t, flags)
                want[name.encode()] = (flags, li)
        self._want = want
        log.debug("%s: capturing %s + %s + %s at %d layers", self.model_path, self.score_node_,
                  self.weight_node_, ARGSORT, len(self.moe_layers_))

    def _node_flags(self) -> dict[str, int]:
        """Base node name -> what the callback does with it (same at every MoE layer)."""
        flags = {self.score_node_: _YES_SCORE, self.weight_node_: _YES_WEIGHTS,
                 ARGSORT: _REM_ARGSORT}
        if self.capture_hidden:
            flags[ROUTER_MATMUL] = flags.get(ROUTER_MATMUL, 0) | _REM_ROUTER_IN
        return flags

    def _c_state(self) -> ggml.CaptureState:
        """The C callback's state: the node plan plus pointers into our numpy buffers."""
        st = ggml.CaptureState()
        st.n_layer = self.layout_.n_layer
        st.n_expert, st.k, st.n_embd = self.n_expert_, self.n_expert_used_, self.n_embd_
        st.scratch_rows = self.n_batch
        st.tensor_get = ggml.fn_address(self._ggml.tensor_get)
        st.to_fp16 = ggml.fn_address(self._ggml.lib.ggml_fp32_to_fp16_row)
        for base, flags in self._node_flags().items():
            st.flags[ggml.BASE_NAMES.index(base.removeprefix("ffn_moe_"))] = flags
        self._layer_li = np.full(max(self.layout_.n_layer, 1), -1, dtype=np.int32)
        self._layer_li[list(self.moe_layers_)] = np.arange(len(self.moe_layers_))
        n_moe = len(self.moe_layers_)
        self._c_ptrs = np.zeros((2, n_moe), dtype=np.uint64)  # argsort, router input
        st.layer_li = self._layer_li.ctypes.data
        st.rows = self._rows.ctypes.data
        st.argsort_ptr = self._c_ptrs[0].ctypes.data
        st.router_in_ptr = self._c_ptrs[1].ctypes.data
        b = self._buf
        st.scratch_i32 = b.scratch_i32.ctypes.data
        st.scratch_f32 = b.scratch_f32.ctypes.data if b.scratch_f32 is not None else None
        self._sync_buffers(st)
        return st

    def _sync_buffers(self, st: ggml.CaptureState | None) -> None:
        if st is None:
            return
        b = self._buf
        st.cap = b.cap
        st.scores, st.experts, st.weights = b.scores_addr, b.experts_addr, b.weights_addr
        st.hidden = b.hidden.ctypes.data if b.hidden is not None else None

    def _check_node(self, name: str, t: int, flags: int) -> None:
        """Probe-time check that a node has the type/shape/contiguity the copies assume."""
        g = ggml
        ttype, ne = g.tensor_type(t), g.tensor_ne(t)
        expect_type = g.GGML_TYPE_I32 if flags & _REM_ARGSORT else g.GGML_TYPE_F32
        bad = ttype != expect_type or not self._ggml.is_contiguous(t)
        if flags & (_YES_SCORE | _REM_ARGSORT):
            bad |= ne[0] != self.n_expert_
        if flags & _YES_WEIGHTS:
            bad |= ne[0] * ne[1] * ne[2] * ne[3] % self.n_expert_used_ != 0
        if flags & _REM_ROUTER_IN:
            src1 = ctypes.c_void_p.from_address(t + g.OFF_SRC + 8).value or 0
            bad |= (not src1 or g.tensor_type(src1) != g.GGML_TYPE_F32
                    or g.tensor_ne(src1)[0] != self.n_embd_
                    or not self._ggml.is_contiguous(src1))
        if bad:
            raise ExpertPredError(
                f"{self.model_path}: node {name!r} has ggml type {ttype}, ne {ne}: not the "
                "layout the tracer expects (contiguous F32 scores/weights, I32 argsort)"
            )

    def _probe_token(self) -> int:
        bos = int(self._llama.llama_vocab_bos(self._vocab))
        return bos if 0 <= bos < self.n_vocab_ else 0

    # --- the eval callback (hot path) ------------------------------------------------------
    def _probe_callback(self, t: int, ask: bool, user_data: int | None) -> bool:
        try:
            if not self._probe:
                ggml.check_layout(t)
            self._probe[ctypes.string_at(t + ggml.OFF_NAME)] = t
            return False if ask else True
        except BaseException as exc:  # an exception must not unwind through C
            self._cb_error = exc
            return False

    def _callback(self, t: int, ask: bool, user_data: int | None) -> bool:
        """Python twin of the C ``ep_callback`` (used when no C compiler is available)."""
        try:
            spec = self._want.get(ctypes.string_at(t + ggml.OFF_NAME))
            if spec is None:
                return not ask  # ask: no; a ready node we did not ask for: keep going
            flags, li = spec
            if ask:
                if flags & _REM_ARGSORT:
                    self._argsort_ptr[li] = t
                if flags & _REM_ROUTER_IN:
                    self._router_in_ptr[li] = ctypes.c_void_p.from_address(
                        t + ggml.OFF_SRC + 8).value
                return bool(flags & (_YES_SCORE | _YES_WEIGHTS))
            if flags & _YES_SCORE:
                self._copy_scores(t, li)
            if flags & _YES_WEIGHTS:
                self._copy_weights(t, li)
                if li == self._stop_after:
                    return False  # stop the compute: the rest of the graph is not needed
            return True
        except BaseException as exc:  # an exception must not unwind through C
            self._cb_error = exc
            return False  # aborts the compute; _decode re-raises

    def _copy_scores(self, t: int, li: int) -> None:
        buf = self._buf
        n = ctypes.c_int64.from_address(t + ggml.OFF_NE + 8).value
        e = self.n_expert_
        dst = buf.scores_addr + (li * buf.cap + int(self._rows[li])) * e * 4
        self._tensor_get(t, dst, 0, n * e * 4)

    def _copy_weights(self, t: int, li: int) -> None:
        buf = self._buf
        k, e = self.n_expert_used_, self.n_expert_
        r = int(self._rows[li])
        ne = (ctypes.c_int64 * 4).from_address(t + ggml.OFF_NE)
        n = ne[0] * ne[1] * ne[2] * ne[3] // k
        off = (li * buf.cap + r) * k * 4
        self._tensor_get(t, buf.weights_addr + off, 0, n * k * 4)
        a = self._argsort_ptr[li]
        if n == 1:
            self._tensor_get(a, buf.experts_addr + off, 0, k * 4)
        else:
            s = buf.scratch_i32
            self._tensor_get(a, s.ctypes.data, 0, n * e * 4)
            buf.experts[li, r:r + n] = s[:n, :k]
        if buf.hidden is not None:
            f = buf.scratch_f32
            d = self.n_embd_
            self._tensor_get(self._router_in_ptr[li], f.ctypes.data, 0, n * d * 4)
            buf.hidden[li, r:r + n] = f[:n]
        self._rows[li] = r + n

    # --- decoding ------------------------------------------------------------------------
    def _decode(self, ctx: Any, tokens: Sequence[int], pos0: int, outputs: str,
                stop: bool = False) -> None:
        """Decode one batch. ``outputs``: "all" (every token's last layer runs: needed for
        its routing), "last" or "none"; ``stop``: end the compute right after the last MoE
        layer's routing is captured (only allowed when that is the model's last block)."""
        n = len(tokens)
        self._b_token[:n] = tokens
        self._b_pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._b_logits[:n] = 1 if outputs == "all" else 0
        if outputs == "last":
            self._b_logits[n - 1] = 1
        self._batch.n_tokens = n
        stop_after = len(self.moe_layers_) - 1 if stop else -1
        self._stop_after = stop_after
        if self._state is not None:
            self._state.stop_after = stop_after
        self._cb_error = None
        rc = self._llama.llama_decode(ctx, self._batch)
        st = self._state
        if st is not None and st.error:
            code, st.error = int(st.error), 0
            raise RuntimeError(f"C capture callback failed: {ggml.CAPTURE_ERRORS.get(code, code)}")
        if self._cb_error is not None:
            err, self._cb_error = self._cb_error, None
            raise RuntimeError(f"eval callback failed: {err!r}") from err
        if rc != 0:
            raise ExpertPredError(
                f"{self.model_path}: llama_decode returned {rc} at position {pos0} "
                f"(n_ctx={self.n_ctx}, batch of {n} tokens)"
            )

    def _clear(self, ctx: Any) -> None:
        self._llama.llama_memory_clear(self._llama.llama_get_memory(ctx), True)

    def _sampler(self, greedy: bool, temperature: float, top_k: int, top_p: float,
                 seed: int | None) -> Any:
        llama = self._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if greedy:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(top_k))
            if 0.0 < top_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
            s = self.seed if seed is None else seed
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(s & 0xFFFFFFFF))
        return chain

    def _run(self, ctx: Any, prompt: str | Sequence[int] | np.ndarray, max_tokens: int,
             traced: bool, sampling: dict[str, Any]) -> tuple[list[int], int]:
        toks = self._tokens(prompt)
        n_prompt = len(toks)
        if n_prompt + max_tokens > self.n_ctx:
            raise ExpertPredError(
                f"prompt of {n_prompt} tokens + max_tokens={max_tokens} exceeds "
                f"n_ctx={self.n_ctx} of {self.model_path}"
            )
        if traced:
            self._buf.ensure(n_prompt + max_tokens)
            self._sync_buffers(self._state)
            self._rows[:] = 0
        self._clear(ctx)
        # Decode schedule (identical traced and untraced): all prompt tokens but the last in
        # batches that need no logits, then the last prompt token alone — its logits sample
        # the first generated token — then one token per step. Traced batches request every
        # token as output (else llama.cpp skips the last layer for them) and, when the last
        # MoE layer is the last block, stop right after its routing: no expert matmuls and
        # no vocab projection for prompt tokens whose logits nobody reads.
        head = toks if max_tokens <= 0 else toks[:-1]
        stop = traced and self.moe_layers_[-1] == self.layout_.n_layer - 1
        for start in range(0, len(head), self.n_batch):
            chunk = head[start:start + self.n_batch]
            self._decode(ctx, chunk, start, "all" if traced else "none", stop=stop)
            if traced:
                self._check_rows(start + len(chunk))
        if max_tokens <= 0:
            return toks, n_prompt
        self._decode(ctx, toks[-1:], n_prompt - 1, "last")
        if traced:
            self._check_rows(n_prompt)
        smpl = self._sampler(**sampling)
        try:
            llama = self._llama
            while len(toks) - n_prompt < max_tokens:
                tok = int(llama.llama_sampler_sample(smpl, ctx, -1))
                if llama.llama_vocab_is_eog(self._vocab, tok):
                    break
                toks.append(tok)
                self._decode(ctx, [tok], len(toks) - 1, "last")
                if traced:
                    self._check_rows(len(toks))
        finally:
            self._llama.llama_sampler_free(smpl)
        return toks, n_prompt

    def _check_rows(self, expected: int) -> None:
        for li, rows in enumerate(self._rows.tolist()):
            if rows != expected:
                raise RuntimeError(
                    f"captured {rows} token rows at MoE layer {self.moe_layers_[li]}, "
                    f"expected {expected}"
                )

    # --- public --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        arr = (self._llama.llama_token * n_max)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), arr, n_max, add_special,
                                       False)
        if n < 0:
            arr = (self._llama.llama_token * -n)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), arr, -n, add_special,
                                           False)
        return list(arr[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self._llama.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._llama.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0,
                                                     False)
            out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    def _tokens(self, prompt: str | Sequence[int] | np.ndarray) -> list[int]:
        toks = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not toks:
            raise ExpertPredError("empty prompt: expected at least one token")
        bad = [t for t in toks if not 0 <= t < self.n_vocab_]
        if bad:
            raise ExpertPredError(
                f"token id {bad[0]} out of range 0..{self.n_vocab_ - 1} of {self.model_path}"
            )
        return toks

    def trace(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        max_tokens: int = 0,
        *,
        greedy: bool = True,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        seq_id: int = 0,
        prompt_id: str = "",
        domain: str = "",
    ) -> SequenceTrace:
        """Process ``prompt`` and generate up to ``max_tokens``, capturing every token's routing."""
        self._check_open()
        sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed)
        toks, n_prompt = self._run(self._ctx_traced, prompt, max_tokens, True, sampling)
        t = len(toks)
        b = self._buf

        def take(a: np.ndarray) -> np.ndarray:  # (layer, token, ·) -> (token, layer, ·) copy
            return np.ascontiguousarray(a[:, :t].transpose(1, 0, 2))

        phase = np.full(t, Phase.DECODE, dtype=np.int8)
        phase[:n_prompt] = Phase.PROMPT
        return SequenceTrace(
            seq_id=seq_id, prompt_id=prompt_id, domain=domain,
            tokens=np.asarray(toks, dtype=np.int32), phase=phase,
            experts=take(b.experts).astype(np.int16), weights=take(b.weights),
            logits=take(b.scores), hidden=take(b.hidden) if b.hidden is not None else None,
            text=self.detokenize(toks[n_prompt:]),
        )

    def generate(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        max_tokens: int = 0,
        *,
        greedy: bool = True,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
    ) -> Generation:
        """The same run as :meth:`trace` on a context without the eval callback."""
        self._check_open()
        if self._ctx_plain is None:
            self._ctx_plain = self._new_context()
        sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed)
        toks, n_prompt = self._run(self._ctx_plain, prompt, max_tokens, False, sampling)
        return Generation(np.asarray(toks, dtype=np.int32), n_prompt,
                          self.detokenize(toks[n_prompt:]))

    # --- lifecycle -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._model is None:
            raise RuntimeError(f"LlamaTracer({self.model_path}) is closed")

    def close(self) -> None:
        """Free the contexts, the batch and the model (idempotent)."""
        llama = getattr(self, "_llama", None)
        if llama is None or getattr(self, "_model", None) is None:
            return
        for attr in ("_ctx_traced", "_ctx_plain"):
            ctx = getattr(self, attr, None)
            if ctx is not None:
                llama.llama_free(ctx)
                setattr(self, attr, None)
        llama.llama_batch_free(self._batch)
        self._pool.close()
        llama.llama_model_free(self._model)
        self._model = None

    def __enter__(self) -> LlamaTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass


class _load_errors:
    """Collect llama.cpp's error log lines while loading (to name the reason in the error)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> _load_errors:
        import llama_cpp

        def keep(level: int, text: bytes, user_data: int | None) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h; llama_cpp._logger maps it wrong)
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


def _quiet_llama_logs() -> None:
    """llama-cpp-python prints every llama.cpp log line unless its logger has a level."""
    lg = logging.getLogger("llama-cpp-python")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.ERROR)
