"""`optc.ir.patterns.weights`: the one weight view (constant, output and K axes, path) of every weighted op."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from optc.ir.patterns.ops import GEMM_OPS
from optc.ir.patterns.weights import Trace, trace_back, weight_axes, weight_miss, weight_view
from tests.fixtures import models


def _model(nodes, x_shape, weights, out_shape=None):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    return models.to_ir(models.make_model(nodes, inputs, outputs, weights))


def _op(model, op_type):
    return next(n for n in model.graph if n.op_type == op_type)


def _w(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.arange(int(np.prod(shape))).reshape(shape).astype(dtype), name)


def test_matmul_weight_is_k_by_n():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [2, 4], [_w("w", [4, 3])], [2, 3])
    view = weight_view(_op(model, "MatMul"))
    assert view is not None and view.constant.name == "w" and view.direct
    assert (view.out_axis, view.k_axis, view.path, view.perm) == (1, 0, (), None)
    assert view.reader is view.node and view.reader_index == 1


def test_batched_matmul_weight_uses_the_last_two_axes():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [5, 2, 4], [_w("w", [5, 4, 3])], [5, 2, 3])
    view = weight_view(_op(model, "MatMul"))
    assert view is not None and (view.out_axis, view.k_axis) == (2, 1)


def test_gemm_trans_b_decides_the_axes():
    for trans_b, shape, axes in ((0, [4, 3], (1, 0)), (1, [3, 4], (0, 1))):
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b)
        view = weight_view(_op(_model([node], [2, 4], [_w("w", shape)], [2, 3]), "Gemm"))
        assert view is not None and (view.out_axis, view.k_axis) == axes


def test_conv_and_conv_transpose_axes():
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [1, 2, 5, 5], [_w("w", [6, 2, 3, 3])], [1, 6, 3, 3])
    view = weight_view(_op(conv, "Conv"))
    assert view is not None and (view.out_axis, view.k_axis) == (0, 1)
    deconv = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"])], [1, 2, 5, 5], [_w("w", [2, 6, 3, 3])], [1, 6, 7, 7])
    view = weight_view(_op(deconv, "ConvTranspose"))
    assert view is not None and (view.out_axis, view.k_axis) == (1, 0)


def test_through_a_transpose_the_axes_are_the_constants():
    nodes = [helper.make_node("Transpose", ["t"], ["tt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "tt"], ["y"])]
    model = _model(nodes, [2, 4], [_w("t", [3, 4])], [2, 3])  # a tied table [N, K] read as B = Tᵀ
    view = weight_view(_op(model, "MatMul"))
    assert view is not None and view.constant.name == "t" and view.through == ("Transpose",)
    assert (view.out_axis, view.k_axis, view.perm) == (0, 1, (1, 0))
    assert view.reader.op_type == "Transpose" and view.reader_index == 0
    assert weight_view(_op(model, "MatMul"), through=("Cast",)) is None  # the Transpose is not allowed
    assert "computed by Transpose" in weight_miss(_op(model, "MatMul"), through=("Cast",))


def test_through_a_blocked_dequantize_linear():
    q = numpy_helper.from_array(np.ones((4, 3), dtype=np.int8), "w_q")
    scale = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "w_scale")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], axis=0, block_size=2),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"])]
    model = _model(nodes, [2, 4], [q, scale], [2, 3])
    model.opset_imports[""] = 21
    view = weight_view(_op(model, "MatMul"))
    assert view is not None and view.constant.name == "w_q" and view.through == ("DequantizeLinear",)
    assert view.dequantize is not None and view.dequantize.attributes["block_size"].as_int() == 2
    assert (view.out_axis, view.k_axis) == (1, 0)


def test_through_cast_then_transpose_then_dequantize():
    q = numpy_helper.from_array(np.ones((3, 4), dtype=np.int8), "w_q")
    scale = numpy_helper.from_array(np.ones(3, dtype=np.float32), "w_scale")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], axis=0),
             helper.make_node("Transpose", ["w_dq"], ["w_t"], perm=[1, 0]),
             helper.make_node("Cast", ["w_t"], ["w_c"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x", "w_c"], ["y"])]
    view = weight_view(_op(_model(nodes, [2, 4], [q, scale], [2, 3]), "Gemm"))
    assert view is not None and view.through == ("Cast", "Transpose", "DequantizeLinear")
    assert (view.out_axis, view.k_axis) == (0, 1)  # B [K, N] = w_qᵀ: N is w_q's axis 0


def test_a_computed_weight_gives_none_with_a_reason():
    nodes = [helper.make_node("Relu", ["x2"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [2, 4]), ("x2", [4, 3]))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    model = models.to_ir(models.make_model(nodes, inputs, outputs, []))
    node = _op(model, "MatMul")
    assert weight_view(node) is None
    assert weight_miss(node) == "weight 'w' is computed by Relu"
    assert weight_miss(_op(model, "Relu")) == "Relu is not a weighted op"


def test_a_graph_input_weight_and_a_constant_activation_give_reasons():
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [2, 4]), ("w", [4, 3]))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    model = models.to_ir(models.make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], inputs, outputs, []))
    assert weight_miss(_op(model, "MatMul")) == "weight 'w' is not a constant"
    constant_x = _model([helper.make_node("MatMul", ["c", "w"], ["y"])], [2, 4], [_w("c", [2, 4]), _w("w", [4, 3])], [2, 3])
    assert weight_miss(_op(constant_x, "MatMul")) == "its data input is a constant"


def test_ops_narrow_the_weighted_ops():
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [1, 2, 5, 5], [_w("w", [6, 2, 3, 3])], [1, 6, 3, 3])
    assert weight_view(_op(conv, "Conv"), ops=GEMM_OPS) is None
    assert weight_axes(_op(conv, "Conv"), 4) == (0, 1)


def test_past_a_reshape_the_axes_are_unknown_and_depth_bounds_the_trace():
    shape = numpy_helper.from_array(np.array([4, 3], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w_r"]), helper.make_node("Cast", ["w_r"], ["w_c"], to=1),
             helper.make_node("MatMul", ["x", "w_c"], ["y"])]
    model = _model(nodes, [2, 4], [_w("w", [12]), shape], [2, 3])
    node = _op(model, "MatMul")
    assert weight_view(node) is None  # Reshape is not followed by default
    view = weight_view(node, through=("Cast", "Reshape"))
    assert view is not None and view.constant.name == "w" and (view.out_axis, view.k_axis) == (None, None)
    found = trace_back(node.inputs[1], through=("Cast", "Reshape"), depth=1)
    assert found == "weight 'w_c' is more than 1 nodes from a constant"
    assert isinstance(trace_back(node.inputs[1], through=("Cast", "Reshape"), depth=2), Trace)
