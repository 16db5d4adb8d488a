"""`expertpred inspect`: summary on a MoE GGUF; one error line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from expertpred.gguf.random_models import SyntheticSpec, write_random_moe


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "expertpred.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_inspect_prints_summary(tmp_path):
    path = write_random_moe(tmp_path / "m.gguf", SyntheticSpec(arch="qwen2moe", n_expert=16,
                                                               n_expert_used=4, n_ff_shexp=32))
    out = run("inspect", "--json", str(path))
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert (s["arch"], s["n_expert"], s["n_expert_used"], s["moe_layers"]) == ("qwen2moe", 16, 4, 4)
    assert 0 < s["expert_share"] < 1 and s["shared_expert_bytes"] > 0
    table = run("inspect", str(path))
    assert table.returncode == 0 and "bytes per expert" in table.stdout


@pytest.mark.parametrize("kind", ["missing", "not-gguf", "truncated", "dense"])
def test_inspect_bad_input(tmp_path, kind):
    good = write_random_moe(tmp_path / "good.gguf", SyntheticSpec(n_layer=2))
    path = tmp_path / f"{kind}.gguf"
    if kind == "not-gguf":
        path.write_text("just text\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "dense":
        write_random_moe(path, SyntheticSpec(n_expert=0, n_layer=2))
    out = run("inspect", str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
