"""Trace writer benchmark: RSS flatness, bytes per token per layer, write throughput.

    python benchmarks/trace_write.py                          # synthetic, tiny-model shapes
    python benchmarks/trace_write.py --tokens 200000 --shape mixtral-8x7b
    python benchmarks/trace_write.py --model models/tiny-qwen3moe/model.gguf \\
        --prompts datasets/prompts/heldout.jsonl --tokens 10000   # a real llama.cpp run

Synthetic mode feeds the writer ready-made SequenceTraces (random router logits — the worst
case for compression) so it times the writer alone. Real mode traces prompts with
LlamaTracer and writes them as ``expertpred trace`` does; tokens/s then includes inference.
RSS is sampled every ``--every`` tokens; the ratio max/min is taken after the first shard is
written (the allocator's first-shard high-water mark is the steady state).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertpred.gguf.layout import model_info  # noqa: E402
from expertpred.trace.dataset import (  # noqa: E402
    DecodingInfo,
    ManifestInfo,
    ModelInfo,
    PromptSetInfo,
    TraceWriter,
)
from expertpred.trace.prompts import load_prompts  # noqa: E402
from expertpred.trace.record import SequenceTrace  # noqa: E402

log = logging.getLogger("trace_write")

# name -> (MoE layers, experts used, experts, hidden size)
SHAPES = {
    "tiny-mixtral": (8, 2, 8, 160),
    "tiny-qwen3moe": (8, 4, 32, 160),
    "mixtral-8x7b": (32, 2, 8, 4096),
    "qwen3-30b-a3b": (48, 8, 128, 2048),
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_sequences(shape: tuple[int, int, int, int], hidden: bool, tokens: int,
                        seq_tokens: int = 112, seed: int = 0) -> Iterator[SequenceTrace]:
    """Sequences of ``seq_tokens`` tokens until ``tokens``; a pool of 8 reused (flat memory)."""
    n_layer, k, e, d = shape
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(8):
        logits = rng.standard_normal((seq_tokens, n_layer, e)).astype(np.float32)
        experts = np.argsort(-logits, axis=-1)[..., :k].astype(np.int16)
        top = np.take_along_axis(logits, experts.astype(np.int64), axis=-1)
        w = np.exp(top - top.max(-1, keepdims=True))
        pool.append(SequenceTrace(
            seq_id=i, prompt_id=f"p{i}", domain=("code", "prose")[i % 2],
            tokens=rng.integers(0, 4096, seq_tokens).astype(np.int32),
            phase=(np.arange(seq_tokens) >= 80).astype(np.int8), experts=experts,
            weights=(w / w.sum(-1, keepdims=True)).astype(np.float32), logits=logits,
            hidden=(rng.standard_normal((seq_tokens, n_layer, d)).astype(np.float16)
                    if hidden else None), text="x" * 100))
    for i in range(-(-tokens // seq_tokens)):
        yield dataclasses.replace(pool[i % len(pool)], seq_id=i, prompt_id=f"p{i}")


def real_sequences(args: argparse.Namespace, info: ManifestInfo) -> Iterator[SequenceTrace]:
    from expertpred.trace.llama_tracer import LlamaTracer

    prompts = load_prompts(args.prompts)
    tracer = LlamaTracer(str(args.model), n_ctx=args.n_ctx, n_threads=args.threads,
                         capture_hidden=args.hidden, seed=0)
    try:
        done = 0
        i = 0
        while done < args.tokens:
            p = prompts[i % len(prompts)]
            seq = tracer.trace(p.text, args.max_tokens, greedy=True, seed=0, seq_id=i,
                               prompt_id=f"{p.id}@{i}", domain=p.domain)
            done += seq.n_tokens
            i += 1
            yield seq
    finally:
        tracer.close()


def run(args: argparse.Namespace) -> dict[str, float]:
    if args.model:
        model = model_info(args.model)
        shape_name = f"{model.arch} ({args.model})"
    else:
        n_layer, k, e, d = SHAPES[args.shape]
        model = ModelInfo(path=f"synthetic:{args.shape}", sha256="0" * 64, arch="synthetic",
                          n_layer=n_layer, moe_layers=tuple(range(n_layer)), n_expert=e,
                          n_expert_used=k, n_embd=d)
        shape_name = args.shape
    info = ManifestInfo(model=model, capture_hidden=args.hidden,
                        decoding=DecodingInfo(max_tokens=args.max_tokens, n_ctx=args.n_ctx,
                                              n_threads=args.threads),
                        prompts=(PromptSetInfo(str(args.prompts), "-", 0) if args.model
                                 else None))
    shape = (len(model.moe_layers), model.n_expert_used, model.n_expert, model.n_embd)
    seqs = (real_sequences(args, info) if args.model
            else synthetic_sequences(shape, args.hidden, args.tokens))
    out = Path(tempfile.mkdtemp(prefix="trace_write_", dir=args.dir))
    print(f"shape {shape_name}: L={shape[0]} k={shape[1]} E={shape[2]} D={shape[3]} "
          f"hidden={args.hidden}  shard_rows={args.shard_rows}  out={out}")
    samples: list[tuple[int, float]] = []
    tokens = 0
    next_sample = 0
    write_s = 0.0
    first_shard_at: int | None = None
    t_start = time.perf_counter()
    try:
        writer = TraceWriter(out / "ds", info, shard_rows=args.shard_rows)
        for seq in seqs:
            t0 = time.perf_counter()
            writer.write(seq)
            write_s += time.perf_counter() - t0
            tokens += seq.n_tokens
            if first_shard_at is None and writer.shards_written:
                first_shard_at = len(samples)
            if tokens >= next_sample:
                samples.append((tokens, rss_mib()))
                print(f"  tokens {tokens:>9,d}  rss {samples[-1][1]:8.1f} MiB  "
                      f"shards {writer.shards_written}")
                next_sample += args.every
        t0 = time.perf_counter()
        writer.close()
        write_s += time.perf_counter() - t0
        wall = time.perf_counter() - t_start
        rss_after_close = rss_mib()
        steady = [r for _, r in samples[(first_shard_at or 0):]] or [rss_after_close]
        nbytes = writer.bytes_written
        raw_row = 4 * 3 + 1 + shape[0] * (shape[1] * 6 + shape[2] * 4
                                          + (shape[3] * 2 if args.hidden else 0))
        res = {
            "tokens": tokens,
            "shards": writer.shards_written,
            "bytes": nbytes,
            "bytes_per_token": nbytes / tokens,
            "bytes_per_token_layer": nbytes / tokens / shape[0],
            "raw_bytes_per_token": raw_row,
            "compression": raw_row * tokens / nbytes,
            "write_s": write_s,
            "write_MBps_on_disk": nbytes / write_s / 1e6,
            "write_MBps_raw": raw_row * tokens / write_s / 1e6,
            "rows_per_s": tokens / write_s,
            "wall_s": wall,
            "tokens_per_s_wall": tokens / wall,
            "rss_min_MiB": min(steady),
            "rss_max_MiB": max(steady),
            "rss_max_over_min": max(steady) / min(steady),
            "rss_after_close_MiB": rss_after_close,
        }
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print("results:")
    for k, v in res.items():
        print(f"  {k:24s} {v:,.3f}" if isinstance(v, float) else f"  {k:24s} {v:,d}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny-qwen3moe")
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=1_000, help="sample RSS every N tokens")
    ap.add_argument("--shard-rows", type=int, default=2048)
    ap.add_argument("--hidden", action="store_true")
    ap.add_argument("--model", type=Path, help="trace with llama.cpp instead of synthetic data")
    ap.add_argument("--prompts", type=Path,
                    default=Path(__file__).resolve().parents[1] / "datasets/prompts/heldout.jsonl")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dir", default=None, help="where to write (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the written dataset")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(args)


if __name__ == "__main__":
    main()
