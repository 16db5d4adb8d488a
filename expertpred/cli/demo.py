"""``demo``: the main job on the shipped models, offline."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from ..units import human_bytes
from .app import app, console, flag
from .trace import print_trace_run, trace_prompts_with_progress


@app.command()
def demo(
    model: str = typer.Option("tiny-mixtral", "--model",
                              help="Shipped model to trace and learn on."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where traces and reports go."),
    trace_limit: int = typer.Option(150, "--trace-limit", min=10,
                                    help="Prompts of the shipped prompt set to trace."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Tokens generated per prompt."),
    quick: bool = flag("--quick", help="Only show the models (no trace/learn)."),
) -> None:
    """The main job on the shipped defaults, offline: show both shipped models in llama.cpp,
    trace the shipped held-out prompt set on one of them, train the predictor ladder on the
    train prompts, evaluate it on the test prompts and print the table.

    Rerunning resumes the trace (finished prompts are skipped)."""

    from ..learn.evaluate import evaluate, report_tables, write_report
    from ..learn.train import load_config
    from ..shipped import SHIPPED_MODELS, model_gguf, repo_root
    from ..trace.run import TraceRunConfig

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
    run = TraceRunConfig(model=gguf_path, prompts=prompts, out=trace_dir, limit=trace_limit,
                         max_tokens=max_tokens, hidden=True, resume=trace_dir.exists(),
                         shard_rows=4096)
    print_trace_run(trace_prompts_with_progress(run))
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
    t.add_row("bytes per expert", human_bytes(lay.bytes_per_expert()))
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

