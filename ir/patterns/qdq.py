"""The Q/DQ view: a QuantizeLinear or DequantizeLinear node, and a Q → DQ pair, seen as one object.

`qdq(node)` answers for a standard-domain Q/DQ node: its input, scale and zero point (and their
constant values), the quantized element type, axis, block size, granularity (per tensor, per
channel, blocked), whether it is symmetric, and its partner (the Q a DequantizeLinear reads, the
DequantizeLinear nodes a QuantizeLinear feeds). `activation_pair(value)` is the static Q → DQ of an
activation that `value` is read through. The view reads the node every time it is asked, so it stays
right while a pass rewrites the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.ir.core import DataType, Node, Value
from optc.ir.patterns.match import ONNX_DOMAINS, const_value, input_at, int_attr, is_const, producer

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"

Granularity = Literal["per-tensor", "per-channel", "blocked"]


def scalar_like(array: np.ndarray | None) -> bool:
    """A scale of one element (per tensor); False for None (a run-time scale)."""
    return array is not None and (array.ndim == 0 or (array.size == 1 and array.ndim == 1))


def same_constant(a: Value | None, b: Value | None) -> bool:
    """The same value, or two constants of equal dtype, shape and contents (two absent values are equal)."""
    if a is b:
        return True
    x, y = const_value(a), const_value(b)
    if x is None or y is None:
        return a is None and b is None
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x.astype(np.float64), y.astype(np.float64)))


def quantized_type(node: Node) -> DataType | None:
    """The quantized element type of a QuantizeLinear (its output) or DequantizeLinear (its input).

    A QuantizeLinear: `output_dtype`, else its zero point's type, else UINT8 (ONNX's default without a
    zero point). A DequantizeLinear: its input's type, else that of the QuantizeLinear producing it.
    """
    if node.op_type == QUANTIZE:
        out_dtype = int_attr(node, "output_dtype", 0)
        if out_dtype:
            return DataType(out_dtype)
        zp = input_at(node, 2)
        if zp is not None:
            if zp.const_value is not None:
                return zp.const_value.dtype
            if zp.dtype is not None:
                return zp.dtype
            array = const_value(zp)
            if array is not None:
                return _numpy_to_dtype(array)
        return DataType.UINT8
    data = node.inputs[0] if node.inputs else None
    if data is None:
        return None
    if data.const_value is not None:
        return data.const_value.dtype
    if data.dtype is not None:
        return data.dtype
    q = producer(data, QUANTIZE)
    return quantized_type(q) if q is not None else None


def _numpy_to_dtype(array: np.ndarray) -> DataType | None:
    try:
        return DataType.from_numpy(array.dtype)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class QDQ:
    """A standard-domain QuantizeLinear or DequantizeLinear node, read through one interface."""

    node: Node

    @property
    def is_quantize(self) -> bool:
        return self.node.op_type == QUANTIZE

    @property
    def input(self) -> Value | None:
        """The data input: a float tensor for a Q, the quantized tensor for a DQ."""
        return self.node.inputs[0] if self.node.inputs else None

    @property
    def output(self) -> Value:
        return self.node.outputs[0]

    @property
    def scale(self) -> Value | None:
        return input_at(self.node, 1)

    @property
    def zero_point(self) -> Value | None:
        return input_at(self.node, 2)

    @property
    def scale_array(self) -> np.ndarray | None:
        """The scale's constant value; None when it is computed at run time."""
        return const_value(self.scale)

    @property
    def zero_point_array(self) -> np.ndarray | None:
        """The zero point's constant value; None when it is absent or computed."""
        return const_value(self.zero_point)

    @property
    def dtype(self) -> DataType | None:
        """The quantized element type (`quantized_type`)."""
        return quantized_type(self.node)

    @property
    def axis(self) -> int:
        """The `axis` attribute as written (ONNX's default 1), not normalized to the data's rank."""
        return int_attr(self.node, "axis", 1)

    @property
    def block_size(self) -> int:
        return int_attr(self.node, "block_size", 0)

    @property
    def granularity(self) -> Granularity | None:
        """Per tensor, per channel or blocked; None when the scale is not a constant."""
        if self.block_size:
            return "blocked"
        scale = self.scale_array
        if scale is None:
            return None
        return "per-tensor" if scalar_like(scale) else "per-channel"

    @property
    def symmetric(self) -> bool:
        """No zero point, or a constant one that is zero everywhere."""
        zp = self.zero_point
        if zp is None:
            return True
        array = const_value(zp)
        return array is not None and not np.any(array.astype(np.float64) != 0)

    @property
    def constant_parameters(self) -> bool:
        """A constant scale and a constant (or absent) zero point."""
        zp = self.zero_point
        return is_const(self.scale) and (zp is None or is_const(zp))

    @property
    def of_constant(self) -> bool:
        """The data input is a constant: a stored weight, not an activation."""
        return is_const(self.input)

    @property
    def quantize(self) -> QDQ | None:
        """A DequantizeLinear's partner: the QuantizeLinear producing its input; None for a Q or a stored weight."""
        if self.is_quantize:
            return None
        q = producer(self.input, QUANTIZE)
        return QDQ(q) if q is not None else None

    def dequantizers(self, uses: list | None = None) -> list[QDQ] | None:
        """A QuantizeLinear's partners: the DequantizeLinear nodes reading its output, when nothing else reads it.

        None when the output is a graph output, or reaches anything but a standard DequantizeLinear's data
        input. `uses` restricts the readers considered (a pass that has already detached some).
        """
        out = self.output
        if out.is_graph_output():
            return None
        readers = list(out.uses()) if uses is None else uses
        if any(u.node.op_type != DEQUANTIZE or u.node.domain not in ONNX_DOMAINS or u.idx != 0 for u in readers):
            return None
        return [QDQ(u.node) for u in readers]

    def same_parameters(self, other: QDQ) -> bool:
        """Equal scale and zero point (constants compared by value) and the same quantized type."""
        return (same_constant(self.scale, other.scale) and same_constant(self.zero_point, other.zero_point)
                and self.dtype == other.dtype)


def qdq(node: Node | None) -> QDQ | None:
    """The Q/DQ view of a standard-domain QuantizeLinear or DequantizeLinear node, else None."""
    if node is None or node.op_type not in (QUANTIZE, DEQUANTIZE) or node.domain not in ONNX_DOMAINS:
        return None
    return QDQ(node)


def dequantized(value: Value | None) -> QDQ | None:
    """The DequantizeLinear producing `value`, as a view; None when a DequantizeLinear does not produce it."""
    node = producer(value, DEQUANTIZE)
    return QDQ(node) if node is not None else None


def quantizing(value: Value | None) -> QDQ | None:
    """The QuantizeLinear producing `value`, as a view; None when a QuantizeLinear does not produce it."""
    node = producer(value, QUANTIZE)
    return QDQ(node) if node is not None else None


@dataclass(frozen=True)
class QDQPair:
    """An activation's static QuantizeLinear → DequantizeLinear: `source` is what the Q quantizes."""

    q: QDQ
    dq: QDQ

    @property
    def source(self) -> Value:
        return self.q.input


def activation_pair(value: Value | None) -> QDQPair | None:
    """The pair when `value` is DequantizeLinear(QuantizeLinear(x)) of a computed (non-constant) x, else None."""
    dq = dequantized(value)
    q = dq.quantize if dq is not None else None
    if q is None or q.input is None or is_const(q.input):
        return None
    return QDQPair(q, dq)


def quantized_activation(value: Value | None) -> bool:
    """`value` is a DequantizeLinear's output whose quantized input is computed (an activation, not a weight)."""
    dq = dequantized(value)
    return dq is not None and not is_const(dq.input)


__all__ = [
    "DEQUANTIZE", "QDQ", "QUANTIZE", "Granularity", "QDQPair", "activation_pair", "dequantized", "qdq",
    "quantized_activation", "quantized_type", "quantizing", "same_constant", "scalar_like",
]
