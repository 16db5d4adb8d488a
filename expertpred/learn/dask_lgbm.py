"""The LightGBM rung on a Dask cluster: ``lightgbm.dask`` per (source layer, expert).

The same model as :class:`~expertpred.predictors.lgbm.LightGBMPredictor` (one binary
booster per expert, per source layer or shared, the same parameters, the same training
rows), trained by ``lightgbm.dask.DaskLGBMClassifier`` on Dask arrays whose chunks are the
partitions' design matrices, built where the rows live. LightGBM's data-parallel learner
sums histograms over the workers, so a booster sees every row without the rows moving;
its trees can still differ from one process's in the last bits (bin boundaries and
bagging are drawn per worker), which is why the test bounds recall, not bytes.

Each fit is one LightGBM network over the workers: a few hundred milliseconds of setup,
paid per booster (``docs/scale.md`` has the cost).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..features import FeatureBatch, design_parts, multihot
from ..predictors.design import Design
from ..predictors.lgbm import LightGBMPredictor, constant_label
from .shards import Progress, RowSet

log = logging.getLogger(__name__)

# LightGBM's socket time_out (minutes) for a peer that stopped answering; a dead worker is
# noticed by the driver's guard at once, so this only bounds a hung (or paused) one
NETWORK_TIMEOUT_MIN = 30
# LightGBM's sockets have that timeout (SO_RCVTIMEO), and on Linux such a recv fails with
# EINTR when its process is stopped and continued (SIGSTOP / SIGCONT: a box that pauses
# low-priority jobs does that), see signal(7). Nothing was trained then: fit it again
EINTR_RETRIES = 2


# --- worker tasks -------------------------------------------------------------------------------

def task_matrix(b: FeatureBatch | None, design: Design) -> tuple[np.ndarray, ...] | None:
    """(design matrix float32 (n, F), source layer (n,), labels float32 (n, E))."""
    if b is None:
        return None
    return design.matrix(b), b.layer.astype(np.int64), multihot(b.targets, b.model.n_expert)


def task_layer_counts(m: tuple[np.ndarray, ...] | None, n_layer: int) -> np.ndarray:
    return np.zeros(n_layer, np.int64) if m is None else np.bincount(m[1], minlength=n_layer)


def task_group(m: tuple[np.ndarray, ...], g: int, which: int) -> np.ndarray:
    """Column block ``which`` (0 = features, 2 = labels) of the rows of source layer ``g``
    (all rows for ``g < 0``: the shared model)."""
    return m[which] if g < 0 else m[which][m[1] == g]


def task_positives(y: np.ndarray) -> np.ndarray:
    return y.sum(axis=0, dtype=np.float64)


# --- the fit ------------------------------------------------------------------------------------

def _group_arrays(rows: RowSet, mats: list[Any], counts: np.ndarray, g: int,
                  n_features: int, n_expert: int) -> tuple[Any, Any, np.ndarray]:
    """(X dask array, Y dask array, positives per expert) of group ``g``'s rows."""
    import dask.array as da

    c = rows.client
    xs, ys, pos = [], [], []
    for m, n in zip(mats, counts):
        if n == 0:
            continue
        fx = c.submit(task_group, m, g, 0)
        fy = c.submit(task_group, m, g, 2)
        xs.append(da.from_delayed(fx, shape=(int(n), n_features), dtype=np.float32))
        ys.append(da.from_delayed(fy, shape=(int(n), n_expert), dtype=np.float32))
        pos.append(c.submit(task_positives, fy))
    positives = np.sum(rows.guard.gather(pos, f"lightgbm labels (layer {g})"), axis=0)
    return da.concatenate(xs), da.concatenate(ys), positives


def _train_booster(p: LightGBMPredictor, client: Any, x: Any, y: Any, shared: bool) -> str:
    import lightgbm as lgb

    params = p._params()
    params.pop("num_threads")  # lightgbm.dask uses each worker's thread count
    params["time_out"] = NETWORK_TIMEOUT_MIN
    for attempt in range(EINTR_RETRIES + 1):
        model = lgb.DaskLGBMClassifier(client=client, n_estimators=p.n_estimators, **params)
        try:
            model.fit(x, y, categorical_feature=[0] if shared else "auto")
        except lgb.basic.LightGBMError as exc:
            if "Interrupted system call" not in str(exc) or attempt == EINTR_RETRIES:
                raise
            log.warning("lightgbm.dask: %s; training the booster again", exc)
            continue
        return model.to_local().booster_.model_to_string()
    raise AssertionError("unreachable")


def fit_lightgbm(p: LightGBMPredictor, rows: RowSet, head: FeatureBatch,
                 progress: Progress) -> LightGBMPredictor:
    """``p`` fitted by ``lightgbm.dask`` on ``rows`` (its ``max_rows`` sample of them)."""
    d = rows.config.d
    rows = rows.permuted_subset(p.max_rows, p.seed, f"lightgbm row sample (d={d})")
    e, n_l = rows.model.n_expert, rows.model.n_moe
    design = Design.fit(head, design_parts(p.use_hidden, p.all_layers), False, p.gguf_path,
                        "lightgbm")
    c = rows.client
    mats = [c.submit(task_matrix, part, design) for part in rows.parts]
    per_layer = np.asarray(rows.guard.gather(
        [c.submit(task_layer_counts, m, n_l) for m in mats], f"lightgbm inputs (d={d})"))
    groups = [-1] if p.shared else [int(g) for g in np.flatnonzero(per_layer.sum(axis=0))]
    progress.start(f"d={d}: lightgbm.dask, {len(groups)} x {e} boosters", len(groups) * e)
    models: list[str] = []
    consts = np.full((len(groups), e), np.nan, dtype=np.float32)
    for gi, g in enumerate(groups):
        counts = per_layer.sum(axis=1) if g < 0 else per_layer[:, g]
        x, y, positives = _group_arrays(rows, mats, counts, g, design.n_features, e)
        n = int(counts.sum())
        for j in range(e):
            const = constant_label(float(positives[j]), n)
            if const is not None:  # (almost) constant label: no booster, as one process
                consts[gi, j] = const
                models.append("")
            else:
                models.append(rows.guard.run(
                    lambda: _train_booster(p, c, x, y[:, j], p.shared),
                    f"lightgbm.dask (d={d}, layer {g}, expert {j})"))
            progress.advance()
    for m in mats:
        m.release()
    p.design_ = design
    p.set_boosters(groups, consts, models)
    return _fitted(p, rows)


def _fitted(p: Any, rows: RowSet) -> Any:
    """Mark ``p`` fitted for the rows' model and offset (what ``Predictor.fit`` records)."""
    p.model_, p.feature_config_ = rows.model, rows.config
    p._ready()
    return p
