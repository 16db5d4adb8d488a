"""CPU cost of evicting cached, mapped file pages, per eviction advice.

The residency manager evicts an expert by advising every mapping of the model that holds
its pages, then ``POSIX_FADV_DONTNEED``. This maps a file, faults ``--ranges`` ranges of
``--mib`` MiB in (reading one byte per page), and times each advice on them:

    python benchmarks/evict_cost.py --file model.gguf --ranges 60 --mib 1
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import time

import numpy as np

from expertpred.prefetch.sysmem import Madvice

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", required=True, help="a file of at least ranges x 4 x mib")
    ap.add_argument("--ranges", type=int, default=60)
    ap.add_argument("--mib", type=float, default=1.0)
    a = ap.parse_args()
    n = int(a.mib * 2**20) // 4096 * 4096
    fd = os.open(a.file, os.O_RDONLY)
    size = os.fstat(fd).st_size
    if a.ranges * 4 * n > size:
        raise SystemExit(f"error: {a.file}: {size} bytes, expected >= {a.ranges * 4 * n}")
    offsets = [i * 4 * n for i in range(a.ranges)]
    with open(a.file, "rb") as f:
        for advice in (Madvice.PAGEOUT, Madvice.DONTNEED, Madvice.COLD):
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
            view = np.frombuffer(mm, np.uint8)
            adv, fad = [], []
            for off in offsets:
                int(view[off:off + n:4096].sum())  # fault the pages in: mapped and cached
                t0 = time.thread_time()
                mapping_advise(view, off, n, advice)
                t1 = time.thread_time()
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
                adv.append(t1 - t0)
                fad.append(time.thread_time() - t1)
            del view
            mm.close()
            per_mib = 2**20 / n * 1e6
            print(f"{advice.name:9s} madvise {statistics.median(adv) * per_mib:7.1f} µs/MiB CPU,"
                  f" then POSIX_FADV_DONTNEED {statistics.median(fad) * per_mib:7.1f} µs/MiB "
                  f"(median of {a.ranges} ranges of {n / 2**20:g} MiB)")
    os.close(fd)


def mapping_advise(view: np.ndarray, offset: int, nbytes: int, advice: Madvice) -> None:
    if LIBC.madvise(view.ctypes.data + offset, nbytes, int(advice)) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice.name})")


if __name__ == "__main__":
    main()
