"""Regenerate datasets/prompts/heldout.jsonl from the held-out corpus (deterministic).

    python datasets/build_prompts.py            # writes datasets/prompts/heldout.jsonl
    python datasets/build_prompts.py --check    # exit 1 if the file would change

Prompts come only from ``training.corpus.load_corpus("heldout")`` — whole standard-library
files and reference topics the shipped models never saw in training. Each document is cut
into consecutive, non-overlapping chunks at line boundaries whose length is drawn
(deterministically, from a hash of the document name and chunk number) between MIN_CHARS
and MAX_CHARS — about 32-128 tokens with the shipped models' byte-level BPE. At most
MAX_PER_FILE chunks per document are kept (the ones with the smallest id hash), so a few
large files do not dominate.

Row order: strata (domain, split) are interleaved in proportion to PREFIX_MIX (prompts of a
stratum in id-hash order), so the first N prompts — ``expertpred trace --limit N`` — are a
balanced sample: code and prose 1:1, train / validation / test 60 / 20 / 20, until a stratum
runs out (prose validation, the smallest, holds 20 prompts).

Splits are by source file: every prompt of one document gets the same split, so no file's
text straddles train / validation / test. Documents are visited in the order of
sha256("split:" + domain + name), and each goes to the split furthest below its target
share (SPLIT_TARGETS, counted in prompts) — deterministic, file-grouped, and balanced even
when a domain has only ten documents of very different sizes.

The corpus is the running Python's standard library, so the output depends on the Python
version (the shipped file was built with the version recorded in datasets/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.corpus import Document, load_corpus  # noqa: E402

log = logging.getLogger("build_prompts")

OUT = ROOT / "datasets" / "prompts" / "heldout.jsonl"
# Prompt length in characters, per domain (~3.5-4.5 characters per token).
CHAR_RANGE = {"code": (128, 512), "prose": (128, 320)}
MAX_PER_FILE = {"code": 8, "prose": 1000}
SPLIT_TARGETS = {"train": 0.70, "validation": 0.15, "test": 0.15}
# Mix of every prefix of the file (until a stratum runs out): domains 1:1, splits 60/20/20.
PREFIX_MIX = {"code": 0.5, "prose": 0.5, "train": 0.6, "validation": 0.2, "test": 0.2}


def _u64(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def chunk_document(doc: Document) -> list[tuple[int, str]]:
    """(first line number, text) chunks of ``doc`` cut at line boundaries."""
    lo, hi = CHAR_RANGE[doc.domain]
    lines = doc.text.splitlines()
    chunks: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        while i < len(lines) and not lines[i].strip():
            i += 1  # a chunk never starts with a blank line
        start = i
        target = lo + _u64(f"len:{doc.domain}:{doc.name}:{len(chunks)}") % (hi - lo + 1)
        size = 0
        while i < len(lines) and (size < target):
            if size >= lo and size + len(lines[i]) + 1 > hi:
                break  # the next line would overshoot; stop at this boundary
            size += len(lines[i]) + 1
            i += 1
        text = "\n".join(lines[start:i]).rstrip()
        if lo <= len(text) <= hi:
            chunks.append((start + 1, text))
        elif len(text) > hi:
            log.debug("%s:%d: over-long chunk (%d chars) skipped", doc.name, start + 1, len(text))
    return chunks


def build() -> list[dict[str, object]]:
    docs = load_corpus("heldout")
    rows: list[dict[str, object]] = []
    for domain in ("code", "prose"):
        per_doc: dict[str, list[dict[str, object]]] = {}
        for doc in (d for d in docs if d.domain == domain):
            cands = [{"id": f"{domain}/{doc.name}#L{line}", "domain": domain,
                      "source": doc.name, "line": line, "text": text}
                     for line, text in chunk_document(doc)]
            keep = sorted(cands, key=lambda r: _u64(str(r["id"])))[:MAX_PER_FILE[domain]]
            keep_ids = {r["id"] for r in keep}
            if keep:
                per_doc[doc.name] = [r for r in cands if r["id"] in keep_ids]  # file order
        # File-grouped, hash-ordered, balanced split assignment.
        counts = dict.fromkeys(SPLIT_TARGETS, 0)
        for name in sorted(per_doc, key=lambda n: _u64(f"split:{domain}:{n}")):
            total = sum(counts.values()) + len(per_doc[name])
            split = max(SPLIT_TARGETS, key=lambda s: SPLIT_TARGETS[s] * total - counts[s])
            counts[split] += len(per_doc[name])
            for r in per_doc[name]:
                r["split"] = split
        log.info("%s: %d prompts from %d documents, splits %s", domain,
                 sum(counts.values()), len(per_doc), counts)
        for name in sorted(per_doc):
            rows.extend(per_doc[name])
    # Interleave so that any prefix (``expertpred trace --limit N``) is a balanced sample: the
    # j-th prompt (in id-hash order) of stratum (domain, split) gets the key (j + 0.5) / weight.
    strata: dict[tuple[str, str], list[dict[str, object]]] = {}
    for r in sorted(rows, key=lambda r: _u64(f"order:{r['id']}")):
        strata.setdefault((str(r["domain"]), str(r["split"])), []).append(r)
    order: list[tuple[float, int, dict[str, object]]] = []
    for (domain, split), members in strata.items():
        weight = PREFIX_MIX[domain] * PREFIX_MIX[split]
        order += [((j + 0.5) / weight, _u64(f"order:{r['id']}"), r)
                  for j, r in enumerate(members)]
    rows = [r for _, _, r in sorted(order, key=lambda o: o[:2])]
    # Key order of the documented format first, provenance after.
    return [{k: r[k] for k in ("id", "domain", "split", "text", "source", "line")} for r in rows]


def render(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if --out would change")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render(build())
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'differs'} (Python "
              f"{platform.python_version()})")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count(chr(10))} prompts, Python "
          f"{platform.python_version()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
