"""Analyses, preserved-analysis sets and the caching `AnalysisManager`.

Semantics follow LLVM's new pass manager with MLIR's safe default:

* A pass that reports `modified=False` preserves everything; one that reports
  `modified=True` without a `PreservedAnalyses` preserves nothing.
* An analysis declares which *aspects* of the IR its result depends on
  (`structure`, `weights`, `activations`). A pass may preserve aspects instead
  of naming analyses: an analysis survives when every aspect it depends on is
  preserved, or when it is named, and never when it is abandoned.
* An analysis whose `run` asked the manager for another analysis is dropped
  whenever that one is (dependencies are recorded on the fly, like LLVM's
  Invalidator).
"""

from __future__ import annotations

import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    from optc.ir import Model
    from optc.passes.infra.context import PassContext

T = TypeVar("T")

#: The graph: nodes, edges, attributes, value types and shapes.
STRUCTURE = "structure"
#: The contents of initializers.
WEIGHTS = "weights"
#: The runtime value of every surviving named value (calibration statistics depend on it).
ACTIVATIONS = "activations"
ASPECTS = frozenset({STRUCTURE, WEIGHTS, ACTIVATIONS})


class Analysis(ABC, Generic[T]):
    """A cached computation over the IR. Subclasses set `name` and implement `run`.

    Keyword arguments given to `AnalysisManager.get` are passed to the
    constructor and are part of the cache key.
    """

    name: ClassVar[str] = ""
    depends_on: ClassVar[frozenset[str]] = ASPECTS

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def run(self, model: Model, am: AnalysisManager) -> T:
        """Compute the result; may call `am.get` for other analyses."""


class PreservedAnalyses:
    """What a pass left valid: everything, named analyses, and/or whole aspects."""

    def __init__(self) -> None:
        self._all = False
        self._analyses: set[type[Analysis]] = set()
        self._aspects: set[str] = set()
        self._abandoned: set[type[Analysis]] = set()

    @classmethod
    def all(cls) -> PreservedAnalyses:
        pa = cls()
        pa._all = True
        return pa

    @classmethod
    def none(cls) -> PreservedAnalyses:
        return cls()

    def preserve(self, *analyses: type[Analysis]) -> PreservedAnalyses:
        self._analyses.update(analyses)
        self._abandoned.difference_update(analyses)
        return self

    def preserve_aspects(self, *aspects: str) -> PreservedAnalyses:
        unknown = set(aspects) - ASPECTS
        if unknown:
            raise ValueError(f"unknown IR aspects {sorted(unknown)}; known: {sorted(ASPECTS)}")
        self._aspects.update(aspects)
        return self

    def abandon(self, *analyses: type[Analysis]) -> PreservedAnalyses:
        """Invalidate these analyses even if a set or `all()` would keep them."""
        self._abandoned.update(analyses)
        self._analyses.difference_update(analyses)
        return self

    def intersect(self, other: PreservedAnalyses) -> PreservedAnalyses:
        """What both preserve (used by a pass manager to combine its passes)."""
        result = PreservedAnalyses()
        result._abandoned = self._abandoned | other._abandoned
        if self._all and other._all:
            result._all = True
        elif self._all or other._all:
            kept = other if self._all else self
            result._analyses = set(kept._analyses)
            result._aspects = set(kept._aspects)
        else:
            result._aspects = self._aspects & other._aspects
            result._analyses = {a for a in self._analyses | other._analyses if self.is_preserved(a) and other.is_preserved(a)}
        result._analyses -= result._abandoned
        return result

    def is_preserved(self, analysis: type[Analysis]) -> bool:
        if analysis in self._abandoned:
            return False
        if self._all or analysis in self._analyses:
            return True
        return bool(analysis.depends_on) and analysis.depends_on <= self._aspects

    def all_preserved(self) -> bool:
        return self._all and not self._abandoned

    def __repr__(self) -> str:
        if self._all:
            body = "all"
        else:
            body = ", ".join(sorted(a.name or a.__name__ for a in self._analyses) + sorted(self._aspects)) or "none"
        if self._abandoned:
            body += " minus " + ", ".join(sorted(a.name or a.__name__ for a in self._abandoned))
        return f"PreservedAnalyses({body})"


_Key = tuple[int, type, tuple[tuple[str, Hashable], ...]]


class AnalysisManager:
    """Computes analyses lazily, caches them per model, and invalidates them."""

    def __init__(self, context: PassContext | None = None) -> None:
        from optc.passes.infra.context import PassContext

        self.context = context if context is not None else PassContext()
        self._results: dict[_Key, Any] = {}
        self._dependents: dict[_Key, set[_Key]] = {}
        self._in_progress: list[_Key] = []
        #: How many times each analysis was computed (for statistics and tests).
        self.run_counts: dict[str, int] = {}
        #: id(model) -> a weak reference to that model, to spot an id reused by a new object.
        self._models: dict[int, Any] = {}

    def _track(self, model: Model) -> None:
        """Forget the results of a collected model whose id a new model now has."""
        ref = self._models.get(id(model))
        if ref is not None and ref() is model:
            return
        if ref is not None:
            stale = [k for k in self._results if k[0] == id(model)]
            for key in stale:
                self._results.pop(key, None)
                self._dependents.pop(key, None)
        try:
            self._models[id(model)] = weakref.ref(model)
        except TypeError:  # not weak-referenceable: hold it
            self._models[id(model)] = lambda: model

    @staticmethod
    def _key(analysis: type[Analysis], model: Model, params: dict[str, Any]) -> _Key:
        frozen = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
        return (id(model), analysis, frozen)

    def get(self, analysis: type[Analysis[T]], model: Model, **params: Any) -> T:
        """The analysis result for `model`, computed on a miss."""
        self._track(model)
        key = self._key(analysis, model, params)
        if self._in_progress:
            self._dependents.setdefault(key, set()).add(self._in_progress[-1])
        if key in self._results:
            return self._results[key]
        if key in self._in_progress:
            raise RuntimeError(f"analysis '{analysis.name}' depends on itself")
        instruments = self.context.instruments
        for inst in instruments:
            inst.before_analysis(analysis, model)
        self._in_progress.append(key)
        start = time.perf_counter()
        try:
            result = analysis(**params).run(model, self)
        except BaseException as exc:
            for inst in reversed(instruments):
                inst.after_analysis_failed(analysis, model, exc)
            raise
        finally:
            self._in_progress.pop()
        elapsed = time.perf_counter() - start
        self._results[key] = result
        label = analysis.name or analysis.__name__
        self.run_counts[label] = self.run_counts.get(label, 0) + 1
        for inst in reversed(instruments):
            inst.after_analysis(analysis, model, elapsed)
        return result

    def get_cached(self, analysis: type[Analysis[T]], model: Model, **params: Any) -> T | None:
        """The cached result, or None; never computes."""
        self._track(model)
        return self._results.get(self._key(analysis, model, params))

    def cached_analyses(self, model: Model) -> list[type[Analysis]]:
        self._track(model)
        return [k[1] for k in self._results if k[0] == id(model)]

    def invalidate(self, model: Model, preserved: PreservedAnalyses) -> list[type[Analysis]]:
        """Drop results for `model` that `preserved` does not keep, and everything built on them."""
        self._track(model)
        if preserved.all_preserved():
            return []
        doomed = {k for k in self._results if k[0] == id(model) and not preserved.is_preserved(k[1])}
        stack = list(doomed)
        while stack:
            for dependent in self._dependents.get(stack.pop(), ()):
                if dependent not in doomed:
                    doomed.add(dependent)
                    stack.append(dependent)
        for key in doomed:
            self._results.pop(key, None)
            self._dependents.pop(key, None)
        return sorted({k[1] for k in doomed}, key=lambda a: a.name or a.__name__)

    def transfer(self, old: Model, new: Model) -> None:
        """Re-key the results of `old` to `new` (a pass returned a new model object)."""
        if old is new:
            return
        self._track(new)
        self._models.pop(id(old), None)
        mapping = {k: (id(new), k[1], k[2]) for k in self._results if k[0] == id(old)}
        self._results = {mapping.get(k, k): v for k, v in self._results.items()}
        self._dependents = {
            mapping.get(k, k): {mapping.get(d, d) for d in deps} for k, deps in self._dependents.items()
        }

    def clear(self) -> None:
        self._results.clear()
        self._dependents.clear()
        self._models.clear()


def _freeze(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value
