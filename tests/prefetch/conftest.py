"""Shared fixtures for the prefetch tests: a real ~27 MB random GGUF on disk, made cold."""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from expertpred.gguf.layout import MoELayout, read_layout
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.prefetch.sysmem import FileMapping

# 4 layers x 8 experts x 768 KiB (f16): 24 MiB of experts, 27 MB file.
SPEC = SyntheticSpec(arch="llama", n_layer=4, n_embd=256, n_ff=512, n_expert=8,
                     n_expert_used=2, dtype="f16")


def make_cold(path: Path) -> None:
    """Write back and drop ``path`` from the page cache (no one maps it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def expert_ranges(layout: MoELayout, layer: int, expert: int) -> list[tuple[int, int]]:
    return [(s.offset, s.nbytes) for s in layout.expert_slices(layer, expert)]


def inner_resident(fm: FileMapping, layout: MoELayout, layer: int, expert: int) -> float:
    """Resident share of the pages fully inside the expert's ranges (neighbours excluded)."""
    ps = os.sysconf("SC_PAGE_SIZE")
    hit = total = 0
    for off, n in expert_ranges(layout, layer, expert):
        start = -(-off // ps) * ps
        end = (off + n) // ps * ps
        v = fm.mincore(start, end - start)
        hit += int(v.sum())
        total += v.size
    return hit / total


def wait_resident(fm: FileMapping, layout: MoELayout, keys, timeout: float = 10.0) -> float:
    """Poll mincore until every key's inner pages are resident; returns the lowest share."""
    deadline = time.monotonic() + timeout
    while True:
        low = min(inner_resident(fm, layout, layer, e) for layer, e in keys)
        if low >= 1.0 or time.monotonic() > deadline:
            return low
        time.sleep(0.005)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    return write_random_moe(tmp_path_factory.mktemp("prefetch") / "model.gguf", SPEC)


@pytest.fixture(scope="session")
def layout(model_file) -> MoELayout:
    return read_layout(model_file)


@pytest.fixture
def cold_model(model_file) -> Path:
    # a hint issued by an earlier test may still be reading: pages under I/O cannot be
    # dropped until it completes, so evict again until the file is cold (bounded). An
    # earlier test's engine or mapping that only a reference cycle keeps alive still maps
    # the file, and mapped pages cannot be dropped: collect it first (seen once in CI)
    deadline = time.monotonic() + 10.0
    with FileMapping(model_file) as fm:
        while True:
            gc.collect()
            make_cold(model_file)
            if not fm.mincore().any() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not fm.mincore().any(), "page cache not emptied"
    return model_file


@pytest.fixture
def model_copy(model_file, tmp_path) -> Path:
    """A private, cold copy (for tests that truncate or replace the file)."""
    dst = tmp_path / "copy.gguf"
    shutil.copyfile(model_file, dst)
    make_cold(dst)
    return dst


def assert_reuse_online_equals_offline(model, ex: np.ndarray, ids: np.ndarray) -> None:
    """The policy's online ``NextUseState.log_dist`` equals the offline ``predict_reuse`` of
    the same sequence, bit for bit, after every routing and after every boundary."""
    routed, told = model.predict_reuse(ex, ids)
    st = model.online()
    for t in range(len(ex)):
        st.begin_token(int(ids[t]))
        if t:
            np.testing.assert_array_equal(st.log_dist, told[t - 1])
        for j in range(ex.shape[1]):
            st.observe(j, ex[t, j])
            np.testing.assert_array_equal(st.log_dist[j], routed[t, j])
