"""What an I/O trace shows: the numbers (:func:`analyse`), the figures and ``summary.md``.

Functions over the frames :mod:`expertpred.lab.iotrace` recorded (plus the block device's
read-ahead setting from sysfs); no process runs here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..gguf.layout import MoELayout
from .analysis.popularity import gini

if TYPE_CHECKING:
    from .iotrace import IOTraceConfig

KINDS = ("other", "expert", "router", "shared")  # region kind codes 0..3
SEQ_GAP = 128 * 1024  # a read "follows" the previous one if it starts within this of its end
TOKEN_LAYER = -1  # `layer` of a token-boundary sample


@dataclass(frozen=True)
class ChildRun:
    """How one traced child process ran (summary.json's ``info``)."""

    limit_mib: int | None  # memory cgroup limit of this run; None = no limit
    seconds: float  # wall time of the child, load included
    # bytes of the GGUF still resident after evicting it (cold runs only): eviction check
    left_resident_after_evict: int | None = None
    # the cgroup's accounting (runs under a limit only): I/O and memory pressure evidence
    read_bytes: int | None = None
    majflt: int | None = None
    max_usage: int | None = None
    failcnt: int | None = None
    oom_killed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The keys this run measured, in summary.json's order (absent ones left out)."""
        d = asdict(self)
        out: dict[str, Any] = {"limit_mib": d.pop("limit_mib")}
        lr = d.pop("left_resident_after_evict")
        if lr is not None:
            out["left_resident_after_evict"] = lr
        return out | {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class IOTraceResult:
    """The numbers :func:`analyse` derives from a cold (and optional warm) trace."""

    file_bytes: int  # GGUF size
    cold_run: ChildRun  # the traced run (under the limit when one is set)
    warm_run: ChildRun | None  # the file-cached comparison run, when asked for
    read_ahead_kb: int | None  # device mmap read-around window; None when sysfs has none
    slice_kib: float  # mean bytes of one expert slice
    load_read_bytes: int  # newly resident before the first token
    inference_new_bytes: int  # newly resident during inference
    inference_new_by_kind: dict[str, int]  # the same, per region kind (KINDS)
    proc_read_bytes_inference: int  # /proc/self/io read_bytes during inference
    majflt_inference: int  # major faults during inference
    n_runs: int  # contiguous runs of newly resident pages during inference
    sequential_share: float  # share of runs that follow the previous run's end
    mean_run_kib: float  # mean run length; NaN without runs
    layer_monotone_share: float  # consecutive expert-reading samples in layer order
    expert_bytes_routed_share: float  # expert bytes of experts routed in the same token
    expert_bytes_after_routing_share: float  # read in the step after the routing node
    expert_bytes_before_routing_share: float  # read in the step that ends at it
    expert_gini: float  # Gini of bytes read per (layer, expert)
    experts_never_read_share: float  # (layer, expert) cells never read
    experts_routed_share: float  # (layer, expert) cells routed at least once
    blkio_ticks_inference: int  # delayacct blkio ticks (0 when delayacct is off)
    cold_decode_seconds: float  # decode step time, tracer sampling excluded
    cold_sampling_seconds: float  # the tracer's own sampling time
    n_decode_tokens: int  # decode steps traced
    # with a warm run only: compute-only time, its I/O-wait estimate, same output tokens
    warm_decode_seconds: float | None = None
    io_wait_seconds: float | None = None
    same_tokens: bool | None = None
    figures: list[str] = field(default_factory=list)  # PNG paths written
    tools: dict[str, bool] = field(default_factory=dict)  # blktrace / perf installed

    def to_json(self) -> dict[str, Any]:
        """summary.json's document (without ``config``): the keys of the old result dict."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        info = self.cold_run.to_json()
        if self.warm_run is not None:
            info["warm"] = self.warm_run.to_json()
        d.pop("cold_run"), d.pop("warm_run")
        figs, tools = d.pop("figures"), d.pop("tools")
        if self.warm_run is None:
            for k in ("warm_decode_seconds", "io_wait_seconds", "same_tokens"):
                d.pop(k)
        return {"file_bytes": d.pop("file_bytes"), "info": info, **d, "figures": figs,
                "tools": tools}

    def with_outputs(self, figures: list[str], tools: dict[str, bool]) -> IOTraceResult:
        return replace(self, figures=figures, tools=tools)


def read_ahead_kb(path: str | os.PathLike[str]) -> int | None:
    """The block device's ``read_ahead_kb`` for the file system holding ``path`` (None if
    unknown). llama.cpp's ``POSIX_FADV_SEQUENTIAL`` doubles it for its descriptor, and mmap
    fault read-around reads that window around each faulting page."""
    st = os.stat(path)
    base = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for q in (base / "queue" / "read_ahead_kb", base / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(q.read_text())
        except (OSError, ValueError):
            continue
    return None


def sequential_share(offsets: np.ndarray, nbytes: np.ndarray, gap: int = SEQ_GAP) -> float:
    """Share of runs (after the first) that start within ``gap`` bytes after the previous run's
    end, in the given order.

    >>> sequential_share(np.array([0, 4096, 1 << 30]), np.array([4096, 4096, 4096]))
    0.5
    """
    if len(offsets) < 2:
        return float("nan")
    d = offsets[1:] - (offsets[:-1] + nbytes[:-1])
    return float(np.mean((d >= 0) & (d <= gap)))


def layer_monotone_share(layers: np.ndarray) -> float:
    """Share of consecutive pairs whose layer does not decrease (1.0 = strictly layer order).

    >>> layer_monotone_share(np.array([0, 1, 1, 3, 2]))
    0.75
    """
    if len(layers) < 2:
        return float("nan")
    return float(np.mean(np.diff(layers) >= 0))


def analyse(cold: dict[str, Any], warm: dict[str, Any] | None, lay: MoELayout,
            cold_run: ChildRun, warm_run: ChildRun | None) -> IOTraceResult:
    """The read-order, decode-time and expert-access numbers from the cold (and warm)
    frames."""
    s, runs, exp = cold["samples"], cold["runs"], cold["exp"]
    inf = runs[runs["token"] >= 0].sort_values(["sample", "offset"])
    res: dict[str, Any] = {"file_bytes": lay.file_size,
                           "read_ahead_kb": read_ahead_kb(lay.path),
                           "slice_kib": float(lay.nbytes.mean() / 1024)}
    res["load_read_bytes"] = int(s.loc[s["token"] < 0, "new_bytes"].sum())
    si = s[s["token"] >= 0]
    res["inference_new_bytes"] = int(si["new_bytes"].sum())
    res["inference_new_by_kind"] = {k: int(si[f"new_{k}"].sum()) for k in KINDS}
    rb = s["read_bytes"].to_numpy()
    first = si.index.min() if len(si) else len(s) - 1
    res["proc_read_bytes_inference"] = int(rb[-1] - rb[max(first - 1, 0)])
    res["majflt_inference"] = int(s["majflt"].iloc[-1] - s["majflt"].iloc[max(first - 1, 0)])
    # read order: sequential or scattered
    res["n_runs"] = len(inf)
    res["sequential_share"] = sequential_share(inf["offset"].to_numpy(), inf["nbytes"].to_numpy())
    res["mean_run_kib"] = float(inf["nbytes"].mean() / 1024) if len(inf) else float("nan")
    ex_inf = exp[exp["token"] >= 0]
    per_sample_layer = ex_inf.groupby("sample")["layer"].median().sort_index()
    res["layer_monotone_share"] = layer_monotone_share(per_sample_layer.to_numpy())
    # expert reads that match the layer routed just before (interval after routing of L)
    routed = cold["routed"]
    rset = set(zip(routed["token"], routed["layer"], routed["expert"]))
    if len(ex_inf):
        hit = [(tk, ly, e) in rset for tk, ly, e in
               zip(ex_inf["token"], ex_inf["layer"], ex_inf["expert"])]
        res["expert_bytes_routed_share"] = float(ex_inf["bytes"][hit].sum() / ex_inf["bytes"].sum())
    else:
        res["expert_bytes_routed_share"] = float("nan")
    # expert bytes read in the step right after their layer's routing node (attribution)
    prev_layer = s.set_index("sample")["layer"].shift(1)
    if len(ex_inf):
        after = ex_inf["sample"].map(prev_layer).to_numpy() == ex_inf["layer"].to_numpy()
        before = ex_inf["sample"].map(s.set_index("sample")["layer"]).to_numpy() \
            == ex_inf["layer"].to_numpy()  # in the step that ends at its layer's routing
        tot = ex_inf["bytes"].sum()
        res["expert_bytes_after_routing_share"] = float(ex_inf["bytes"][after].sum() / tot)
        res["expert_bytes_before_routing_share"] = float(ex_inf["bytes"][before].sum() / tot)
    else:
        res["expert_bytes_after_routing_share"] = float("nan")
        res["expert_bytes_before_routing_share"] = float("nan")
    # expert access: bytes read per expert over the inference (layer, expert) grid
    grid = np.zeros((lay.n_layer, lay.n_expert))
    for ly, e, b in zip(ex_inf["layer"], ex_inf["expert"], ex_inf["bytes"]):
        grid[ly, e] += b
    grid = grid[list(lay.moe_layers)]
    res["expert_gini"] = float(gini(np.ravel(grid))[0])
    res["experts_never_read_share"] = float(np.mean(grid == 0))
    res["experts_routed_share"] = float(len({(ly, e) for _, ly, e in rset})
                                        / (len(lay.moe_layers) * lay.n_expert))
    # decode time: per decode step, cold vs warm
    res["blkio_ticks_inference"] = int(s["blkio_ticks"].iloc[-1] - s["blkio_ticks"].iloc[first])
    dec = si[si["token"] >= 1]
    res["cold_decode_seconds"] = float(dec["step_seconds"].sum())
    res["cold_sampling_seconds"] = float(dec["sample_seconds"].sum())
    res["n_decode_tokens"] = int(dec["token"].nunique())
    if warm is not None:
        w = warm["samples"]
        wd = w[w["token"] >= 1]
        res["warm_decode_seconds"] = float(wd["step_seconds"].sum())
        m = dec.merge(wd[["token", "layer", "step_seconds"]], on=["token", "layer"],
                      suffixes=("", "_warm"))
        res["io_wait_seconds"] = float((m["step_seconds"] - m["step_seconds_warm"]).clip(
            lower=0).sum())
        res["same_tokens"] = cold["meta"]["tokens"] == warm["meta"]["tokens"]
    return IOTraceResult(cold_run=cold_run, warm_run=warm_run, **res)


def figures(cold: dict[str, Any], warm: dict[str, Any] | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, s = cold["runs"], cold["samples"]
    colors = {"other": "tab:gray", "expert": "tab:blue", "router": "tab:red",
              "shared": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 5))
    for k in KINDS:
        r = runs[runs["kind"] == k]
        if len(r):
            ax.scatter(r["t"], r["offset"] / 2**20, s=np.clip(r["nbytes"] / 65536, 2, 40),
                       c=colors[k], label=k, alpha=0.6, linewidths=0)
    t_tok = s.loc[s["layer"] == TOKEN_LAYER, "t"]
    for t in t_tok:
        ax.axvline(t, color="k", lw=0.3, alpha=0.4)
    ax.set_xlabel("time since tracer start (s); vertical lines = token boundaries")
    ax.set_ylabel("file offset (MiB)")
    ax.set_title("Newly resident GGUF pages (mincore diffs), by region")
    if len(runs):
        ax.legend(loc="upper right")
    p1 = out / "offsets.png"
    fig.tight_layout()
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    si = s[s["token"] >= 0]
    g = si.groupby("token")[[f"new_{k}" for k in KINDS]].sum() / 2**20
    g.columns = list(KINDS)
    g.plot.bar(stacked=True, ax=a1, color=[colors[k] for k in KINDS])
    a1.set_xlabel("token (0 = prompt)")
    a1.set_ylabel("MiB newly resident")
    a1.set_title("Bytes read per token by region")
    ct = si.groupby("token")["step_seconds"].sum()
    a2.bar(ct.index - 0.2, ct.to_numpy(), width=0.4, label="cold (limit)")
    if warm is not None:
        w = warm["samples"]
        wt = w[w["token"] >= 0].groupby("token")["step_seconds"].sum()
        a2.bar(wt.index + 0.2, wt.to_numpy(), width=0.4, label="warm (cached)")
    a2.set_xlabel("token (0 = prompt)")
    a2.set_ylabel("seconds")
    a2.set_title("Wall time per token")
    a2.legend()
    p2 = out / "per_token.png"
    fig.tight_layout()
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary_md(cfg: IOTraceConfig, res: IOTraceResult, tools: dict[str, bool]) -> str:
    by = res.inference_new_by_kind
    tot = max(res.inference_new_bytes, 1)
    lines = [
        f"# iotrace: {cfg.model.name}",
        "",
        f"- file {_mib(res.file_bytes)}, limit "
        f"{res.cold_run.limit_mib or 'none'} MiB, {cfg.tokens} tokens, prompt {cfg.prompt!r}",
        f"- load: {_mib(res.load_read_bytes)} became resident before the first token",
        f"- inference: {_mib(res.inference_new_bytes)} newly resident "
        f"({', '.join(f'{k} {100 * by[k] / tot:.0f}%' for k in KINDS)}); "
        f"/proc/self/io read_bytes {_mib(res.proc_read_bytes_inference)}, "
        f"{res.majflt_inference} major faults",
        f"- blktrace installed: {tools['blktrace']}; perf installed: {tools['perf']} (not used)",
        "",
        "## Read order: sequential or scattered?",
        f"- {res.n_runs} contiguous runs of newly resident pages during inference, mean "
        f"{res.mean_run_kib:.0f} KiB",
        f"- sequential share (run starts <= {SEQ_GAP // 1024} KiB after the previous run's end, "
        f"in (sample, offset) order): {res.sequential_share:.2f}",
        f"- layer order: {res.layer_monotone_share:.2f} of consecutive expert-reading "
        f"samples go to the same or a later layer",
        f"- {res.expert_bytes_routed_share:.2f} of expert bytes read belong to an expert its "
        f"layer routed to in the same token; {res.expert_bytes_after_routing_share:.2f} "
        f"were read in the step right after that layer's routing node, "
        f"{res.expert_bytes_before_routing_share:.2f} in the step that ends at it (read-around "
        f"while reading that layer's attention / router, before the routing was known)",
        f"- device read_ahead_kb: {res.read_ahead_kb} (mmap read-around window, doubled by "
        f"llama.cpp's POSIX_FADV_SEQUENTIAL); bytes per expert slice (one stacked tensor): "
        f"{res.slice_kib:.0f} KiB",
        "",
        "## Decode time: compute or I/O wait?",
        f"- cold decode: {res.cold_decode_seconds:.3f} s over {res.n_decode_tokens} "
        f"tokens (tracer sampling {res.cold_sampling_seconds:.3f} s excluded)",
    ]
    if res.warm_decode_seconds is not None:
        cold_s = max(res.cold_decode_seconds, 1e-9)
        lines += [
            f"- warm (file cached, no limit) decode: {res.warm_decode_seconds:.3f} s; "
            f"same tokens: {res.same_tokens}",
            f"- estimated I/O wait (sum of positive cold - warm per (token, layer) step): "
            f"{res.io_wait_seconds:.3f} s = {100 * res.io_wait_seconds / cold_s:.0f}% "
            f"of cold decode time",
        ]
    lines += [
        f"- delayacct blkio ticks over all threads during inference: "
        f"{res.blkio_ticks_inference} (0 when kernel.task_delayacct is off)",
        "",
        "## Expert access: uniform or skewed?",
        f"- Gini of bytes read per (layer, expert): {res.expert_gini:.2f}",
        f"- experts never read during inference: {100 * res.experts_never_read_share:.0f}%; "
        f"experts routed at least once: {100 * res.experts_routed_share:.0f}%",
        "",
        "Figures: offsets.png, per_token.png. Data: samples/reads/expert_reads parquet.",
    ]
    return "\n".join(lines) + "\n"

