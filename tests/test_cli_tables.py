"""CLI tables on a pipe (not a terminal, rich assumes 80 columns): names are never cut."""

from __future__ import annotations

from typer.testing import CliRunner

from expertpred.cli import app


def test_train_table_keeps_predictor_names_whole_on_a_pipe(tmp_path):
    # seven offsets: with the old "d=1 fit s" columns the name column shrank to "previou…"
    args = ["--synthetic_seqs=12", "--offsets=1,2,3,4,5,6,7",
            "--predictors=popularity,previous-token+transition", f"--out={tmp_path}"]
    r = CliRunner().invoke(app, ["train", *args])
    assert r.exit_code == 0, r.output
    assert "…" not in r.output, r.output
    rows = [line.split() for line in r.output.splitlines()]
    assert any(row[:1] == ["previous-token+transition"] and len(row) == 8 for row in rows), r.output
