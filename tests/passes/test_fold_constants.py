"""fold-constants: structural and onnxruntime tests (golden cases: tests/golden/fold-constants/)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from optc.errors import UsageError
from optc.ir import annotate, annotation, is_constant, print_ir
from optc.passes import get_pass
from tests.fixtures import models
from tests.fixtures import text_models as tm
from tests.passes import builders as b


def test_folds_constant_subgraph():
    proto = models.constant_subgraph()
    model = models.to_ir(proto)
    result = b.run(model, "fold-constants")
    assert result.modified
    assert [n.name for n in result.model.graph] == ["out"]
    assert result.statistics == {"nodes-folded": 4}
    folded = result.model.graph.initializers["c2"].const_value.numpy()
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(folded, (inits["C1"] + inits["C2"]) * inits["C3"] + np.float32(0.5))
    b.assert_same_outputs(proto, result.model, atol=1e-6)


def test_nothing_constant_is_a_no_op():
    model = models.to_ir(models.mlp())
    text = print_ir(model)
    result = b.run(model, "fold-constants")
    assert not result.modified
    assert print_ir(result.model) == text


def test_shape_of_static_tensor_folds_and_reshape_keeps_working():
    model = tm.text_model(
        """
g (float[2,3,4] x) => (float[6,4] y)
{
  r = Relu(x)
  s = Shape<end=2>(r)
  p = ReduceProd<keepdims=1>(s)
  t = Shape<start=-1>(r)
  shape = Concat<axis=0>(p, t)
  y = Reshape(r, shape)
}
"""
    )
    before = b.snapshot(model)
    # Without shapes only Shape(x)-style nodes of declared values fold; with shape-infer all do.
    result = b.run(model, "shape-infer,fold-constants")
    assert [n.op_type for n in result.model.graph] == ["Relu", "Reshape"]
    np.testing.assert_array_equal(result.model.graph.initializers["shape"].const_value.numpy(), [6, 4])
    b.assert_same_outputs(before, result.model)


def test_symbolic_shape_does_not_fold():
    model = tm.text_model("g (float[N,3] x) => (int64[2] s) { s = Shape(x) }")
    assert not b.run(model, "fold-constants").modified


def test_random_ops_do_not_fold():
    model = tm.text_model(
        """
g (float[2] x) => (float[2] y)
{
  r = RandomUniform<shape=[2]>()
  y = Add(x, r)
}
"""
    )
    assert not b.run(model, "fold-constants").modified


def test_size_limit():
    text = """
g (float[256] x) => (float[256] y) <int64[1] n = {256}>
{
  z = ConstantOfShape<value=float[1] {1.0}>(n)
  y = Add(x, z)
}
"""
    assert b.run(tm.text_model(text), "fold-constants").modified  # 1 KiB < 1 MiB default
    assert not b.run(tm.text_model(text), "fold-constants{size-limit=1000}").modified
    model = tm.text_model(text)
    before = b.snapshot(model)
    result = b.run(model, "fold-constants{size-limit=1024}")
    assert result.modified
    b.assert_same_outputs(before, result.model)


def test_size_limit_must_not_be_negative():
    with pytest.raises(UsageError, match="size-limit"):
        b.run(models.to_ir(models.mlp()), "fold-constants{size-limit=-1}")


def test_dequantize_linear_of_constant_weight_stays():
    """QDQ weights must stay quantized: folding DequantizeLinear would store float weights."""
    model = tm.text_model(
        """
g (float[2,4] x) => (float[2,3] y)
  <int8[4,3] wq = {1, -2, 3, 4, -5, 6, 7, 8, -9, 10, 11, -12}, float[3] s = {0.1, 0.2, 0.3}, int8[3] zp = {0, 0, 0}>
{
  w = DequantizeLinear<axis=1>(wq, s, zp)
  y = MatMul(x, w)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "fold-constants")
    assert not result.modified
    assert result.model.graph.initializers["wq"].dtype.name == "INT8"
    b.assert_same_outputs(before, result.model)


def test_constant_graph_output_runs_in_onnxruntime():
    model = tm.text_model(
        """
g (float[2] x) => (float[2] y, float[2] k) <float[2] w = {1.5, 2.5}>
{
  k = Neg(w)
  y = Add(x, k)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "fold-constants,dce")
    assert [v.name for v in result.model.graph.outputs] == ["y", "k"]
    assert "k" in result.model.graph.initializers
    b.assert_same_outputs(before, result.model)


def test_overridable_initializer_is_not_folded():
    """An initializer that is also a graph input may be fed at run time."""
    model = tm.text_model(
        """
g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}>
{
  a = Neg(w)
  y = Add(x, a)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "fold-constants")
    assert not result.modified
    feeds = {"x": np.ones(2, np.float32), "w": np.array([5.0, 7.0], np.float32)}
    b.assert_same_outputs(before, result.model, feeds=feeds)


def test_string_constants_are_left_alone():
    model = tm.text_model(
        """
g (string[2] x) => (string[4] y) <string[2] s = {"a", "b"}>
{
  t = Identity(s)
  y = Concat<axis=0>(x, t)
}
"""
    )
    assert not b.run(model, "fold-constants").modified


def test_folding_is_idempotent_and_keeps_annotations():
    model = models.to_ir(models.constant_subgraph())
    producer = next(n for n in model.graph if n.name == "c_mul")
    annotate(producer.outputs[0], "source_name", "scale")
    result = get_pass("fold-constants")()(model)
    assert annotation(result.model.graph.initializers["c1"], "source_name") == "scale"
    assert not get_pass("fold-constants")()(result.model).modified


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_same_outputs(seed):
    model = tm.random_dag(seed, constant_rate=0.6)
    before = b.snapshot(model)
    result = b.run(model, "fold-constants")
    for node in result.model.graph:
        if all(is_constant(v) for v in node.inputs if v is not None):
            # What is left computable at compile time is dead (left for dce).
            assert not any(o.uses() or o.is_graph_output() for o in node.outputs), node
    b.assert_same_outputs(before, result.model, atol=1e-6)


def test_never_duplicates_a_shared_weight():
    """A tied embedding read by Gather and by Transpose (the lm_head) stays one tensor."""
    from onnx import TensorProto, helper

    emb = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"], axis=0),
            helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
            helper.make_node("MatMul", ["h", "Et"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 64])],
        [numpy_helper.from_array(emb, "E")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    small_limit = get_pass("fold-constants")(size_limit=1024)
    result = small_limit(models.to_ir(proto))
    assert not result.modified
    assert [n.op_type for n in result.model.graph] == ["Gather", "Transpose", "MatMul"]
    # With the Gather gone, the Transpose frees E and is folded despite the limit.
    alone = helper.make_graph(
        [helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Et"], ["y"])],
        "alone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(emb, "E")],
    )
    proto2 = helper.make_model(alone, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    folded = get_pass("fold-constants")(size_limit=1024)(models.to_ir(proto2))
    assert folded.modified
    b.assert_same_outputs(proto2, folded.model, atol=1e-4)


# --- the size limit holds before anything is evaluated ----------------------------------------

_HUGE = 100_000_000  # elements: 400 MB of float32 if ever allocated

_COMPUTED_SHAPES = {
    # op: (nodes computing y from x[1]; the huge result has a shape known only from constants)
    "ConstantOfShape": """
  a = Constant<value=int64[1] {10000}>()
  b = Constant<value=int64[1] {10000}>()
  shape = Concat<axis=0>(a, b)
  big = ConstantOfShape<value=float[1] {1.0}>(shape)
  y = ReduceSum<keepdims=0>(big)
""",
    "Expand": """
  one = Constant<value=float[1] {1.0}>()
  shape = Constant<value=int64[2] {10000, 10000}>()
  big = Expand(one, shape)
  y = ReduceSum<keepdims=0>(big)
""",
    "Tile": """
  one = Constant<value=float[1,1] {1.0}>()
  reps = Constant<value=int64[2] {10000, 10000}>()
  big = Tile(one, reps)
  y = ReduceSum<keepdims=0>(big)
""",
    "Range": """
  start = Constant<value=float {0.0}>()
  limit = Constant<value=float {100000000.0}>()
  delta = Constant<value=float {1.0}>()
  big = Range(start, limit, delta)
  y = ReduceSum<keepdims=0>(big)
""",
    "Pad": """
  one = Constant<value=float[1] {1.0}>()
  pads = Constant<value=int64[2] {0, 99999999}>()
  big = Pad(one, pads)
  y = ReduceSum<keepdims=0>(big)
""",
}


@pytest.mark.parametrize("op", list(_COMPUTED_SHAPES))
@pytest.mark.parametrize("declared", [False, True])
def test_size_limit_holds_before_evaluation(op, declared):
    """A result whose shape only constants give (or that the file declares tiny) is never allocated."""
    import tracemalloc

    value_info = "<float[1] big>" if declared else ""
    model = tm.text_model(f"g (float[1] x) => (float y) {value_info}\n{{{_COMPUTED_SHAPES[op]}}}")
    tracemalloc.start()
    try:
        result = b.run(model, "cleanup")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB while folding"
    assert op in [n.op_type for n in result.model.graph], "the huge node stays"
    assert all(v.const_value.size < _HUGE for v in result.model.graph.initializers.values())


def test_inferred_shape_still_folds_within_the_limit():
    model = tm.text_model(
        """
g (float[4,8] x) => (float[4,8] y)
{
  shape = Constant<value=int64[2] {4, 8}>()
  one = Constant<value=float[1] {2.0}>()
  big = Expand(one, shape)
  y = Mul(x, big)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "cleanup")
    assert [n.op_type for n in result.model.graph] == ["Mul"]
    b.assert_same_outputs(before, result.model)


def test_cast_to_string_is_left_alone():
    """(Found by the fuzzer) a result of type STRING has no bit width: not folded, no crash."""
    model = tm.text_model(
        """
g (float[2] x) => (string[2] y) <float[2] c = {1.0, 2.0}>
{
  y = Cast<to=8>(c)
}
"""
    )
    assert not b.run(model, "fold-constants").modified


def test_numeric_warnings_stay_quiet():
    """Folding 0/0 gives NaN, as the model says, without numpy's RuntimeWarning on stderr."""
    model = tm.text_model(
        """
g (float[1] x) => (float[1] y) <float[1] z = {0.0}>
{
  q = Div(z, z)
  y = Add(x, q)
}
"""
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert b.run(model, "fold-constants").modified
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
