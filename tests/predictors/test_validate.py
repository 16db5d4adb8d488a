"""Artifact validation: each defect class of the hostile-input issue is refused at load
with one line, so that a loaded artifact cannot fail at predict time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.lab.fuzz.artifact import build_seed_artifacts
from expertpred.predictors.artifact import HEADER, load_artifact
from expertpred.predictors.validate import CHECKSUM_KEY, artifact_checksum


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    paths, _ = build_seed_artifacts(tmp_path_factory.mktemp("seeds"))
    return {p.stem: p for p in paths}


def _arrays(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop(HEADER))), arrays


def _write(tmp_path: Path, header: dict, arrays: dict[str, np.ndarray],
           recompute: bool = False) -> Path:
    if recompute:
        header[CHECKSUM_KEY] = artifact_checksum(header, arrays)
    out = tmp_path / "edited.artifact"
    with open(out, "wb") as f:
        np.savez(f, **{HEADER: np.array(json.dumps(header))}, **arrays)
    return out


def _swap(a: dict, x: str, y: str) -> None:
    a[x], a[y] = a[y], a[x]


# (seed, edit of (header, arrays), recompute the checksum?, words the error must contain)
CASES = [
    ("lightgbm", lambda h, a: _swap(a, "d1.node_left", "d1.node_right"), False, "checksum"),
    ("lightgbm", lambda h, a: _swap(a, "d1.tree_root", "d1.tree_group"), True, "tree_"),
    ("lightgbm", lambda h, a: _swap(a, "d1.node_value", "d1.node_threshold"), False,
     "checksum"),
    ("popularity", lambda h, a: a.update({"d1.freq": a["d1.freq"][:0]}), True, "shape"),
    ("mlp", lambda h, a: a.pop("d1.w1"), True, "missing array 'd1.w1'"),
    ("transition", lambda h, a: a["d1.table"].__setitem__((0, 0, 0), np.nan), True,
     "non-finite"),
    ("previous-token_transition", lambda h, a: _swap(a, "d1.table", "d2.table"), False,
     "checksum"),
    ("previous-token", lambda h, a: h["offsets"]["1"].__setitem__("kind", []), False,
     "kind is []"),
    ("mlp", lambda h, a: h["offsets"]["1"]["arrays"]["w0"].pop("shape"), False, "declares"),
    ("popularity", lambda h, a: h.pop("model"), False, "no 'model'"),
    ("transition", lambda h, a: h["model"].__setitem__("n_expert", "eight"), False, "model"),
    ("lightgbm", lambda h, a: a["d1.tree_expert"].__setitem__(0, 99), True, "tree_expert"),
    ("gate-lookahead", lambda h, a: a["d2.norms"].__setitem__((0, 0), np.inf), True,
     "non-finite"),
]


@pytest.mark.parametrize("seed,edit,recompute,words", CASES)
def test_hostile_artifact_is_one_clean_line(seeds, tmp_path, seed, edit, recompute, words):
    header, arrays = _arrays(seeds[seed])
    arrays = {k: v.copy() for k, v in arrays.items()}
    edit(header, arrays)
    path = _write(tmp_path, header, arrays, recompute)
    with pytest.raises(ExpertPredError) as info:
        load_artifact(path)
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg


def test_bare_npy_and_flipped_array_header(seeds, tmp_path):
    bare = tmp_path / "bare.npy"
    np.save(bare, np.zeros(3))
    with pytest.raises(ExpertPredError, match="bare .npy"):
        load_artifact(bare)
    raw = bytearray(seeds["popularity"].read_bytes())
    at = raw.index(b"{'descr'") + 3  # inside the first member's npy header dict
    raw[at] = ord("(")
    flipped = tmp_path / "flipped.artifact"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(ExpertPredError, match="truncated or corrupt"):
        load_artifact(flipped)


def test_seeds_load_and_carry_a_checksum(seeds):
    for p in seeds.values():
        art = load_artifact(p)
        assert len(art.header[CHECKSUM_KEY]) == 64


def test_run_with_corrupt_predictor_is_one_line(seeds, tmp_path):
    import subprocess
    import sys

    from expertpred.shipped import model_gguf

    bad = tmp_path / "bad.artifact"
    bad.write_bytes(seeds["popularity"].read_bytes()[:300])
    r = subprocess.run([sys.executable, "-m", "expertpred.cli", "run", "--model",
                        str(model_gguf("tiny-mixtral")), "--prompt", "hi", "--predictor",
                        str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") \
        and r.stderr.count("\n") == 1, r.stderr

