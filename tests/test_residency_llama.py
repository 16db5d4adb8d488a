"""The residency manager inside real llama.cpp: evictions verified with mincore on a widened
model, the manager's decisions equal a replay of what it saw, a refused eviction falls back
to the kernel, a replaced file turns it off, bad budgets are one error line."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertpred.gguf.layout import read_layout
from expertpred.learn.residency_policy import make_policy, replay
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel
from expertpred.prefetch.plugin import OracleTrace, PrefetchLlama, generate_greedy, prompt_tokens
from expertpred.prefetch.residency import ResidencyConfig, layer_selection_bytes
from expertpred.shipped import model_gguf

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def read_config(path):\n"
N_TOKENS = 8
LLAMA = dict(n_ctx=256, n_threads=2, seed=0)


def _stock(path: Path) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), verbose=False, **LLAMA)
    try:
        return generate_greedy(llm, PROMPT, N_TOKENS)[0]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """tiny-qwen3moe widened to 0.25 MiB per expert (64 MiB of experts), f32 like the
    source so routing and tokens are the source's; its stock greedy tokens."""
    from expertpred.gguf.widen import widen

    out = tmp_path_factory.mktemp("residency") / "wide.gguf"
    widen(model_gguf("tiny-qwen3moe"), out, expert_mib=0.25, dtype="f32")
    return out, _stock(out)


@pytest.fixture(scope="module")
def nextuse_model() -> NextUseModel:
    from expertpred.learn.train import PredictorsConfig, open_source

    src = open_source(PredictorsConfig(dataset=str(ROOT / "datasets/traces/tiny-qwen3moe")))
    seqs = list(src.sequences(src.select(split="train")))
    m = NextUseModel(src.model.n_moe, src.model.n_expert, NextUseConfig(horizon=1)).fit(
        [s.experts for s in seqs], [s.tokens for s in seqs])
    assert m.uses_tokens  # the replay below covers the token boundary records
    return m


def _run(path: Path, cfg: ResidencyConfig, **kw: object):
    """Greedy tokens, plugin stats, (measured bytes, bookkeeping) before llama closes, and
    the manager (closed)."""
    with PrefetchLlama(path, mode="d0", residency=cfg, madvise_random=True, **kw,
                       **LLAMA) as llm:
        toks = generate_greedy(llm, PROMPT, N_TOKENS)[0]
        mgr = llm.plugin.residency_
        assert mgr is not None and mgr.flush(5.0)
        seen = (mgr.measured(), mgr.set_.resident.reshape(mgr.measured().shape).copy())
        st = llm.prefetch_stats()
    return toks, st, seen, mgr


def test_eviction_verified_by_mincore(wide) -> None:
    path, ref = wide
    lay = read_layout(path)
    experts = int(lay.nbytes.sum())
    budget = experts // 4
    slack = layer_selection_bytes(lay)
    toks, st, (measured, book), _ = _run(path, ResidencyConfig("lru", budget))
    assert toks == ref
    r = st.residency
    assert r.enabled and r.evict_errors == 0 and r.counters.evictions > 0
    assert r.cpu_seconds > 0  # the manager thread's CPU time is counted
    assert r.counters.peak_resident_bytes <= budget
    # the page cache agrees with the bookkeeping: experts it evicted are gone (up to one
    # layer's d0 reads the engine may still finish after an eviction), the total is in budget
    assert measured[~book].sum() <= slack
    assert measured.sum() <= budget + slack
    # without the manager the model stays cached: eviction made the difference
    toks_k, _, (measured_k, _), _ = _run(path, ResidencyConfig("kernel", budget))
    assert toks_k == ref and measured_k.sum() > 2 * (budget + slack)


def test_cold_eviction_marks_and_keeps(wide) -> None:
    """MADV_COLD only marks the evicted experts for reclaim: with no memory limit nothing
    reclaims them, so they stay cached (PAGEOUT drops them, test above), the manager makes
    no fadvise call after it, and the output is unchanged."""
    from expertpred.prefetch.sysmem import Madvice

    path, ref = wide
    lay = read_layout(path)
    budget = int(lay.nbytes.sum()) // 4
    slack = layer_selection_bytes(lay)
    cfg = ResidencyConfig("lru", budget, evict_advice=int(Madvice.COLD))
    toks, st, (measured, book), _ = _run(path, cfg)
    assert toks == ref
    r = st.residency
    assert r.enabled and r.evict_errors == 0 and r.counters.evictions > 0
    assert r.counters.peak_resident_bytes <= budget  # the bookkeeping still keeps the budget
    assert measured[~book].sum() > 2 * slack  # the page cache kept what it evicted
    # same decisions with PAGEOUT, one call more per range: its POSIX_FADV_DONTNEED
    _, st_p, _, _ = _run(path, ResidencyConfig("lru", budget))
    assert st_p.residency.counters == r.counters
    assert r.evict_calls < st_p.residency.evict_calls


@pytest.mark.parametrize("policy", ["lru", "lfu", "learned", "belady"])
def test_manager_equals_replay(wide, nextuse_model, policy: str, tmp_path: Path) -> None:
    path, ref = wide
    from expertpred.trace.llama_tracer import LlamaTracer

    with LlamaTracer(path, n_ctx=256, n_threads=2) as tr:
        oracle = OracleTrace.from_sequence(tr.trace(prompt_tokens(path, PROMPT), N_TOKENS))
    lay = read_layout(path)
    budget = int(lay.nbytes.sum()) // 5
    cfg = ResidencyConfig(policy, budget, record=True,
                          nextuse_path=str(nextuse_model.save(tmp_path / "nextuse.npz")))
    with PrefetchLlama(path, mode="oracle", oracle=oracle, lookahead=1, residency=cfg,
                       **LLAMA) as llm:
        mgr = llm.plugin.residency_
        toks = generate_greedy(llm, PROMPT, N_TOKENS)[0]
        assert mgr.flush(5.0)
        st = llm.prefetch_stats().residency
        c = llm.prefetch_stats().counters
    assert toks == ref
    assert any(r.event == 1 for r in mgr.records_)  # prefetches were accounted too
    # experts the manager held were not asked for again: every other one reached it
    posted = sum(len(r.experts) for r in mgr.records_ if r.event == 1)
    assert c.ahead_resident > 0 and posted == c.ahead_requests - c.ahead_resident
    told = [(r.t, r.experts[0]) for r in mgr.records_ if r.event == 3]  # Event.TOKEN
    assert len(told) > N_TOKENS // 2 and all(oracle.tokens[t] == v for t, v in told)
    pol = make_policy(policy, future=oracle.experts, model=nextuse_model)
    again = replay(mgr.records_, pol, budget, mgr.n_layer_, mgr.n_expert_,
                   lay.nbytes.sum(axis=2))
    assert again.counters == st.counters
    assert st.counters.accesses > 0 and st.counters.steps == len(
        [r for r in mgr.records_ if r.event == 0])


def test_lost_experts_leave_the_bookkeeping(wide) -> None:
    """Kept experts that leave the page cache anyway (the cgroup's reclaim does it during a
    prompt's batch; here the same kernel call, made behind the manager's back between two
    decode tokens) are found with mincore at the next token boundary: recorded as LOST, no
    longer counted resident, and the decisions still replay exactly."""
    path, ref = wide
    lay = read_layout(path)
    budget = int(lay.nbytes.sum()) // 4
    cfg = ResidencyConfig("lru", budget, record=True, mincore_interval=0.0)
    taken: list[int] = []
    sampled: list[int] = []
    with PrefetchLlama(path, mode="d0", residency=cfg, madvise_random=True, **LLAMA) as llm:
        mgr = llm.plugin.residency_

        def on_token(tok: int) -> None:
            if len(taken) == 0 and mgr.set_.counters.steps > 3 * mgr.n_layer_:
                assert mgr.flush(5.0)
                held = np.flatnonzero(mgr.set_.resident)
                # the most recently used: LRU would keep them longest
                taken.extend(held[np.argsort(-mgr.set_.last_use[held], kind="stable")][:6]
                             .tolist())
                mgr._evict(taken)  # the kernel's own eviction, not the policy's decision
                # the cheap check after a batch (sampled pages) finds the same experts
                sampled.extend(np.flatnonzero(mgr._sampled_gone()).tolist())

        assert generate_greedy(llm, PROMPT, N_TOKENS, on_token=on_token)[0] == ref
        assert mgr.flush(5.0)
        st = llm.prefetch_stats().residency
        lost = [k for r in mgr.records_ if r.event == 4 for k in r.experts]  # Event.LOST
        have = mgr.measured().reshape(-1)
        book = mgr.set_.resident.copy()
    full = lay.nbytes.sum(axis=2).reshape(-1)
    assert taken and sorted(sampled) == sorted(taken)
    assert st.counters.lost == len(lost) == len(taken)
    assert sorted(lost) == sorted(taken)  # nothing else was reclaimed on this box
    assert st.counters.lost_bytes == int(full[lost].sum())
    # what the bookkeeping counts resident is resident (an expert read for the last step
    # may still be arriving: at most one layer's selection)
    assert int(full[book & (have * 2 < full)].sum()) <= layer_selection_bytes(lay)
    again = replay(mgr.records_, make_policy("lru"), budget, mgr.n_layer_, mgr.n_expert_,
                   lay.nbytes.sum(axis=2))
    assert again.counters == st.counters


def test_a_batch_is_checked_at_the_next_token(wide) -> None:
    """With mincore checks otherwise far apart, the token boundary after a prompt's batch
    is checked (where the cgroup's reclaim takes kept experts), and decode tokens are not."""
    path, ref = wide
    budget = int(read_layout(path).nbytes.sum()) // 4
    cfg = ResidencyConfig("lru", budget, mincore_interval=1e9)
    toks, st, _, _ = _run(path, cfg)
    assert toks == ref
    assert st.residency.mincore_checks == 2  # at attach's first boundary, after the prompt


def test_refused_eviction_falls_back_to_kernel(wide, caplog) -> None:
    path, ref = wide
    budget = int(read_layout(path).nbytes.sum()) // 4
    cfg = ResidencyConfig("lru", budget, evict_advice=9999)  # the kernel answers EINVAL
    with caplog.at_level(logging.WARNING, logger="expertpred.prefetch.residency"):
        toks, st, _, _ = _run(path, cfg)
    assert toks == ref
    r = st.residency
    assert r.active_policy == "kernel" and not r.enabled and r.evict_errors == 1
    assert "refused" in r.disabled_reason
    assert sum("refused" in m for m in caplog.messages) == 1


def test_replaced_file_turns_residency_off(wide, tmp_path: Path) -> None:
    path, ref = wide
    copy, other = tmp_path / "m.gguf", tmp_path / "other.gguf"
    shutil.copy(path, copy)
    shutil.copy(path, other)
    budget = int(read_layout(path).nbytes.sum()) // 4
    cfg = ResidencyConfig("lru", budget)
    with PrefetchLlama(copy, mode="d0", residency=cfg, **LLAMA) as llm:
        seen = []

        def on_token(tok: int) -> None:
            seen.append(tok)
            if len(seen) == 3:
                os.replace(other, copy)

        toks = generate_greedy(llm, PROMPT, N_TOKENS, on_token=on_token)[0]
        st = llm.prefetch_stats()
    assert toks == ref
    assert not st.residency.enabled and "replaced" in st.residency.disabled_reason
    assert st.counters.callback_errors == 0


def test_default_budget_is_derived(wide) -> None:
    path, ref = wide
    toks, st, _, _ = _run(path, ResidencyConfig("lru", None))
    assert toks == ref
    assert 0 < st.residency.budget_bytes <= int(read_layout(path).nbytes.sum())


@pytest.mark.parametrize("budget,match", [("1K", "below one layer"),
                                          ("100GiB", "above the memory limit"),
                                          ("lots", "expected a size")])
def test_bad_budget_is_one_error_line(budget: str, match: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "expertpred.cli", "run", "--model",
                        str(model_gguf("tiny-qwen3moe")), "--prompt", "hi", "--residency",
                        "lru", "--budget", budget], capture_output=True, text=True, env=env,
                       timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert match in lines[0]


def test_sizes_per_expert_sum(wide) -> None:
    lay = read_layout(wide[0])
    assert layer_selection_bytes(lay) == int(
        np.sort(lay.nbytes.sum(axis=2), axis=1)[:, -lay.n_expert_used:].sum(axis=1).max())
