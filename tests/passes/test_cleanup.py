"""Acceptance: the cleanup passes shrink a model with dead, duplicated and constant
subgraphs and onnxruntime gives the same outputs."""

from __future__ import annotations

import pytest

from optc.ir import print_ir
from tests.fixtures import models
from tests.fixtures import text_models as tm
from tests.passes import builders as b


@pytest.mark.parametrize("pipeline", ["dce,cse,fold-constants", "cleanup"])
def test_fewer_nodes_same_outputs(pipeline):
    model = tm.messy_model()
    before = b.snapshot(model)
    result = b.run(model, pipeline)
    after = result.model
    assert result.modified
    assert after.graph.num_nodes() < len(before.graph.node)
    ops = [n.op_type for n in after.graph]
    assert "Sigmoid" not in ops and "Tanh" not in ops  # dead chain
    assert ops.count("MatMul") == 1  # duplicate merged
    assert "Shape" not in ops and "Constant" not in ops  # constants folded
    assert "unused" not in after.graph.initializers
    b.assert_same_outputs(before, after, seeds=(0, 1, 2), atol=1e-6)


def test_cleanup_reaches_a_fixed_point():
    """dce,cse,fold-constants once leaves work that cleanup's fixpoint finishes."""
    once = b.run(tm.messy_model(), "dce,cse,fold-constants").model
    full = b.run(tm.messy_model(), "cleanup").model
    assert full.graph.num_nodes() <= once.graph.num_nodes()
    assert sorted(full.graph.initializers) == ["b", "k", "scale", "shape", "w"]
    assert [n.op_type for n in full.graph] == ["MatMul", "Add", "Relu", "Mul", "Add", "Reshape", "Add", "Sub"]
    again = b.run(full, "cleanup")
    assert not again.modified


@pytest.mark.parametrize("builder", models.BUILDERS)
def test_cleanup_keeps_zoo_outputs(builder):
    proto = getattr(models, builder)()
    model = models.to_ir(proto)
    result = b.run(model, "cleanup")
    assert result.model.graph.num_nodes() <= len(proto.graph.node)
    b.assert_same_outputs(proto, result.model, atol=1e-6, feeds=models.random_inputs(proto))


@pytest.mark.parametrize("seed", range(8))
def test_cleanup_on_random_graphs(seed):
    model = tm.random_dag(seed)
    before = b.snapshot(model)
    result = b.run(model, "cleanup")
    assert not b.run(result.model, "cleanup").modified
    b.assert_same_outputs(before, result.model, atol=1e-6)


def test_cleanup_is_deterministic():
    texts = {print_ir(b.run(tm.random_dag(5), "cleanup").model) for _ in range(3)}
    assert len(texts) == 1
