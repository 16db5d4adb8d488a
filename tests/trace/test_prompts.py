"""Prompt files: the shipped held-out set, the user's JSONL / text, and bad input."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from expertpred.errors import ExpertPredError
from expertpred.trace.prompts import SPLITS, load_prompts, read_prompt_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "datasets" / "prompts" / "heldout.jsonl"
BUILT_WITH = "3.11.7"  # the corpus is this Python's standard library (datasets/README.md)
same_python = pytest.mark.skipif(platform.python_version() != BUILT_WITH,
                                 reason=f"prompt set was built from Python {BUILT_WITH}'s stdlib")


def test_shipped_prompt_set_shape():
    prompts = read_prompt_file(SHIPPED)
    by = Counter((p.domain, p.split) for p in prompts)
    assert {d for d, _ in by} == {"code", "prose"}
    for domain in ("code", "prose"):
        assert sum(n for (d, _), n in by.items() if d == domain) >= 150
        for split in SPLITS:
            assert by[(domain, split)] >= 10, (domain, split)
    assert len({p.id for p in prompts}) == len(prompts)
    assert [p.index for p in prompts] == list(range(len(prompts)))
    assert all(128 <= len(p.text) <= 512 for p in prompts)


def test_shipped_prefixes_are_balanced():
    """`trace --limit N` takes a prefix: it mixes domains 1:1 and splits 60/20/20."""
    first = Counter((p.domain, p.split) for p in read_prompt_file(SHIPPED)[:100])
    for domain in ("code", "prose"):
        assert (first[(domain, "train")], first[(domain, "validation")],
                first[(domain, "test")]) == (30, 10, 10)


def test_shipped_splits_are_grouped_by_source_file():
    splits: dict[str, set[str]] = defaultdict(set)
    for line in SHIPPED.read_text().splitlines():
        r = json.loads(line)
        assert list(r)[:4] == ["id", "domain", "split", "text"]
        splits[(r["domain"], r["source"])].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())


@same_python
def test_shipped_prompts_come_only_from_heldout_documents():
    sys.path.insert(0, str(REPO))
    corpus = pytest.importorskip("training.corpus")
    heldout = {(d.domain, d.name): d.text for d in corpus.load_corpus("heldout")}
    for line in SHIPPED.read_text().splitlines():
        r = json.loads(line)
        assert r["text"] in heldout[(r["domain"], r["source"])]


@same_python
def test_build_script_is_deterministic(tmp_path):
    out = tmp_path / "p.jsonl"
    for _ in range(2):
        res = subprocess.run([sys.executable, str(REPO / "datasets" / "build_prompts.py"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    assert out.read_text() == SHIPPED.read_text()


def test_filters_keep_file_index():
    everything = read_prompt_file(SHIPPED)
    test_code = load_prompts(SHIPPED, split="test", domain="code")
    assert test_code and all(p.split == "test" and p.domain == "code" for p in test_code)
    assert all(everything[p.index] == p for p in test_code)


def test_user_jsonl_needs_only_text(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "hello"}\n\n{"text": "world", "id": 7, "domain": "chat"}\n')
    ps = read_prompt_file(f)
    assert [(p.index, p.id, p.domain, p.split, p.text) for p in ps] == [
        (0, "1", "unknown", None, "hello"), (1, "7", "chat", None, "world")]


def test_plain_text_paragraphs(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("first line\nsecond line\n\n\nthird\n  \nfourth\n")
    ps = read_prompt_file(f)
    assert [(p.id, p.text) for p in ps] == [("1", "first line\nsecond line"), ("5", "third"),
                                            ("7", "fourth")]


@pytest.mark.parametrize("name, content, match", [
    ("missing.jsonl", None, "no such file"),
    ("empty.jsonl", "", "empty prompt file"),
    ("blank.txt", "\n \n\n", "empty prompt file"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: malformed JSON"),
    ("list.jsonl", '{"text": "ok"}\n["text"]\n', r"list.jsonl:2: a JSON list"),
    ("notext.jsonl", '{"text": "ok"}\n{"id": "x"}\n', r'notext.jsonl:2: no "text" field'),
    ("emptytext.jsonl", '{"text": "  "}\n', r'emptytext.jsonl:1: "text" is'),
    ("dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate id 'a'"),
    ("badid.jsonl", '{"id": [1], "text": "x"}\n', "field 'id' is list"),
    ("latin1.txt", b"caf\xe9\n", "not UTF-8"),
])
def test_bad_prompt_files(tmp_path, name, content, match):
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(ExpertPredError, match=match) as exc:
        read_prompt_file(f)
    assert str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_empty_selection_names_what_exists(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "a", "split": "train"}\n')
    with pytest.raises(ExpertPredError, match=r"split 'test' \(splits in the file: train\)"):
        load_prompts(f, split="test")
    with pytest.raises(ExpertPredError, match="no domain field|domains in the file: unknown"):
        load_prompts(f, domain="code")
    with pytest.raises(ExpertPredError, match=r"directory|not a regular file"):
        load_prompts(tmp_path)
