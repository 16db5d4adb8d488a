"""PrefetchLlama keeps quantized weights in the file mapping (no repacked anonymous copy):
prefetch reads and residency eviction act on the mapping, and a memory limit below the
model's size must not meet a private copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertpred.gguf.widen import widen
from expertpred.prefetch.plugin import PrefetchLlama
from expertpred.shipped import model_gguf


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q4") / "q4_0.gguf"
    widen(model_gguf("tiny-qwen3moe"), out, total_gib=0.125, dtype="q4_0")
    return out


def test_plugin_loads_q4_0_without_an_anonymous_copy(q4_model: Path) -> None:
    size = q4_model.stat().st_size
    before = rss_anon()
    with PrefetchLlama(q4_model, mode="d0", n_ctx=64, n_threads=2) as llm:
        grown = rss_anon() - before
        out = llm("def f(x):", max_tokens=4, temperature=0.0)
    assert out["choices"][0]["text"] is not None
    # the repacked copy would be about the whole file (measured: 128 of 130 MiB); buffers
    # for a 64-token context are a few MiB
    assert grown < size / 4, (grown, size)
