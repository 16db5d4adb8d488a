"""One greedy generation with the prefetch plugin: what ``expertpred run`` does.

:func:`run_prompt` resolves the mode (predictor, oracle or d0), loads what that mode needs,
generates inside :class:`~expertpred.prefetch.plugin.PrefetchLlama` and returns the text,
the timings and the plugin's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ExpertPredError
from .plugin import (
    OracleTrace,
    PluginConfig,
    PluginStats,
    PrefetchLlama,
    generate_greedy,
    load_predictors,
    prompt_tokens,
)
from .residency import ResidencyConfig


@dataclass(frozen=True)
class RunConfig:
    """One generation; the defaults are the CLI's."""

    model: Path  # MoE GGUF to run
    prompt: str  # prompt text
    max_tokens: int = 32  # greedy tokens to generate
    mode: str | None = None  # off | d0 | predictor | oracle; None = from what is given
    predictor: Path | None = None  # saved predictors directory or exported artifact
    predictor_name: str | None = None  # which saved predictor; None = the plugin's default
    source_model: Path | None = None  # the model `model` was widened from (predictor's model)
    oracle_trace: Path | None = None  # recorded trace of the same greedy run
    method: str = "fadvise"  # prefetch I/O: pread | fadvise | madvise | io_uring
    queue_depth: int = 8  # prefetch requests in flight
    lookahead: int | None = None  # prefetch layers l+1..l+D; None = the plugin's default
    madvise_random: bool | None = None  # MADV_RANDOM on llama.cpp's mapping; None: by expert size
    predict_thread: bool = False  # predictor off the inference thread (late ones counted)
    threads: int = 2  # llama.cpp threads
    n_ctx: int = 512  # llama.cpp context size
    residency: ResidencyConfig | None = None  # expert residency policy + budget; None: kernel

    def resolved_mode(self) -> str:
        """predictor with a predictor, oracle with a trace, else d0 (unless set)."""
        if self.mode is not None:
            return self.mode
        return "predictor" if self.predictor else "oracle" if self.oracle_trace else "d0"


@dataclass(frozen=True)
class RunResult:
    """The generation and what the plugin did during it."""

    text: str  # generated text (decoded with errors replaced)
    tokens: list[int]  # generated token ids
    n_prompt: int  # prompt tokens
    prompt_s: float  # prompt (prefill) seconds
    decode_s: float  # decode seconds for `tokens`
    stats: PluginStats  # prefetch counters, engine statistics, errors

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        """One flat JSON-able record (``expertpred run --json``)."""
        return {"text": self.text, "generated": self.tokens, "n_prompt": self.n_prompt,
                "prompt_s": self.prompt_s, "decode_s": self.decode_s,
                "tokens_per_s": self.tokens_per_s, **self.stats.as_dict()}


def run_prompt(cfg: RunConfig) -> RunResult:
    """Generate ``cfg.max_tokens`` greedy tokens with prefetching (see the module docstring)."""
    mode = cfg.resolved_mode()
    preds = oracle = None
    if mode == "predictor":
        if cfg.predictor is None:
            raise ExpertPredError("--mode predictor needs --predictor DIR_OR_ARTIFACT")
        preds = load_predictors(cfg.predictor, cfg.model,
                                name=cfg.predictor_name,
                                source_model=cfg.source_model)
    belady = cfg.residency is not None and cfg.residency.policy == "belady"
    if mode == "oracle" or belady:
        if cfg.oracle_trace is None:
            raise ExpertPredError(f"{'--residency belady' if belady else '--mode oracle'} "
                                  "needs --oracle-trace DIR_OR_NPZ")
        oracle = OracleTrace.load(cfg.oracle_trace, prompt_tokens(cfg.model, cfg.prompt))
    plugin = PluginConfig(mode=mode, predictor=preds, oracle=oracle, method=cfg.method,
                          queue_depth=cfg.queue_depth, lookahead=cfg.lookahead,
                          madvise_random=cfg.madvise_random, residency=cfg.residency,
                          predict_thread=cfg.predict_thread)
    with PrefetchLlama(cfg.model, plugin, n_ctx=cfg.n_ctx, n_threads=cfg.threads,
                       n_batch=min(512, cfg.n_ctx), seed=0) as llm:
        toks, n_prompt, t_prompt, t_decode = generate_greedy(llm, cfg.prompt, cfg.max_tokens)
        text = llm.detokenize(toks).decode("utf-8", errors="replace")
        stats = llm.prefetch_stats()
    return RunResult(text=text, tokens=list(toks), n_prompt=n_prompt, prompt_s=t_prompt,
                     decode_s=t_decode, stats=stats)
