"""Fuzz target: ``export.load_artifact`` on mutations of exported predictor artifacts.

Seeds are real artifacts: every numpy rung of the ladder, trained (small) on traces routed
by the shipped tiny-mixtral's own routers and exported with ``export_predictors``.
Mutations: byte flips and truncation of the file, a bare ``.npy``, and re-zipped edits —
header keys deleted or retyped, arrays swapped, resized, retyped, NaN/inf or out-of-range
values, members added or removed — with the stored checksum kept (a silent edit) or
recomputed (a deliberate one: then the structure alone must hold).

An accepted artifact must predict on a fixed feature batch without error, with finite
scores of shape (n, n_expert); when its checksum was not recomputed, its predictions must
equal the seed's exactly.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np

from ...features import FeatureBatch, FeatureConfig, ModelInfo, build_features
from ...gguf.layout import file_sha256, read_layout, router_weight
from ...predictors.artifact import HEADER
from ...predictors.export import export_predictors, load_artifact
from ...predictors.validate import CHECKSUM_KEY, artifact_checksum
from ...shipped import model_gguf
from .core import Edit, flip_bytes, truncate

# (registry name, constructor params): small but real fits of every numpy-exportable rung
SEED_PREDICTORS = [
    ("random", {"seed": 1}), ("popularity", {}), ("transition", {}),
    ("previous-token", {}), ("previous-token+transition", {}), ("gate-lookahead", {"gguf": True}),
    ("lightgbm", {"n_estimators": 3}), ("mlp", {"epochs": 1, "hidden_size": 16}),
]
_ODD_VALUES = [None, [], {}, "x", -1, 0, 1e308, True, [1, 2], "eight", 2**70]


# the seeds' feature history decay: features built with it fit only artifacts that keep it
SEED_DECAY = 0.6


def _seed_data(gguf: Path) -> tuple[ModelInfo, dict[int, FeatureBatch]]:
    from ...predictors.synthetic import SyntheticTraceSpec, synthetic_traces

    lay = read_layout(gguf)
    model = ModelInfo(sha256=file_sha256(gguf), arch=lay.arch, n_layer=lay.n_layer,
                      moe_layers=tuple(lay.moe_layers), n_expert=lay.n_expert,
                      n_expert_used=lay.n_expert_used, n_embd=lay.n_embd)
    spec = SyntheticTraceSpec(n_layer=lay.n_layer, n_expert=lay.n_expert,
                              n_expert_used=lay.n_expert_used, n_embd=lay.n_embd, n_seq=8,
                              seq_len=24, prompt_len=6)
    routers = np.stack([router_weight(gguf, b) for b in lay.moe_layers])
    traces = synthetic_traces(spec, routers=routers)
    return model, {d: build_features(traces, model, FeatureConfig(d=d, history_decay=SEED_DECAY))
                   for d in (1, 2)}


def build_seed_artifacts(out: Path) -> tuple[list[Path], dict[int, FeatureBatch]]:
    """Fit and export every seed predictor into ``out``; return the files and the features."""
    from ...predictors import make_predictor

    gguf = model_gguf("tiny-mixtral")
    _, feats = _seed_data(gguf)
    paths = []
    for name, params in SEED_PREDICTORS:
        params = dict(params)
        if params.pop("gguf", False):
            params["gguf_path"] = str(gguf)
        by_d = {d: make_predictor(name, **params).fit(f) for d, f in feats.items()}
        paths.append(export_predictors(by_d, out / f"{name.replace('+', '_')}.artifact"))
    return paths, feats


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _predict(art: object, feats: dict[int, FeatureBatch]) -> dict[int, np.ndarray]:
    return {d: art.by_d[d].predict_scores(feats[d]) for d in art.offsets if d in feats}


class ArtifactTarget:
    name = "artifact"

    def prepare(self, workdir: Path) -> None:
        self.dir = workdir
        self.seeds, self.feats = build_seed_artifacts(workdir / "seeds")
        self.raw = [p.read_bytes() for p in self.seeds]
        self.loaded = []
        for p in self.seeds:
            with np.load(p, allow_pickle=False) as z:
                self.loaded.append({k: z[k] for k in z.files})
        loaded = [load_artifact(p) for p in self.seeds]
        self.models = [a.model for a in loaded]
        self.expected = [_predict(a, self.feats) for a in loaded]
        self.path = workdir / "case.artifact"
        self.i = 0
        self.rechecked = False

    # --- mutations -------------------------------------------------------------------------
    def _edit_header(self, header: dict, rng: random.Random) -> str:
        """Delete or retype one value somewhere in the header (JSON paths)."""
        node, path = header, []
        while isinstance(node, dict) and node and (not path or rng.random() < 0.6):
            key = rng.choice(sorted(node))
            if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
                break
            if isinstance(node[key], list):
                break
            path.append(key)
            node = node[key]
        if not isinstance(node, dict) or not node:
            return "header unchanged"
        key = rng.choice(sorted(node))
        if rng.random() < 0.35:
            del node[key]
            return f"header delete {'.'.join([*path, key])}"
        v = rng.choice(_ODD_VALUES)
        if isinstance(node[key], (int, float)) and not isinstance(node[key], bool) \
                and rng.random() < 0.5:
            v = node[key] * rng.choice([-1, 0, 2, 1.5]) + rng.choice([0, 1])
        node[key] = v
        return f"header set {'.'.join([*path, key])}={v!r}"

    def _edit_arrays(self, arrays: dict[str, np.ndarray], rng: random.Random) -> str:
        names = [k for k in arrays if k != HEADER]
        if not names:
            return "no arrays"
        k = rng.choice(names)
        a = arrays[k]
        op = rng.choice(["swap", "nan", "inf", "dtype", "shrink", "grow", "delete", "extra",
                         "ints", "scalar", "transpose", "zero-length"])
        if op == "swap":
            same = [n for n in names if n != k and arrays[n].shape == a.shape]
            other = rng.choice(same or names)
            arrays[k], arrays[other] = arrays[other], arrays[k]
            return f"swap {k} <-> {other}"
        if op in ("nan", "inf") and a.size and a.dtype.kind == "f":
            a = a.copy()
            a.reshape(-1)[rng.randrange(a.size)] = np.nan if op == "nan" else -np.inf
        elif op == "ints" and a.size and a.dtype.kind in "iu":
            a = a.copy()
            info = np.iinfo(a.dtype)
            v = rng.choice([-1, -2**31, 2**31 - 1, a.size, int(a.max()) + 1])
            a.reshape(-1)[rng.randrange(a.size)] = min(max(v, info.min), info.max)
        elif op == "dtype":
            a = a.astype(rng.choice([np.float64, np.int32, np.float16, np.uint8, bool]))
        elif op == "shrink" and a.ndim and a.shape[0]:
            a = a[: rng.randrange(a.shape[0])]
        elif op == "grow":
            a = np.concatenate([a, a[:1]]) if a.ndim and a.shape[0] else np.zeros(3, a.dtype)
        elif op == "delete":
            del arrays[k]
            return f"delete array {k}"
        elif op == "extra":
            arrays[f"{k}x"] = a
            return f"extra array {k}x"
        elif op == "scalar":
            a = np.array(7, dtype=a.dtype)
        elif op == "transpose" and a.ndim >= 2:
            a = np.ascontiguousarray(a.swapaxes(0, 1))
        elif op == "zero-length":
            a = a[:0]
        else:
            return f"array {k} unchanged ({op})"
        arrays[k] = a
        return f"{op} {k} -> {a.dtype.str} {list(a.shape)}"

    def _structured(self, rng: random.Random) -> tuple[bytes, str]:
        arrays = dict(self.loaded[self.i])
        header = json.loads(str(arrays[HEADER]))
        label = (self._edit_header(header, rng) if rng.random() < 0.4
                 else self._edit_arrays(arrays, rng))
        self.rechecked = rng.random() < 0.5
        if self.rechecked and isinstance(header, dict):
            try:
                header[CHECKSUM_KEY] = artifact_checksum(
                    header, {k: v for k, v in arrays.items() if k != HEADER})
                label += " (checksum recomputed)"
            except (TypeError, ValueError):
                pass
        arrays[HEADER] = np.array(json.dumps(header))
        return _npz(arrays), label

    def case(self, rng: random.Random) -> str:
        self.i = rng.randrange(len(self.seeds))
        raw = self.raw[self.i]
        self.rechecked = False
        kind = rng.choices(["structured", "flip", "truncate", "npy"], weights=[70, 15, 10, 5])[0]
        if kind == "structured":
            data, label = self._structured(rng)
        elif kind == "npy":
            buf = io.BytesIO()
            np.save(buf, rng.choice(list(self.loaded[self.i].values())))
            data, label = buf.getvalue(), "a bare .npy file"
        else:
            e: Edit = (flip_bytes(raw, 0, len(raw), rng, "file") if kind == "flip"
                       else truncate(len(raw), 0, rng, "file"))
            data, label = e.apply(raw), e.label
        self.path.write_bytes(data)
        return f"{self.seeds[self.i].stem}: {label}"

    def read(self) -> object:
        return load_artifact(self.path)

    def restore(self) -> None:
        pass

    def inconsistencies(self, result: object) -> list[str]:
        art = result
        if art.model != self.models[self.i]:
            # another model's artifact: the seed's features do not apply (the plugin checks
            # the model against the GGUF before predicting); legitimate only if re-signed
            return [] if self.rechecked else [f"model changed to {art.model} without a "
                                              "checksum change"]
        if art.history_decay != SEED_DECAY:
            # the plugin builds features with the artifact's own decay, so the seed's
            # features do not apply; legitimate only if re-signed (as for the model)
            return [] if self.rechecked else [f"history_decay changed to "
                                              f"{art.history_decay} without a checksum change"]
        try:  # what loads must predict: an error here is a silent acceptance
            got = _predict(art, self.feats)
        except Exception as exc:  # noqa: BLE001
            return [f"loaded, then predict failed: {type(exc).__name__}: {exc}"[:300]]
        want = self.expected[self.i]
        out = []
        m = art.model
        layers = list(m.moe_layers)
        if not (layers and layers == sorted(set(layers)) and 0 <= layers[0]
                and layers[-1] < m.n_layer and 0 < m.n_expert_used <= m.n_expert):
            out.append(f"model {m} is inconsistent")
        for d, s in got.items():
            n = len(self.feats[d])
            if s.shape != (n, art.model.n_expert) or not np.isfinite(s).all():
                out.append(f"d={d} scores {s.shape}, finite={bool(np.isfinite(s).all())}")
            elif not self.rechecked and (d not in want or not np.array_equal(s, want[d])):
                out.append(f"d={d} predictions differ from the seed's without a checksum "
                           "change")
        if not self.rechecked and set(got) != set(want):
            out.append(f"offsets {sorted(got)} vs the seed's {sorted(want)}")
        return out
