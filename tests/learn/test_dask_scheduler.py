"""``expertpred train --scheduler tcp://HOST:PORT`` against a cluster started the way one is
on other machines: ``dask scheduler`` and two ``dask worker`` processes (the CLI of the
installed ``distributed`` package), each a separate OS process with its own working
directory, only the scheduler's address shared with the driver.

1. the CLI on that cluster writes table files byte-identical to single-process training,
   LightGBM's recall@k is within 0.01 of the single-process model's, the next-use model
   matches;
2. a worker that cannot open the dataset, or runs other expertpred code, is one error
   (the checks run on the real workers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import FeatureConfig, build_features
from expertpred.learn.evaluate import score_predictions
from expertpred.learn.train import load_config, open_source, phase_value
from expertpred.predictors.base import load_all, model_path

from .conftest import assert_same_nextuse

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "training/configs/predictors-tiny-qwen3moe.toml"
TABLES = "popularity,previous-token,transition,previous-token+transition"
START_S = 120  # the scheduler file / both workers must appear by then (a busy 2-core box)
STOP_S = 20  # SIGTERM, then SIGKILL after this long

pytestmark = pytest.mark.slow


def _start(cmd: list[str], cwd: Path, log: Path,
           pythonpath: Path = ROOT) -> subprocess.Popen:
    # its own session: the nanny and its worker child are one process group to stop.
    # PYTHONPATH: the workers must import this checkout's expertpred, as the driver does.
    # The worker TTL: as open_cluster's for a LocalCluster (a box that pauses low-priority
    # processes for minutes would otherwise see every worker "fail to heartbeat")
    env = {**os.environ, "PYTHONPATH": str(pythonpath),
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "1h"}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_S
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs):
            return


def _logs(root: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                     for f in sorted(root.glob("*.log")))


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Iterator[str]:
    """tcp://127.0.0.1:PORT of a ``dask scheduler`` with two ``dask worker`` processes."""
    root = tmp_path_factory.mktemp("dask-cli")
    dask = [sys.executable, "-m", "dask"]
    procs = [_start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(root / "scheduler.json"),
                     # should this test die without its teardown: the scheduler goes away
                     # by itself (and its workers with it, --death-timeout)
                     "--idle-timeout", "3600"],
                    root, root / "scheduler.log")]
    try:
        deadline = time.monotonic() + START_S
        while not (root / "scheduler.json").is_file():
            assert procs[0].poll() is None, _logs(root)
            assert time.monotonic() < deadline, "no scheduler file\n" + _logs(root)
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but give it the moment
        address = json.loads((root / "scheduler.json").read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:"), address
        for i in range(2):  # each worker in a directory of its own, like another machine
            (root / f"w{i}").mkdir()
            procs.append(_start([*dask, "worker", address, "--nworkers", "1", "--nthreads",
                                 "1", "--no-dashboard", "--death-timeout", "60",
                                 "--local-directory", str(root / f"w{i}")],
                                root / f"w{i}", root / f"worker{i}.log"))
        from distributed import Client

        with Client(address, timeout=START_S) as c:
            c.wait_for_workers(2, timeout=START_S)
            where = c.run(lambda: __import__("expertpred").__file__)
            assert len(where) == 2 and all(
                Path(f).resolve().is_relative_to(ROOT) for f in where.values()), where
        yield address
    finally:
        _stop(procs[1:])
        _stop(procs[:1])


def _recall(cfg, source, predictor, d: int) -> float:
    test = build_features(source.sequences(source.select(split="test")), source.model,
                          FeatureConfig(d=d, history_decay=cfg.history_decay),
                          phase=phase_value(cfg.eval_phase))
    k = source.model.n_expert_used
    return float(score_predictions(predictor.predict_topk(test, k), test, [k],
                                   predictor.name, d)[0].recall)


def test_cli_on_a_dask_cli_cluster_matches_one_process(scheduler, tmp_path):
    # the config's dataset path is relative to the driver's directory: the workers' own
    # directories differ, so this also checks they are sent an absolute path
    common = [sys.executable, "-m", "expertpred.cli", "train", "--config", str(CONFIG),
              "--offsets=1", f"--predictors={TABLES},lightgbm", "--lgb_shared=true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for out, extra in (("one", []), ("many", ["--scheduler", scheduler])):
        r = subprocess.run([*common, *extra, f"--out={tmp_path / out}"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "Dask scheduler " + scheduler in r.stdout
    one, many = tmp_path / "one/models", tmp_path / "many/models"
    for name in TABLES.split(","):
        f = model_path(one, name, 1).name
        assert (one / f).read_bytes() == (many / f).read_bytes(), f
    cfg = load_config(CONFIG, [f"--dataset={ROOT / 'datasets/traces/tiny-qwen3moe'}"])
    source = open_source(cfg)
    r1, rn = (_recall(cfg, source, load_all(m, source.model, ["lightgbm"], [1])["lightgbm"][1],
                      1) for m in (one, many))
    assert abs(r1 - rn) <= 0.01, (r1, rn)
    assert rn > 0.3
    assert_same_nextuse(one / "nextuse.npz", many / "nextuse.npz")


def _worker(scheduler: str, where: Path, pythonpath: Path = ROOT,
            hide: Path | None = None) -> subprocess.Popen:
    """One more ``dask worker``; ``hide``: an empty tmpfs over that directory in the
    worker's own mount namespace (a machine without the shared filesystem)."""
    cmd = [sys.executable, "-m", "dask", "worker", scheduler, "--nworkers", "1", "--nthreads",
           "1", "--no-dashboard", "--death-timeout", "60", "--local-directory", str(where)]
    if hide is not None:
        cmd = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{hide}" && exec "$@"',
               "sh", *cmd]
    return _start(cmd, where, where / "extra-worker.log", pythonpath)


def _with_extra_worker(c, proc: subprocess.Popen, check) -> None:
    """``check()`` while ``proc``'s worker is the third one; back to two workers after."""
    from expertpred.learn.cluster import workers

    try:
        c.wait_for_workers(3, timeout=START_S)
        check()
    finally:
        _stop([proc])
    deadline = time.monotonic() + START_S
    while len(workers(c)) > 2:
        assert time.monotonic() < deadline, "the third worker did not leave"
        time.sleep(0.2)


def test_worker_checks_are_one_error(scheduler, tmp_path):
    from distributed import Client

    from expertpred.learn.cluster import check_code
    from expertpred.learn.shards import check_dataset

    dataset = tmp_path / "ds"
    shutil.copytree(ROOT / "datasets/traces/tiny-qwen3moe", dataset)
    with Client(scheduler, timeout=START_S) as c:
        check_code(c)  # the workers run this checkout
        check_dataset(c, str(dataset))  # and read the dataset at this path
        with pytest.raises(ExpertPredError, match=r"elsewhere: no such directory"):
            check_dataset(c, str(tmp_path / "elsewhere"))  # nor can the driver
        # 1. a worker on a machine without that filesystem
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
            (tmp_path / "blind").mkdir()
            _with_extra_worker(c, _worker(scheduler, tmp_path / "blind", hide=dataset),
                               lambda: _raises(lambda: check_dataset(c, str(dataset)),
                                               r"dask worker tcp://\S+ cannot read the trace "
                                               r"dataset .*/ds: .*not a trace dataset.*every "
                                               r"worker reads its shards itself"))
        # 2. a worker running another checkout: the same version, one comment added
        other = tmp_path / "other"
        shutil.copytree(ROOT / "expertpred", other / "expertpred",
                        ignore=shutil.ignore_patterns("__pycache__"))
        with open(other / "expertpred/errors.py", "a") as f:
            f.write("# another commit\n")
        _with_extra_worker(c, _worker(scheduler, other, pythonpath=other),
                           lambda: _raises(lambda: check_code(c),
                                           r"dask worker tcp://\S+ runs expertpred \S+ from "
                                           r".*/other/expertpred; this driver runs"))
        check_code(c)
        check_dataset(c, str(dataset))


def _raises(fn, match: str) -> None:
    with pytest.raises(ExpertPredError, match=match):
        fn()
