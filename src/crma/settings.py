"""Settings as dataclasses whose field docs become `--help` and YAML keys, checked in one place.

A field is declared with `setting(default, "what it does", ge=..., gt=..., le=..., lt=...,
check=...)`: the help text and the values it allows sit side by side. A settings class derives
from `Settings`, so every instance is checked when it is made, whichever way it is made: from
CLI flags (`add_arguments` / `from_args`), a YAML or JSON mapping (`from_dict`), or Python.
A bad value raises `SettingError`, a one-line `UserError` naming the key, the value and what is
allowed; `from_args` and `from_dict` name the key as the user wrote it (`--max-steps`,
`config.yaml: train: max_steps`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from crma.errors import UserError

T = TypeVar("T")
_BOUNDS = ("ge", "gt", "le", "lt")


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with a help text and the values it allows.

    `ge`/`gt`/`le`/`lt` bound a number (or each number of a list); `check(value)` returns what
    is allowed when the value is not (for rules a range cannot say), else None. Numbers must
    be finite. Mutable defaults are copied per instance.
    """
    meta = {"help": help, "check": check}
    meta |= {k: v for k, v in zip(_BOUNDS, (ge, gt, le, lt)) if v is not None}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class SettingError(UserError):
    """A setting outside what it allows. `key` is renamed to the user's spelling by callers."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(self.message(key))

    def message(self, key: str) -> str:
        return f"{key}: expected {self.allowed}, got {self.value!r}"


class Settings:
    """Base of settings dataclasses: every field is checked (and coerced: int to float, a YAML
    string like "1e-4" to a number) when an instance is made; `check_together` adds rules
    between fields."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _checked(getattr(self, f.name), hints[f.name], f.metadata)
            if isinstance(value, _Invalid):
                raise SettingError(f"{type(self).__name__}.{f.name}", value.value, value.allowed)
            object.__setattr__(self, f.name, value)
        try:
            self.check_together()
        except SettingError as exc:
            raise SettingError(f"{type(self).__name__}.{exc.key}", exc.value, exc.allowed) from None

    def check_together(self) -> None:
        """Rules that involve several fields; raise `SettingError` naming one of them."""


class _Invalid(typing.NamedTuple):
    value: Any
    allowed: str


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_optional) for annotations like `int`, `float | None`, `Literal[...]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _checked(value: Any, tp: Any, meta: Any) -> Any:
    """`value` coerced to annotation `tp` and within `meta`'s bounds, or `_Invalid`."""
    base, optional = _base_type(tp)
    if value is None:
        return None if optional else _Invalid(value, allowed_text(base, meta))
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            return _Invalid(value, "a list")
        items = [_checked(v, typing.get_args(base)[0], meta) for v in value]
        bad = [i for i in items if isinstance(i, _Invalid)]
        return _Invalid(bad[0].value, f"a list, each item {bad[0].allowed}") if bad else items
    coerced = _coerced(value, base)
    if coerced is _WRONG_TYPE or not _allowed(coerced, meta):
        return _Invalid(value, allowed_text(base, meta))
    if meta.get("check") and (problem := meta["check"](coerced)):
        return _Invalid(value, problem)
    return coerced


_WRONG_TYPE = object()  # what `_coerced` returns for a value that is not of the type


def _coerced(value: Any, base: Any) -> Any:
    """`value` as type `base` (an int or a numeric string as a float), or `_WRONG_TYPE`."""
    if typing.get_origin(base) is typing.Literal:
        return value if value in typing.get_args(base) else _WRONG_TYPE
    if base is float:
        try:  # a string too: YAML 1.1 reads 1e-4 (no dot) as one
            number = float(value) if not isinstance(value, bool | list | dict) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        return number if math.isfinite(number) else _WRONG_TYPE
    base = typing.get_origin(base) or base  # dict[str, Any] -> dict
    if base in (int, str, bool, dict) and (
        not isinstance(value, base) or (base is int and isinstance(value, bool))
    ):
        return _WRONG_TYPE
    if dataclasses.is_dataclass(base) and not isinstance(value, base):
        return _WRONG_TYPE
    return value


def _allowed(value: Any, meta: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return True
    return (
        ("ge" not in meta or value >= meta["ge"])
        and ("gt" not in meta or value > meta["gt"])
        and ("le" not in meta or value <= meta["le"])
        and ("lt" not in meta or value < meta["lt"])
    )


def allowed_text(tp: Any, meta: Any) -> str:
    """What a field of type `tp` allows, in words: "an integer >= 1", "a number in (0, 1]"."""
    base, _ = _base_type(tp)
    if typing.get_origin(base) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    if typing.get_origin(base) is list:
        return "a list, each item " + allowed_text(typing.get_args(base)[0], meta)
    noun = {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
    }.get(typing.get_origin(base) or base, "a mapping")
    return noun + _range_text(meta)


def _range_text(meta: Any) -> str:
    low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f" in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# -- command-line options ---------------------------------------------------------------------
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


def flag(name: str, prefix: str = "") -> str:
    """The command-line spelling of field `name`: `--lora-r`."""
    return "--" + (prefix + name).replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--option` per field of dataclass `cls` (list fields are comma-separated)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        tp, _ = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS}
        if typing.get_origin(tp) is list:
            item = _converter(typing.get_args(tp)[0])
            kw["type"] = lambda s, item=item: [item(x) for x in s.split(",") if x]
        else:
            kw["type"] = _converter(tp)
            if typing.get_origin(tp) is typing.Literal:
                kw["choices"] = typing.get_args(tp)
        limits = _range_text(f.metadata).strip()
        kw["help"] = (
            f"{f.metadata['help']} (default: {default_of(f)}{'; ' + limits if limits else ''})"
        )
        group.add_argument(flag(f.name, prefix), **kw)


def from_args(cls: type[T], ns: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    """Build `cls` from parsed options added by `add_arguments` (unset options keep defaults)."""
    values = {
        f.name: getattr(ns, prefix + f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if hasattr(ns, prefix + f.name)
    }
    try:
        return cls(**{**values, **overrides})
    except SettingError as exc:
        raise UserError(exc.message(flag(exc.key.rpartition(".")[2], prefix))) from None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping; `where` names the file/section in errors."""
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {data!r}")
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        base, _ = _base_type(hints[key])
        if dataclasses.is_dataclass(base) and isinstance(value, dict):
            data[key] = from_dict(base, value, f"{where}: {key}")
    try:
        return cls(**data)
    except SettingError as exc:
        raise UserError(exc.message(f"{where}: {exc.key.rpartition('.')[2]}")) from None


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def describe(cls: type, skip: tuple[str, ...] = ()) -> str:
    """One line per field (but `skip`): name, default, help. Used in `--help` epilogs."""
    lines = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        limits = _range_text(f.metadata).strip()
        rule = f" ({limits})" if limits else ""
        lines.append(f"  {f.name} = {default_of(f)!r}: {f.metadata.get('help', '')}{rule}")
    return "\n".join(lines)
