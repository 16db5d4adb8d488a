"""PluginConfig: one frozen config for PrefetchPlugin and PrefetchLlama; old keywords still work."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from expertpred.errors import ExpertPredError
from expertpred.prefetch.plugin import (
    DEFAULT_MIN_REL_SHARE,
    Mode,
    PluginConfig,
    PrefetchLlama,
    PrefetchPlugin,
)
from expertpred.shipped import model_gguf


def test_config_normalizes_mode_and_min_rel_share() -> None:
    cfg = PluginConfig(mode="oracle", min_rel_share=None)
    assert cfg.mode is Mode.ORACLE and cfg.min_rel_share == DEFAULT_MIN_REL_SHARE
    assert PluginConfig(min_rel_share=0).min_rel_share == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = Mode.D0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "half"])
def test_bad_gate_is_one_line_error(bad: object) -> None:
    with pytest.raises(ExpertPredError, match="min_rel_share"):
        PluginConfig(min_rel_share=bad)  # type: ignore[arg-type]


def test_bad_mode_is_one_line_error() -> None:
    with pytest.raises(ExpertPredError, match="prefetch mode 'bogus'"):
        PluginConfig(mode="bogus")


def test_keywords_replace_config_fields() -> None:
    cfg = PluginConfig(mode="d0", queue_depth=3, min_rel_share=0.7)
    plugin = PrefetchPlugin("unused.gguf", cfg, queue_depth=5)
    assert plugin.config == dataclasses.replace(cfg, queue_depth=5)
    assert plugin.mode is Mode.D0 and plugin.min_rel_share == 0.7
    assert PrefetchPlugin("unused.gguf", mode="off").config.mode is Mode.OFF


def test_llama_keywords_and_config_reach_the_plugin() -> None:
    cfg = PluginConfig(mode="d0", queue_depth=3)
    with PrefetchLlama(model_gguf("tiny-mixtral"), cfg, method="pread", n_ctx=256,
                       n_batch=32, n_threads=1, seed=0) as llm:
        assert llm.plugin.config == dataclasses.replace(cfg, method="pread")
        assert llm.plugin.engine_ is not None and llm.plugin.engine_.queue_depth == 3
        assert llm.n_batch == 32  # the Llama keyword reached Llama


@pytest.mark.parametrize("interval", [0.0005, None])
def test_switch_interval_is_set_while_started_and_restored(interval: float | None) -> None:
    before = sys.getswitchinterval()
    with PrefetchPlugin(model_gguf("tiny-mixtral"), mode="d0", switch_interval=interval):
        assert sys.getswitchinterval() == pytest.approx(interval or before)
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("bad", [0, -1.0, 2.0, "fast"])
def test_bad_switch_interval_is_one_line_error(bad: object) -> None:
    with pytest.raises(ExpertPredError, match="switch_interval="):
        PluginConfig(switch_interval=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("setting,advised", [(None, True), (False, False), (True, True)])
def test_madvise_random_defaults_to_on_for_small_experts(setting, advised) -> None:
    # the shipped models' experts are KiBs, far below MADV_RANDOM_MAX_EXPERT_BYTES
    with PrefetchLlama(model_gguf("tiny-mixtral"), mode="d0", madvise_random=setting,
                       n_ctx=256, n_threads=1, seed=0) as llm:
        assert (llm.prefetch_stats().madvised_bytes > 0) is advised


def test_madvise_random_default_is_off_for_large_experts(monkeypatch) -> None:
    from expertpred.prefetch import plugin

    monkeypatch.setattr(plugin, "MADV_RANDOM_MAX_EXPERT_BYTES", 1)  # every expert is larger
    with PrefetchLlama(model_gguf("tiny-mixtral"), mode="d0", n_ctx=256, n_threads=1,
                       seed=0) as llm:
        assert llm.prefetch_stats().madvised_bytes == 0


@pytest.mark.parametrize("mode,wrap,expected", [
    ("predictor", None, False), ("oracle", None, True), ("predictor", True, True),
    ("oracle", False, False)])
def test_only_the_oracle_guesses_the_next_token_by_default(mode, wrap, expected) -> None:
    # the predictor's guess for the next token's first layers (this token's experts) cost
    # more reads than it saved end to end (docs/e2e.md, "Session 6 runs")
    assert PrefetchPlugin("unused.gguf", mode=mode, wrap=wrap).wrap is expected
