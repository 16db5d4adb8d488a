"""The streaming analysis (shard by shard) gives the in-memory analysis' numbers exactly."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from expertpred.lab.analysis import baselines
from expertpred.lab.analysis.report import summarize_trace

from .synth import make_model, make_sequence, sticky_sets, write_dataset

REPO = Path(__file__).resolve().parents[2]
# tiny-olmoe (k=8: 255 expert subsets per token) takes ~50 s per path here; it was
# compared once by hand (docs/trace-parallel.md), the two below run every time
SHIPPED = [REPO / "datasets" / "traces" / n for n in ("tiny-mixtral", "tiny-qwen3moe")]


def assert_identical(a: Any, b: Any, where: str = "") -> int:
    """Every number equal (NaN == NaN), same keys and shapes; returns arrays compared."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        return sum(assert_identical(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(assert_identical(x, y, f"{where}[{i}]") for i, (x, y) in
                   enumerate(zip(a, b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
        return 1
    if isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
        return 1
    assert a == b, where
    return 1


@pytest.mark.parametrize("trace", SHIPPED, ids=[p.name for p in SHIPPED])
def test_streaming_equals_in_memory_on_shipped_traces(trace: Path) -> None:
    streamed, n_prompt, _ = summarize_trace(trace)
    whole, n_prompt_whole, _ = summarize_trace(trace, in_memory=True)
    assert n_prompt == n_prompt_whole
    assert assert_identical(asdict(streamed), asdict(whole)) > 100


def test_streaming_equals_in_memory_with_interleaved_shards_and_sampling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards whose sequences are out of seq_id order (as parallel tracing resumes write
    them), uneven lengths, a sequence without decode tokens, three domains, and the
    independent baseline's strided sampling (MAX_SUBSET_KEYS lowered)."""
    rng = np.random.default_rng(3)
    lengths = [5, 40, 1, 33, 17, 60, 2, 25, 9, 48]
    seqs = [make_sequence(sticky_sets(rng, t, 4, 8, 2, keep=0.5), i,
                          ("code", "prose", "math")[i % 3], n_prompt=t if i == 3 else None)
            for i, t in enumerate(lengths)]
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    path = write_dataset(tmp_path / "ds", [seqs[i] for i in order], make_model(),
                         shard_rows=50)
    monkeypatch.setattr(baselines, "MAX_SUBSET_KEYS", 60)
    from expertpred.lab.analysis import streaming

    monkeypatch.setattr(streaming, "MAX_SUBSET_KEYS", 60)
    streamed, _, ds = summarize_trace(path)
    assert len(ds.shards) > 3
    whole, _, _ = summarize_trace(path, in_memory=True)
    assert_identical(asdict(streamed), asdict(whole))
