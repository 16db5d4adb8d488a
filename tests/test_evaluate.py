"""train / evaluate: config checking, splits by prompt, report, plots, CLI, error paths."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from expertpred.cli import app
from expertpred.errors import ExpertPredError
from expertpred.learn.evaluate import (
    CacheReport,
    CacheRow,
    EvaluationReport,
    Scenario,
    ScoreRow,
    evaluate,
    goals_table,
    report_tables,
    write_report,
)
from expertpred.learn.train import (
    PredictorsConfig,
    fit_all,
    load_all,
    load_config,
    open_source,
    train,
)

FAST = ["--synthetic_seqs=20", "--mlp_epochs=2", "--mlp_hidden=32", "--lgb_rounds=3",
        "--offsets=1,2", "--cache_budgets=0.25", "--cache_predictor=previous-token+transition"]
FAST_LADDER = "--predictors=random,popularity,previous-token,previous-token+transition,mlp,oracle"


@pytest.fixture
def cfg(tmp_path) -> PredictorsConfig:
    return load_config(None, [*FAST, FAST_LADDER, f"--out={tmp_path / 'run'}"])


# --- config ---

def test_config_from_toml_and_overrides(tmp_path):
    p = tmp_path / "predictors-x.toml"
    p.write_text('mlp_epochs = 3\noffsets = [1, 3]\ncross_domain = false\nmlp_lr = 1\n')
    cfg = load_config(p, ["--mlp-epochs=5", "--predictors=popularity,mlp", "--plots=false"])
    assert (cfg.mlp_epochs, cfg.offsets, cfg.cross_domain, cfg.mlp_lr) == (5, (1, 3), False, 1.0)
    assert cfg.predictors == ("popularity", "mlp") and cfg.plots is False


@pytest.mark.parametrize("text,overrides,match", [
    ("bogus = 1\n", [], "unknown key 'bogus'; known: "),
    ("mlp_epochs = 'many'\n", [], "mlp_epochs: expected int, got 'many'"),
    ("offsets = 1\n", [], "expected a list of int"),
    ("plots = 1\n", [], "expected bool"),
    ("", ["--mlp_lr=fast"], "expected float"),
    ("", ["--nope=1"], "unknown key 'nope'"),
    ("", ["mlp_epochs"], "expected --key=value"),
    ("", ["--predictors=popularity,foo"], "unknown predictor 'foo'; known: .*mlp"),
    ("", ["--eval_phase=prefill"], "expected 'all' or 'decode'"),
    ("", ["--cache_budgets=0,0.5"], "not a share"),
    ("", ["--residency_max_rows=0"], "residency_max_rows=0: expected >= 1"),
    ("", ["--residency_horizon=0"], "residency_horizon=0: expected >= 1 token"),
    ("not toml [", [], "not valid TOML"),
])
def test_config_errors_are_one_line(tmp_path, text, overrides, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ExpertPredError, match=match) as e:
        load_config(p, overrides)
    assert "\n" not in str(e.value)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    files = sorted(root.glob("predictors-*.toml"))
    assert files
    for f in files:
        load_config(f)


# --- splits ---

def test_splits_are_by_prompt(cfg):
    src = open_source(cfg)
    train_ids, test_ids = set(src.select("train")), set(src.select("test"))
    assert train_ids and test_ids and not train_ids & test_ids
    code, prose = set(src.select(domain="code")), set(src.select(domain="prose"))
    assert code and prose and not code & prose


# --- evaluate ---

def test_evaluate_report_plots_and_tables(cfg, tmp_path):
    report = evaluate(cfg)
    names = [s.name for s in report.scenarios]
    assert names == ["in-domain", "code→prose", "prose→code"]
    sc = report.scenarios[0]
    k = report.model["n_expert_used"]
    got = {(r.predictor, r.d, r.k) for r in sc.results}
    for p in ("random", "mlp", "oracle"):
        for d in (1, 2):
            assert {(p, d, k), (p, d, 2 * k)} <= got
    oracle = [r for r in sc.results if r.predictor == "oracle"]
    assert all(r.recall == 1.0 and r.exact == 1.0 for r in oracle)
    row = next(r for r in sc.results if r.predictor == "mlp" and r.d == 2)
    assert len(row.recall_per_layer) == report.model["n_layer"]
    assert row.recall_per_layer[:2] == [None, None]  # no target layer below d
    pols = {r.policy for r in report.cache.results}
    assert {"lru", "lfu", "belady", "predictive:previous-token+transition",
            "predictive:oracle"} <= pols
    by = {r.policy: r for r in report.cache.results}
    assert by["belady"].hit_rate >= by["lru"].hit_rate
    assert by["predictive:oracle"].hit_rate >= by["lru"].hit_rate
    assert "d=1 recall@k >= 0.95" in report.goals
    paths = write_report(report, tmp_path / "out")
    assert {p.name for p in paths} == {"report.json", "recall_vs_d.png",
                                       "recall_per_layer.png", "cache_hit_rate.png"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["n_expert"] > 0
    assert len(report_tables(report)) == 4  # 3 scenarios + cache (goals: benchmarks only)
    assert goals_table(report.goals).row_count == len(report.goals)


def test_train_save_load_and_model_mismatch(cfg, tmp_path):
    cfg = replace(cfg, predictors=("popularity", "transition"), out=str(tmp_path / "run"))
    fitted, paths = train(cfg)
    assert len(paths) == 5 and all(p.is_file() for p in paths)  # + nextuse.npz
    assert paths[-1].name == "nextuse.npz"
    src = open_source(cfg)
    loaded = load_all(tmp_path / "run" / "models", src.model, cfg.predictors, cfg.offsets)
    assert set(loaded) == {"popularity", "transition"} and set(loaded["popularity"]) == {1, 2}
    other = replace(src.model, n_expert=src.model.n_expert * 2)
    with pytest.raises(ExpertPredError, match="trained on another model"):
        load_all(tmp_path / "run" / "models", other, cfg.predictors, cfg.offsets)
    report = evaluate(replace(cfg, cross_domain=False), models_dir=tmp_path / "run" / "models")
    assert {r.predictor for r in report.scenarios[0].results} == {"popularity", "transition"}


def test_too_few_examples(cfg):
    src = open_source(cfg)
    with pytest.raises(ExpertPredError, match="too few examples"):
        fit_all(cfg, src, [])
    one = src.select("train")[:1]
    with pytest.raises(ExpertPredError, match="too few examples to train 'mlp'"):
        fit_all(replace(cfg, predictors=("mlp",), offsets=(1,), max_train_rows=10), src, one)


def test_gate_lookahead_without_model_is_skipped(cfg):
    src = open_source(cfg)
    res = fit_all(replace(cfg, predictors=("popularity", "gate-lookahead"), offsets=(1,)),
                  src, src.select("train"))
    assert "gate-lookahead" in res.skipped and "popularity" in res.predictors


# --- CLI ---

def test_cli_train_and_evaluate(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = [*FAST, "--predictors=popularity,previous-token+transition", f"--out={out}",
            "--cross_domain=false"]
    r = runner.invoke(app, ["train", *args])
    assert r.exit_code == 0, r.output
    assert (out / "models" / "popularity-d1.npz").is_file()
    r = runner.invoke(app, ["evaluate", *args, "--models", str(out / "models"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["scenarios"][0]["name"] == "in-domain"
    r = runner.invoke(app, ["train", "--bogus=1"])
    assert isinstance(r.exception, ExpertPredError) and "unknown key 'bogus'" in str(r.exception)


# --- shipped sample traces (skipped when absent) ---

SHIPPED = Path(__file__).resolve().parents[1] / "datasets" / "traces"


def _shipped(name: str) -> Path:
    path = SHIPPED / name
    if not (path / "_manifest.json").is_file():
        pytest.skip(f"no shipped trace {path}")
    return path


def test_shipped_traces_open_and_rank(tmp_path):
    cfg = load_config(None, [f"--dataset={_shipped('tiny-mixtral')}", "--offsets=1",
                             "--predictors=random,popularity,transition", f"--out={tmp_path}"])
    src = open_source(cfg)
    assert src.model.sha256 and src.model.n_expert == 8
    assert src.select("train") and src.select("test") and src.select("validation")
    assert not set(src.select("train")) & set(src.select("test"))
    report = evaluate(replace(cfg, cross_domain=False, cache_predictor="transition"))
    rec = {r.predictor: r.recall for r in report.scenarios[0].results
           if r.k == src.model.n_expert_used}
    assert rec["random"] < rec["popularity"] < rec["transition"]


def test_predictor_of_another_shipped_model_is_refused(tmp_path):
    mix = load_config(None, [f"--dataset={_shipped('tiny-mixtral')}", "--offsets=1",
                             "--predictors=popularity", f"--out={tmp_path}"])
    qwen = open_source(replace(mix, dataset=str(_shipped("tiny-qwen3moe"))))
    train(mix)
    with pytest.raises(ExpertPredError, match="model sha256 .* trained on another model"):
        load_all(tmp_path / "models", qwen.model, ("popularity",), (1,))


def test_tables_keep_predictor_names_whole_on_a_narrow_pipe():
    """Not a terminal and only 60 columns: names stay whole, numbers share what is left."""
    import io

    from rich.console import Console

    names = ["previous-token", "previous-token+transition", "gate-lookahead", "lightgbm"]
    results = [ScoreRow(predictor=p, d=d, k=k, n_rows=1, recall=0.5, precision=0.25,
                        exact=0.125, recall_per_layer=[]) for p in names for d in (1, 2)
               for k in (2, 4)]
    rows = [CacheRow(budget=b, policy=p, capacity_bytes=1, n_tokens=10, accesses=1, hits=1,
                     hit_rate=0.5, demand_bytes=1, prefetch_bytes=0, bytes_per_token=2048.0)
            for p in ("lru", "predictive:previous-token+transition") for b in (0.1, 0.25)]
    report = EvaluationReport(
        model={"n_expert_used": 2}, config={"predictors": names}, source="",
        scenarios=[Scenario(name="in-domain", n_train_seqs=3, n_test_seqs=2, train_rows={},
                            fit_seconds={}, skipped={}, results=results)],
        cache=CacheReport(n_tokens=10, expert_bytes_total=1, prefetch_k=2, depth=1,
                          results=rows),
        goals={"d=1 recall@k >= 0.95": {"met": False, "recall": 0.5}})
    out = io.StringIO()
    console = Console(file=out, width=60, force_terminal=False, color_system=None)
    for t in report_tables(report):
        console.print(t)
    text = out.getvalue()
    for name in [*names, "predictive:previous-token+transition"]:
        assert any(line.split()[:1] == [name] for line in text.splitlines()), name
    assert "goals" not in text
