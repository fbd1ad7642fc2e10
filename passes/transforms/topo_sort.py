"""`topo-sort`: order nodes so every value is defined before it is used."""

from __future__ import annotations

from optc.ir import Model
from optc.passes.infra.analysis import ACTIVATIONS, WEIGHTS, AnalysisManager, PreservedAnalyses
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass


@register_pass("topo-sort")
class TopologicalSort(Pass):
    """Sort nodes topologically, keeping the existing order where it is already valid."""

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        before = [id(n) for n in graph]
        graph.sort()  # stable: ties keep their original relative order
        modified = [id(n) for n in graph] != before
        preserved = PreservedAnalyses().preserve_aspects(ACTIVATIONS, WEIGHTS)
        return PassResult(model, modified, preserved if modified else None)
