"""``inspect`` and ``widen``: GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..units import human_bytes
from .app import app, console, flag


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="A MoE GGUF file."),
    as_json: bool = flag("--json", help="Print the summary as JSON."),
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
    t.add_row("bytes per expert", human_bytes(lay.bytes_per_expert()))
    t.add_row("expert weights", f"{human_bytes(lay.expert_bytes)} "
              f"({100 * lay.expert_bytes / lay.file_size:.1f}% of file)")
    if lay.shared:
        t.add_row("shared-expert weights", human_bytes(lay.shared_bytes))
    t.add_row("file size", human_bytes(lay.file_size))
    console.print(t)


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
    old, new = human_bytes(plan.old_bytes_per_expert), human_bytes(plan.bytes_per_expert)
    console.print(f"{model}: expert width {plan.old_ff} -> {plan.new_ff} ({plan.dtype}), "
                  f"{old} -> {new} per expert, {human_bytes(plan.data_bytes)} of tensors")
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"writing {out.name}", total=plan.data_bytes)
        res = widen_model(model, out, ff=plan.new_ff, dtype=dtype,
                          progress=lambda done, total: bar.update(task, completed=done))
    console.print(f"wrote {res.path} ({human_bytes(res.file_size)}) in {res.seconds:.1f} s "
                  f"({res.mb_per_s:.0f} MB/s)")

