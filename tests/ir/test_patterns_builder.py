"""`optc.ir.patterns.builder.Builder`: fresh names as `unique_name` gives them, from one scan of the graph."""

from __future__ import annotations

import numpy as np

from optc.ir import parse_text, unique_name
from optc.ir.patterns.builder import Builder, drop_unused_initializers

_MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) <float[2] w = {1, 2}, float[2] w_1 = {3, 4}> {
  y_scaled = Mul(x, w)
  y = Add(y_scaled, w_1)
}
"""


def test_fresh_names_are_those_unique_name_gives_after_each_addition():
    model = parse_text(_MODEL)
    graph = model.graph
    build = Builder(graph)
    for base in ("x", "w", "w", "y", "new", "new", "y_scaled"):
        expected = unique_name(graph, base)
        value = build.initializer(base, np.zeros(1, np.float32))  # registered: unique_name sees it too
        assert value.name == expected
    assert graph.initializers["w_2"].name == "w_2" and "w_3" in graph.initializers


def test_node_names_avoid_values_but_reserve_nothing():
    model = parse_text(_MODEL)
    build = Builder(model.graph)
    node = build.node("Relu", [model.graph.inputs[0]], name="y", outputs=["y"])
    # As with unique_name: the node and its output may share a name; only the output is reserved.
    assert node.name == "y_1" and node.outputs[0].name == "y_1"
    assert build.taken("y_1") and build.node_name("y_1") == "y_1_1"
    assert build.fresh("y") == "y_2"


def test_released_and_renamed_names_follow_the_graph():
    model = parse_text(_MODEL)
    graph = model.graph
    build = Builder(graph)
    graph.initializers.pop("w_1")
    build.release("w_1")
    assert build.fresh("w") == unique_name(graph, "w") == "w_1"
    scaled = next(o for n in graph for o in n.outputs if o.name == "y_scaled")
    assert build.rename(scaled, "y_scaled_inner") == "y_scaled_inner"
    assert build.fresh("y_scaled") == unique_name(graph, "y_scaled") == "y_scaled"
    assert Builder.of(build) is build and Builder.of(graph) is not build


def test_one_sweep_drops_unread_initializers_but_never_inputs_or_outputs():
    model = parse_text("""
<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x, float[2] d) => (float[2] y, float[2] kept) <float[2] w = {1, 2}, float[2] a = {3, 4}, float[2] b = {5, 6},
                                                          float[2] kept = {7, 8}, float[2] d = {0, 0}> {
  y = Mul(x, w)
}
""")
    graph = model.graph
    assert drop_unused_initializers(graph, [graph.initializers["a"], graph.initializers["w"]]) == ["a"]
    assert drop_unused_initializers(graph) == ["b"]  # w is read, kept is an output, d is an input
    assert sorted(graph.initializers) == ["d", "kept", "w"]
