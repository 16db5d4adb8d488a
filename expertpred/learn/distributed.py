"""``expertpred train --cluster local:N | --scheduler tcp://HOST:PORT``: the ladder on Dask.

Same recipe, same rows, same predictors as :func:`~expertpred.learn.train.train`; only where
the work runs changes:

1. features: one task per trace shard on the workers, through the one feature builder
   (:mod:`.shards`); the driver holds row counts, never rows;
2. the lookup tables (popularity, previous-token, transition, previous-token+transition)
   are Dask reductions: whole-number float64 counts per partition, summed in a tree on the
   workers, then normalised exactly as one process does, so their arrays (and exported
   artifacts) are bit-identical to single-process;
3. LightGBM: ``lightgbm.dask`` per (source layer, expert) on Dask arrays (:mod:`.dask_lgbm`);
4. the MLPs: torch ``DistributedDataParallel`` over gloo, one rank per worker holding
   partitions (:mod:`.ddp`);
5. the next-use model of the learned residency policy: one task per shard, the stream's
   state carried from piece to piece and every fit a sum over pieces (:mod:`.dask_nextuse`).

Every fit finishes before anything is written, and a worker that dies mid-training is one
error line (:class:`~.shards.WorkerLostError`), so a failed run leaves no partial models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, FeatureConfig
from ..predictors import Predictor
from ..predictors.kernels import freq_from_counts, layer_counts
from ..predictors.prev_transition import weight_rows
from ..predictors.transition import table_from_counts, transition_counts
from .dask_nextuse import check_config, fit_nextuse_distributed
from .shards import (
    Guard,
    NoProgress,
    Progress,
    RowSet,
    ShardInput,
    WorkerLostError,
    check_dataset,
)
from .train import (
    NEXTUSE_FILE,
    FitResult,
    PredictorsConfig,
    TraceSource,
    open_source,
    phase_value,
    rung_to_fit,
    save_all,
)

log = logging.getLogger(__name__)

TABLES = ("popularity", "previous-token", "transition", "previous-token+transition")
FROM_HEAD = ("random", "oracle", "gate-lookahead")  # their fit reads no row values
SYNTHETIC_CHUNK = 16  # synthetic sequences per partition (a dataset has its shards)


# --- worker tasks -------------------------------------------------------------------------------

def task_counts(b: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
    """(layer counts (L, E), transition counts (L, E, E)) of one partition."""
    return layer_counts(b), transition_counts(b)


def task_add_counts(a: tuple[np.ndarray, np.ndarray],
                    b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return a[0] + b[0], a[1] + b[1]  # whole numbers below 2**53: exact in any order


# --- inputs ---------------------------------------------------------------------------------

def shard_inputs(client: Any, source: TraceSource, seq_ids: Sequence[int]) -> list[Any]:
    """One :class:`ShardInput` future per partition, in the stream order of
    ``source.sequences(seq_ids)``: a dataset's shards, or chunks of synthetic traces."""
    want = set(int(i) for i in seq_ids)
    if source._dataset is not None:
        ds = source._dataset
        # absolute: a worker's working directory is its own (another machine's, maybe)
        path = str(ds.path.absolute())
        check_dataset(client, path)
        inputs = [ShardInput(path, tuple(i for i in s.seq_ids if i in want))
                  for s in ds.shards]
        inputs = [i for i in inputs if i.seq_ids]
    else:
        traces = [t for t in source._synthetic if t.seq_id in want]
        inputs = [ShardInput("", tuple(t.seq_id for t in c), tuple(c))
                  for c in (traces[i:i + SYNTHETIC_CHUNK]
                            for i in range(0, len(traces), SYNTHETIC_CHUNK))]
    if not inputs:
        raise ExpertPredError("too few examples to train: no training sequences selected")
    # hash=False: unique keys. The ladder scatters the same inputs first and releases them
    # when it is done; content-hashed keys made this second scatter share those keys, and
    # the late release cancelled the next-use model's tasks ("lost dependencies")
    return client.scatter(inputs, broadcast=False, hash=False)


# --- fitting --------------------------------------------------------------------------------

class _Tables:
    """The counts of one offset's rows, reduced once and shared by the four lookup rungs."""

    def __init__(self, rows: RowSet) -> None:
        self.rows = rows
        self._counts: tuple[np.ndarray, np.ndarray] | None = None

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        if self._counts is None:
            self._counts = self.rows.reduce(task_counts, task_add_counts,
                                            f"counting tables (d={self.rows.config.d})")
        return self._counts

    def fit(self, p: Predictor) -> Predictor:
        rows, (lc, tc) = self.rows, self.counts()
        params, cls = p.get_params(), type(p)
        alpha = float(params["alpha"])
        args = (params, rows.model, rows.config)
        if p.name in ("popularity", "previous-token"):
            return cls.from_artifact(*args, {}, {"freq": freq_from_counts(lc, alpha)})
        if p.name == "transition":
            if params["source"] not in ("experts", "probs"):
                raise ExpertPredError(f"transition source={params['source']!r}: expected "
                                      "experts|probs")
            return cls.from_artifact(*args, {"source": str(params["source"])},
                                     {"table": table_from_counts(tc, alpha)})
        arrays = {"table": table_from_counts(tc, alpha), "freq": freq_from_counts(lc, alpha)}
        weight = params["weight"]
        if weight is None:  # chosen on the single-process sample rows, in their order
            chooser = cls(**params)
            chooser.table_, chooser.freq_ = arrays["table"], arrays["freq"]
            which = rows.client.submit(weight_rows, rows.n, pure=False)
            weight = chooser.choose_weight(rows.gather_ordered(
                which, f"choosing the previous-token+transition weight (d={rows.config.d})"))
        return cls.from_artifact(*args, {"weight": float(weight)}, arrays)


def _check_rows(p: Predictor, rows: RowSet) -> None:
    if rows.n < p.min_rows:
        raise ExpertPredError(f"too few examples to train {p.name!r}: {rows.n} rows for "
                              f"d={rows.config.d}, need at least {p.min_rows}")


def fit_one(p: Predictor, rows: RowSet, head: FeatureBatch, tables: _Tables,
            progress: Progress) -> Predictor:
    """Fit one rung on the distributed rows, by the route its kind needs."""
    _check_rows(p, rows)
    if p.name in TABLES:
        return tables.fit(p)
    if p.name in FROM_HEAD:
        return p.fit(head)  # the model's shape (and the GGUF) is all they read
    if p.name == "lightgbm":
        from .dask_lgbm import fit_lightgbm

        return fit_lightgbm(p, rows, head, progress)
    if p.name in ("mlp", "fast-mlp"):
        from .ddp import fit_mlp

        return fit_mlp(p, rows, head, progress)
    raise ExpertPredError(f"predictor {p.name!r} has no distributed fit; drop it from "
                          "predictors= or train without --cluster")


def fit_all_distributed(cfg: PredictorsConfig, source: TraceSource, train_ids: Sequence[int],
                        client: Any, progress: Progress | None = None,
                        names: Sequence[str] | None = None) -> FitResult:
    """:func:`~expertpred.learn.train.fit_all` on a Dask cluster: same rows, same results
    (bit-identical tables; LightGBM and the MLP trained data-parallel)."""
    progress = progress or NoProgress()
    names = list(names if names is not None else cfg.predictors)
    res = FitResult()
    if not train_ids:
        raise ExpertPredError("too few examples to train: no training sequences selected")
    guard = Guard(client)
    inputs = shard_inputs(client, source, train_ids)
    for d in cfg.offsets:
        if d >= source.model.n_moe:
            raise ExpertPredError(f"config offsets: d={d} but the model has only "
                                  f"{source.model.n_moe} MoE layers")
        fc = FeatureConfig(d=d, history_decay=cfg.history_decay)
        progress.start(f"d={d}: features of {len(inputs)} shards on "
                       f"{len(guard.workers)} workers", 1)
        rows = RowSet.build(client, guard, inputs, source.model, fc,
                            phase_value(cfg.train_phase), cfg.max_train_rows, cfg.seed)
        progress.advance()
        res.train_rows[d] = rows.n
        head = rows.head(f"features (d={d})")
        tables = _Tables(rows)
        for name in names:
            p = rung_to_fit(cfg, name, source.gguf_path, head.hidden is not None, res.skipped)
            if p is None:
                continue
            t0 = time.perf_counter()
            res.predictors.setdefault(name, {})[d] = fit_one(p, rows, head, tables, progress)
            res.fit_seconds.setdefault(name, {})[d] = time.perf_counter() - t0
            log.info("fitted %s d=%d on %d rows in %.1fs (distributed)", name, d, rows.n,
                     res.fit_seconds[name][d])
        rows.release()
    guard.check("training")
    for name, why in res.skipped.items():
        log.warning("skipped predictor %s: %s", name, why)
    return res


def train_distributed(cfg: PredictorsConfig, client: Any,
                      progress: Progress | None = None) -> tuple[FitResult, list[Path]]:
    """:func:`~expertpred.learn.train.train` on a Dask cluster; writes only after every fit
    (and the next-use model) succeeded."""
    progress = progress or NoProgress()
    check_config(cfg)
    source = open_source(cfg)
    train_ids = source.select(split="train")
    log.info("training on %d sequences of %s (distributed)", len(train_ids),
             source.description)
    fitted = fit_all_distributed(cfg, source, train_ids, client, progress)
    guard = Guard(client)
    nextuse = fit_nextuse_distributed(cfg, source.model, client, guard,
                                      shard_inputs(client, source, train_ids), progress)
    guard.check("training")  # the last chance to fail before anything is written
    paths = save_all(fitted, Path(cfg.out) / "models")
    paths.append(nextuse.save(Path(cfg.out) / "models" / NEXTUSE_FILE))
    return fitted, paths


__all__ = ["WorkerLostError", "fit_all_distributed", "train_distributed"]
