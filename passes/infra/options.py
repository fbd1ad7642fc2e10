"""Typed pass options: a dataclass that parses from and prints to `{key=value ...}`.

A pass declares its options as a dataclass; each field's type decides how its
text is parsed (`bool`, `int`, `float`, `str`, a `Literal[...]` of allowed
values, or a `list` of those). Field names are snake_case in Python and
kebab-case in pipelines (`act_order` ↔ `act-order`). Printing lists the options
in declared order and omits those at their default, so printing is canonical.

    @dataclass
    class Options:
        bits: Literal[2, 3, 4, 8] = option(4, help="weight bits")
        group: int = option(128, help="columns per scale; -1 for per-channel")
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal, get_args, get_origin

from optc.errors import UsageError

_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.:/+\-,@]+$")


def option(default: Any, *, help: str = "", at_least: float | None = None) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a default and a help line for `--list-passes`; `at_least`: the smallest value allowed."""
    metadata = {"help": help, "at_least": at_least}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class NoOptions:
    """Options of a pass that takes none."""


def to_kebab(name: str) -> str:
    return name.replace("_", "-")


def to_snake(name: str) -> str:
    return name.replace("-", "_")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    """Human text for an option type: 'an int', 'one of int8, fp8', 'a list of str'."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return "a comma-separated list of " + describe_type(get_args(tp)[0]).removeprefix("a ").removeprefix("an ")
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return describe_type(inner[0]) + " (or none)"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def _parse_scalar(tp: Any, text: str) -> Any:
    if get_origin(tp) is Literal:
        for allowed in get_args(tp):
            if str(allowed) == text or (isinstance(allowed, str) and allowed.lower() == text.lower()):
                return allowed
        raise ValueError
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null"):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _parse_scalar(inner[0], text)
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if tp is int:
        return int(text, 0) if text.lower().startswith(("0x", "-0x")) else int(text)
    if tp is float:
        value = float(text)
        if value != value:  # NaN is never a sensible option
            raise ValueError
        return value
    if tp is str:
        return text
    raise ValueError


def parse_value(tp: Any, text: str) -> Any:
    """Parse one option's text according to its declared type; raises ValueError."""
    if get_origin(tp) is list:
        item = get_args(tp)[0]
        return [_parse_scalar(item, part.strip()) for part in text.split(",") if part.strip()]
    return _parse_scalar(tp, text)


def _text(value: Any) -> str:
    """The text of a value before quoting; a list's items are joined unquoted and quoted as a whole."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def format_value(value: Any) -> str:
    """Print one option value so that `parse_value` reads it back."""
    text = _text(value)
    if text and _PLAIN_VALUE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_options(cls: type, pass_name: str, items: list[tuple[str, str]]) -> Any:
    """Build an options dataclass from parsed `(key, text)` pairs, with clear usage errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, text in items:
        name = to_snake(key)
        if name not in fields:
            known = [to_kebab(n) for n in fields]
            raise UsageError(_unknown_option_message(pass_name, key, known))
        if name in kwargs:
            raise UsageError(f"pass '{pass_name}': option '{key}' is given twice")
        try:
            kwargs[name] = parse_value(types[name], text)
        except ValueError:
            raise UsageError(
                f"pass '{pass_name}': option '{key}' expects {describe_type(types[name])}, got {text!r}"
            ) from None
    options = cls(**kwargs)
    for field in fields.values():
        least = field.metadata.get("at_least")
        value = getattr(options, field.name)
        if least is not None and value < least:
            raise UsageError(f"pass '{pass_name}': option '{to_kebab(field.name)}' must be at least {least}, got {value}")
    validate = getattr(options, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise UsageError(f"pass '{pass_name}': {exc}") from None
    return options


def _unknown_option_message(pass_name: str, key: str, known: list[str]) -> str:
    import difflib

    if not known:
        return f"pass '{pass_name}' takes no options, got '{key}'"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"pass '{pass_name}' has no option '{key}'{hint}; its options: {', '.join(known)}"


def format_options(options: Any) -> str:
    """`{key=value ...}` for options that differ from their defaults, in declared order; '' if none."""
    parts = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if value != default or type(value) is not type(default):
            parts.append(f"{to_kebab(field.name)}={format_value(value)}")
    return "{" + " ".join(parts) + "}" if parts else ""


def describe_options(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type text, default text, help) for each option, for `--list-passes`."""
    types = _field_types(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        rows.append(
            (to_kebab(field.name), describe_type(types[field.name]), format_value(default), field.metadata.get("help", ""))
        )
    return rows
