"""Cost of checking every shard's sha256 on read, side by side in one run.

    python benchmarks/trace_read_hash.py --rounds 5

For each shipped trace dataset, alternately reads every column (``to_numpy``) with the
check (bytes read once, each chunk hashed as it is read) and with the same read minus
the hash, and prints per round the wall and CPU times (CPU of all threads: the
hash's real cost when no core is idle; wall: what a user waits) and their ratios, then
medians and ranges. After the first round the bytes come from the page cache, where the
check's share is largest (a cold read adds the same I/O time to both).

Each round also times ``hashlib.sha256`` alone over the same shard bytes (already in memory)
and prints the floor ``1 + sha256 CPU / read-without-hash CPU``: no way of scheduling the
hash can bring the CPU ratio below it; only a cheaper hash per byte or a costlier read can.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path
from unittest import mock

from expertpred.shipped import repo_root
from expertpred.trace import validate
from expertpred.trace.dataset import TraceDataset


class _NoHash:
    """Stands in for hashlib in the reader: the same read, no hashing."""

    @staticmethod
    def sha256() -> _NoHash:
        return _NoHash()

    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _time_read(path: Path, hashed: bool) -> tuple[float, float]:
    """(wall s, CPU s of all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if hashed:
        TraceDataset(path).to_numpy()
    else:
        with mock.patch.object(validate, "hashlib", _NoHash), \
                mock.patch.object(validate.ShardBytes, "check", lambda self: None):
            TraceDataset(path).to_numpy()
    return time.perf_counter() - t0, time.process_time() - c0


def _time_sha256(blobs: list[bytes]) -> float:
    """CPU s of sha256 over the shards' bytes alone: the check's irreducible cost."""
    c0 = time.process_time()
    for b in blobs:
        hashlib.sha256(b).hexdigest()
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    for name in ("tiny-mixtral", "tiny-qwen3moe"):
        path = repo_root() / "datasets" / "traces" / name
        _time_read(path, True)  # warm: imports and page cache
        blobs = [(path / s.name).read_bytes() for s in TraceDataset(path).shards]
        walls, cpus, floors = [], [], []
        for r in range(a.rounds):
            first = r % 2 == 0  # alternate the order: drift hits both sides
            t1 = _time_read(path, first)
            t2 = _time_read(path, not first)
            (w_h, c_h), (w_p, c_p) = (t1, t2) if first else (t2, t1)
            c_s = _time_sha256(blobs)
            walls.append(w_h / w_p)
            cpus.append(c_h / c_p)
            floors.append(1 + c_s / c_p)
            print(f"{name} round {r + 1}: wall {1e3 * w_h:.0f} vs {1e3 * w_p:.0f} ms "
                  f"(ratio {w_h / w_p:.3f}), CPU {1e3 * c_h:.0f} vs {1e3 * c_p:.0f} ms "
                  f"(ratio {c_h / c_p:.3f}); sha256 alone {1e3 * c_s:.1f} ms CPU over "
                  f"{sum(map(len, blobs)) / 1e6:.1f} MB (floor {1 + c_s / c_p:.3f})")
        for what, rs in (("wall ratio with/without sha256", walls),
                         ("CPU ratio with/without sha256", cpus),
                         ("CPU floor 1 + sha256 alone / read without", floors)):
            print(f"{name}: {what}: median "
                  f"{statistics.median(rs):.3f} (range {min(rs):.3f}-{max(rs):.3f}) over "
                  f"{a.rounds} rounds")


if __name__ == "__main__":
    main()
