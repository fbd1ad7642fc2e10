"""`fold-constants`: evaluate nodes whose inputs are all constants."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.reference
import onnx.shape_inference

from optc.ir import (
    NONDETERMINISTIC_OPS,
    AttributeType,
    DataType,
    Model,
    Node,
    Shape,
    TensorType,
    Value,
    is_constant,
    node_to_proto,
    tensor,
)
from optc.passes.infra.analysis import ACTIVATIONS, AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass

#: Never folded: nondeterministic ops, and DequantizeLinear, because a DequantizeLinear
#: of a constant weight *is* the quantized weight (QDQ format); folding it undoes quantization.
_NOT_FOLDED = NONDETERMINISTIC_OPS | {"DequantizeLinear"}


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Replace nodes computable at compile time (constant inputs, static shapes) by initializers."""

    @dataclasses.dataclass
    class Options:
        size_limit: int = option(
            1 << 20,
            help="largest folded output in bytes, unless it replaces constants no other node reads and is no larger",
            at_least=0,
        )

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        opset = graph.opset_imports.get("", 21)
        folded: list[Node] = []
        for node in list(graph):
            arrays = self._evaluate(node, opset, model.ir_version)
            if arrays is None:
                continue
            for old, array in zip(node.outputs, arrays, strict=True):
                name = old.name
                old.name = f"{name}.folded"
                new = Value(name=name, type=TensorType(tensor(array).dtype), shape=Shape(list(array.shape)))
                new.const_value = tensor(array, name=name)
                new.metadata_props.update(old.metadata_props)
                graph.register_initializer(new)
                old.replace_all_uses_with(new, replace_graph_outputs=True)
            folded.append(node)
        if folded:
            graph.remove(folded, safe=True)
        # Named values keep their runtime values; new weights appear, so weight analyses are dropped.
        preserved = PreservedAnalyses().preserve_aspects(ACTIVATIONS)
        return PassResult(model, bool(folded), preserved if folded else None, {"nodes-folded": len(folded)})

    def _evaluate(self, node: Node, opset: int, ir_version: int) -> list[np.ndarray] | None:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED:
            return None
        if any(a.type in (AttributeType.GRAPH, AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        if not any(o.consumers() or o.is_graph_output() for o in node.outputs):
            return None  # dead: leave it to dce
        static = _static_shape_result(node)
        if static is not None:
            return static
        inputs = [v for v in node.inputs if v is not None]
        if not all(is_constant(v) for v in inputs):
            return None
        if any(v.dtype == DataType.STRING for v in (*inputs, *node.outputs)):
            return None  # string tensors have no byte size and do not round-trip the evaluator
        # Above the size limit, fold only when the constants read are freed by it (no other
        # consumer), so folding never duplicates weight data (e.g. a tied embedding's Transpose).
        freed = all(all(c is node for c in v.consumers()) and not v.is_graph_output() for v in inputs)
        input_bytes = sum(v.const_value.nbytes for v in inputs) if freed else 0
        # The output's size comes from the inputs' values, never from the shapes the file declares
        # (a file can declare a small shape for a huge result): unknown means not folded.
        expected = _inferred_output_bytes(node, opset, ir_version)
        if expected is None or expected > max(self.options.size_limit, input_bytes):
            return None
        arrays = _run_node(node, opset, ir_version)
        if arrays is None:
            return None
        if sum(a.nbytes for a in arrays) > max(self.options.size_limit, input_bytes):
            return None
        return arrays


def _static_shape_result(node: Node) -> list[np.ndarray] | None:
    """Fold Shape/Size of a value whose shape is fully static."""
    if node.op_type not in ("Shape", "Size") or node.inputs[0] is None:
        return None
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    dims = [int(d) for d in shape]
    if node.op_type == "Size":
        return [np.array(int(np.prod(dims)), dtype=np.int64)]
    start = node.attributes["start"].value if "start" in node.attributes else 0
    end = node.attributes["end"].value if "end" in node.attributes else None
    return [np.array(dims[start:end], dtype=np.int64)]


#: Constant inputs up to this many elements are given to shape inference as values (shapes, repeats, pads...).
_VALUE_ELEMENTS = 4096


def _inferred_output_bytes(node: Node, opset: int, ir_version: int) -> int | None:
    """Bytes of the node's outputs by ONNX shape inference from its inputs' shapes and small values.

    None when any output's shape or type stays unknown: the node is then not evaluated, since
    nothing bounds what evaluating it would allocate.
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    try:
        proto_node = node_to_proto(node)
    except Exception:  # noqa: BLE001 - a node onnx-ir cannot write (e.g. an attribute without a type)
        return None
    del proto_node.input[:]
    types: dict[str, onnx.TypeProto] = {}
    data: dict[str, onnx.TensorProto] = {}
    for i, value in enumerate(node.inputs):
        if value is None:
            proto_node.input.append("")
            continue
        name = f"in{i}"
        proto_node.input.append(name)
        const = value.const_value
        dims = [int(d) for d in const.shape]
        types[name] = onnx.helper.make_tensor_type_proto(int(const.dtype), dims)
        if const.size <= _VALUE_ELEMENTS:
            data[name] = onnx.numpy_helper.from_array(np.asarray(const.numpy()), name)
    del proto_node.output[:]
    proto_node.output.extend(f"out{i}" for i in range(len(node.outputs)))
    try:
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto_node, types, data, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir_version,
        )
    except Exception:  # noqa: BLE001 - inference rejects many inconsistent nodes; they are not folded
        return None
    total = 0
    for name in proto_node.output:
        type_proto = inferred.get(name)
        if type_proto is None or not type_proto.HasField("tensor_type"):
            return None
        tensor_type = type_proto.tensor_type
        if not tensor_type.elem_type or not tensor_type.HasField("shape"):
            return None
        dims = tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            return None
        try:
            width = DataType(tensor_type.elem_type).bitwidth
        except Exception:  # noqa: BLE001 - unknown types, and strings (no bit width): not folded
            return None
        total += (int(np.prod([d.dim_value for d in dims], dtype=object)) * width + 7) // 8
    return total


def _run_node(node: Node, opset: int, ir_version: int) -> list[np.ndarray] | None:
    """Evaluate one node with onnx's reference evaluator; None when it cannot."""
    feeds: dict[str, np.ndarray] = {}
    try:
        proto_node = node_to_proto(node)
    except Exception:  # noqa: BLE001 - see _inferred_output_bytes
        return None
    del proto_node.input[:]
    for i, value in enumerate(node.inputs):
        if value is None:
            proto_node.input.append("")
            continue
        feeds[f"in{i}"] = value.const_value.numpy()
        proto_node.input.append(f"in{i}")
    del proto_node.output[:]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    proto_node.output.extend(outputs)
    helper = onnx.helper
    graph = helper.make_graph(
        [proto_node],
        "fold",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outputs],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NaN or overflow in a folded constant is the model's own
            results = onnx.reference.ReferenceEvaluator(proto).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the evaluator cannot run is simply not folded
        return None
    arrays = [np.asarray(r) for r in results]
    if any(a.dtype == object for a in arrays):
        return None
    return arrays
