"""The `Pass` base class and `PassResult`.

A pass is a class with a registered kebab-case `name`, a docstring whose first
line is its summary, an `Options` dataclass (see `options.py`), optional
`requires`/`ensures` checks and a `run` method:

    @register_pass("drop-identity")
    class DropIdentity(Pass):
        \"\"\"Remove Identity nodes.\"\"\"

        def run(self, model, am):
            ...
            return PassResult(model, modified=True, preserved=PreservedAnalyses().preserve_aspects(WEIGHTS))

A pass that finds a structure it targets but cannot handle says so with
`am.context.remark("missed", "0 of 4 blocks matched: <reason>", matched_none=True)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from optc.errors import PostconditionError, PreconditionError
from optc.passes.infra.analysis import PreservedAnalyses
from optc.passes.infra.options import NoOptions, build_options, format_options
from optc.passes.infra.remarks import Remark, RemarkError

if TYPE_CHECKING:
    from optc.ir import Model
    from optc.passes.infra.analysis import AnalysisManager


@dataclasses.dataclass
class PassResult:
    """What a pass returns: the IR (the same object, or a new one), whether it changed, what it preserved."""

    model: Model
    modified: bool
    preserved: PreservedAnalyses | None = None
    #: Named counters for `--statistics`, e.g. {"nodes-removed": 3}.
    statistics: dict[str, int | float] = dataclasses.field(default_factory=dict)
    #: The remarks emitted while the pass ran (filled in by `Pass.__call__`; a pipeline's holds its passes').
    remarks: list[Remark] = dataclasses.field(default_factory=list)

    def effective_preserved(self) -> PreservedAnalyses:
        """`modified=False` preserves all; `modified=True` without a set preserves none."""
        if self.preserved is not None:
            return self.preserved
        return PreservedAnalyses.all() if not self.modified else PreservedAnalyses.none()


class Pass:
    """Base class of every transformation. Subclasses set `name` via `@register_pass`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: A required pass runs even when the context disables it.
    required: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options

    @classmethod
    def from_text_options(cls, items: list[tuple[str, str]]) -> Pass:
        """Build from parsed `{key=value}` pairs; raises `UsageError` naming the problem."""
        return cls(options=build_options(cls.Options, cls.name, items))

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring, for `--list-passes`."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def requires(self, model: Model, am: AnalysisManager) -> None:
        """Raise `PreconditionError` if `model` is not a valid input for this pass."""

    def ensures(self, model: Model, am: AnalysisManager) -> None:
        """Raise `PostconditionError` if the output breaks what this pass promises."""

    def order_warning(self, earlier: Sequence[Pass]) -> str | None:
        """A warning about this pass's place in its pipeline (`earlier`: the passes before it, flattened), or None."""
        return None

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __call__(self, model: Model, am: AnalysisManager | None = None) -> PassResult:
        """Run with its checks: `requires`, `run`, `ensures`. Standalone use creates an AnalysisManager.

        The remarks emitted meanwhile go on `result.remarks`; under `PassContext.strict` a `missed`
        one raises `RemarkError` instead of returning.
        """
        from optc.passes.infra.analysis import AnalysisManager

        am = am if am is not None else AnalysisManager()
        context = am.context
        first_remark = len(context.remarks)
        context.pass_stack.append(self.name)
        try:
            result = self._checked_run(model, am)
        finally:
            context.pass_stack.pop()
        result.remarks = context.remarks[first_remark:]
        if context.strict:
            missed = next((r for r in result.remarks if r.kind == "missed"), None)
            if missed is not None:
                raise RemarkError(missed)
        return result

    def _checked_run(self, model: Model, am: AnalysisManager) -> PassResult:
        try:
            self.requires(model, am)
        except PreconditionError:
            raise
        except Exception as exc:
            raise PreconditionError(f"pass '{self.name}': precondition failed: {exc}") from exc
        result = self.run(model, am)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult")
        try:
            self.ensures(result.model, am)
        except PostconditionError:
            raise
        except Exception as exc:
            raise PostconditionError(f"pass '{self.name}': postcondition failed: {exc}") from exc
        return result

    def pipeline_text(self) -> str:
        """This pass in canonical pipeline syntax: `name{opt=value ...}`."""
        return self.name + format_options(self.options)

    def __repr__(self) -> str:
        return f"<pass {self.pipeline_text()}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.pipeline_text()))
