"""``run`` and ``serve``: generate with the prefetch plugin, or serve it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..errors import ExpertPredError
from ..units import human_bytes
from .app import app, console, err_console, flag, parse_bytes

if TYPE_CHECKING:
    from ..prefetch.run import RunConfig, RunResult


# Options `run` and `serve` share, declared once.
Predictor = Annotated[Path | None, typer.Option(
    "--predictor", help="Saved predictors (expertpred train's <out>/models) or an exported "
                        "artifact (mode predictor).")]
PredictorName = Annotated[str | None, typer.Option(
    "--predictor-name", help="Which saved predictor (files <name>-d<d>.npz; default: "
                             "fast-mlp, a learned predictor fast enough for the inference "
                             "thread, or previous-token+transition where the directory has "
                             "no usable fast-mlp).")]
SourceModel = Annotated[Path | None, typer.Option(
    "--source-model", help="The model --model was widened from (the predictor was trained "
                           "on it).")]
Method = Annotated[str, typer.Option("--method", help="pread | fadvise | madvise | io_uring")]
QueueDepth = Annotated[int, typer.Option("--queue-depth", min=1, help="Prefetch queue depth.")]
Lookahead = Annotated[int | None, typer.Option(
    "--lookahead", min=0, help="Prefetch layers l+1..l+D (default: 1, the next layer only).")]
# 32 MiB is prefetch.plugin_config.MADV_RANDOM_MAX_EXPERT_BYTES, written out: the CLI
# imports the prefetch room only when a command runs (`--help` stays fast)
MadviseRandom = Annotated[bool | None, typer.Option(
    "--madvise-random/--no-madvise-random",
    help="madvise(MADV_RANDOM) llama.cpp's mapping: no fault read-around (default: on when "
         "the experts are smaller than 32 MiB).")]
Threads = Annotated[int, typer.Option("--threads", min=1, help="llama.cpp threads.")]
PredictThread = Annotated[bool, typer.Option(
    "--predict-thread",
    help="Run the features and the predictor on a thread of their own: the eval callback "
         "only hands the routing over; predictions that finish after their layer are "
         "counted as late and not read.")]


@app.command()
def run(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to run."),
    prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Greedy tokens to generate."),
    mode: str = typer.Option(None, "--mode",
                             help="off | d0 | predictor | oracle (default: predictor with "
                                  "--predictor, oracle with --oracle-trace, else d0)."),
    predictor: Predictor = None,
    predictor_name: PredictorName = None,
    source_model: SourceModel = None,
    oracle_trace: Path = typer.Option(None, "--oracle-trace",
                                      help="Recorded trace of the same greedy run (trace "
                                           "dataset directory or oracle .npz)."),
    method: Method = "fadvise",
    queue_depth: QueueDepth = 8,
    lookahead: Lookahead = None,
    madvise_random: MadviseRandom = None,
    predict_thread: PredictThread = False,
    threads: Threads = 2,
    n_ctx: int = typer.Option(512, "--n-ctx", min=8, help="llama.cpp context size."),
    residency: str = typer.Option("kernel", "--residency",
                                  help="Expert residency policy: kernel (leave it to reclaim) "
                                       "| lru | lfu | learned | belady (needs --oracle-trace)."),
    budget: str = typer.Option(None, "--budget",
                               help="Bytes of expert weights kept resident, e.g. 512MiB, 1.5GiB "
                                    "(default: memory limit minus the rest of the process)."),
    nextuse: Path = typer.Option(None, "--nextuse",
                                 help="Next-use model for --residency learned (default: "
                                      "nextuse.npz next to --predictor)."),
    as_json: bool = flag("--json", help="Print the result as one JSON line."),
) -> None:
    """Generate greedily with the online prefetch plugin and print prefetch statistics."""
    from ..prefetch.residency import make_config
    from ..prefetch.run import RunConfig, run_prompt

    res_cfg = make_config(residency, None if budget is None else parse_bytes(budget, "--budget"),
                          nextuse, predictor)
    cfg = RunConfig(
        model=model, prompt=prompt, max_tokens=max_tokens, mode=mode, predictor=predictor,
        predictor_name=predictor_name, source_model=source_model, oracle_trace=oracle_trace,
        method=method, queue_depth=queue_depth, lookahead=lookahead,
        madvise_random=madvise_random, predict_thread=predict_thread, threads=threads,
        n_ctx=n_ctx, residency=res_cfg)
    res = run_prompt(cfg)
    if as_json:
        print(json.dumps(res.as_dict(), default=str))
        return
    _print_run(cfg, res)


def _print_run(cfg: RunConfig, res: RunResult) -> None:
    prompt, max_tokens, n_ctx, n_prompt = cfg.prompt, cfg.max_tokens, cfg.n_ctx, res.n_prompt
    toks, st, t_decode, t_prompt, tps = (res.tokens, res.stats, res.decode_s, res.prompt_s,
                                         res.tokens_per_s)
    text = res.text
    console.print(f"[dim]prompt:[/] {prompt!r}")
    stop = (f"; stopped: context full (n_ctx {n_ctx}, prompt {n_prompt} tokens)"
            if len(toks) < max_tokens and n_prompt + len(toks) > n_ctx else "")
    console.print(f"[dim]generation ({len(toks)} tokens{stop}):[/] {text!r}", highlight=False)
    mode = f"{st.mode} {st.predictor}" if st.predictor else st.mode
    t = Table(title=f"prefetch ({mode}, lookahead {st.lookahead})", show_header=False)
    t.add_row("decode tokens/s", f"{tps:.2f} ({t_decode:.2f} s; prompt {t_prompt:.2f} s)")
    c = st.counters
    t.add_row("callback errors", str(c.callback_errors) + (f" ({st.first_error})"
                                                            if st.first_error else ""))
    if st.engine is not None:
        e = st.engine.counters
        t.add_row("method / queue depth", f"{st.engine.method} / {st.engine.queue_depth}")
        t.add_row("requests / issued / coalesced", f"{e.requests} / {e.issued} / {e.coalesced}")
        t.add_row("bytes read (or advised)", human_bytes(e.bytes_read))
        t.add_row("uses: hit / late / miss", f"{e.hits} / {e.late} / {e.misses}")
        t.add_row("hit rate", f"{100 * st.engine.hit_rate:.1f}%")
        t.add_row("speculative: issued / used / unused",
                  f"{e.spec_issued} / {e.spec_used} / {e.spec_unused}")
        t.add_row("bytes: demand / speculative / wasted",
                  " / ".join(human_bytes(b) for b in (e.demand_bytes, e.spec_bytes,
                                                      e.wasted_bytes)))
        bad = st.engine.unbalanced()
        t.add_row("counter ledgers", "balanced" if not bad else
                  "UNBALANCED " + ", ".join(f"{k} {a} != {b}" for k, (a, b) in bad.items()))
        t.add_row("I/O errors", f"{e.failed}" + ("" if st.engine.enabled
                                                 else f" (disabled: {st.engine.disabled_reason})"))
        if c.predictions:
            ms = 1e3 * c.predict_seconds / c.predictions
            where = "off the inference thread" if c.predict_lag_seconds else "inline"
            from ..predictors import fast_mlp_jit  # which fast-mlp step ran (aot / jit / numpy)
            kind = f", {fast_mlp_jit.KIND} step" if fast_mlp_jit.KIND else ""
            t.add_row("predictions", f"{c.predictions} ({ms:.3f} ms each, {where}{kind})")
            if c.predict_lag_seconds:
                t.add_row("predictions late (not read)", f"{c.late_predictions} "
                          f"(lag {1e6 * c.predict_lag_seconds / c.predictions:.0f} µs each)")
    r = st.residency
    if r is not None:
        rc = r.counters
        t.add_row("residency / budget", f"{r.active_policy} / {human_bytes(r.budget_bytes)}"
                  + ("" if r.enabled else f" ({r.disabled_reason})"))
        # mincore runs at attach and then at most every mincore_interval (it is costly)
        t.add_row("resident: bookkeeping / mincore (last check)",
                  f"{human_bytes(rc.resident_bytes)} / {human_bytes(r.measured_resident_bytes)}"
                  f" ({r.mincore_checks} checks)")
        t.add_row("evictions / bypasses", f"{rc.evictions} ({human_bytes(rc.evicted_bytes)}) / "
                  f"{rc.bypasses} ({human_bytes(rc.bypassed_bytes)})")
        # kept experts the kernel's reclaim took anyway: the budget was tighter than derived
        t.add_row("kept experts the kernel reclaimed", f"{rc.lost} ({human_bytes(rc.lost_bytes)})")
        hr = rc.hits / rc.accesses if rc.accesses else 0.0
        t.add_row("residency hit rate", f"{100 * hr:.1f}%")
    console.print(t)


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to serve."),
    predictor: Predictor = None,
    predictor_name: PredictorName = None,
    source_model: SourceModel = None,
    mode: str = typer.Option(None, "--mode",
                             help="off | d0 | predictor (default: predictor with --predictor, "
                                  "else d0)."),
    residency: str = typer.Option("kernel", "--residency",
                                  help="Expert residency policy: kernel | lru | lfu | learned."),
    nextuse: Path = typer.Option(None, "--nextuse",
                                 help="Next-use model for --residency learned (default: "
                                      "nextuse.npz next to --predictor)."),
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
    trace_text: bool = flag("--trace-text", help="Keep prompt and completion text in the trace."),
    trace_shard_rows: int = typer.Option(4096, "--trace-shard-rows", min=1,
                                         help="Rows per trace shard (a crash loses < this)."),
    method: Method = "fadvise",
    queue_depth: QueueDepth = 8,
    lookahead: Lookahead = None,
    min_rel_share: float = typer.Option(None, "--min-rel-share", min=0.0,
                                        help="Confidence gate: prefetch a predicted expert "
                                             "only when its share of the predicted score "
                                             "mass is at least this times 1/k (default: "
                                             "0.5)."),
    prefetch_k: int = typer.Option(None, "--prefetch-k", min=1,
                                   help="Experts prefetched per look-ahead layer."),
    madvise_random: MadviseRandom = None,
    predict_thread: PredictThread = False,
    sync_requests: bool = flag("--sync-requests", help="Engine calls on the inference thread."),
    threads: Threads = 2,
    n_ctx: int = typer.Option(2048, "--n-ctx", min=8, help="llama.cpp context size."),
    n_batch: int = typer.Option(512, "--n-batch", min=1, help="Prompt tokens per decode."),
) -> None:
    """Serve the prefetching model behind an OpenAI-compatible API (llama_cpp.server):
    /v1/completions, /v1/chat/completions, /v1/models, plus Prometheus /metrics."""
    from ..prefetch.plugin import load_predictors
    from ..serve import ServeConfig
    from ..serve import serve as run_server

    if not model.is_file():
        raise ExpertPredError(f"{model}: no such model file (expected a MoE GGUF)")
    mode = mode or ("predictor" if predictor else "d0")
    if mode == "oracle":
        raise ExpertPredError("--mode oracle: not served (an oracle trace is one prompt's "
                              "greedy run); expected off, d0 or predictor")
    plugin: dict = {"mode": mode, "method": method, "queue_depth": queue_depth,
                    "lookahead": lookahead, "min_rel_share": min_rel_share,
                    "prefetch_k": prefetch_k, "madvise_random": madvise_random,
                    "async_requests": not sync_requests,
                    "predict_thread": predict_thread}
    if mode == "predictor":
        if predictor is None:
            raise ExpertPredError("--mode predictor needs --predictor DIR_OR_ARTIFACT")
        plugin["predictor"] = load_predictors(predictor, model,
                                              name=predictor_name,
                                              source_model=source_model)
    if residency == "belady":
        raise ExpertPredError("--residency belady: not served (it needs a recorded trace of "
                              "the same greedy run); expected kernel, lru, lfu or learned")
    from ..prefetch.residency import make_config

    res_cfg = make_config(residency, None if budget is None else parse_bytes(budget, "--budget"),
                          nextuse, predictor)
    if res_cfg is not None:
        plugin["residency"] = res_cfg
    cfg = ServeConfig(model=model, alias=alias, host=host, port=port, n_ctx=n_ctx,
                      n_batch=n_batch, n_threads=threads, api_key=api_key, trace_out=trace_out,
                      trace_text=trace_text, trace_shard_rows=trace_shard_rows,
                      plugin_kwargs=plugin)
    run_server(cfg, on_ready=lambda c: err_console.print(
        f"serving {model} ({mode}) on http://{c.host}:{c.port}/v1", highlight=False))

