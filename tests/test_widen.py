"""`expertpred widen`: zero-padded experts give llama.cpp the same tokens with bigger experts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.gguf.layout import read_layout
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.gguf.widen import widen

REPO = Path(__file__).resolve().parents[1]
PROMPT = b"def read_config(path):\n    with open(path) as f:"
N_GEN = 16

SPECS = {
    "llama": SyntheticSpec(arch="llama", n_expert=8, n_expert_used=2),
    "qwen3moe": SyntheticSpec(arch="qwen3moe", n_expert=32, n_expert_used=4),
    "qwen2moe-shared": SyntheticSpec(arch="qwen2moe", n_expert=16, n_expert_used=4,
                                     n_ff_shexp=48),
}


def greedy(path: Path, n: int = N_GEN) -> tuple[list[int], np.ndarray]:
    """llama.cpp greedy continuation of PROMPT: (tokens, logits of every step)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                seed=0)
    try:
        llm.eval(llm.tokenize(PROMPT, add_bos=False))
        toks, logits = [], []
        for _ in range(n):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            logits.append(row)
            toks.append(int(row.argmax()))
            llm.eval([toks[-1]])
        return toks, np.stack(logits)
    finally:
        llm.close()


def assert_same_model(a: Path, b: Path) -> None:
    ta, la = greedy(a)
    tb, lb = greedy(b)
    assert ta == tb
    # Longer dot products change float summation order only: rounding-level differences.
    np.testing.assert_allclose(lb, la, rtol=0, atol=2e-3 * float(np.abs(la).max()))


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request, tmp_path_factory) -> tuple[Path, SyntheticSpec]:
    spec = SPECS[request.param]
    path = tmp_path_factory.mktemp("widen") / f"{request.param}.gguf"
    return write_random_moe(path, spec), spec


def test_widened_f32_is_the_same_model(model, tmp_path):
    path, spec = model
    res = widen(path, tmp_path / "w.gguf", ff=4 * spec.n_ff + 32, dtype="f32")
    before, after = read_layout(path), read_layout(res.path)
    assert res.plan.old_ff == spec.n_ff and res.plan.new_ff == 4 * spec.n_ff + 32
    assert after.bytes_per_expert() == res.plan.bytes_per_expert
    assert after.bytes_per_expert() > 4 * before.bytes_per_expert()
    assert (after.n_expert, after.moe_layers, after.parts) == (before.n_expert,
                                                                before.moe_layers, before.parts)
    assert after.shared_bytes == before.shared_bytes  # shared experts are not widened
    assert_same_model(path, res.path)


def test_padding_is_zeros_around_the_original_weights(model, tmp_path):
    path, spec = model
    res = widen(path, tmp_path / "w.gguf", ff=256, dtype="f32")
    src = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    out_reader = gguf.GGUFReader(str(res.path))
    out = {t.name: np.asarray(t.data) for t in out_reader.tensors}
    f = spec.n_ff
    for name, a in src.items():
        b = out[name]
        if "gate_exps" in name or "up_exps" in name:  # (E, ff, d): new rows
            assert b.shape == (a.shape[0], 256, a.shape[2])
            assert np.array_equal(b[:, :f], a) and not b[:, f:].any()
        elif "down_exps" in name:  # (E, d, ff): new columns
            assert b.shape == (a.shape[0], a.shape[1], 256)
            assert np.array_equal(b[:, :, :f], a) and not b[:, :, f:].any()
        else:
            assert np.array_equal(a, b), name
    # Every width key that described the experts now says 256 (llama reads
    # feed_forward_length, qwen*moe expert_feed_forward_length).
    src_fields = gguf.GGUFReader(str(path)).fields
    keys = [k for k in (f"{spec.arch}.feed_forward_length",
                        f"{spec.arch}.expert_feed_forward_length")
            if k in src_fields and src_fields[k].contents() == f]
    assert keys and all(out_reader.fields[k].contents() == 256 for k in keys)
    assert out_reader.fields["expertpred.widen.source_ff"].contents() == f


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_widened_matches_original_converted_to_same_dtype(tmp_path, dtype):
    """f16 / q8_0 / q4_0 change the outputs vs an f32 original; ff=original is the
    reference."""
    path = write_random_moe(tmp_path / "m.gguf", SPECS["llama"])
    ref = widen(path, tmp_path / "ref.gguf", ff=SPECS["llama"].n_ff, dtype=dtype)
    big = widen(path, tmp_path / "big.gguf", expert_mib=1, dtype=dtype)
    assert ref.plan.new_ff == ref.plan.old_ff
    assert big.plan.bytes_per_expert >= 1 << 20 > big.plan.bytes_per_expert - (64 << 10)
    assert read_layout(big.path).bytes_per_expert() == big.plan.bytes_per_expert
    assert_same_model(ref.path, big.path)


def test_total_gib_target_and_progress(tmp_path):
    path = write_random_moe(tmp_path / "m.gguf", SyntheticSpec(n_layer=2))
    seen: list[tuple[int, int]] = []
    res = widen(path, tmp_path / "w.gguf", total_gib=0.05, dtype="f16",
                progress=lambda done, total: seen.append((done, total)))
    assert 0.05 * 2**30 <= res.file_size < 0.06 * 2**30
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and seen[-1] == (res.plan.data_bytes, res.plan.data_bytes)


def test_failure_leaves_no_file(tmp_path):
    path = write_random_moe(tmp_path / "m.gguf", SyntheticSpec(n_layer=2))

    def boom(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        widen(path, tmp_path / "w.gguf", ff=2048, progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_streaming_keeps_memory_bounded(tmp_path):
    """A 600 MB widen completes inside a 256 MiB memory cgroup (page cache is reclaimable,
    anonymous memory is not: a widen that held the output in RAM would be OOM-killed).

    ru_maxrss is not used: it also counts clean file pages of mappings, which depend on what
    the page cache already holds."""
    from expertpred.lab import cgroup

    if not cgroup.available():
        pytest.skip(cgroup.why_unavailable() or "memory cgroup unavailable")
    path = write_random_moe(tmp_path / "m.gguf", SyntheticSpec(n_layer=2))
    code = ("from expertpred.gguf.widen import widen; "
            f"widen({str(path)!r}, {str(tmp_path / 'w.gguf')!r}, total_gib=0.56, dtype='f16')")
    with cgroup.MemoryCgroup("widen-test", 256 << 20) as cg:
        res = cg.run([sys.executable, "-c", code], timeout=300)
    assert not res.oom_killed and res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "w.gguf").stat().st_size > 0.55 * 2**30


BAD = {
    "dense": ({"ff": 256}, "dense model"),
    "unknown-dtype": ({"ff": 256, "dtype": "q4_k"}, "unknown dtype 'q4_k'"),
    "smaller-ff": ({"ff": 64}, "smaller than the original expert width 96"),
    "smaller-size": ({"expert_mib": 0.01}, "smaller than the original"),
    "q8-not-multiple": ({"ff": 100, "dtype": "q8_0"}, "multiples of 32"),
    "no-target": ({}, "exactly one of"),
    "two-targets": ({"ff": 256, "total_gib": 1.0}, "exactly one of"),
    "not-gguf": ({"ff": 256}, "not a GGUF"),
    "same-path": ({"ff": 256}, "output is the input"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line(tmp_path, case):
    kwargs, message = BAD[case]
    path = tmp_path / "m.gguf"
    if case == "dense":
        write_random_moe(path, SyntheticSpec(n_expert=0, n_layer=2))
    elif case == "not-gguf":
        path.write_text("hello\n")
    else:
        write_random_moe(path, SyntheticSpec(n_layer=2))
    out = path if case == "same-path" else tmp_path / "out.gguf"
    with pytest.raises(ExpertPredError) as err:
        widen(path, out, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() or case == "same-path"


def test_cli(tmp_path):
    path = write_random_moe(tmp_path / "m.gguf", SyntheticSpec(n_layer=2))
    run = [sys.executable, "-m", "expertpred.cli", "widen", "--model", str(path)]
    ok = subprocess.run(run + ["--out", str(tmp_path / "w.gguf"), "--expert-mib", "0.5"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "96 ->" in ok.stdout and read_layout(tmp_path / "w.gguf").bytes_per_expert() >= 2**19
    bad = subprocess.run(run + ["--out", str(tmp_path / "x.gguf"), "--ff", "8"],
                         capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and str(path) in lines[0]


@pytest.mark.parametrize("dtype", ["f32", "f16", "q4_0"])
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3moe", "tiny-olmoe"])
def test_shipped_model(tmp_path, name, dtype):
    path = REPO / "models" / name / "model.gguf"
    if not path.exists():
        pytest.skip(f"{path} not built yet")
    lay = read_layout(path)
    res = widen(path, tmp_path / "w.gguf", expert_mib=4 * lay.bytes_per_expert() / 2**20,
                dtype=dtype)
    assert read_layout(res.path).bytes_per_expert() >= 4 * lay.bytes_per_expert()
    ref = path if dtype == "f32" else widen(path, tmp_path / "ref.gguf", ff=res.plan.old_ff,
                                            dtype=dtype).path
    assert_same_model(ref, res.path)


def test_merged_gate_up_experts_pad_each_half(tmp_path):
    """ffn_gate_up_exps (E, 2ff, d) holds gate rows then up rows: each half is padded."""
    from expertpred.gguf.writer import byte_tokenizer, write_gguf

    e, ff, d = 4, 32, 64
    rng = np.random.default_rng(0)
    gate_up = rng.standard_normal((e, 2 * ff, d)).astype(np.float32)
    down = rng.standard_normal((e, d, ff)).astype(np.float32)
    bias = rng.standard_normal((e, 2 * ff)).astype(np.float32)
    hp = {"block_count": 1, "embedding_length": d, "feed_forward_length": ff,
          "expert_count": e, "expert_used_count": 2}
    path = write_gguf(tmp_path / "m.gguf", "llama", "merged", hp, {
        "blk.0.ffn_gate_inp.weight": rng.standard_normal((e, d)).astype(np.float32),
        "blk.0.ffn_gate_up_exps.weight": gate_up, "blk.0.ffn_gate_up_exps.bias": bias,
        "blk.0.ffn_down_exps.weight": down}, byte_tokenizer())
    res = widen(path, tmp_path / "w.gguf", ff=96, dtype="f32")
    out = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(res.path)).tensors}
    w, b = out["blk.0.ffn_gate_up_exps.weight"], out["blk.0.ffn_gate_up_exps.bias"]
    assert w.shape == (e, 192, d) and b.shape == (e, 192)
    assert np.array_equal(w[:, :ff], gate_up[:, :ff]) and not w[:, ff:96].any()
    assert np.array_equal(w[:, 96:96 + ff], gate_up[:, ff:]) and not w[:, 96 + ff:].any()
    assert np.array_equal(b[:, :ff], bias[:, :ff]) and not b[:, ff:96].any()
    assert np.array_equal(b[:, 96:96 + ff], bias[:, ff:]) and not b[:, 96 + ff:].any()
    assert out["blk.0.ffn_down_exps.weight"].shape == (e, d, 96)


def test_q4_0_layout_ranges_hold_each_experts_blocks(tmp_path):
    """Each expert's layout byte ranges are exactly its Q4_0 blocks: the source's values
    (to 4-bit precision) in the first rows / columns, zeros in the padding."""
    spec = SPECS["qwen3moe"]
    path = write_random_moe(tmp_path / "m.gguf", spec)
    res = widen(path, tmp_path / "w.gguf", ff=3 * spec.n_ff, dtype="q4_0")
    lay = read_layout(res.path)
    src = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    raw = res.path.read_bytes()
    q4 = gguf.GGMLQuantizationType.Q4_0
    n_ff, new_ff, d = spec.n_ff, res.plan.new_ff, spec.n_embd
    assert lay.bytes_per_expert() == res.plan.bytes_per_expert == 3 * d * new_ff // 32 * 18
    for layer in lay.moe_layers:
        for e in (0, lay.n_expert - 1):
            for s in lay.expert_slices(layer, e):
                w = gguf.quants.dequantize(
                    np.frombuffer(raw, np.uint8, s.nbytes, s.offset).reshape(-1, 18), q4)
                orig = np.asarray(src[f"blk.{layer}.{s.tensor}"].data[e], np.float32)
                if s.tensor.startswith("ffn_down"):  # (d, new_ff): columns padded
                    w = w.reshape(d, new_ff)
                    got, pad = w[:, :n_ff], w[:, n_ff:]
                else:  # (new_ff, d): rows padded
                    w = w.reshape(new_ff, d)
                    got, pad = w[:n_ff], w[n_ff:]
                assert not pad.any()
                tol = np.abs(orig).max() / 7
                np.testing.assert_allclose(got, orig, rtol=0, atol=tol)
