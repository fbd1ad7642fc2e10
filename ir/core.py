"""The IR's core types and small construction helpers.

optc's IR is built on onnx-ir: ONNX op vocabulary and semantics, lazy
memory-mapped external tensors, use-def navigation (`Value.producer()`,
`Value.consumers()`, `Value.replace_all_uses_with()`), stable names and
`metadata_props` that survive serialization. The rest of optc imports these
types from `optc.ir`, never from onnx-ir directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as _oir
from onnx_ir import (  # noqa: F401 - re-exported: the rest of optc takes these types from optc.ir
    Attr,
    AttributeType,
    DataType,
    ExternalTensor,
    Graph,
    LazyTensor,
    Model,
    Node,
    Shape,
    SymbolicDim,
    Tensor,
    TensorProtocol,
    TensorType,
    Value,
)

#: Opset of the default ONNX domain that optc emits (21 makes blocked
#: DequantizeLinear, INT4 and FP8 first-class).
DEFAULT_OPSET = 21
DEFAULT_IR_VERSION = 10

#: Ops whose outputs differ between two runs with the same inputs; never merged or folded.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


def tensor(array: np.ndarray | Sequence, name: str = "") -> Tensor:
    """Wrap a numpy array (or nested sequence) as an in-memory IR tensor."""
    return _oir.tensor(np.asarray(array), name=name or None)


def make_value(name: str, dtype: DataType | None = None, shape: Sequence[int | str | None] | None = None) -> Value:
    """A value with an optional tensor type and shape (strings are symbolic dimensions)."""
    return Value(
        name=name,
        type=TensorType(dtype) if dtype is not None else None,
        shape=Shape(list(shape)) if shape is not None else None,
    )


def make_node(
    op_type: str,
    inputs: Iterable[Value | None],
    *,
    attributes: dict[str, object] | None = None,
    num_outputs: int = 1,
    name: str | None = None,
    domain: str = "",
    output_names: Sequence[str] | None = None,
) -> Node:
    """Create a node; attribute values are converted from plain Python values."""
    attrs = [_oir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items()]
    node = Node(domain, op_type, list(inputs), attributes=attrs, num_outputs=num_outputs, name=name)
    for value, out_name in zip(node.outputs, output_names or (), strict=False):
        value.name = out_name
    return node


def add_initializer(graph: Graph, name: str, array: np.ndarray | Tensor) -> Value:
    """Register a constant as a graph initializer and return its value."""
    data = array if isinstance(array, _oir.TensorProtocol) else tensor(array, name=name)
    value = Value(name=name, shape=Shape(list(data.shape)), type=TensorType(data.dtype), const_value=data)
    graph.register_initializer(value)
    return value


def constant_array(value: Value | None) -> np.ndarray | None:
    """The numpy value of a constant (an initializer that is not a graph input), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def is_constant(value: Value | None) -> bool:
    """True for an initializer that no graph input can override."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


def unique_name(graph: Graph, base: str) -> str:
    """A value name not yet used in the graph, derived from `base`."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken |= {o.name for n in graph for o in n.outputs}
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def node_label(node: Node) -> str:
    """A stable label for messages: the node name, else its first output's name."""
    if node.name:
        return node.name
    first = next((o.name for o in node.outputs if o.name), None)
    return f"{node.op_type}:{first}" if first else node.op_type


def transpose_perm(node: Node, rank: int | None = None) -> list[int] | None:
    """A Transpose's permutation: its `perm`, or the axis reversal ONNX defaults to (which needs `rank`)."""
    attr = node.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    return list(range(rank))[::-1] if rank else None


def sole_transpose(value: Value | None) -> tuple[Node, list[int] | None] | None:
    """(the Transpose, its permutation) when `value` is a standard Transpose's output that exactly one node
    reads and no graph output is: the Transpose can be rewritten with its reader. Else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return None
    if value.is_graph_output() or len(list(value.uses())) != 1:
        return None
    source = node.inputs[0]
    return node, transpose_perm(node, len(source.shape) if source.shape is not None else None)


def initializer_bytes(graph: Graph) -> int:
    """Total size in bytes of the graph's initializers (read from metadata, not data)."""
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
