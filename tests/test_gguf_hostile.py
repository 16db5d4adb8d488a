"""Hostile GGUF files: each defect class of the hostile-input issue, made by editing one
slot of a shipped model's header, gives one clean GGUFError line — quickly, without
parsing the tokenizer."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from expertpred.errors import GGUFError
from expertpred.gguf.layout import read_layout
from expertpred.lab.fuzz.gguf import header_slots
from expertpred.shipped import model_gguf

SEED = model_gguf("tiny-mixtral")
SLOTS, DATA_START = header_slots(SEED)


def _slot(label: str):
    return next(s for s in SLOTS if s.label == label)


def _edited(tmp_path: Path, label: str, value: int) -> Path:
    s = _slot(label)
    raw = bytearray(SEED.read_bytes())
    raw[s.offset:s.offset + s.width] = struct.pack({4: "<I", 8: "<Q"}[s.width], value)
    out = tmp_path / "edited.gguf"
    out.write_bytes(bytes(raw))
    return out


CASES = [  # (slot label, value, words the error must contain)
    ("llama.expert_used_count value", 0, "expert_used_count is 0, expected 1..8"),
    ("llama.expert_used_count value", 33, "expert_used_count is 33, expected 1..8"),
    ("llama.block_count value", 4, "belongs to block 4"),
    ("llama.embedding_length value", 128, "embedding_length=128"),
    ("tokenizer.ggml.merges count", 0, "GGUF"),  # the walk then misreads what follows
    ("tokenizer.ggml.merges count", 2**31, "claims 2147483648 items"),
    ("tokenizer.ggml.merges count", 2**64 - 1, "claims 18446744073709551615 items"),
    ("tokenizer.ggml.token_type count", 2**31, "claims 2147483648 items"),
    ("tokenizer.ggml.token_type count", 2**64 - 1, "items"),
    ("tensor blk.7.ffn_up_exps.weight offset", 0, "overlap"),
    ("tensor output.weight offset", 2**40, "truncated GGUF"),
    ("llama.expert_count value", 9, "expected"),
]


@pytest.mark.parametrize("label,value,words", CASES)
def test_inconsistent_header_is_one_clean_line(tmp_path, label, value, words):
    path = _edited(tmp_path, label, value)
    with pytest.raises(GGUFError) as info:
        read_layout(path)
    msg = str(info.value)
    assert words in msg and str(path) in msg and "\n" not in msg, msg


def test_non_utf8_architecture(tmp_path):
    s = _slot("general.architecture str bytes")
    raw = bytearray(SEED.read_bytes())
    raw[s.offset] = 0xFF
    path = tmp_path / "bad-arch.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="general.architecture.* is not UTF-8"):
        read_layout(path)


def test_untouched_models_read_as_before():
    for name in ("tiny-mixtral", "tiny-qwen3moe"):
        lay = read_layout(model_gguf(name))
        assert lay.moe_layers == tuple(range(8)) and lay.tensor_end <= lay.file_size


def test_inspect_prints_one_error_line_exit_2(tmp_path):
    path = _edited(tmp_path, "llama.expert_used_count value", 33)
    r = subprocess.run([sys.executable, "-m", "expertpred.cli", "inspect", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "expert_used_count is 33" in r.stderr
