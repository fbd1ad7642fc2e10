"""The pattern library's Q/DQ view (`optc.ir.patterns.qdq`) and residual matcher (`optc.ir.patterns.residual`)."""

from __future__ import annotations

import numpy as np

from optc.ir import DataType, parse_text
from optc.ir.patterns.qdq import (
    QDQ,
    activation_pair,
    dequantized,
    qdq,
    quantized_activation,
    quantized_type,
    quantizing,
    same_constant,
    scalar_like,
)
from optc.ir.patterns.residual import fused_conv, residual_add, residual_adds

_QDQ_MODEL = """
<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>
g (float[2,4] x, float xr) => (float[2,2] y, float[2,2] z, float[2,4] shared, uint8[2,4] raw)
  <float xs = {0.1}, int8 xz = {0}, uint8 uz = {3}, int8[4,2] wq = {1, -2, 3, -4, 5, -6, 7, -8},
   float[2] ws = {0.5, 0.25}, int8[2] wz = {0, 1}, int4[4,2] bq = {1, 2, 3, 4, 5, 6, 7, 0}, float[2,2] bs = {1, 2, 3, 4}>
{
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  wd = DequantizeLinear <axis = 1> (wq, ws, wz)
  y = MatMul(xd, wd)
  bd = DequantizeLinear <axis = 0, block_size = 2> (bq, bs)
  z = MatMul(xd, bd)
  raw = QuantizeLinear(x, xs, uz)
  uq = QuantizeLinear(x, xr)
  ud = DequantizeLinear(uq, xr)
  shared = Relu(ud)
  mq = com.microsoft.QuantizeLinear(x, xs, xz)
}
"""


def _node(model, output: str):
    return next(n for n in model.graph if any(o.name == output for o in n.outputs))


def _value(model, name: str):
    return next(o for n in model.graph for o in n.outputs if o.name == name)


def test_a_static_activation_pair_is_one_object_with_its_parameters():
    model = parse_text(_QDQ_MODEL)
    pair = activation_pair(_value(model, "xd"))
    assert pair is not None and pair.source.name == "x"
    q, dq = pair.q, pair.dq
    assert q.is_quantize and not dq.is_quantize
    assert q.dtype == dq.dtype == DataType.INT8
    assert q.granularity == dq.granularity == "per-tensor"
    assert q.symmetric and q.constant_parameters and not q.of_constant
    assert float(q.scale_array) == np.float32(0.1) and int(q.zero_point_array) == 0
    assert dq.quantize.node is q.node  # the partners find each other
    assert [d.node for d in q.dequantizers()] == [dq.node]
    assert q.same_parameters(dq)
    assert quantized_activation(_value(model, "xd"))


def test_weights_are_seen_per_channel_or_blocked_with_their_axis():
    model = parse_text(_QDQ_MODEL)
    weight = dequantized(_value(model, "wd"))
    assert weight.of_constant and weight.quantize is None  # a stored weight has no Q partner
    assert weight.granularity == "per-channel" and weight.axis == 1 and weight.block_size == 0
    assert not weight.symmetric  # zero point [0, 1]
    assert activation_pair(_value(model, "wd")) is None and not quantized_activation(_value(model, "wd"))
    blocked = dequantized(_value(model, "bd"))
    assert blocked.granularity == "blocked" and blocked.block_size == 2 and blocked.axis == 0
    assert blocked.dtype == DataType.INT4 and blocked.zero_point is None and blocked.symmetric


def test_quantized_type_follows_output_dtype_zero_point_or_the_onnx_default():
    model = parse_text(_QDQ_MODEL)
    assert quantized_type(_node(model, "raw")) == DataType.UINT8  # from its zero point
    assert not QDQ(_node(model, "raw")).symmetric
    run_time = quantizing(_value(model, "uq"))
    assert run_time.dtype == DataType.UINT8  # no zero point: ONNX's default
    assert run_time.scale_array is None and run_time.granularity is None and not run_time.constant_parameters
    # A Q whose output is a graph output has no plain DequantizeLinear partners.
    assert QDQ(_node(model, "raw")).dequantizers() is None


def test_only_standard_domain_qdq_nodes_are_viewed():
    model = parse_text(_QDQ_MODEL)
    assert qdq(_node(model, "mq")) is None
    assert qdq(_node(model, "y")) is None and qdq(None) is None
    assert dequantized(_value(model, "y")) is None and dequantized(None) is None


def test_scalar_like_and_same_constant():
    model = parse_text(_QDQ_MODEL)
    xs, ws = model.graph.initializers["xs"], model.graph.initializers["ws"]
    assert scalar_like(np.float32(1.0).reshape(())) and scalar_like(np.ones(1)) and not scalar_like(np.ones(2))
    assert not scalar_like(None)
    assert same_constant(xs, xs) and not same_constant(xs, ws) and same_constant(None, None)


def test_the_view_reads_the_node_live_while_a_pass_rewrites_it():
    model = parse_text(_QDQ_MODEL)
    view = dequantized(_value(model, "wd"))
    view.node.replace_input_with(2, model.graph.initializers["xz"])  # a per-tensor zero point of 0
    assert view.symmetric


_RESIDUAL_MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,2,4,4] x, float[1,2,4,4] r) => (float[1,2,4,4] y, float[1,2,4,4] both, float[1,2,4,4] plain,
                                            float[1,2,4,4] shared_bn)
  <float xs = {0.1}, int8 xz = {0}, int8[2,2,1,1] wq = {1, 2, 3, 4}, float[2] ws = {0.5, 0.25}, int8[2] wz = {0, 0},
   float[2] bn_s = {1, 1}, float[2] bn_b = {0, 0}, float[2] bn_m = {0, 0}, float[2] bn_v = {1, 1}>
{
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  wd = DequantizeLinear <axis = 0> (wq, ws, wz)
  c1 = Conv(xd, wd)
  n1 = BatchNormalization(c1, bn_s, bn_b, bn_m, bn_v)
  y = Add(n1, r)
  c2 = Conv(xd, wd)
  c4 = Conv(xd, wd)
  both = Add(c2, c4)
  plain = Add(x, r)
  c3 = Conv(xd, wd)
  n3 = BatchNormalization(c3, bn_s, bn_b, bn_m, bn_v)
  shared_bn = Add(n3, c3)
}
"""


def _quantized(node) -> bool:
    return quantized_activation(node.inputs[0])


def test_the_residual_add_after_a_quantized_conv_through_its_batchnorm():
    model = parse_text(_RESIDUAL_MODEL)
    found = residual_add(_node(model, "y"), _quantized)
    assert found is not None and found.index == 1 and found.residual.name == "r"
    assert found.conv is _node(model, "c1")
    # Both inputs from quantized Convs: the second is the residual.
    both = residual_add(_node(model, "both"), _quantized)
    assert both.index == 1 and both.conv is _node(model, "c2") and both.residual.name == "c4"
    assert residual_add(_node(model, "plain"), _quantized) is None
    # The Conv's output read by the BatchNormalization and by the Add: the BatchNormalization does not fuse.
    assert fused_conv(_value(model, "n3"), _quantized) is None
    shared = residual_add(_node(model, "shared_bn"), _quantized)
    assert shared.index == 0 and shared.conv is _node(model, "c3")


def test_what_counts_as_a_quantized_conv_is_the_callers():
    model = parse_text(_RESIDUAL_MODEL)
    assert list(residual_adds(model.graph, lambda node: False)) == []
    names = [m.add.outputs[0].name for m in residual_adds(model.graph, _quantized)]
    assert names == ["y", "both", "shared_bn"]
