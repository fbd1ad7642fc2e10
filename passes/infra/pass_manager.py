"""`PassManager`: runs passes in order with instruments and analysis invalidation.

A pass manager is itself a pass, so pipelines nest: `fixpoint(dce,cse)`
repeats its children until none of them changes the IR.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from optc.errors import OptcError, PassFailure
from optc.passes.infra.analysis import AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import format_options, option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.remarks import RemarkError

if TYPE_CHECKING:
    from optc.ir import Model


class PassManager(Pass):
    """Run a sequence of passes, invalidating analyses after each from what it preserved."""

    name = "pipeline"
    #: Container passes take a parenthesized list of children in pipeline text.
    container = True

    def __init__(self, passes: Iterable[Pass] = (), options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.passes: list[Pass] = list(passes)

    def add(self, pass_: Pass) -> PassManager:
        self.passes.append(pass_)
        return self

    def pipeline_text(self) -> str:
        """The canonical pipeline: children joined by commas; a registered container wraps them in `name{opts}(...)`."""
        body = ",".join(p.pipeline_text() for p in self.passes)
        if self.name == PassManager.name:
            return body
        return f"{self.name}{format_options(self.options)}({body})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options and self.passes == other.passes  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.pipeline_text())

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        context = am.context
        if context.input_model is not None or not self.needs_input_model():
            return self._run_once(model, am)
        context.input_model = snapshot_model(model)  # e.g. distill's teacher
        try:
            return self._run_once(model, am)
        finally:
            context.input_model = None

    def needs_input_model(self) -> bool:
        """Whether a pass in this pipeline (nested ones included) reads `PassContext.input_model`."""
        return any(p.needs_input_model() if isinstance(p, PassManager) else getattr(p, "uses_input_model", False)
                   for p in self.passes)

    def _run_once(self, model: Model, am: AnalysisManager) -> PassResult:
        context = am.context
        preserved = PreservedAnalyses.all()
        modified = False
        statistics: dict[str, int | float] = {}
        ran: list[str] = []
        for pass_ in self.passes:
            if pass_.name in context.disabled and not pass_.required:
                continue
            if not all(inst.should_run(pass_, model) for inst in context.instruments):
                continue
            for inst in context.instruments:
                inst.before_pass(pass_, model)
            start = time.perf_counter()
            try:
                result = pass_(model, am)
            except BaseException as exc:
                for inst in reversed(context.instruments):
                    inst.after_pass_failed(pass_, model, exc)
                if isinstance(exc, PassFailure) and ran:  # from a nested pipeline: add what ran out here
                    raise PassFailure(exc.pass_name, exc.cause, ran + exc.before) from exc.__cause__
                if isinstance(exc, (PassFailure, RemarkError)) or not isinstance(exc, Exception):
                    raise  # a RemarkError (--strict) is its remark's one line, not a crash to reproduce
                if isinstance(exc, OptcError):
                    raise PassFailure(pass_.pipeline_text(), exc, ran) from exc
                raise PassFailure(pass_.pipeline_text(), _describe(exc), ran) from exc
            elapsed = time.perf_counter() - start
            pass_preserved = result.effective_preserved()
            am.invalidate(model, pass_preserved)
            am.transfer(model, result.model)
            model = result.model
            preserved = preserved.intersect(pass_preserved)
            modified |= result.modified
            for key, value in result.statistics.items():
                statistics[key] = statistics.get(key, 0) + value
            try:
                for inst in reversed(context.instruments):
                    inst.after_pass(pass_, model, result, elapsed)
            except OptcError as exc:  # e.g. VerifyEach: the pass left an invalid IR
                raise PassFailure(pass_.pipeline_text(), exc, ran) from exc
            ran.append(pass_.pipeline_text())
        return PassResult(model, modified, preserved if modified else PreservedAnalyses.all(), statistics)


def snapshot_model(model: Model) -> Model:
    """A copy of the model that later passes cannot change: the graph is cloned, weights are shared when
    memory-mapped (read-only) and copied when in memory (a pass might write those in place)."""
    from optc.ir import ExternalTensor, Tensor

    copy = model.clone()
    for value in copy.graph.initializers.values():
        data = value.const_value
        if data is not None and not isinstance(data, ExternalTensor):
            value.const_value = Tensor(data.numpy().copy(), dtype=data.dtype, name=value.name)
    return copy


def _describe(exc: Exception) -> Exception:
    """Keep the exception but make sure its text names its type when it has no message."""
    return exc if str(exc) else RuntimeError(type(exc).__name__)


class Fixpoint(PassManager):
    """Repeat the nested passes until none changes the IR (at most `max-iterations` rounds)."""

    name = "fixpoint"

    @dataclasses.dataclass
    class Options:
        max_iterations: int = option(10, help="upper bound on the number of rounds", at_least=1)

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        preserved = PreservedAnalyses.all()
        modified = False
        statistics: dict[str, int | float] = {"rounds": 0}
        for _ in range(self.options.max_iterations):
            result = self._run_once(model, am)
            statistics["rounds"] += 1
            model = result.model
            for key, value in result.statistics.items():
                statistics[key] = statistics.get(key, 0) + value
            if not result.modified:
                break
            modified = True
            preserved = preserved.intersect(result.effective_preserved())
        return PassResult(model, modified, preserved if modified else PreservedAnalyses.all(), statistics)
