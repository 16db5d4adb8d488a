"""Which bytes of a GGUF does llama.cpp actually read, in what order, under a memory limit?

``expertpred iotrace`` measures how llama.cpp reads the weights: in which order, how much
of decode time is I/O wait, and how evenly the experts are read:

1. a child process runs greedy llama.cpp inference on the one llama.cpp hook
   (``llama.runtime.hook_llama`` + ``llama.hook.RoutingHook``, with this module's
   :class:`IOTracer` as what it notifies) — inside a
   :class:`~expertpred.lab.cgroup.MemoryCgroup` when a limit is given, after evicting the
   file from the page cache;
2. at each MoE layer's routing node (``ffn_moe_argsort-L``: attention and router of layer L
   are done, its experts not yet) and at each token boundary the tracer takes a ``mincore``
   snapshot of the whole file: pages resident now but not at the previous sample became
   resident in between = reads (pages read *and* reclaimed between two samples are missed;
   the per-process ``/proc/self/io`` ``read_bytes`` recorded with every sample bounds that);
3. new pages are attributed to the interval's (token, layer) and to the region kind of the
   layout (expert (layer, expert), router, shared expert, other = attention/embeddings/
   norms/output), with major faults and the summed ``delayacct_blkio_ticks`` of all threads;
4. the same run is repeated with the file cached and no limit ("warm"): the per-step wall
   time difference cold - warm estimates the I/O wait of each step.

Outputs in ``--out``: ``samples.parquet`` (one row per sample, both runs), ``reads.parquet``
(contiguous runs of newly resident pages), ``expert_reads.parquet`` ((sample, layer, expert)
bytes), ``offsets.png``, ``per_token.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..gguf.layout import MoELayout, read_layout
from ..llama.hook import RoutingHook
from ..llama.nodes import routing_plan
from .iotrace_report import (
    KINDS,
    TOKEN_LAYER,
    ChildRun,
    IOTraceResult,
    analyse,
    figures,
    summary_md,
)

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")
OTHER, EXPERT, ROUTER, SHARED = range(4)


@dataclass(frozen=True)
class IOTraceConfig:
    """One ``expertpred iotrace`` run."""

    model: Path
    out: Path
    limit_mib: int | None = None  # memory cgroup limit for the cold run (None: no cgroup)
    tokens: int = 8  # greedy tokens to generate
    prompt: str = "def read_config(path):"
    n_threads: int = 2
    warm: bool = True  # also run with the file cached to estimate compute-only step times


# --- the page map ------------------------------------------------------------------------------


def page_map(lay: MoELayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per file page: (kind int8, layer int16 (block, -1), expert int16 (-1)) from the layout.

    A page shared by two regions gets the later-assigned one (experts win over the rest).
    """
    n = (lay.file_size + PAGE - 1) // PAGE
    kind = np.zeros(n, np.int8)
    layer = np.full(n, -1, np.int16)
    expert = np.full(n, -1, np.int16)

    def mark(off: int, nbytes: int, k: int, b: int, e: int = -1) -> None:
        lo, hi = off // PAGE, (off + max(nbytes, 1) - 1) // PAGE + 1
        kind[lo:hi], layer[lo:hi], expert[lo:hi] = k, b, e

    for b, ranges in lay.routers.items():
        for r in ranges:
            mark(r.offset, r.nbytes, ROUTER, b)
    for b, ranges in lay.shared.items():
        for r in ranges:
            mark(r.offset, r.nbytes, SHARED, b)
    for li, b in enumerate(lay.moe_layers):
        for e in range(lay.n_expert):
            for p in range(len(lay.parts)):
                mark(int(lay.offsets[li, e, p]), int(lay.nbytes[li, e, p]), EXPERT, b, e)
    return kind, layer, expert


def _thread_blkio_ticks() -> int:
    """Sum of ``delayacct_blkio_ticks`` (stat field 42) over this process's threads (0 unless
    ``kernel.task_delayacct`` is on)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            rest = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(rest[39])
        except (OSError, IndexError, ValueError):
            continue
    return total


# --- the tracer (runs inside the child) -------------------------------------------------------


class IOTracer:
    """Residency sampler on the one llama.cpp hook (``llama.hook.RoutingHook``): ``install``
    it on a context's params, ``begin`` each batch, ``close`` after the context.

    ``start()`` maps the file; ``sample(token, layer, routed)`` diffs residency against the
    previous sample and appends one row; ``arrays()`` returns everything columnar.
    """

    enabled = True

    def __init__(self, gguf_path: str | os.PathLike[str]) -> None:
        self.gguf_path = Path(gguf_path)

    def start(self) -> IOTracer:
        from ..prefetch.sysmem import FileMapping
        from .cgroup import proc_io

        self._proc_io = proc_io
        self.layout_ = lay = read_layout(self.gguf_path)
        self.kind_, self.layer_, self.expert_ = page_map(lay)
        self._li = {b: i for i, b in enumerate(lay.moe_layers)}
        self._map = FileMapping(self.gguf_path)
        self._hook: RoutingHook | None = None
        self._rows: list[tuple] = []
        self._runs: list[tuple[int, int, int]] = []  # (sample, first page, n pages)
        self._exp: list[tuple[int, int, int, int]] = []  # (sample, block, expert, pages)
        self._routed: list[tuple[int, int, int, int]] = []  # (sample, token, block, expert)
        self._token = -1
        self.callback_errors = 0
        self._t0 = time.perf_counter()
        self._prev = self._map.mincore()
        self.sample(-1, TOKEN_LAYER)  # baseline (before the model is loaded)
        return self

    def install(self, params: Any) -> None:
        """Hook the context about to be created from ``params``: experts at every argsort."""
        lay = self.layout_
        self._hook = RoutingHook(
            n_layer=lay.n_layer, moe_layers=lay.moe_layers, n_expert=lay.n_expert,
            k=lay.n_expert_used, n_embd=lay.n_embd, n_rows=int(params.n_ubatch),
            plan=routing_plan(scores=False), ring=True, notify=self._on_layer)
        self._hook.install(params)

    def begin(self, tokens: Sequence[int], n_past: int) -> None:
        self.sample(self._token, TOKEN_LAYER)  # closes the previous token (or the load)
        self._token += 1

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None

    def _on_layer(self, li: int, row: int, n: int) -> None:
        """The hook's notify: MoE row ``li`` routed; sample residency before its matmuls."""
        try:
            assert self._hook is not None
            routed = np.unique(self._hook.experts[li, row:row + n])
            self.sample(self._token, self.layout_.moe_layers[li], routed)
        except Exception:  # noqa: BLE001 - an exception must not unwind through C
            self.callback_errors += 1
            log.exception("iotrace callback")

    def sample(self, token: int, layer: int, routed: np.ndarray | None = None) -> None:
        """One residency snapshot: diff against the previous one and record the new pages."""
        t = time.perf_counter() - self._t0
        cur = self._map.mincore()
        io = self._proc_io()
        ticks = _thread_blkio_ticks()
        new = np.flatnonzero(cur & ~self._prev)
        gone = int(np.count_nonzero(self._prev & ~cur))
        self._prev = cur
        s = len(self._rows)
        by_kind = np.bincount(self.kind_[new], minlength=len(KINDS)) * PAGE
        if new.size:
            breaks = np.flatnonzero(np.diff(new) != 1) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [new.size]))
            self._runs.extend((s, int(new[a]), int(z - a)) for a, z in zip(starts, ends))
            ex = new[self.kind_[new] == EXPERT]
            if ex.size:
                key = self.layer_[ex].astype(np.int64) * 65536 + self.expert_[ex]
                u, c = np.unique(key, return_counts=True)
                self._exp.extend((s, int(k // 65536), int(k % 65536), int(n))
                                 for k, n in zip(u, c))
        if routed is not None:
            self._routed.extend((s, token, layer, int(e)) for e in routed)
        self._rows.append((s, t, token, layer, int(new.size) * PAGE, *map(int, by_kind),
                           gone * PAGE, int(cur.sum()) * PAGE, io.read_bytes, io.majflt,
                           io.minflt, ticks, time.perf_counter() - self._t0 - t))

    SAMPLE_COLS = ("sample", "t", "token", "layer", "new_bytes",
                   *(f"new_{k}" for k in KINDS), "dropped_bytes", "resident_bytes",
                   "read_bytes", "majflt", "minflt", "blkio_ticks", "sample_seconds")

    def arrays(self) -> dict[str, np.ndarray]:
        rows = np.array(self._rows, dtype=np.float64).reshape(-1, len(self.SAMPLE_COLS))
        out = {f"s_{c}": rows[:, i] for i, c in enumerate(self.SAMPLE_COLS)}
        out["runs"] = np.array(self._runs, np.int64).reshape(-1, 3)
        out["exp"] = np.array(self._exp, np.int64).reshape(-1, 4)
        out["routed"] = np.array(self._routed, np.int64).reshape(-1, 4)
        return out


def _child(model: str, out: str, tokens: int, prompt: str, n_threads: int) -> None:
    """Child process body: load, generate greedily under the tracer, save ``out`` (.npz)."""
    from llama_cpp import Llama

    from ..llama.runtime import generate_greedy, hook_llama, quiet_logs

    tracer = IOTracer(model).start()

    class _TracedLlama(Llama):  # tells the tracer where each batch starts
        def eval(self, tokens: Sequence[int]) -> None:
            tracer.begin(tokens, self.n_tokens)
            return super().eval(tokens)

    quiet_logs()
    t0 = time.perf_counter()
    llm = _TracedLlama(model_path=model, n_ctx=256, n_threads=n_threads, n_batch=64,
                       verbose=False)
    pool = hook_llama(llm, tracer.install)
    try:
        load_s = time.perf_counter() - t0
        ids, n_prompt, p_s, d_s = generate_greedy(llm, prompt, tokens)
        tracer.sample(tracer._token, TOKEN_LAYER)  # closes the last token
    finally:
        llm.close()  # the context first: the hook and the pool outlive it
        pool.close()
        tracer.close()
    arr = tracer.arrays()
    meta = {"tokens": ids, "n_prompt": n_prompt, "prompt_seconds": p_s, "decode_seconds": d_s,
            "load_seconds": load_s, "callback_errors": tracer.callback_errors}
    np.savez(out, meta=np.array(json.dumps(meta)), **arr)


# --- the parent --------------------------------------------------------------------------------


def _check_inputs(cfg: IOTraceConfig) -> MoELayout:
    if not cfg.model.is_file():
        raise ExpertPredError(f"{cfg.model}: no such model file (expected a MoE GGUF)")
    lay = read_layout(cfg.model)  # raises GGUFError for non-MoE / unreadable files
    if cfg.tokens < 1:
        raise ExpertPredError(f"--tokens {cfg.tokens}: expected >= 1")
    if cfg.limit_mib is not None and cfg.limit_mib < 16:
        raise ExpertPredError(f"--limit-mib {cfg.limit_mib}: expected >= 16")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        probe = cfg.out / ".iotrace-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ExpertPredError(f"{cfg.out}: output directory not writable ({exc.strerror})") \
            from None
    return lay


def _run_child(cfg: IOTraceConfig, dest: Path, cold: bool) -> ChildRun:
    """Run the traced child: ``cold`` evicts the file first and runs inside a memory cgroup
    when ``cfg.limit_mib`` is set; warm reads the whole file into the page cache first."""
    from .cgroup import MemoryCgroup, evict_file

    cmd = [sys.executable, "-m", "expertpred.lab.iotrace", "--model", str(cfg.model),
           "--npz", str(dest), "--tokens", str(cfg.tokens), "--prompt", cfg.prompt,
           "--threads", str(cfg.n_threads)]
    limit_mib = cfg.limit_mib if cold else None
    left = evict_file(cfg.model).resident_bytes if cold else None
    if limit_mib is None:
        if not cold:
            _read_whole(cfg.model)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rc, stderr = proc.returncode, proc.stderr
        info = ChildRun(limit_mib=None, seconds=time.perf_counter() - t0,
                        left_resident_after_evict=left)
    else:
        with MemoryCgroup("iotrace", limit_mib << 20) as cg:
            res = cg.run(cmd)
        rc, stderr = res.returncode, res.stderr
        info = ChildRun(limit_mib=limit_mib, seconds=res.seconds, left_resident_after_evict=left,
                        read_bytes=res.io.read_bytes, majflt=res.io.majflt,
                        max_usage=res.after.max_usage, failcnt=res.after.failcnt,
                        oom_killed=res.oom_killed)
    if rc != 0:
        raise ExpertPredError(f"iotrace child for {cfg.model} failed (exit {rc}): "
                              f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    return info


def _read_whole(path: Path) -> None:
    with open(path, "rb") as f:  # warm: the whole file into the page cache
        while f.read(1 << 24):
            pass


def _frames(npz: Path, run: str, lay: MoELayout) -> dict[str, Any]:
    import pandas as pd

    z = np.load(npz)
    meta = json.loads(str(z["meta"]))
    cols = IOTracer.SAMPLE_COLS
    s = pd.DataFrame({c: z[f"s_{c}"] for c in cols})
    for c in cols:
        if c not in ("t", "sample_seconds"):
            s[c] = s[c].astype(np.int64)
    s.insert(0, "run", run)
    # wall time of the step that ends at each sample, minus the tracer's own sampling time
    s["step_seconds"] = s["t"].diff().fillna(0.0) - s["sample_seconds"].shift(1).fillna(0.0)
    routed = pd.DataFrame(z["routed"], columns=["sample", "token", "layer", "expert"])
    s["routed"] = s["sample"].map(routed.groupby("sample")["expert"].apply(
        lambda v: " ".join(map(str, v)))).fillna("")
    runs = pd.DataFrame(z["runs"], columns=["sample", "page", "n_pages"])
    runs.insert(0, "run", run)
    runs["offset"] = runs["page"] * PAGE
    runs["nbytes"] = runs["n_pages"] * PAGE
    kind, layer, expert = page_map(lay)
    runs["kind"] = [KINDS[k] for k in kind[runs["page"].to_numpy()]]
    runs["layer"] = layer[runs["page"].to_numpy()]
    runs = runs.merge(s[["sample", "token", "t"]], on="sample", how="left")
    exp = pd.DataFrame(z["exp"], columns=["sample", "layer", "expert", "pages"])
    exp.insert(0, "run", run)
    exp["bytes"] = exp.pop("pages") * PAGE
    exp = exp.merge(s[["sample", "token"]], on="sample", how="left")
    routed.insert(0, "run", run)
    return {"samples": s, "runs": runs, "exp": exp, "routed": routed, "meta": meta}


def run_iotrace(cfg: IOTraceConfig) -> IOTraceResult:
    """Run the cold (and warm) traces, write the outputs, return the analysis numbers."""
    import shutil

    import pandas as pd

    lay = _check_inputs(cfg)
    tools = {t: shutil.which(t) is not None for t in ("blktrace", "perf")}
    cold_npz = cfg.out / "cold.npz"
    cold_run = _run_child(cfg, cold_npz, cold=True)
    cold = _frames(cold_npz, "cold", lay)
    warm = warm_run = None
    if cfg.warm:
        warm_npz = cfg.out / "warm.npz"
        warm_run = _run_child(cfg, warm_npz, cold=False)
        warm = _frames(warm_npz, "warm", lay)
    parts = [cold] + ([warm] if warm is not None else [])
    for name, key in (("samples", "samples"), ("reads", "runs"), ("expert_reads", "exp")):
        pd.concat([p[key] for p in parts], ignore_index=True).to_parquet(
            cfg.out / f"{name}.parquet", index=False)
    res = analyse(cold, warm, lay, cold_run, warm_run).with_outputs(
        [str(p) for p in figures(cold, warm, cfg.out)], tools)
    (cfg.out / "summary.md").write_text(summary_md(cfg, res, tools))
    (cfg.out / "summary.json").write_text(json.dumps(
        {**res.to_json(), "config": {k: str(v) for k, v in asdict(cfg).items()}},
        indent=1, default=str))
    return res


def main(argv: Sequence[str] | None = None) -> None:
    """Child entry point (``python -m expertpred.lab.iotrace``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--npz", required=True)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", default="def read_config(path):")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    _child(a.model, a.npz, a.tokens, a.prompt, a.threads)


if __name__ == "__main__":
    main()
