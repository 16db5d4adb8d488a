"""``expertpred analyze``: load a trace dataset, compute the routing statistics, write a report.

The report directory holds PNG figures, ``report.md`` (self-contained, figures referenced
relatively) and ``report.json`` (every number). It is written into a hidden temporary
directory next to the target and renamed into place at the end, so a failure never leaves
half a report; an existing report directory is replaced, any other non-empty directory is
refused.

The worded answers (same experts again? temporal locality? a predictor? uniform access?
domain dependence?) are derived from the numbers with the thresholds of
:class:`Thresholds`, which the report states next to each answer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
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
from .answers import Answers, Thresholds, derive_answers
from .figures import write_figures
from .markdown import locality_table, render_markdown
from .records import RoutingReport
from .routing import RoutingData, summarize
from .streaming import COLUMNS, stream_summary

log = logging.getLogger(__name__)

REPORT_FORMAT = "expertpred.routing-report"
REPORT_VERSION = 1
REPORT_MD = "report.md"
REPORT_JSON = "report.json"


class AnalysisError(ExpertPredError):
    """The trace cannot be analysed or the report cannot be written."""


@dataclass(frozen=True)
class Verdicts:
    """The worded answers of a report, as the CLI and other callers read them."""

    same_experts_repeatedly: str  # "yes" / "partly" / "no" / "undetermined"
    temporal_locality: str
    predictor_feasible: str
    uniform_access_holds: str
    domains: dict[str, str]  # "code vs prose" -> verdict; empty with one domain
    n_sequences: int  # sequences analysed
    n_pairs: int  # consecutive-token pairs the locality numbers rest on


@dataclass(frozen=True)
class Analysis:
    """What ``analyze_trace`` computed and where it wrote it."""

    model: ModelInfo
    trace_dir: Path
    out_dir: Path
    summary: RoutingReport  # routing.summarize: report.json's numbers (numpy arrays)
    answers: Answers  # answers.derive_answers; report.json's "answers" is its to_json()

    @property
    def verdicts(self) -> Verdicts:
        a, o = self.answers, self.summary.overall
        return Verdicts(same_experts_repeatedly=a.predictability.same_experts_repeatedly,
                        temporal_locality=a.predictability.temporal_locality,
                        predictor_feasible=a.predictability.predictor_feasible,
                        uniform_access_holds=a.uniform_access.uniform_access_holds,
                        domains=dict(a.domains.verdicts),
                        n_sequences=int(o.n_sequences),
                        n_pairs=int(o.locality.n_pairs))


# --- loading -------------------------------------------------------------------------


def open_trace(trace_dir: str | os.PathLike[str]) -> TraceDataset:
    """Open a trace dataset for analysis (raises AnalysisError on bad input)."""
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
    return ds


def load_routing(trace_dir: str | os.PathLike[str]) -> tuple[RoutingData, TraceDataset]:
    """Open a trace dataset and read the routing columns of all of it into memory (the
    analysis itself streams: :func:`~.streaming.stream_summary`)."""
    ds = open_trace(trace_dir)
    cols = ds.to_numpy(COLUMNS)
    try:
        data = RoutingData.from_arrays(cols["experts"], cols["seq_id"], cols["pos"],
                                       cols["phase"], cols["domain"], ds.n_expert)
    except ValueError as exc:
        raise AnalysisError(f"{ds.path}: {exc}") from None
    log.info("%s: %d sequences, %d tokens, domains %s", ds.path, data.n_sequences,
             data.n_tokens, data.domains)
    return data, ds


def summarize_trace(trace_dir: str | os.PathLike[str], max_distance: int = 64,
                    in_memory: bool = False) -> tuple[RoutingReport, int, TraceDataset]:
    """The routing summary of a dataset and its prompt tokens: streamed shard by shard
    (memory bounded by a shard), or ``in_memory`` (all routing columns at once; kept to
    check the two agree and to measure the difference)."""
    if in_memory:
        data, ds = load_routing(trace_dir)
        return summarize(data, max_distance=max_distance), int((data.phase == 0).sum()), ds
    ds = open_trace(trace_dir)
    try:
        summary, n_prompt = stream_summary(ds, max_distance)
    except ValueError as exc:
        raise AnalysisError(f"{ds.path}: {exc}") from None
    return summary, n_prompt, ds


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
                  command: str | None = None, in_memory: bool = False) -> Analysis:
    """Analyse a trace dataset and write the report directory (all or nothing); the
    statistics stream over the shards unless ``in_memory``."""
    th = thresholds or Thresholds()
    if max_distance < 8:
        raise AnalysisError(f"max_distance={max_distance}; expected >= 8")
    out = Path(out_dir)
    trace = Path(trace_dir)
    if out.resolve() == trace.resolve() or trace.resolve() in out.resolve().parents:
        raise AnalysisError(f"{out}: inside the trace dataset {trace}; expected a report "
                            "directory outside it")
    summary, n_prompt, ds = summarize_trace(trace, max_distance, in_memory)
    tmp = _prepare_output(out)
    try:
        answers = derive_answers(summary, ds.model, th)
        write_report(tmp, summary, answers, ds.model, th, trace_dir=trace,
                     n_prompt=n_prompt, command=command)
        _publish(tmp, out)
    except OSError as exc:
        raise AnalysisError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("report written to %s", out)
    return Analysis(model=ds.model, trace_dir=trace, out_dir=out, summary=summary,
                    answers=answers)


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


def write_report(out: Path, summary: RoutingReport, answers: Answers,
                 model: ModelInfo, th: Thresholds, *, trace_dir: Path, n_prompt: int,
                 command: str | None = None) -> list[str]:
    """Write figures, report.md and report.json into ``out``; returns the file names."""
    k, e = model.n_expert_used, model.n_expert
    figs = write_figures(out, summary, model)
    md = render_markdown(summary, answers, model, th, trace_dir=trace_dir, n_prompt=n_prompt,
                         figures=figs, command=command)
    (out / REPORT_MD).write_text(md)
    doc = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "command": command,
        "trace_dir": str(trace_dir), "model": asdict(model), "n_expert": e,
        "n_expert_used": k, "thresholds": asdict(th), "answers": answers.to_json(),
        "figures": sorted(figs),
        "notes": {
            "layers": "index i of every per-layer list is MoE layer i = GGUF block "
                      "model.moe_layers[i]; cross_layer lists index pairs (i, i+1)",
            "reuse.hist": "columns: first use in the sequence, distance 1..max_distance, "
                          "beyond max_distance",
            "transition_counts": "[pair][i][j]: tokens with first choice i at layer i and "
                                 "j at the next layer",
        },
        **asdict(summary),
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


__all__ = ["Analysis", "AnalysisError", "Answers", "Thresholds", "Verdicts", "analyze_trace",
           "derive_answers", "load_routing", "locality_table", "render_markdown", "to_jsonable",
           "write_report"]
