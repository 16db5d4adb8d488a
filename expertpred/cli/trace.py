"""``trace`` and ``analyze``: routing into a dataset, and what it looks like."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..units import human_bytes
from .app import app, console, flag

if TYPE_CHECKING:
    from ..trace.run import TraceRunConfig, TraceRunResult


@app.command()
def trace(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to trace."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt file: JSONL or plain text."),
    out: Path = typer.Option(..., "--out", help="Dataset directory (created)."),
    split: str = typer.Option(None, "--split", help="Only prompts of this split."),
    domain: str = typer.Option(None, "--domain", help="Only prompts of this domain."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N selected prompts."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=0, help="Tokens to generate."),
    n_ctx: int = typer.Option(512, "--n-ctx", min=8, help="llama.cpp context size."),
    threads: int = typer.Option(2, "--threads", min=1, help="llama.cpp threads."),
    hidden: bool = flag("--hidden", help="Also store router inputs (large)."),
    sampled: bool = flag("--sampled", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="With --sampled."),
    top_k: int = typer.Option(40, "--top-k", min=0, help="With --sampled; 0 = off."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="With --sampled."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (sequence i uses seed + i)."),
    resume: bool = flag("--resume", help="Continue a killed or shorter run."),
    shard_rows: int = typer.Option(32768, "--shard-rows", min=1, help="Rows per shard."),
    exact: bool = flag("--exact", help="Exact numerics: no flash attention, f32 KV cache "
                                       "(router top-k then matches transformers on near-ties; "
                                       "slower)."),
    workers: int = typer.Option(1, "--workers", min=1,
                                help="llama.cpp processes tracing disjoint prompt chunks into "
                                     "the one dataset; --threads is split among them (more "
                                     "workers than prompts left: one per prompt)."),
) -> None:
    """Trace the router of every MoE layer for each prompt into a Parquet dataset directory."""
    from ..trace.run import TraceRunConfig

    cfg = TraceRunConfig(model=model, prompts=prompts, out=out, split=split, domain=domain,
                         limit=limit, max_tokens=max_tokens, n_ctx=n_ctx, threads=threads,
                         hidden=hidden, sampled=sampled, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, resume=resume, shard_rows=shard_rows,
                         exact=exact, workers=workers)
    print_trace_run(trace_prompts_with_progress(cfg))


class _RichTraceProgress:
    """A spinner while the model is hashed, then a bar per traced prompt."""

    def __init__(self, cfg: TraceRunConfig) -> None:
        self._cfg = cfg
        self._status = console.status(f"hashing {cfg.model}")
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> _RichTraceProgress:
        self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._status.stop()
        if self._bar is not None:
            self._bar.stop()

    def start(self, todo: int, selected: int) -> None:
        self._status.stop()
        if todo < selected:
            console.print(f"{self._cfg.out}: {selected - todo} of {selected} selected prompts "
                          "already traced; skipping them")
        if todo:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[tps]:>7.1f} tok/s"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self._task = self._bar.add_task("tracing", total=todo, tps=0.0)
            self._bar.start()

    def advance(self, tokens: int, seconds: float) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, tps=tokens / max(seconds, 1e-9))


def trace_prompts_with_progress(cfg: TraceRunConfig) -> TraceRunResult:
    """:func:`~expertpred.trace.run.trace_prompts` with a progress bar on the console."""
    from ..trace.run import trace_prompts

    with _RichTraceProgress(cfg) as progress:
        return trace_prompts(cfg, progress)


def print_trace_run(res: TraceRunResult) -> None:
    ds = res.dataset
    n_layer = max(1, ds.n_moe_layer)
    t = Table(title=f"trace {ds.path}", show_header=False)
    t.add_row("sequences (this run / dataset)", f"{res.n_traced} / {ds.n_sequences}")
    t.add_row("tokens (this run / dataset)", f"{res.tokens} / {ds.n_rows}")
    t.add_row("shards", str(len(ds.shards)))
    t.add_row("bytes", human_bytes(ds.n_bytes))
    if ds.n_rows:
        t.add_row("bytes / token / layer", f"{ds.n_bytes / ds.n_rows / n_layer:.1f}")
    wall = res.seconds
    t.add_row("wall time", f"{wall:.1f} s" + (f" ({res.tokens / wall:.0f} tok/s)"
                                              if res.tokens else ""))
    console.print(t)


@app.command()
def analyze(
    trace_dir: Path = typer.Argument(..., help="A trace dataset directory (_manifest.json)."),
    out: Path = typer.Option(..., "--out", help="Report directory (replaced atomically)."),
    max_distance: int = typer.Option(64, "--max-distance",
                                     help="Longest reuse distance binned separately."),
) -> None:
    """Routing statistics of a trace (popularity, temporal locality, reuse distance,
    cross-layer affinity, domains) and what they answer (are the same experts used again,
    can a predictor be built, is access uniform): figures, report.md and report.json in
    --out."""
    from ..lab.analysis.report import analyze_trace, locality_table

    command = f"expertpred analyze {trace_dir} --out {out}"
    if max_distance != 64:
        command += f" --max-distance {max_distance}"
    res = analyze_trace(trace_dir, out, max_distance=max_distance, command=command)
    m, v = res.model, res.verdicts
    headers, rows = locality_table(res.summary, m.moe_layers)
    split = headers.index("top-k: all")
    console.print(f"Temporal locality: {m.arch}, {m.n_expert} experts, top-{m.n_expert_used}; "
                  f"{v.n_sequences} sequences, {v.n_pairs} token pairs")
    for title, cols in (("first choice kept by the next token (%)", [0, *range(1, split)]),
                        (f"top-{m.n_expert_used} sets share an expert (%)",
                         [0, *range(split, len(headers))])):
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
        for c in cols:
            h = headers[c].split(": ")[-1]
            t.add_column(h, justify="right", no_wrap=True, min_width=len(h),
                         style="bold" if h == "all" else None)
        for r in rows:
            t.add_row(*(r[c].rstrip("%") for c in cols))
        console.print(t)
    console.print(f"same experts repeatedly: [bold]{v.same_experts_repeatedly}[/]  "
                  f"temporal locality: [bold]{v.temporal_locality}[/]  "
                  f"predictor feasible: [bold]{v.predictor_feasible}[/]  "
                  f"uniform access holds: [bold]{v.uniform_access_holds}[/]")
    for name, verdict in v.domains.items():
        console.print(f"domain dependence ({name}): [bold]{verdict}[/]")
    console.print(f"report: {res.out_dir / 'report.md'}")

