"""Settings as dataclasses whose field docs become `--help` and YAML keys.

A field is declared with `setting(default, "what it does")`. `add_arguments` turns a dataclass
into argparse options (`--field-name`), `from_args` builds it back, and `from_dict` checks a
YAML/JSON mapping against it, naming the unknown or mistyped key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from crma.errors import UserError

T = TypeVar("T")


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **kw}
        )
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_optional) for annotations like `int`, `float | None`, `Literal[...]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any):
    if tp is bool:
        return _parse_bool
    if typing.get_origin(tp) is typing.Literal:
        return str
    return tp if tp in (int, float, str) else str


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--option` per field of dataclass `cls` (list fields are comma-separated)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS}
        if typing.get_origin(tp) is list:
            item = _converter(typing.get_args(tp)[0])
            kw["type"] = lambda s, item=item: [item(x) for x in s.split(",") if x]
        else:
            kw["type"] = _converter(tp)
            if typing.get_origin(tp) is typing.Literal:
                kw["choices"] = typing.get_args(tp)
        kw["help"] = f"{f.metadata['help']} (default: {default})"
        group.add_argument("--" + (prefix + f.name).replace("_", "-"), **kw)


def from_args(cls: type[T], ns: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    """Build `cls` from parsed options added by `add_arguments` (unset options keep defaults)."""
    values = {
        f.name: getattr(ns, prefix + f.name)
        for f in dataclasses.fields(cls)
        if hasattr(ns, prefix + f.name)
    }
    return cls(**{**values, **overrides})


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping; `where` names the file/section in errors."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        data[key] = _check_type(value, hints[key], f"{where}: {key}")
    return cls(**data)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must not be empty")
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if base is float and not isinstance(value, bool | list | dict):
        try:  # a string too: YAML 1.1 reads 1e-4 (no dot) as one
            return float(value)
        except (TypeError, ValueError):
            pass
    if base is float:
        raise UserError(f"{where}: expected a number, got {value!r}")
    if base in (int, str, bool) and not isinstance(value, base):
        raise UserError(f"{where}: expected {base.__name__}, got {value!r}")
    if base is int and isinstance(value, bool):
        raise UserError(f"{where}: expected int, got {value!r}")
    if typing.get_origin(base) is list and not isinstance(value, list):
        raise UserError(f"{where}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(base) and isinstance(value, dict):
        return from_dict(base, value, where)
    return value


def describe(cls: type, skip: tuple[str, ...] = ()) -> str:
    """One line per field (but `skip`): name, default, help. Used in `--help` epilogs."""
    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
