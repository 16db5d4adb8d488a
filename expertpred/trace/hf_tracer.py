"""Router traces from a Hugging Face transformers MoE model (the reference backend).

Supported families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE — any causal LM whose decoder
layers hold a sparse block ``layer.mlp`` (or ``layer.block_sparse_moe``) with a router
``.gate`` and ``.experts``.

How routing is read: a forward hook on every router (``mlp.gate``). In transformers 5.x the
router is a ``*TopKRouter`` module that returns ``(router_logits, router_scores,
router_indices)``: the selected experts and their mixing weights are taken from the model's
own routing code as they are (softmax in float32 → ``torch.topk`` → renormalise when the
config says so; Mixtral always renormalises, the others follow ``norm_topk_prob``). Older
transformers (4.x) routers are plain ``nn.Linear`` returning logits only; for those the same
softmax → top-k → optional renormalisation is applied here. The router input (post-attention
RMSNorm output) is the hook's input and is kept as float16 when ``capture_hidden`` is on.

API::

    tracer = HFTracer("models/tiny-mixtral/hf", n_threads=2, capture_hidden=False)
    tr = tracer.trace_tokens(tokens)                   # teacher forced: one forward pass
    tr = tracer.trace(tokens_or_text, max_tokens=32)   # greedy generation with KV cache

Both return a :class:`~expertpred.trace.record.SequenceTrace` with a row for every token —
prompt and generated — in the same layout as :class:`~expertpred.trace.llama_tracer.LlamaTracer`
(``logits`` = raw router logits, selection is on softmax of them). Generation stops after
``max_tokens`` generated tokens (each of which is run through the model, so it has routing)
or before an end-of-generation token (not included).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from .prompts import prompt_token_ids
from .record import Phase, SequenceTrace

log = logging.getLogger(__name__)


class _RouterHook:
    """Collects one router's outputs for every forward call, in call order."""

    def __init__(self, top_k: int, norm_topk: bool, capture_hidden: bool) -> None:
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.capture_hidden = capture_hidden
        self.logits: list[np.ndarray] = []
        self.experts: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.hidden: list[np.ndarray] = []

    def clear(self) -> None:
        self.logits.clear()
        self.experts.clear()
        self.weights.clear()
        self.hidden.clear()

    def __call__(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        import torch

        if isinstance(output, tuple) and len(output) >= 3:
            logits, scores, idx = output[0], output[1], output[2]
        else:  # transformers 4.x: the gate is an nn.Linear that returns logits only
            logits = output
            probs = torch.softmax(logits.float(), dim=-1)
            scores, idx = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk:
                scores = scores / scores.sum(dim=-1, keepdim=True)
        n_expert = logits.shape[-1]
        self.logits.append(logits.detach().reshape(-1, n_expert).float().numpy())
        self.experts.append(idx.detach().reshape(-1, self.top_k).numpy().astype(np.int16))
        self.weights.append(scores.detach().reshape(-1, self.top_k).float().numpy())
        if self.capture_hidden:
            h = args[0].detach()
            self.hidden.append(h.reshape(-1, h.shape[-1]).to(torch.float16).numpy())


def _decoder_layers(model: Any) -> Sequence[Any]:
    for path in ("model.layers", "model.model.layers", "transformer.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ExpertPredError(
        f"{type(model).__name__}: no decoder layers found (expected .model.layers)"
    )


def _sparse_block(layer: Any) -> Any | None:
    for name in ("mlp", "block_sparse_moe"):
        block = getattr(layer, name, None)
        if block is not None and hasattr(block, "gate") and hasattr(block, "experts"):
            return block
    return None


class HFTracer:
    """Trace routing of a transformers MoE causal LM; see the module docstring.

    ``model`` is a directory in ``save_pretrained`` format or an already loaded model.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Any,
        *,
        n_threads: int | None = None,
        capture_hidden: bool = False,
        dtype: str = "float32",
    ) -> None:
        import torch

        self.model_path = model if isinstance(model, (str, os.PathLike)) else None
        self.n_threads = n_threads
        self.capture_hidden = capture_hidden
        self.dtype = dtype
        self.tokenizer_: Any | None = None
        if self.model_path is not None:
            path = Path(self.model_path)
            if not (path / "config.json").is_file():
                raise ExpertPredError(
                    f"{path}: no config.json (expected a transformers save_pretrained directory)"
                )
            from transformers import AutoModelForCausalLM

            self.model_ = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=getattr(torch, dtype)
            )
            try:
                from transformers import AutoTokenizer

                self.tokenizer_ = AutoTokenizer.from_pretrained(str(path))
            except Exception as exc:  # no tokenizer files: token ids only
                log.info("%s: no tokenizer (%s); pass token ids", path, type(exc).__name__)
        else:
            self.model_ = model
        self.model_.eval()
        cfg = self.model_.config
        self.n_expert_ = int(
            getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0) or 0
        )
        self.n_expert_used_ = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
        # Mixtral has no flag and always renormalises the top-k probabilities.
        norm_topk = bool(getattr(cfg, "norm_topk_prob", True))
        self.moe_layers_: tuple[int, ...] = ()
        self._hooks: list[_RouterHook] = []
        self._handles: list[Any] = []
        moe = []
        for i, layer in enumerate(_decoder_layers(self.model_)):
            block = _sparse_block(layer)
            if block is None:
                continue
            hook = _RouterHook(self.n_expert_used_, norm_topk, capture_hidden)
            self._handles.append(block.gate.register_forward_hook(hook))
            self._hooks.append(hook)
            moe.append(i)
        if not moe or self.n_expert_ <= 0:
            name = self.model_path or type(self.model_).__name__
            raise ExpertPredError(
                f"{name}: model has no sparse MoE blocks (expected Mixtral/Qwen-MoE/OLMoE)"
            )
        self.moe_layers_ = tuple(moe)
        import inspect

        params = inspect.signature(self.model_.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # --- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> HFTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers -----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer_ is None:
            raise ExpertPredError(
                f"{self.model_path}: no tokenizer saved with the model; pass token ids"
            )
        return list(self.tokenizer_(text, add_special_tokens=True)["input_ids"])

    def _tokens(self, prompt: str | Sequence[int] | np.ndarray) -> list[int]:
        toks = prompt_token_ids(prompt, self.tokenize)
        return toks

    def _collect(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        logits = np.stack([np.concatenate(h.logits) for h in self._hooks], axis=1)
        experts = np.stack([np.concatenate(h.experts) for h in self._hooks], axis=1)
        weights = np.stack([np.concatenate(h.weights) for h in self._hooks], axis=1)
        hidden = None
        if self.capture_hidden:
            hidden = np.stack([np.concatenate(h.hidden) for h in self._hooks], axis=1)
        return logits, experts, weights, hidden

    def _clear(self) -> None:
        for h in self._hooks:
            h.clear()

    @contextlib.contextmanager
    def _compute(self) -> Iterator[None]:
        """inference_mode with ``n_threads`` torch threads, restored afterwards (the setting
        is process-global)."""
        import torch

        before = torch.get_num_threads()
        if self.n_threads:
            torch.set_num_threads(self.n_threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(before)

    def _decode_text(self, tokens: Sequence[int]) -> str:
        if self.tokenizer_ is None or not tokens:
            return ""
        return str(self.tokenizer_.decode(list(tokens), skip_special_tokens=True))

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model_.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model_.config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    # --- tracing -----------------------------------------------------------------------
    def trace_tokens(
        self,
        tokens: Sequence[int] | np.ndarray,
        *,
        n_prompt: int | None = None,
        seq_id: int = 0,
        prompt_id: str = "",
        domain: str = "",
    ) -> SequenceTrace:
        """Teacher-forced: one forward pass over ``tokens``; the first ``n_prompt`` (default
        all) are labelled PROMPT, the rest DECODE."""
        import torch

        toks = self._tokens(tokens)
        self._clear()
        with self._compute():
            self.model_(input_ids=torch.tensor([toks]), use_cache=False, logits_to_keep=1)
        logits, experts, weights, hidden = self._collect()
        self._clear()
        phase = np.full(len(toks), Phase.PROMPT, dtype=np.int8)
        if n_prompt is not None:
            phase[n_prompt:] = Phase.DECODE
        return SequenceTrace(
            seq_id=seq_id, prompt_id=prompt_id, domain=domain,
            tokens=np.asarray(toks, dtype=np.int32), phase=phase, experts=experts,
            weights=weights, logits=logits, hidden=hidden,
        )

    def trace(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        max_tokens: int = 32,
        *,
        seq_id: int = 0,
        prompt_id: str = "",
        domain: str = "",
    ) -> SequenceTrace:
        """Greedy generation with a KV cache: prefill the prompt, then one token per step."""
        import torch

        toks = self._tokens(prompt)
        n_prompt = len(toks)
        eos = self._eos_ids()
        self._clear()
        generated: list[int] = []
        with self._compute():
            out = self.model_(input_ids=torch.tensor([toks]), use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            while len(generated) < max_tokens:
                nxt = int(torch.argmax(out.logits[0, -1]).item())
                if nxt in eos:
                    break
                generated.append(nxt)
                pos = n_prompt + len(generated) - 1
                out = self.model_(
                    input_ids=torch.tensor([[nxt]]), use_cache=True, logits_to_keep=1,
                    position_ids=torch.tensor([[pos]]), **{self._cache_kw: cache},
                )
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        logits, experts, weights, hidden = self._collect()
        self._clear()
        all_toks = toks + generated
        phase = np.full(len(all_toks), Phase.DECODE, dtype=np.int8)
        phase[:n_prompt] = Phase.PROMPT
        return SequenceTrace(
            seq_id=seq_id, prompt_id=prompt_id, domain=domain,
            tokens=np.asarray(all_toks, dtype=np.int32), phase=phase, experts=experts,
            weights=weights, logits=logits, hidden=hidden, text=self._decode_text(generated),
        )
