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

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import read_layout
from ..llama import ggml, runtime
from ..llama.hook import RoutingHook, check_node
from ..llama.nodes import ARGSORT, CapturePlan, node_name, trace_plan
from .prompts import prompt_token_ids
from .record import Phase, SequenceTrace

log = logging.getLogger(__name__)


class Generation(NamedTuple):
    """An untraced run: the prompt + generated tokens and the generated text."""

    tokens: np.ndarray  # int32 (T,), prompt then generated
    n_prompt: int
    text: str


# llama_context_params for exact numerics: flash attention off (LLAMA_FLASH_ATTN_TYPE_DISABLED)
# and an f32 KV cache (GGML_TYPE_F32 = 0) — router logits within ~2e-5 of transformers
# instead of ~2e-2, so near-tied experts rank as they do there (tests/trace/test_hf_tracer.py)
EXACT_CONTEXT = {"flash_attn_type": 0, "type_k": 0, "type_v": 0}

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
        self._model: Any = None
        self._ctx_traced: Any = None
        self._ctx_plain: Any = None
        self._pool: ggml.Threadpool | None = None
        self._batch: runtime.Batch | None = None
        self._hook: RoutingHook | None = None
        self._model = runtime.load_model(self.model_path)
        try:
            self._vocab = llama.llama_model_get_vocab(self._model)
            self.n_embd_ = int(llama.llama_model_n_embd(self._model))
            self.n_vocab_ = int(llama.llama_vocab_n_tokens(self._vocab))
            self._pool = ggml.Threadpool(self.n_threads or os.cpu_count() or 1)
            self._batch = runtime.Batch(n_batch)
            plan = self._probe_plan()
            self.score_node_, self.weight_node_ = plan.score_node, plan.weight_node
            self._hook = RoutingHook(
                n_layer=layout.n_layer, moe_layers=self.moe_layers_, n_expert=self.n_expert_,
                k=self.n_expert_used_, n_embd=self.n_embd_, n_rows=n_batch, plan=plan)
            self._ctx_traced = runtime.new_context(self._model, self._params(), self._pool,
                                                   hook=self._hook, what=str(self.model_path))
        except BaseException:
            self.close()
            raise
        self.callback_ = self._hook.callback_

    # --- setup ---------------------------------------------------------------------------
    def _params(self) -> Any:
        assert self._pool is not None
        return runtime.context_params(self.n_ctx, self.n_batch, self._pool.n_threads,
                                      self.context_params)

    def _probe_plan(self) -> CapturePlan:
        """Decode one token in a throw-away context that records every node name, then
        choose the nodes to capture and check their types and shapes."""
        assert self._pool is not None
        bos = int(self._llama.llama_vocab_bos(self._vocab))
        token = bos if 0 <= bos < self.n_vocab_ else 0
        arch = f"{self.model_path}: arch {self.layout_.arch!r}"
        with runtime.probe_nodes(self._model, self._params(), self._pool, token,
                                 str(self.model_path)) as found:
            plan = trace_plan(found, self.moe_layers_[0], self.capture_hidden, arch)
            for il in self.moe_layers_:
                for base, flags in plan.flags.items():
                    name = node_name(base, il)
                    t = found.get(name.encode())
                    if t is None:
                        raise ExpertPredError(f"{arch}: llama.cpp graph has no node {name!r} "
                                              f"(MoE layer {il}); cannot trace this model")
                    check_node(name, t, flags, n_expert=self.n_expert_, k=self.n_expert_used_,
                               n_embd=self.n_embd_, what=str(self.model_path))
        log.debug("%s: capturing %s + %s + %s at %d layers", self.model_path, plan.score_node,
                  plan.weight_node, ARGSORT, len(self.moe_layers_))
        return plan

    # --- decoding ------------------------------------------------------------------------
    def _decode(self, ctx: Any, tokens: Sequence[int], pos0: int, outputs: str,
                traced: bool, stop: bool = False) -> None:
        """Decode one batch (``outputs`` as :meth:`runtime.Batch.decode`); ``stop``: end the
        compute right after the last MoE layer's routing is captured (only allowed when that
        is the model's last block)."""
        assert self._batch is not None and self._hook is not None
        if traced:
            self._hook.stop_after(len(self.moe_layers_) - 1 if stop else -1)
        rc = self._batch.decode(ctx, tokens, pos0, outputs)
        if traced:
            self._hook.raise_errors()
            self._check_rows(pos0 + len(tokens))
        if rc != 0:
            raise ExpertPredError(
                f"{self.model_path}: llama_decode returned {rc} at position {pos0} "
                f"(n_ctx={self.n_ctx}, batch of {len(tokens)} tokens)"
            )

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
            assert self._hook is not None
            self._hook.reserve(n_prompt + max_tokens)
            self._hook.reset()
        self._llama.llama_memory_clear(self._llama.llama_get_memory(ctx), True)
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
            self._decode(ctx, chunk, start, "all" if traced else "none", traced, stop=stop)
        if max_tokens <= 0:
            return toks, n_prompt
        self._decode(ctx, toks[-1:], n_prompt - 1, "last", traced)

        def step(tok: int) -> None:
            toks.append(tok)
            self._decode(ctx, [tok], len(toks) - 1, "last", traced)

        seed = self.seed if sampling["seed"] is None else sampling["seed"]
        smpl = runtime.sampler(sampling["greedy"], sampling["temperature"], sampling["top_k"],
                               sampling["top_p"], seed)
        runtime.sample_loop(ctx, self._vocab, smpl, max_tokens, step)
        return toks, n_prompt

    def _check_rows(self, expected: int) -> None:
        assert self._hook is not None
        for li, rows in enumerate(self._hook.rows.tolist()):
            if rows != expected:
                raise RuntimeError(
                    f"captured {rows} token rows at MoE layer {self.moe_layers_[li]}, "
                    f"expected {expected}"
                )

    # --- public --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return runtime.tokenize(self._vocab, text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return runtime.detokenize(self._vocab, tokens)

    def _tokens(self, prompt: str | Sequence[int] | np.ndarray) -> list[int]:
        toks = prompt_token_ids(prompt, self.tokenize)
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
        h = self._hook
        assert h is not None

        def take(a: np.ndarray) -> np.ndarray:  # (layer, token, ·) -> (token, layer, ·) copy
            return np.ascontiguousarray(a[:, :t].transpose(1, 0, 2))

        phase = np.full(t, Phase.DECODE, dtype=np.int8)
        phase[:n_prompt] = Phase.PROMPT
        return SequenceTrace(
            seq_id=seq_id, prompt_id=prompt_id, domain=domain,
            tokens=np.asarray(toks, dtype=np.int32), phase=phase,
            experts=take(h.experts).astype(np.int16), weights=take(h.weights),
            logits=take(h.scores), hidden=take(h.hidden) if h.hidden is not None else None,
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
            assert self._pool is not None
            self._ctx_plain = runtime.new_context(self._model, self._params(), self._pool,
                                                  what=str(self.model_path))
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
        """Free the contexts, the batch, the threadpool and the model (idempotent, bounded:
        no thread to join)."""
        if self._model is None:
            return
        for attr in ("_ctx_traced", "_ctx_plain"):
            ctx = getattr(self, attr)
            if ctx is not None:
                self._llama.llama_free(ctx)
                setattr(self, attr, None)
        for res in (self._batch, self._pool, self._hook):
            if res is not None:
                res.close()
        self._llama.llama_model_free(self._model)
        self._model = None

    def __enter__(self) -> LlamaTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
