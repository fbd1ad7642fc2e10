"""The registry of passes, analyses and named pipelines.

Built-in passes register themselves with `@register_pass` when
`optc.passes.transforms` is imported. Installed plugins register through the
entry-point group `optc.passes`: each entry point names a `Pass` subclass (or
a module whose import registers passes). Everything is loaded on first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TypeVar

from optc.errors import UsageError
from optc.passes.infra.analysis import Analysis
from optc.passes.infra.pass_base import Pass

ENTRY_POINT_GROUP = "optc.passes"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

P = TypeVar("P", bound=type[Pass])
A = TypeVar("A", bound=type[Analysis])


@dataclass(frozen=True)
class PipelineEntry:
    """A named pipeline: its text, and the text it stands for on targets that lower the recipe differently."""

    name: str
    text: str
    summary: str
    targets: dict[str, str] = field(default_factory=dict)

    def text_for(self, target: str | None) -> str:
        """The text this name expands to when the output is for `target` (None: not known)."""
        return self.targets.get(target, self.text) if target else self.text


_passes: dict[str, type[Pass]] = {}
_plugin_origin: dict[str, str] = {}
_analyses: dict[str, type[Analysis]] = {}
_pipelines: dict[str, PipelineEntry] = {}
_loaded = False
_BUILTIN_MODULES = (
    "optc.passes.transforms",
    "optc.passes.analyses",
    "optc.passes.pipelines",
    # each target's own passes (lowerings, legality checks, GGUF type assignment)
    "optc.backends.ort",
    "optc.backends.tensorrt",
    "optc.backends.gguf",
)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must be kebab-case: lowercase words joined by '-'")


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator: register a `Pass` subclass under a kebab-case name."""
    _check_name("pass", name)

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass({name!r}) must decorate a Pass subclass")
        existing = _passes.get(name) or _pipelines.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"pass name {name!r} is already registered by {_describe(existing)}")
        cls.name = name
        _passes[name] = cls
        return cls

    return decorate


def register_analysis(name: str) -> Callable[[A], A]:
    """Class decorator: register an `Analysis` so pipelines can say `require<name>`."""
    _check_name("analysis", name)

    def decorate(cls: A) -> A:
        cls.name = name
        _analyses[name] = cls
        return cls

    return decorate


def register_pipeline(name: str, text: str, summary: str, *, targets: dict[str, str] | None = None) -> None:
    """Register a named pipeline; its name expands in place inside any pipeline text.

    `targets` maps a backend name to the text the name stands for when the output is for that
    backend, where the same recipe is spelled differently there (e.g. a bit width that only one
    file format can store).
    """
    _check_name("pipeline", name)
    if name in _passes:
        raise ValueError(f"pipeline name {name!r} is already a pass")
    _pipelines[name] = PipelineEntry(name, text, summary, dict(targets or {}))


def _describe(obj: object) -> str:
    if isinstance(obj, PipelineEntry):
        return f"pipeline {obj.name!r}"
    return f"{obj.__module__}.{obj.__qualname__}"  # type: ignore[attr-defined]


def load_builtins_and_plugins() -> None:
    """Import built-in passes and installed plugins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            before = set(_passes)
            loaded = ep.load()
            if isinstance(loaded, type) and issubclass(loaded, Pass) and loaded not in _passes.values():
                register_pass(loaded.name or ep.name)(loaded)
            for new in set(_passes) - before:
                _plugin_origin[new] = ep.dist.name if ep.dist is not None else ep.value
            if isinstance(loaded, type) and issubclass(loaded, Pass):
                _plugin_origin.setdefault(loaded.name, ep.dist.name if ep.dist is not None else ep.value)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break optc
            print(f"optc: warning: plugin '{ep.name}' ({ep.value}) failed to load: {exc}", file=sys.stderr)


def get_pass(name: str) -> type[Pass]:
    load_builtins_and_plugins()
    if name not in _passes:
        raise UsageError(unknown_name_message("pass", name, list(_passes) + list(_pipelines)))
    return _passes[name]


def get_analysis(name: str) -> type[Analysis]:
    load_builtins_and_plugins()
    if name not in _analyses:
        raise UsageError(unknown_name_message("analysis", name, list(_analyses)))
    return _analyses[name]


def get_pipeline(name: str) -> PipelineEntry | None:
    load_builtins_and_plugins()
    return _pipelines.get(name)


def all_passes() -> dict[str, type[Pass]]:
    load_builtins_and_plugins()
    return dict(sorted(_passes.items()))


def all_pipelines() -> dict[str, PipelineEntry]:
    load_builtins_and_plugins()
    return dict(sorted(_pipelines.items()))


def all_analyses() -> dict[str, type[Analysis]]:
    load_builtins_and_plugins()
    return dict(sorted(_analyses.items()))


def plugin_origin(name: str) -> str | None:
    """The distribution that provided a plugin pass, or None for built-ins."""
    return _plugin_origin.get(name)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {kind} '{name}'{hint}; see 'optc --list-passes'"
