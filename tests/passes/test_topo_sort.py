"""topo-sort: structural and onnxruntime tests (golden cases: tests/golden/topo-sort/)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from optc.errors import PassFailure
from optc.ir import from_proto, print_ir, problems
from tests.fixtures import models
from tests.fixtures import text_models as tm
from tests.passes import builders as b


def _shuffled(proto: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    nodes = list(copy.graph.node)
    order = np.random.default_rng(seed).permutation(len(nodes))
    del copy.graph.node[:]
    copy.graph.node.extend(nodes[i] for i in order)
    return copy


@pytest.mark.parametrize("seed", range(4))
def test_sorts_a_shuffled_mlp(seed):
    proto = models.mlp()
    model = from_proto(_shuffled(proto, seed))
    result = b.run(model, "topo-sort")
    assert not problems(result.model)
    b.assert_same_outputs(proto, result.model)


@pytest.mark.parametrize("seed", range(6))
def test_sorts_shuffled_random_graphs(seed):
    ordered = b.snapshot(tm.random_dag(seed))
    model = from_proto(_shuffled(ordered, seed + 100))
    result = b.run(model, "topo-sort")
    assert sorted(n.name or n.outputs[0].name for n in result.model.graph) == sorted(
        n.name or n.output[0] for n in ordered.graph.node
    )
    b.assert_same_outputs(ordered, result.model)


def test_valid_order_is_kept():
    model = models.to_ir(models.duplicated_subgraph())
    text = print_ir(model)
    result = b.run(model, "topo-sort")
    assert not result.modified
    assert result.effective_preserved().all_preserved()
    assert print_ir(result.model) == text


def test_subgraph_captures_order_their_producers_first():
    model = tm.text_model(
        """
g (float[2] x, bool cond) => (float[2] y)
{
  y = If(cond) <
    then_branch = then_g () => (float[2] t) { t = Neg(a) },
    else_branch = else_g () => (float[2] e) { e = Identity(x) }
  >
  a = Relu(x)
}
"""
    )
    assert problems(model)  # a used before it is defined
    before = b.snapshot(model)
    result = b.run(model, "topo-sort")
    assert [n.op_type for n in result.model.graph] == ["Relu", "If"]
    b.assert_same_outputs(before, result.model, seeds=(0, 1, 2, 3))


def test_cycle_is_an_error():
    model = tm.text_model("g (float[2] x) => (float[2] y) { a = Add(x, c)  c = Neg(a)  y = Relu(a) }")
    with pytest.raises(PassFailure, match="cycle"):
        b.run(model, "topo-sort")
