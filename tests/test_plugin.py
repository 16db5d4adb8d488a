"""The online prefetch plugin in real llama.cpp on the shipped models: same tokens in every
mode, counters move, prefetch failures stay inside the plugin, wrong predictors are refused,
and the end-to-end benchmark harness runs at small scale."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import FeatureConfig, ModelInfo, build_features
from expertpred.gguf.layout import file_sha256, read_layout
from expertpred.predictors import make_predictor
from expertpred.prefetch.plugin import (
    Mode,
    OracleTrace,
    PredictorSet,
    PrefetchLlama,
    generate_greedy,
    load_predictors,
    prompt_tokens,
)
from expertpred.shipped import SHIPPED_MODELS, model_gguf

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def read_config(path):\n"
N_TOKENS = 8
LLAMA = dict(n_ctx=256, n_threads=2, seed=0)


class Ref:
    """A shipped model, its greedy reference run (stock llama-cpp-python), its oracle trace
    and a quickly fitted predictor set (previous-token, d = 1, 2)."""

    def __init__(self, name: str, tmp: Path) -> None:
        from llama_cpp import Llama

        from expertpred.trace.llama_tracer import LlamaTracer

        self.name = name
        self.path = model_gguf(name)
        llm = Llama(model_path=str(self.path), verbose=False, **LLAMA)
        try:
            self.tokens, self.n_prompt, _, _ = generate_greedy(llm, PROMPT, N_TOKENS)
        finally:
            llm.close()
        ids = prompt_tokens(self.path, PROMPT)
        lay = read_layout(self.path)
        self.model = ModelInfo(sha256=file_sha256(self.path), arch=lay.arch,
                               n_layer=lay.n_layer, moe_layers=tuple(lay.moe_layers),
                               n_expert=lay.n_expert, n_expert_used=lay.n_expert_used,
                               n_embd=lay.n_embd)
        with LlamaTracer(self.path, n_ctx=256, n_threads=2) as tr:
            seq = tr.trace(ids, N_TOKENS)
            extra = [tr.trace(p, 8) for p in ("import os\n", "The cat sat", "for i in range(")]
        self.oracle = OracleTrace.from_sequence(seq)
        self.oracle_path = self.oracle.save(tmp / f"{name}-oracle.npz")
        by_d = {}
        for d in (1, 2):
            data = build_features([seq, *extra], self.model, FeatureConfig(d=d))
            by_d[d] = make_predictor("previous-token").fit(data)
        self.predictors = PredictorSet.from_predictors(by_d, source="test")
        self.predictor_dir = tmp / f"{name}-predictors"
        for d, p in by_d.items():
            p.save(self.predictor_dir / f"previous-token-d{d}.npz")


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ref]:
    tmp = tmp_path_factory.mktemp("plugin")
    return {name: Ref(name, tmp) for name in SHIPPED_MODELS}


def run(ref: Ref, mode: str, path: Path | None = None, **kw: object):
    with PrefetchLlama(path or ref.path, mode=mode, predictor=ref.predictors,
                       oracle=ref.oracle, lookahead=None if mode in ("off", "d0") else 2,
                       **kw, **LLAMA) as llm:
        toks, n_prompt, _, _ = generate_greedy(llm, PROMPT, N_TOKENS)
        return toks, llm.prefetch_stats(), llm


@pytest.mark.parametrize("name", SHIPPED_MODELS)
@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_same_tokens_every_mode(refs: dict[str, Ref], name: str, mode: str) -> None:
    ref = refs[name]
    assert ref.oracle.tokens[ref.n_prompt:].tolist() == ref.tokens  # tracer agrees
    toks, st, _ = run(ref, mode)
    assert toks == ref.tokens
    assert st.counters.callback_errors == 0, st.first_error
    if mode == "off":
        assert st.engine is None and st.counters.layer_events == 0
        return
    c, e = st.counters, st.engine.counters
    assert c.tokens == ref.n_prompt + N_TOKENS - 1  # every evaluated token was routed
    assert c.d0_requests > 0 and e.requests > 0
    assert e.issued > 0 and e.bytes_read > 0
    assert not st.engine.unbalanced(), st.engine.ledgers()
    assert e.uses == c.d0_requests  # every layer's experts accounted as used
    assert e.hits + e.late + e.misses == e.uses
    if mode == "predictor":
        assert c.predictions > 0 and c.ahead_requests > 0
    if mode == "oracle":
        assert c.ahead_requests > 0 and c.oracle_misses <= 2 * len(ref.model.moe_layers)
        assert e.hits > 0


def test_file_removed_during_inference(refs: dict[str, Ref], tmp_path: Path) -> None:
    """The engine's file disappears under it: prefetching stops, inference does not."""
    ref = refs[SHIPPED_MODELS[0]]
    copy = tmp_path / "model.gguf"
    shutil.copyfile(ref.path, copy)
    with PrefetchLlama(copy, mode="oracle", oracle=ref.oracle, lookahead=2,
                       engine_kwargs={"watch_interval": 0.001}, **LLAMA) as llm:
        copy.unlink()  # llama.cpp's mapping keeps the data; the engine sees "file removed"
        llm.plugin.engine_.wait_idle(1.0)
        import time

        time.sleep(0.1)
        toks, _, _, _ = generate_greedy(llm, PROMPT, N_TOKENS)
        st = llm.prefetch_stats()
    assert toks == ref.tokens
    assert not st.engine.enabled and "removed" in st.engine.disabled_reason
    assert st.counters.callback_errors == 0


def test_callback_errors_are_contained(refs: dict[str, Ref]) -> None:
    ref = refs[SHIPPED_MODELS[-1]]

    class Broken(PredictorSet):
        def topk(self, d: int, x: object, k: int) -> np.ndarray:
            raise RuntimeError("predictor exploded")

        def topk_shares(self, d: int, x: object, k: int) -> tuple[np.ndarray, np.ndarray]:
            raise RuntimeError("predictor exploded")  # the gated path (min_rel_share > 0)

    broken = Broken(ref.predictors.by_d, ref.predictors.model)
    with PrefetchLlama(ref.path, mode="predictor", predictor=broken, lookahead=1,
                       **LLAMA) as llm:
        toks, _, _, _ = generate_greedy(llm, PROMPT, N_TOKENS)
        st = llm.prefetch_stats()
    assert toks == ref.tokens
    assert st.counters.callback_errors > 0 and "exploded" in st.first_error


def test_predictor_for_another_model(refs: dict[str, Ref]) -> None:
    a, b = (refs[n] for n in SHIPPED_MODELS[:2])
    with pytest.raises(ExpertPredError, match="another model"):
        load_predictors(a.predictor_dir, b.path, name="previous-token", offsets=(1, 2))
    ok = load_predictors(a.predictor_dir, a.path, name="previous-token", offsets=(1, 2))
    assert ok.offsets == (1, 2)
    p = subprocess.run([sys.executable, "-m", "expertpred.cli", "run", "--model", str(b.path),
                        "--prompt", "x", "--predictor", str(a.predictor_dir),
                        "--predictor-name", "previous-token"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "another model" in err[0]


def test_cli_run(refs: dict[str, Ref]) -> None:
    ref = refs[SHIPPED_MODELS[-1]]
    p = subprocess.run([sys.executable, "-m", "expertpred.cli", "run", "--model",
                        str(ref.path), "--prompt", PROMPT, "--max-tokens", str(N_TOKENS),
                        "--oracle-trace", str(ref.oracle_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["generated"] == ref.tokens and out["mode"] == "oracle"
    assert out["engine_bytes_read"] > 0


def test_e2e_benchmark_small(refs: dict[str, Ref], tmp_path: Path) -> None:
    """The benchmark harness end to end, CI-sized: a ~0.25 GiB widened model in a cgroup."""
    from expertpred.lab.cgroup import why_unavailable

    if reason := why_unavailable():
        pytest.skip(f"memory cgroup unavailable: {reason}")
    ref = refs["tiny-mixtral"] if "tiny-mixtral" in refs else refs[SHIPPED_MODELS[0]]
    pdir = tmp_path / "pred"
    for d in (1, 2):
        shutil.copyfile(ref.predictor_dir / f"previous-token-d{d}.npz",
                        (pdir.mkdir(exist_ok=True) or pdir) / f"previous-token-d{d}.npz")
    out = tmp_path / "e2e.json"
    p = subprocess.run(
        [sys.executable, "benchmarks/e2e_prefetch.py", "--source", str(ref.path),
         "--total-gib", "0.25", "--size-over-limit", "1.6", "--tokens", "4", "--rounds", "1",
         "--predictor", str(pdir), "--predictor-name", "previous-token", "--extra", "",
         "--residency", "none", "--io-ref", "", "--bench-dir", str(tmp_path / "bench"),
         "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["identical"], p.stdout
    by_mode = {r["mode"]: r for r in res["rows"]}
    assert set(by_mode) == {"stock", "d0", "predictor", "oracle", "cached"}
    for m, r in by_mode.items():
        assert r["returncode"] == 0, (m, r["stderr"])
    for m in ("d0", "predictor", "oracle"):
        st = by_mode[m]["stats"]
        assert st["engine_bytes_read"] > 0 and st["engine_uses"] > 0, m
    assert by_mode["stock"]["decode_read"] > 0  # the limit bit: decode went to the disk


@pytest.mark.parametrize("name", SHIPPED_MODELS)
@pytest.mark.parametrize("async_requests, min_rel_share",
                         [(False, 0.0), (True, 0.6), (True, 8.0)])
def test_request_paths_and_gating_keep_tokens(refs: dict[str, Ref], name: str,
                                              async_requests: bool,
                                              min_rel_share: float) -> None:
    ref = refs[name]
    toks, st, _ = run(ref, "predictor", async_requests=async_requests,
                      min_rel_share=min_rel_share)
    assert toks == ref.tokens
    assert st.counters.callback_errors == 0, st.first_error
    c, e = st.counters, st.engine.counters
    assert e.uses == c.d0_requests
    assert (e.posted > 0) == async_requests and e.dropped_handoff == 0
    assert c.predictions > 0
    if min_rel_share >= 8.0:  # 8/k of the mass, k <= 8: only an expert holding all of it
        assert c.gated > 0
    if min_rel_share == 0.0:
        assert c.gated == 0


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_predict_thread_predicts_the_same_off_the_inference_thread(refs: dict[str, Ref],
                                                                    name: str) -> None:
    """PluginConfig.predict_thread moves features + predictor to a thread of their own: the
    same tokens, the same predictions (the features see the same rows in the same order),
    and every prediction is either requested or counted late."""
    ref = refs[name]
    toks_in, inline, _ = run(ref, "predictor", min_rel_share=0.0)
    toks_th, threaded, _ = run(ref, "predictor", min_rel_share=0.0, predict_thread=True)
    assert toks_in == toks_th == ref.tokens
    a, b = inline.counters, threaded.counters
    assert b.callback_errors == 0, threaded.first_error
    assert b.predictions == a.predictions > 0
    assert a.late_predictions == 0 and a.predict_lag_seconds == 0.0
    assert b.predict_posts_refused == 0 and b.predict_lag_seconds > 0.0
    # inline every prediction is requested; threaded, the late ones are not
    assert b.ahead_requests <= a.ahead_requests
    assert (b.ahead_requests == a.ahead_requests) == (b.late_predictions == 0)
    assert not threaded.engine.unbalanced(), threaded.engine.ledgers()


def test_a_predictor_that_reads_hidden_states_is_refused_at_load(refs: dict[str, Ref]) -> None:
    """The plugin does not capture router inputs: a predictor that needs them would fail in
    every callback, so it is one error at load instead."""
    from dataclasses import replace

    from expertpred.errors import ExpertPredError

    ref = refs["tiny-mixtral"]
    with pytest.raises(ExpertPredError, match="hidden states"):
        PrefetchLlama(ref.path, mode="predictor",
                      predictor=replace(ref.predictors, needs_hidden=True), **LLAMA)
