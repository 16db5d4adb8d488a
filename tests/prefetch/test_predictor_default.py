"""The plugin's default predictor: fast-mlp where a directory holds one the plugin can run,
else the lookup with one warning; an explicit name is loaded as asked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import FeatureConfig, build_features
from expertpred.learn.train import PredictorsConfig, open_source
from expertpred.predictors.base import make_predictor, model_path
from expertpred.prefetch.plugin import (
    DEFAULT_PREDICTOR,
    FALLBACK_PREDICTOR,
    PrefetchPlugin,
    load_predictors,
)
from expertpred.shipped import model_gguf

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-olmoe"  # traced with router inputs: a fast-mlp can be fitted with and without


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    """Quick fits (d = 1) on a few training sequences of the shipped trace."""
    src = open_source(PredictorsConfig(dataset=str(ROOT / "datasets" / "traces" / NAME)))
    seqs = list(src.sequences(src.select(split="train")[:4]))
    data = build_features(seqs, src.model, FeatureConfig(d=1))
    fast = {"epochs": 1, "hidden_size": 8}
    return {
        FALLBACK_PREDICTOR: make_predictor(FALLBACK_PREDICTOR).fit(data),
        DEFAULT_PREDICTOR: make_predictor(DEFAULT_PREDICTOR, use_hidden=False, **fast).fit(data),
        "hidden": make_predictor(DEFAULT_PREDICTOR, use_hidden=True, **fast).fit(data),
        "popularity": make_predictor("popularity").fit(data),
    }


def _dir(tmp: Path, fitted: dict[str, object], *keys: str) -> Path:
    for key in keys:
        p = fitted[key]
        p.save(model_path(tmp, p.name, 1))  # type: ignore[attr-defined]
    return tmp


def _load(d: Path, **kw: object):
    return load_predictors(d, model_gguf(NAME), offsets=(1,), **kw)


def test_default_is_the_learned_predictor(fitted, tmp_path: Path, caplog) -> None:
    d = _dir(tmp_path, fitted, DEFAULT_PREDICTOR, FALLBACK_PREDICTOR)
    with caplog.at_level(logging.WARNING, logger="expertpred.prefetch.predictor_io"):
        pset = _load(d)
    assert pset.name == DEFAULT_PREDICTOR and not pset.needs_hidden
    assert not caplog.records
    assert _load(d, name=FALLBACK_PREDICTOR).name == FALLBACK_PREDICTOR  # asked: as asked


@pytest.mark.parametrize("keys, why", [
    ((FALLBACK_PREDICTOR,), "is not saved there"),
    (("hidden", FALLBACK_PREDICTOR), "reads router inputs"),
])
def test_default_falls_back_to_the_lookup(fitted, tmp_path: Path, caplog, keys, why) -> None:
    d = _dir(tmp_path, fitted, *keys)
    with caplog.at_level(logging.WARNING, logger="expertpred.prefetch.predictor_io"):
        pset = _load(d)
    assert pset.name == FALLBACK_PREDICTOR
    assert [r.getMessage() for r in caplog.records
            if r.name == "expertpred.prefetch.predictor_io"] == [
        f"{d}: the default predictor {DEFAULT_PREDICTOR} {why}; using {FALLBACK_PREDICTOR}"]
    # the plugin runs what was loaded (a router-input fast-mlp it would refuse)
    with PrefetchPlugin(model_gguf(NAME), mode="predictor", predictor=pset) as plugin:
        assert plugin.lookahead_ == 1 and plugin.stats().predictor == FALLBACK_PREDICTOR


def test_no_usable_predictor_names_the_default(fitted, tmp_path: Path) -> None:
    d = _dir(tmp_path, fitted, "popularity")
    with pytest.raises(ExpertPredError, match=f"no saved '{DEFAULT_PREDICTOR}' predictor"):
        _load(d)
    hidden_only = _dir(tmp_path / "h", fitted, "hidden")
    pset = _load(hidden_only)  # no fallback there: the plugin's own error says why
    with pytest.raises(ExpertPredError, match="reads hidden states"):
        PrefetchPlugin(model_gguf(NAME), mode="predictor", predictor=pset).start()
