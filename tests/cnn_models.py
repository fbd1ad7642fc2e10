"""A small random CNN for the TensorRT tests and benchmark.

`small_cnn(seed)` returns an `onnx.ModelProto` (opset 21, checked) on input
`x` `[batch, 3, 16, 16]` with output `logits` `[batch, 10]` (W = `width`, 16):

    stem:     Conv 3→W (3x3) → BatchNormalization → Relu                      = a
    residual: Conv W→W → BN → Relu → Conv W→W → BN → Add(·, a) → Relu          = b
    branches: Conv W→W (1x1) → Relu ‖ Conv W→W (3x3) → Relu → Concat (2W ch)
    down:     MaxPool 2x2 → Conv 2W→2W (3x3) → Relu → AveragePool 2x2
    head:     GlobalAveragePool → Flatten → Gemm(transB=1) 2W→10

The default width gives every Conv but the 3-channel stem the 16 channels
TensorRT's FP8 convolutions need (`optc.passes.fp8_convs`), so the FP8
variant quantizes all of them but the stem.

BatchNorm is left unfolded (TensorRT fuses Conv+BN+ReLU itself). Weights are
seeded (He-scaled normal), so the same seed gives byte-identical models.
`cnn_feeds(seed, batch)` makes matching inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import models


def _conv(rng: np.random.Generator, name: str, cin: int, cout: int, k: int) -> list[TensorProto]:
    w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
    return [numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
            numpy_helper.from_array((0.05 * rng.standard_normal(cout)).astype(np.float32), f"{name}.bias")]


def _bn(rng: np.random.Generator, name: str, c: int) -> list[TensorProto]:
    return [
        numpy_helper.from_array((1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32), f"{name}.weight"),
        numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"{name}.bias"),
        numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"{name}.running_mean"),
        numpy_helper.from_array((1.0 + 0.2 * rng.random(c)).astype(np.float32), f"{name}.running_var"),
    ]


def _conv_node(name: str, x: str, out: str, k: int) -> onnx.NodeProto:
    pad = k // 2
    return helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, pads=[pad] * 4, kernel_shape=[k, k])


def _bn_node(name: str, x: str, out: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *(f"{name}.{p}" for p in ("weight", "bias", "running_mean", "running_var"))],
                            [out], name=name, epsilon=1e-5)


def small_cnn(seed: int = 0, *, size: int = 16, width: int = 16) -> onnx.ModelProto:
    """The CNN of the module docstring."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    w = width
    inits += _conv(rng, "stem.conv", 3, w, 3) + _bn(rng, "stem.bn", w)
    inits += _conv(rng, "block.conv1", w, w, 3) + _bn(rng, "block.bn1", w)
    inits += _conv(rng, "block.conv2", w, w, 3) + _bn(rng, "block.bn2", w)
    inits += _conv(rng, "branch1.conv", w, w, 1) + _conv(rng, "branch3.conv", w, w, 3)
    inits += _conv(rng, "down.conv", 2 * w, 2 * w, 3)
    inits.append(numpy_helper.from_array((rng.standard_normal((10, 2 * w)) / np.sqrt(2 * w)).astype(np.float32), "fc.weight"))
    inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(10)).astype(np.float32), "fc.bias"))
    nodes = [
        _conv_node("stem.conv", "x", "stem_conv", 3), _bn_node("stem.bn", "stem_conv", "stem_bn"),
        helper.make_node("Relu", ["stem_bn"], ["a"], name="stem.relu"),
        _conv_node("block.conv1", "a", "block_conv1", 3), _bn_node("block.bn1", "block_conv1", "block_bn1"),
        helper.make_node("Relu", ["block_bn1"], ["block_relu1"], name="block.relu1"),
        _conv_node("block.conv2", "block_relu1", "block_conv2", 3), _bn_node("block.bn2", "block_conv2", "block_bn2"),
        helper.make_node("Add", ["block_bn2", "a"], ["block_sum"], name="block.add"),
        helper.make_node("Relu", ["block_sum"], ["b"], name="block.relu2"),
        _conv_node("branch1.conv", "b", "branch1_conv", 1),
        helper.make_node("Relu", ["branch1_conv"], ["branch1"], name="branch1.relu"),
        _conv_node("branch3.conv", "b", "branch3_conv", 3),
        helper.make_node("Relu", ["branch3_conv"], ["branch3"], name="branch3.relu"),
        helper.make_node("Concat", ["branch1", "branch3"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["pooled"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        _conv_node("down.conv", "pooled", "down_conv", 3),
        helper.make_node("Relu", ["down_conv"], ["down"], name="down.relu"),
        helper.make_node("AveragePool", ["down"], ["down_avg"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["down_avg"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return models.make_model(nodes, inputs, outputs, inits, name="small_cnn")


def cnn_feeds(seed: int = 0, *, batch: int = 4, size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


__all__ = ["cnn_feeds", "small_cnn"]
