"""Pseudo-passes `require<analysis>` and `invalidate<analysis>` / `invalidate<all>` (as in LLVM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optc.passes.infra.analysis import Analysis, AnalysisManager, PreservedAnalyses
from optc.passes.infra.pass_base import Pass, PassResult

if TYPE_CHECKING:
    from optc.ir import Model


class RequireAnalysis(Pass):
    """Compute an analysis now, so later passes find it cached."""

    name = "require"

    def __init__(self, analysis: type[Analysis]) -> None:
        super().__init__()
        self.analysis = analysis

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        am.get(self.analysis, model)
        return PassResult(model, modified=False)

    def pipeline_text(self) -> str:
        return f"require<{self.analysis.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequireAnalysis) and other.analysis is self.analysis

    def __hash__(self) -> int:
        return hash(self.pipeline_text())


class InvalidateAnalysis(Pass):
    """Drop a cached analysis (or all of them with `invalidate<all>`)."""

    name = "invalidate"

    def __init__(self, analysis: type[Analysis] | None) -> None:
        super().__init__()
        self.analysis = analysis

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        preserved = PreservedAnalyses.none() if self.analysis is None else PreservedAnalyses.all().abandon(self.analysis)
        return PassResult(model, modified=False, preserved=preserved)

    def pipeline_text(self) -> str:
        return f"invalidate<{self.analysis.name if self.analysis else 'all'}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InvalidateAnalysis) and other.analysis is self.analysis

    def __hash__(self) -> int:
        return hash(self.pipeline_text())
