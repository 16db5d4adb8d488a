"""Fuzz targets: the trace dataset reader on mutations of the shipped trace datasets.

``manifest``: edits of the manifest (``_manifest.json``) — keys deleted or retyped, numbers
changed, shard names with traversal, shards listed twice, seq_ids duplicated or swapped,
another model's path or arch, byte flips and truncation of the JSON text.
``shard``: edits of one shard file — byte flips and truncation (with the manifest's sha256
and size kept, or re-signed to match the damaged bytes), and shards rewritten with pyarrow
with duplicated or swapped seq_ids, out-of-range expert ids, a dropped column or corrupt
sequence records, re-signed in the manifest (a deliberate, consistent-looking edit).

The read: open the dataset, ``sequence_info``, then (chosen per case) ``to_numpy`` of
seq_id/pos/experts or every ``SequenceTrace``. An accepted dataset must satisfy the
format's invariants, checked independently of the reader: listed shards are plain files
inside the directory with the listed sha256; each listed seq_id appears once, as one run in
its shard; expert ids are in range with the model's shape; the model record equals the
traced model's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...shipped import repo_root
from ...trace.dataset import MANIFEST_NAME, META_SEQUENCES, TraceDataset
from .core import flip_bytes, truncate

_ODD = [None, [], {}, "x", -1, 0, 1.5, True, "eight", 2**70, [0], {"a": 1}]
SEEDS = ("tiny-mixtral", "tiny-qwen3moe")


def read_dataset(path: Path, via: str = "numpy"
                 ) -> tuple[TraceDataset, dict[str, np.ndarray], list, int]:
    """Open and read everything the way a consumer does: ``via`` "numpy" (``to_numpy``, what
    train/evaluate/analyze stream) or "sequences" (``SequenceTrace`` objects, every column)."""
    ds = TraceDataset(path)
    info = ds.sequence_info()
    if via == "numpy":
        arrays = ds.to_numpy(["seq_id", "pos", "experts"])
        return ds, arrays, info, len(np.unique(arrays["seq_id"]))
    seqs = list(ds.sequences())
    e0 = np.zeros((0, ds.n_moe_layer, ds.n_expert_used), np.int16)
    arrays = {"seq_id": np.concatenate([np.full(s.n_tokens, s.seq_id, np.int32) for s in seqs]
                                       or [np.zeros(0, np.int32)]),
              "experts": np.concatenate([s.experts for s in seqs] or [e0])}
    return ds, arrays, info, len(seqs)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _TraceTarget:
    """Shared: a work copy of each seed dataset, restored after every case."""

    name = ""

    def prepare(self, workdir: Path) -> None:
        self.work = workdir
        self.seeds = [repo_root() / "datasets" / "traces" / s for s in SEEDS]
        self.pristine = []
        for i, src in enumerate(self.seeds):
            dst = workdir / f"ds{i}"
            shutil.copytree(src, dst)
            files = {p.name: p.read_bytes() for p in dst.iterdir()}
            self.pristine.append((dst, files, json.loads(files[MANIFEST_NAME])))
            for via in ("numpy", "sequences"):  # warm: first-use imports are not the reader's
                read_dataset(dst, via)
        self.i = 0
        self.via = "numpy"

    def restore(self) -> None:
        d, files, _ = self.pristine[self.i]
        for p in d.iterdir():
            if p.name not in files:
                p.unlink()
        for name, data in files.items():
            if (d / name).read_bytes() != data:
                (d / name).write_bytes(data)

    def _pick(self, rng: random.Random) -> tuple[Path, dict[str, bytes], Any]:
        """Choose the seed dataset and the read path of this case: (its directory, its
        pristine files, its pristine manifest)."""
        self.i = rng.randrange(len(self.pristine))
        self.via = rng.choice(("numpy", "sequences"))
        return self.pristine[self.i]

    def _write_manifest(self, m: Any) -> None:
        (self.pristine[self.i][0] / MANIFEST_NAME).write_text(json.dumps(m, indent=1))

    def read(self) -> object:
        return read_dataset(self.pristine[self.i][0], self.via)

    def inconsistencies(self, result: object) -> list[str]:
        ds, arrays, info, n_seq = result
        d, files, m0 = self.pristine[self.i]
        out: list[str] = []
        m = ds.manifest
        model, model0 = dict(m["model"]), dict(m0["model"])
        if model.pop("path") != model0.pop("path") and Path(m["model"]["path"]).exists():
            out.append(f"model.path {m['model']['path']} names an existing other file")
        if model != model0:
            out.append(f"model record {model} differs from the traced model's {model0}")
        listed: list[int] = []
        for s in m["shards"]:
            p = d / s["name"]
            if p.resolve().parent != d.resolve():
                out.append(f"shard {s['name']!r} is outside the dataset directory")
                continue
            if _sha(p.read_bytes()) != s["sha256"]:
                out.append(f"shard {s['name']} does not have its listed sha256")
            listed.extend(s["seq_ids"])
        if len(set(listed)) != len(listed):
            out.append("a seq_id is listed twice")
        sid = arrays["seq_id"]
        runs = sid[np.concatenate([[0], np.flatnonzero(np.diff(sid)) + 1])].tolist() \
            if len(sid) else []
        if runs != listed:
            out.append(f"seq_id runs {runs[:5]}… differ from the listed {listed[:5]}…")
        e = arrays["experts"]
        k, n_e, n_l = model0["n_expert_used"], model0["n_expert"], len(model0["moe_layers"])
        if e.shape[1:] != (n_l, k) or (e.size and (e.min() < 0 or e.max() >= n_e)):
            out.append(f"experts {e.shape}, ids {e.min() if e.size else '-'}..."
                       f"{e.max() if e.size else '-'} for {n_l} layers, top-{k} of {n_e}")
        if n_seq != len(listed) or len(info) != len(listed):
            out.append(f"{n_seq} sequences / {len(info)} records for {len(listed)} listed")
        return out


class ManifestTarget(_TraceTarget):
    name = "manifest"

    def _edit_json(self, m: dict, rng: random.Random) -> str:
        node: Any = m
        path: list[str] = []
        while True:  # walk down a random path of objects and lists
            if isinstance(node, dict) and node:
                key = rng.choice(sorted(node))
            elif isinstance(node, list) and node:
                key = rng.randrange(len(node))
            else:
                return "no edit"
            if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.7:
                path.append(str(key))
                node = node[key]
                continue
            break
        where = ".".join([*path, str(key)])
        r = rng.random()
        if r < 0.3 and isinstance(node, dict):
            del node[key]
            return f"delete {where}"
        if r < 0.55 and isinstance(node[key], int) and not isinstance(node[key], bool):
            node[key] = node[key] + rng.choice([-1, 1, -node[key] - 1, 10**6, 2**40])
            return f"set {where}={node[key]}"
        node[key] = rng.choice(_ODD)
        return f"set {where}={node[key]!r}"

    def _semantic(self, m: dict, rng: random.Random) -> str:
        shards = m["shards"]
        op = rng.choice(["traversal", "absolute", "dup-shard", "dup-seq", "swap-seq",
                         "swap-shards", "other-model", "arch", "sha", "n_expert", "drop-shard"])
        sh = rng.choice(shards)
        if op == "traversal":
            sh["name"] = rng.choice(["../../elsewhere/x.parquet", "../ds0/" + sh["name"],
                                     "sub/../" + sh["name"]])
        elif op == "absolute":
            sh["name"] = "/etc/passwd"
        elif op == "dup-shard":
            shards.append(copy.deepcopy(sh))
        elif op == "dup-seq" and len(sh["seq_ids"]) > 1:
            sh["seq_ids"][1] = sh["seq_ids"][0]
        elif op == "swap-seq" and len(sh["seq_ids"]) > 1:
            sh["seq_ids"][0], sh["seq_ids"][1] = sh["seq_ids"][1], sh["seq_ids"][0]
        elif op == "swap-shards" and len(shards) > 1:
            shards[0]["seq_ids"], shards[1]["seq_ids"] = shards[1]["seq_ids"], shards[0]["seq_ids"]
        elif op == "other-model":
            m["model"]["path"] = f"models/{SEEDS[1 - self.i]}/model.gguf"
        elif op == "arch":
            m["model"]["arch"] = rng.choice(["qwen3moe", "llama", "olmoe"])
        elif op == "sha":
            m["model"]["sha256"] = _sha(rng.randbytes(8))
        elif op == "n_expert":
            m["model"]["n_expert"] += 1
            m["columns"]["n_expert"] += 1
        elif op == "drop-shard" and len(shards) > 1:
            shards.remove(sh)  # a legitimate smaller dataset (a crash before the update)
        else:
            return f"{op}: not applicable"
        return op

    def case(self, rng: random.Random) -> str:
        d, files, m0 = self._pick(rng)
        raw = files[MANIFEST_NAME]
        kind = rng.choices(["json", "semantic", "flip", "truncate"], weights=[45, 35, 12, 8])[0]
        if kind in ("json", "semantic"):
            m = copy.deepcopy(m0)
            label = self._edit_json(m, rng) if kind == "json" else self._semantic(m, rng)
            self._write_manifest(m)
        else:
            e = (flip_bytes(raw, 0, len(raw), rng, "manifest") if kind == "flip"
                 else truncate(len(raw), 0, rng, "manifest"))
            (d / MANIFEST_NAME).write_bytes(e.apply(raw))
            label = e.label
        return f"{SEEDS[self.i]}: {label}"


class ShardTarget(_TraceTarget):
    name = "shard"

    def _rewrite(self, table: pa.Table, rng: random.Random) -> tuple[pa.Table, str]:
        sid = table.column("seq_id").to_numpy().copy()
        op = rng.choice(["dup-seq", "swap-seq", "experts", "drop-column", "records",
                         "model-sha", "drop-rows"])
        meta = dict(table.schema.metadata or {})
        if op == "dup-seq":
            ids = np.unique(sid)
            if len(ids) > 1:
                sid[sid == ids[1]] = ids[0]
        elif op == "swap-seq":
            ids = np.unique(sid)
            if len(ids) > 1:
                a, b = sid == ids[0], sid == ids[1]
                sid[a], sid[b] = ids[1], ids[0]
        elif op == "experts":
            e = table.column("experts").combine_chunks()
            flat = e.flatten().flatten().to_numpy().copy()
            flat[rng.randrange(len(flat))] = rng.choice([-1, 127, 9999, -32768])
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int16()),
                                                      e.type.value_type.list_size)
            col = pa.FixedSizeListArray.from_arrays(inner, e.type.list_size)
            table = table.set_column(table.schema.get_field_index("experts"),
                                     table.schema.field("experts"), col)
        elif op == "drop-column":
            table = table.drop_columns([rng.choice(["pos", "experts", "logits"])])
        elif op == "records":
            meta[META_SEQUENCES] = rng.choice([b"{", b"[1, 2]", b'[{"seq_id": "x"}]', b"null"])
        elif op == "model-sha":
            meta[b"expertpred.model_sha256"] = b"0" * 64
        elif op == "drop-rows":
            table = table.slice(0, max(0, table.num_rows - rng.randint(1, 5)))
            sid = sid[:table.num_rows]
        table = table.set_column(0, table.schema.field("seq_id"),
                                 pa.array(sid, pa.int32())).replace_schema_metadata(meta)
        return table, f"rewrite {op}"

    def case(self, rng: random.Random) -> str:
        d, files, m0 = self._pick(rng)
        m = copy.deepcopy(m0)
        j = rng.randrange(len(m["shards"]))
        sh = m["shards"][j]
        raw = files[sh["name"]]
        kind = rng.choices(["flip", "truncate", "rewrite"], weights=[35, 15, 50])[0]
        if kind == "rewrite":
            table, label = self._rewrite(pq.read_table(io.BytesIO(raw)), rng)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            data = buf.getvalue()
            sh["rows"] = table.num_rows
        else:
            e = (flip_bytes(raw, 0, len(raw), rng, sh["name"]) if kind == "flip"
                 else truncate(len(raw), 0, rng, sh["name"]))
            data, label = e.apply(raw), e.label
        resign = kind == "rewrite" or rng.random() < 0.5
        if resign:  # make the manifest agree with the damaged bytes
            sh["sha256"], sh["bytes"] = _sha(data), len(data)
            label += " (manifest re-signed)"
            self._write_manifest(m)
        (d / sh["name"]).write_bytes(data)
        return f"{SEEDS[self.i]}: {label}"
