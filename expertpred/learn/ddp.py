"""The MLP rungs on a Dask cluster: torch ``DistributedDataParallel`` over gloo.

Why this route: the MLP is one small network trained by SGD, so data parallelism is the
natural split, and DDP is torch's own, well-kept implementation of it (gradient
all-reduce, identical replicas); gloo is its CPU backend. Dask only places the ranks: every
worker holding training partitions runs one rank (rank = its place in the sorted worker
list) on the rows it already has, so rows never move; the rendezvous is a TCP store on the
first rank's host (127.0.0.1 on a LocalCluster). Rank 0 returns the weights.

The recipe is the predictor's own (:meth:`MLPPredictor.make_net`, ``make_optimizer``,
``batch_loss``, ``labels``): same network, optimizer, one-cycle schedule and loss. Each
step every rank takes a share of the global batch proportional to its rows, so the
all-reduced gradient is the gradient of a ``batch_size`` batch of the whole data, and all
ranks take the same number of steps (``ceil(n / batch_size)`` per epoch), as DDP needs.
Standardisation statistics are a reduction (float64 sums) over all partitions.
"""

from __future__ import annotations

import logging
import math
import socket
from datetime import timedelta

import numpy as np

from ..features import FeatureBatch, concat
from ..predictors.design import Design
from ..predictors.mlp import MLPPredictor
from .shards import Progress, RowSet, WorkerLostError

log = logging.getLogger(__name__)

# a rank waiting on a peer that stopped answering gives up; a dead worker is noticed by the
# driver's guard at once, so this only bounds a hung (or paused) one
COLLECTIVE_TIMEOUT_S = 1800
EPOCH_TOPIC = "expertpred-ddp-epoch"  # rank 0 logs a Dask event per epoch (progress)


# --- worker tasks -------------------------------------------------------------------------------

def task_moments(b: FeatureBatch | None, design: Design) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum, sum of squares, rows) of the design columns, float64."""
    if b is None:
        return np.zeros(design.n_features), np.zeros(design.n_features), 0
    x = design.matrix(b).astype(np.float64)
    return x.sum(axis=0), np.square(x).sum(axis=0), len(x)


def task_add_moments(a: tuple[np.ndarray, np.ndarray, int],
                     b: tuple[np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray, int]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def task_free_port() -> int:
    """A free TCP port on this worker's host, for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def task_rank(rank: int, world: int, host: str, port: int, parts: list[FeatureBatch | None],
              design: Design, mean: np.ndarray, std: np.ndarray, p: MLPPredictor,
              n_global: int, n_l: int, e: int, topic: str) -> list[np.ndarray] | None:
    """One DDP rank on this worker's partitions; rank 0 returns the trained weights."""
    import os

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    b = concat([x for x in parts if x is not None])
    xs = torch.from_numpy((design.matrix(b) - mean) / std)
    ys = torch.from_numpy(p.labels(b.targets, e))
    head = torch.from_numpy(b.layer.astype(np.int64))
    if host in ("127.0.0.1", "localhost"):  # gloo would pick the host name's interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker = one core: small matrices, no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        torch.manual_seed(p.seed)  # the same initial replica on every rank
        gen = torch.Generator().manual_seed(p.seed + rank)
        net = p.make_net(torch, xs.shape[1], n_l, e)
        model = DistributedDataParallel(net)
        steps = math.ceil(n_global / p.batch_size)
        opt, sched = p.make_optimizer(torch, model, p.epochs * steps)
        local = max(1, round(p.batch_size * len(xs) / n_global))  # this rank's batch share
        for epoch in range(p.epochs):
            perm = torch.randperm(len(xs), generator=gen)
            for i in range(steps):
                idx = perm[torch.arange(i * local, (i + 1) * local) % len(xs)]
                loss = p.batch_loss(torch, model, xs[idx], ys[idx], head[idx], n_l, e)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            if rank == 0:
                _log_epoch(topic, epoch + 1)
        if rank != 0:
            return None
        return [q.detach().numpy().astype(np.float32).copy() for q in net.parameters()]
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def _log_epoch(topic: str, epoch: int) -> None:
    from distributed import get_worker

    get_worker().log_event(topic, epoch)


# --- the fit ------------------------------------------------------------------------------------

def _standardisation(rows: RowSet, design: Design) -> tuple[np.ndarray, np.ndarray]:
    s, ss, n = rows.reduce(task_moments, task_add_moments,
                           f"mlp standardisation (d={rows.config.d})", design)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0)) + 1e-3
    return mean.astype(np.float32), std.astype(np.float32)


def fit_mlp(p: MLPPredictor, rows: RowSet, head: FeatureBatch,
            progress: Progress) -> MLPPredictor:
    """``p`` (mlp or fast-mlp) trained by DDP on ``rows`` (its ``max_rows`` sample)."""
    from ..errors import ExpertPredError

    if p.loss not in ("bce", "softmax"):
        raise ExpertPredError(f"{p.name} loss={p.loss!r}: expected bce or softmax")
    p._widths()  # a bad shape fails before any worker starts
    d = rows.config.d
    rows = rows.permuted_subset(p.max_rows, p.seed, f"{p.name} row sample (d={d})")
    design = Design.fit(head, p._parts(), True, p.gguf_path, p.name)
    mean, std = _standardisation(rows, design)
    held = rows.by_worker()
    ranks = sorted(held)
    c = rows.client
    host = ranks[0].split("://")[-1].rsplit(":", 1)[0].strip("[]")
    port = rows.guard.gather(c.submit(task_free_port, workers=[ranks[0]], pure=False),
                             "ddp rendezvous")
    topic = f"{EPOCH_TOPIC}-{p.name}-{d}-{port}"
    progress.start(f"d={d}: {p.name} DDP (gloo) on {len(ranks)} ranks, {p.epochs} epochs",
                   p.epochs)
    futs = [c.submit(task_rank, r, len(ranks), host, port, held[w], design, mean, std, p,
                     rows.n, rows.model.n_moe, rows.model.n_expert, topic,
                     workers=[w], allow_other_workers=False, pure=False)
            for r, w in enumerate(ranks)]
    done = [0]

    def tick() -> None:
        now = max((int(msg) for _, msg in c.get_events(topic)), default=0)
        if now > done[0]:
            progress.advance(now - done[0])
            done[0] = now

    weights = rows.guard.run(lambda: c.gather(futs), f"{p.name} DDP training (d={d})",
                             on_poll=tick)[0]
    tick()
    if weights is None:
        raise WorkerLostError(f"{p.name} DDP: rank 0 returned no weights")
    p.set_weights(design, mean, std, weights)
    p.model_, p.feature_config_ = rows.model, rows.config
    p._ready()
    return p
