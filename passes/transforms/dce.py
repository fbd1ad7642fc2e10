"""`dce`: dead-code elimination."""

from __future__ import annotations

from optc.ir import AttributeType, Model
from optc.passes.infra.analysis import ACTIVATIONS, WEIGHTS, AnalysisManager, PreservedAnalyses
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Remove nodes whose outputs nothing uses, and initializers no node reads."""

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        live = {id(v) for v in graph.outputs}
        dead_nodes = []
        for node in reversed(list(graph)):
            if any(id(o) in live for o in node.outputs):
                live.update(id(v) for v in node.inputs if v is not None)
                live.update(id(v) for sub in _subgraph_captures(node) for v in sub)
            else:
                dead_nodes.append(node)
        if dead_nodes:
            for node in dead_nodes:
                # Nodes inside a dead node's subgraphs are users of outer values; let go of them.
                for sub in _subgraphs(node):
                    for inner in sub.all_nodes():
                        for i in range(len(inner.inputs)):
                            inner.replace_input_with(i, None)
            graph.remove(dead_nodes, safe=True)
        inputs = {id(v) for v in graph.inputs}
        dead_inits = [
            name for name, value in graph.initializers.items()
            if id(value) not in live and id(value) not in inputs
        ]
        for name in dead_inits:
            graph.initializers.pop(name)
        modified = bool(dead_nodes or dead_inits)
        # Surviving values compute what they computed before; surviving weights are untouched.
        preserved = PreservedAnalyses().preserve_aspects(ACTIVATIONS, WEIGHTS)
        stats = {"nodes-removed": len(dead_nodes), "initializers-removed": len(dead_inits)}
        return PassResult(model, modified, preserved if modified else None, stats)


def _subgraphs(node) -> list:
    """The node's subgraphs (If branches, Loop/Scan bodies)."""
    graphs = []
    for attr in node.attributes.values():
        if attr.type == AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs


def _subgraph_captures(node) -> list[list]:
    """Values from the outer scope that the node's subgraphs (If/Loop/Scan bodies) read."""
    captured: list[list] = []
    for sub in _subgraphs(node):
        local = {id(v) for v in sub.inputs} | {id(v) for v in sub.initializers.values()}
        local |= {id(o) for n in sub.all_nodes() for o in n.outputs}
        captured.append([v for n in sub.all_nodes() for v in n.inputs if v is not None and id(v) not in local])
    return captured
