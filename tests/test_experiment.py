"""`expertpred experiment`: a small real grid inside memory cgroups (every cell present,
counters > 0, vm.swappiness restored, also on interruption) and the one-line errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from expertpred import cli
from expertpred.errors import ExpertPredError
from expertpred.gguf.widen import widen
from expertpred.lab import experiment as exp
from expertpred.lab.cgroup import get_swappiness, swappiness, why_unavailable
from expertpred.shipped import model_gguf

REASON = why_unavailable()
needs_cgroup = pytest.mark.skipif(REASON is not None, reason=f"memory cgroup: {REASON}")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-mixtral widened to ~150 MB f32 (~1 s to write)."""
    out = tmp_path_factory.mktemp("exp") / "tiny-mixtral-0.15gib.gguf"
    widen(model_gguf("tiny-mixtral"), out, total_gib=0.15, dtype="f32")
    return out


@needs_cgroup
def test_grid_runs_every_cell_and_restores_swappiness(small_model: Path, tmp_path: Path) -> None:
    # 0.6x leaves ~50 MiB for file pages after the interpreter's anonymous memory (< one
    # token's experts is not needed: the point is a limit below the file and one above).
    cfg = exp.ExperimentConfig(model=small_model, fractions=(0.6, 1.5), swappiness=(0, 100),
                               modes=("off",), tokens=2)
    with swappiness(37):  # a value no cell uses: restoring it is visible
        res = exp.run_grid(cfg, command="test")
        assert get_swappiness() == 37
    assert (res.swappiness_before, res.swappiness_after) == (37, 37)
    keys = {(c.mode, c.fraction, c.swappiness) for c in res.cells}
    assert keys == {("off", f, s) for f in (0.6, 1.5) for s in (0, 100)}
    for c in res.cells:
        assert c.status == "ok", c
        assert c.tokens_per_s and c.tokens_per_s > 0
        assert c.load_read and c.load_read > 0.5 * res.model_bytes  # evicted before each run
        assert c.peak_bytes and 0 < c.peak_bytes <= c.limit_bytes
        assert c.oom_kills == 0 and c.steps == 1
    assert res.tokens_identical
    paths = exp.write_outputs(res, tmp_path / "out")
    assert all(p.stat().st_size > 0 for p in paths)
    with (tmp_path / "out" / "grid.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    data = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert len(data["cells"]) == 4 and "swap" in data["note"]
    assert "swappiness" in exp.footer(res) and exp.markdown_table(res).count("\n") == 5


@needs_cgroup
def test_interrupt_restores_swappiness(small_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from expertpred.lab import cgroup

    def interrupted(*args: object) -> dict:
        cgroup._set_swappiness(5)  # a run that changed it and never got to restore it
        raise KeyboardInterrupt

    monkeypatch.setattr(exp, "run_one", interrupted)
    cfg = exp.ExperimentConfig(model=small_model, fractions=(1.0,), swappiness=(5,),
                               modes=("off",), tokens=2)
    with swappiness(41):
        with pytest.raises(KeyboardInterrupt):
            exp.run_grid(cfg)
        assert get_swappiness() == 41


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["expertpred", "experiment", *args])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    return ex.value.code, capsys.readouterr().err


def test_cli_cgroup_unavailable_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    import expertpred.lab.cgroup

    monkeypatch.setattr(expertpred.lab.cgroup, "why_unavailable",
                        lambda *a: "needs root (uid 1000)")
    code, err = run_cli(monkeypatch, capsys, "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().count("\n") == 0
    assert "memory cgroup unavailable: needs root" in err


@needs_cgroup
def test_cli_unwritable_out_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(monkeypatch, capsys, "--out", str(blocker / "sub"))
    assert code == 2 and err.strip().count("\n") == 0 and str(blocker / "sub") in err


@pytest.mark.parametrize("kwargs, match", [
    ({"modes": ("fast",)}, "mode 'fast'"),
    ({"modes": ("predictor",)}, "needs --predictor"),
    ({"fractions": (0.0,)}, "limit fraction 0.0"),
    ({"swappiness": (300,)}, "swappiness 300"),
    ({"tokens": 1}, "tokens 1"),
])
def test_config_errors_name_the_value(tmp_path: Path, kwargs: dict, match: str) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    with pytest.raises(ExpertPredError, match=match):
        exp.ExperimentConfig(model=model, **kwargs)
