"""``expertpred train --cluster``: the ladder on a real Dask LocalCluster (2 worker processes,
127.0.0.1), against single-process training on the shipped tiny-qwen3moe trace.

1. the lookup tables are bit-identical (with and without the row sample);
2. LightGBM (lightgbm.dask) recall@k is within 0.01 of single-process;
3. the MLP (DDP over gloo) trains and beats the best table;
4. a SIGKILLed worker is one error and no model file, never a partial model;
5. the single-machine path never imports Dask; bad --cluster / --scheduler values are one
   error line, exit 2, without a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from expertpred.features import FeatureConfig, build_features
from expertpred.learn.evaluate import score_predictions
from expertpred.learn.train import fit_all, load_config, open_source, phase_value

from .conftest import assert_same_nextuse

ROOT = Path(__file__).resolve().parents[2]
QWEN = ["--config", str(ROOT / "training/configs/predictors-tiny-qwen3moe.toml")]
TABLES = "popularity,previous-token,transition,previous-token+transition"

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "training/configs/predictors-tiny-qwen3moe.toml",
                       [f"--dataset={ROOT / 'datasets/traces/tiny-qwen3moe'}",
                        f"--out={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def client():
    from expertpred.learn.cluster import ClusterKind, ClusterSpec, open_cluster

    with open_cluster(ClusterSpec(ClusterKind.LOCAL, n_workers=2)) as c:
        yield c


def _recall(cfg, source, predictor, d: int) -> tuple[float, int]:
    """recall@k on the test split, and how many expert slots it is counted over."""
    test = build_features(source.sequences(source.select(split="test")), source.model,
                          FeatureConfig(d=d, history_decay=cfg.history_decay),
                          phase=phase_value(cfg.eval_phase))
    k = source.model.n_expert_used
    row = score_predictions(predictor.predict_topk(test, k), test, [k], predictor.name, d)[0]
    return float(row.recall), len(test) * k


def _same_artifact(a, b) -> None:
    (spec_a, arr_a), (spec_b, arr_b) = a.to_artifact(), b.to_artifact()
    assert spec_a == spec_b
    assert sorted(arr_a) == sorted(arr_b)
    for k in arr_a:
        assert arr_a[k].dtype == arr_b[k].dtype and arr_a[k].tobytes() == arr_b[k].tobytes(), k


@pytest.mark.parametrize("max_rows", ["200000", "5000"])  # every row; a sample of them
def test_tables_bit_identical(client, tmp_path, max_rows):
    from expertpred.learn.distributed import fit_all_distributed

    cfg = _cfg(tmp_path, f"--predictors={TABLES}", "--offsets=1,3",
               f"--max_train_rows={max_rows}")
    source = open_source(cfg)
    ids = source.select(split="train")
    one = fit_all(cfg, source, ids)
    many = fit_all_distributed(cfg, source, ids, client)
    assert many.train_rows == one.train_rows
    for name in TABLES.split(","):
        for d in cfg.offsets:
            _same_artifact(one.predictors[name][d], many.predictors[name][d])
    # the saved files too: byte for byte
    a, b = tmp_path / "one", tmp_path / "many"
    for name in TABLES.split(","):
        pa = one.predictors[name][1].save(a / f"{name}.npz")
        pb = many.predictors[name][1].save(b / f"{name}.npz")
        assert pa.read_bytes() == pb.read_bytes()


# One lightgbm.dask fit per booster: the per-layer model at d=1 is 7 x 32 = 224 fits (~10
# minutes on this shared box; docs/scale.md has that run: 0.8973 vs 0.8977). The test takes
# both code paths at 32 fits each: per layer where one source layer is left (d=7), and the
# shared model (layer as a categorical feature) at d=1. The bound (0.01) is checked
# on the shared d=1 model, scored over 8,960 expert slots. At d=7 only 1,280 slots are
# scored, where two boosters fitted on differently partitioned data differ by about one
# standard error of a recall (~0.01; one CI run saw 0.0102): there the bound is three
# standard errors of the difference, which still fails a broken distributed fit.
@pytest.mark.parametrize("d,shared", [(7, False), (1, True)])
def test_lightgbm_recall_within_001(client, tmp_path, d, shared):
    from expertpred.learn.distributed import fit_all_distributed

    cfg = _cfg(tmp_path, "--predictors=lightgbm", f"--offsets={d}", f"--lgb_shared={shared}")
    source = open_source(cfg)
    ids = source.select(split="train")
    one = fit_all(cfg, source, ids).predictors["lightgbm"][d]
    many = fit_all_distributed(cfg, source, ids, client).predictors["lightgbm"][d]
    assert len(many.groups_) == len(one.groups_) == (1 if shared else 8 - d)
    (r1, n), (rn, _) = _recall(cfg, source, one, d), _recall(cfg, source, many, d)
    bound = 0.01 if shared else 3 * (2 * r1 * (1 - r1) / n) ** 0.5
    assert abs(r1 - rn) <= bound, (r1, rn, n, bound)
    assert rn > 0.3


def test_mlp_ddp_beats_best_table(client, tmp_path):
    from expertpred.learn.distributed import fit_all_distributed

    cfg = _cfg(tmp_path, f"--predictors={TABLES},mlp", "--offsets=1", "--mlp_epochs=6",
               "--mlp_hidden=128")
    source = open_source(cfg)
    many = fit_all_distributed(cfg, source, source.select(split="train"), client)
    tables = {n: _recall(cfg, source, many.predictors[n][1], 1)[0] for n in TABLES.split(",")}
    mlp = _recall(cfg, source, many.predictors["mlp"][1], 1)[0]
    assert mlp > max(tables.values()), (mlp, tables)


@pytest.mark.parametrize("during", ["DDP", "next-use"])
def test_killed_worker_is_an_error_and_writes_nothing(tmp_path, during):
    """SIGKILL a worker while the MLP's ranks train, or between two of the next-use model's
    passes over the shards (its pieces and carried state live on the workers)."""
    from expertpred.learn.cluster import ClusterKind, ClusterSpec, open_cluster
    from expertpred.learn.distributed import WorkerLostError, train_distributed

    cfg = _cfg(tmp_path, "--predictors=popularity,mlp", "--offsets=1", "--mlp_epochs=40")
    killed: list[int] = []

    class KillDuring:
        def __init__(self, client) -> None:
            self.client, self.step = client, ""

        def kill(self) -> None:
            pids = self.client.run(os.getpid)
            victim = pids[sorted(pids)[-1]]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

        def start(self, step: str, total: int) -> None:
            self.step = step
            if during == "DDP" and "DDP" in step and not killed:
                time.sleep(1.0)  # the ranks are training
                self.kill()

        def advance(self, n: int = 1) -> None:
            if during == "next-use" and self.step.startswith("next-use") and not killed:
                self.kill()  # after its first pass: the next ones need the dead worker's

    with open_cluster(ClusterSpec(ClusterKind.LOCAL, n_workers=2)) as c:
        with pytest.raises(WorkerLostError, match=r"died during .*no model was written"):
            train_distributed(cfg, c, KillDuring(c))
    assert killed
    out = Path(cfg.out)
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


def test_single_machine_path_imports_no_dask(tmp_path):
    code = (
        "import sys\n"
        "from expertpred.cli import app\n"
        "from expertpred.learn.train import load_config, train\n"
        f"cfg = load_config(None, ['--synthetic_seqs=12', '--offsets=1', '--out={tmp_path}',"
        " '--predictors=popularity,lightgbm,mlp', '--lgb_rounds=2', '--mlp_epochs=1'])\n"
        "train(cfg)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("args,match", [
    (["--cluster", "local:0"], "expected 1..64 worker processes"),
    (["--cluster", "local:x"], "expected local:N"),
    (["--cluster=remote"], "expected local:N"),
    (["--scheduler", "localhost:8786"], "expected tcp://HOST:PORT"),
    (["--cluster", "local:2", "--scheduler", "tcp://127.0.0.1:8786"], "got both"),
    (["--scheduler", "tcp://127.0.0.1:1"], "cannot connect"),
    (["--cluster", "local:1", "--residency_reuse_hidden=32"], "no distributed fit"),
])
def test_bad_cluster_values_are_one_error_line(tmp_path, args, match):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "expertpred.cli", "train", *QWEN, *args,
                        f"--out={tmp_path}", "--predictors=popularity", "--offsets=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 100
    assert not any(tmp_path.rglob("*.npz"))


def test_cluster_cli_trains_the_same_tables(tmp_path):
    """The CLI end to end on local:2: the saved tables are the single-process files."""
    common = [sys.executable, "-m", "expertpred.cli", "train", *QWEN, "--offsets=1",
              "--predictors=popularity,previous-token+transition"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for out, extra in (("one", []), ("many", ["--cluster", "local:2"])):
        r = subprocess.run([*common, *extra, f"--out={tmp_path / out}"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    for f in sorted((tmp_path / "one/models").glob("*-d1.npz")):
        assert f.read_bytes() == (tmp_path / "many/models" / f.name).read_bytes(), f.name
    got = np.load(tmp_path / "many/models/nextuse.npz")
    assert len(got.files) > 0


@pytest.mark.parametrize("pieces", ["shards", "one-sequence"])
def test_nextuse_model_per_shard_equals_single_process(client, tmp_path, pieces):
    """The next-use model fitted one task per piece equals the one-process fit. With one
    sequence per piece most pieces are shorter than the 33 tokens a row looks ahead, and
    ``residency_max_rows`` makes the row sample bind: the carried state, the continuation
    and the per-row sampling keys all have to be right."""
    from expertpred.learn.dask_nextuse import fit_nextuse_distributed
    from expertpred.learn.distributed import shard_inputs
    from expertpred.learn.shards import Guard, NoProgress, ShardInput
    from expertpred.learn.train import fit_nextuse
    from expertpred.predictors.reuse import CAP

    cfg = _cfg(tmp_path, *(["--residency_max_rows=20000"] if pieces != "shards" else []))
    source = open_source(cfg)
    ids = source.select(split="train")
    one = fit_nextuse(cfg, source, ids)
    if pieces == "shards":
        inputs = shard_inputs(client, source, ids)
    else:
        inputs = client.scatter([ShardInput("", (t.seq_id,), (t,))
                                 for t in source.sequences(ids)], broadcast=False)
    many = fit_nextuse_distributed(cfg, source.model, client, Guard(client), inputs,
                                   NoProgress())
    assert_same_nextuse(one.save(tmp_path / "one.npz"), many.save(tmp_path / "many.npz"))
    if pieces != "shards":  # the sample bound (rows twice: with and without the next id),
        # and pieces shorter than a row's look-ahead were there
        assert one.n_train_rows_ == many.n_train_rows_ <= 2 * 20000
        decode = [int((t.phase == phase_value("decode")).sum()) for t in source.sequences(ids)]
        assert min(decode) < CAP + 1, decode
