"""A networkx view of the IR for graph algorithms.

`to_networkx(graph)` returns a `networkx.MultiDiGraph` whose nodes are the IR
nodes' positions in the graph (attribute `node` holds the IR node) and whose
edges carry the value that flows along them (`value`), keyed by the consumer's input slot. Graph inputs,
initializers and outputs are not nodes; use the IR for those.
"""

from __future__ import annotations

import networkx as nx

from optc.ir.core import Graph, Node


def to_networkx(graph: Graph) -> nx.MultiDiGraph:
    """The dataflow graph: one networkx node per IR node, one edge per use."""
    view = nx.MultiDiGraph()
    index = {id(node): i for i, node in enumerate(graph)}
    for i, node in enumerate(graph):
        view.add_node(i, node=node, op_type=node.op_type)
    for i, node in enumerate(graph):
        for slot, value in enumerate(node.inputs):
            if value is None:
                continue
            producer = value.producer()
            if producer is not None and id(producer) in index:
                view.add_edge(index[id(producer)], i, key=slot, value=value)
    return view


def reachable_from(graph: Graph, node: Node) -> list[Node]:
    """Nodes reachable downstream of `node`, in graph order."""
    view = to_networkx(graph)
    start = next(i for i, n in view.nodes(data="node") if n is node)
    hits = nx.descendants(view, start)
    return [view.nodes[i]["node"] for i in sorted(hits)]


def dominators(graph: Graph, node: Node) -> dict[Node, Node]:
    """Immediate dominators of every node reachable from `node` (networkx.immediate_dominators)."""
    view = to_networkx(graph)
    start = next(i for i, n in view.nodes(data="node") if n is node)
    idom = nx.immediate_dominators(nx.DiGraph(view), start)
    return {view.nodes[k]["node"]: view.nodes[v]["node"] for k, v in idom.items()}
