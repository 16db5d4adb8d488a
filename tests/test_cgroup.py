"""The memory-cgroup harness, on the real cgroup v1 controller and real files."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.lab import cgroup
from expertpred.lab.cgroup import (
    MemoryCgroup,
    evict_file,
    get_swappiness,
    proc_io,
    residency,
    swappiness,
    why_unavailable,
)

REASON = why_unavailable()
needs_cgroup = pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup: {REASON}")

LIMIT = 64 << 20
TOUCH = r"""
import mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print(sum(m[i] for i in range(0, len(m), 4096)))
"""


def write_random(path: Path, nbytes: int) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(nbytes // (16 << 20)):
            f.write(rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    return write_random(tmp_path_factory.mktemp("cg") / "blob.bin", 4 * LIMIT)


@needs_cgroup
def test_child_mapping_more_than_the_limit_survives_and_counters_move(big_file):
    left = evict_file(big_file)  # pages cached earlier are charged elsewhere: start cold
    assert left.resident_bytes == 0
    with MemoryCgroup("touch", LIMIT) as cg:
        assert cg.path.is_dir() and int((cg.path / "memory.limit_in_bytes").read_text()) == LIMIT
        res = cg.run([sys.executable, "-c", TOUCH, str(big_file)], timeout=120)
        assert res.returncode == 0, res.stderr
        assert not res.oom_killed
        assert res.io.read_bytes >= 0.9 * big_file.stat().st_size  # really read from disk
        assert res.after.max_usage <= LIMIT < big_file.stat().st_size
        assert res.after["pgpgin"] > res.before["pgpgin"]
        assert res.after["cache"] <= LIMIT
        path = cg.path
    assert not path.exists()  # removed on exit
    assert residency(big_file).resident_bytes <= LIMIT  # reclaimed inside the group


@needs_cgroup
def test_anonymous_memory_over_the_limit_is_oom_killed():
    with MemoryCgroup("oom", LIMIT) as cg:
        res = cg.run([sys.executable, "-c", "b = b'x' * (4 * 64 << 20); print(len(b))"],
                     timeout=120)
    assert res.returncode == -9 and res.oom_killed
    assert res.after.failcnt >= 0 and res.after.oom_kills == res.before.oom_kills + 1


@needs_cgroup
def test_group_with_a_running_child_is_removed_and_the_child_survives():
    with MemoryCgroup("sleeper", LIMIT) as cg:
        proc = cg.popen(["sleep", "30"])
        try:
            for _ in range(1000):  # the wrapper shell joins the group before it execs
                if proc.pid in cg.pids():
                    break
                time.sleep(0.01)
            assert proc.pid in cg.pids()
            path = cg.path
        except BaseException:
            proc.kill()
            raise
    try:
        assert not path.exists()
        assert proc.poll() is None  # moved back to our own group, still running
    finally:
        proc.kill()
        proc.wait()


@needs_cgroup
def test_timeout_kills_the_child_and_removes_the_group():
    with MemoryCgroup("timeout", LIMIT) as cg:
        with pytest.raises(subprocess.TimeoutExpired):
            cg.run(["sleep", "30"], timeout=0.3)
        assert cg.pids() == []
        path = cg.path
    assert not path.exists()


@needs_cgroup
def test_swappiness_is_restored_even_on_exception():
    original = get_swappiness()
    new = 10 if original != 10 else 20
    with pytest.raises(RuntimeError):
        with swappiness(new) as seen:
            assert seen == original and get_swappiness() == new
            raise RuntimeError("boom")
    assert get_swappiness() == original
    with swappiness() as seen:  # guard only: a change inside is undone too
        cgroup._set_swappiness(new)
    assert get_swappiness() == original == seen


def test_swappiness_out_of_range():
    with pytest.raises(ExpertPredError, match="expected 0..200"):
        with swappiness(500):
            pass


def test_evict_file_drops_an_unmapped_files_pages(tmp_path):
    path = write_random(tmp_path / "f.bin", 32 << 20)
    path.read_bytes()
    assert residency(path).fraction > 0.9
    left = evict_file(path)
    assert left.resident_bytes == 0 and left.file_bytes == 32 << 20


def test_evict_file_cannot_drop_pages_a_process_has_mapped(tmp_path):
    path = write_random(tmp_path / "f.bin", 16 << 20)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        sum(m[i] for i in range(0, len(m), 4096))  # fault every page into this mapping
        assert evict_file(path).fraction > 0.9
    assert evict_file(path).resident_bytes == 0  # unmapped: now they go


def test_proc_io_of_this_process(tmp_path):
    path = write_random(tmp_path / "f.bin", 16 << 20)
    evict_file(path)
    before = proc_io()
    path.read_bytes()
    delta = proc_io() - before
    assert delta.rchar >= 16 << 20 and delta.read_bytes >= 15 << 20


def test_unavailable_controller_is_one_line(tmp_path):
    reason = why_unavailable(tmp_path) if os.geteuid() == 0 else why_unavailable()
    assert reason is not None and "\n" not in reason
    with pytest.raises(ExpertPredError) as err:
        with MemoryCgroup("x", LIMIT, root=tmp_path):
            pass
    assert str(err.value) == why_unavailable(tmp_path)
    with pytest.raises(ExpertPredError, match="not open"):
        MemoryCgroup("x", LIMIT).path


def test_not_root_is_reported(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert why_unavailable() == "memory cgroups need root (running as uid 1000)"
    with pytest.raises(ExpertPredError, match="need root"):
        MemoryCgroup("x", LIMIT).open()
