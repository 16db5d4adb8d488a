"""Parallel tracing: N llama.cpp processes over disjoint prompt chunks into one dataset.

``expertpred trace --workers N`` (:func:`trace_parallel`, called by
:func:`~expertpred.trace.run.trace_prompts` when ``cfg.workers > 1``):

1. The parent opens the dataset's :class:`~expertpred.trace.dataset.TraceWriter` as a serial
   run does (manifest, directory lock, ``--resume``: skip finished sequences, adopt orphan
   shards, drop ``*.tmp``), and splits the prompts left to trace into N contiguous chunks in
   file order.
2. Each chunk goes to a worker: a fresh interpreter (multiprocessing ``spawn``: no llama.cpp
   state is forked) that traces its prompts with the serial run's own
   :func:`~expertpred.trace.run.trace_one` and writes whole shards named after itself
   (:class:`~expertpred.trace.dataset.worker_writer.WorkerShardWriter`). ``--threads`` is
   the total: each worker gets ``max(1, threads // N)`` llama.cpp threads.
3. A worker sends each finished shard's record to the parent over its own pipe; the parent,
   the one merger, lists it in the manifest (tmp + fsync + rename) with
   :meth:`~expertpred.trace.dataset.TraceWriter.add_shard`.

Why the data equal a serial run's, sequence by sequence: seq_id is the prompt's index in the
file, the sampling seed of sequence i is ``seed + i``, and a sequence's routing depends on
nothing but its prompt (the KV cache is cleared per prompt; greedy decoding is
deterministic; ggml gives each output element to one thread, so the thread count does not
change a value). Shard names sort worker-first, and chunks are contiguous, so a fresh
parallel run lists its sequences in seq_id order, as a serial run does.

Crash safety is the serial writer's: a SIGKILL of a worker leaves at most a ``*.tmp`` (removed
on resume) or a finished shard the parent never heard of (adopted on resume); a SIGKILL of
the parent kills the workers too (``PR_SET_PDEATHSIG``; a worker also stops when it finds
itself re-parented), so nobody writes into a directory whose lock was released. The
manifest always lists a subset of the finished shards; ``--resume`` traces exactly the rest.
``--workers`` above the number of prompts left is clamped to it; one prompt (or one worker)
runs in-process, as a serial run.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from ..errors import ExpertPredError
from .dataset import ManifestInfo, ShardInfo, TraceDataset, TraceWriter
from .dataset.worker_writer import WorkerShardWriter
from .prompts import Prompt

if TYPE_CHECKING:
    from .run import TraceProgress, TraceRunConfig, TraceRunResult

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_JOIN_SECONDS = 30.0  # bound on waiting for workers after an error or Ctrl-C


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process traces (pickled to the spawned interpreter)."""

    worker: int  # index: names its shards shard-wNN-*
    cfg: TraceRunConfig  # the run's settings, threads = this worker's share
    info: ManifestInfo  # the manifest description: shards carry the model's sha256
    prompts: tuple[Prompt, ...]  # a contiguous chunk of the prompts left to trace
    parent_pid: int  # the worker stops if it is re-parented (the parent died)


def split_chunks(todo: list[Prompt], n: int) -> list[tuple[Prompt, ...]]:
    """``n`` contiguous chunks whose sizes differ by at most one (first chunks larger).

    >>> [len(c) for c in split_chunks([Prompt(i, str(i), "", None, "") for i in range(7)], 3)]
    [3, 2, 2]
    """
    q, r = divmod(len(todo), n)
    out, at = [], 0
    for w in range(n):
        size = q + (w < r)
        out.append(tuple(todo[at:at + size]))
        at += size
    return out


# --- the worker process -------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the parent dies (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the per-prompt getppid check remains
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(job: WorkerJob, conn: Connection) -> None:
    """Trace ``job.prompts`` into worker shards; report shards, sequences and the end."""
    from .run import open_tracer, trace_one

    _die_with_parent(job.parent_pid)
    cfg = job.cfg
    try:
        tracer = open_tracer(cfg, cfg.threads)
        try:
            with WorkerShardWriter(cfg.out, job.info, worker=job.worker,
                                   on_shard=lambda s: conn.send(("shard", s)),
                                   shard_rows=cfg.shard_rows) as writer:
                for p in job.prompts:
                    if os.getppid() != job.parent_pid:
                        return  # the parent is gone: its lock too; write nothing more
                    seq = trace_one(tracer, cfg, p)
                    writer.write(seq, split=p.split)
                    conn.send(("seq", seq.n_tokens))
        finally:
            tracer.close()
        conn.send(("done", None))
    except KeyboardInterrupt:
        _send(conn, ("error", "interrupted"))
    except ExpertPredError as exc:
        _send(conn, ("error", str(exc)))
    except Exception as exc:  # reported by the parent as one line, with the worker's index
        _send(conn, ("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _send(conn: Connection, msg: tuple[str, Any]) -> None:
    try:
        conn.send(msg)
    except OSError:  # the parent is gone; nothing to tell
        pass


# --- the parent -----------------------------------------------------------------------------


@dataclass
class _Run:
    """The parent's view of its workers while they run."""

    writer: TraceWriter
    progress: TraceProgress | None
    started: float  # perf_counter at the start of tracing
    tokens: int = 0  # traced by all workers so far
    n_done: int = 0  # sequences traced by all workers so far

    def handle(self, w: int, kind: str, payload: Any, errors: dict[int, str]) -> bool:
        """One message of worker ``w``; True when the worker has finished (or failed)."""
        if kind == "shard":
            assert isinstance(payload, ShardInfo)
            self.writer.add_shard(payload)
        elif kind == "seq":
            self.tokens += int(payload)
            self.n_done += 1
            if self.progress is not None:
                self.progress.advance(self.tokens, time.perf_counter() - self.started)
        elif kind == "error":
            errors[w] = str(payload)
            return True
        elif kind == "done":
            return True
        return False


def _supervise(run: _Run, procs: list[Any], conns: list[Connection]) -> dict[int, str]:
    """Read every worker's messages until each has finished or died; errors by worker."""
    errors: dict[int, str] = {}
    open_conns = {c: w for w, c in enumerate(conns)}
    while open_conns:
        for c in wait(list(open_conns), timeout=1.0):
            w = open_conns[c]
            try:
                kind, payload = c.recv()
            except (EOFError, OSError):  # the worker exited, or was killed mid-message
                del open_conns[c]
                procs[w].join(_JOIN_SECONDS)
                if w not in errors and procs[w].exitcode != 0:
                    errors[w] = _exit_reason(procs[w].exitcode)
                continue
            if run.handle(w, kind, payload, errors):
                del open_conns[c]
    return errors


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop(procs: list[Any]) -> None:
    """Bounded shutdown: wait for the workers, then SIGKILL the ones still running."""
    deadline = time.monotonic() + _JOIN_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def trace_parallel(cfg: TraceRunConfig, progress: TraceProgress | None = None) -> TraceRunResult:
    """Trace every selected prompt not yet in ``cfg.out`` with ``cfg.workers`` processes."""
    from .run import manifest_info, select_prompts, trace_in_process

    start = time.perf_counter()
    selection = select_prompts(cfg)
    info = manifest_info(cfg, selection)
    with TraceWriter(cfg.out, info, shard_rows=cfg.shard_rows, resume=cfg.resume) as writer:
        todo = [p for p in selection if p.index not in writer.done_seq_ids]
        n = min(cfg.workers, len(todo))
        if progress is not None:
            progress.start(len(todo), len(selection))
        if n <= 1:  # nothing to split: the serial loop, in this process
            n_done, tokens = trace_in_process(cfg, writer, todo, progress)
            return _result(cfg, selection, todo, n_done, tokens, start)
        wcfg = replace(cfg, threads=max(1, cfg.threads // n))
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for w, chunk in enumerate(split_chunks(todo, n)):
            recv, send = ctx.Pipe(duplex=False)
            job = WorkerJob(worker=w, cfg=wcfg, info=info, prompts=chunk,
                            parent_pid=os.getpid())
            p = ctx.Process(target=_worker_main, args=(job, send), name=f"trace-worker-{w}")
            p.start()
            send.close()  # the worker holds the only write end: its death is EOF here
            procs.append(p)
            conns.append(recv)
        run = _Run(writer=writer, progress=progress, started=time.perf_counter())
        try:
            errors = _supervise(run, procs, conns)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):  # Ctrl-C reached the workers too
                for p in procs:
                    p.terminate()  # finished shards stay; the next --resume adopts them
            raise
        finally:
            _stop(procs)
            for c in conns:
                c.close()
        if errors:
            w, why = min(errors.items())
            raise ExpertPredError(
                f"{cfg.out}: trace worker {w} failed ({why}); {len(errors)} of {n} workers "
                f"failed, {run.n_done} sequences written; rerun with --resume to trace the rest")
    log.info("%s: %d workers traced %d sequences, %d tokens", cfg.out, n, run.n_done,
             run.tokens)
    return _result(cfg, selection, todo, run.n_done, run.tokens, start)


def _result(cfg: TraceRunConfig, selection: list[Prompt], todo: list[Prompt], n_done: int,
            tokens: int, start: float) -> TraceRunResult:
    from .run import TraceRunResult

    return TraceRunResult(dataset=TraceDataset(cfg.out), n_selected=len(selection),
                          n_skipped=len(selection) - len(todo), n_traced=n_done, tokens=tokens,
                          seconds=time.perf_counter() - start)
