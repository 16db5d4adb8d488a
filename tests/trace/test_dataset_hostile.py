"""Hostile trace datasets (edited copies of a shipped one): each defect class of the
hostile-input issue is one TraceDatasetError line naming the file and what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from expertpred.errors import ExpertPredError
from expertpred.shipped import repo_root
from expertpred.trace.dataset import MANIFEST_NAME, TraceDataset

SEED = repo_root() / "datasets" / "traces" / "tiny-mixtral"


@pytest.fixture()
def ds(tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(SEED, out)
    return out


def _edit(ds: Path, fn) -> None:
    m = json.loads((ds / MANIFEST_NAME).read_text())
    fn(m)
    (ds / MANIFEST_NAME).write_text(json.dumps(m))


def _swap_first_two(ids: list) -> None:
    ids[0], ids[1] = ids[1], ids[0]


CASES = [  # (edit of the manifest, words the error must contain)
    (lambda m: m.pop("model"), "has no 'model'"),
    (lambda m: m["model"].pop("sha256"), "has no 'sha256'"),
    (lambda m: m.pop("shards"), "has no 'shards'"),
    (lambda m: m["model"].__setitem__("n_expert", "eight"), "model.n_expert is 'eight'"),
    (lambda m: m["shards"][0].__setitem__("name", "../../elsewhere/x.parquet"),
     "plain shard file name"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    (lambda m: m["shards"][1]["seq_ids"].__setitem__(0, m["shards"][0]["seq_ids"][0]),
     "appears twice"),
    (lambda m: _swap_first_two(m["shards"][0]["seq_ids"]), "seq_id runs"),
    (lambda m: m["model"].__setitem__("path", "models/tiny-qwen3moe/model.gguf"),
     "is another model"),
    (lambda m: m["model"].__setitem__("arch", "qwen3moe"), "is another model"),
    (lambda m: m["columns"].__setitem__("n_expert", 9), "columns.n_expert is 9"),
]


@pytest.mark.parametrize("edit,words", CASES)
def test_hostile_manifest_is_one_clean_line(ds, monkeypatch, edit, words):
    monkeypatch.chdir(repo_root())  # model.path is relative to the repository
    _edit(ds, edit)
    with pytest.raises(ExpertPredError) as info:
        d = TraceDataset(ds)
        d.to_numpy(["seq_id"])
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg


def test_flipped_byte_in_a_data_page_is_caught_on_read(ds):
    shard = ds / "shard-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    d = TraceDataset(ds)  # opening reads footers only
    with pytest.raises(ExpertPredError, match=r"sha256 .*\(corrupt or replaced shard\)"):
        d.to_numpy(["experts"])


def test_analyze_of_a_duplicated_shard_is_one_line(ds, tmp_path):
    import subprocess
    import sys

    _edit(ds, lambda m: m["shards"].append(dict(m["shards"][0])))
    r = subprocess.run([sys.executable, "-m", "expertpred.cli", "analyze", str(ds), "--out",
                        str(tmp_path / "rep")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") \
        and r.stderr.count("\n") == 1, r.stderr[-1500:]


def test_wrapped_multi_line_messages_become_one_line():
    """Arrow's messages span lines ("Couldn't deserialize thrift: ...\\nDeserializing page
    header failed."); a user error is one line whatever it wraps (found by the shard fuzz)."""
    from expertpred.trace.validate import TraceDatasetError

    assert str(TraceDatasetError("shard.parquet: (OSError: a\nb.\n)")) == \
        "shard.parquet: (OSError: a b. )"
