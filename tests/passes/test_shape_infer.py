"""shape-infer: structural and onnxruntime tests (golden cases: tests/golden/shape-infer/)."""

from __future__ import annotations

from optc.ir import DataType, print_ir
from tests.fixtures import models
from tests.fixtures import text_models as tm
from tests.passes import builders as b


def _shapes(model):
    return {v.name: (list(v.shape) if v.shape is not None else None) for n in model.graph for v in n.outputs}


def test_fills_every_intermediate_value():
    proto = models.mlp()
    model = models.to_ir(proto)
    result = b.run(model, "shape-infer")
    assert result.modified
    assert _shapes(result.model) == {"h0": [2, 16], "h1": [2, 16], "h2": [2, 16], "h3": [2, 4], "Y": [2, 4]}
    assert all(v.dtype == DataType.FLOAT for n in result.model.graph for v in n.outputs)
    assert result.statistics == {"values-typed": 4}
    # Recorded shapes must agree with what onnxruntime computes (it checks value_info).
    b.assert_same_outputs(proto, result.model)


def test_second_run_changes_nothing():
    model = models.to_ir(models.mlp())
    b.run(model, "shape-infer")
    text = print_ir(model)
    result = b.run(model, "shape-infer")
    assert not result.modified
    assert result.effective_preserved().all_preserved()
    assert print_ir(result.model) == text


def test_reshape_with_constant_shape():
    model = tm.text_model(
        """
g (float[2,3,4] x) => (float[4,6] y) <int64[2] s = {-1, 6}, int64[3] s2 = {0, 0, -1}>
{
  a = Reshape(x, s)
  b = Reshape(x, s2)
  c = Transpose<perm=[1,0]>(a)
  d = Flatten<axis=2>(b)
  e = Reshape(d, s)
  f = Transpose<perm=[1,0]>(c)
  y = Add(f, e)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "shape-infer")
    shapes = _shapes(result.model)
    assert shapes["a"] == [4, 6] and shapes["b"] == [2, 3, 4] and shapes["c"] == [6, 4]
    b.assert_same_outputs(before, result.model)


def test_symbolic_dimensions_flow_and_known_dimensions_are_not_overwritten():
    model = tm.text_model(
        """
g (float[N,8] x) => (float[N,?] y) <float[8,4] w = {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}>
{
  a = MatMul(x, w)
  y = Relu(a)
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "shape-infer")
    shapes = _shapes(result.model)
    assert shapes["a"] == ["N", 4]
    assert shapes["y"] == ["N", 4]  # the declared `?` is refined, N is kept
    b.assert_same_outputs(before, result.model)


def test_large_weights_are_declared_not_read():
    """Initializers over 4096 elements reach onnx shape inference as typed inputs, untouched."""
    ones = ", ".join(["1"] * (64 * 128))
    model = tm.text_model(f"g (float[2,64] x) => (float[2,128] y) <float[64,128] w = {{{ones}}}> {{ h = MatMul(x, w)  y = Relu(h) }}")
    data = model.graph.initializers["w"].const_value
    result = b.run(model, "shape-infer")
    assert _shapes(result.model)["h"] == [2, 128]
    assert result.model.graph.initializers["w"].const_value is data
    assert [v.name for v in result.model.graph.inputs] == ["x"]


def test_then_fold_constants_folds_shape_arithmetic():
    model = tm.text_model(
        """
g (float[2,3,4] x) => (float[?,?] y)
{
  r = Relu(x)
  s = Shape(r)
  n = Size(r)
  y = Reshape(r, flat)
  flat = Concat<axis=0>(first, rest)
  first = Slice(s, zero, one)
  rest = Div(n, first)
  zero = Constant<value_ints=[0]>()
  one = Constant<value_ints=[1]>()
}
"""
    )
    before = b.snapshot(model)
    result = b.run(model, "topo-sort,shape-infer,fold-constants,dce")
    assert [n.op_type for n in result.model.graph] == ["Relu", "Reshape"]
    b.assert_same_outputs(before, result.model)


def test_random_graphs_same_outputs():
    for seed in range(4):
        model = tm.random_dag(seed)
        before = b.snapshot(model)
        result = b.run(model, "shape-infer")
        values = [v for n in result.model.graph for v in n.outputs]
        assert all(v.dtype == DataType.FLOAT and list(v.shape) in ([2, 4], [4]) for v in values)
        b.assert_same_outputs(before, result.model)
