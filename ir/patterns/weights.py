"""The weight view: where a weighted op's weight comes from, and its axes in that constant's layout.

For a MatMul, Gemm, Conv or ConvTranspose, `weight_view(node)` follows the weight input back to a
constant through the ops in `through` (by default Transpose, DequantizeLinear and Cast) and gives
the constant, the output-channel and reduction (K) axes in the constant's own layout, and the nodes
passed through. `weight_miss(node)` says in a few words why a node has no view. Passes needing more
(a float dtype, a rank) check it on the view; none traces a weight by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from optc.ir.core import Node, Value, is_constant, transpose_perm
from optc.ir.patterns.ops import QDQ_OPS, WEIGHT_VIEW_OPS, WEIGHTED_OPS

ONNX_DOMAINS = ("", "ai.onnx")
#: Ops that keep their input's layout (a Transpose's is followed); past any other (a Reshape) the axes are unknown.
_LAYOUT_KEEPING = (*QDQ_OPS, "Transpose", "Cast", "Identity")
#: How many nodes a trace walks through at most.
MAX_DEPTH = 16


def _int_attribute(node: Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def weight_axes(node: Node, rank: int) -> tuple[int, int]:
    """(output-channel axis, reduction axis) of `node`'s weight in the layout the op reads, non-negative.

    MatMul B `[..., K, N]`: (rank-1, rank-2); Gemm B `[K, N]`, or `[N, K]` with transB: (1, 0) / (0, 1);
    Conv W `[M, C/g, ...]`: (0, 1); ConvTranspose W `[C, M/g, ...]`: (1, 0).
    """
    op = node.op_type
    if op == "Conv":
        return 0, 1
    if op == "ConvTranspose":
        return 1, 0
    if op == "Gemm":
        return (0, 1) if _int_attribute(node, "transB", 0) else (1, 0)
    if op == "MatMul":
        return rank - 1, rank - 2
    raise ValueError(f"{op} is not a weighted op")


def constant_rank(value: Value) -> int | None:
    """The rank of a constant: its shape, else its data's (an initializer or a Constant node's tensor)."""
    if value.shape is not None:
        return len(value.shape)
    if value.const_value is not None:
        return len(value.const_value.shape)
    node = value.producer()
    attr = node.attributes.get("value") if node is not None and node.op_type == "Constant" else None
    return len(attr.as_tensor().shape) if attr is not None else None


@dataclass(frozen=True)
class WeightView:
    """A weighted op's weight, traced back to its constant.

    `perm[i]` is the constant's axis that the op's weight axis i comes from (None when no Transpose
    is in the way); `out_axis` and `k_axis` are in the constant's layout (None when its rank is
    unknown or under 2, or when a node on the path, a Reshape, changes the layout). `path` holds the nodes walked through, the one nearest the op first.
    """

    node: Node
    index: int
    constant: Value
    out_axis: int | None
    k_axis: int | None
    path: tuple[Node, ...] = ()
    perm: tuple[int, ...] | None = None

    @property
    def direct(self) -> bool:
        """True when the op reads the constant itself."""
        return not self.path

    @property
    def reader(self) -> Node:
        """The node that reads the constant: the op, or the last node passed through."""
        return self.path[-1] if self.path else self.node

    @property
    def reader_index(self) -> int:
        """The input index at which `reader` reads the constant."""
        return 0 if self.path else self.index

    @property
    def through(self) -> tuple[str, ...]:
        """The op types passed through, nearest the op first."""
        return tuple(n.op_type for n in self.path)

    @property
    def dequantize(self) -> Node | None:
        """The DequantizeLinear passed through, if any."""
        return next((n for n in self.path if n.op_type == "DequantizeLinear"), None)

    @property
    def rank(self) -> int | None:
        return constant_rank(self.constant)


@dataclass(frozen=True)
class Trace:
    """A value followed back to a constant: the constant, the nodes walked through (nearest the value
    first), and `perm` (the value's axis i is the constant's axis perm[i]; None when no Transpose)."""

    constant: Value
    path: tuple[Node, ...]
    perm: tuple[int, ...] | None


def trace_back(
    value: Value, *, through: tuple[str, ...] = WEIGHT_VIEW_OPS, is_source: Callable[[Value], bool] = is_constant,
    depth: int = MAX_DEPTH,
) -> Trace | str:
    """Follow `value` back through at most `depth` standard-domain ops of `through` (each read at input 0)
    to a value `is_source` accepts; the `Trace`, or why there is none."""
    path: list[Node] = []
    perm: list[int] | None = None
    current = value
    for _ in range(depth):
        if is_source(current):
            return Trace(current, tuple(path), None if perm is None else tuple(perm))
        producer = current.producer()
        if producer is None:
            return f"weight {current.name!r} is not a constant"
        if producer.op_type not in through or producer.domain not in ONNX_DOMAINS or producer.inputs[0] is None:
            return f"weight {current.name!r} is computed by {producer.op_type}"
        if producer.op_type == "Transpose":
            source = producer.inputs[0]
            p = transpose_perm(producer, constant_rank(source) if is_source(source) else _value_rank(source))
            if p is None or (perm is not None and len(p) != len(perm)):
                return f"Transpose {producer.name!r} has no known permutation"
            perm = [p[i] for i in perm] if perm is not None else p
        path.append(producer)
        current = producer.inputs[0]
    if is_source(current):
        return Trace(current, tuple(path), None if perm is None else tuple(perm))
    return f"weight {value.name!r} is more than {depth} nodes from a constant"


def _trace(
    node: Node, through: tuple[str, ...], is_source: Callable[[Value], bool], ops: tuple[str, ...],
) -> WeightView | str:
    """The view of `node`'s weight, or why there is none."""
    if node.op_type not in ops or node.domain not in ONNX_DOMAINS:
        return f"{node.op_type} is not a weighted op"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return f"{node.op_type} lacks an input"
    if is_constant(node.inputs[0]):
        return "its data input is a constant"
    found = trace_back(node.inputs[1], through=through, is_source=is_source)
    if isinstance(found, str):
        return found
    rank = constant_rank(found.constant)
    perm = found.perm
    out_axis = k_axis = None
    layout_known = all(n.op_type in _LAYOUT_KEEPING for n in found.path)
    if layout_known and rank is not None and rank >= 2 and (perm is None or len(perm) == rank):
        out, k = weight_axes(node, rank)
        out_axis, k_axis = (out, k) if perm is None else (perm[out], perm[k])
    return WeightView(node, 1, found.constant, out_axis, k_axis, found.path, perm)


def _value_rank(value: Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def weight_view(
    node: Node, *, through: tuple[str, ...] = WEIGHT_VIEW_OPS, is_source: Callable[[Value], bool] = is_constant,
    ops: tuple[str, ...] = WEIGHTED_OPS,
) -> WeightView | None:
    """The view of `node`'s weight (an op of `ops`), traced through the ops in `through`; None when none.

    `is_source` says what counts as the constant at the end (an initializer by default).
    """
    found = _trace(node, through, is_source, ops)
    return found if isinstance(found, WeightView) else None


def weight_miss(
    node: Node, *, through: tuple[str, ...] = WEIGHT_VIEW_OPS, is_source: Callable[[Value], bool] = is_constant,
    ops: tuple[str, ...] = WEIGHTED_OPS,
) -> str | None:
    """Why `weight_view` finds no weight for `node` (same arguments), or None when it finds one."""
    found = _trace(node, through, is_source, ops)
    return None if isinstance(found, WeightView) else found


__all__ = ["MAX_DEPTH", "ONNX_DOMAINS", "Trace", "WeightView", "constant_rank", "trace_back", "weight_axes", "weight_miss", "weight_view"]
