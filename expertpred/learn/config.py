"""One config loader: a frozen dataclass's defaults, then a TOML file, then ``--key=value``.

Used by the predictor recipe (:class:`~expertpred.learn.train.PredictorsConfig`) and by the
model-training recipe in ``training/`` (``TrainConfig``). TOML files only change defaults;
every key is checked against the dataclass's fields and every value against the field's
type, so a typo is a one-line :class:`ConfigError` that names the file or flag, the key and
what was expected — never a silently ignored setting.

Types understood: ``bool``, ``int``, ``float``, ``str`` and ``tuple[X, ...]`` of those. On
the command line a tuple is comma separated (``--offsets=1,2``), a bool is one of
``1/true/yes/on`` or ``0/false/no/off``, and ``-`` in a key stands for ``_``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ExpertPredError

C = TypeVar("C")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ExpertPredError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _from_toml(value: Any, hint: Any) -> Any:
    """A TOML value as the field's type, or raise ValueError (TOML values are typed)."""
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise ValueError
        return tuple(_from_toml(v, typing.get_args(hint)[0]) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # an int literal is a fine float
    if hint is int and isinstance(value, bool):
        raise ValueError
    if isinstance(value, hint):
        return value
    raise ValueError


def _from_text(raw: str, hint: Any) -> Any:
    """A command-line string as the field's type, or raise ValueError."""
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return tuple(_from_text(v.strip(), inner) for v in raw.split(",") if v.strip())
    if hint is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError
    if hint is int:
        return int(raw.replace("_", ""))
    if hint is float:
        return float(raw)
    if hint is str:
        return raw
    raise ValueError


def _expected(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return _type_name(hint)


def _read_toml(path: Path, hints: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read config: no such config file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: not valid TOML ({exc})") from None
    values = {}
    for key, value in doc.items():
        if key not in hints:
            raise ConfigError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(hints))}")
        try:
            values[key] = _from_toml(value, hints[key])
        except ValueError:
            raise ConfigError(f"{path}: {key}: expected {_expected(hints[key])}, "
                              f"got {value!r}") from None
    return values


def _read_overrides(overrides: Sequence[str], hints: dict[str, Any],
                    name: str) -> dict[str, Any]:
    values = {}
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{arg!r}: expected --key=value")
        key, raw = arg[2:].split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise ConfigError(f"--{key}: unknown config key (unknown key {key!r} for {name}; "
                              f"known: {', '.join(sorted(hints))})")
        try:
            values[key] = _from_text(raw, hints[key])
        except ValueError:
            raise ConfigError(f"--{key}: expected {_expected(hints[key])}, got {raw!r}") from None
    return values


def load_config(cls: type[C], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> C:
    """``cls``'s defaults, then the TOML file at ``path``, then the ``--key=value`` overrides.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     lr: float = 0.1
    ...     offsets: tuple[int, ...] = (1,)
    >>> load_config(Demo, None, ["--lr=1", "--offsets=1,2"])
    Demo(lr=1.0, offsets=(1, 2))
    """
    hints = typing.get_type_hints(cls)
    hints = {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = _read_toml(Path(path), hints) if path is not None else {}
    values.update(_read_overrides(overrides, hints, cls.__name__))
    return cls(**values)
