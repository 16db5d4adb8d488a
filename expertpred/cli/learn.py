"""``train``, ``evaluate`` and ``export``: predictors from a trace dataset."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from ..units import human_bytes
from .app import app, console, flag, parse_ints

_OVERRIDABLE = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("train", context_settings=_OVERRIDABLE)
def train_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help="training/configs/predictors-*.toml"),
    cluster: str = typer.Option(None, "--cluster", metavar="local:N",
                                help="Train on a Dask LocalCluster of N worker processes "
                                     "(127.0.0.1)."),
    scheduler: str = typer.Option(None, "--scheduler", metavar="tcp://HOST:PORT",
                                  help="Train on an existing Dask cluster (its scheduler)."),
) -> None:
    """Fit next-layer expert predictors on a trace dataset's train split and save them to
    <out>/models. Any --key=value overrides a config field (checked against it).
    --cluster / --scheduler: the same training on Dask (same rows, same tables)."""
    from ..learn.cluster import parse_cluster
    from ..learn.train import load_config, train

    spec = parse_cluster(cluster, scheduler)
    cfg = load_config(config, ctx.args)
    if spec is None:
        fitted, paths = train(cfg)
    else:
        from ..learn.cluster import open_cluster
        from ..learn.dask_nextuse import check_config
        from ..learn.distributed import train_distributed

        check_config(cfg)  # before the cluster starts
        console.print(f"training on a {spec.describe()}", highlight=False)
        with open_cluster(spec) as client, _StepProgress() as progress:
            fitted, paths = train_distributed(cfg, client, progress)
    # names stay whole on a pipe (rich assumes 80 columns): the number columns are narrow
    t = Table(title=f"predictors fitted ({cfg.dataset or 'synthetic traces'})",
              caption="seconds to fit, per offset d", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=(0, 1), collapse_padding=True)
    t.add_column("predictor", no_wrap=True,
                 min_width=max(map(len, ["predictor", *fitted.fit_seconds])))
    for d in cfg.offsets:
        t.add_column(f"d={d}", justify="right")
    for name, secs in fitted.fit_seconds.items():
        t.add_row(name, *[f"{secs[d]:.2f}" if d in secs else "–" for d in cfg.offsets])
    console.print(t)
    for name, why in fitted.skipped.items():
        console.print(f"skipped {name}: {why}")
    console.print(f"training rows per d: {fitted.train_rows}; saved {len(paths)} files to "
                  f"{Path(cfg.out) / 'models'}")


class _StepProgress:
    """A rich progress bar per step of distributed training (learn.shards.Progress)."""

    def __enter__(self) -> _StepProgress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=False)
        self._bar.__enter__()
        self._task: int | None = None
        return self

    def start(self, step: str, total: int) -> None:
        if self._task is not None:
            t = self._bar.tasks[self._task]
            self._bar.update(self._task, completed=t.total)
        self._task = self._bar.add_task(step, total=total)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)


@app.command("evaluate", context_settings=_OVERRIDABLE)
def evaluate_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help="training/configs/predictors-*.toml"),
    models: Path = typer.Option(None, "--models",
                                help="Saved predictors (expertpred train); default: fit here."),
    as_json: bool = flag("--json", help="Print the report as JSON."),
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
        console.print_json(json.dumps(report.to_json()))
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
    allow_sha_mismatch: bool = flag("--allow-sha-mismatch",
                                    help="With --model: accept another sha256 if the shapes "
                                         "match."),
) -> None:
    """Export a trained predictor (every offset d) as one numpy-only artifact file."""
    from ..predictors.export import export_saved, load_artifact

    ds = None if offsets is None else parse_ints(offsets, "--offsets", lo=1)
    path = export_saved(predictor, out, name=name, offsets=ds)
    art = load_artifact(path, gguf_path=model, allow_sha_mismatch=allow_sha_mismatch)
    m = art.trained_model or art.model
    checked = f"; loads for {model}" if model is not None else ""
    console.print(f"exported {art.name} d={list(art.offsets)} for {m.arch} "
                  f"sha256 {m.sha256[:12] or '(none)'} to {path} "
                  f"({human_bytes(path.stat().st_size)}){checked}", soft_wrap=True, highlight=False)

