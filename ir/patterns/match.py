"""Small matching primitives the pattern views share: standard-domain producers, constants, attributes."""

from __future__ import annotations

import numpy as np

from optc.ir.core import Node, Value, constant_array, is_constant

#: The ONNX default domain, spelled both ways.
ONNX_DOMAINS: tuple[str, ...] = ("", "ai.onnx")


def producer(value: Value | None, op_type: str | tuple[str, ...]) -> Node | None:
    """The node producing `value` if it is a standard-domain `op_type` (one name or several), else None."""
    if value is None:
        return None
    node = value.producer()
    types = (op_type,) if isinstance(op_type, str) else op_type
    if node is None or node.op_type not in types or node.domain not in ONNX_DOMAINS:
        return None
    return node


def _constant_node(value: Value) -> Node | None:
    node = value.producer()
    return node if node is not None and node.op_type == "Constant" and node.domain in ONNX_DOMAINS else None


def const_value(value: Value | None) -> np.ndarray | None:
    """The array of an initializer (not a graph input) or a `Constant` node's output; None for anything computed."""
    array = constant_array(value)
    if array is not None or value is None:
        return array
    node = _constant_node(value)
    attr = node.attributes.get("value") if node is not None else None
    return attr.as_tensor().numpy() if attr is not None else None


def is_const(value: Value | None) -> bool:
    """True for an initializer no graph input overrides, or a `Constant` node's output."""
    return is_constant(value) or (value is not None and _constant_node(value) is not None)


def int_attr(node: Node, name: str, default: int) -> int:
    """An integer attribute of `node`, or `default` when it is absent."""
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def input_at(node: Node, index: int) -> Value | None:
    """The node's input `index`, or None when it is absent (optional inputs may be left off)."""
    return node.inputs[index] if len(node.inputs) > index else None


__all__ = ["ONNX_DOMAINS", "const_value", "input_at", "int_attr", "is_const", "producer"]
