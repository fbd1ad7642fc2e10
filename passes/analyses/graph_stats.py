"""`graph-stats`: node counts by op type, parameter counts and weight bytes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from optc.ir import Model
from optc.passes.infra.analysis import STRUCTURE, WEIGHTS, Analysis, AnalysisManager
from optc.passes.infra.registry import register_analysis


@dataclass(frozen=True)
class GraphStats:
    nodes: int
    op_counts: dict[str, int]
    parameters: int
    weight_bytes: int


@register_analysis("graph-stats")
class GraphStatsAnalysis(Analysis[GraphStats]):
    """Counts nodes per op type and initializer elements and bytes (reads metadata only)."""

    depends_on = frozenset({STRUCTURE, WEIGHTS})

    def run(self, model: Model, am: AnalysisManager) -> GraphStats:
        graph = model.graph
        ops = Counter(node.op_type for node in graph)
        params = sum(v.const_value.size for v in graph.initializers.values() if v.const_value is not None)
        nbytes = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
        return GraphStats(graph.num_nodes(), dict(sorted(ops.items())), params, nbytes)
