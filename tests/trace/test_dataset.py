"""The trace dataset: round trip, whole-sequence shards, resume, SIGKILL, disk full, readers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from expertpred.trace.dataset import (
    DecodingInfo,
    ManifestInfo,
    ModelInfo,
    TraceDataset,
    TraceDatasetError,
    TraceWriteError,
    TraceWriter,
)
from expertpred.trace.dataset import writer as dsmod
from expertpred.trace.record import SequenceTrace

REPO = Path(__file__).resolve().parents[2]
L, K, E, D = 3, 2, 8, 16


def model_info(sha: str = "a" * 64, n_expert: int = E) -> ModelInfo:
    return ModelInfo(path="m.gguf", sha256=sha, arch="llama", n_layer=L + 1,
                     moe_layers=tuple(range(1, L + 1)), n_expert=n_expert, n_expert_used=K,
                     n_embd=D)


def info(hidden: bool = False, sha: str = "a" * 64, n_expert: int = E, **dec) -> ManifestInfo:
    return ManifestInfo(model=model_info(sha, n_expert), decoding=DecodingInfo(**dec),
                        capture_hidden=hidden)


def seq_len(seq_id: int) -> int:
    return 5 + (seq_id * 7) % 23


def make_seq(seq_id: int, hidden: bool = False, n_expert: int = E,
             n_tokens: int | None = None) -> SequenceTrace:
    """A deterministic random sequence: the same seq_id always gives the same arrays."""
    rng = np.random.default_rng(seq_id)
    t = n_tokens or seq_len(seq_id)
    logits = rng.standard_normal((t, L, n_expert)).astype(np.float32)
    experts = np.argsort(-logits, axis=-1)[..., :K].astype(np.int16)
    return SequenceTrace(
        seq_id=seq_id, prompt_id=f"p{seq_id}", domain="code" if seq_id % 2 else "prose",
        tokens=rng.integers(0, 512, t).astype(np.int32),
        phase=(np.arange(t) >= t // 2).astype(np.int8),
        experts=experts, weights=rng.random((t, L, K)).astype(np.float32), logits=logits,
        hidden=rng.standard_normal((t, L, D)).astype(np.float16) if hidden else None,
        text=f"generated {seq_id} ✓")


def split_of(seq_id: int) -> str:
    return ("train", "validation", "test")[seq_id % 3]


def write(out: Path, ids, hidden: bool = False, **kw) -> TraceWriter:
    with TraceWriter(out, info(hidden), **kw) as w:
        for i in ids:
            w.write(make_seq(i, hidden), split=split_of(i))
    return w


def assert_same(a: SequenceTrace, b: SequenceTrace) -> None:
    for name in ("tokens", "phase", "experts", "weights", "logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.hidden is None) == (b.hidden is None)
    if a.hidden is not None:
        assert np.array_equal(a.hidden, b.hidden)
    assert (a.seq_id, a.prompt_id, a.domain, a.text) == (b.seq_id, b.prompt_id, b.domain, b.text)


def shard_seq_ids(path: Path) -> list[int]:
    return pq.read_table(path, columns=["seq_id"]).column("seq_id").to_numpy().tolist()


# --- round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [False, True])
def test_round_trip(tmp_path, hidden):
    ids = list(range(30))
    write(tmp_path / "ds", ids, hidden, shard_rows=100)
    ds = TraceDataset(tmp_path / "ds")
    ds.verify()
    assert ds.complete and ds.has_hidden == hidden and len(ds.shards) > 2
    assert ds.seq_ids.tolist() == ids
    assert ds.n_rows == sum(seq_len(i) for i in ids)
    got = {s.seq_id: s for s in ds.sequences()}
    assert sorted(got) == ids
    for i in ids:
        assert_same(got[i], make_seq(i, hidden))
    m = ds.manifest
    assert m["model"]["moe_layers"] == [1, 2, 3] and m["capture_hidden"] == hidden
    assert set(m["software"]) >= {"expertpred", "llama-cpp-python", "numpy", "pyarrow", "python"}
    assert m["decoding"]["mode"] == "greedy" and m["totals"]["rows"] == ds.n_rows
    info_rows = {r["seq_id"]: r for r in ds.sequence_info()}
    assert info_rows[4]["split"] == "validation" and info_rows[4]["n_tokens"] == seq_len(4)


def test_to_numpy_filters_and_shapes(tmp_path):
    write(tmp_path / "ds", range(20), shard_rows=64)
    ds = TraceDataset(tmp_path / "ds")
    cols = ds.to_numpy(["seq_id", "pos", "experts", "logits", "split", "domain"])
    n = ds.n_rows
    assert cols["experts"].shape == (n, L, K) and cols["experts"].dtype == np.int16
    assert cols["logits"].shape == (n, L, E) and cols["logits"].dtype == np.float32
    test = ds.to_numpy(["seq_id", "experts"], split="test")
    want = [i for i in range(20) if split_of(i) == "test"]
    assert sorted(set(test["seq_id"].tolist())) == want
    assert len(test["seq_id"]) == sum(seq_len(i) for i in want)
    first = np.flatnonzero(test["seq_id"] == want[0])
    assert np.array_equal(test["experts"][first], make_seq(want[0]).experts)
    code = ds.to_numpy(["domain"], domain="code", seq_ids=[1, 2, 3])
    assert set(code["domain"]) == {"code"} and len(code["domain"]) == seq_len(1) + seq_len(3)
    assert sum(b.num_rows for b in ds.iter_batches(["seq_id"], batch_rows=10)) == n
    assert max(b.num_rows for b in ds.iter_batches(["seq_id"], batch_rows=10)) <= 10
    assert ds.table(["seq_id", "experts"]).num_rows == n
    with pytest.raises(TraceDatasetError, match="no column 'nope'"):
        ds.to_numpy(["nope"])
    with pytest.raises(TraceDatasetError, match="iter_batches"):
        ds.table(max_bytes=10)


def test_shards_hold_whole_sequences(tmp_path):
    ids = list(range(40))
    write(tmp_path / "ds", ids, shard_rows=50)
    ds = TraceDataset(tmp_path / "ds")
    seen: set[int] = set()
    for s in ds.shards:
        rows = shard_seq_ids(tmp_path / "ds" / s.name)
        in_file = set(rows)
        assert in_file == set(s.seq_ids) and not in_file & seen
        seen |= in_file
        assert len(rows) == s.rows == sum(seq_len(i) for i in in_file)  # every row of each seq
        assert s.rows <= 50 or len(s.seq_ids) == 1
    assert seen == set(ids)


def test_sequence_longer_than_shard_gets_its_own_shard(tmp_path):
    with TraceWriter(tmp_path / "ds", info(), shard_rows=20) as w:
        w.write(make_seq(0, n_tokens=5))
        w.write(make_seq(1, n_tokens=70))
        w.write(make_seq(2, n_tokens=5))
    ds = TraceDataset(tmp_path / "ds")
    assert [s.seq_ids for s in ds.shards] == [(0,), (1,), (2,)]
    assert [s.rows for s in ds.shards] == [5, 70, 5]


def test_writer_checks_shapes_and_duplicates(tmp_path):
    with TraceWriter(tmp_path / "ds", info()) as w:
        with pytest.raises(ValueError, match="logits shape"):
            w.write(make_seq(0, n_expert=E + 1))
        with pytest.raises(ValueError, match="hidden shape"):
            TraceWriter(tmp_path / "h", info(hidden=True)).write(make_seq(0))
        w.write(make_seq(1))
        with pytest.raises(ValueError, match="twice"):
            w.write(make_seq(1))


# --- resume and refusals -----------------------------------------------------------------


def test_resume_skips_finished_sequences(tmp_path):
    out = tmp_path / "ds"
    write(out, range(10), shard_rows=40)
    first = TraceDataset(out).shards
    with TraceWriter(out, info(), shard_rows=40, resume=True) as w:
        assert w.done_seq_ids == frozenset(range(10))
        written = [i for i in range(25) if w.write(make_seq(i), split=split_of(i))]
    assert written == list(range(10, 25))
    ds = TraceDataset(out)
    ds.verify()
    assert ds.shards[: len(first)] == first  # old shards untouched, new ones appended
    sid = ds.to_numpy(["seq_id"])["seq_id"]
    assert sorted(set(sid.tolist())) == list(range(25))
    assert len(sid) == sum(seq_len(i) for i in range(25))  # no duplicated rows
    assert [r["resumed"] for r in ds.manifest["runs"]] == [False, True]


def test_resume_adopts_orphan_shard_and_removes_tmp(tmp_path):
    """A kill between the shard rename and the manifest rewrite leaves an unlisted shard."""
    out = tmp_path / "ds"
    write(out, range(12), shard_rows=40)
    m = json.loads((out / "_manifest.json").read_text())
    orphan = m["shards"].pop()
    (out / "_manifest.json").write_text(json.dumps(m))
    (out / "shard-00099.parquet.tmp").write_bytes(b"PAR1 half a shard")
    (out / "_manifest.json.tmp").write_text("{")
    with TraceWriter(out, info(), shard_rows=40, resume=True) as w:
        assert set(orphan["seq_ids"]) <= w.done_seq_ids == frozenset(range(12))
    assert not list(out.glob("*.tmp"))
    ds = TraceDataset(out)
    ds.verify()
    assert ds.seq_ids.tolist() == list(range(12))


def test_refuses_other_model_and_existing_dataset(tmp_path):
    out = tmp_path / "ds"
    write(out, range(3))
    for resume in (False, True):
        with pytest.raises(TraceWriteError, match="another model") as exc:
            TraceWriter(out, info(sha="b" * 64), resume=resume)
        assert str(out) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(TraceWriteError, match="--resume"):
        TraceWriter(out, info())
    with pytest.raises(TraceWriteError, match="max_tokens"):
        TraceWriter(out, info(max_tokens=64), resume=True)
    with pytest.raises(TraceWriteError, match="hidden"):
        TraceWriter(out, info(hidden=True), resume=True)
    TraceWriter(out, info(n_threads=7), resume=True).close()  # threads do not change data
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TraceWriteError, match="not empty"):
        TraceWriter(foreign, info())


def test_second_writer_is_locked_out(tmp_path):
    with TraceWriter(tmp_path / "ds", info()) as w:
        w.write(make_seq(0))
        with pytest.raises(TraceWriteError, match="another trace run"):
            TraceWriter(tmp_path / "ds", info(), resume=True)


# --- crash safety: a real SIGKILL --------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_dataset import TraceWriter, info, make_seq, split_of
    out, n, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    with TraceWriter(out, info(), shard_rows=120, resume=resume) as w:
        for i in range(n):
            if i not in w.done_seq_ids:
                w.write(make_seq(i), split=split_of(i))
                time.sleep(0 if resume else 0.01)
""")


def test_sigkill_keeps_finished_shards_and_resume_completes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    out, n = tmp_path / "ds", 300
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n), "0"], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "_manifest.json").read_text())["shards"]) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "child finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    ds = TraceDataset(out)  # readable as it was left
    ds.verify()
    assert not ds.complete and 3 <= len(ds.shards)
    done = ds.seq_ids.tolist()
    assert len(done) < n
    for s in ds.shards:  # every listed shard holds whole sequences
        rows = shard_seq_ids(out / s.name)
        assert len(rows) == sum(seq_len(i) for i in set(rows))

    res = subprocess.run([sys.executable, str(script), str(out), str(n), "1"], env=env,
                         timeout=120)
    assert res.returncode == 0
    assert not list(out.glob("*.tmp"))
    ds = TraceDataset(out)
    ds.verify()
    assert ds.complete and ds.seq_ids.tolist() == list(range(n))
    sid = ds.to_numpy(["seq_id"])["seq_id"]
    assert len(sid) == sum(seq_len(i) for i in range(n))  # exact, no duplicates
    for s in ds.sequences(seq_ids=[0, done[-1], n - 1]):
        assert_same(s, make_seq(s.seq_id))


# --- disk full -----------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs (real ENOSPC); falls back to an injected ENOSPC if mount is denied."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    ok = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
        capture_output=True).returncode == 0
    yield mnt, bool(ok)
    if ok:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_leaves_no_corrupt_shard(tiny_disk, monkeypatch):
    mnt, real = tiny_disk
    out = mnt / "ds"
    if not real:  # inject ENOSPC into the third shard's bytes
        calls = {"n": 0}
        orig = dsmod._HashingWriter.write

        def full(self, b):
            calls["n"] += 1 if self.nbytes == 0 else 0
            if calls["n"] >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return orig(self, b)

        monkeypatch.setattr(dsmod._HashingWriter, "write", full)
    w = TraceWriter(out, info(n_expert=256), shard_rows=40)  # ~40 KB incompressible shards
    with pytest.raises(TraceWriteError) as exc:
        for i in range(400):
            w.write(make_seq(i, n_expert=256))
        w.close()
    msg = str(exc.value)
    assert "\n" not in msg and str(out) in msg and "disk full" in msg
    assert w.state is dsmod.WriterState.FAILED
    with pytest.raises(RuntimeError, match="failed"):
        w.write(make_seq(999, n_expert=256))
    w.close()
    assert not list(out.glob("*.tmp"))
    ds = TraceDataset(out)
    ds.verify()  # every listed shard is whole
    on_disk = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert len(ds.shards) >= 1 and on_disk[: len(ds.shards)] == [s.name for s in ds.shards]
    for p in on_disk:  # an unlisted shard (manifest write hit ENOSPC) is still a whole file
        rows = shard_seq_ids(out / p)
        assert len(rows) == sum(seq_len(i) for i in set(rows))


# --- reader errors ------------------------------------------------------------------------


def test_reader_errors(tmp_path):
    with pytest.raises(TraceDatasetError, match="no such directory"):
        TraceDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceDatasetError, match="not a trace dataset"):
        TraceDataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "_manifest.json").write_text("{oops")
    with pytest.raises(TraceDatasetError, match="not valid JSON"):
        TraceDataset(tmp_path / "bad")

    a, b = tmp_path / "a", tmp_path / "b"
    write(a, range(6), shard_rows=30)
    with TraceWriter(b, info(sha="b" * 64), shard_rows=30) as w:
        for i in range(6):
            w.write(make_seq(i))
    # A shard of model b copied over a shard of model a (manifest sizes patched to match).
    shutil.copy(b / "shard-00000.parquet", a / "shard-00000.parquet")
    m = json.loads((a / "_manifest.json").read_text())
    m["shards"][0]["bytes"] = (a / "shard-00000.parquet").stat().st_size
    (a / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceDatasetError, match="mixed models"):
        TraceDataset(a)
    (b / "shard-00001.parquet").unlink()
    with pytest.raises(TraceDatasetError, match="shard-00001.parquet.*missing"):
        TraceDataset(b)


# --- other readers, without expertpred -------------------------------------------------


@pytest.fixture
def sample(tmp_path):
    write(tmp_path / "ds", range(12), hidden=True, shard_rows=40)
    return tmp_path / "ds"


def test_readable_with_pandas(sample):
    pd = pytest.importorskip("pandas")
    files = sorted(str(p) for p in sample.glob("*.parquet"))
    df = pd.read_parquet(files)
    assert len(df) == sum(seq_len(i) for i in range(12))
    row = df[(df.seq_id == 5) & (df.pos == 2)].iloc[0]
    assert np.array_equal(np.stack(row.experts), make_seq(5).experts[2])


def test_readable_with_duckdb(sample):
    duckdb = pytest.importorskip("duckdb")
    q = f"SELECT experts[2][1], logits[3], hidden FROM '{sample}/*.parquet' " \
        "WHERE seq_id = 7 AND pos = 4"
    (top, logits, hidden), = duckdb.sql(q).fetchall()
    s = make_seq(7)
    assert top == s.experts[4, 1, 0] and np.allclose(logits, s.logits[4, 2])
    assert len(hidden) == L and len(hidden[0]) == D
    (n,), = duckdb.sql(f"SELECT count(DISTINCT seq_id) FROM '{sample}/*.parquet'").fetchall()
    assert n == 12


def test_readable_with_hf_datasets(sample, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(sample / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == sum(seq_len(i) for i in range(12))
    ds = ds.with_format("numpy")
    assert ds[0:4]["experts"].shape == (4, L, K) and ds[0:4]["logits"].shape == (4, L, E)


def test_readable_with_polars(sample):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet(str(sample / "*.parquet"))
    assert df.height == sum(seq_len(i) for i in range(12))
    assert df["experts"].to_numpy().shape == (df.height, L, K)


# --- the shipped sample traces ------------------------------------------------------------


@pytest.mark.parametrize(("name", "hidden"),
                         [("tiny-mixtral", False), ("tiny-qwen3moe", False), ("tiny-olmoe", True)])
def test_shipped_sample_trace(name, hidden):
    path = REPO / "datasets" / "traces" / name
    if not (path / "_manifest.json").exists():
        pytest.skip(f"{path} not generated yet")
    ds = TraceDataset(path)
    ds.verify()
    assert ds.complete and ds.has_hidden == hidden and ds.n_rows > 1000
    splits = ds.to_numpy(["split", "domain", "phase"])
    assert set(splits["split"]) == {"train", "validation", "test"}
    assert set(splits["domain"]) == {"code", "prose"} and set(splits["phase"]) == {0, 1}
    model = REPO / ds.manifest["model"]["path"]
    if model.exists():  # a retrained model needs a regenerated sample (datasets/README.md)
        from expertpred.gguf.layout import file_sha256

        assert file_sha256(model) == ds.model.sha256, f"{path} was traced from another {model}"


# --- the directory as a Parquet dataset; the manifest's old name ----------------------------


def test_directory_reads_as_parquet_dataset(sample):
    """`_manifest.json` is a metadata file by the Hive convention, so tools read the dir."""
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    import pyarrow.dataset as pads

    rows = sum(seq_len(i) for i in range(12))
    assert (sample / "_manifest.json").is_file() and not (sample / "manifest.json").exists()
    assert len(pd.read_parquet(sample)) == rows
    assert pq.read_table(sample).num_rows == rows
    assert pads.dataset(sample, format="parquet").count_rows() == rows
    # polars lists every file of a directory unless told which prefix marks metadata
    assert pl.scan_parquet(sample, hidden_file_prefix="_").collect().height == rows


def test_legacy_manifest_name_is_read_and_moved_on_resume(tmp_path):
    out = tmp_path / "ds"
    write(out, range(6), shard_rows=40)
    (out / "_manifest.json").rename(out / "manifest.json")  # a dataset from before the rename
    ds = TraceDataset(out)
    ds.verify()
    assert ds.manifest_path.name == "manifest.json" and ds.seq_ids.tolist() == list(range(6))
    with TraceWriter(out, info(), shard_rows=40, resume=True) as w:
        assert w.done_seq_ids == frozenset(range(6))
        for i in range(6, 9):
            w.write(make_seq(i), split=split_of(i))
    assert sorted(p.name for p in out.glob("*.json")) == ["_manifest.json"]
    ds = TraceDataset(out)
    assert ds.seq_ids.tolist() == list(range(9))
    for s in ds.sequences(seq_ids=[2, 7]):
        assert_same(s, make_seq(s.seq_id))
