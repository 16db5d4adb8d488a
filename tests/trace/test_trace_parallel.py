"""`expertpred trace --workers N`: real llama.cpp processes on the shipped tiny-mixtral.

Parallel tracing must write the very sequences a serial run writes (seq ids, prompt ids,
tokens, experts, weights, logits), also after a SIGKILL of a worker or of the parent and a
``--resume``; bad ``--workers`` values are one error line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from expertpred.trace.dataset import TraceDataset
from expertpred.trace.run import TraceRunConfig, trace_prompts

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tiny-mixtral" / "model.gguf"
PROMPTS = REPO / "datasets" / "prompts" / "heldout.jsonl"
N_PROMPTS = 12
FIELDS = ("tokens", "phase", "experts", "weights", "logits")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "expertpred.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def base_args(out: Path, *extra: str) -> list[str]:
    return ["trace", "--model", str(MODEL), "--prompts", str(PROMPTS), "--out", str(out),
            "--limit", str(N_PROMPTS), "--max-tokens", "6", "--shard-rows", "60",
            "--threads", "2", *extra]


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[int, object]:
    """The reference: the same prompts traced serially, in this process, with one thread
    (the workers below get one each of --threads 2; a thread count never changes a value,
    since ggml computes each output element on one thread)."""
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("serial") / "ds"
    trace_prompts(TraceRunConfig(model=MODEL, prompts=PROMPTS, out=out, limit=N_PROMPTS,
                                 max_tokens=6, shard_rows=60, threads=1))
    return by_seq(TraceDataset(out))


def by_seq(ds: TraceDataset) -> dict[int, object]:
    info = {r["seq_id"]: r for r in ds.sequence_info()}
    return {s.seq_id: (s, info[s.seq_id]) for s in ds.sequences()}


def assert_same(got: dict[int, object], want: dict[int, object]) -> None:
    """Sequence by sequence: same seq ids, prompt ids, metadata and every routing array."""
    assert sorted(got) == sorted(want)
    for i, (s, info) in want.items():
        g, ginfo = got[i]
        assert (g.prompt_id, g.domain, g.text) == (s.prompt_id, s.domain, s.text), i
        assert ginfo == info, i
        for f in FIELDS:
            assert np.array_equal(getattr(g, f), getattr(s, f)), (i, f)


def worker_pids(pid: int) -> list[int]:
    """The spawned worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in path.read_text().split()] if path.exists() else []
    out = []
    for k in kids:
        try:
            if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                out.append(k)
        except FileNotFoundError:
            pass
    return out


def start_and_wait_for_worker_shard(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start a 2-worker trace; return once a worker has renamed a finished shard into place
    (polling the directory), with the workers' pids."""
    proc = subprocess.Popen(cli(*base_args(out, "--workers", "2")), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(out.glob("shard-w*-*.parquet")):
            break
        time.sleep(0.005)
    workers = worker_pids(proc.pid) if proc.poll() is None else []
    if len(workers) != 2:
        proc.kill()
        proc.wait(10)
        pytest.skip("the trace ended before a worker could be killed (machine too fast)")
    return proc, workers


def resume_and_check(out: Path, serial: dict[int, object]) -> None:
    res = subprocess.run(cli(*base_args(out, "--workers", "2", "--resume")), env=env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    ds = TraceDataset(out)
    ds.verify()
    assert ds.complete and ds.seq_ids.tolist() == list(range(N_PROMPTS))  # no duplicates
    assert not list(out.glob("*.tmp"))
    assert_same(by_seq(ds), serial)


def test_two_workers_equal_serial(tmp_path, serial):
    out = tmp_path / "par"
    res = subprocess.run(cli(*base_args(out, "--workers", "2")), env=env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    ds = TraceDataset(out)
    ds.verify()
    assert ds.complete
    names = [s.name for s in ds.shards]
    assert {n[:10] for n in names} == {"shard-w00-", "shard-w01-"}  # named per worker
    # contiguous chunks + worker-first names: sequences are listed in seq_id order
    assert [s.seq_id for s in ds.sequences()] == list(range(N_PROMPTS))
    assert_same(by_seq(ds), serial)


def test_sigkill_of_a_worker_then_resume_is_exact(tmp_path, serial):
    out = tmp_path / "par"
    proc, workers = start_and_wait_for_worker_shard(out)
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "trace worker" in lines[0] and "--resume" in lines[0], err
    ds = TraceDataset(out)
    ds.verify()
    assert not ds.complete and ds.n_sequences < N_PROMPTS
    resume_and_check(out, serial)


def test_sigkill_of_the_parent_then_resume_is_exact(tmp_path, serial):
    out = tmp_path / "par"
    proc, workers = start_and_wait_for_worker_shard(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 30  # the workers die with their parent (PDEATHSIG)
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() and
                                              "Z" not in _state(w) for w in workers):
        time.sleep(0.01)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
    resume_and_check(out, serial)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return "Z"


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_workers_value_is_one_error_line(tmp_path, value):
    res = subprocess.run(cli(*base_args(tmp_path / "o", "--workers", value)), env=env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--workers" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_workers_config_below_one_is_refused():
    from expertpred.errors import ExpertPredError

    with pytest.raises(ExpertPredError, match="workers=0"):
        TraceRunConfig(model=MODEL, prompts=PROMPTS, out=Path("x"), workers=0)
