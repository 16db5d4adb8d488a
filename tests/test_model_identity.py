"""The one identity policy (``expertpred.model.check_identity``) on real GGUF files and real
``expertpred widen`` output, and both loaders (exported artifact, saved predictors) giving
the same verdict through it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import FeatureConfig, build_features
from expertpred.gguf.layout import GGUFFile, file_sha256, model_info, routing_fingerprint
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.gguf.widen import widen
from expertpred.model import Match, ModelInfo, check_identity
from expertpred.predictors import make_predictor
from expertpred.predictors.base import model_path
from expertpred.predictors.export import export_predictors, load_artifact
from expertpred.predictors.synthetic import SyntheticTraceSpec, synthetic_traces
from expertpred.prefetch.plugin import load_predictors

GGUF_SPEC = SyntheticSpec(arch="llama", n_layer=4, n_embd=32, n_head=4, n_head_kv=2,
                          n_expert=8, n_expert_used=2, n_ff=16)
TRACES = SyntheticTraceSpec(n_layer=4, n_expert=8, n_expert_used=2, n_embd=32, n_seq=6,
                            seq_len=16, prompt_len=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """source, its widened copy, another model of the same shapes, and that one widened."""
    tmp = tmp_path_factory.mktemp("identity")
    src = write_random_moe(tmp / "src.gguf", GGUF_SPEC)
    other = write_random_moe(tmp / "other.gguf", replace(GGUF_SPEC, seed=7))
    wide = widen(src, tmp / "src-wide.gguf", ff=64, dtype="f32").path
    other_wide = widen(other, tmp / "other-wide.gguf", ff=64, dtype="f32").path
    return {"src": src, "wide": Path(wide), "other": other, "other_wide": Path(other_wide)}


@pytest.fixture(scope="module")
def saved(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A previous-token predictor (d = 1) trained on ``src``: saved directory and artifact."""
    tmp = tmp_path_factory.mktemp("predictors")
    model = model_info(files["src"])
    data = build_features(synthetic_traces(TRACES), model, FeatureConfig(d=1))
    p = make_predictor("previous-token").fit(data)
    p.save(model_path(tmp / "models", "previous-token", 1))
    return tmp / "models", export_predictors({1: p}, tmp / "previous-token.npz")


def test_widen_keeps_the_routing_fingerprint_and_changes_the_hash(files):
    assert routing_fingerprint(files["wide"]) == routing_fingerprint(files["src"])
    assert routing_fingerprint(files["other"]) != routing_fingerprint(files["src"])
    assert file_sha256(files["wide"]) != file_sha256(files["src"])
    assert model_info(files["wide"]) != model_info(files["src"])  # sha256 is identity
    assert model_info(files["wide"]).shape == model_info(files["src"]).shape


def test_exact_widened_unrecorded_allowed(files):
    trained = model_info(files["src"])
    assert check_identity(trained, GGUFFile(files["src"])).match is Match.EXACT
    got = check_identity(trained, GGUFFile(files["wide"]), source=GGUFFile(files["src"]))
    assert got.match is Match.WIDENED and got.model == trained
    unrec = check_identity(replace(trained, sha256=""), GGUFFile(files["other"]))
    assert unrec.match is Match.UNRECORDED
    allowed = check_identity(trained, GGUFFile(files["other"]), allow_sha_mismatch=True)
    assert allowed.match is Match.ALLOWED and allowed.model == model_info(files["other"])


@pytest.mark.parametrize("target,source,message", [
    ("wide", None, "--source-model"),  # a widened copy without its source
    ("other", None, "another model"),  # another model of the same shapes
    ("wide", "other", "source model .* has sha256"),  # the wrong source
    ("other_wide", "src", "not a widened copy"),  # the right source, another widened model
])
def test_refused(files, target, source, message):
    trained = model_info(files["src"])
    src = GGUFFile(files[source]) if source else None
    with pytest.raises(ExpertPredError, match=message) as exc:
        check_identity(trained, GGUFFile(files[target]), source=src)
    assert "\n" not in str(exc.value)


def test_shape_mismatch_is_never_allowed(files, tmp_path):
    other = write_random_moe(tmp_path / "k4.gguf", replace(GGUF_SPEC, n_expert_used=4))
    for allow in (False, True):
        with pytest.raises(ExpertPredError, match="another model shape.*not overridable"):
            check_identity(model_info(files["src"]), GGUFFile(other), allow_sha_mismatch=allow)


def test_old_records_still_load():
    """A record without path / arch / n_embd (older predictors) reads, and n_embd 0 does not
    make a shape mismatch; ``path`` is not identity."""
    m = ModelInfo.from_dict({"n_layer": 4, "moe_layers": [0, 1], "n_expert": 8,
                             "n_expert_used": 2})
    assert m.n_embd == 0 and m.path == "" and m.sha256 == ""
    full = ModelInfo.from_dict({**m.to_dict(), "n_embd": 32, "path": "/x/m.gguf"})
    assert full == replace(full, path="elsewhere.gguf") and "path" not in full.to_dict()
    with pytest.raises(ExpertPredError, match="missing or bad field"):
        ModelInfo.from_dict({"n_layer": 4})


@pytest.mark.parametrize("target,source,ok", [
    ("src", None, True), ("wide", "src", True), ("wide", None, False), ("other", None, False),
])
def test_both_loaders_give_one_verdict(files, saved, target, source, ok):
    """An exported artifact and a directory of saved predictors are accepted and refused
    for the same (model, source) pairs: both go through the one policy."""
    models_dir, artifact = saved
    src = files[source] if source else None
    loaders = {
        "artifact": lambda: load_artifact(artifact, gguf_path=files[target], source_model=src),
        "plugin-artifact": lambda: load_predictors(artifact, files[target],
                                                   name="previous-token", offsets=(1,),
                                                   source_model=src),
        "plugin-saved": lambda: load_predictors(models_dir, files[target],
                                                name="previous-token", offsets=(1,),
                                                source_model=src),
    }
    for name, load in loaders.items():
        if ok:
            assert load() is not None, name
        else:
            with pytest.raises(ExpertPredError, match="sha256") as exc:
                load()
            assert "\n" not in str(exc.value), name
