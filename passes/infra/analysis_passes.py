"""Pseudo-passes `require<analysis>` and `invalidate<analysis>` / `invalidate<all>` (as in LLVM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optc.passes.infra.analysis import Analysis, AnalysisManager, PreservedAnalyses
from optc.passes.infra.pass_base import Pass, PassResult

if TYPE_CHECKING:
    from optc.ir import Model


class _AnalysisPseudoPass(Pass):
    """A `name<analysis>` pseudo-pass: equal to another of its class on the same analysis."""

    def __init__(self, analysis: type[Analysis] | None) -> None:
        super().__init__()
        self.analysis = analysis

    def pipeline_text(self) -> str:
        return f"{self.name}<{self.analysis.name if self.analysis else 'all'}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.analysis is self.analysis

    def __hash__(self) -> int:
        return hash(self.pipeline_text())


class RequireAnalysis(_AnalysisPseudoPass):
    """Compute an analysis now, so later passes find it cached."""

    name = "require"

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        am.get(self.analysis, model)
        return PassResult(model, modified=False)


class InvalidateAnalysis(_AnalysisPseudoPass):
    """Drop a cached analysis (or all of them with `invalidate<all>`)."""

    name = "invalidate"

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        preserved = PreservedAnalyses.none() if self.analysis is None else PreservedAnalyses.all().abandon(self.analysis)
        return PassResult(model, modified=False, preserved=preserved)
