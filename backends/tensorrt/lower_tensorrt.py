"""`lower-tensorrt`: optc's quantization annotations → TensorRT's explicit-quantization ONNX.

The tensorrt backend runs this before writing (`TensorRTBackend.legalize`). The
result keeps standard `QuantizeLinear`/`DequantizeLinear` (which onnxruntime also
runs); each rewrite answers a rule of `trt-check` (backends/tensorrt/trt_check.py):

* activation Q/DQ TensorRT cannot import: INT16 pairs removed, asymmetric or
  per-channel ones made symmetric INT8 per tensor (T01, T03, T04);
* weights: kept on the right axis when their reader's activation is quantized,
  else stored as the float they dequantize to; int32 biases folded (T05, T06, T15);
* INT4 weight-only blocked along K (T10), asymmetric blocks split exactly into
  symmetric codes plus a float correction GEMM (`int4-asymmetric=split`), or
  re-quantized / stored float;
* shared pairs (T18), unneeded output Q/DQ (T14), Concat scales (T13), and the
  residual Add fused into a quantized Conv (T12), whose Q/DQ is reused or calibrated
  (a no-op for optc's own `quantize`, which already places it).

The rewrites are rule sets of `optc.ir.patterns.rewrite` (`_Lowering.rule_sets`), run in the order
above, each once over the graph; their legality tests are trt-check's (`weight_slot`,
`fuses_quantized_input`, `feeds_quantized_consumer`, `quantized_conv`, the output axes).

Every group of rewrites is summarised as one line in the model metadata
`tensorrt_lowering` (the backend prints them). DynamicQuantizeLinear, integer ops
and run-time scales are not rewritten: `trt-check` reports them. Measurements:
README (Results).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.backends.tensorrt.trt_check import (
    feeds_quantized_consumer,
    fuses_quantized_input,
    output_axis,
    output_quantization_requested,
    quantized_conv,
    reduction_axis,
    weight_slot,
)
from optc.errors import OptcError
from optc.ir import (
    DataType,
    Model,
    Node,
    Value,
    annotate,
    annotation,
    make_node,
    model_metadata,
    node_label,
    set_model_metadata,
    sole_transpose,
    source_name,
    transpose_perm,
)
from optc.ir.annotations import PROVENANCE, QUANTIZATION, QUANTIZATION_SKIPPED, TENSORRT_LOWERING
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.ir.patterns.match import ONNX_DOMAINS, const_value, int_attr, is_const
from optc.ir.patterns.ops import GEMM_OPS
from optc.ir.patterns.qdq import (
    QDQ,
    QDQPair,
    activation_pair,
    dequantized,
    qdq,
    quantized_activation,
    quantized_type,
    scalar_like,
)
from optc.ir.patterns.residual import ResidualAdd, residual_add
from optc.ir.patterns.rewrite import Rule, apply_rules
from optc.ir.patterns.weights import weight_axes
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass

#: Largest magnitude of each legal quantized type, as a symmetric scale uses it.
_QMAX = {DataType.INT8: 127.0, DataType.FLOAT8E4M3FN: 448.0, DataType.INT4: 7.0}
_UNSUPPORTED_ACTIVATION = (DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32, DataType.INT4, DataType.UINT4)
_EIGHT_BIT = (DataType.INT8, DataType.FLOAT8E4M3FN)


def _np_type(dtype: DataType):
    if dtype == DataType.FLOAT8E4M3FN:
        import ml_dtypes

        return ml_dtypes.float8_e4m3fn
    if dtype == DataType.INT4:
        import ml_dtypes

        return ml_dtypes.int4
    return dtype.numpy()


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block: int,
               float_type=np.float32) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: `(q - zp) * scale` in the scale's float type, per tensor, axis or block."""
    data = q.astype(np.float32)
    scale = scale.astype(float_type)
    zp = None if zero_point is None else zero_point.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1 and scale.ndim <= 1 and data.ndim != 1:
        s = scale.reshape(())
        z = zp.reshape(()) if zp is not None else None
    elif block:
        s = np.repeat(scale, block, axis=axis).take(range(data.shape[axis]), axis=axis)
        z = np.repeat(zp, block, axis=axis).take(range(data.shape[axis]), axis=axis) if zp is not None else None
    else:
        shape = [1] * data.ndim
        shape[axis] = -1
        s = scale.reshape(shape)
        z = zp.reshape(shape) if zp is not None else None
    centered = data - z if z is not None else data
    return (centered.astype(float_type) * s).astype(float_type)


def symmetric_quantize(w: np.ndarray, axis: int | None, block: int, qmax: float, qtype_: DataType):
    """Symmetric quantization of float `w`: per tensor (axis None), per channel along `axis`, or in blocks."""
    data = w.astype(np.float64)
    if axis is None:
        amax = np.abs(data).max(initial=0.0)
        scale = np.asarray(amax / qmax if amax > 0 else 1.0)
        expanded = scale
    elif block:
        k = data.shape[axis]
        pad = (-k) % block
        padded = np.pad(np.abs(data), [(0, pad) if i == axis else (0, 0) for i in range(data.ndim)])
        moved = np.moveaxis(padded, axis, 0)
        amax = moved.reshape(-1, block, *moved.shape[1:]).max(axis=1)
        scale = np.moveaxis(np.where(amax > 0, amax / qmax, 1.0), 0, axis)
        expanded = np.repeat(scale, block, axis=axis).take(range(k), axis=axis)
    else:
        reduce = tuple(i for i in range(data.ndim) if i != axis)
        amax = np.abs(data).max(axis=reduce)
        scale = np.where(amax > 0, amax / qmax, 1.0)
        shape = [1] * data.ndim
        shape[axis] = -1
        expanded = scale.reshape(shape)
    scale = scale.astype(w.dtype if w.dtype in (np.float16, np.float32) else np.float32)
    expanded = np.broadcast_to(np.asarray(expanded, dtype=np.float64), data.shape) if np.ndim(expanded) else expanded
    scaled = data / np.asarray(expanded).astype(scale.dtype).astype(np.float64)
    if qtype_ == DataType.FLOAT8E4M3FN:
        q = np.clip(scaled, -qmax, qmax).astype(_np_type(qtype_))
    else:
        q = np.clip(np.rint(scaled), -qmax, qmax).astype(np.int8).astype(_np_type(qtype_))
    return q, scale


@register_pass("lower-tensorrt")
class LowerTensorRT(Pass):
    """Rewrite Q/DQ into TensorRT explicit quantization: symmetric INT8/FP8/INT4, float where TensorRT has no form."""

    @dataclass
    class Options:
        int4_asymmetric: Literal["split", "requantize", "float"] = option(
            "split", help="asymmetric INT4 blocks: symmetric INT4 plus an exact zero-point correction GEMM (split; "
            "MatMul or plain Gemm, else requantize), re-quantize symmetric per block, or store the weight float"
        )
        residual: bool = option(True, help="quantize the residual input of an Add fused into a quantized Conv")
        concat: bool = option(True, help="give quantized Concat inputs one scale")
        output_quant: list[str] = option([], help="weighted ops (names, globs) whose output Q/DQ is kept on purpose")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        lowering = _Lowering(model, am, self.options)
        lowering.apply()
        notes = lowering.notes()
        for key, note in zip(lowering.done, notes, strict=True):
            if key in MISSED:  # quantization TensorRT cannot take: the model runs those parts in float
                am.context.remark("missed", note if len(note) <= 240 else note[:237] + "...")
        if not notes:
            return PassResult(model, False, None, {"rewrites": 0})
        earlier = model_metadata(model, TENSORRT_LOWERING) or []
        set_model_metadata(model, TENSORRT_LOWERING, [*earlier, *notes])
        stats = {key.replace("_", "-"): len(v) for key, v in lowering.done.items()}
        return PassResult(model, True, None, stats)


#: What `lower-tensorrt` could not keep quantized (a remark each, and an error under `--strict`).
MISSED = frozenset({
    "int16_activations", "uint16_activations", "int32_activations", "uint32_activations", "int4_activations",
    "uint4_activations", "float_int4", "residual_uncalibrated",
})


class _Lowering:
    def __init__(self, model: Model, am: AnalysisManager, options: LowerTensorRT.Options) -> None:
        self.model = model
        self.graph = model.graph
        self.build = Builder(self.graph)
        self.am = am
        self.options = options
        self.done: dict[str, list[str]] = defaultdict(list)
        self.extra: dict[str, str] = {}
        self.dead: list[Node] = []
        self._dead_ids: set[int] = set()
        self._int4_rel = 0.0
        self._pending_residuals: list[tuple[Node, int, Value, Node]] = []
        self.used_before = {n for n, v in self.graph.initializers.items() if v.uses()}

    # ------------------------------------------------------------------ helpers

    def _kill(self, node: Node) -> None:
        if id(node) not in self._dead_ids:
            self._dead_ids.add(id(node))
            self.dead.append(node)

    def _uses(self, value: Value) -> list:
        return [u for u in value.uses() if id(u.node) not in self._dead_ids]

    def _const(self, name: str, array: np.ndarray) -> Value:
        return self.build.initializer(name, array)

    def _readers_label(self, dq_outputs: list[Value]) -> str:
        labels = sorted({_label(u.node) for v in dq_outputs for u in self._uses(v)})
        return ",".join(labels) or "(none)"

    # ------------------------------------------------------------------ activations

    def rule_sets(self) -> list[list[Rule]]:
        """The lowering's rules, in the order their sets run (each set once over the graph, in graph order)."""
        sets = [
            [Rule("activation", self._activation_pair, self._activation)],
            [Rule("shared-pair", self._shared_pair, self._shared)],
            [Rule("weighted-output", self._weighted_op, self._weighted_output)],
            [Rule("weight", self._weight_dq, self._weight)],
        ]
        if self.options.concat:
            sets.append([Rule("concat", self._quantized_concat, self._concat)])
        if self.options.residual:
            sets.append([Rule("residual", self._residual_add, self._collect_residual)])
        return sets

    def apply(self) -> None:
        """Every rule set, then the residuals it collected (calibrated together), then the clean-up."""
        for rules in self.rule_sets():
            apply_rules(self.graph, rules, fixpoint=False)
        self._residuals()
        self.drop_dead()

    # ------------------------------------------------------------------ activations

    def _activation_pair(self, node: Node) -> tuple[QDQ, list[Node]] | None:
        """An activation's QuantizeLinear and its DequantizeLinear partners (a plain Q → DQ pair; others:
        trt-check reports them)."""
        view = qdq(node)
        if view is None or not view.is_quantize or view.of_constant:
            return None
        partners = view.dequantizers(self._uses(view.output))
        return (view, [dq.node for dq in partners]) if partners is not None else None

    def _activation(self, found: tuple[QDQ, list[Node]]) -> bool:
        """T03, T01, T04: pairs TensorRT cannot import go (the activation stays float) or become symmetric INT8."""
        view, dqs = found
        q = view.node
        kind = view.dtype
        if kind in _UNSUPPORTED_ACTIVATION:
            readers = self._bypass(q, dqs)
            self.done[f"{kind.name.lower()}_activations"].append(readers)
            return True
        scale = view.scale_array
        zp = view.zero_point_array
        if scale is None:
            return False
        asymmetric = kind == DataType.UINT8 or (zp is not None and np.any(zp.astype(np.float64) != 0))
        if asymmetric or not scalar_like(scale):
            self._requantize_activation(q, dqs, kind, scale, zp, asymmetric)
            return True
        return False

    def _bypass(self, q: Node, dqs: list[Node]) -> str:
        """Remove a Q/DQ pair: every reader of its DequantizeLinear nodes reads the float input again."""
        source = q.inputs[0]
        readers = self._readers_label([dq.outputs[0] for dq in dqs])
        for dq in dqs:
            for use in self._uses(dq.outputs[0]):
                use.node.replace_input_with(use.idx, source)
            if dq.outputs[0].is_graph_output():
                continue
            self._kill(dq)
        if all(id(u.node) in self._dead_ids for u in q.outputs[0].uses()):
            self._kill(q)
        return readers

    def _requantize_activation(self, q: Node, dqs: list[Node], kind: DataType | None, scale: np.ndarray,
                               zp: np.ndarray | None, asymmetric: bool) -> None:
        """A symmetric per-tensor pair whose range covers everything the old pair could represent.

        UINT8 with zero point 128 is INT8 with zero point 0 shifted by 128: same scale, exact.
        """
        if kind == DataType.UINT8 and zp is not None and np.all(zp.astype(np.int16) == 128) and scalar_like(scale):
            z_value = self._const(f"{q.inputs[0].name or 'activation'}_trt_zero_point", np.zeros(zp.shape, dtype=np.int8))
            for node in (q, *dqs):
                node.replace_input_with(2, z_value)
                if "output_dtype" in node.attributes:
                    del node.attributes["output_dtype"]
            if q.outputs[0].dtype is not None:
                q.outputs[0].dtype = DataType.INT8
            self.done["uint8_shifted"].append(q.inputs[0].name or node_label(q))
            return
        if kind == DataType.FLOAT8E4M3FN:
            qmax, new_type, lo_q, hi_q = 448.0, kind, -448.0, 448.0
        else:
            new_type = DataType.INT8
            qmax = 127.0
            info = np.iinfo(_np_type(kind)) if kind in (DataType.INT8, DataType.UINT8) else np.iinfo(np.int8)
            lo_q, hi_q = float(info.min), float(info.max)
        s = scale.astype(np.float64)
        z = zp.astype(np.float64) if zp is not None else 0.0
        threshold = float(np.max(np.maximum(np.abs((lo_q - z) * s), np.abs((hi_q - z) * s))))
        float_type = scale.dtype if scale.dtype in (np.float16, np.float32) else np.float32
        new_scale = np.asarray(threshold / qmax if threshold > 0 else 1.0, dtype=float_type)
        base = q.inputs[0].name or "activation"
        s_value = self._const(f"{base}_trt_scale", new_scale)
        z_value = self._const(f"{base}_trt_zero_point", np.zeros((), dtype=_np_type(new_type)))
        for node in (q, *dqs):
            node.replace_input_with(1, s_value)
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, z_value)
            for attr in ("axis", "output_dtype", "block_size"):
                if attr in node.attributes:
                    del node.attributes[attr]
        if q.outputs[0].dtype is not None:
            q.outputs[0].dtype = new_type
        why = "asymmetric" if asymmetric else "per-channel"
        self.done[f"{why}_activations"].append(q.inputs[0].name or node_label(q))

    def _shared_pair(self, dq: Node) -> tuple[QDQPair, list] | None:
        """An activation's Q/DQ pair (its DequantizeLinear `dq`) that a quantized weighted op reads, with its uses."""
        if id(dq) in self._dead_ids or (pair := activation_pair(dq.outputs[0] if dq.outputs else None)) is None:
            return None
        uses = self._uses(dq.outputs[0])
        return (pair, uses) if any(u.idx == 0 and weight_slot(u.node) is not None for u in uses) else None

    def _shared(self, found: tuple[QDQPair, list]) -> bool:
        """T18: readers of a weighted op's activation Q/DQ that want float read the float tensor instead."""
        pair, uses = found
        others = [u for u in uses if not fuses_quantized_input(u.node, u.idx)]
        for use in others:
            use.node.replace_input_with(use.idx, pair.source)
        if others:
            self.done["shared_qdq"].append(",".join(sorted({node_label(u.node) for u in others})))
        return bool(others)

    # ------------------------------------------------------------------ outputs of weighted ops

    def _weighted_op(self, node: Node) -> Node | None:
        """A weighted op whose output quantization nobody asked for."""
        if weight_slot(node) is None or output_quantization_requested(node) or self._asked(node):
            return None
        return node

    def _weighted_output(self, node: Node) -> bool:
        """T14: Q/DQ on a weighted op's output that feeds no quantized consumer goes."""
        changed = False
        for use in self._uses(node.outputs[0]):
            q = use.node
            if q.op_type != "QuantizeLinear" or q.domain not in ONNX_DOMAINS or output_quantization_requested(q):
                continue
            uses = self._uses(q.outputs[0])
            if q.outputs[0].is_graph_output() or any(u.node.op_type != "DequantizeLinear" for u in uses):
                continue
            if feeds_quantized_consumer(q):
                continue
            self._bypass(q, [u.node for u in uses])
            self.done["output_quantization"].append(node_label(node))
            changed = True
        return changed

    def _asked(self, node: Node) -> bool:
        names = [node_label(node), *(o.name for o in node.outputs if o.name)]
        for pattern in self.options.output_quant:
            for name in names:
                if fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern in name:
                    return True
        return False

    # ------------------------------------------------------------------ weights

    def _weight_dq(self, node: Node) -> Node | None:
        """A live DequantizeLinear of a constant with constant parameters: a stored weight (or bias)."""
        view = qdq(node)
        if view is None or view.is_quantize or id(node) in self._dead_ids:
            return None
        return node if view.of_constant and view.constant_parameters else None

    def _weight(self, dq: Node) -> bool:
        """T05, T06, T10, T15: a weight kept on the right axis, re-quantized, or stored float."""
        done = sum(len(v) for v in self.done.values())
        self._lower_weight(dq)
        return sum(len(v) for v in self.done.values()) != done

    def _lower_weight(self, dq: Node) -> None:
        view = QDQ(dq)
        kind = view.dtype
        q = const_value(view.input)
        scale = view.scale_array
        zp = view.zero_point_array
        rank = q.ndim
        axis = view.axis % rank if rank else 0
        block = view.block_size
        uses = self._uses(dq.outputs[0])
        name = dq.inputs[0].name or node_label(dq)
        if kind == DataType.INT32:
            self._to_float(dq, uses, q, scale, zp, axis, block)
            self.done["int32_bias"].append(name)
            return
        if kind in (DataType.INT4, DataType.UINT4):
            self._int4(dq, uses, q, scale, zp, axis, block, kind)
            return
        keep, fold = [], []
        out_axes: list[int] = []  # per kept use: the output-channel axis in the DequantizeLinear's layout
        for use in uses:
            node = use.node
            ok = (use.idx == 1 and weight_slot(node) == 1 and quantized_activation(node.inputs[0]))
            if ok:
                out_axes.append(output_axis(node, rank))
            else:
                reader = _transposed_weight_reader(use, rank)  # a tied lm_head: TensorRT moves the DQ past the Transpose
                if reader is not None:
                    ok = True
                    out_axes.append(reader[1])
            (keep if ok else fold).append(use)
        if fold:
            self._to_float(dq, fold, q, scale, zp, axis, block)
            self.done["float_weights"].append("/".join(sorted({_label(u.node) for u in fold})))
        if not keep:
            return
        if scalar_like(scale):
            wrong_axis = bool(block)
        elif scale.ndim == 1:
            wrong_axis = any(axis != a for a in out_axes)
        else:
            wrong_axis = True  # blocked 8-bit weights: TensorRT's blocks are INT4
        asymmetric = zp is not None and bool(np.any(zp.astype(np.float64) != 0))
        if kind == DataType.UINT8 and zp is not None and np.all(zp.astype(np.int16) == 128) and not wrong_axis:
            shifted = (q.astype(np.int16) - 128).astype(np.int8)
            self._replace_dq(dq, keep, shifted, scale, axis, block, DataType.INT8, "_int8")
            self.done["uint8_shifted"].append(name)
            return
        if kind not in _EIGHT_BIT or asymmetric or wrong_axis:
            self._requantize_weight(dq, keep, q, scale, zp, axis, block, kind)

    def _to_float(self, dq: Node, uses: list, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
                  axis: int, block: int) -> None:
        """The readers in `uses` read the float this DequantizeLinear computes, stored as an initializer."""
        float_type = scale.dtype if scale.dtype in (np.float16, np.float32) else np.float32
        array = dequantize(q, scale, zp, axis, block, float_type)
        source = dq.inputs[0]
        base = (source.name or "weight").removesuffix("_quantized")
        value = self._const(f"{base}_float", array)
        for k, v in source.metadata_props.items():
            value.metadata_props[k] = v
        for use in uses:
            use.node.replace_input_with(use.idx, value)
        if not self._uses(dq.outputs[0]) and not dq.outputs[0].is_graph_output():
            self._kill(dq)

    def _requantize_weight(self, dq: Node, uses: list, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
                           axis: int, block: int, kind: DataType | None) -> None:
        """Symmetric INT8 (FP8 stays FP8) per output channel of the readers, from the dequantized weight."""
        float_type = scale.dtype if scale.dtype in (np.float16, np.float32) else np.float32
        w = dequantize(q, scale, zp, axis, block, float_type)
        axes = {output_axis(u.node, q.ndim) for u in uses}
        if len(axes) != 1:
            self._to_float(dq, uses, q, scale, zp, axis, block)
            self.done["float_weights"].append(dq.inputs[0].name or node_label(dq))
            return
        new_axis = axes.pop()
        new_type = kind if kind == DataType.FLOAT8E4M3FN else DataType.INT8
        new_q, new_scale = symmetric_quantize(w, new_axis, 0, _QMAX[new_type], new_type)
        self._replace_dq(dq, uses, new_q, new_scale, new_axis, 0, new_type, "_trt")
        self.done["requantized_weights"].append(dq.inputs[0].name or node_label(dq))

    def _replace_dq(self, dq: Node, uses: list, q: np.ndarray, scale: np.ndarray, axis: int, block: int,
                    kind: DataType, suffix: str, *, zero_point: np.ndarray | None = None) -> None:
        """A new DequantizeLinear (zero point 0 unless given) for the readers in `uses`."""
        source = dq.inputs[0]
        base = (source.name or "weight").removesuffix("_quantized")
        q_value = self._const(f"{base}{suffix}_quantized", q)
        for k, v in source.metadata_props.items():
            q_value.metadata_props[k] = v
        s_value = self._const(f"{base}{suffix}_scale", scale)
        zp = np.zeros(scale.shape, dtype=_np_type(kind)) if zero_point is None else zero_point
        z_value = self._const(f"{base}{suffix}_zero_point", zp)
        attributes = {"axis": axis} if scale.ndim else {}
        if block:
            attributes["block_size"] = block
        new = make_node("DequantizeLinear", [q_value, s_value, z_value], attributes=attributes,
                        name=self.build.node_name(f"{base}{suffix}_DequantizeLinear"),
                        output_names=[self.build.fresh(f"{base}{suffix}_dequantized")])
        if dq.outputs[0].dtype is not None:  # a shape without a type does not serialize
            new.outputs[0].dtype = dq.outputs[0].dtype
            new.outputs[0].shape = dq.outputs[0].shape
        for k, v in dq.metadata_props.items():
            new.metadata_props[k] = v
        annotate(new, PROVENANCE, "lower-tensorrt")
        self.graph.insert_before(dq, [new])
        for use in uses:
            use.node.replace_input_with(use.idx, new.outputs[0])
        if not self._uses(dq.outputs[0]) and not dq.outputs[0].is_graph_output():
            self._kill(dq)

    def _int4(self, dq: Node, uses: list, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
              axis: int, block: int, kind: DataType) -> None:
        name = dq.inputs[0].name or node_label(dq)
        gemm_k = all(use.idx == 1 and weight_slot(use.node) == 1 and use.node.op_type in GEMM_OPS
                     and reduction_axis(use.node, q.ndim) == axis for use in uses)
        per_channel = (not block and scale.ndim == 1 and q.ndim == 2 and uses and all(
            use.idx == 1 and weight_slot(use.node) == 1 and use.node.op_type in GEMM_OPS
            and output_axis(use.node, 2) == axis for use in uses))
        if per_channel:
            # One scale per output channel = one block spanning all of K: the same numbers, TensorRT's form.
            k_axis = 1 - axis
            block = q.shape[k_axis]
            scale = np.expand_dims(scale, k_axis)
            zp = np.expand_dims(zp, k_axis) if zp is not None else None
            self._replace_dq(dq, uses, q, scale, k_axis, block, kind, "_blocked", zero_point=zp)
            self.done["int4_per_channel_blocked"].append(name)
            dq = dequantized(uses[0].node.inputs[1]).node
            uses = self._uses(dq.outputs[0])
            axis = k_axis
            gemm_k = True
        blocked = block > 0 and scale.ndim == q.ndim and q.shape[-1] % 2 == 0
        if not uses or not gemm_k or not blocked:
            self._to_float(dq, uses, q, scale, zp, axis, block)
            self.done["float_int4"].append(name)
            return
        zeros = zp.astype(np.int16) if zp is not None else np.zeros(scale.shape, np.int16)
        if kind == DataType.INT4 and not np.any(zeros):
            if zp is not None:  # an all-zero zero point: legal, dropped for clarity
                dq.resize_inputs(2)
            return
        if kind == DataType.UINT4 and np.all(zeros == 8):
            shifted = (q.astype(np.int16) - 8).astype(np.int8).astype(_np_type(DataType.INT4))
            self._replace_dq(dq, uses, shifted, scale, axis, block, DataType.INT4, "_int4")
            self.done["uint4_shifted"].append(name)
            return
        if self.options.int4_asymmetric == "float":
            self._to_float(dq, uses, q, scale, zp, axis, block)
            self.done["float_int4"].append(name)
            return
        float_type = scale.dtype if scale.dtype in (np.float16, np.float32) else np.float32
        if self.options.int4_asymmetric == "split" and q.ndim == 2 and all(_splittable(u.node, axis) for u in uses):
            self._split_int4(dq, uses, q, scale, zeros, axis, block, kind, float_type)
            self.done["int4_split"].append(name)
            return
        w = dequantize(q, scale, zp, axis, block, float_type)
        new_q, new_scale = symmetric_quantize(w, axis, block, 7.0, DataType.INT4)
        back = dequantize(new_q, new_scale, None, axis, block, float_type)
        rel = float(np.linalg.norm(back.astype(np.float64) - w) / max(np.linalg.norm(w.astype(np.float64)), 1e-30))
        self._replace_dq(dq, uses, new_q, new_scale, axis, block, DataType.INT4, "_int4")
        self.done["int4_requantized"].append(name)
        self._int4_rel = max(self._int4_rel, rel)
        self.extra["int4_requantized"] = f"largest relative weight change {self._int4_rel:.4f}"

    def _split_int4(self, dq: Node, uses: list, q: np.ndarray, scale: np.ndarray, zeros: np.ndarray, axis: int,
                    block: int, kind: DataType, float_type) -> None:
        """`x @ ((q - z)·s)` = `x @ ((q - o)·s)` + `(x @ E) @ ((o - z)·s)`: symmetric INT4 plus a per-block correction.

        o = 8 for UINT4 (0 for INT4) makes `q - o` an exact INT4 code; E [K, G]
        sums x over each block of K, so the correction is a float GEMM of K/block
        rows: exact up to float rounding, and legal for TensorRT (no zero point).
        """
        offset = 8 if kind == DataType.UINT4 else 0
        k = q.shape[axis]
        groups = scale.shape[axis]
        codes = (q.astype(np.int16) - offset).astype(np.int8).astype(_np_type(DataType.INT4))
        correction = (scale.astype(float_type) * (offset - zeros).astype(float_type)).astype(float_type)
        if axis == 1:  # a Gemm(transB=1) weight [N, K]: the correction GEMM wants [G, N]
            correction = np.ascontiguousarray(correction.T)
        sums = np.zeros((k, groups), dtype=float_type)
        sums[np.arange(k), np.arange(k) // block] = 1
        base = (dq.inputs[0].name or "weight").removesuffix("_quantized")
        self._replace_dq(dq, uses, codes, scale, axis, block, DataType.INT4, "_int4")
        e_value = self._const(f"{base}_block_sum", sums)
        c_value = self._const(f"{base}_zero_point_correction", correction)
        for use in uses:
            node = use.node
            g = self.graph
            name = node.outputs[0].name or "matmul"
            summed = make_node("MatMul", [node.inputs[0], e_value], name=self.build.node_name(f"{name}_block_sum"),
                               output_names=[self.build.fresh(f"{name}_block_sum")])
            corr = make_node("MatMul", [summed.outputs[0], c_value], name=self.build.node_name(f"{name}_zp_correction"),
                             output_names=[self.build.fresh(f"{name}_zp_correction")])
            add = make_node("Add", [node.outputs[0], corr.outputs[0]], name=self.build.node_name(f"{name}_corrected"),
                            output_names=[self.build.fresh(f"{name}_corrected")])
            for n in (summed, corr, add):
                annotate(n, PROVENANCE, "lower-tensorrt")
            out = node.outputs[0]
            if out.dtype is not None:
                add.outputs[0].dtype = out.dtype
                add.outputs[0].shape = out.shape
            g.insert_after(node, [summed, corr, add])
            for reader in list(out.uses()):
                if reader.node is not add:
                    reader.node.replace_input_with(reader.idx, add.outputs[0])
            if out.is_graph_output():
                old_name, corrected = out.name, add.outputs[0].name
                self.build.rename(out, f"{old_name}_uncorrected")
                add.outputs[0].name = old_name
                self.build.reserve(old_name)
                self.build.release(corrected)
                for i, value in enumerate(g.outputs):
                    if value is out:
                        g.outputs[i] = add.outputs[0]

    # ------------------------------------------------------------------ Concat

    def _quantized_concat(self, node: Node) -> Node | None:
        """A standard Concat (the rule looks at its inputs' Q/DQ)."""
        return node if node.op_type == "Concat" and node.domain in ONNX_DOMAINS else None

    def _concat(self, node: Node) -> bool:
        """T13: inputs all DequantizeLinear get one scale; a Concat mixing quantized and float reads float."""
        slots = [(i, v) for i, v in enumerate(node.inputs) if v is not None and not is_const(v)]
        dqs = [dequantized(v) for _, v in slots]
        if not any(dqs):
            return False
        if not all(dqs) or any(dq.of_constant for dq in dqs if dq is not None):
            for (i, _), dq in zip(slots, dqs, strict=True):
                if dq is not None and not dq.of_constant and (src := dq.quantize):
                    node.replace_input_with(i, src.input)
            self.done["concat_float"].append(node_label(node))
            return True
        first = dqs[0]
        kinds = {dq.dtype for dq in dqs}
        if all(dq.same_parameters(first) for dq in dqs):
            return False
        kind = kinds.pop() if len(kinds) == 1 else None
        scales = [dq.scale_array for dq in dqs]
        if kind not in _QMAX or any(s is None or not scalar_like(s) for s in scales):
            return False
        float_type = scales[0].dtype
        new_scale = np.asarray(max(float(s.reshape(())) for s in scales), dtype=float_type)
        base = node.outputs[0].name or "concat"
        s_value = self._const(f"{base}_input_scale", new_scale)
        z_value = self._const(f"{base}_input_zero_point", np.zeros((), dtype=_np_type(kind)))
        for (i, v), dq in zip(slots, dqs, strict=True):
            src = dq.quantize
            if src is None:
                continue
            pair = self._qdq(src.input, s_value, z_value, kind, f"{v.name}_concat", before=node)
            node.replace_input_with(i, pair)
        self.done["concat_unified"].append(node_label(node))
        return True

    def _qdq(self, x: Value, scale: Value, zero_point: Value, kind: DataType, base: str, *, before: Node) -> Value:
        g = self.graph
        q = make_node("QuantizeLinear", [x, scale, zero_point], name=self.build.node_name(f"{base}_QuantizeLinear"),
                      output_names=[self.build.fresh(f"{base}_quantized")])
        dq = make_node("DequantizeLinear", [q.outputs[0], scale, zero_point], name=self.build.node_name(f"{base}_DequantizeLinear"),
                       output_names=[self.build.fresh(f"{base}_dequantized")])
        if x.dtype is not None:
            q.outputs[0].dtype = kind
            dq.outputs[0].dtype = x.dtype
            q.outputs[0].shape = dq.outputs[0].shape = x.shape
        for n in (q, dq):
            annotate(n, PROVENANCE, "lower-tensorrt")
        g.insert_before(before, [q, dq])
        return dq.outputs[0]

    # ------------------------------------------------------------------ residual Add

    def _residual_add(self, node: Node) -> ResidualAdd | None:
        """T12: an Add fused into a quantized Conv whose residual input is not quantized."""
        found = residual_add(node, quantized_conv)
        return found if found is not None and not quantized_activation(found.residual) else None

    def _collect_residual(self, found: ResidualAdd) -> bool:
        """Residuals get their Q/DQ together after the walk (one calibration run for those that need one)."""
        self._pending_residuals.append((found.add, found.index, found.residual, found.conv))
        return False

    def _residuals(self) -> None:
        pending = self._pending_residuals
        if not pending:
            return
        missing: list[tuple[Node, int, Value, Node]] = []
        for add, idx, x, conv in pending:
            existing = self._existing_dq(x, conv)
            if existing is not None:
                add.replace_input_with(idx, existing)
                self.done["residual_reused"].append(node_label(add))
            else:
                missing.append((add, idx, x, conv))
        if missing:
            self._calibrated_residuals(missing)

    def _existing_dq(self, x: Value, conv: Node) -> Value | None:
        """A DequantizeLinear output of `x` (through a plain Q → DQ pair) in the Conv's activation format."""
        conv_dq = dequantized(conv.inputs[0])
        want = conv_dq.dtype if conv_dq is not None else DataType.INT8
        for use in self._uses(x):
            q = use.node
            if q.op_type != "QuantizeLinear" or use.idx != 0 or quantized_type(q) != want:
                continue
            if not scalar_like(QDQ(q).scale_array):
                continue
            for dq_use in self._uses(q.outputs[0]):
                if dq_use.node.op_type == "DequantizeLinear":
                    return dq_use.node.outputs[0]
        return None

    def _calibrated_residuals(self, missing: list[tuple[Node, int, Value, Node]]) -> None:
        from optc.passes.analyses.activation_histograms import ActivationHistograms

        names = tuple(sorted({x.name for _, _, x, _ in missing}))
        try:
            histograms = self.am.get(ActivationHistograms, self.model, values=names)
        except OptcError as exc:
            labels = ",".join(node_label(a) for a, _, _, _ in missing)
            self.done["residual_uncalibrated"].append(labels)
            self.extra["residual_uncalibrated"] = str(exc).split(": ")[-1][:160]
            return
        made: dict[tuple[str, DataType], Value] = {}
        for add, idx, x, conv in missing:
            conv_dq = dequantized(conv.inputs[0])
            kind = (conv_dq.dtype if conv_dq is not None else None) or DataType.INT8
            key = (x.name, kind)
            if key not in made:
                threshold = histograms[x.name].threshold("minmax")
                float_type = np.float16 if x.dtype == DataType.FLOAT16 else np.float32
                scale = np.asarray(threshold / _QMAX[kind] if threshold > 0 else 1.0, dtype=float_type)
                s_value = self._const(f"{x.name}_residual_scale", scale)
                z_value = self._const(f"{x.name}_residual_zero_point", np.zeros((), dtype=_np_type(kind)))
                made[key] = self._qdq(x, s_value, z_value, kind, f"{x.name}_residual", before=add)
            add.replace_input_with(idx, made[key])
            self.done["residual_calibrated"].append(node_label(add))

    # ------------------------------------------------------------------ clean-up and notes

    def drop_dead(self) -> None:
        """Remove replaced nodes, then initializers that were read before this pass and are read by nothing now."""
        if self.dead:
            self.graph.remove(self.dead, safe=True)
        drop_unused_initializers(self.graph, [v for n, v in self.graph.initializers.items() if n in self.used_before])

    def notes(self) -> list[str]:
        texts = {
            "int16_activations": "INT16 activation Q/DQ left float (TensorRT has no INT16 Q/DQ)",
            "uint16_activations": "UINT16 activation Q/DQ left float (TensorRT has no 16-bit Q/DQ)",
            "int32_activations": "INT32 activation Q/DQ left float",
            "uint32_activations": "UINT32 activation Q/DQ left float",
            "int4_activations": "INT4 activation Q/DQ left float (TensorRT's INT4 is weight-only)",
            "uint4_activations": "UINT4 activation Q/DQ left float (TensorRT's INT4 is weight-only)",
            "asymmetric_activations": "asymmetric activation Q/DQ made symmetric INT8 covering the same range",
            "per-channel_activations": "per-channel activation Q/DQ made per-tensor (largest scale)",
            "uint8_shifted": "UINT8 Q/DQ with zero point 128 re-encoded as INT8 (exact)",
            "shared_qdq": "readers of a weighted op's activation Q/DQ that want float read the float tensor",
            "output_quantization": "Q/DQ on weighted-op outputs with no quantized consumer removed",
            "int32_bias": "int32 bias DequantizeLinear folded to float",
            "float_weights": "8-bit weights of ops without quantized activations stored float "
                             "(TensorRT's weight-only quantization is INT4 GEMMs)",
            "requantized_weights": "8-bit weights re-quantized symmetric per output channel",
            "float_int4": "INT4 weights TensorRT cannot take as blocked GEMM weights stored float",
            "int4_per_channel_blocked": "per-channel INT4 weights written as one block along K (exact)",
            "uint4_shifted": "UINT4 weights with zero point 8 re-encoded as INT4 (exact)",
            "int4_requantized": "asymmetric INT4 blocks re-quantized symmetric",
            "int4_split": "asymmetric INT4 weights split into symmetric INT4 + a per-block zero-point correction GEMM (exact)",
            "concat_float": "Concats mixing quantized and float inputs read float inputs",
            "concat_unified": "Concat inputs given one scale",
            "residual_reused": "residual Add inputs read through the tensor's existing Q/DQ",
            "residual_calibrated": "residual Add inputs given a calibrated Q/DQ",
            "residual_uncalibrated": "residual Add inputs NOT quantized (no calibration data)",
        }
        lines = []
        for key, items in self.done.items():
            shown = ", ".join(_compress(items))
            extra = f"; {self.extra[key]}" if key in self.extra else ""
            lines.append(f"{len(items)} {texts.get(key, key)}{extra}: {shown}")
        return lines


def _transposed_weight_reader(use, rank: int) -> tuple[Node, int] | None:
    """(op, output-channel axis in the Transpose's input layout) when `use` is a Transpose whose only reader
    is a weighted op's weight with a quantized activation (a tied lm_head reading an int8 table), else None.

    TensorRT propagates a DequantizeLinear through a Transpose (placement rule 8), so the
    weight stays quantized and the table is stored once."""
    t = use.node
    if use.idx != 0 or not t.outputs or sole_transpose(t.outputs[0]) is None:
        return None
    reader = next(iter(t.outputs[0].uses()))
    node, idx = reader.node, reader.idx
    if idx != 1 or weight_slot(node) != 1 or not quantized_activation(node.inputs[0]):
        return None
    perm = transpose_perm(t, rank)
    return node, perm[output_axis(node, rank)]


def _splittable(node: Node, axis: int) -> bool:
    """A MatMul reading B [K, N] blocked along K, or a plain Gemm (alpha 1, no transA) blocked along its K."""
    if node.op_type == "Gemm":
        if int_attr(node, "transA", 0):
            return False
    elif node.op_type != "MatMul":
        return False
    alpha = node.attributes.get("alpha")
    if alpha is not None and alpha.as_float() != 1.0:
        return False
    return axis == weight_axes(node, 2)[1]


def _label(node: Node) -> str:
    """A node's name for notes: the parameter its weight came from when `quantize` recorded it."""
    info = annotation(node, QUANTIZATION) or annotation(node, QUANTIZATION_SKIPPED)
    if isinstance(info, dict) and info.get("weight_source"):
        return str(info["weight_source"]).removesuffix(".weight")
    for value in node.inputs[1:2]:
        if value is not None and value.const_value is not None:
            return source_name(value).removesuffix(".weight")
    return node_label(node)


def _compress(items: list[str], limit: int = 4) -> list[str]:
    """Item labels with layer numbers folded: 'model.layers.N.mlp.down_proj ×30' rather than 30 names."""
    import re

    groups: dict[str, int] = {}
    for item in items:
        for part in item.split(","):
            key = re.sub(r"\d+", "N", part)
            groups[key] = groups.get(key, 0) + 1
    shown = [f"{k} x{n}" if n > 1 else k for k, n in groups.items()]
    return shown[:limit] + ([f"... ({len(shown) - limit} more)"] if len(shown) > limit else [])


__all__ = ["LowerTensorRT", "dequantize", "symmetric_quantize"]
