"""The ``expertpred`` command line. The only module that prints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import ExpertPredError

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
    from .layout import read_layout

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
def demo(
    max_tokens: int = typer.Option(48, help="Tokens to generate per model."),
    prompt: str = typer.Option("def read_config(path):\n", help="Prompt for the generation."),
) -> None:
    """The main job on the shipped defaults: load each shipped model in llama.cpp, show its
    expert layout and a greedy generation."""
    from .layout import read_layout
    from .shipped import SHIPPED_MODELS, model_gguf

    for name in SHIPPED_MODELS:
        path = model_gguf(name)
        lay = read_layout(path)
        console.rule(f"[bold]{name}[/]")
        t = Table(show_header=False)
        t.add_row("file", str(path))
        t.add_row("arch / layers", f"{lay.arch} / {lay.n_layer}")
        t.add_row("experts / used", f"{lay.n_expert} / {lay.n_expert_used}")
        t.add_row("bytes per expert", _human(lay.bytes_per_expert()))
        t.add_row("expert share of file", f"{100 * lay.expert_bytes / lay.file_size:.1f}%")
        console.print(t)
        text = _generate(path, prompt, max_tokens)
        console.print(f"[dim]prompt:[/] {prompt!r}")
        console.print(f"[dim]greedy continuation ({max_tokens} tokens):[/] {text!r}")


def _generate(path: Path, prompt: str, max_tokens: int) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)
    try:
        out = llm(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]
    finally:
        llm.close()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()  # standalone: click reports usage errors itself (exit 2)
    except ExpertPredError as exc:
        err_console.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
