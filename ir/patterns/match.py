"""Small matching primitives the pattern views share: standard-domain producers, constants, attributes."""

from __future__ import annotations

import numpy as np

from optc.ir.core import Node, Value

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


def const_value(value: Value | None) -> np.ndarray | None:
    """The array of an initializer (not a graph input) or a `Constant` node's output; None for anything computed."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def is_const(value: Value | None) -> bool:
    """True for an initializer no graph input overrides, or a `Constant` node's output."""
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True
    node = value.producer()
    return node is not None and node.op_type == "Constant" and node.domain in ONNX_DOMAINS


def int_attr(node: Node, name: str, default: int) -> int:
    """An integer attribute of `node`, or `default` when it is absent."""
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def input_at(node: Node, index: int) -> Value | None:
    """The node's input `index`, or None when it is absent (optional inputs may be left off)."""
    return node.inputs[index] if len(node.inputs) > index else None


__all__ = ["ONNX_DOMAINS", "const_value", "input_at", "int_attr", "is_const", "producer"]
