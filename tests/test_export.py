"""Exported predictors: equal to the in-memory ones on every rung, numpy only, identity and
corruption errors, the CLI. Trained on small synthetic traces routed by a random GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import FeatureConfig, ModelInfo, OnlineFeatures, build_features
from expertpred.gguf.layout import file_sha256, read_layout, router_weight
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.predictors import make_predictor
from expertpred.predictors.export import export_predictors, export_saved, load_artifact, read_header
from expertpred.predictors.synthetic import SyntheticTraceSpec, split_of, synthetic_traces
from expertpred.trace.record import Phase

GGUF_SPEC = SyntheticSpec(arch="llama", n_layer=4, n_embd=32, n_head=4, n_head_kv=2,
                          n_expert=8, n_expert_used=2, n_ff=16)
SPEC = SyntheticTraceSpec(n_layer=4, n_expert=8, n_expert_used=2, n_embd=32, n_seq=12,
                          seq_len=24, prompt_len=6)
OFFSETS = (1, 2)

# (case id, registry name, constructor params): every rung, plus variants with other code paths
CASES = [
    ("random", "random", {"seed": 3}),
    ("popularity", "popularity", {}),
    ("transition", "transition", {}),
    ("transition-probs", "transition", {"source": "probs"}),
    ("previous-token", "previous-token", {}),
    ("previous-token+transition", "previous-token+transition", {}),
    ("gate-lookahead", "gate-lookahead", {"gguf": True}),
    ("gate-lookahead-no-renorm", "gate-lookahead", {"gguf": True, "renorm": False}),
    ("lightgbm", "lightgbm", {"n_estimators": 4, "gguf": True}),
    ("lightgbm-shared-hidden", "lightgbm",
     {"n_estimators": 4, "shared": True, "use_hidden": True, "min_child_samples": 5}),
    ("mlp", "mlp", {"epochs": 2, "hidden_size": 32, "gguf": True}),
    ("mlp-no-hidden", "mlp", {"epochs": 2, "hidden_size": 16, "use_hidden": False,
                              "all_layers": False}),
    ("fast-mlp", "fast-mlp", {"epochs": 2, "hidden_size": 16, "gguf": True}),
    ("fast-mlp-one-layer", "fast-mlp", {"epochs": 2, "hidden_size": 16, "n_hidden": 1,
                                        "use_hidden": False}),
    ("oracle", "oracle", {}),
]


def _model_of(path: Path) -> ModelInfo:
    lay = read_layout(path)
    return ModelInfo(sha256=file_sha256(path), arch=lay.arch, n_layer=lay.n_layer,
                     moe_layers=tuple(lay.moe_layers), n_expert=lay.n_expert,
                     n_expert_used=lay.n_expert_used, n_embd=lay.n_embd)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    return write_random_moe(tmp_path_factory.mktemp("model") / "tiny.gguf", GGUF_SPEC)


@pytest.fixture(scope="module")
def data(gguf_path):
    """(model, {d: (train, test)}) on traces routed by the GGUF's own routers."""
    routers = np.stack([router_weight(gguf_path, i) for i in range(SPEC.n_layer)])
    traces = synthetic_traces(SPEC, routers=routers)
    model = _model_of(gguf_path)
    out = {}
    for d in OFFSETS:
        cfg = FeatureConfig(d=d, history_decay=0.6)
        train = build_features([t for t in traces if split_of(t.seq_id) != "test"], model, cfg)
        test = build_features([t for t in traces if split_of(t.seq_id) == "test"], model, cfg)
        out[d] = (train, test)
    return model, traces, out


def _fit(name: str, params: dict, gguf_path: Path, data) -> dict:
    params = dict(params)
    if params.pop("gguf", False):
        params["gguf_path"] = str(gguf_path)
    return {d: make_predictor(name, **params).fit(train) for d, (train, _) in data[2].items()}


@pytest.fixture(scope="module")
def fitted(gguf_path, data, tmp_path_factory):
    """case id → (in-memory predictors by d, artifact path)."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for case, name, params in CASES:
        by_d = _fit(name, params, gguf_path, data)
        out[case] = (by_d, export_predictors(by_d, root / f"{case}.artifact"))
    return out


def _assert_same(a: np.ndarray, b: np.ndarray, top_a: np.ndarray, top_b: np.ndarray,
                 k: int) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # identical top-k except where the k-th and (k+1)-th scores tie
    srt = -np.sort(-a, axis=1)
    tie = np.abs(srt[:, k - 1] - srt[:, k]) <= 1e-5 * np.maximum(np.abs(srt[:, k - 1]), 1e-7)
    np.testing.assert_array_equal(top_a[~tie], top_b[~tie])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_exported_equals_in_memory(case, fitted, data, gguf_path):
    by_d, path = fitted[case]
    art = load_artifact(path, gguf_path=gguf_path)
    assert art.offsets == OFFSETS and art.name == by_d[1].name
    assert art.history_decay == 0.6 and art.model == data[0]
    k = data[0].n_expert_used
    for d, (_, test) in data[2].items():
        mem, exp = by_d[d], art.by_d[d]
        assert exp.feature_config_ == mem.feature_config_
        _assert_same(mem.predict_scores(test), exp.predict_scores(test),
                     mem.predict_topk(test, k), exp.predict_topk(test, k), k)
        assert exp.predict_scores(test.take(slice(0, 0))).shape == (0, data[0].n_expert)


@pytest.mark.parametrize("case", ["random", "popularity", "transition", "previous-token",
                                  "previous-token+transition", "lightgbm", "mlp",
                                  "gate-lookahead", "fast-mlp"])
def test_online_rows_equal(case, fitted, data, gguf_path):
    """Through the plugin's path: OnlineFeatures one row at a time, topk per offset."""
    by_d, path = fitted[case]
    art = load_artifact(path)
    model, traces = data[0], data[1]
    seq = next(t for t in traces if split_of(t.seq_id) == "test")
    f = OnlineFeatures(model, history_decay=art.history_decay)
    for t in range(seq.n_tokens):
        f.next_token(int(seq.tokens[t]), Phase(int(seq.phase[t])))
        for li in range(model.n_moe):
            f.update(li, seq.logits[t, li], seq.experts[t, li], seq.hidden[t, li])
            for d in art.offsets:
                x = f.features(d)
                if x is None:
                    continue
                a, b = by_d[d].predict_scores(x), art.by_d[d].predict_scores(x)
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
                if np.unique(a).size == a.size:  # (one-row answers may come from a cache)
                    for _ in range(2):
                        assert art.topk(d, x, 2).tolist() == \
                            by_d[d].predict_topk(x, 2)[0].tolist()


def test_loads_and_predicts_with_numpy_only(fitted, data, tmp_path):
    """Every artifact loads and predicts in a process where torch / lightgbm / sklearn
    cannot be imported, and none of them was imported."""
    feats = tmp_path / "feats.npz"
    test = data[2][1][1]
    np.savez(feats, **{k: getattr(test, k) for k in ("position", "token", "phase", "layer",
                                                    "logits", "experts", "prev_experts",
                                                    "history", "hidden", "targets",
                                                    "layer_logits")})
    paths = {case: str(p) for case, (_, p) in fitted.items()}
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "lightgbm", "sklearn"):
            sys.modules[name] = None
        import json
        import numpy as np
        from expertpred.predictors.export import load_artifact
        from expertpred.features import FeatureBatch, FeatureConfig
        paths = json.loads({json.dumps(json.dumps(paths))})
        z = dict(np.load({str(feats)!r}))
        out = {{}}
        for case, p in paths.items():
            art = load_artifact(p)
            x = FeatureBatch(model=art.model, config=FeatureConfig(1, art.history_decay),
                             seq=np.zeros(len(z["layer"]), np.int64), **z)
            out[case] = art.by_d[1].predict_scores(x)
        loaded = [m for m in ("torch", "lightgbm", "sklearn")
                  if sys.modules.get(m) is not None or any(k.startswith(m + ".")
                                                           for k in sys.modules)]
        assert not loaded, loaded
        np.savez({str(tmp_path / "out.npz")!r}, **out)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "out.npz")
    for case, (by_d, _) in fitted.items():
        np.testing.assert_allclose(got[case], by_d[1].predict_scores(test), rtol=1e-5,
                                   atol=1e-7)


def test_header_is_self_describing(fitted, data):
    h = read_header(fitted["lightgbm"][1])
    assert h["format"] == "expertpred.predictor-artifact" and h["format_version"] == 1
    assert h["predictor"] == "lightgbm" and h["params"]["n_estimators"] == 4
    assert h["model"] == data[0].to_dict() and h["features"]["history_decay"] == 0.6
    spec = h["offsets"]["1"]["spec"]
    assert spec["gate"] and not spec["layer_onehot"] and "current_all" in spec["parts"]
    assert h["needs_hidden"] and not read_header(fitted["popularity"][1])["needs_hidden"]
    assert read_header(fitted["oracle"][1])["offsets"]["1"]["arrays"] == {}


def test_oracle_artifact_needs_the_true_future(fitted, data):
    art = load_artifact(fitted["oracle"][1])
    test = data[2][1][1]
    with pytest.raises(ExpertPredError, match="oracle.*recorded trace"):
        art.by_d[1].predict_scores(replace(test, targets=None))


def test_wrong_feature_config_is_refused(fitted, data):
    art = load_artifact(fitted["popularity"][1])
    test = data[2][1][1]
    with pytest.raises(ExpertPredError, match="history_decay"):
        art.by_d[1].predict_scores(replace(test, config=FeatureConfig(d=1)))


# --- identity -----------------------------------------------------------------------------------

def test_sha_mismatch_is_refused_unless_allowed(fitted, data, gguf_path, tmp_path):
    other = write_random_moe(tmp_path / "other.gguf", replace(GGUF_SPEC, seed=7))
    path = fitted["popularity"][1]
    a, b = file_sha256(gguf_path)[:12], file_sha256(other)[:12]
    with pytest.raises(ExpertPredError, match=f"{a}.*{b}") as exc:
        load_artifact(path, gguf_path=other)
    assert "\n" not in str(exc.value) and "--allow-sha-mismatch" in str(exc.value)
    art = load_artifact(path, gguf_path=other, allow_sha_mismatch=True)
    assert art.model.sha256 == file_sha256(other) and art.trained_model == data[0]
    test = data[2][1][1]
    assert art.by_d[1].predict_topk(test, 2).shape == (len(test), 2)


@pytest.mark.parametrize("change", [{"n_expert": 4}, {"n_layer": 3}, {"n_embd": 48}])
def test_shape_mismatch_always_fails(fitted, tmp_path, change):
    other = write_random_moe(tmp_path / "other.gguf", replace(GGUF_SPEC, **change))
    for allow in (False, True):
        with pytest.raises(ExpertPredError, match="model shape.*not overridable") as exc:
            load_artifact(fitted["popularity"][1], gguf_path=other, allow_sha_mismatch=allow)
        assert "\n" not in str(exc.value)


# --- corrupt artifacts ------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, header: str | None = None, drop: str = "") -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            if item == drop:
                continue
            data = zin.read(item)
            if header is not None and item == "__header__.npy":
                buf = __import__("io").BytesIO()
                np.save(buf, np.array(header))
                data = buf.getvalue()
            zout.writestr(item, data)
    return dst


def _corrupt(kind: str, src: Path, tmp: Path) -> Path:
    dst = tmp / f"{kind}.artifact"
    if kind == "truncated":
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif kind == "empty":
        dst.write_bytes(b"")
    elif kind == "bad-json":
        _rewrite(src, dst, header="{not json")
    elif kind == "missing-array":
        _rewrite(src, dst, drop="d1.freq.npy")
    elif kind == "wrong-version":
        h = json.loads(str(np.load(src)["__header__"]))
        _rewrite(src, dst, header=json.dumps({**h, "format_version": 99}))
    elif kind == "bad-kind":
        h = json.loads(str(np.load(src)["__header__"]))
        h["offsets"]["1"]["kind"] = "magic"
        _rewrite(src, dst, header=json.dumps(h))
    elif kind == "no-header":
        np.savez(dst, x=np.zeros(3))
        dst = dst.with_suffix(".artifact.npz")
    elif kind == "missing":
        dst = tmp / "nope.artifact"
    return dst


@pytest.mark.parametrize("kind, match", [
    ("truncated", "truncated or corrupt"), ("empty", "truncated or corrupt"),
    ("bad-json", "not valid JSON"), ("missing-array", "missing array 'd1.freq'"),
    ("wrong-version", "format_version 99"), ("bad-kind", "kind 'magic'"),
    ("no-header", "no __header__"), ("missing", "no such artifact"),
])
def test_corrupt_artifact_is_one_line_error(kind, match, fitted, tmp_path):
    bad = _corrupt(kind, Path(fitted["previous-token"][1]), tmp_path)
    with pytest.raises(ExpertPredError, match=match) as exc:
        load_artifact(bad)
    assert "\n" not in str(exc.value)


# --- from disk and the CLI ---------------------------------------------------------------------

def test_export_saved_directory_and_cli(fitted, gguf_path, tmp_path):
    models = tmp_path / "models"
    for case in ("popularity", "previous-token+transition"):
        for d, p in fitted[case][0].items():
            p.save(models / f"{p.name.replace('+', '_plus_')}-d{d}.npz")
    with pytest.raises(ExpertPredError, match="choose one with --name"):
        export_saved(models, tmp_path / "x.artifact")
    one = export_saved(models / "popularity-d2.npz", tmp_path / "one.artifact")
    assert load_artifact(one).offsets == (2,)
    cmd = [sys.executable, "-m", "expertpred.cli", "export", "--predictor", str(models),
           "--name", "previous-token+transition", "--out", str(tmp_path / "pt.artifact"),
           "--model", str(gguf_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "previous-token+transition d=[1, 2]" in res.stdout
    assert load_artifact(tmp_path / "pt.artifact").offsets == OFFSETS
    res = subprocess.run(cmd[:-4] + ["--name", "lightgbm", "--out", str(tmp_path / "y")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no saved 'lightgbm'" \
        in res.stderr
