"""The GGUF layout module: byte ranges of every expert, checked against gguf.GGUFReader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from expertpred.errors import GGUFError
from expertpred.gguf.layout import read_layout
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe

SPECS = {
    "llama": SyntheticSpec(arch="llama", n_expert=8, n_expert_used=2),
    "qwen2moe-shared": SyntheticSpec(arch="qwen2moe", n_expert=16, n_expert_used=4, n_ff_shexp=48),
    "qwen3moe-f16": SyntheticSpec(arch="qwen3moe", n_expert=32, n_expert_used=4, dtype="f16"),
    "olmoe": SyntheticSpec(arch="olmoe", n_expert=16, n_expert_used=4),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request, tmp_path_factory) -> tuple[Path, SyntheticSpec]:
    spec = SPECS[request.param]
    path = tmp_path_factory.mktemp("layout") / f"{request.param}.gguf"
    return write_random_moe(path, spec), spec


def test_every_expert_range_matches_reader_data(model):
    path, spec = model
    lay = read_layout(path)
    assert (lay.arch, lay.n_expert, lay.n_expert_used) == (spec.arch, spec.n_expert,
                                                            spec.n_expert_used)
    assert lay.moe_layers == tuple(range(spec.n_layer))
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    raw = path.read_bytes()
    for layer in lay.moe_layers:
        for e in range(lay.n_expert):
            slices = lay.expert_slices(layer, e)
            assert len(slices) == len(lay.parts) == 3
            for s in slices:
                ref = np.asarray(tensors[f"blk.{layer}.{s.tensor}"].data)[e]  # outer dim = expert
                assert s.nbytes == ref.nbytes
                assert raw[s.offset:s.offset + s.nbytes] == ref.tobytes()


def test_ranges_do_not_overlap_and_sum_to_expert_bytes(model):
    path, _ = model
    lay = read_layout(path)
    starts = lay.offsets.ravel()
    order = np.argsort(starts)
    ends = (lay.offsets + lay.nbytes).ravel()[order]
    assert np.all(ends[:-1] <= starts[order][1:])
    assert lay.expert_bytes == int(lay.nbytes.sum())
    assert 0 < lay.expert_bytes < lay.file_size


def test_router_and_shared_experts_reported(model):
    path, spec = model
    lay = read_layout(path)
    assert sorted(lay.routers) == list(range(spec.n_layer))
    names = {t.name for ts in lay.routers.values() for t in ts}
    assert "blk.0.ffn_gate_inp.weight" in names
    if spec.n_ff_shexp:
        shared = {t.name for t in lay.shared[0]}
        assert {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight",
                "blk.0.ffn_down_shexp.weight", "blk.0.ffn_gate_inp_shexp.weight"} <= shared
        assert lay.shared_bytes > 0
    else:
        assert lay.shared == {}


def test_bad_inputs_raise_one_line_errors(tmp_path):
    good = write_random_moe(tmp_path / "m.gguf", SyntheticSpec(n_layer=2))
    dense = write_random_moe(tmp_path / "dense.gguf", SyntheticSpec(n_expert=0, n_layer=2))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(good.read_bytes()[:200])
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(good.read_bytes()[:-1000])
    cases = {
        tmp_path / "missing.gguf": "no such file",
        text: "not a GGUF file",
        dense: "dense model",
        cut_header: "truncated",
        cut_data: "truncated",
    }
    for path, expected in cases.items():
        with pytest.raises(GGUFError) as info:
            read_layout(path)
        msg = str(info.value)
        assert expected in msg and str(path) in msg and "\n" not in msg
