"""Memory-pressure grid: llama.cpp (stock and with the prefetch plugin) inside a memory cgroup
for every (memory limit × vm.swappiness × mode) cell.

Each cell is one fresh child process (``python -m expertpred.lab.experiment --child ...``):

1. the model file is evicted from the page cache (pages cached earlier would be charged to
   another group and escape the limit — see docs/memory-pressure.md);
2. global ``vm.swappiness`` and the group's ``memory.swappiness`` are set to the cell's value;
3. the child loads the model in a :class:`~expertpred.lab.cgroup.MemoryCgroup` limited to
   ``fraction × file size``, prefills a fixed prompt and decodes ``tokens`` greedy tokens;
4. the parent records decode tokens/s, bytes read from storage and major faults per decoded
   token (the child's own ``/proc`` counters around the decode phase), the group's peak
   memory and OOM kills.

The machine's swappiness is restored afterwards, also on Ctrl-C / SIGTERM.

What swappiness can change here: ``vm.swappiness`` only biases reclaim between anonymous
pages (which go to swap) and file pages (which are dropped and re-read). llama.cpp's weights
are a clean, file-backed ``mmap``; without a swap device anonymous pages cannot be reclaimed
at all (the kernel's ``get_scan_count`` falls back to scanning file pages only), so the
model's pages are the victims whatever the value. The grid measures this instead of
assuming it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExpertPredError
from .cgroup import MemoryCgroup, evict_file, get_swappiness, proc_io, residency, swappiness
from .cgroup import why_unavailable as cgroup_unavailable

log = logging.getLogger(__name__)

BENCH_DIR = Path("/tmp/expertpred-bench")
PROMPT = "def read_config(path):\n    with open(path) as f:\n"
MODES = ("off", "d0", "predictor")
DEFAULT_FRACTIONS = (0.25, 0.5, 1.0, 1.5)
DEFAULT_SWAPPINESS = (0, 60, 100)

SWAPPINESS_NOTE = (
    "swappiness only biases reclaim between anonymous pages (to swap) and file pages "
    "(dropped, re-read); the model is a clean file-backed mmap, and with no swap device "
    "anonymous pages cannot be reclaimed at all, so file pages are the victims at any "
    "swappiness. Differences between swappiness rows are noise unless bytes read differ.")


@dataclass(frozen=True)
class ExperimentConfig:
    """One grid. Every field is a default the CLI can change."""

    model: Path  # the (widened) GGUF under test; its size sets the limits
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # cgroup limit / model file size
    swappiness: tuple[int, ...] = DEFAULT_SWAPPINESS  # vm.swappiness (global + group)
    modes: tuple[str, ...] = ("off", "d0")  # plugin modes; "off" is stock llama.cpp
    tokens: int = 8  # greedy tokens per run: short, the limited runs are slow
    rounds: int = 1  # repetitions of the whole grid; cells report the median
    threads: int = 2  # llama.cpp threads (the machine has 2 cores)
    predictor: Path | None = None  # saved predictors / artifact for mode "predictor"
    predictor_name: str | None = None  # which saved predictor (default: plugin's)
    source_model: Path | None = None  # the model ``model`` was widened from (predictor check)
    timeout: float = 600.0  # seconds per run before the child is killed

    def __post_init__(self) -> None:
        for m in self.modes:
            if m not in MODES:
                raise ExpertPredError(f"mode {m!r}: expected one of {', '.join(MODES)}")
        if "predictor" in self.modes and self.predictor is None:
            raise ExpertPredError("mode 'predictor' needs --predictor DIR_OR_ARTIFACT")
        for f in self.fractions:
            if not f > 0:
                raise ExpertPredError(f"limit fraction {f}: expected > 0")
        for s in self.swappiness:
            if not 0 <= s <= 200:
                raise ExpertPredError(f"swappiness {s}: expected 0..200")
        if self.tokens < 2:
            raise ExpertPredError(f"tokens {self.tokens}: expected at least 2")
        if not self.model.is_file():
            raise ExpertPredError(f"{self.model}: no such model file")


@dataclass(frozen=True)
class Cell:
    """One (mode, fraction, swappiness) result; per-token values are per decode step."""

    mode: str
    fraction: float
    swappiness: int
    limit_bytes: int
    status: str  # "ok", "oom-killed", "rc=N", "timeout"
    tokens_per_s: float | None = None  # decode steps / decode seconds (median over rounds)
    read_per_token: float | None = None  # storage bytes read by the child per decode step
    majflt_per_token: float | None = None  # the child's major faults per decode step
    load_read: int | None = None  # bytes read while loading (the mmap populate)
    peak_bytes: int | None = None  # memory.max_usage_in_bytes of the group
    oom_kills: int = 0  # OOM kills in the group (summed over rounds)
    cg_pgmajfault: int | None = None  # the group's pgmajfault counter over the whole run
    steps: int = 0  # decode steps measured (tokens - 1: the first token ends the prefill)
    rounds: int = 0  # rounds that finished ok
    generated: tuple[int, ...] = ()  # greedy tokens of the first ok round
    tps_all: tuple[float, ...] = field(default=())  # tokens/s of every ok round


@dataclass(frozen=True)
class GridResult:
    config: ExperimentConfig
    cells: tuple[Cell, ...]
    model_bytes: int
    swappiness_before: int
    swappiness_after: int
    swap_total_kib: int
    seconds: float
    command: str = ""

    @property
    def tokens_identical(self) -> bool:
        return len({c.generated for c in self.cells if c.generated}) <= 1


# --- child: one generation inside the cgroup ----------------------------------------------


def measure_generation(model: str, mode: str, tokens: int, threads: int = 2,
                       predictor: str | None = None, predictor_name: str | None = None,
                       source_model: str | None = None) -> dict[str, Any]:
    """Load ``model`` with the plugin in ``mode`` (``off`` = stock llama.cpp), prefill
    :data:`PROMPT`, decode ``tokens`` greedy tokens; per-phase counters of this process."""
    from ..prefetch.plugin import (
        PluginConfig,
        PrefetchLlama,
        generate_greedy,
        load_predictors,
    )

    preds = None
    if mode == "predictor":
        if predictor is None:
            raise ExpertPredError("mode 'predictor' needs a predictor path")
        preds = load_predictors(predictor, model, name=predictor_name,
                                source_model=source_model)
    io0, t0 = proc_io(), time.perf_counter()
    llm = PrefetchLlama(model, PluginConfig(mode=mode, predictor=preds), n_ctx=256,
                        n_threads=threads, seed=0)
    io1, t1 = proc_io(), time.perf_counter()
    marks: list[Any] = []

    def on_token(tok: int) -> None:  # the first sampled token marks the end of the prefill
        if not marks:
            marks.append((proc_io(), time.perf_counter()))

    try:
        toks, n_prompt, _, _ = generate_greedy(llm, PROMPT, tokens, on_token)
        io3, t3 = proc_io(), time.perf_counter()
    finally:
        llm.close()
    io2, t2 = marks[0] if marks else (io3, t3)
    gen = io3 - io2
    return {"load_s": t1 - t0, "load_read": (io1 - io0).read_bytes, "prompt_tokens": n_prompt,
            "prompt_s": t2 - t1, "steps": max(0, len(toks) - 1), "decode_s": t3 - t2,
            "decode_read": gen.read_bytes, "decode_majflt": gen.majflt, "tokens": toks}


def _child_main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one expertpred experiment run (internal)")
    ap.add_argument("--child", required=True, help="JSON keyword arguments")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(measure_generation(**json.loads(a.child))), flush=True)


# --- parent -------------------------------------------------------------------------------


def swap_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1])
    return 0


def check_out_dir(out: Path) -> None:
    """Create ``out`` and prove it is writable, or raise a one-line error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ExpertPredError(f"{out}: output directory not writable ({exc.strerror})") from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread so ``finally`` blocks run."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_one(cfg: ExperimentConfig, mode: str, fraction: float, swp: int,
            model_bytes: int) -> dict[str, Any]:
    """One child run of one cell; a dict of raw counters (``status`` always set)."""
    limit = int(model_bytes * fraction)
    kwargs = {"model": str(cfg.model), "mode": mode, "tokens": cfg.tokens,
              "threads": cfg.threads,
              "predictor": str(cfg.predictor) if cfg.predictor else None,
              "predictor_name": cfg.predictor_name,
              "source_model": str(cfg.source_model) if cfg.source_model else None}
    cmd = [sys.executable, "-m", "expertpred.lab.experiment", "--child", json.dumps(kwargs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    evict_file(cfg.model)
    row: dict[str, Any] = {"resident_before": residency(cfg.model).fraction, "limit": limit}
    with swappiness(swp), MemoryCgroup(f"exp-{mode}", limit, swappiness=swp) as cg:
        try:
            res = cg.run(cmd, env=env, timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            row["status"] = "timeout"
            return row
    row.update(returncode=res.returncode, wall_s=res.seconds, peak=res.after.max_usage,
               oom_kills=res.after.oom_kills - res.before.oom_kills,
               cg_pgmajfault=res.after["pgmajfault"] - res.before["pgmajfault"],
               stderr=res.stderr[-400:])
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode == 0 and lines:
        row.update(json.loads(lines[-1]))
        row["status"] = "ok"
    elif row["oom_kills"] or res.returncode == -signal.SIGKILL:
        row["status"] = "oom-killed" if row["oom_kills"] else "killed"
    else:
        row["status"] = f"rc={res.returncode}"
        log.warning("%s at %.2f / swappiness %d failed: %s", mode, fraction, swp,
                    res.stderr.strip().splitlines()[-1:] or "(no stderr)")
    return row


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _cell(mode: str, fraction: float, swp: int, limit: int, rows: list[dict[str, Any]]) -> Cell:
    ok = [r for r in rows if r["status"] == "ok" and r["steps"] > 0]
    bad = [r["status"] for r in rows if r["status"] != "ok"]
    status = "ok" if ok and not bad else (bad[0] if not ok else f"ok {len(ok)}/{len(rows)}")
    tps = tuple(r["steps"] / r["decode_s"] for r in ok if r["decode_s"] > 0)
    return Cell(
        mode=mode, fraction=fraction, swappiness=swp, limit_bytes=limit, status=status,
        tokens_per_s=_median(tps),
        read_per_token=_median([r["decode_read"] / r["steps"] for r in ok]),
        majflt_per_token=_median([r["decode_majflt"] / r["steps"] for r in ok]),
        load_read=int(m) if (m := _median([r["load_read"] for r in ok])) is not None else None,
        peak_bytes=max((r["peak"] for r in rows if "peak" in r), default=None),
        oom_kills=sum(r.get("oom_kills", 0) for r in rows),
        cg_pgmajfault=int(m) if (m := _median([r["cg_pgmajfault"] for r in ok])) is not None
        else None,
        steps=ok[0]["steps"] if ok else 0, rounds=len(ok),
        generated=tuple(ok[0]["tokens"]) if ok else (), tps_all=tps)


def run_grid(cfg: ExperimentConfig, *, command: str = "",
             on_run: Callable[[str, float, int, int, dict[str, Any]], None] | None = None,
             ) -> GridResult:
    """Run every cell ``cfg.rounds`` times and restore vm.swappiness afterwards (always).

    Order: for each round, limit and mode, the swappiness values run back to back, so the
    cells that the swappiness question compares are the closest in time (the CPU is shared).
    """
    if reason := cgroup_unavailable():
        raise ExpertPredError(f"memory cgroup unavailable: {reason}")
    model_bytes = cfg.model.stat().st_size
    raw: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    with _sigterm_as_interrupt(), swappiness(None) as before:
        for rnd in range(cfg.rounds):
            for frac in cfg.fractions:
                for mode in cfg.modes:
                    for swp in cfg.swappiness:
                        row = run_one(cfg, mode, frac, swp, model_bytes)
                        raw.setdefault((mode, frac, swp), []).append(row)
                        if on_run is not None:
                            on_run(mode, frac, swp, rnd, row)
    after = get_swappiness()
    cells = tuple(_cell(m, f, s, int(model_bytes * f), raw[(m, f, s)])
                  for f in cfg.fractions for m in cfg.modes for s in cfg.swappiness)
    return GridResult(cfg, cells, model_bytes, before, after, swap_total_kib(),
                      time.perf_counter() - t0, command)


# --- output -------------------------------------------------------------------------------


COLUMNS = ("mode", "limit", "swappiness", "status", "tok/s", "read MiB/token",
           "majflt/token", "load read MiB", "peak MiB", "OOM kills")


def table_rows(res: GridResult) -> list[list[str]]:
    """Formatted cells, one row each, in :data:`COLUMNS` order."""
    def f(v: float | None, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    out = []
    for c in res.cells:
        out.append([c.mode, f"{c.fraction:g}× ({c.limit_bytes / 2**20:.0f} MiB)",
                    str(c.swappiness), c.status, f(c.tokens_per_s, ".2f"),
                    f(None if c.read_per_token is None else c.read_per_token / 2**20, ".1f"),
                    f(c.majflt_per_token, ".1f"),
                    f(None if c.load_read is None else c.load_read / 2**20, ".0f"),
                    f(None if c.peak_bytes is None else c.peak_bytes / 2**20, ".0f"),
                    str(c.oom_kills)])
    return out


def footer(res: GridResult) -> str:
    swap = ("no swap device (SwapTotal 0)" if res.swap_total_kib == 0
            else f"SwapTotal {res.swap_total_kib / 2**20:.1f} GiB")
    return (f"{swap}. {SWAPPINESS_NOTE} vm.swappiness {res.swappiness_before} before, "
            f"{res.swappiness_after} after. Model {res.model_bytes / 2**30:.2f} GiB, "
            f"{res.config.tokens} tokens, {res.config.rounds} round(s), "
            f"{res.seconds / 60:.1f} min; greedy tokens identical in all cells: "
            f"{res.tokens_identical}.")


def markdown_table(res: GridResult) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(res)]
    return "\n".join(lines)


def write_outputs(res: GridResult, out: Path) -> list[Path]:
    """grid.csv, grid.json, report.md and tokens_per_s.png in ``out``."""
    check_out_dir(out)
    paths = [out / "grid.csv", out / "grid.json", out / "report.md"]
    with paths[0].open("w", newline="") as fh:
        w = csv.writer(fh)
        names = [k for k in asdict(res.cells[0]) if k not in ("generated", "tps_all")]
        w.writerow(names)
        for c in res.cells:
            d = asdict(c)
            w.writerow([d[k] for k in names])
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(res.config).items()}
    paths[1].write_text(json.dumps({
        "command": res.command, "config": cfg, "model_bytes": res.model_bytes,
        "swappiness_before": res.swappiness_before, "swappiness_after": res.swappiness_after,
        "swap_total_kib": res.swap_total_kib, "seconds": res.seconds,
        "tokens_identical": res.tokens_identical, "note": SWAPPINESS_NOTE,
        "cells": [asdict(c) for c in res.cells]}, indent=1))
    paths[2].write_text(f"# Memory-pressure grid\n\n```\n{res.command}\n```\n\n"
                        f"{markdown_table(res)}\n\n{footer(res)}\n")
    paths.append(plot(res, out / "tokens_per_s.png"))
    return paths


def plot(res: GridResult, path: Path) -> Path:
    """tokens/s and read MiB/token vs limit, one line per (mode, swappiness)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"off": "-", "d0": "--", "predictor": ":"}
    for mode in res.config.modes:
        for swp in res.config.swappiness:
            cs = [c for c in res.cells if c.mode == mode and c.swappiness == swp]
            xs = [c.fraction for c in cs]
            label = f"{'stock' if mode == 'off' else mode}, swappiness {swp}"
            for ax, ys in ((axes[0], [c.tokens_per_s for c in cs]),
                           (axes[1], [None if c.read_per_token is None
                                      else c.read_per_token / 2**20 for c in cs])):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], styles[mode],
                        marker="o", label=label)
    axes[0].set_ylabel("decode tokens/s")
    axes[1].set_ylabel("MiB read from storage per token")
    for ax in axes:
        ax.set_xlabel("cgroup memory limit / model size")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{res.config.model.name} ({res.model_bytes / 2**30:.2f} GiB), "
                 f"{res.config.tokens} tokens — compare within this run only", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_model(source: Path, total_gib: float = 1.0) -> Path:
    """A widened f32 copy of ``source`` under :data:`BENCH_DIR` (built once, then reused);
    f32 like the shipped model, so routing — and the source's predictors — are unchanged."""
    from ..gguf.layout import file_sha256
    from ..gguf.widen import widen

    sha = file_sha256(source)[:12]
    out = BENCH_DIR / f"{source.parent.name}-{sha}-widened-{total_gib:g}gib-f32.gguf"
    if not out.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        res = widen(source, out, total_gib=total_gib, dtype="f32")
        log.info("widened %s -> %s (%.2f GiB) in %.1f s", source, out,
                 res.file_size / 2**30, res.seconds)
    return out


if __name__ == "__main__":
    _child_main()
