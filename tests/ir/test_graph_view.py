"""The networkx view: one node per IR node, one edge per use, graph algorithms on top."""

from __future__ import annotations

import networkx as nx

import optc.ir as oi
from optc.ir.graph_view import dominators, reachable_from


def _by_name(model) -> dict[str, oi.Node]:
    return {n.name: n for n in model.graph}


def test_nodes_and_edges(mlp):
    view = oi.to_networkx(mlp.graph)
    assert isinstance(view, nx.MultiDiGraph)
    assert view.number_of_nodes() == 5
    assert [view.nodes[i]["node"].name for i in view.nodes] == ["mm1", "add1", "relu", "mm2", "add2"]
    assert [view.nodes[i]["op_type"] for i in view.nodes] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    # Graph inputs and initializers are not nodes, so only the chain's four edges remain.
    edges = sorted((u, v, data["value"].name) for u, v, data in view.edges(data=True))
    assert edges == [(0, 1, "h0"), (1, 2, "h1"), (2, 3, "h2"), (3, 4, "h3")]
    assert nx.is_directed_acyclic_graph(view)
    assert list(nx.topological_sort(view)) == [0, 1, 2, 3, 4]


def test_edge_values_are_ir_values(mlp):
    view = oi.to_networkx(mlp.graph)
    nodes = _by_name(mlp)
    for u, v, value in view.edges(data="value"):
        assert value.producer() is view.nodes[u]["node"]
        assert view.nodes[v]["node"] in {use.node for use in value.uses()}
    assert view.nodes[0]["node"] is nodes["mm1"]


def test_fan_out_and_fan_in(duplicated_ir):
    view = oi.to_networkx(duplicated_ir.graph)
    names = {i: n.name for i, n in view.nodes(data="node")}
    succ = {names[u]: sorted(names[v] for v in view.successors(u)) for u in view.nodes}
    assert succ == {"mm_a": ["relu_a"], "relu_a": ["sum"], "mm_b": ["relu_b"], "relu_b": ["sum"], "sum": []}
    assert view.in_degree(max(view.nodes)) == 2


def test_dead_branch_is_disconnected(dead_nodes_ir):
    view = oi.to_networkx(dead_nodes_ir.graph)
    components = sorted(
        sorted(view.nodes[i]["node"].name for i in c) for c in nx.weakly_connected_components(view)
    )
    assert components == [["add1", "add2", "mm1", "mm2", "relu"], ["dead1", "dead2"]]


def test_reachable_from(mlp):
    nodes = _by_name(mlp)
    assert [n.name for n in reachable_from(mlp.graph, nodes["relu"])] == ["mm2", "add2"]
    assert reachable_from(mlp.graph, nodes["add2"]) == []


def test_dominators(duplicated_ir):
    nodes = _by_name(duplicated_ir)
    # Make a single entry: both branches read an Identity of X.
    graph = duplicated_ir.graph
    entry = oi.make_node("Identity", [graph.inputs[0]], name="entry")
    graph.insert_before(nodes["mm_a"], entry)
    nodes["mm_a"].replace_input_with(0, entry.outputs[0])
    nodes["mm_b"].replace_input_with(0, entry.outputs[0])
    idom = {k.name: v.name for k, v in dominators(graph, entry).items()}
    assert idom["relu_a"] == "mm_a"
    assert idom["sum"] == "entry"  # reached through both branches
    assert idom["mm_b"] == "entry"


def test_view_of_subgraph(if_ir):
    branch = next(iter(if_ir.graph))
    view = oi.to_networkx(branch.attributes["then_branch"].value)
    assert [n.name for _, n in view.nodes(data="node")] == ["then_mm", "then_add"]
    assert view.number_of_edges() == 1
