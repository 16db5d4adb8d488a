"""`expertpred analyze`: report files, answers derived from the numbers, bad inputs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.lab.analysis import figures
from expertpred.lab.analysis import report as rep
from expertpred.lab.analysis.report import AnalysisError, Thresholds, analyze_trace

from .synth import (
    make_model,
    make_sequence,
    random_sets,
    structured_dataset,
    write_dataset,
)


@pytest.fixture(scope="module")
def structured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return structured_dataset(tmp_path_factory.mktemp("s") / "trace")


@pytest.fixture(scope="module")
def structured_report(structured: Path) -> rep.Analysis:
    return analyze_trace(structured, structured.parent / "report")


def uniform_dataset(path: Path, n_seq: int = 10, t: int = 200) -> Path:
    rng = np.random.default_rng(7)
    seqs = [make_sequence(random_sets(rng, t, 4, 8, 2), i, "code" if i % 2 else "prose")
            for i in range(n_seq)]
    return write_dataset(path, seqs, make_model())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- the report ----------------------------------------------------------------------


def test_report_files(structured_report: rep.Analysis) -> None:
    out = structured_report.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "popularity.png", "locality.png", "reuse_distance.png",
            "transitions.png", "mutual_information.png", "domains.png"} <= names
    md = (out / "report.md").read_text()
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / img).is_file() and not Path(img).is_absolute()
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(out.parent) == []


def test_report_json_is_strict_and_complete(structured_report: rep.Analysis) -> None:
    doc = json.loads((structured_report.out_dir / "report.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["format"] == rep.REPORT_FORMAT
    assert doc["model"]["n_expert"] == 8 and doc["thresholds"] == Thresholds().__dict__
    o = doc["overall"]
    assert len(o["locality"]["first"]) == 4 and o["locality"]["first_uniform"] == 0.125
    assert np.asarray(o["popularity"]["counts"]).shape == (4, 8)
    assert np.asarray(o["cross_layer"]["transition_counts"]).shape == (3, 8, 8)
    assert set(doc["by_domain"]) == {"code", "prose"}
    assert o["popularity"]["dead_experts"] == [[], [], [], []]
    assert doc["answers"]["rq3"]["temporal_locality"] in {"yes", "partly", "no"}


def test_table5_numbers_in_markdown_match_json(structured_report: rep.Analysis) -> None:
    md = (structured_report.out_dir / "report.md").read_text()
    loc = structured_report.summary.overall.locality
    section = md.split("## 2. Temporal locality")[1]
    row0 = next(line for line in section.splitlines() if line.startswith("| 0 | "))
    assert f"{100 * loc.first[0]:.1f}%" in row0 and f"{100 * loc.any[0]:.1f}%" in row0
    assert "| layer | 1st: all | 1st: code | 1st: prose | 1st: uniform | 1st: indep." in md


def test_answers_follow_the_numbers(structured_report: rep.Analysis, tmp_path: Path) -> None:
    a = structured_report.answers
    # structured: half of the tokens sticky (keep 0.7) and skewed -> locality everywhere
    assert a.predictability.temporal_locality == "yes"
    assert a.predictability.predictor_feasible == "yes"
    assert a.domains.verdicts == {"code vs prose": "yes"}
    md = (structured_report.out_dir / "report.md").read_text()
    assert "**Temporal locality: yes.**" in md and "locality_lift=1.5" in md
    assert "scored on held-out sequences" in md
    # uniform independent routing: no locality, no predictor, uniform access holds
    u = analyze_trace(uniform_dataset(tmp_path / "u"), tmp_path / "ur")
    assert asdict(u.answers.predictability) | {"text": None} == {
        "same_experts_repeatedly": "no", "temporal_locality": "no",
        "predictor_feasible": "no", "text": None}
    assert u.answers.uniform_access.uniform_access_holds == "yes"
    assert u.answers.domains.verdicts == {"code vs prose": "no"}
    # thresholds drive the verdict, not hard-coded text
    strict = rep.derive_answers(structured_report.summary, structured_report.model,
                                Thresholds(locality_lift=100.0))
    assert strict.predictability.temporal_locality == "no"
    assert "100.0× 1/E" in strict.predictability.text[1]


def test_single_sequence_domain_and_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    model = make_model(n_layer=1, n_expert=4, k=1)
    seqs = [make_sequence(random_sets(rng, 90, 1, 4, 1), 0, "prose", n_expert=4)]
    res = analyze_trace(write_dataset(tmp_path / "t", seqs, model), tmp_path / "r")
    assert res.answers.per_layer["predictor_recall_heldout"] is False
    assert "scored in-sample" in res.answers.predictability.text[2]
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert "domains.png" not in names and "transitions.png" not in names
    assert res.answers.domains.verdicts == {}
    assert "one domain" in (tmp_path / "r" / "report.md").read_text()


def test_rerun_replaces_the_previous_report(structured: Path, structured_report: rep.Analysis,
                                            tmp_path: Path) -> None:
    out = _copy(structured_report.out_dir, tmp_path / "r")
    (out / "stale.png").write_bytes(b"x")
    analyze_trace(structured, out, max_distance=16)
    assert not (out / "stale.png").exists()
    assert json.loads((out / "report.json").read_text())["overall"]["reuse"]["max_distance"] == 16
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_old_report_and_no_temp(
        structured: Path, structured_report: rep.Analysis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy(structured_report.out_dir, tmp_path / "r")
    before = (out / "report.md").read_text()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "fig_reuse", broken)
    with pytest.raises(AnalysisError, match="No space left"):
        analyze_trace(structured, out)
    assert (out / "report.md").read_text() == before
    with pytest.raises(AnalysisError):
        analyze_trace(structured, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []


# --- bad input -----------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("file", "not a directory"),
    ("empty_dir", "not a trace dataset"),
    ("parent_of_datasets", r"directory holding 1 \(trace\)"),
    ("bad_manifest", "not valid JSON"),
    ("no_sequences", "no tokens"),
    ("mixed_listed", "mixed models"),
    ("mixed_unlisted", "mixed models in one directory"),
])
def test_bad_trace_dir(case: str, message: str, structured: Path, tmp_path: Path) -> None:
    d = tmp_path / "in"
    if case == "file":
        d.write_text("x")
    elif case == "empty_dir":
        d.mkdir()
    elif case == "parent_of_datasets":
        _copy(structured, d / "trace")
    elif case == "bad_manifest":
        _copy(structured, d)
        (d / "_manifest.json").write_text("{")
    elif case == "no_sequences":
        write_dataset(d, [], make_model())
    elif case == "mixed_listed":
        _copy(structured, d)
        m = json.loads((d / "_manifest.json").read_text())
        m["model"]["sha256"] = "b" * 64
        (d / "_manifest.json").write_text(json.dumps(m))
    elif case == "mixed_unlisted":
        _copy(structured, d)
        other = write_dataset(tmp_path / "other", [make_sequence(np.zeros((5, 4, 2)) + [0, 1])],
                              make_model(sha="c" * 64))  # a run of another model ...
        shard = json.loads((other / "_manifest.json").read_text())["shards"][0]["name"]
        shutil.copy(other / shard, d / "shard-00099.parquet")  # ... copied in, not listed
    with pytest.raises(ExpertPredError, match=message) as exc:
        analyze_trace(d, tmp_path / "out")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case, message", [
    ("under_a_file", "cannot write the report"),
    ("is_a_file", "exists and is not a directory"),
    ("foreign_dir", "not an expertpred report"),
    ("inside_trace", "inside the trace dataset"),
])
def test_bad_output_dir(case: str, message: str, structured: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"under_a_file": blocker / "report", "is_a_file": blocker,
           "foreign_dir": tmp_path / "foreign", "inside_trace": structured / "report"}[case]
    if case == "foreign_dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(AnalysisError, match=message):
        analyze_trace(structured, out)
    assert blocker.read_text() == "x" and not (structured / "report").exists()
    if case == "foreign_dir":
        assert (out / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


# --- CLI -----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from expertpred.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"})


def test_cli_analyze(structured: Path, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()  # an existing empty directory is fine
    r = _cli("analyze", str(structured), "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "Temporal locality" in r.stdout and "temporal locality: yes" in r.stdout
    assert (tmp_path / "r" / "report.md").is_file()
    cmd = json.loads((tmp_path / "r" / "report.json").read_text())["command"]
    assert cmd == f"expertpred analyze {structured} --out {tmp_path / 'r'}"


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = _cli("analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such directory" in r.stderr
    assert not (tmp_path / "r").exists()


def test_verdicts_are_the_answers(structured_report: rep.Analysis) -> None:
    v, a = structured_report.verdicts, structured_report.answers
    assert (v.same_experts_repeatedly, v.temporal_locality, v.predictor_feasible) == (
        a.predictability.same_experts_repeatedly, a.predictability.temporal_locality,
        a.predictability.predictor_feasible)
    assert v.uniform_access_holds == a.uniform_access.uniform_access_holds
    assert v.domains == {"code vs prose": "yes"} and v.n_sequences > 0 and v.n_pairs > 0
