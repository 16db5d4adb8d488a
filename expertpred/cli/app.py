"""The typer app, its consoles, the option parsers commands share, and the entry point.
Commands live in the sibling modules."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..errors import ExpertPredError


def _no_flag_types(params: list[Any]) -> list[Any]:
    """Flags take no value, so their help shows no type. typer 0.29's rich help prints
    ``<bool>`` in the type column of every flag (``TyperOption.display_type_rich`` has no
    ``is_flag`` case, unlike its plain formatter), ``--help`` included, which reads as if the
    flag took a value; a blank metavar leaves that column empty."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))


class _Typer(typer.Typer):
    """typer.Typer whose commands render flags as flags (see :func:`_no_flag_types`)."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _Typer(cls=_Group, add_completion=False, no_args_is_help=True,
             pretty_exceptions_enable=False,
             help="Predict and prefetch MoE experts for llama.cpp inference.")

console = Console()

err_console = Console(stderr=True)


def flag(*names: str, help: str, default: bool = False) -> typer.models.OptionInfo:
    """A boolean flag (``--json``, or ``--warm/--no-warm``)."""
    return typer.Option(default, *names, help=help)


@app.callback()
def _root() -> None:
    """Predict and prefetch MoE experts for llama.cpp inference."""


def parse_bytes(text: str, what: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
             "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40,
             "tb": 10**12, "tib": 1 << 40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m[2].lower() not in units:
        raise ExpertPredError(f"{what} {text!r}: expected a size like 512MiB or 2GiB")
    return int(float(m[1]) * units[m[2].lower()])


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ExpertPredError(f"{what} {text!r}: expected comma-separated numbers") from None


def parse_ints(text: str, what: str, lo: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ExpertPredError(f"{what} {text!r}: expected comma-separated integers") from None
    if not values or (lo is not None and min(values) < lo):
        raise ExpertPredError(f"{what} {text!r}: expected integers >= {lo}")
    return values


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors — ours and click's usage/range errors — become one line
    ``error: ...`` on stderr and exit code 2."""
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # not standalone: click raises its usage errors here instead of printing a usage box
        rc = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()  # the help text, as click prints it
        sys.exit(2)
    except UsageError as exc:  # bad option value, out of range, missing option, no such command
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        err_console.print(f"error: {where}{_one_line(exc.format_message())}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as exc:  # any other click error (e.g. FileError)
        err_console.print(f"error: {_one_line(exc.format_message())}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except ExpertPredError as exc:
        err_console.print(f"error: {_one_line(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)

