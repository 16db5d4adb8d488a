"""Empty and degenerate inputs through the real CLI and llama.cpp: each gives one clean
``error:`` line (exit 2) or a correct result — never a traceback, an abort or a wrong count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertpred.gguf.layout import read_layout
from expertpred.gguf.random_models import SyntheticSpec, _hparams, _weights, write_random_moe
from expertpred.gguf.writer import byte_tokenizer, write_gguf
from expertpred.shipped import model_gguf

MODEL = model_gguf("tiny-mixtral")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertpred.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_empty_prompt_is_refused():
    assert_one_error(cli("run", "--model", str(MODEL), "--prompt", ""), "no tokens")


def test_prompt_longer_than_context_is_refused():
    assert_one_error(cli("run", "--model", str(MODEL), "--prompt", "word " * 40, "--n-ctx", "8"),
                     "n_ctx=8")


def test_generation_stops_at_a_full_context():
    r = cli("run", "--model", str(MODEL), "--prompt", "hello world", "--n-ctx", "8",
            "--max-tokens", "50", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_prompt"] + len(out["generated"]) <= 8 + 1  # the last token needs no eval
    assert len(out["generated"]) < 50


@pytest.mark.parametrize("args,words", [
    (["--lookahead", "99"], "mode 'd0' does not look ahead"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--n-ctx", "2"], "--n-ctx"),
])
def test_run_option_errors_are_one_line(args, words):
    assert_one_error(cli("run", "--model", str(MODEL), "--prompt", "hi", *args), words)


def test_export_offsets_not_integers(tmp_path):
    assert_one_error(cli("export", "--predictor", str(tmp_path), "--out", str(tmp_path / "x"),
                         "--offsets", "0,x"), "--offsets")


def test_one_moe_layer_model_traces_and_runs(tmp_path):
    path = write_random_moe(tmp_path / "one.gguf", SyntheticSpec(n_layer=1))
    assert read_layout(path).moe_layers == (0,)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    r = cli("trace", "--model", str(path), "--prompts", str(prompts), "--out",
            str(tmp_path / "ds"), "--max-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    from expertpred.trace.dataset import TraceDataset

    experts = TraceDataset(tmp_path / "ds").to_numpy(["experts"])["experts"]
    assert experts.shape[1:] == (1, 2) and experts.max() < 8
    r = cli("run", "--model", str(path), "--prompt", "hello", "--max-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr[-2000:]


def _dense_first_layer(path: Path) -> Path:
    """DeepSeek-style first_k_dense_replace=1: block 0 has a dense FFN, blocks 1.. experts."""
    spec = SyntheticSpec(n_layer=3)
    t = {k: v for k, v in _weights(spec).items()
         if not (k.startswith("blk.0.ffn_") and k != "blk.0.ffn_norm.weight")}
    rng = np.random.default_rng(0)
    d, f = spec.n_embd, spec.n_ff
    t["blk.0.ffn_gate.weight"] = (0.1 * rng.standard_normal((f, d))).astype(np.float32)
    t["blk.0.ffn_up.weight"] = (0.1 * rng.standard_normal((f, d))).astype(np.float32)
    t["blk.0.ffn_down.weight"] = (0.1 * rng.standard_normal((d, f))).astype(np.float32)
    return write_gguf(path, "llama", "dense-first", _hparams(spec), t, byte_tokenizer())


def test_dense_first_layer(tmp_path):
    """The layout maps MoE layers to blocks (1, 2); llama.cpp's llama arch needs experts in
    every block and refuses the file: one error line, and the failed trace leaves nothing
    that blocks a rerun into the same directory with a good model."""
    path = _dense_first_layer(tmp_path / "dense0.gguf")
    lay = read_layout(path)
    assert lay.moe_layers == (1, 2) and lay.n_layer == 3
    assert_one_error(cli("run", "--model", str(path), "--prompt", "hi"), "failed to load")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    out = tmp_path / "ds"
    assert_one_error(cli("trace", "--model", str(path), "--prompts", str(prompts), "--out",
                         str(out), "--max-tokens", "2"), "failed to load")
    r = cli("trace", "--model", str(MODEL), "--prompts", str(prompts), "--out", str(out),
            "--max-tokens", "2")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("mode", ["d0", "off"])
def test_run_counters_add_up(mode):
    """The engine's ledgers (prefetch/jobs.py) hold in what `run --json` prints: every
    request, job, use, speculative job and byte is accounted exactly once."""
    r = cli("run", "--model", str(MODEL), "--prompt", "def f(x):", "--max-tokens", "8",
            "--mode", mode, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    if mode == "off":
        assert not any(k.startswith("engine_") for k in s)
        return

    def c(k: str) -> int:  # a counter the engine no longer keeps counts as 0
        return int(s.get(f"engine_{k}", 0))

    assert c("requests") > 0 and c("issued") > 0

    assert c("requests") == sum(c(k) for k in (
        "issued", "coalesced", "cached", "refused_stale", "refused_failed",
        "refused_disabled", "refused_full", "invalid"))
    assert c("issued") == sum(c(k) for k in (
        "completed", "failed", "cancelled", "dropped_stale", "dropped_full",
        "dropped_disabled", "pending"))
    assert c("uses") == c("hits") + c("late") + c("misses") > 0
    assert c("spec_issued") == c("spec_used") + c("spec_unused") + c("spec_pending")
    assert c("spec_unused") <= c("spec_issued") <= c("issued")
    assert c("bytes_read") == c("demand_bytes") + c("spec_bytes")
    assert c("wasted_bytes") <= c("spec_bytes")
