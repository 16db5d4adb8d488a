"""``experiment`` and ``iotrace``: the research harnesses."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import ExpertPredError
from ..units import human_bytes
from .app import app, console, err_console, flag, parse_floats


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
        model=gguf_path, fractions=parse_floats(limits, "--limits"),
        swappiness=tuple(int(v) for v in parse_floats(swappiness, "--swappiness")),
        modes=("off", "d0", "predictor") if predictor else ("off", "d0"), tokens=tokens,
        rounds=rounds, predictor=predictor, predictor_name=predictor_name,
        source_model=source if predictor else None, timeout=timeout)
    command = "expertpred experiment " + " ".join(sys.argv[2:])
    n = len(cfg.fractions) * len(cfg.swappiness) * len(cfg.modes) * cfg.rounds
    console.print(f"{gguf_path} ({human_bytes(gguf_path.stat().st_size)}): {n} runs of {tokens} "
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


@app.command()
def iotrace(
    model: Path = typer.Option(..., "--model", help="MoE GGUF to trace."),
    out: Path = typer.Option(..., "--out", help="Output directory (parquet, figures, summary)."),
    limit_mib: int = typer.Option(None, "--limit-mib",
                                  help="Memory cgroup limit for the cold run (MiB)."),
    tokens: int = typer.Option(8, "--tokens", help="Greedy tokens to generate."),
    prompt: str = typer.Option("def read_config(path):", "--prompt", help="Prompt text."),
    warm: bool = flag("--warm/--no-warm", default=True,
                      help="Also run with the file cached (compute-only step times)."),
) -> None:
    """Record which GGUF byte ranges llama.cpp reads, in what order, under a memory limit."""
    from ..lab.iotrace import IOTraceConfig, run_iotrace

    res = run_iotrace(IOTraceConfig(model=model, out=out, limit_mib=limit_mib, tokens=tokens,
                                    prompt=prompt, warm=warm))
    console.print((out / "summary.md").read_text(), highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/summary.md, samples/reads/expert_reads.parquet, "
                  f"{', '.join(Path(p).name for p in res.figures)}", highlight=False)

