"""The ``expertpred`` command line. The only module that prints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import ExpertPredError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Predict and prefetch MoE experts for llama.cpp inference.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Predict and prefetch MoE experts for llama.cpp inference."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="A MoE GGUF file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print a MoE GGUF's arch, layers, experts and the share of the file that is experts."""
    from ..gguf.layout import read_layout

    lay = read_layout(model)
    s = lay.summary()
    if as_json:
        console.print_json(json.dumps(s))
        return
    t = Table(title=f"{model}", show_header=False)
    t.add_row("arch", lay.arch)
    t.add_row("layers (MoE / all)", f"{len(lay.moe_layers)} / {lay.n_layer}")
    t.add_row("experts / used per token", f"{lay.n_expert} / {lay.n_expert_used}")
    t.add_row("embedding length", str(lay.n_embd))
    t.add_row("expert tensors", ", ".join(lay.parts))
    t.add_row("bytes per expert", _human(lay.bytes_per_expert()))
    t.add_row("expert weights", f"{_human(lay.expert_bytes)} "
              f"({100 * lay.expert_bytes / lay.file_size:.1f}% of file)")
    if lay.shared:
        t.add_row("shared-expert weights", _human(lay.shared_bytes))
    t.add_row("file size", _human(lay.file_size))
    console.print(t)


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
    hidden: bool = typer.Option(False, "--hidden", help="Also store router inputs (large)."),
    sampled: bool = typer.Option(False, "--sampled", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="With --sampled."),
    top_k: int = typer.Option(40, "--top-k", min=0, help="With --sampled; 0 = off."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="With --sampled."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (sequence i uses seed + i)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed or shorter run."),
    shard_rows: int = typer.Option(32768, "--shard-rows", min=1, help="Rows per shard."),
) -> None:
    """Trace the router of every MoE layer for each prompt into a Parquet dataset directory."""
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..gguf.layout import file_sha256
    from ..trace.dataset import (
        DecodingInfo,
        ManifestInfo,
        ModelInfo,
        PromptSetInfo,
        TraceDataset,
        TraceWriter,
    )
    from ..trace.prompts import load_prompts, read_prompt_file

    selection = load_prompts(prompts, split=split, domain=domain)[:limit]
    with console.status(f"hashing {model}"):
        minfo = ModelInfo.from_gguf(model)  # one-line GGUFError for a dense / bad model
    info = ManifestInfo(
        model=minfo,
        prompts=PromptSetInfo(path=str(prompts), sha256=file_sha256(prompts),
                              n_prompts=len(read_prompt_file(prompts)), split=split,
                              domain=domain, limit=limit, n_selected=len(selection)),
        decoding=DecodingInfo(mode="sampled" if sampled else "greedy",
                              temperature=temperature if sampled else 0.0,
                              top_k=top_k if sampled else 0, top_p=top_p if sampled else 1.0,
                              seed=seed, max_tokens=max_tokens, n_ctx=n_ctx,
                              n_threads=threads),
        capture_hidden=hidden)
    start = time.perf_counter()
    tokens = n_done = 0
    with TraceWriter(out, info, shard_rows=shard_rows, resume=resume) as writer:
        todo = [p for p in selection if p.index not in writer.done_seq_ids]
        if len(todo) < len(selection):
            console.print(f"{out}: {len(selection) - len(todo)} of {len(selection)} selected "
                          "prompts already traced; skipping them")
        if todo:
            from ..trace.llama_tracer import LlamaTracer

            tracer = LlamaTracer(str(model), n_ctx=n_ctx, n_threads=threads,
                                 capture_hidden=hidden, seed=seed)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[tps]:>7.1f} tok/s"), TimeElapsedColumn(),
                       TimeRemainingColumn())
            t_trace = time.perf_counter()
            try:
                with Progress(*columns, console=console) as bar:
                    task = bar.add_task("tracing", total=len(todo), tps=0.0)
                    for p in todo:
                        try:
                            seq = tracer.trace(p.text, max_tokens, greedy=not sampled,
                                               temperature=temperature, top_k=top_k,
                                               top_p=top_p, seed=seed + p.index,
                                               seq_id=p.index, prompt_id=p.id,
                                               domain=p.domain)
                        except ExpertPredError as exc:
                            raise ExpertPredError(f"{prompts}: prompt {p.id!r}: {exc}") from None
                        writer.write(seq, split=p.split)
                        tokens += seq.n_tokens
                        n_done += 1
                        bar.update(task, advance=1,
                                   tps=tokens / (time.perf_counter() - t_trace))
            finally:
                tracer.close()
    wall = time.perf_counter() - start
    ds = TraceDataset(out)
    n_layer = max(1, ds.n_moe_layer)
    t = Table(title=f"trace {out}", show_header=False)
    t.add_row("sequences (this run / dataset)", f"{n_done} / {ds.n_sequences}")
    t.add_row("tokens (this run / dataset)", f"{tokens} / {ds.n_rows}")
    t.add_row("shards", str(len(ds.shards)))
    t.add_row("bytes", _human(ds.n_bytes))
    if ds.n_rows:
        t.add_row("bytes / token / layer", f"{ds.n_bytes / ds.n_rows / n_layer:.1f}")
    t.add_row("wall time", f"{wall:.1f} s" + (f" ({tokens / wall:.0f} tok/s)" if tokens else ""))
    console.print(t)


@app.command()
def analyze(
    trace_dir: Path = typer.Argument(..., help="A trace dataset directory (_manifest.json)."),
    out: Path = typer.Option(..., "--out", help="Report directory (replaced atomically)."),
    max_distance: int = typer.Option(64, "--max-distance",
                                     help="Longest reuse distance binned separately."),
) -> None:
    """Routing statistics of a trace (popularity, temporal locality, reuse distance,
    cross-layer affinity, domains) and the answers to the research questions: figures,
    report.md and report.json in --out."""
    from ..lab.analysis.report import analyze_trace, locality_table

    command = f"expertpred analyze {trace_dir} --out {out}"
    if max_distance != 64:
        command += f" --max-distance {max_distance}"
    res = analyze_trace(trace_dir, out, max_distance=max_distance, command=command)
    m, o = res.model, res.summary["overall"]
    headers, rows = locality_table(res.summary, m.moe_layers)
    split = headers.index("top-k: all")
    console.print(f"Temporal locality: {m.arch}, {m.n_expert} experts, top-{m.n_expert_used}; "
                  f"{o['n_sequences']} sequences, {o['locality']['n_pairs']} token pairs")
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
    a = res.answers
    console.print(f"same experts repeatedly: [bold]{a['rq3']['same_experts_repeatedly']}[/]  "
                  f"temporal locality: [bold]{a['rq3']['temporal_locality']}[/]  "
                  f"predictor feasible: [bold]{a['rq3']['predictor_feasible']}[/]  "
                  f"uniform access holds: [bold]{a['rq4']['uniform_access_holds']}[/]")
    for name, v in a["domains"]["verdicts"].items():
        console.print(f"domain dependence ({name}): [bold]{v}[/]")
    console.print(f"report: {res.out_dir / 'report.md'}")


@app.command()
def demo(
    model: str = typer.Option("tiny-mixtral", "--model",
                              help="Shipped model to trace and learn on."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where traces and reports go."),
    trace_limit: int = typer.Option(150, "--trace-limit", min=10,
                                    help="Prompts of the shipped prompt set to trace."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Tokens generated per prompt."),
    quick: bool = typer.Option(False, "--quick", help="Only show the models (no trace/learn)."),
) -> None:
    """The main job on the shipped defaults, offline: show both shipped models in llama.cpp,
    trace the shipped held-out prompt set on one of them, train the predictor ladder on the
    train prompts, evaluate it on the test prompts and print the table.

    Rerunning resumes the trace (finished prompts are skipped)."""
    import time

    from ..learn.evaluate import evaluate, report_tables, write_report
    from ..learn.train import load_config
    from ..shipped import SHIPPED_MODELS, model_gguf, repo_root

    t0 = time.perf_counter()
    for name in SHIPPED_MODELS:
        _show_model(name, model_gguf(name), max_tokens)
    if quick:
        return
    gguf_path = model_gguf(model)
    prompts = repo_root() / "datasets" / "prompts" / "heldout.jsonl"
    trace_dir = out / f"trace-{model}"
    # --hidden: router inputs make the gate-lookahead rung (and hidden-state features of
    # the learned rungs) possible; ~320 extra bytes per token and layer on tiny-mixtral.
    console.rule(f"[bold]1/2 trace {trace_limit} held-out prompts on {model}[/]")
    trace(model=gguf_path, prompts=prompts, out=trace_dir, split=None, domain=None,
          limit=trace_limit, max_tokens=max_tokens, n_ctx=512, threads=2, hidden=True,
          sampled=False, temperature=0.8, top_k=40, top_p=0.95, seed=0,
          resume=trace_dir.exists(), shard_rows=4096)
    console.rule("[bold]2/2 train the predictor ladder on train prompts, score test prompts[/]")
    config = repo_root() / "training" / "configs" / f"predictors-{model}.toml"
    cfg = load_config(config, [f"--dataset={trace_dir}", f"--out={out / 'predictors'}",
                               "--cross_domain=false"])
    with console.status("fitting and evaluating predictors (popularity … lightgbm, mlp)"):
        report = evaluate(cfg)
    paths = write_report(report, cfg.out, plots=cfg.plots)
    for t in report_tables(report):
        console.print(t)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def _show_model(name: str, path: Path, max_tokens: int) -> None:
    from ..gguf.layout import read_layout

    lay = read_layout(path)
    console.rule(f"[bold]{name}[/]")
    t = Table(show_header=False)
    t.add_row("file", str(path))
    t.add_row("arch / layers", f"{lay.arch} / {lay.n_layer}")
    t.add_row("experts / used", f"{lay.n_expert} / {lay.n_expert_used}")
    t.add_row("bytes per expert", _human(lay.bytes_per_expert()))
    t.add_row("expert share of file", f"{100 * lay.expert_bytes / lay.file_size:.1f}%")
    console.print(t)
    prompt = "def read_config(path):\n"
    text = _generate(path, prompt, max_tokens)
    console.print(f"[dim]greedy continuation of[/] {prompt!r}: {text!r}")


def _generate(path: Path, prompt: str, max_tokens: int) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)
    try:
        out = llm(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]
    finally:
        llm.close()


@app.command()
def widen(
    model: Path = typer.Option(..., "--model", help="Source MoE GGUF."),
    out: Path = typer.Option(..., "--out", help="Output GGUF (written atomically)."),
    expert_mib: float = typer.Option(None, "--expert-mib", help="Target MiB per expert."),
    total_gib: float = typer.Option(None, "--total-gib", help="Target output size in GiB."),
    ff: int = typer.Option(None, "--ff", help="Target expert FFN width."),
    dtype: str = typer.Option("f16", "--dtype", help="Expert weight dtype: f16, f32, q8_0, q4_0."),
) -> None:
    """Zero-pad every expert's FFN width: same routing and outputs, realistic bytes per expert
    (e.g. a multi-GB model to benchmark SSD prefetching)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from ..gguf.widen import plan_widen
    from ..gguf.widen import widen as widen_model

    plan = plan_widen(model, ff=ff, expert_mib=expert_mib, total_gib=total_gib, dtype=dtype,
                      out=out)
    console.print(f"{model}: expert width {plan.old_ff} -> {plan.new_ff} ({plan.dtype}), "
                  f"{_human(plan.old_bytes_per_expert)} -> {_human(plan.bytes_per_expert)} "
                  f"per expert, {_human(plan.data_bytes)} of tensors")
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"writing {out.name}", total=plan.data_bytes)
        res = widen_model(model, out, ff=plan.new_ff, dtype=dtype,
                          progress=lambda done, total: bar.update(task, completed=done))
    console.print(f"wrote {res.path} ({_human(res.file_size)}) in {res.seconds:.1f} s "
                  f"({res.mb_per_s:.0f} MB/s)")


@app.command()
def run(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to run."),
    prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Greedy tokens to generate."),
    mode: str = typer.Option(None, "--mode",
                             help="off | d0 | predictor | oracle (default: predictor with "
                                  "--predictor, oracle with --oracle-trace, else d0)."),
    predictor: Path = typer.Option(None, "--predictor",
                                   help="Saved predictors (expertpred train's <out>/models) "
                                        "or an exported artifact."),
    predictor_name: str = typer.Option(None, "--predictor-name",
                                       help="Which saved predictor (files <name>-d<d>.npz; "
                                            "default: plugin.DEFAULT_PREDICTOR)."),
    source_model: Path = typer.Option(None, "--source-model",
                                      help="The model --model was widened from (the predictor "
                                           "was trained on it)."),
    oracle_trace: Path = typer.Option(None, "--oracle-trace",
                                      help="Recorded trace of the same greedy run (trace "
                                           "dataset directory or oracle .npz)."),
    method: str = typer.Option("fadvise", "--method", help="pread | fadvise | madvise | io_uring"),
    queue_depth: int = typer.Option(8, "--queue-depth", min=1, help="Prefetch queue depth."),
    lookahead: int = typer.Option(None, "--lookahead", min=0,
                                  help="Prefetch layers l+1..l+D (default: "
                                       "plugin.DEFAULT_LOOKAHEAD; 1 for the oracle)."),
    madvise_random: bool = typer.Option(False, "--madvise-random",
                                        help="madvise(MADV_RANDOM) llama.cpp's mapping: no "
                                             "fault read-around."),
    threads: int = typer.Option(2, "--threads", min=1, help="llama.cpp threads."),
    n_ctx: int = typer.Option(512, "--n-ctx", min=8, help="llama.cpp context size."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
) -> None:
    """Generate greedily with the online prefetch plugin and print prefetch statistics."""
    from ..prefetch.plugin import (
        DEFAULT_PREDICTOR,
        OracleTrace,
        PrefetchLlama,
        generate_greedy,
        load_predictors,
        prompt_tokens,
    )

    if mode is None:
        mode = "predictor" if predictor else "oracle" if oracle_trace else "d0"
    preds = oracle = None
    if mode == "predictor":
        if predictor is None:
            raise ExpertPredError("--mode predictor needs --predictor DIR_OR_ARTIFACT")
        preds = load_predictors(predictor, model, name=predictor_name or DEFAULT_PREDICTOR,
                                source_model=source_model)
    if mode == "oracle":
        if oracle_trace is None:
            raise ExpertPredError("--mode oracle needs --oracle-trace DIR_OR_NPZ")
        oracle = OracleTrace.load(oracle_trace, prompt_tokens(model, prompt))
    with PrefetchLlama(model, mode=mode, predictor=preds, oracle=oracle, method=method,
                       queue_depth=queue_depth, lookahead=lookahead,
                       madvise_random=madvise_random, n_ctx=n_ctx, n_threads=threads,
                       n_batch=min(512, n_ctx), seed=0) as llm:
        toks, n_prompt, t_prompt, t_decode = generate_greedy(llm, prompt, max_tokens)
        text = llm.detokenize(toks).decode("utf-8", errors="replace")
        st = llm.prefetch_stats()
    tps = len(toks) / t_decode if t_decode > 0 else 0.0
    if as_json:
        print(json.dumps({"text": text, "generated": toks, "n_prompt": n_prompt,
                          "prompt_s": t_prompt, "decode_s": t_decode, "tokens_per_s": tps,
                          **st.as_dict()}, default=str))
        return
    console.print(f"[dim]prompt:[/] {prompt!r}")
    stop = (f"; stopped: context full (n_ctx {n_ctx}, prompt {n_prompt} tokens)"
            if len(toks) < max_tokens and n_prompt + len(toks) > n_ctx else "")
    console.print(f"[dim]generation ({len(toks)} tokens{stop}):[/] {text!r}", highlight=False)
    t = Table(title=f"prefetch ({st.mode}, lookahead {st.lookahead})", show_header=False)
    t.add_row("decode tokens/s", f"{tps:.2f} ({t_decode:.2f} s; prompt {t_prompt:.2f} s)")
    c = st.counters
    t.add_row("callback errors", str(c.callback_errors) + (f" ({st.first_error})"
                                                            if st.first_error else ""))
    if st.engine is not None:
        e = st.engine.counters
        t.add_row("method / queue depth", f"{st.engine.method} / {st.engine.queue_depth}")
        t.add_row("requests / issued / coalesced", f"{e.requests} / {e.issued} / {e.coalesced}")
        t.add_row("bytes read (or advised)", _human(e.bytes_read))
        t.add_row("uses: hit / late / miss", f"{e.hits} / {e.late} / {e.misses}")
        t.add_row("hit rate", f"{100 * st.engine.hit_rate:.1f}%")
        t.add_row("speculative: issued / used / unused",
                  f"{e.spec_issued} / {e.spec_used} / {e.spec_unused}")
        t.add_row("bytes: demand / speculative / wasted",
                  f"{_human(e.demand_bytes)} / {_human(e.spec_bytes)} / {_human(e.wasted_bytes)}")
        t.add_row("I/O errors", f"{e.failed}" + ("" if st.engine.enabled
                                                 else f" (disabled: {st.engine.disabled_reason})"))
        if c.predictions:
            ms = 1e3 * c.predict_seconds / c.predictions
            t.add_row("predictions", f"{c.predictions} ({ms:.1f} ms each)")
    console.print(t)


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to serve."),
    predictor: Path = typer.Option(None, "--predictor",
                                   help="Saved predictors or an exported artifact (mode "
                                        "predictor)."),
    predictor_name: str = typer.Option(None, "--predictor-name", help="Which saved predictor."),
    source_model: Path = typer.Option(None, "--source-model",
                                      help="The model --model was widened from."),
    mode: str = typer.Option(None, "--mode",
                             help="off | d0 | predictor (default: predictor with --predictor, "
                                  "else d0)."),
    budget: str = typer.Option(None, "--budget",
                               help="Resident expert bytes (e.g. 2GiB); needs the residency "
                                    "manager."),
    host: str = typer.Option("127.0.0.1", "--host", help="Listen address."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Listen port."),
    alias: str = typer.Option("", "--alias", help="Model name for clients (default: stem)."),
    api_key: str = typer.Option(None, "--api-key", help="Require this bearer token."),
    trace_out: Path = typer.Option(None, "--trace-out",
                                   help="Append the routing of served requests to this trace "
                                        "dataset."),
    trace_text: bool = typer.Option(False, "--trace-text",
                                    help="Keep prompt and completion text in the trace."),
    trace_shard_rows: int = typer.Option(4096, "--trace-shard-rows", min=1,
                                         help="Rows per trace shard (a crash loses < this)."),
    method: str = typer.Option("fadvise", "--method", help="pread | fadvise | madvise | io_uring"),
    queue_depth: int = typer.Option(8, "--queue-depth", min=1, help="Prefetch queue depth."),
    lookahead: int = typer.Option(None, "--lookahead", min=0, help="Prefetch layers l+1..l+D."),
    min_share: float = typer.Option(None, "--min-share", min=0.0, max=1.0,
                                    help="Confidence gate on predicted experts."),
    prefetch_k: int = typer.Option(None, "--prefetch-k", min=1,
                                   help="Experts prefetched per look-ahead layer."),
    madvise_random: bool = typer.Option(False, "--madvise-random",
                                        help="madvise(MADV_RANDOM) llama.cpp's mapping."),
    sync_requests: bool = typer.Option(False, "--sync-requests",
                                       help="Engine calls on the inference thread."),
    threads: int = typer.Option(2, "--threads", min=1, help="llama.cpp threads."),
    n_ctx: int = typer.Option(2048, "--n-ctx", min=8, help="llama.cpp context size."),
    n_batch: int = typer.Option(512, "--n-batch", min=1, help="Prompt tokens per decode."),
) -> None:
    """Serve the prefetching model behind an OpenAI-compatible API (llama_cpp.server):
    /v1/completions, /v1/chat/completions, /v1/models, plus Prometheus /metrics."""
    from ..prefetch.plugin import DEFAULT_PREDICTOR, load_predictors
    from ..serve import ServeConfig
    from ..serve import serve as run_server

    if not model.is_file():
        raise ExpertPredError(f"{model}: no such model file (expected a MoE GGUF)")
    mode = mode or ("predictor" if predictor else "d0")
    if mode == "oracle":
        raise ExpertPredError("--mode oracle: not served (an oracle trace is one prompt's "
                              "greedy run); expected off, d0 or predictor")
    plugin: dict = {"mode": mode, "method": method, "queue_depth": queue_depth,
                    "lookahead": lookahead, "min_share": min_share, "prefetch_k": prefetch_k,
                    "madvise_random": madvise_random, "async_requests": not sync_requests}
    if mode == "predictor":
        if predictor is None:
            raise ExpertPredError("--mode predictor needs --predictor DIR_OR_ARTIFACT")
        plugin["predictor"] = load_predictors(predictor, model,
                                              name=predictor_name or DEFAULT_PREDICTOR,
                                              source_model=source_model)
    if budget is not None:
        plugin["budget"] = _bytes(budget, "--budget")
    cfg = ServeConfig(model=model, alias=alias, host=host, port=port, n_ctx=n_ctx,
                      n_batch=n_batch, n_threads=threads, api_key=api_key, trace_out=trace_out,
                      trace_text=trace_text, trace_shard_rows=trace_shard_rows,
                      plugin_kwargs=plugin)
    run_server(cfg, on_ready=lambda c: err_console.print(
        f"serving {model} ({mode}) on http://{c.host}:{c.port}/v1", highlight=False))


def _bytes(text: str, what: str) -> int:
    import re

    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
             "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m[2].lower() not in units:
        raise ExpertPredError(f"{what} {text!r}: expected a size like 512MiB or 2GiB")
    return int(float(m[1]) * units[m[2].lower()])


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ExpertPredError(f"{what} {text!r}: expected comma-separated numbers") from None


def _ints(text: str, what: str, lo: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ExpertPredError(f"{what} {text!r}: expected comma-separated integers") from None
    if not values or (lo is not None and min(values) < lo):
        raise ExpertPredError(f"{what} {text!r}: expected integers >= {lo}")
    return values


@app.command()
def experiment(
    out: Path = typer.Option(..., "--out", help="Directory for grid.csv/json, report.md, plot."),
    model: Path = typer.Option(None, "--model",
                               help="Widened GGUF to run (default: tiny-mixtral widened to "
                                    "--total-gib under /tmp/expertpred-bench/, reused)."),
    source_model: Path = typer.Option(None, "--source-model",
                                      help="The model --model was widened from (default: the "
                                           "shipped tiny-mixtral)."),
    total_gib: float = typer.Option(1.0, "--total-gib", help="Size of the default model."),
    limits: str = typer.Option("0.25,0.5,1.0,1.5", "--limits",
                               help="cgroup memory limits as fractions of the model size."),
    swappiness: str = typer.Option("0,60,100", "--swappiness", help="vm.swappiness values."),
    tokens: int = typer.Option(8, "--tokens", min=2, help="Greedy tokens per run."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Repeat the grid; cells = median."),
    predictor: Path = typer.Option(None, "--predictor",
                                   help="Saved predictors / artifact: adds mode 'predictor'."),
    predictor_name: str = typer.Option(None, "--predictor-name", help="Which saved predictor."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per run."),
) -> None:
    """Stock llama.cpp and the prefetch plugin inside a memory cgroup, for a grid of memory
    limits × vm.swappiness: tokens/s, bytes read and major faults per token, peak memory, OOM
    kills (needs root; restores vm.swappiness afterwards)."""
    from ..lab.cgroup import why_unavailable
    from ..lab.experiment import (
        COLUMNS,
        ExperimentConfig,
        default_model,
        footer,
        run_grid,
        table_rows,
        write_outputs,
    )
    from ..lab.experiment import check_out_dir as _check_out
    from ..shipped import model_gguf

    if reason := why_unavailable():
        raise ExpertPredError(f"memory cgroup unavailable: {reason}")
    _check_out(out)
    source = source_model or model_gguf("tiny-mixtral")
    gguf_path = model or default_model(source, total_gib)
    cfg = ExperimentConfig(
        model=gguf_path, fractions=_floats(limits, "--limits"),
        swappiness=tuple(int(v) for v in _floats(swappiness, "--swappiness")),
        modes=("off", "d0", "predictor") if predictor else ("off", "d0"), tokens=tokens,
        rounds=rounds, predictor=predictor, predictor_name=predictor_name,
        source_model=source if predictor else None, timeout=timeout)
    command = "expertpred experiment " + " ".join(sys.argv[2:])
    n = len(cfg.fractions) * len(cfg.swappiness) * len(cfg.modes) * cfg.rounds
    console.print(f"{gguf_path} ({_human(gguf_path.stat().st_size)}): {n} runs of {tokens} "
                  "tokens", highlight=False)

    def on_run(mode: str, frac: float, swp: int, rnd: int, row: dict) -> None:
        tps = (f"{row['steps'] / row['decode_s']:.2f} tok/s" if row.get("decode_s") else "")
        console.print(f"  round {rnd + 1} {mode:9} limit {frac:g}× swappiness {swp:3}: "
                      f"{row['status']} {tps}", highlight=False)

    try:
        res = run_grid(cfg, command=command, on_run=on_run)
    except KeyboardInterrupt:
        err_console.print("interrupted; vm.swappiness restored")
        raise typer.Exit(130) from None
    t = Table(title="memory-pressure grid", caption=footer(res), box=box.SIMPLE_HEAD)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("mode", "limit", "status") else "right")
    for r in table_rows(res):
        t.add_row(*r)
    # rich assumes 80 columns when stdout is not a terminal: too narrow for this table
    (console if console.is_terminal else Console(width=140)).print(t)
    for p in write_outputs(res, out):
        console.print(f"wrote {p}", highlight=False)


_OVERRIDABLE = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("train", context_settings=_OVERRIDABLE)
def train_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help="training/configs/predictors-*.toml"),
) -> None:
    """Fit next-layer expert predictors on a trace dataset's train split and save them to
    <out>/models. Any --key=value overrides a config field (checked against it)."""
    from ..learn.train import load_config, train

    cfg = load_config(config, ctx.args)
    fitted, paths = train(cfg)
    t = Table(title=f"predictors fitted ({cfg.dataset or 'synthetic traces'})", box=box.SIMPLE)
    t.add_column("predictor")
    for d in cfg.offsets:
        t.add_column(f"d={d} fit s", justify="right")
    for name, secs in fitted.fit_seconds.items():
        t.add_row(name, *[f"{secs[d]:.2f}" if d in secs else "–" for d in cfg.offsets])
    console.print(t)
    for name, why in fitted.skipped.items():
        console.print(f"skipped {name}: {why}")
    console.print(f"training rows per d: {fitted.train_rows}; saved {len(paths)} files to "
                  f"{Path(cfg.out) / 'models'}")


@app.command("evaluate", context_settings=_OVERRIDABLE)
def evaluate_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help="training/configs/predictors-*.toml"),
    models: Path = typer.Option(None, "--models",
                                help="Saved predictors (expertpred train); default: fit here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Score predictors (recall / precision / exact set per d and layer, in- and cross-domain)
    and simulate an expert cache; writes report.json and plots to <out>. --key=value
    overrides a config field."""
    from ..learn.evaluate import evaluate, report_tables, write_report
    from ..learn.train import load_config

    cfg = load_config(config, ctx.args)
    report = evaluate(cfg, models_dir=models)
    paths = write_report(report, cfg.out, plots=cfg.plots)
    if as_json:
        console.print_json(json.dumps(report))
        return
    for t in report_tables(report):
        console.print(t)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command("export")
def export_cmd(
    predictor: Path = typer.Option(..., "--predictor",
                                   help="A saved predictor .npz, or a directory of them "
                                        "(expertpred train's <out>/models)."),
    out: Path = typer.Option(..., "--out", help="Artifact file to write (e.g. P.artifact)."),
    name: str = typer.Option(None, "--name",
                             help="Which predictor of the directory (files <name>-d<d>.npz); "
                                  "needed when it holds several."),
    offsets: str = typer.Option(None, "--offsets", help="Only these d, e.g. 1,2 (default all)."),
    model: Path = typer.Option(None, "--model",
                               help="Check the artifact loads for this GGUF (identity, shapes)."),
    allow_sha_mismatch: bool = typer.Option(False, "--allow-sha-mismatch",
                                            help="With --model: accept another sha256 if the "
                                                 "shapes match."),
) -> None:
    """Export a trained predictor (every offset d) as one numpy-only artifact file."""
    from ..predictors.export import export_saved, load_artifact

    ds = None if offsets is None else _ints(offsets, "--offsets", lo=1)
    path = export_saved(predictor, out, name=name, offsets=ds)
    art = load_artifact(path, gguf_path=model, allow_sha_mismatch=allow_sha_mismatch)
    m = art.trained_model or art.model
    checked = f"; loads for {model}" if model is not None else ""
    console.print(f"exported {art.name} d={list(art.offsets)} for {m.arch} "
                  f"sha256 {m.sha256[:12] or '(none)'} to {path} "
                  f"({_human(path.stat().st_size)}){checked}", soft_wrap=True, highlight=False)


@app.command()
def iotrace(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to trace."),
    out: Path = typer.Option(..., "--out", help="Output directory (parquet, figures, summary)."),
    limit_mib: int = typer.Option(None, "--limit-mib",
                                  help="Memory cgroup limit for the cold run (MiB)."),
    tokens: int = typer.Option(8, "--tokens", help="Greedy tokens to generate."),
    prompt: str = typer.Option("def read_config(path):", "--prompt", help="Prompt text."),
    warm: bool = typer.Option(True, "--warm/--no-warm",
                              help="Also run with the file cached (compute-only step times)."),
) -> None:
    """Record which GGUF byte ranges llama.cpp reads, in what order, under a memory limit."""
    from ..lab.iotrace import IOTraceConfig, run_iotrace

    res = run_iotrace(IOTraceConfig(model=model, out=out, limit_mib=limit_mib, tokens=tokens,
                                    prompt=prompt, warm=warm))
    console.print((out / "summary.md").read_text(), highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/summary.md, samples/reads/expert_reads.parquet, "
                  f"{', '.join(Path(p).name for p in res['figures'])}", highlight=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors — ours and click's usage/range errors — become one line
    ``error: ...`` on stderr and exit code 2."""
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # not standalone: click raises its usage errors here instead of printing a usage box
        rc = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()  # the help text, as click prints it
        sys.exit(2)
    except UsageError as exc:  # bad option value, out of range, missing option, no such command
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        err_console.print(f"error: {where}{_one_line(exc.format_message())}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as exc:  # any other click error (e.g. FileError)
        err_console.print(f"error: {_one_line(exc.format_message())}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except ExpertPredError as exc:
        err_console.print(f"error: {_one_line(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)

