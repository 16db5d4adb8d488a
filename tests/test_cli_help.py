"""--help reads right: flags show no value type, and no help text names a code constant."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from expertpred.cli import app
from expertpred.prefetch.plugin import DEFAULT_LOOKAHEAD, DEFAULT_MIN_REL_SHARE, DEFAULT_PREDICTOR

COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]


def help_text(command: str) -> str:
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_take_no_value_and_help_names_no_code(command):
    text = help_text(command)
    for flag in ("--json", "--hidden", "--resume", "--quick", "--madvise-random", "--warm"):
        for line in text.splitlines():
            if re.search(rf"{flag}\b", line) and "--help" not in line:
                assert "<bool>" not in line, line
    assert not re.search(r"\b(plugin|DEFAULT)_?[.A-Z]", text.replace("--", "")), text


def test_run_help_says_the_default_values():
    text = help_text("run")
    assert DEFAULT_PREDICTOR in text and f"default: {DEFAULT_LOOKAHEAD}," in text
    assert f"(default: {DEFAULT_MIN_REL_SHARE})" in help_text("serve")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_no_help_shows_a_value_type_for_a_flag(command):
    # every flag, typer's own --help and --x/--no-x pairs included
    r = CliRunner().invoke(app, [*([command] if command else []), "--help"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "--help" in r.output and "<bool>" not in r.output, r.output
