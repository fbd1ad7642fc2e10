"""`lower-ort-fp8`: a Relu before an FP8 quantizer moves after the pair; onnxruntime then computes the graph as written."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc.backends.base import get_backend
from optc.ir import from_proto, to_proto
from optc.passes import get_pass
from tests.passes import builders as b

FLOAT = TensorProto.FLOAT


def relu_fp8_conv(zero_type: int = TensorProto.FLOAT8E4M3FN, scale: float = 0.02, shared_relu: bool = False) -> onnx.ModelProto:
    """x → Conv → Relu → Q/DQ (zero point of `zero_type`) → Conv → y; `shared_relu`: the Relu also feeds an output."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((4, 16, 1, 1)).astype(np.float32) * 0.5
    if zero_type in (TensorProto.UINT8, TensorProto.INT8):
        zero = helper.make_tensor("zp", zero_type, [], [0])
    else:
        zero = helper.make_tensor("zp", zero_type, [], [0.0])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["rq"], name="q"),
        helper.make_node("DequantizeLinear", ["rq", "s", "zp"], ["rdq"], name="dq"),
        helper.make_node("Conv", ["rdq", "w2"], ["y"], name="conv2"),
    ]
    outputs = [helper.make_tensor_value_info("y", FLOAT, None)]
    if shared_relu:
        outputs.append(helper.make_tensor_value_info("r", FLOAT, None))
    graph = helper.make_graph(
        nodes, "relu_fp8", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 6, 6])], outputs,
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                     numpy_helper.from_array(np.float32(scale), "s"), zero],
    )
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), strict_mode=True)


def _run(proto: onnx.ModelProto, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    return session.run(["y"], {"x": x})[0]


def test_moves_the_relu_after_the_dequantize_and_onnxruntime_then_computes_it_as_written() -> None:
    proto = relu_fp8_conv()
    written = _run(proto, optimize=False)  # what the graph means: Relu, then the FP8 pair
    result = b.run(from_proto(proto), "lower-ort-fp8")
    assert result.modified and result.statistics == {"relus-moved": 1}
    nodes = [(n.op_type, n.name) for n in result.model.graph]
    assert [op for op, _ in nodes] == ["Conv", "QuantizeLinear", "DequantizeLinear", "Relu", "Conv"]
    lowered = to_proto(result.model)
    onnx.checker.check_model(lowered)
    # The rewrite is exact, and onnxruntime's default optimizations keep it so.
    np.testing.assert_array_equal(_run(lowered, optimize=False), written)
    np.testing.assert_array_equal(_run(lowered, optimize=True), written)


def test_the_graph_it_fixes_is_one_onnxruntime_gets_wrong() -> None:
    """The reason for the pass: with default optimizations onnxruntime drops the Relu before the FP8 quantizer.
    When an onnxruntime release fixes `ReluQuantRewrite` this fails, and the pass can go."""
    proto = relu_fp8_conv()
    assert not np.allclose(_run(proto, optimize=True), _run(proto, optimize=False), atol=1e-3)


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [("uint8 zero point", {"zero_type": TensorProto.UINT8}), ("negative scale", {"scale": -0.02}),
     ("Relu read elsewhere", {"shared_relu": True})],
)
def test_leaves_other_graphs_alone(case: str, kwargs: dict) -> None:
    proto = relu_fp8_conv(**kwargs)
    result = b.run(from_proto(proto), "lower-ort-fp8")
    assert not result.modified, case
    assert [n.op_type for n in result.model.graph] == ["Conv", "Relu", "QuantizeLinear", "DequantizeLinear", "Conv"]


def test_registered_and_in_the_ort_backends_legalization() -> None:
    assert get_pass("lower-ort-fp8").__name__ == "LowerOrtFp8"
    assert "lower-ort-fp8" in get_backend("ort").legalize.split(",")
