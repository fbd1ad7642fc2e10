"""The IR verifier: SSA, topological order, known ops, dtype/shape consistency, annotation types.

`verify(model)` raises `VerificationError` listing every problem found;
`problems(model)` returns them. `check_onnx(model)` additionally runs
`onnx.checker` on the exported protobuf. Neither reads weight data: types and
shapes of initializers come from tensor metadata, so verifying a memory-mapped
multi-gigabyte model costs no I/O.
"""

from __future__ import annotations

import functools

import onnx
import onnx.defs
import onnx.helper

from optc.errors import VerificationError
from optc.ir.annotations import annotation_problems
from optc.ir.core import Graph, Model, Value, node_label


def problems(model: Model) -> list[str]:
    """Every invariant the model breaks, as short messages naming nodes and values."""
    found: list[str] = []
    graph = model.graph
    opsets = dict(graph.opset_imports)
    if "" not in opsets and "ai.onnx" not in opsets:
        found.append("graph imports no default ONNX opset")
    _check_opsets(opsets, found)
    found += annotation_problems(model, "model")
    _check_graph(graph, opsets, found, set())
    return found


def _check_opsets(opsets: dict[str, int], found: list[str]) -> None:
    """Every imported opset version must exist: 1 up to the newest this onnx knows (ai.onnx and ai.onnx.ml)."""
    newest = _newest_opsets()
    for domain, version in opsets.items():
        shown = domain or "ai.onnx"
        if not isinstance(version, int) or version < 1:
            found.append(f"opset import {shown!r} has version {version}, not a positive number")
        elif domain in newest and version > newest[domain]:
            found.append(f"opset import {shown!r} version {version} does not exist (the newest is {newest[domain]})")


@functools.cache
def _newest_opsets() -> dict[str, int]:
    """The newest opset of each standard domain that the installed onnx defines."""
    ml = onnx.helper.VERSION_TABLE[-1][3]  # (release, IR version, ai.onnx, ai.onnx.ml, ...)
    default = onnx.defs.onnx_opset_version()
    return {"": default, "ai.onnx": default, "ai.onnx.ml": ml}


def _check_graph(graph: Graph, opsets: dict[str, int], found: list[str], outer: set[int]) -> None:
    defined: set[int] = set(outer)
    names: dict[str, Value] = {}

    def define(value: Value, where: str) -> None:
        if value.name:
            other = names.get(value.name)
            if other is not None and other is not value:
                found.append(f"value name {value.name!r} is defined twice ({where})")
            names[value.name] = value
        defined.add(id(value))
        found.extend(annotation_problems(value, f"value {value.name!r}"))

    for value in graph.inputs:
        define(value, "graph input")
    for name, value in graph.initializers.items():
        if value.name != name:
            found.append(f"initializer registered as {name!r} but named {value.name!r}")
        if value.const_value is None:
            found.append(f"initializer {name!r} has no data")
        else:
            _check_initializer(value, found)
        define(value, "initializer")

    for node in graph:
        label = node_label(node)
        if node.graph is not graph:
            found.append(f"node {label} belongs to another graph")
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if id(value) not in defined:
                producer = value.producer()
                if producer is not None and producer.graph is graph:
                    found.append(
                        f"node {label} uses {value.name!r} before its producer "
                        f"{node_label(producer)} (not in topological order)"
                    )
                else:
                    found.append(f"node {label} input {index} ({value.name!r}) is not defined")
        _check_schema(node, opsets, found)
        found.extend(annotation_problems(node, f"node {label}"))
        for attr in node.attributes.values():
            for sub in _subgraphs(attr):
                _check_graph(sub, opsets, found, defined)
        for value in node.outputs:
            if value.producer() is not node:
                found.append(f"output {value.name!r} of node {label} has another producer")
            define(value, f"output of {label}")

    for index, value in enumerate(graph.outputs):
        if id(value) not in defined:
            found.append(f"graph output {index} ({value.name!r}) is not produced by any node")
        if not value.name:
            found.append(f"graph output {index} has no name")


def _subgraphs(attr) -> list[Graph]:
    from optc.ir.core import AttributeType

    if attr.type == AttributeType.GRAPH:
        return [attr.value]
    if attr.type == AttributeType.GRAPHS:
        return list(attr.value)
    return []


def _check_initializer(value: Value, found: list[str]) -> None:
    data = value.const_value
    if value.dtype is not None and data.dtype != value.dtype:
        found.append(f"initializer {value.name!r} is typed {value.dtype.name} but holds {data.dtype.name}")
    if value.shape is not None and data.shape is not None:
        declared = [d if isinstance(d, int) else None for d in value.shape]
        actual = list(data.shape)
        if len(declared) != len(actual) or any(d is not None and d != a for d, a in zip(declared, actual, strict=False)):
            found.append(f"initializer {value.name!r} has shape {actual} but is declared {list(value.shape)}")


def _check_schema(node, opsets: dict[str, int], found: list[str]) -> None:
    domain = node.domain or ""
    if domain not in ("", "ai.onnx"):
        if domain not in opsets:
            found.append(f"node {node_label(node)}: domain {domain!r} of {node.op_type} is not imported (no opset import)")
        return  # custom domains (com.microsoft, plugins) are checked by their runtime
    version = opsets.get(domain, opsets.get("ai.onnx"))
    if version is None:
        return
    label = node_label(node)
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        found.append(f"node {label}: unknown op {node.op_type!r} in opset {version}")
        return
    n_in = len(node.inputs)
    while n_in and node.inputs[n_in - 1] is None:
        n_in -= 1
    if n_in < schema.min_input or n_in > schema.max_input:
        found.append(
            f"node {label}: {node.op_type} takes {schema.min_input}..{schema.max_input} inputs, has {n_in}"
        )
    n_out = len(node.outputs)
    if n_out < schema.min_output or n_out > schema.max_output:
        found.append(
            f"node {label}: {node.op_type} has {schema.min_output}..{schema.max_output} outputs, has {n_out}"
        )
    for name in node.attributes:
        if name not in schema.attributes:
            found.append(f"node {label}: {node.op_type} has no attribute {name!r}")
    for name, attr in schema.attributes.items():
        if attr.required and name not in node.attributes:
            found.append(f"node {label}: {node.op_type} needs attribute {name!r}")


def verify(model: Model, where: str = "") -> None:
    """Raise `VerificationError` if the model breaks any IR invariant."""
    found = problems(model)
    if found:
        raise VerificationError(found, where)


def check_onnx(model: Model) -> None:
    """Run `onnx.checker` on the serialized model (weights are not read)."""
    from optc.ir.io import to_proto

    proto = to_proto(model)
    # The checker would open external files relative to the cwd (their presence
    # and size were checked on load) and rejects a tensor with no data, so
    # external initializers are checked as typed graph inputs instead.
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        inputs = {v.name for v in proto.graph.input}
        kept = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        for tensor in external:
            if tensor.name not in inputs:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise VerificationError([str(exc).strip().splitlines()[0]], "(onnx.checker)") from exc
