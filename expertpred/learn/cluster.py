"""Where distributed training runs: a Dask cluster named on the command line.

``local:N`` starts a ``LocalCluster`` of N worker processes on 127.0.0.1 (one thread each:
the work is numpy / LightGBM / torch, which release the GIL but would oversubscribe the
cores with more threads); ``tcp://HOST:PORT`` connects to the scheduler of an existing
cluster, whose workers must run the same expertpred code: tasks are pickled by reference,
so each worker runs its own copy of every function, and :func:`open_cluster` checks that
the copies are the driver's (:func:`code_fingerprint`). Both are opened by
:func:`open_cluster`, a context manager whose close is bounded.

Dask is imported here and below only: the single-machine path never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ExpertPredError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # an unreachable scheduler is an error after this, never a hang
START_TIMEOUT_S = 120.0  # a LocalCluster's workers must be up by then (a busy 2-core box)
CLOSE_TIMEOUT_S = 20.0  # closing the client / cluster waits at most this long
WORKER_TTL = "1h"  # a local scheduler drops a worker silent this long (see open_cluster)
MAX_LOCAL_WORKERS = 64  # more local worker processes than this is a typo, not a plan


class ClusterKind(Enum):
    LOCAL = "local"  # a LocalCluster started (and stopped) by this process
    SCHEDULER = "scheduler"  # an existing cluster's scheduler, left running


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` / ``--scheduler`` value."""

    kind: ClusterKind
    n_workers: int = 0  # LOCAL: worker processes to start
    address: str = ""  # SCHEDULER: tcp://HOST:PORT

    def describe(self) -> str:
        if self.kind is ClusterKind.LOCAL:
            return f"LocalCluster of {self.n_workers} worker processes on 127.0.0.1"
        return f"Dask scheduler {self.address}"


def parse_cluster(cluster: str | None, scheduler: str | None) -> ClusterSpec | None:
    """``--cluster local:N`` or ``--scheduler tcp://HOST:PORT`` (not both); None = neither.

    >>> parse_cluster("local:2", None).n_workers
    2
    >>> parse_cluster(None, "tcp://10.0.0.5:8786").address
    'tcp://10.0.0.5:8786'
    """
    if cluster is not None and scheduler is not None:
        raise ExpertPredError("--cluster and --scheduler: expected one of them, got both")
    if cluster is not None:
        m = re.fullmatch(r"local:(\d+)", cluster.strip())
        if m is None:
            raise ExpertPredError(f"--cluster {cluster!r}: expected local:N (N worker "
                                  "processes); for an existing cluster use --scheduler "
                                  "tcp://HOST:PORT")
        n = int(m[1])
        if not 1 <= n <= MAX_LOCAL_WORKERS:
            raise ExpertPredError(f"--cluster {cluster!r}: expected 1..{MAX_LOCAL_WORKERS} "
                                  "worker processes")
        return ClusterSpec(ClusterKind.LOCAL, n_workers=n)
    if scheduler is not None:
        m = re.fullmatch(r"tcp://([A-Za-z0-9.\-_]+|\[[0-9a-fA-F:]+\]):(\d{1,5})",
                         scheduler.strip())
        if m is None or not 0 < int(m[2]) < 65536:
            raise ExpertPredError(f"--scheduler {scheduler!r}: expected tcp://HOST:PORT "
                                  "(a Dask scheduler's address)")
        return ClusterSpec(ClusterKind.SCHEDULER, address=scheduler.strip())
    return None


@contextmanager
def open_cluster(spec: ClusterSpec) -> Iterator[Any]:  # yields a distributed.Client
    """A connected ``distributed.Client``; a LocalCluster is stopped on exit."""

    # the scheduler runs in this process and logs every worker's arrival at INFO: the
    # CLI shows progress bars instead, and errors reach the user as one line anyway
    dask_log = logging.getLogger("distributed")
    level = dask_log.level
    dask_log.setLevel(logging.ERROR)
    try:
        with _connected(spec) as client:
            yield client
    finally:
        dask_log.setLevel(level)


@contextmanager
def _connected(spec: ClusterSpec) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    # the default 30 s connect timeout retries silently; a wrong address should fail fast.
    # A local scheduler waits WORKER_TTL for a silent worker: a machine that pauses every
    # process for minutes (SIGSTOP of low-priority jobs) resumes them all together, and
    # the default 5 minutes would then drop healthy workers. A dead worker's closed
    # connection is noticed at once whatever the TTL.
    with dask.config.set({"distributed.comm.timeouts.connect": f"{CONNECT_TIMEOUT_S}s",
                          "distributed.scheduler.worker-ttl": WORKER_TTL}):
        cluster = None
        try:
            if spec.kind is ClusterKind.LOCAL:
                cluster = LocalCluster(n_workers=spec.n_workers, threads_per_worker=1,
                                       processes=True, host="127.0.0.1",
                                       # any free loopback port: 8787 may be taken
                                       dashboard_address="127.0.0.1:0",
                                       silence_logs=logging.ERROR)
                client = Client(cluster, timeout=START_TIMEOUT_S)
            else:
                client = Client(spec.address, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                cluster.close(timeout=CLOSE_TIMEOUT_S)
            raise ExpertPredError(f"{spec.describe()}: cannot connect "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
                                  ) from None
        try:
            if spec.kind is ClusterKind.LOCAL:
                try:
                    client.wait_for_workers(spec.n_workers, timeout=START_TIMEOUT_S)
                except TimeoutError:
                    raise ExpertPredError(f"{spec.describe()}: the workers did not start "
                                          f"within {START_TIMEOUT_S:.0f} s") from None
            elif not workers(client):
                raise ExpertPredError(f"{spec.describe()}: the cluster has no workers")
            check_code(client)
            log.info("connected to %s (%d workers)", spec.describe(), len(workers(client)))
            yield client
        finally:
            client.close(timeout=CLOSE_TIMEOUT_S)
            if cluster is not None:
                cluster.close(timeout=CLOSE_TIMEOUT_S)


def workers(client: Any) -> list[str]:
    """The cluster's worker addresses, sorted (rank i = the i-th). Asked of the scheduler
    each time: ``client.scheduler_info()`` returns a cache that a background refresh
    overwrites with totals only, which would read as workers gone."""
    return sorted(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


def code_fingerprint() -> tuple[str, str]:
    """(version + sha256 prefix of this expertpred's ``*.py`` files, where they are).

    Two installs of the same version can still differ (a checkout on another commit);
    the hash tells them apart."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}", str(root)


def check_code(client: Any) -> None:
    """Every worker runs this expertpred (:func:`code_fingerprint`), or one error line."""
    mine, where = code_fingerprint()
    try:
        theirs = client.run(code_fingerprint)
    except Exception as exc:  # a worker without expertpred cannot even unpickle the call
        raise ExpertPredError(f"the Dask workers cannot run expertpred ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:160]}): install expertpred "
                              f"{mine} on every worker (or set its PYTHONPATH)") from None
    for addr in sorted(theirs):
        got, at = theirs[addr]
        if got != mine:
            raise ExpertPredError(f"dask worker {addr} runs expertpred {got} from {at}; this "
                                  f"driver runs {mine} from {where}: install the same "
                                  "expertpred on every worker (or set its PYTHONPATH)")
