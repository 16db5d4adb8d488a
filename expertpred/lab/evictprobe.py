"""Print which eviction calls drop which pages on this machine (see ``eviction``).

    python -m expertpred.lab.evictprobe            # temporary files in /var/tmp
    python -m expertpred.lab.evictprobe MODEL.gguf --mib 16   # ranges of a clean file
    python -m expertpred.lab.evictprobe --pressure # + MADV_COLD under cgroup pressure

``--pressure`` (root, cgroup v1 memory controller) also shows what ``MADV_COLD`` does when
memory is short: a child process in a memory cgroup maps and touches two 32 MiB regions
(C, then A), optionally ``MADV_COLD``s A, then reads unmapped data (B) to force reclaim;
``mincore`` afterwards shows which region the kernel reclaimed first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..prefetch.eviction import EVICTORS, SITUATIONS, format_table, measure

CGROUP_V1 = Path("/sys/fs/cgroup/memory")

_PRESSURE_CHILD = """
import os, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
from expertpred.prefetch.sysmem import FileMapping, Madvice
path, advise, b_mib = sys.argv[2], sys.argv[3], int(sys.argv[4])
M = 1 << 20
C, A, B = (0, 32 * M), (32 * M, 32 * M), (64 * M, b_mib * M)
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
fm = FileMapping(path)
for _ in range(2):  # twice: both regions referenced (active)
    fm.touch(*C)
    fm.touch(*A)
if advise == "cold":
    fm.madvise(*A, Madvice.COLD)
for off in range(B[0], B[0] + B[1], 4 * M):
    os.pread(fd, 4 * M, off)
print(fm.mincore(*C).mean(), fm.mincore(*A).mean(), fm.mincore(*B).mean())
"""


def _tmp_file(mib: int) -> Path:
    path = Path(tempfile.mkdtemp(dir="/var/tmp")) / "probe.bin"
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    return path


def cold_under_pressure(limit_mib: int = 112, b_mibs: tuple[int, ...] = (32, 64)) -> list[str]:
    """Markdown rows: resident share of C / A / B after reclaim, with and without COLD."""
    group = CGROUP_V1 / f"expertpred-evictprobe-{os.getpid()}"
    path = _tmp_file(64 + max(b_mibs))
    group.mkdir()
    rows = ["| pressure (B read) | advice on A | C resident | A resident | B resident |",
            "| --- | --- | --- | --- | --- |"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
        for b in b_mibs:
            for advise in ("none", "cold"):
                out = subprocess.run(
                    [sys.executable, "-c", _PRESSURE_CHILD, str(group), str(path), advise,
                     str(b)], capture_output=True, text=True, check=True, env=env).stdout
                c, a, bb = (float(x) for x in out.split())
                rows.append(f"| {b} MiB | {advise} | {c:.2f} | {a:.2f} | {bb:.2f} |")
    finally:
        group.rmdir()
        path.unlink()
        path.parent.rmdir()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", help="a clean file to probe (default: a temporary one)")
    ap.add_argument("--mib", type=int, default=2, help="MiB per probe range")
    ap.add_argument("--pressure", action="store_true",
                    help="also measure MADV_COLD under memory-cgroup pressure (root)")
    args = ap.parse_args(argv)
    tmp = None
    path = args.file
    if path is None:
        tmp = _tmp_file(len(EVICTORS) * len(SITUATIONS) * args.mib)
        path = str(tmp)
    try:
        rows = measure(path, args.mib << 20)
    finally:
        if tmp is not None:
            tmp.unlink()
            tmp.parent.rmdir()
    print(f"kernel {os.uname().release}, {args.mib} MiB per cell, "
          "cell = share of resident pages dropped (before->after pages)")
    print(format_table(rows))
    if args.pressure:
        print()
        print("MADV_COLD under pressure: memory cgroup limit 112 MiB; C then A mapped and "
              "touched (32 MiB each), B read with pread")
        print("\n".join(cold_under_pressure()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
