"""`cse`: common-subexpression elimination."""

from __future__ import annotations

import dataclasses

from optc.ir import (
    NONDETERMINISTIC_OPS,
    AttributeType,
    DataType,
    ExternalTensor,
    Graph,
    Model,
    Node,
    Value,
)
from optc.passes.infra.analysis import ACTIVATIONS, AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass


@register_pass("cse")
class CommonSubexpressionElimination(Pass):
    """Merge duplicate nodes (same op, attributes and inputs) and duplicate small constants."""

    @dataclasses.dataclass
    class Options:
        constant_bytes: int = option(65536, help="merge identical initializers up to this size in bytes", at_least=0)

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        merged_constants = _merge_duplicate_constants(graph, self.options.constant_bytes)
        outputs = {id(v) for v in graph.outputs}
        seen: dict[tuple, Node] = {}
        merged: list[Node] = []
        for node in list(graph):
            key = _node_key(node)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if any(id(o) in outputs for o in node.outputs):
                # A graph output keeps its own name; merge the other way round only if safe.
                continue
            for old, new in zip(node.outputs, first.outputs, strict=True):
                old.replace_all_uses_with(new)
            merged.append(node)
        if merged:
            graph.remove(merged, safe=True)
        modified = bool(merged or merged_constants)
        preserved = PreservedAnalyses().preserve_aspects(ACTIVATIONS)
        stats = {"nodes-merged": len(merged), "initializers-merged": merged_constants}
        return PassResult(model, modified, preserved if modified else None, stats)


def _node_key(node: Node) -> tuple | None:
    """A hashable identity for the computation a node performs, or None if it must not merge."""
    if node.op_type in NONDETERMINISTIC_OPS and node.domain in ("", "ai.onnx"):
        return None
    attrs = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (AttributeType.GRAPH, AttributeType.GRAPHS):
            return None  # subgraph equality is not worth deciding here
        attrs.append((name, _attr_value(attr)))
    inputs = tuple(_input_key(v) for v in node.inputs)
    return (node.domain, node.op_type, node.overload, len(node.outputs), inputs, tuple(attrs))


def _input_key(value: Value | None) -> object:
    return None if value is None else id(value)


def _attr_value(attr) -> object:
    if attr.type == AttributeType.TENSOR:
        return _tensor_key(attr.value)
    if attr.type == AttributeType.TENSORS:
        return tuple(_tensor_key(t) for t in attr.value)
    value = attr.value
    return tuple(value) if isinstance(value, list) else value


def _tensor_key(data) -> tuple:
    """Dtype, shape and contents of a tensor (string tensors have no raw bytes)."""
    content = tuple(data.string_data()) if data.dtype == DataType.STRING else data.tobytes()
    return ("tensor", data.dtype, tuple(data.shape), content)


def _merge_duplicate_constants(graph: Graph, max_bytes: int) -> int:
    """Make identical small in-memory initializers one value; returns how many were merged."""
    graph_io = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    first: dict[tuple, Value] = {}
    duplicates: list[str] = []
    for name, value in graph.initializers.items():
        data = value.const_value
        if data is None or isinstance(data, ExternalTensor) or data.nbytes > max_bytes or id(value) in graph_io:
            continue
        # Annotations (an original parameter name, quantization parameters) are part of the identity.
        key = (_tensor_key(data), tuple(sorted(value.metadata_props.items())))
        kept = first.setdefault(key, value)
        if kept is not value:
            value.replace_all_uses_with(kept)
            duplicates.append(name)
    for name in duplicates:
        graph.initializers.pop(name)
    return len(duplicates)
