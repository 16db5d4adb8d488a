"""learned's guard against loops, on a real greedy run of the shipped tiny-qwen3moe.

The run loops after ~30 tokens. With room for about a third of the experts, the loop's
working set fits: LRU then misses fewer experts than the learned ranking, and the guard
(shadow sets replaying the run under both) must follow LRU. With less room learned wins
and the guard must leave its decisions alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertpred.learn.residency_policy import LearnedPolicy, make_policy, simulate_steps
from expertpred.learn.train import PredictorsConfig, open_source
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel
from expertpred.prefetch.plugin import prompt_tokens
from expertpred.shipped import model_gguf
from expertpred.trace.record import Phase

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-qwen3moe"
PROMPT = "def read_config(path):\n    with open(path) as f:\n"  # the e2e benchmark's


@pytest.fixture(scope="module")
def run_and_model() -> tuple[np.ndarray, np.ndarray, NextUseModel]:
    from expertpred.trace.llama_tracer import LlamaTracer

    path = model_gguf(NAME)
    with LlamaTracer(path, n_ctx=512, n_threads=2) as tr:
        seq = tr.trace(prompt_tokens(path, PROMPT), 128)
    src = open_source(PredictorsConfig(dataset=str(ROOT / "datasets" / "traces" / NAME)))
    train = list(src.sequences(src.select(split="train")))
    dec = [s.phase == Phase.DECODE for s in train]
    model = NextUseModel(src.model.n_moe, src.model.n_expert, NextUseConfig()).fit(
        [s.experts[d] for s, d in zip(train, dec, strict=True)],
        [s.tokens[d] for s, d in zip(train, dec, strict=True)])
    return seq.experts.astype(np.int64), seq.tokens.astype(np.int64), model


def _missed(ex: np.ndarray, tk: np.ndarray, policy, budget: int) -> int:
    return simulate_steps(ex, policy, budget, 1, 32, tokens=tk).counters.miss_bytes


@pytest.mark.parametrize("budget", [85, 90])  # experts of 256: the loop fits
def test_guard_follows_lru_in_a_loop(run_and_model, budget: int) -> None:
    ex, tk, model = run_and_model
    lru = _missed(ex, tk, make_policy("lru"), budget)
    bare = _missed(ex, tk, LearnedPolicy(model, guard=False), budget)
    guarded = LearnedPolicy(model)
    got = _missed(ex, tk, guarded, budget)
    assert lru < bare  # the case the guard is for
    assert got < bare and got <= lru * 1.05


def test_guard_keeps_learned_where_it_wins(run_and_model) -> None:
    ex, tk, model = run_and_model
    budget = 72  # the e2e benchmark's fixed 0.85 GiB: the loop does not fit
    bare = _missed(ex, tk, LearnedPolicy(model, guard=False), budget)
    assert bare < _missed(ex, tk, make_policy("lru"), budget)
    guarded = LearnedPolicy(model)
    assert _missed(ex, tk, guarded, budget) == bare and not guarded.follows_lru
