"""Long fuzz campaign against one reader: counts of outcomes over N mutated real files.

    python benchmarks/fuzz.py --format gguf --cases 2000
    python benchmarks/fuzz.py --format manifest --cases 2000 --seed 1

Formats: gguf (layout.read_layout on the shipped models), manifest and shard (the trace
dataset reader on the shipped traces), artifact (exported predictor artifacts). Each case
runs in a worker process under a watchdog (a case that does not return is killed and
counted as a hang); in the worker, each read runs under a time limit and tracemalloc. The
outcomes: ok, clean error (one-line ExpertPredError), traceback, hang (> --seconds of CPU),
memory (> --mib peak), silent acceptance (accepted, but the format's consistency checks
find it inconsistent). Exit status 1 when any defect was counted.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

from expertpred.lab.fuzz.core import CaseResult, Limits, Outcome, run_one
from expertpred.lab.fuzz.targets import FORMATS, make_target


def _worker(fmt: str, workdir: str, limits: Limits, seed: int, conn) -> None:
    # readers log warnings for accepted-but-odd inputs (e.g. an artifact without checksum);
    # thousands of them would bury the counts
    logging.getLogger().setLevel(logging.ERROR)
    target = make_target(fmt)
    target.prepare(Path(workdir))
    while True:
        i = conn.recv()
        if i is None:
            return
        res = run_one(target, random.Random(f"{seed}:{i}"), limits)
        conn.send(res)


class Campaign:
    """A worker process fed case numbers; restarted when a case kills or hangs it."""

    def __init__(self, fmt: str, workdir: Path, limits: Limits, seed: int) -> None:
        self.args = (fmt, str(workdir), limits, seed)
        self.limits = limits
        self.proc: mp.Process | None = None

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(*self.args, child), daemon=True)
        self.proc.start()

    def run(self, i: int) -> CaseResult:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send(i)
            # generous: the first case also pays for preparing the seeds
            if self.conn.poll(self.limits.kill_seconds + 120):
                return self.conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.proc = None  # a native crash (e.g. SIGSEGV = exit -11) counts as a traceback
            return CaseResult(Outcome.TRACEBACK, f"case {i}", f"worker died (exit {code})",
                              0.0, 0)
        self.close()
        return CaseResult(Outcome.HANG, f"case {i}", "worker killed by the watchdog", 0.0, 0)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
            self.proc = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", choices=FORMATS, required=True)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=1.0, help="CPU-time limit per input.")
    ap.add_argument("--mib", type=int, default=64, help="Peak-memory limit per input.")
    ap.add_argument("--show", type=int, default=10, help="Defects to list.")
    ap.add_argument("--json", type=Path, help="Also write counts and defects here.")
    a = ap.parse_args(argv)
    limits = Limits(seconds=a.seconds, peak_bytes=a.mib << 20)
    counts: collections.Counter[Outcome] = collections.Counter()
    defects: list[CaseResult] = []
    times: list[float] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{a.format}-") as tmp:
        camp = Campaign(a.format, Path(tmp), limits, a.seed)
        try:
            for i in range(a.cases):
                res = camp.run(i)
                counts[res.outcome] += 1
                times.append(res.seconds)
                if res.outcome.is_defect:
                    defects.append(res)
                if (i + 1) % 250 == 0:
                    print(f"  {i + 1}/{a.cases} cases, {len(defects)} defects", file=sys.stderr)
        finally:
            camp.close()
    wall = time.perf_counter() - t0
    times.sort()
    med = 1e3 * times[len(times) // 2]
    print(f"fuzz {a.format}: {a.cases} cases, seed {a.seed}, limits {a.seconds} s CPU / "
          f"{a.mib} MiB per input, {wall:.0f} s wall; wall time per read: median {med:.1f} ms, "
          f"max {1e3 * times[-1]:.0f} ms")
    for o in Outcome:
        print(f"  {o.value:18} {counts[o]:6d}")
    for d in defects[:a.show]:
        print(f"  DEFECT {d.outcome.value}: {d.label} -> {d.detail[:300]}")
    if a.json:
        a.json.write_text(json.dumps({
            "format": a.format, "cases": a.cases, "seed": a.seed, "wall_s": wall,
            "counts": {o.value: counts[o] for o in Outcome},
            "defects": [{"outcome": d.outcome.value, "label": d.label, "detail": d.detail}
                        for d in defects]}, indent=1))
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
