"""cse: structural and onnxruntime tests (golden cases: tests/golden/cse/)."""

from __future__ import annotations

import pytest

from optc.errors import UsageError
from optc.ir import annotate, print_ir, source_name
from optc.passes import get_pass
from tests.fixtures import models
from tests.fixtures import text_models as tm
from tests.passes import builders as b


def test_merges_duplicate_branches():
    proto = models.duplicated_subgraph()
    model = models.to_ir(proto)
    result = b.run(model, "cse")
    assert result.modified
    assert [n.name for n in result.model.graph] == ["mm_a", "relu_a", "sum"]
    total = result.model.graph.node("sum")
    assert total.inputs[0] is total.inputs[1]
    b.assert_same_outputs(proto, result.model)


def test_statistics():
    model = models.to_ir(models.duplicated_subgraph())
    result = get_pass("cse")()(model)
    assert result.statistics == {"nodes-merged": 2, "initializers-merged": 0}


def test_no_duplicates_is_a_no_op():
    model = models.to_ir(models.mlp())
    text = print_ir(model)
    result = b.run(model, "cse")
    assert not result.modified
    assert print_ir(result.model) == text


def test_nondeterministic_nodes_stay_apart():
    model = tm.text_model(
        """
g (float[2] x) => (float[2] y)
{
  r1 = RandomNormalLike(x)
  r2 = RandomNormalLike(x)
  d1 = Dropout(x)
  d2 = Dropout(x)
  s = Sub(r1, r2)
  t = Add(d1, d2)
  y = Add(s, t)
}
"""
    )
    assert not b.run(model, "cse").modified


def test_graph_outputs_keep_their_own_producers():
    model = tm.text_model(
        """
g (float[2] x) => (float[2] y1, float[2] y2)
{
  y1 = Neg(x)
  y2 = Neg(x)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "cse")
    assert not result.modified
    b.assert_same_outputs(before, result.model)


def test_duplicate_constants_merge_up_to_the_size_option():
    small = "{" + ", ".join(["1.0"] * 4) + "}"
    large = "{" + ", ".join(["2.0"] * 64) + "}"
    text = f"""
g (float[64] x) => (float[64] y)
  <float[4] s1 = {small}, float[4] s2 = {small}, float[64] l1 = {large}, float[64] l2 = {large}>
{{
  a = Add(x, l1)
  b = Mul(a, l2)
  c = Add(s1, s2)
  d = ReduceSum<keepdims=1>(c)
  y = Add(b, d)
}}
"""
    result = b.run(tm.text_model(text), "cse")
    assert sorted(result.model.graph.initializers) == ["l1", "s1"]
    result = b.run(tm.text_model(text), "cse{constant-bytes=16}")
    assert sorted(result.model.graph.initializers) == ["l1", "l2", "s1"]
    assert result.statistics["initializers-merged"] == 1
    result = b.run(tm.text_model(text), "cse{constant-bytes=0}")
    assert sorted(result.model.graph.initializers) == ["l1", "l2", "s1", "s2"]


def test_constant_bytes_must_not_be_negative():
    with pytest.raises(UsageError, match="constant-bytes"):
        b.run(models.to_ir(models.mlp()), "cse{constant-bytes=-1}")


def test_initializers_with_other_source_names_stay_apart():
    """Tied-looking norm weights (all ones) of different layers keep their parameter names."""
    model = tm.text_model(
        """
g (float[2] x) => (float[2] y) <float[2] n0 = {1.0, 1.0}, float[2] n1 = {1.0, 1.0}>
{
  a = Mul(x, n0)
  y = Mul(a, n1)
}
"""
    )
    init = model.graph.initializers
    annotate(init["n0"], "source_name", "model.layers.0.input_layernorm.weight")
    annotate(init["n1"], "source_name", "model.layers.1.input_layernorm.weight")
    result = b.run(model, "cse")
    assert not result.modified
    names = {source_name(v) for v in result.model.graph.initializers.values()}
    assert names == {"model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"}


def test_string_constants_merge():
    model = tm.text_model(
        """
g (string[2] x) => (string[6] y) <string[2] s1 = {"a", "b"}, string[2] s2 = {"a", "b"}, string[2] s3 = {"a", "c"}>
{
  y = Concat<axis=0>(s1, s2, s3)
}
"""
    )
    result = b.run(model, "cse")
    assert sorted(result.model.graph.initializers) == ["s1", "s3"]


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_same_outputs(seed):
    model = tm.random_dag(seed, duplicate_rate=0.5)
    before = b.snapshot(model)
    result = b.run(model, "cse")
    assert result.model.graph.num_nodes() <= len(before.graph.node)
    assert not b.run(result.model, "cse").modified, "cse should reach its fixed point in one run"
    b.assert_same_outputs(before, result.model)
