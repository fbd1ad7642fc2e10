"""The residual matcher: an Add of a quantized Conv's output and another activation (the residual).

TensorRT fuses such an Add into the Conv when the residual is read through a Q/DQ (its Q/DQ
placement rules); `quantize` places that Q/DQ, `trt-check` warns when it is missing and
`lower-tensorrt` adds it. All three find the Add here. What "quantized Conv" means is the
caller's: a Conv `quantize` is about to quantize, or one whose activation is already Q/DQ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from optc.ir.core import Node, Value
from optc.ir.patterns.match import ONNX_DOMAINS, is_const, producer

#: Convolutions whose output a residual Add can be fused into.
FUSABLE_CONVS: tuple[str, ...] = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class ResidualAdd:
    """An Add that TensorRT fuses into `conv`: input `index` of `add` is the residual, `residual` its value."""

    add: Node
    index: int
    residual: Value
    conv: Node


def fused_conv(value: Value | None, is_quantized_conv: Callable[[Node], bool]) -> Node | None:
    """The quantized Conv producing `value`, directly or through a BatchNormalization that is its only reader."""
    node = producer(value, (*FUSABLE_CONVS, "BatchNormalization"))
    if node is not None and node.op_type == "BatchNormalization":
        node = producer(node.inputs[0], FUSABLE_CONVS)
        if node is not None and len(list(node.outputs[0].uses())) != 1:
            return None
    if node is None or not is_quantized_conv(node):
        return None
    return node


def residual_add(add: Node, is_quantized_conv: Callable[[Node], bool]) -> ResidualAdd | None:
    """`add` as a residual Add after a quantized Conv, else None.

    Both inputs must be computed. When both come from quantized Convs, the second input is taken as the
    residual: TensorRT's placement rules need only one of them quantized.
    """
    if add.op_type != "Add" or add.domain not in ONNX_DOMAINS or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if a is None or b is None or is_const(a) or is_const(b):
        return None
    convs = [fused_conv(a, is_quantized_conv), fused_conv(b, is_quantized_conv)]
    if not any(convs):
        return None
    index = 1 if convs[0] else 0
    return ResidualAdd(add, index, add.inputs[index], convs[1 - index])


def residual_adds(nodes: Iterable[Node], is_quantized_conv: Callable[[Node], bool]) -> Iterator[ResidualAdd]:
    """Every residual Add among `nodes` (a graph, in its order)."""
    for node in nodes:
        found = residual_add(node, is_quantized_conv)
        if found is not None:
            yield found


__all__ = ["FUSABLE_CONVS", "ResidualAdd", "fused_conv", "residual_add", "residual_adds"]
