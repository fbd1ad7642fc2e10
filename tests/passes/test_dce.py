"""dce: structural and onnxruntime tests (golden cases: tests/golden/dce/)."""

from __future__ import annotations

import pytest

from optc.ir import print_ir
from optc.passes import ACTIVATIONS, STRUCTURE, WEIGHTS, Analysis, get_pass
from tests.fixtures import models
from tests.fixtures import text_models as tm
from tests.passes import builders as b


def _names(model):
    return [node.name or node.outputs[0].name for node in model.graph]


class _Depends(Analysis):
    depends_on = frozenset()

    def run(self, model, am):
        return None


def _depending_on(*aspects):
    return type("A", (_Depends,), {"depends_on": frozenset(aspects)})


def test_removes_dead_nodes_and_initializers():
    model = models.to_ir(models.dead_nodes())
    before = b.snapshot(model)
    result = b.run(model, "dce")
    assert result.modified
    assert _names(result.model) == ["mm1", "add1", "relu", "mm2", "add2"]
    assert sorted(result.model.graph.initializers) == ["B1", "B2", "W1", "W2"]
    b.assert_same_outputs(before, result.model)


def test_statistics_and_preserved_aspects():
    model = models.to_ir(models.dead_nodes())
    result = get_pass("dce")()(model)
    assert result.statistics == {"nodes-removed": 2, "initializers-removed": 2}
    preserved = result.effective_preserved()
    assert preserved.is_preserved(_depending_on(ACTIVATIONS, WEIGHTS))
    assert not preserved.is_preserved(_depending_on(STRUCTURE))


def test_nothing_dead_is_a_no_op():
    model = models.to_ir(models.mlp())
    text = print_ir(model)
    result = b.run(model, "dce")
    assert not result.modified
    assert result.effective_preserved().all_preserved()
    assert print_ir(result.model) == text


@pytest.mark.parametrize("builder", ["if_model", "loop_model"])
def test_subgraph_captures_stay_alive(builder):
    """W and B are read only inside If/Loop bodies."""
    proto = getattr(models, builder)()
    model = models.to_ir(proto)
    result = b.run(model, "dce")
    assert not result.modified
    assert set(result.model.graph.initializers) == {t.name for t in proto.graph.initializer}
    b.assert_same_outputs(proto, result.model)


def test_dead_if_goes_with_what_only_its_branches_read():
    model = tm.text_model(
        """
g (float[2] x, bool cond) => (float[2] y) <float[2] w = {1.0, 2.0}>
{
  a = Relu(x)
  dead = If(cond) <
    then_branch = then_g () => (float[2] t) {
      t = If(cond) <
        then_branch = t2 () => (float[2] o) { o = Mul(a, w) },
        else_branch = e2 () => (float[2] o) { o = Identity(a) }
      >
    },
    else_branch = else_g () => (float[2] e) { e = Identity(x) }
  >
  y = Neg(x)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "dce")
    assert [n.op_type for n in result.model.graph] == ["Neg"]
    assert not result.model.graph.initializers
    b.assert_same_outputs(before, result.model)


def test_graph_inputs_and_output_initializers_are_interface():
    model = tm.text_model(
        """
g (float[2] x, float[2] unused, float[2] w) => (float[2] y, float[2] c) <float[2] w = {1.0, 2.0}, float[2] c = {3.0, 4.0}>
{
  d = Neg(w)
  y = Abs(x)
}
"""
    )
    result = b.run(model, "dce")
    graph = result.model.graph
    assert [v.name for v in graph.inputs] == ["x", "unused", "w"]
    assert sorted(graph.initializers) == ["c", "w"]
    assert [n.op_type for n in graph] == ["Abs"]


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_keep_their_outputs(seed):
    model = tm.random_dag(seed, dead_rate=0.5)
    before = b.snapshot(model)
    result = b.run(model, "dce")
    assert result.model.graph.num_nodes() <= len(before.graph.node)
    # Every remaining node feeds an output: a second run finds nothing.
    assert not b.run(result.model, "dce").modified
    b.assert_same_outputs(before, result.model)
