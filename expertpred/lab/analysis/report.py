"""``expertpred analyze``: load a trace dataset, compute the routing statistics, write a report.

The report directory holds PNG figures, ``report.md`` (self-contained, figures referenced
relatively) and ``report.json`` (every number). It is written into a hidden temporary
directory next to the target and renamed into place at the end, so a failure never leaves
half a report; an existing report directory is replaced, any other non-empty directory is
refused.

The answers to the research questions are derived from the numbers with the thresholds of
:class:`Thresholds`, which the report states next to each answer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ...errors import ExpertPredError
from ...trace.dataset import (
    MANIFEST_NAME,
    META_MODEL_SHA,
    SHARD_RE,
    ModelInfo,
    TraceDataset,
    find_manifest,
)
from .routing import RoutingData, summarize

log = logging.getLogger(__name__)

REPORT_FORMAT = "expertpred.routing-report"
REPORT_VERSION = 1
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
COLUMNS = ["seq_id", "pos", "phase", "domain", "experts"]  # no logits: keeps memory small


class AnalysisError(ExpertPredError):
    """The trace cannot be analysed or the report cannot be written."""


@dataclass(frozen=True)
class Thresholds:
    """When a number counts as evidence; every answer in the report quotes the ones it used."""

    # temporal locality at a layer: first-choice keep rate >= lift x uniform (1/E) AND at
    # least `margin` above the rate of independent tokens with the same usage (so skewed
    # popularity alone does not count as locality)
    locality_lift: float = 1.5
    locality_margin: float = 0.05
    # non-uniform access at a layer: Gini above this, or the most used expert at >= ratio x
    # its uniform share, or a dead expert
    skew_gini: float = 0.2
    skew_ratio: float = 2.0
    # "same experts repeatedly": the k most used experts take >= lift x k/E of selections,
    # or an expert used at t-1 is used again at t >= lift x k/E of the time
    repeat_lift: float = 1.5
    # a predictor is feasible at a layer when a simple in-sample predictor's top-k recall
    # is >= lift x that of guessing (k/E)
    predictor_lift: float = 1.5
    # cross-layer affinity: normalised MI (MI / H(next)) above this and MI > 2 x baseline
    nmi: float = 0.1
    # domain-dependent usage at a layer: JSD >= factor x split-half floor and >= min bits
    domain_floor_factor: float = 2.0
    domain_jsd_min: float = 0.01
    # the model-level answer is "yes" when a property holds on more than this share of
    # layers, "partly" when on some, "no" when on none
    majority: float = 0.5


@dataclass(frozen=True)
class Analysis:
    """What ``analyze_trace`` computed and where it wrote it."""

    model: ModelInfo
    trace_dir: Path
    out_dir: Path
    summary: dict[str, Any]  # numpy arrays (routing.summarize + answers)
    answers: dict[str, Any]


# --- loading -------------------------------------------------------------------------


def load_routing(trace_dir: str | os.PathLike[str]) -> tuple[RoutingData, TraceDataset]:
    """Open a trace dataset and read the routing columns (raises AnalysisError on bad input)."""
    d = Path(trace_dir)
    if d.is_dir() and find_manifest(d) is None:
        inner = sorted(p.name for p in d.iterdir() if p.is_dir() and find_manifest(p))
        if inner:
            raise AnalysisError(f"{d}: not a trace dataset but a directory holding "
                                f"{len(inner)} ({', '.join(inner[:4])}); expected one "
                                f"dataset, e.g. {d / inner[0]}")
    ds = TraceDataset(d)  # checks manifest, listed shards, their model sha256 and schema
    _check_unlisted_shards(ds)
    m = ds.model
    if (m.n_expert, m.n_expert_used, len(m.moe_layers)) != (
            ds.n_expert, ds.n_expert_used, ds.n_moe_layer):
        raise AnalysisError(
            f"{ds.manifest_path}: model has E={m.n_expert}, k={m.n_expert_used}, "
            f"L={len(m.moe_layers)} but the columns have E={ds.n_expert}, "
            f"k={ds.n_expert_used}, L={ds.n_moe_layer}; expected them to agree")
    if ds.n_rows == 0:
        raise AnalysisError(f"{d}: trace dataset has no tokens; expected at least one sequence")
    cols = ds.to_numpy(COLUMNS)
    try:
        data = RoutingData.from_arrays(cols["experts"], cols["seq_id"], cols["pos"],
                                       cols["phase"], cols["domain"], ds.n_expert)
    except ValueError as exc:
        raise AnalysisError(f"{d}: {exc}") from None
    log.info("%s: %d sequences, %d tokens, domains %s", d, data.n_sequences, data.n_tokens,
             data.domains)
    return data, ds


def _check_unlisted_shards(ds: TraceDataset) -> None:
    """A shard file the manifest does not list but that belongs to another model means two
    runs were mixed in one directory; one of the same model is a crash leftover (ignored)."""
    listed = {p.name for p in ds.files}
    for p in sorted(ds.path.iterdir()):
        if not SHARD_RE.match(p.name) or p.name in listed:
            continue
        try:
            meta = pq.read_schema(p).metadata or {}
        except Exception as exc:  # any unreadable file is treated the same
            log.warning("%s: unlisted and unreadable (%s); ignored", p, exc)
            continue
        sha = meta.get(META_MODEL_SHA, b"").decode()
        if sha != ds.model.sha256:
            raise AnalysisError(
                f"{p}: shard of model sha256 {sha[:12] or '?'}…, but {MANIFEST_NAME} names "
                f"{ds.model.sha256[:12]}… (mixed models in one directory); expected one "
                "model per dataset directory")
        log.warning("%s: not listed in %s (unfinished run?); ignored", p, MANIFEST_NAME)


# --- output directory ----------------------------------------------------------------


def _prepare_output(out: Path) -> Path:
    """Check the target and create the temporary directory the report is written into."""
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"{out}: exists and is not a directory; expected a report "
                            "directory")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise AnalysisError(f"{out}: non-empty directory that is not an expertpred report; "
                            "expected a new, empty or previous report directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise AnalysisError(f"{out}: cannot write the report there "
                            f"({exc.strerror or exc})") from None


def _is_report(path: Path) -> bool:
    try:
        return json.loads((path / REPORT_JSON).read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished report into place, replacing an old report or an empty directory."""
    old: Path | None = None
    try:
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "report")
        os.rename(tmp, out)
    except OSError as exc:
        if old is not None and (old / "report").exists() and not out.exists():
            os.rename(old / "report", out)
        raise AnalysisError(f"{out}: cannot move the report into place "
                            f"({exc.strerror or exc})") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- the whole run -------------------------------------------------------------------


def analyze_trace(trace_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  max_distance: int = 64, thresholds: Thresholds | None = None,
                  command: str | None = None) -> Analysis:
    """Analyse a trace dataset and write the report directory (all or nothing)."""
    th = thresholds or Thresholds()
    if max_distance < 8:
        raise AnalysisError(f"max_distance={max_distance}; expected >= 8")
    out = Path(out_dir)
    trace = Path(trace_dir)
    if out.resolve() == trace.resolve() or trace.resolve() in out.resolve().parents:
        raise AnalysisError(f"{out}: inside the trace dataset {trace}; expected a report "
                            "directory outside it")
    data, ds = load_routing(trace)
    tmp = _prepare_output(out)
    try:
        summary = summarize(data, max_distance=max_distance)
        answers = derive_answers(summary, ds.model, th)
        write_report(tmp, summary, answers, ds.model, th, trace_dir=trace,
                     n_prompt=int((data.phase == 0).sum()), command=command)
        _publish(tmp, out)
    except OSError as exc:
        raise AnalysisError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("report written to %s", out)
    return Analysis(model=ds.model, trace_dir=trace, out_dir=out, summary=summary,
                    answers=answers)


# --- answers -------------------------------------------------------------------------


def _verdict(hits: np.ndarray, th: Thresholds) -> str:
    n = len(hits)
    if n == 0:
        return "undetermined"
    share = float(np.sum(hits)) / n
    if share > th.majority:
        return "yes"
    return "partly" if share > 0 else "no"


def _layers(hits: np.ndarray, blocks: Sequence[int]) -> str:
    idx = [str(blocks[i]) for i in np.flatnonzero(hits)]
    return ", ".join(idx) if idx else "none"


def _pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def _num(x: float, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{nd}f}"


def _range(a: np.ndarray, fmt: Any = _pct) -> str:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return "–"
    lo, hi = float(a.min()), float(a.max())
    return fmt(lo) if np.isclose(lo, hi) else f"{fmt(lo)} to {fmt(hi)}"


def derive_answers(summary: dict[str, Any], model: ModelInfo,
                   th: Thresholds) -> dict[str, Any]:
    """Per-layer evidence and a worded answer to RQ3, RQ4 and domain dependence."""
    o = summary["overall"]
    pop, loc, reuse, cross = o["popularity"], o["locality"], o["reuse"], o["cross_layer"]
    e, k = model.n_expert, model.n_expert_used
    blocks = list(model.moe_layers)
    n_layer = len(blocks)
    rand = k / e

    # RQ3a: same experts repeatedly (concentrated popularity or short-range reuse)
    concentrated = pop["top_k_coverage"] >= th.repeat_lift * rand
    reused = np.nan_to_num(reuse["within_1"]) >= th.repeat_lift * rand
    repeated = concentrated | reused
    # RQ3b: temporal locality beyond popularity
    first = np.nan_to_num(loc["first"])
    local = ((first >= th.locality_lift * loc["first_uniform"])
             & (first - loc["first_independent"] >= th.locality_margin))
    ordered = first - np.nan_to_num(loc["first_shuffled"]) >= th.locality_margin
    any_ = np.nan_to_num(loc["any"])
    local_any = (any_ > loc["any_uniform"]) & (any_ - loc["any_independent"] >= th.locality_margin)
    # RQ3c: a simple predictor's top-k recall per layer
    held = o["heldout_recall"]
    heldout = bool(np.isfinite(held["popularity"]).any())
    if heldout:
        pop_rec, prev_rec = held["popularity"], held["previous_layer"]
    else:  # one sequence: nothing to hold out
        pop_rec = pop["top_k_coverage"]
        prev_rec = np.concatenate([[np.nan], np.asarray(cross["topk_recall"], dtype=float)])
    cands = {"previous token": np.nan_to_num(loc["overlap"]),
             "popularity": np.nan_to_num(pop_rec),
             "previous layer": np.nan_to_num(prev_rec)}
    names = list(cands)
    stack = np.stack([cands[n] for n in names])
    best_idx = stack.argmax(axis=0)
    best = stack.max(axis=0)
    predictable = best >= th.predictor_lift * rand
    best_names = [names[i] for i in best_idx]
    # RQ4: uniform access
    dead = pop["dead"].sum(axis=-1)
    skewed = (pop["gini"] > th.skew_gini) | (pop["max_share_ratio"] >= th.skew_ratio) | (dead > 0)
    # cross-layer affinity
    affine = ((cross["nmi"] > th.nmi) & (cross["mi_bits"] > 2 * cross["mi_baseline_bits"])
              if len(cross["nmi"]) else np.zeros(0, dtype=bool))
    # domains
    div = summary["divergence"]
    floor = np.nan_to_num(div["floor"], nan=0.0)
    dom_hits = {f"{p['a']} vs {p['b']}": (p["jsd"] >= np.maximum(th.domain_floor_factor * floor,
                                                                   th.domain_jsd_min))
                for p in div["pairs"]}

    v_rep, v_loc, v_pred = _verdict(repeated, th), _verdict(local, th), _verdict(predictable, th)
    v_skew = _verdict(skewed, th)
    uniform_holds = {"yes": "no", "partly": "partly", "no": "yes"}[v_skew] \
        if v_skew != "undetermined" else "undetermined"
    if uniform_holds == "yes" and local.any():
        uniform_holds = "partly"  # uniform in aggregate but not in time

    def layer_word(hits: np.ndarray) -> str:
        return f"{int(np.sum(hits))} of {len(hits)} layers (blocks {_layers(hits, blocks)})"

    rq3 = [
        f"**Same experts repeatedly: {v_rep}.** The k={k} most used experts of a layer take "
        f"{_range(pop['top_k_coverage'])} of its selections (uniform: {_pct(rand)}); an expert "
        f"selected for a token is selected again for the next token {_range(reuse['within_1'])}"
        f" of the time (uniform: {_pct(rand)}) and within 8 tokens "
        f"{_range(reuse['within_8'])} (uniform: {_pct(reuse['uniform_within_8'])}). "
        f"Criterion (either ≥ {th.repeat_lift}× k/E) met on {layer_word(repeated)}.",
        f"**Temporal locality: {v_loc}.** Consecutive tokens keep their first-choice expert "
        f"{_range(loc['first'])} of the time against {_pct(loc['first_uniform'])} for uniform "
        f"routing and {_range(loc['first_independent'])} for independent tokens with the "
        f"observed popularity; their top-{k} sets share an expert {_range(loc['any'])} of the "
        f"time (uniform {_pct(loc['any_uniform'])}, independent "
        f"{_range(loc['any_independent'])}). Criterion (first-choice keep rate ≥ "
        f"{th.locality_lift}× 1/E and ≥ {100 * th.locality_margin:g} percentage points above "
        f"the independent baseline) met on {layer_word(local)}; the top-{k} overlap is above "
        f"uniform and ≥ {100 * th.locality_margin:g} points above independent on "
        f"{layer_word(local_any)}. Shuffling the tokens inside each sequence (keeping each "
        f"sequence's own experts) gives a first-choice keep rate of "
        f"{_range(loc['first_shuffled'])}: the part of the excess over independent tokens "
        f"that a per-sequence working set explains; the order of tokens adds ≥ "
        f"{100 * th.locality_margin:g} points beyond it on {layer_word(ordered)}.",
        f"**A predictor can be built: {v_pred}.** The best of three simple predictors of a "
        f"layer's top-{k} set reaches a recall of {_range(best)} against {_pct(rand)} for "
        f"guessing (the previous token's set: {_range(cands['previous token'])}; the "
        f"layer's {k} most popular experts: {_range(pop_rec)}; a table keyed on the previous "
        f"layer's first choice: {_range(prev_rec[1:])}; best per layer: "
        + ", ".join(f"{blocks[i]}: {best_names[i]}" for i in range(n_layer))
        + f"). Criterion (recall ≥ {th.predictor_lift}× k/E) met on "
        f"{layer_word(predictable)}. "
        + ("The two fitted predictors are scored on held-out sequences (fitted on alternate "
           "sequences of each domain, 2-fold)." if heldout else
           "With one sequence the fitted predictors are scored in-sample (optimistic).")
        + " A learned predictor has to beat these numbers to be worth its cost.",
    ]
    if len(affine):
        rq3.append(
            f"**Cross-layer affinity:** the first choice at one layer carries "
            f"{_range(cross['mi_bits'], lambda x: f'{x:.3f}')} bits about the next layer's "
            f"(independence baseline {_range(cross['mi_baseline_bits'], lambda x: f'{x:.3f}')}"
            f" bits; {_range(cross['nmi'])} of the next layer's entropy); a lookup on it "
            f"predicts the next first choice {_range(cross['first_accuracy'])} of the time "
            f"(most popular expert: {_range(cross['first_accuracy_baseline'])}). Criterion "
            f"(NMI > {th.nmi} and MI > 2× baseline) met on {int(affine.sum())} of "
            f"{len(affine)} adjacent layer pairs.")
    rq4 = [
        f"**Uniform access holds: {uniform_holds}.** Per layer the Gini coefficient of expert "
        f"usage is {_range(pop['gini'], lambda x: f'{x:.3f}')} (0 = uniform), the most used "
        f"expert gets {_range(pop['max_share_ratio'], lambda x: f'{x:.2f}×')} and the least "
        f"used {_range(pop['min_share_ratio'], lambda x: f'{x:.2f}×')} its uniform share "
        f"(1/E), Zipf slope {_range(pop['zipf_slope'], lambda x: f'{x:.2f}')}; "
        f"{int(dead.sum())} expert slots are never used and {int(pop['hot'].sum())} are hot "
        f"(≥ 2× uniform share). Criterion for non-uniform (Gini > {th.skew_gini}, or max "
        f"share ≥ {th.skew_ratio}× uniform, or a dead expert) met on {layer_word(skewed)}. "
        f"Sampling noise of a share is about ±{_pct(pop['share_noise'])} relative.",
    ]
    if local.any():
        rq4.append(f"Access is also not uniform in time: {layer_word(local)} keep their "
                   "first-choice expert across consecutive tokens more often than "
                   "independent tokens would.")
    if dom_hits:
        dom = [f"**Domain dependence ({name}): {_verdict(hits, th)}.** Jensen–Shannon "
               f"divergence of per-layer usage {_range(p['jsd'], lambda x: f'{x:.4f}')} bits "
               f"against a split-half floor of {_range(div['floor'], lambda x: f'{x:.4f}')} "
               f"bits; criterion (≥ {th.domain_floor_factor}× floor and ≥ {th.domain_jsd_min}"
               f" bits) met on {layer_word(hits)}."
               for (name, hits), p in zip(dom_hits.items(), div["pairs"])]
    else:
        dom = [f"**Domain dependence: undetermined** — the trace has one domain "
               f"({', '.join(div['domains'])})."]
    return {
        "rq3": {"same_experts_repeatedly": v_rep, "temporal_locality": v_loc,
                "predictor_feasible": v_pred, "text": rq3},
        "rq4": {"uniform_access_holds": uniform_holds, "text": rq4},
        "domains": {"verdicts": {n: _verdict(h, th) for n, h in dom_hits.items()}, "text": dom},
        "per_layer": {"block": blocks, "repeated": repeated, "concentrated": concentrated,
                      "reused": reused, "temporal_locality": local, "topk_locality": local_any,
                      "order_locality": ordered,
                      "predictable": predictable, "best_predictor": best_names,
                      "predictor_recall": cands, "predictor_recall_heldout": heldout,
                      "best_recall": best, "non_uniform": skewed, "dead": dead,
                      "cross_layer_affine": affine,
                      "domain_dependent": dom_hits},
    }


# --- tables --------------------------------------------------------------------------


def locality_table(summary: dict[str, Any], blocks: Sequence[int],
                   decode: bool = False) -> tuple[list[str], list[list[str]]]:
    """Mixtral-paper Table 5 layout: rows layers; first-choice and any-of-top-k keep rates
    (all tokens, then per domain) next to their uniform and independent baselines."""
    key = "locality_decode" if decode else "locality"
    o = summary["overall"][key]
    doms = list(summary["by_domain"]) if len(summary["by_domain"]) > 1 else []
    by = {d: summary["by_domain"][d][key] for d in doms}
    headers = (["layer", "1st: all"] + [f"1st: {d}" for d in doms]
               + ["1st: uniform", "1st: indep.", "1st: shuffled", "top-k: all"]
               + [f"top-k: {d}" for d in doms]
               + ["top-k: uniform", "top-k: indep.", "top-k: shuffled"])
    rows = []
    for i, b in enumerate(blocks):
        rows.append([str(b), _pct(o["first"][i])] + [_pct(by[d]["first"][i]) for d in doms]
                    + [_pct(o["first_uniform"]), _pct(o["first_independent"][i]),
                       _pct(o["first_shuffled"][i]), _pct(o["any"][i])]
                    + [_pct(by[d]["any"][i]) for d in doms]
                    + [_pct(o["any_uniform"]), _pct(o["any_independent"][i]),
                       _pct(o["any_shuffled"][i])])
    return headers, rows


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# --- figures -------------------------------------------------------------------------


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def fig_popularity(path: Path, share_vs_uniform: np.ndarray, blocks: Sequence[int]) -> None:
    fig = _figure(max(6.5, 0.25 * share_vs_uniform.shape[1] + 2), 0.4 * len(blocks) + 1.8)
    ax = fig.add_subplot()
    ratio = np.log2(np.clip(np.nan_to_num(share_vs_uniform), 1 / 8, 8))
    im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (block)")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_title("expert usage / uniform share (log2; blue = rare, red = hot)")
    cb = fig.colorbar(im, ax=ax)
    cb.set_ticks([-3, -2, -1, 0, 1, 2, 3], labels=["≤1/8", "1/4", "1/2", "1", "2", "4", "≥8"])
    fig.savefig(path)


def fig_locality(path: Path, loc: dict[str, Any], blocks: Sequence[int], k: int) -> None:
    fig = _figure(9, 3.6)
    x = np.arange(len(blocks))
    for j, (key, title) in enumerate((("first", "first choice kept"),
                                      ("any", f"top-{k} sets share an expert"))):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.bar(x, loc[key], color="tab:blue", label="observed")
        ax.plot(x, loc[f"{key}_independent"], "o-", color="tab:orange",
                label="independent (same popularity)")
        ax.plot(x, loc[f"{key}_shuffled"], "s-", color="tab:green",
                label="each sequence shuffled")
        ax.axhline(loc[f"{key}_uniform"], color="k", ls="--", label="uniform")
        ax.set_xticks(x, [str(b) for b in blocks])
        ax.set_xlabel("layer (block)")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        if j == 0:
            ax.set_ylabel("P(consecutive tokens)")
            ax.legend(fontsize=7)
    fig.savefig(path)


def fig_reuse(path: Path, reuse: dict[str, Any], blocks: Sequence[int]) -> None:
    fig = _figure(9, 3.6)
    hist = np.asarray(reuse["hist"], dtype=np.float64)[:, 1:-1]
    tot = np.asarray(reuse["hist"], dtype=np.float64)[:, 1:].sum(axis=1, keepdims=True)
    pmf = np.divide(hist, tot, out=np.zeros_like(hist), where=tot > 0)
    pmf[pmf == 0] = np.nan  # log axis: leave gaps, not drops to zero
    d = np.arange(1, hist.shape[1] + 1)
    geo_cdf = np.asarray(reuse["uniform_cdf"])
    geo_pmf = np.diff(np.concatenate([[0.0], geo_cdf]))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    cmap = _cmap("viridis")
    for i, b in enumerate(blocks):
        c = cmap(i / max(len(blocks) - 1, 1))
        ax1.plot(d, pmf[i], color=c, lw=1, label=str(b))
        ax2.plot(d, reuse["cdf"][i], color=c, lw=1)
    ax1.plot(d, geo_pmf, "k--", lw=1.5, label="uniform")
    ax2.plot(d, geo_cdf, "k--", lw=1.5)
    ax1.set_yscale("log")
    if np.isfinite(pmf).any():
        ax1.set_ylim(bottom=0.5 * float(np.nanmin(pmf)))
    ax1.set_xlabel("tokens since the expert was last used")
    ax1.set_ylabel("share of reuses")
    ax1.set_title("reuse distance")
    ax1.legend(fontsize=6, ncol=2, title="block", title_fontsize=6)
    ax2.set_xscale("log")
    ax2.set_xlabel("reuse distance d")
    ax2.set_ylabel("P(distance ≤ d)")
    ax2.set_title("reuse distance CDF")
    fig.savefig(path)


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def _shown_pairs(n_pairs: int) -> list[int]:
    return sorted({0, n_pairs // 2, n_pairs - 1}) if n_pairs > 0 else []


def fig_transitions(path: Path, trans: np.ndarray, blocks: Sequence[int]) -> None:
    shown = _shown_pairs(len(trans))
    fig = _figure(3.6 * len(shown) + 0.8, 3.6)
    for j, p in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), j + 1)
        c = trans[p].astype(np.float64)
        tot = c.sum(axis=1, keepdims=True)
        m = np.divide(c, tot, out=np.full_like(c, np.nan), where=tot > 0)
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"block {blocks[p]} → {blocks[p + 1]}", fontsize=9)
        ax.set_xlabel(f"1st choice at {blocks[p + 1]}")
        ax.set_ylabel(f"1st choice at {blocks[p]}")
    if shown:
        fig.colorbar(im, ax=fig.axes, label="P(next | this)")
    fig.savefig(path)


def fig_mi(path: Path, cross: dict[str, Any], blocks: Sequence[int]) -> None:
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    n = len(cross["mi_bits"])
    x = np.arange(n)
    ax.bar(x - 0.2, cross["mi_bits"], 0.4, label="MI (first choices)")
    ax.bar(x + 0.2, cross["mi_baseline_bits"], 0.4, color="gray", label="independence baseline")
    ax.plot(x, cross["h_next_bits"], "k_", ms=18, label="H(next layer)")
    ax.set_xticks(x, [f"{blocks[i]}→{blocks[i + 1]}" for i in range(n)])
    ax.set_xlabel("adjacent layer pair (blocks)")
    ax.set_ylabel("bits")
    ax.set_title("cross-layer mutual information")
    ax.legend(fontsize=7)
    fig.savefig(path)


def fig_domains(path: Path, summary: dict[str, Any], blocks: Sequence[int]) -> None:
    div = summary["divergence"]
    fig = _figure(9, 3.6)
    x = np.arange(len(blocks))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for p in div["pairs"]:
        ax1.plot(x, p["jsd"], "o-", label=f"{p['a']} vs {p['b']}")
    ax1.plot(x, div["floor"], "k--", label="split-half floor")
    ax1.set_xticks(x, [str(b) for b in blocks])
    ax1.set_xlabel("layer (block)")
    ax1.set_ylabel("JSD (bits)")
    ax1.set_title("usage divergence between domains")
    ax1.legend(fontsize=7)
    doms = list(summary["by_domain"])
    w = 0.8 / max(len(doms), 1)
    for j, d in enumerate(doms):
        ax2.bar(x + (j - (len(doms) - 1) / 2) * w, summary["by_domain"][d]["locality"]["first"],
                w, label=d)
    ax2.axhline(summary["overall"]["locality"]["first_uniform"], color="k", ls="--",
                label="uniform")
    ax2.set_xticks(x, [str(b) for b in blocks])
    ax2.set_xlabel("layer (block)")
    ax2.set_ylabel("first choice kept")
    ax2.set_title("temporal locality per domain")
    ax2.legend(fontsize=7)
    fig.savefig(path)


# --- writing -------------------------------------------------------------------------


def to_jsonable(x: Any) -> Any:
    """numpy → lists; NaN and ±inf → None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "f":
            return to_jsonable(x.tolist())
        return x.tolist()
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_report(out: Path, summary: dict[str, Any], answers: dict[str, Any],
                 model: ModelInfo, th: Thresholds, *, trace_dir: Path, n_prompt: int,
                 command: str | None = None) -> list[str]:
    """Write figures, report.md and report.json into ``out``; returns the file names."""
    o = summary["overall"]
    blocks = list(model.moe_layers)
    k, e = model.n_expert_used, model.n_expert
    figs: dict[str, str] = {}

    def fig(name: str, fn: Any, *args: Any) -> None:
        fn(out / name, *args)
        figs[name] = name

    fig("popularity.png", fig_popularity, o["popularity"]["share_vs_uniform"], blocks)
    fig("locality.png", fig_locality, o["locality"], blocks, k)
    fig("reuse_distance.png", fig_reuse, o["reuse"], blocks)
    if len(o["cross_layer"]["mi_bits"]):
        fig("transitions.png", fig_transitions, o["cross_layer"]["transition_counts"], blocks)
        fig("mutual_information.png", fig_mi, o["cross_layer"], blocks)
    if len(summary["by_domain"]) > 1:
        fig("domains.png", fig_domains, summary, blocks)

    md = render_markdown(summary, answers, model, th, trace_dir=trace_dir, n_prompt=n_prompt,
                         figures=figs, command=command)
    (out / REPORT_MD).write_text(md)
    doc = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "command": command,
        "trace_dir": str(trace_dir), "model": asdict(model), "n_expert": e,
        "n_expert_used": k, "thresholds": asdict(th), "answers": answers,
        "figures": sorted(figs),
        "notes": {
            "layers": "index i of every per-layer list is MoE layer i = GGUF block "
                      "model.moe_layers[i]; cross_layer lists index pairs (i, i+1)",
            "reuse.hist": "columns: first use in the sequence, distance 1..max_distance, "
                          "beyond max_distance",
            "transition_counts": "[pair][i][j]: tokens with first choice i at layer i and "
                                 "j at the next layer",
        },
        **summary,
    }
    doc = _readable_masks(doc)
    (out / REPORT_JSON).write_text(json.dumps(to_jsonable(doc), indent=1, allow_nan=False))
    return [REPORT_MD, REPORT_JSON, *sorted(figs)]


def _readable_masks(doc: dict[str, Any]) -> dict[str, Any]:
    """Expert masks → lists of expert ids per layer (same structure otherwise)."""
    def fix(block: dict[str, Any]) -> dict[str, Any]:
        pop = dict(block["popularity"])
        for name in ("dead", "hot"):
            pop[f"{name}_experts"] = [np.flatnonzero(r).tolist() for r in pop.pop(name)]
        return {**block, "popularity": pop}

    return {**doc, "overall": fix(doc["overall"]),
            "by_domain": {d: fix(b) for d, b in doc["by_domain"].items()}}


def render_markdown(summary: dict[str, Any], answers: dict[str, Any], model: ModelInfo,
                    th: Thresholds, *, trace_dir: Path, n_prompt: int,
                    figures: dict[str, str], command: str | None = None) -> str:
    o = summary["overall"]
    pop, reuse, cross = o["popularity"], o["reuse"], o["cross_layer"]
    blocks = list(model.moe_layers)
    k, e = model.n_expert_used, model.n_expert
    doms = summary["by_domain"]
    lines: list[str] = []
    add = lines.append
    add(f"# Routing analysis: {model.arch}, {e} experts, top-{k}, {len(blocks)} MoE layers")
    add("")
    add(f"- trace: `{trace_dir}` — {o['n_sequences']} sequences, {o['n_tokens']} tokens "
        f"({n_prompt} prompt, {o['n_tokens'] - n_prompt} generated), "
        f"{o['locality']['n_pairs']} consecutive-token pairs")
    add("- domains: " + ", ".join(f"{d} ({b['n_sequences']} sequences, {b['n_tokens']} tokens)"
                                  for d, b in doms.items()))
    add(f"- model: `{Path(model.path).name}` sha256 `{model.sha256[:16]}…`, MoE blocks "
        f"{blocks[0]}–{blocks[-1]}" if blocks else "- model: no MoE layers")
    if command:
        add(f"- produced by: `{command}`")
    add("- all numbers: `report.json`; layer = GGUF block index")
    add("")
    add("## Answers")
    add("")
    add("### RQ3 — Are the same experts activated repeatedly? Is there temporal locality? "
        "Can a predictor be built?")
    add("")
    lines += [f"- {t}" for t in answers["rq3"]["text"]]
    add("")
    add("### RQ4 — Does the assumption that parameters are accessed uniformly hold?")
    add("")
    lines += [f"- {t}" for t in answers["rq4"]["text"]]
    add("")
    add("### Domain dependence")
    add("")
    lines += [f"- {t}" for t in answers["domains"]["text"]]
    add("")
    add("Thresholds (`Thresholds` in `expertpred/lab/analysis/report.py`): " + ", ".join(
        f"`{n}={v}`" for n, v in asdict(th).items()) + ". A verdict is *yes* when the "
        f"criterion holds on more than {th.majority:.0%} of layers, *partly* on some, *no* on "
        "none.")
    add("")

    add("## 1. Expert popularity")
    add("")
    add(f"Share of a layer's selections per expert relative to uniform (1/E = {1 / e:.4f}); "
        f"top-k coverage = share taken by the {k} most used experts (uniform {k / e:.1%}).")
    add("")
    rows = [[str(b), f"{pop['gini'][i]:.3f}", _num(pop["zipf_slope"][i], 2),
             _pct(pop["top_k_coverage"][i]), f"{pop['max_share_ratio'][i]:.2f}×",
             f"{pop['min_share_ratio'][i]:.2f}×",
             _ids(pop["dead"][i]), _ids(pop["hot"][i])] for i, b in enumerate(blocks)]
    add(_md_table(["layer", "Gini", "Zipf slope", "top-k coverage", "max share", "min share",
                   "dead experts", "hot experts (≥2×)"], rows))
    add("")
    add(f"![expert popularity]({figures['popularity.png']})")
    add("")

    add("## 2. Temporal locality (layout of Mixtral paper, Table 5)")
    add("")
    add("Share of consecutive-token pairs that keep the first-choice expert (*1st*) or whose "
        f"top-{k} sets share at least one expert (*top-k*). *uniform*: independent tokens, "
        f"uniform routing (1/E; 1 − C(E−k,k)/C(E,k)); *indep.*: independent tokens with the "
        "observed popularity (all tokens of the trace shuffled); *shuffled*: the tokens of "
        "each sequence in random order (each sequence keeps its own expert usage, so the gap "
        "to it is due to token order).")
    add("")
    add(_md_table(*locality_table(summary, blocks)))
    add("")
    if o["locality_decode"]["n_pairs"]:
        add(f"Generated tokens only ({o['locality_decode']['n_pairs']} pairs, the phase a "
            "prefetcher serves):")
        add("")
        add(_md_table(*locality_table(summary, blocks, decode=True)))
        add("")
    add(f"![temporal locality]({figures['locality.png']})")
    add("")

    add("## 3. Reuse distance")
    add("")
    add("Tokens since a selected expert was last selected in the same sequence. *cold* = "
        f"first use in the sequence. Uniform routing gives a geometric distribution with "
        f"p = k/E: P(d ≤ 1) = {_pct(reuse['uniform_within_1'])}, "
        f"P(d ≤ 8) = {_pct(reuse['uniform_within_8'])}, median "
        f"{_geo_median(k / e)}.")
    add("")
    rows = [[str(b), _pct(reuse["cold_share"][i]), _pct(reuse["within_1"][i]),
             _pct(reuse["within_8"][i]), _num(reuse["median"][i], 0)]
            for i, b in enumerate(blocks)]
    add(_md_table(["layer", "cold", "P(d ≤ 1)", "P(d ≤ 8)", "median d"], rows))
    add("")
    add(f"![reuse distance]({figures['reuse_distance.png']})")
    add("")

    add("## 4. Cross-layer affinity")
    add("")
    if len(cross["mi_bits"]):
        add("Mutual information between the first choices of adjacent layers; baseline = "
            "expected plug-in MI of independent layers with this sample size (Miller–Madow). "
            "*lookup*: predict the next layer from a table keyed on this layer's first choice "
            "(in-sample; *held-out*: table fitted on the other half of the sequences); "
            "*popular*: always predict the next layer's most used experts (in-sample).")
        add("")
        rows = [[f"{blocks[i]}→{blocks[i + 1]}", f"{cross['mi_bits'][i]:.3f}",
                 f"{cross['mi_baseline_bits'][i]:.3f}", f"{cross['h_next_bits'][i]:.3f}",
                 _pct(cross["nmi"][i]), _pct(cross["first_accuracy"][i]),
                 _pct(cross["first_accuracy_baseline"][i]), _pct(cross["topk_recall"][i]),
                 _pct(o["heldout_recall"]["previous_layer"][i + 1]),
                 _pct(cross["topk_recall_baseline"][i])] for i in range(len(cross["mi_bits"]))]
        add(_md_table(["pair", "MI (bits)", "baseline", "H(next)", "MI / H(next)",
                       "1st acc. lookup", "1st acc. popular", f"top-{k} recall lookup",
                       "… held-out", f"top-{k} recall popular"], rows))
        add("")
        add(f"![transition matrices]({figures['transitions.png']})")
        add("")
        add(f"![mutual information]({figures['mutual_information.png']})")
    else:
        add("One MoE layer: no layer pairs.")
    add("")

    add("## 5. Domain dependence")
    add("")
    div = summary["divergence"]
    if div["pairs"]:
        add("Jensen–Shannon divergence (bits, 0 = same usage, 1 = disjoint) of per-layer "
            "expert usage between domains; floor = divergence between two halves "
            "(alternate sequences) of the same domain, i.e. sampling noise.")
        add("")
        headers = ["layer"] + [f"{p['a']} vs {p['b']}" for p in div["pairs"]] + ["floor"]
        rows = [[str(b)] + [f"{p['jsd'][i]:.4f}" for p in div["pairs"]]
                + [_num(div["floor"][i], 4)] for i, b in enumerate(blocks)]
        add(_md_table(headers, rows))
        add("")
        add("Per domain (mean over layers):")
        add("")
        rows = []
        for d, b in doms.items():
            bl = b["locality"]
            rows.append([d, str(b["n_tokens"]), f"{np.nanmean(b['popularity']['gini']):.3f}",
                         _pct(np.nanmean(b["popularity"]["top_k_coverage"])),
                         _pct(_nanmean(bl["first"])), _pct(np.nanmean(bl["first_independent"])),
                         _pct(_nanmean(bl["any"])), _pct(np.nanmean(bl["any_independent"])),
                         _pct(_nanmean(b["reuse"]["within_8"]))])
        add(_md_table(["domain", "tokens", "Gini", "top-k coverage", "1st kept", "1st indep.",
                       "top-k shared", "top-k indep.", "P(d ≤ 8)"], rows))
        add("")
        add(f"![domains]({figures['domains.png']})")
    else:
        add(f"The trace has one domain ({', '.join(div['domains'])}); nothing to compare.")
    add("")
    return "\n".join(lines)


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _ids(mask: np.ndarray, limit: int = 12) -> str:
    idx = np.flatnonzero(mask).tolist()
    if not idx:
        return "–"
    s = ", ".join(map(str, idx[:limit]))
    return s + (f" (+{len(idx) - limit})" if len(idx) > limit else "")


def _geo_median(p: float) -> str:
    return f"{math.ceil(math.log(0.5) / math.log(1 - p))}" if 0 < p < 1 else "1"


__all__ = ["Analysis", "AnalysisError", "Thresholds", "analyze_trace", "derive_answers",
           "load_routing", "locality_table", "render_markdown", "to_jsonable", "write_report"]
