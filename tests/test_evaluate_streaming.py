"""`evaluate` scores in bounded batches and simulates the cache in chunks: the same report
as with every example, and the whole access stream, in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertpred.learn import cachestream, scoring
from expertpred.learn import evaluate as ev
from expertpred.learn.train import fit_all, load_config, open_source

SHIPPED = Path(__file__).resolve().parents[1] / "datasets" / "traces"


@pytest.mark.parametrize("name", ["tiny-qwen3moe"])
def test_streamed_scores_and_cache_equal_in_memory(name: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, [f"--dataset={SHIPPED / name}", "--offsets=1,2",
                             "--predictors=random,popularity,previous-token+transition,"
                             "fast-mlp,oracle", "--fast_mlp_epochs=1", "--cross_domain=false",
                             "--cache_predictor=fast-mlp", "--cache_depth=2", "--plots=false",
                             f"--out={tmp_path}"])
    src = open_source(cfg)
    fitted = fit_all(cfg, src, src.select(split="train"))
    test_ids = src.select(split="test")
    k = src.model.n_expert_used
    ks = (k, 2 * k)
    whole = ev._score(cfg, src, fitted, test_ids, ks, in_memory=True)
    nextuse = ev.fit_nextuse(cfg, src, src.select(split="train"))
    cache_whole = ev.cache_report(cfg, src, fitted, test_ids, nextuse, in_memory=True)
    # small batches: the test split becomes many batches, each ranked on its own
    monkeypatch.setattr(scoring, "BATCH_ROWS", 300)
    n_batches = sum(1 for _ in scoring.feature_batches(
        src.sequences(test_ids), src.model, ev.FeatureConfig(d=1), ev.phase_value("decode")))
    assert n_batches > 3
    streamed = ev._score(cfg, src, fitted, test_ids, ks, in_memory=False)
    assert len(streamed) == len(whole) == 2 * 2 * 5 and all(r.n_rows > 0 for r in streamed)
    for got, want in zip(streamed, whole):
        if got.predictor == "random":
            # the floor draws one seeded stream per call (row i gets draw i), so per batch
            # it draws other numbers: same rows, recall within sampling noise of k/E
            assert (got.n_rows, got.k, got.d) == (want.n_rows, want.k, want.d)
            assert abs(got.recall - want.recall) < 0.05
        else:
            assert got == want  # every number, bit for bit (ScoreRow equality)
    # the cache simulation in chunks: many of them, and sequences of every length between
    assert ev.cache_report(cfg, src, fitted, test_ids, nextuse, in_memory=False) == cache_whole
    monkeypatch.setattr(cachestream, "CHUNK_TOKENS", 40)
    n_chunks = sum(1 for _ in cachestream.chunks(src.sequences(test_ids),
                                                 ev.phase_value("decode")))
    assert n_chunks > 3
    assert ev.cache_report(cfg, src, fitted, test_ids, nextuse, in_memory=False) == cache_whole
    assert {"lru", "lfu", "learned", "belady", "predictive:fast-mlp", "predictive:oracle"} == {
        r.policy for r in cache_whole.results}
