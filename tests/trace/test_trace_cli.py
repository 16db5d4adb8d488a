"""`expertpred trace`: end to end on a random-weight GGUF, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.trace.dataset import TraceDataset

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "validation", "test")


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "expertpred.cli", *args]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def run_here(monkeypatch, capsys):
    """Run the CLI in this process (saves ~2 s of imports per call): (exit code, out, err)."""
    from expertpred.cli import main

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "argv", ["expertpred", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return call


def one_error_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    return write_random_moe(d / "moe.gguf", SyntheticSpec(n_layer=3, n_expert=8,
                                                          n_expert_used=2, seed=1))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = [{"id": f"q{i}", "domain": ("code", "prose")[i % 2], "split": SPLITS[i % 3],
             "text": f"def f{i}(x):\n    return x * {i}\n" if i % 2 == 0
             else f"The {i}th sentence is about routing."} for i in range(40)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_non_moe_model_is_one_line_error(tmp_path, prompts, run_here):
    dense = write_random_moe(tmp_path / "dense.gguf", SyntheticSpec(n_expert=0, n_layer=2))
    res = run_here("trace", "--model", str(dense), "--prompts", str(prompts),
              "--out", str(tmp_path / "out"))
    one_error_line(res, str(dense), "dense")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ('{"text": "ok"}\n{"text": \n', "p.jsonl:2: malformed JSON"),
    ('{"id": "a"}\n', 'no "text" field'),
])
def test_bad_prompt_file_is_one_line_error(tmp_path, model, content, needle, run_here):
    p = tmp_path / "p.jsonl"
    if content is not None:
        p.write_text(content)
    res = run_here("trace", "--model", str(model), "--prompts", str(p),
                   "--out", str(tmp_path / "o"))
    one_error_line(res, str(p), needle)


def test_empty_selection_is_one_line_error(tmp_path, model, prompts, run_here):
    res = run_here("trace", "--model", str(model), "--prompts", str(prompts), "--split", "dev",
              "--out", str(tmp_path / "o"))
    one_error_line(res, "split 'dev'")


# --- with the llama.cpp tracer ----------------------------------------------------------


@pytest.fixture(scope="module")
def tracer_available() -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("expertpred.trace.llama_tracer")


def test_trace_end_to_end_and_resume(tmp_path, model, prompts, tracer_available, run_here):
    out = tmp_path / "ds"
    base = ("trace", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
            "--max-tokens", "4", "--shard-rows", "40", "--threads", "1")
    res = run(*base, "--limit", "6")
    assert res.returncode == 0, res.stderr
    for word in ("sequences", "tokens", "shards", "bytes / token / layer", "wall time"):
        assert word in res.stdout
    ds = TraceDataset(out)
    ds.verify()
    assert ds.complete and ds.seq_ids.tolist() == list(range(6))
    m = ds.manifest
    assert m["model"]["n_expert"] == 8 and m["model"]["moe_layers"] == [0, 1, 2]
    assert m["prompts"]["n_prompts"] == 40 and m["prompts"]["n_selected"] == 6
    assert m["decoding"]["mode"] == "greedy" and m["decoding"]["max_tokens"] == 4
    for s in ds.sequences():
        n_decode = int((s.phase == 1).sum())
        assert 1 <= n_decode <= 4 and s.phase[0] == 0
        assert s.experts.shape == (s.n_tokens, 3, 2) and s.logits.shape == (s.n_tokens, 3, 8)
        assert s.experts.max() < 8 and s.prompt_id == f"q{s.seq_id}"
    info = {r["seq_id"]: r for r in ds.sequence_info()}
    assert info[4]["split"] == "validation" and info[4]["domain"] == "code"

    one_error_line(run_here(*base, "--limit", "6"), str(out), "--resume")
    res = run(*base, "--limit", "9", "--resume")
    assert res.returncode == 0, res.stderr
    assert "6 of 9 selected prompts already traced" in res.stdout
    ds = TraceDataset(out)
    assert ds.seq_ids.tolist() == list(range(9))
    other = write_random_moe(tmp_path / "other.gguf", SyntheticSpec(n_layer=3, seed=2))
    one_error_line(run_here("trace", "--model", str(other), "--prompts", str(prompts), "--out",
                            str(out), "--resume"), str(out), "another model")


def test_trace_split_domain_filters(tmp_path, model, prompts, tracer_available):
    out = tmp_path / "ds"
    res = run("trace", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
              "--split", "test", "--domain", "prose", "--max-tokens", "2", "--threads", "1")
    assert res.returncode == 0, res.stderr
    ds = TraceDataset(out)
    want = [i for i in range(40) if SPLITS[i % 3] == "test" and i % 2 == 1]
    assert ds.seq_ids.tolist() == want
    assert set(ds.to_numpy(["split"])["split"]) == {"test"}


def test_trace_sigkill_then_resume_gives_exact_seq_ids(tmp_path, model, prompts,
                                                       tracer_available):
    out = tmp_path / "ds"
    base = ("trace", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
            "--max-tokens", "8", "--shard-rows", "30", "--threads", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd(*base), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads((out / "_manifest.json").read_text())["shards"]) >= 2:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.01)
        if proc.poll() is not None:
            pytest.skip("trace finished before it could be killed (machine too fast)")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ds = TraceDataset(out)
    ds.verify()
    assert not ds.complete and 0 < ds.n_sequences < 40
    res = run(*base, "--resume")
    assert res.returncode == 0, res.stderr
    ds = TraceDataset(out)
    ds.verify()
    assert ds.complete and ds.seq_ids.tolist() == list(range(40))  # exact, no duplicates
    assert not list(out.glob("*.tmp"))


def test_trace_disk_full_is_one_line_error(tmp_path, model, prompts, tracer_available):
    """A real full disk (a 96 KiB tmpfs): one error line naming the directory, no tmp left."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "ds"
        res = run("trace", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                  "--max-tokens", "16", "--shard-rows", "40", "--threads", "1")
        one_error_line(res, str(out), "disk full")
        assert not list(out.glob("*.tmp"))
        ds = TraceDataset(out)
        ds.verify()
        assert 0 < ds.n_sequences < 40
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
