"""`trt-check`: TensorRT explicit-quantization legality, on any ONNX model.

`check_tensorrt(model)` returns one `Finding` per offending node, each naming
the node and the rule it breaks (`RULES`: id, name, severity, text, source;
the table is `rules.json` beside this module).
The rules encode what the TensorRT ONNX parser accepts and what TensorRT's
developer guide asks of Q/DQ placement, (import constraints from
onnx-tensorrt's `QuantDequantLinearHelper`/`onnxOpImporters.cpp` and
`docs/operators.md`; placement from the developer guide's "Q/DQ
Layer-Placement Recommendations"; 2:4 from Polygraphy's `sparse.py`) and the
user reports on GitHub (int32 bias: TensorRT #4542; DynamicQuantizeLinear:
onnxruntime #21169, TensorRT #3963; ConvInteger).

Severity `error`: the TensorRT parser or a strongly-typed build rejects it
(or silently computes something else). Severity `warning`: legal, but against
the placement rules, so TensorRT cannot fuse it or runs it in float.

On shared Q/DQ pairs: §3 has no rule against one DequantizeLinear feeding
several ops of the same kind (ModelOpt's TensorRT configuration uses
`DedicatedQDQPair=False`, so q/k/v sharing one pair is TensorRT's own
practice); onnxruntime's `DedicatedQDQPair` option exists because a pair
shared with an op that needs different treatment is the problem. So: the hard
constraint is that a QuantizeLinear's INT8/FP8 output only reaches
DequantizeLinear nodes with the same scale and zero point (T09, error), and
a pair that feeds a quantized weighted op must not also feed an op that then
computes on quantized-dequantized data TensorRT cannot fuse (a norm, Softmax,
SiLU...; T18, warning: §3.2.2 wants those in high precision).

The pass prints each finding as one line on stderr and changes nothing;
`strict=true` makes it fail on error findings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from optc.errors import OptcError
from optc.ir import DataType, Model, Node, Value, annotation, node_label, transpose_perm
from optc.ir.annotations import QUANTIZATION, SPARSITY
from optc.ir.patterns.match import ONNX_DOMAINS, const_value, int_attr, is_const, producer
from optc.ir.patterns.ops import GEMM_OPS, INTEGER_OPS, QDQ_OPS, WEIGHTED_OPS
from optc.ir.patterns.qdq import (
    QDQ,
    dequantized,
    quantized_activation,
    quantized_type,
    same_constant,
    scalar_like,
)
from optc.ir.patterns.residual import residual_add
from optc.ir.patterns.weights import trace_back, weight_axes, weight_view
from optc.passes.fp8_convs import FP8_CONV_MAX_TAPS, FP8_CONV_MIN_CHANNELS, fp8_conv_unsupported
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.transforms.check_sparsity import nm_violations


@dataclass(frozen=True)
class Rule:
    """One TensorRT rule: a short id, a name, how bad breaking it is, its text and where it is documented."""

    id: str
    name: str
    severity: str  # "error" | "warning"
    text: str
    source: str


def load_rules() -> dict[str, Rule]:
    """The rules of `rules.json` beside this module, by name, their sources and limits filled in."""
    table = json.loads(resources.files(__package__).joinpath("rules.json").read_text(encoding="utf-8"))
    fields = dict(table["sources"], fp8_conv_min_channels=FP8_CONV_MIN_CHANNELS, fp8_conv_max_taps=FP8_CONV_MAX_TAPS)
    rules = (Rule(**{key: value.format(**fields) for key, value in row.items()}) for row in table["rules"])
    return {rule.name: rule for rule in rules}


RULES: dict[str, Rule] = load_rules()


@dataclass(frozen=True)
class Finding:
    """A node that breaks a rule."""

    rule: Rule
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule.id} {self.rule.name}, {self.rule.severity}] {self.detail} (rule: {self.rule.text})"


_LEGAL_QTYPES = (DataType.INT8, DataType.FLOAT8E4M3FN, DataType.INT4)
#: What a constant is followed back through (Polygraphy folds these): Q/DQ, Transpose, Cast, Identity.
_TRACED_OPS = (*QDQ_OPS, "Transpose", "Cast", "Identity")


# ---------------------------------------------------------------------------- small graph helpers


def opset(model: Model) -> int:
    return int(model.graph.opset_imports.get("", model.opset_imports.get("", 1)))


def weight_slot(node: Node) -> int | None:
    """The input index of a weighted op's weight when it traces back to a constant, else None."""
    view = weight_view(node, through=_TRACED_OPS, is_source=is_const)
    if view is None or trace_constant(node.inputs[0]) is not None:
        return None
    return view.index


def trace_constant(value: Value | None) -> tuple[Value, list[int] | None, list[Node]] | None:
    """Follow Q, DQ, Transpose, Cast and Identity back to a constant (as Polygraphy does).

    Returns the constant, the permutation from the constant's axes to `value`'s
    axes (`value` axis i is constant axis perm[i]; None when no Transpose), and
    the nodes walked through, nearest first.
    """
    found = trace_back(value, through=_TRACED_OPS, is_source=is_const) if value is not None else None
    if found is None or isinstance(found, str):
        return None
    return found.constant, None if found.perm is None else list(found.perm), list(found.path)


def _rank(value: Value | None) -> int | None:
    if value is None:
        return None
    array = const_value(value) if is_const(value) else None
    if array is not None:
        return array.ndim
    return len(value.shape) if value.shape is not None else None


def output_axis(node: Node, rank: int) -> int:
    """The output-channel axis of a weighted op's weight (in the weight's layout at the op)."""
    return weight_axes(node, rank)[0] if node.op_type in WEIGHTED_OPS else rank - 1


def reduction_axis(node: Node, rank: int) -> int:
    """The reduction (K) axis of a weighted op's weight (in the weight's layout at the op)."""
    return weight_axes(node, rank)[1] if node.op_type in WEIGHTED_OPS else rank - 2


def weight_readers(value: Value) -> list[tuple[Node, list[int] | None]]:
    """Weighted ops reading `value` as their weight (through Transpose/Cast/Identity/Q/DQ), with the axis map."""
    found: list[tuple[Node, list[int] | None]] = []
    stack: list[tuple[Value, list[int] | None]] = [(value, None)]
    seen: set[int] = set()
    while stack:
        current, perm = stack.pop()
        for use in current.uses():
            node = use.node
            if id(node) in seen or node.domain not in ONNX_DOMAINS:
                continue
            if node.op_type in WEIGHTED_OPS and use.idx == 1 and weight_slot(node) == 1:
                seen.add(id(node))
                found.append((node, perm))
            elif node.op_type in _TRACED_OPS and use.idx == 0:
                seen.add(id(node))
                next_perm = perm
                if node.op_type == "Transpose":
                    p = transpose_perm(node, _rank(node.inputs[0]))
                    if p is None:
                        continue
                    next_perm = [perm[i] for i in p] if perm is not None else p
                stack.append((node.outputs[0], next_perm))
    return found


def output_quantization_requested(node: Node) -> bool:
    """A Q node, or the weighted op it reads, annotated `quant: {"output_quantization": true}`."""
    info = annotation(node, QUANTIZATION)
    return isinstance(info, dict) and bool(info.get("output_quantization"))


# ---------------------------------------------------------------------------- the checker


class TrtChecker:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.opset = opset(model)
        self.findings: list[Finding] = []

    def add(self, rule: str, node: Node | str, detail: str) -> None:
        name = node if isinstance(node, str) else node_label(node)
        self.findings.append(Finding(RULES[rule], name, detail))

    def run(self) -> list[Finding]:
        for node in self.model.graph:
            if node.op_type in QDQ_OPS and node.domain in ONNX_DOMAINS:
                self.qdq(QDQ(node))
            elif node.op_type == "DynamicQuantizeLinear":
                self.add("no-dynamic-quantization", node, "DynamicQuantizeLinear computes its scale at run time")
            elif node.op_type.startswith("QLinear") or node.op_type in INTEGER_OPS or (
                node.op_type in QDQ_OPS and node.domain not in ONNX_DOMAINS
            ):
                self.add("no-integer-ops", node, f"{node.domain + '.' if node.domain else ''}{node.op_type} has no TensorRT importer")
            if node.domain in ONNX_DOMAINS:
                if weight_slot(node) is not None:
                    self.weighted(node)
                if node.op_type == "Add":
                    self.residual(node)
                elif node.op_type == "Concat":
                    self.concat(node)
        self.sparsity()
        return self.findings

    # ------------------------------------------------------------------ Q/DQ nodes

    def qdq(self, view: QDQ) -> None:
        node, data, zp = view.node, view.input, view.zero_point
        kind = view.dtype
        scale_array = view.scale_array
        if scale_array is None:
            self.add("constant-positive-scale", node, "its scale is computed at run time")
        elif not np.all(np.isfinite(scale_array.astype(np.float64))) or not np.all(scale_array.astype(np.float64) > 0):
            bad = scale_array.astype(np.float64)
            self.add("constant-positive-scale", node, f"its scale has non-positive or non-finite entries (min {np.nanmin(bad):.3g})")
        if zp is not None and not is_const(zp):
            self.add("constant-positive-scale", node, "its zero point is computed at run time")
        zp_array = view.zero_point_array
        if zp_array is not None and np.any(zp_array.astype(np.float64) != 0):
            nonzero = zp_array.astype(np.float64)
            self.add("symmetric", node, f"zero point {_describe(nonzero)} is not 0")
        if kind == DataType.INT32:
            self.add("no-bias-quantization", node, "an int32 (bias) tensor is dequantized")
            return
        if kind is not None and kind not in _LEGAL_QTYPES:
            self.add("qdq-dtype", node, f"quantizes to {kind.name}")
        if kind in (DataType.FLOAT8E4M3FN,) and self.opset < 19:
            self.add("fp8-opset", node, f"FP8 Q/DQ in a model of opset {self.opset}")
        block = view.block_size
        # A weight: a constant, or (Q → DQ on a float constant, which TensorRT quantizes at build time) its Q's input.
        source = data
        upstream = view.quantize
        if upstream is not None and upstream.of_constant:
            source = upstream.input
        weight_like = is_const(source)
        if not weight_like:
            self.activation(node, scale_array, block, kind)
        else:
            self.weight(node, source, scale_array, block, kind)
        if view.is_quantize:
            self.pairing(view)
        elif not weight_like:
            self.shared(node)

    def activation(self, node: Node, scale: np.ndarray | None, block: int, kind: DataType | None) -> None:
        if block or (scale is not None and not scalar_like(scale)):
            shape = "blocked" if block else f"per-channel (scale shape {list(scale.shape)})"
            self.add("per-tensor-activation", node, f"activation {node.inputs[0].name!r} is quantized {shape}")
        if kind == DataType.INT4:
            self.add("int4-blocked", node, f"activation {node.inputs[0].name!r} is quantized to INT4 (INT4 is weight-only)")

    def weight(self, node: Node, data: Value, scale: np.ndarray | None, block: int, kind: DataType | None) -> None:
        array = const_value(data)
        rank = array.ndim
        readers = weight_readers(node.outputs[0])
        axis = int_attr(node, "axis", 1)
        axis = axis % rank if rank else 0
        if kind == DataType.INT4:
            self.int4(node, array, scale, block, axis, readers)
            return
        if block:
            self.add("int4-blocked", node, f"block quantization of a {kind.name if kind else '?'} weight (blocks are for INT4)")
            return
        if scale is None or scalar_like(scale):
            return  # per-tensor weights are legal
        if scale.ndim != 1 or scale.shape[0] != array.shape[axis]:
            self.add("weight-axis", node, f"scale shape {list(scale.shape)} does not match weight dim {axis} of {list(array.shape)}")
            return
        for reader, perm in readers:
            want = output_axis(reader, rank)
            want = perm[want] if perm is not None else want
            if axis != want:
                self.add("weight-axis", node, f"per-channel axis {axis} but {reader.op_type} {node_label(reader)!r} "
                                              f"has its output channels on axis {want}")

    def int4(self, node: Node, array: np.ndarray, scale: np.ndarray | None, block: int, axis: int, readers) -> None:
        where = f"INT4 weight {node.inputs[0].name!r}"
        if self.opset < 21:
            self.add("int4-blocked", node, f"{where} in a model of opset {self.opset}")
        if not block or scale is None or scale.ndim != array.ndim:
            self.add("int4-blocked", node, f"{where} is not block-quantized (TensorRT's weight-only INT4 is blocked)")
            return
        blocked = [i for i in range(array.ndim) if scale.shape[i] != array.shape[i]]
        if blocked != [axis] or scale.shape[axis] != -(-array.shape[axis] // block):
            self.add("int4-blocked", node, f"{where}: scale shape {list(scale.shape)} is not one block of {block} "
                                           f"along axis {axis} of {list(array.shape)}")
        if array.shape[-1] % 2:
            self.add("int4-blocked", node, f"{where} has an odd last dimension {array.shape[-1]}")
        if not readers:
            self.add("int4-blocked", node, f"{where} feeds no MatMul/Gemm weight")
        for reader, perm in readers:
            if reader.op_type not in GEMM_OPS:
                self.add("int4-blocked", node, f"{where} feeds {reader.op_type} {node_label(reader)!r} (INT4 is for GEMMs only)")
                continue
            k = reduction_axis(reader, array.ndim)
            k = perm[k] if perm is not None else k
            if axis != k:
                self.add("int4-blocked", node, f"{where} is blocked along axis {axis}, but the K axis of "
                                               f"{node_label(reader)!r} is {k}")

    def pairing(self, view: QDQ) -> None:
        q, out = view.node, view.output
        if out.is_graph_output():
            self.add("qdq-pair", q, f"its quantized output {out.name!r} is a graph output")
        for use in out.uses():
            reader = use.node
            partner = QDQ(reader)
            if reader.op_type != "DequantizeLinear" or reader.domain not in ONNX_DOMAINS or use.idx != 0:
                self.add("qdq-pair", q, f"its quantized output reaches {reader.op_type} {node_label(reader)!r}")
            elif not same_constant(partner.scale, view.scale) or not same_constant(partner.zero_point, view.zero_point):
                self.add("qdq-pair", q, f"its DequantizeLinear {node_label(reader)!r} uses another scale or zero point")
            elif partner.axis != view.axis and not scalar_like(view.scale_array):
                self.add("qdq-pair", q, f"its DequantizeLinear {node_label(reader)!r} uses another axis")

    # ------------------------------------------------------------------ placement

    def weighted(self, node: Node) -> None:
        w_dq = producer(node.inputs[1], "DequantizeLinear")
        if w_dq is None:
            traced = trace_constant(node.inputs[1])
            w_dq = next((n for n in traced[2] if n.op_type == "DequantizeLinear"), None) if traced else None
        w_type = quantized_type(w_dq) if w_dq is not None else None
        act_q = quantized_activation(node.inputs[0])
        if w_type is not None and w_type != DataType.INT4 and w_type != DataType.INT32 and not act_q:
            self.add("weighted-inputs", node, f"{w_type.name} weight with a float activation {node.inputs[0].name!r}")
        elif w_type is None and act_q:
            self.add("weighted-inputs", node, f"quantized activation with a float weight {node.inputs[1].name!r}")
        act_dq = dequantized(node.inputs[0]) if act_q else None
        if node.op_type == "Conv" and DataType.FLOAT8E4M3FN in (w_type, act_dq.dtype if act_dq is not None else None):
            self.fp8_conv(node)
        for use in node.outputs[0].uses():
            q = use.node
            if q.op_type != "QuantizeLinear" or q.domain not in ONNX_DOMAINS:
                continue
            if output_quantization_requested(q) or output_quantization_requested(node):
                continue
            if not feeds_quantized_consumer(q):
                self.add("weighted-output", node, f"its output is quantized by {node_label(q)!r} for no quantized consumer")

    def fp8_conv(self, node: Node) -> None:
        """T19: an FP8 Conv needs a shape TensorRT has FP8 kernels for."""
        traced = trace_constant(node.inputs[1])
        shape = None
        if traced is not None and traced[0].shape is not None:
            shape = list(traced[0].shape)
            if traced[1] is not None:
                shape = [shape[i] for i in traced[1]]
        why = fp8_conv_unsupported(shape)
        if why:
            self.add("fp8-conv-shape", node, f"FP8 Conv with {why}")

    def shared(self, dq: Node) -> None:
        """T18: an activation DQ read by a quantized weighted op and by an op that wants float."""
        uses = list(dq.outputs[0].uses())
        if not any(u.idx == 0 and weight_slot(u.node) is not None for u in uses):
            return
        others = [u.node for u in uses if not fuses_quantized_input(u.node, u.idx)]
        if others:
            names = ", ".join(f"{n.op_type} {node_label(n)!r}" for n in others[:3])
            self.add("shared-qdq", dq, f"also feeds {names}, which would compute on quantized data")

    def residual(self, add: Node) -> None:
        found = residual_add(add, quantized_conv)
        if found is None or quantized_activation(found.residual):
            return
        conv = found.conv
        self.add("residual-quantized", add, f"adds the output of quantized {conv.op_type} {node_label(conv)!r} "
                                            f"to the unquantized residual {found.residual.name!r}")

    def concat(self, node: Node) -> None:
        inputs = [v for v in node.inputs if v is not None and not is_const(v)]
        dqs = [dequantized(v) for v in inputs]
        if not any(dqs):
            return
        if not all(dqs):
            floats = [v.name for v, dq in zip(inputs, dqs, strict=True) if dq is None]
            self.add("concat-one-scale", node, f"mixes quantized and float inputs ({', '.join(floats[:3])} float)")
            return
        first = dqs[0]
        for dq in dqs[1:]:
            if not dq.same_parameters(first):
                self.add("concat-one-scale", node, f"inputs {first.output.name!r} and {dq.output.name!r} have different scales")
                return

    # ------------------------------------------------------------------ 2:4 sparsity

    def sparsity(self) -> None:
        graph = self.model.graph
        annotated: list[tuple[Value, dict, str]] = []
        for value in graph.initializers.values():
            info = annotation(value, SPARSITY)
            if isinstance(info, dict) and info.get("pattern") == "2:4":
                annotated.append((value, info, value.name or "?"))
        seen = {id(v) for v, _, _ in annotated}
        for node in graph:
            info = annotation(node, SPARSITY)
            slot = weight_slot(node)
            if not isinstance(info, dict) or info.get("pattern") != "2:4" or slot is None:
                continue
            traced = trace_constant(node.inputs[slot])
            if traced is None or id(traced[0]) in seen:
                continue
            seen.add(id(traced[0]))
            annotated.append((traced[0], info, node_label(node)))
        for value, info, label in annotated:
            self.check_2_4(value, info, label)

    def check_2_4(self, value: Value, info: dict, label: str) -> None:
        array = const_value(value)
        if array is None:
            return
        readers = weight_readers(value)
        axis = info.get("axis")
        if axis is None and readers:
            reader, perm = readers[0]
            k = reduction_axis(reader, array.ndim)
            axis = perm[k] if perm is not None else k
        if not isinstance(axis, int) or not -array.ndim <= axis < array.ndim:
            self.add("sparsity-axis", label, f"weight {value.name!r} has no usable 2:4 axis ({axis!r})")
            return
        axis %= array.ndim
        for reader, perm in readers:
            k = reduction_axis(reader, array.ndim)
            k = perm[k] if perm is not None else k
            if k != axis:
                self.add("sparsity-axis", label, f"weight {value.name!r} is 2:4 along axis {axis}, but the K axis of "
                                                 f"{reader.op_type} {node_label(reader)!r} is {k}")
        bad = nm_violations(array, axis, 2, 4)
        if bad < 0:
            self.add("sparsity-2-4", label, f"weight {value.name!r}: K = {array.shape[axis]} is not divisible by 4")
        elif bad:
            self.add("sparsity-2-4", label, f"weight {value.name!r}: {bad} of {array.size // 4} groups of 4 along axis {axis} "
                                            f"have more than 2 non-zeros")


#: Ops that take a quantized (Q/DQ'd) input in TensorRT without leaving it at reduced precision for an
#: op that wants float: weighted ops, the residual Add, and ops Q/DQ commutes with (§3.2.5, §3.2.8).
_QDQ_FRIENDLY = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape",
                 "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Gather", "Relu",
                 "QuantizeLinear")


def quantized_conv(node: Node) -> bool:
    """A Conv with a constant weight and a Q/DQ activation: what a residual Add is fused into."""
    return weight_slot(node) is not None and quantized_activation(node.inputs[0])


def feeds_quantized_consumer(q: Node) -> bool:
    """A Q whose DequantizeLinear feeds a weighted op's data input or an Add (a quantized residual)."""
    for dq_use in q.outputs[0].uses():
        dq = dq_use.node
        if dq.op_type != "DequantizeLinear":
            continue
        for use in dq.outputs[0].uses():
            if use.node.op_type == "Add" or (use.idx == 0 and weight_slot(use.node) is not None):
                return True
    return False


def fuses_quantized_input(node: Node, idx: int) -> bool:
    """Whether `node` takes a Q/DQ'd input `idx` without computing on the quantized data in float."""
    if node.domain not in ONNX_DOMAINS:
        return False
    if node.op_type in WEIGHTED_OPS:
        return idx == 0 and weight_slot(node) is not None
    return node.op_type in _QDQ_FRIENDLY


def _describe(array: np.ndarray) -> str:
    flat = array.reshape(-1)
    if flat.size == 1:
        return f"{flat[0]:g}"
    nonzero = flat[flat != 0]
    return f"with {nonzero.size} of {flat.size} entries non-zero (e.g. {nonzero[0]:g})"


def check_tensorrt(model: Model) -> list[Finding]:
    """Every TensorRT explicit-quantization rule the model breaks, one finding per node and rule, in graph order."""
    return TrtChecker(model).run()


def summarize(findings: Iterable[Finding]) -> str:
    findings = list(findings)
    errors = sum(1 for f in findings if f.rule.severity == "error")
    rules = sorted({f"{f.rule.id} {f.rule.name}" for f in findings})
    return (f"{len(findings)} finding(s): {errors} error(s), {len(findings) - errors} warning(s)"
            + (f" [{'; '.join(rules)}]" if rules else ""))


@register_pass("trt-check")
class TrtCheck(Pass):
    """Check TensorRT explicit-quantization legality; print each offending node and the rule it breaks."""

    @dataclass
    class Options:
        strict: bool = option(False, help="fail when a rule of severity 'error' is broken (default: only report)")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        findings = check_tensorrt(model)
        for finding in findings:
            print(f"optc: trt-check: {finding}", file=sys.stderr)
        print(f"optc: trt-check: {summarize(findings)}", file=sys.stderr)
        errors = [f for f in findings if f.rule.severity == "error"]
        if self.options.strict and errors:
            raise OptcError(f"trt-check: {len(errors)} TensorRT rule(s) broken; first: {errors[0]}")
        stats = {"findings": len(findings), "errors": len(errors), "warnings": len(findings) - len(errors)}
        return PassResult(model, False, None, stats)


__all__ = ["RULES", "Finding", "Rule", "TrtCheck", "check_tensorrt", "summarize"]
