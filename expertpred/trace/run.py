"""Trace a prompt set into a dataset directory: the loop behind ``expertpred trace`` and ``demo``.

One function, :func:`trace_prompts`: select prompts, describe the run in the manifest
(model and prompt-file sha256, decoding settings), skip sequences a resumed dataset already
holds, trace the rest with :class:`~expertpred.trace.llama_tracer.LlamaTracer` and stream
them into a :class:`~expertpred.trace.dataset.TraceWriter`. Progress goes to an optional
:class:`TraceProgress`, so the caller decides how (or whether) to show it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import ExpertPredError
from ..gguf.layout import file_sha256, model_info
from .dataset import (
    DecodingInfo,
    ManifestInfo,
    PromptSetInfo,
    TraceDataset,
    TraceWriter,
)
from .prompts import Prompt, load_prompts, read_prompt_file
from .record import SequenceTrace

if TYPE_CHECKING:
    from .llama_tracer import LlamaTracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceRunConfig:
    """One tracing run; the defaults are the CLI's."""

    model: Path  # MoE GGUF to trace
    prompts: Path  # prompt file (JSONL or plain text); seq_id = a prompt's index in it
    out: Path  # dataset directory, created (or continued with resume)
    split: str | None = None  # only prompts of this split
    domain: str | None = None  # only prompts of this domain
    limit: int | None = None  # only the first N selected prompts
    max_tokens: int = 32  # decode tokens per prompt after the prompt itself
    n_ctx: int = 512  # llama.cpp context: prompt + max_tokens must fit
    threads: int = 2  # llama.cpp threads; not part of the data, so may change on resume
    hidden: bool = False  # also store router inputs (~n_embd float16 per token and layer)
    sampled: bool = False  # sample instead of greedy decoding
    temperature: float = 0.8  # with sampled
    top_k: int = 40  # with sampled; 0 = off
    top_p: float = 0.95  # with sampled
    seed: int = 0  # sequence i samples with seed + i, so a resumed run draws the same tokens
    resume: bool = False  # continue a dataset of the same model and settings
    shard_rows: int = 32768  # rows per Parquet shard: bounds the writer's memory
    exact: bool = False  # no flash attention, f32 KV cache: router top-k as transformers ranks it
    # llama.cpp processes tracing disjoint prompt chunks (trace/parallel.py); like threads not
    # part of the data: each sequence is the same whichever process traced it
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ExpertPredError(f"workers={self.workers}: expected >= 1 tracing process")

    def decoding(self) -> DecodingInfo:
        s = self.sampled
        return DecodingInfo(mode="sampled" if s else "greedy",
                            temperature=self.temperature if s else 0.0,
                            top_k=self.top_k if s else 0, top_p=self.top_p if s else 1.0,
                            seed=self.seed, max_tokens=self.max_tokens, n_ctx=self.n_ctx,
                            n_threads=self.threads, exact=self.exact)


@dataclass(frozen=True)
class TraceRunResult:
    """What a run did, and the dataset it left."""

    dataset: TraceDataset  # the whole directory after the run (earlier runs included)
    n_selected: int  # prompts the selection named
    n_skipped: int  # of those, already in the dataset (resume)
    n_traced: int  # sequences this run wrote
    tokens: int  # tokens this run traced (prompt + generated)
    seconds: float  # wall time of the whole run, hashing included


class TraceProgress(Protocol):
    """Where :func:`trace_prompts` reports progress (a CLI progress bar, a log, nothing)."""

    def start(self, todo: int, selected: int) -> None:
        """Hashing is done; ``todo`` of the ``selected`` prompts are left to trace."""

    def advance(self, tokens: int, seconds: float) -> None:
        """One more sequence written; ``tokens`` traced in ``seconds`` so far by this run."""


def manifest_info(cfg: TraceRunConfig, selection: list[Prompt]) -> ManifestInfo:
    """Describe the run for the manifest (hashes the model and the prompt file)."""
    prompts = PromptSetInfo(path=str(cfg.prompts), sha256=file_sha256(cfg.prompts),
                            n_prompts=len(read_prompt_file(cfg.prompts)), split=cfg.split,
                            domain=cfg.domain, limit=cfg.limit, n_selected=len(selection))
    return ManifestInfo(model=model_info(cfg.model), prompts=prompts,
                        decoding=cfg.decoding(), capture_hidden=cfg.hidden)


def open_tracer(cfg: TraceRunConfig, n_threads: int) -> LlamaTracer:
    """The llama.cpp tracer of a run (serial, or one per parallel worker)."""
    from .llama_tracer import EXACT_CONTEXT, LlamaTracer

    return LlamaTracer(str(cfg.model), n_ctx=cfg.n_ctx, n_threads=n_threads,
                       capture_hidden=cfg.hidden, seed=cfg.seed,
                       context_params=EXACT_CONTEXT if cfg.exact else None)


def trace_one(tracer: LlamaTracer, cfg: TraceRunConfig, p: Prompt) -> SequenceTrace:
    """Trace prompt ``p``: seq_id = its index in the file, sampling seed = seed + index, so
    a sequence is the same whichever run, resume or worker process traces it."""
    try:
        return tracer.trace(p.text, cfg.max_tokens, greedy=not cfg.sampled,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            seed=cfg.seed + p.index, seq_id=p.index, prompt_id=p.id,
                            domain=p.domain)
    except ExpertPredError as exc:
        raise ExpertPredError(f"{cfg.prompts}: prompt {p.id!r}: {exc}") from None


def select_prompts(cfg: TraceRunConfig) -> list[Prompt]:
    return load_prompts(cfg.prompts, split=cfg.split, domain=cfg.domain)[:cfg.limit]


def trace_prompts(cfg: TraceRunConfig, progress: TraceProgress | None = None) -> TraceRunResult:
    """Trace every selected prompt not yet in ``cfg.out``; see the module docstring.

    ``cfg.workers > 1``: :func:`~expertpred.trace.parallel.trace_parallel` instead."""
    if cfg.workers > 1:
        from .parallel import trace_parallel

        return trace_parallel(cfg, progress)
    start = time.perf_counter()
    selection = select_prompts(cfg)
    info = manifest_info(cfg, selection)  # one-line GGUFError for a dense / bad model
    with TraceWriter(cfg.out, info, shard_rows=cfg.shard_rows, resume=cfg.resume) as writer:
        todo = [p for p in selection if p.index not in writer.done_seq_ids]
        if progress is not None:
            progress.start(len(todo), len(selection))
        n_done, tokens = trace_in_process(cfg, writer, todo, progress)
    log.info("%s: traced %d sequences, %d tokens", cfg.out, n_done, tokens)
    return TraceRunResult(dataset=TraceDataset(cfg.out), n_selected=len(selection),
                          n_skipped=len(selection) - len(todo), n_traced=n_done, tokens=tokens,
                          seconds=time.perf_counter() - start)


def trace_in_process(cfg: TraceRunConfig, writer: TraceWriter, todo: list[Prompt],
                     progress: TraceProgress | None) -> tuple[int, int]:
    """Trace ``todo`` in this process into ``writer``; (sequences, tokens) traced."""
    tokens = n_done = 0
    if not todo:
        return 0, 0
    tracer = open_tracer(cfg, cfg.threads)
    t_trace = time.perf_counter()
    try:
        for p in todo:
            seq = trace_one(tracer, cfg, p)
            writer.write(seq, split=p.split)
            tokens += seq.n_tokens
            n_done += 1
            if progress is not None:
                progress.advance(tokens, time.perf_counter() - t_trace)
    finally:
        tracer.close()
    return n_done, tokens
