"""`lower-ort-int8`: rewrite 8-bit Q/DQ into the forms onnxruntime's CPU kernels run fastest, exactly.

The ort backend runs this before writing the model (`OrtBackend.legalize`). Every
rewrite keeps the dequantized values bit-identical (splitting a Gemm's bias only
moves one float addition); what changes is which onnxruntime kernel computes them:

* integer MatMul/Gemm: activations (and with `kernel=u8u8` weights) re-encoded as
  uint8 with zero point +128 so every pair fuses into `MatMulIntegerToFloat` /
  `QGemm`; `auto` picks u8s8 where it is exact (VNNI, or weights whose K pairs
  cannot saturate: `optc.passes.int8_pairs`), else u8u8, and keeps int8 off x86;
  `kernel=u8s8` on a CPU without VNNI is the one opt-in that is not exact;
* a tied int8 lm_head reads `DQ(Transpose(T))`, folded at session load, so the file
  keeps one table;
* weights of ops that stay float become `Cast → Mul`, folded to float at load;
* embedding Gathers read the 8-bit rows first and dequantize only those.

Each rewritten node is annotated `ort_lowering`; the chosen kernel and host go into
the model metadata, and a model lowered once is not lowered again by `kernel=auto`
(`--passes 'w8a8,lower-ort-int8{kernel=u8s8}'` keeps its choice). The measurements
behind these forms: README (Results) and tools/bench_ort_int8_forms.py.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.ir import (
    DataType,
    Graph,
    Model,
    Node,
    Shape,
    Value,
    add_initializer,
    annotate,
    constant_array,
    is_constant,
    make_node,
    model_metadata,
    set_model_metadata,
    sole_transpose,
    tensor,
)
from optc.ir.annotations import ORT_LOWERING, PROVENANCE
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.ir.patterns.match import producer
from optc.ir.patterns.ops import GEMM_OPS
from optc.ir.patterns.qdq import QDQ
from optc.ir.patterns.rewrite import Rule, apply_rules
from optc.ir.patterns.weights import weight_axes
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.passes.int8_pairs import pair_sums_within

Kernel = Literal["auto", "u8u8", "u8s8", "keep"]

#: Weight element types whose DequantizeLinear can become Cast → Mul (onnxruntime casts all of them on CPU).
_FOLDABLE = (DataType.INT8, DataType.UINT8, DataType.FLOAT8E4M3FN)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})


def host_kernel() -> tuple[str, str]:
    """The exact, fastest integer encoding for this machine's onnxruntime CPU kernels, and why."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return "keep", f"{machine or 'unknown'} CPU: onnxruntime's int8 kernels are exact, Q/DQ kept"
    flags = cpu_flags()
    vnni = sorted(flags & _VNNI_FLAGS)
    if vnni:
        return "u8s8", f"x86 with {'/'.join(vnni)}: uint8 x int8 accumulates in int32 (exact)"
    known = "AVX2 without VNNI" if flags else "x86, CPU flags unknown"
    return "u8u8", f"{known}: uint8 x int8 saturates int16 pair sums, uint8 x uint8 is exact"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@register_pass("lower-ort-int8")
class LowerOrtInt8(Pass):
    """Rewrite 8-bit Q/DQ for onnxruntime CPU: fused integer MatMul/Gemm, weights of float ops dequantized at load (exact)."""

    @dataclass
    class Options:
        kernel: Kernel = option(
            "auto",
            help="integer MatMul/Gemm encoding: u8u8 (exact on every CPU), u8s8 (fastest; exact with VNNI or "
            "weights with |q[2i]+q[2i+1]| <= 128 along K), keep (as quantize wrote it), auto (exact and fastest for this host)",
        )
        dequantize_at_load: bool = option(
            True, help="weights of ops that stay float: Cast->Mul that onnxruntime folds at load, not DequantizeLinear"
        )
        gather: bool = option(True, help="Gather from a dequantized table: gather 8-bit rows, then dequantize them")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        kernel, reason = self.options.kernel, "requested"
        earlier = model_metadata(model, ORT_LOWERING)
        if kernel == "auto" and earlier:
            # Lowered already (e.g. `--passes '...,lower-ort-int8{kernel=u8s8}'` before the backend's own run).
            kernel = "keep"
        elif kernel == "auto":
            kernel, reason = host_kernel()
        rewriter = _Rewriter(graph, kernel, safe_s8=self.options.kernel == "auto")
        for rules in rewriter.rule_sets(integer=kernel != "keep", gather=self.options.gather,
                                        at_load=self.options.dequantize_at_load):
            result = apply_rules(graph, rules, fixpoint=False)
            rewriter.misses.extend(result.reasons())
        rewriter.drop_dead()
        stats = rewriter.stats
        if rewriter.misses:
            lowered = stats["matmul-u8u8"] + stats["matmul-u8s8"]
            message = match_summary(lowered, rewriter.misses, "8-bit Q/DQ MatMul/Gemm ops", "lowered to integer kernels")
            am.context.remark("missed", message, matched_none=not lowered)
        modified = any(stats.values())
        if kernel == "u8u8" and stats["matmul-u8s8"]:
            reason += f"; u8s8 (exact) for the {stats['matmul-u8s8']} whose weights' K pairs cannot saturate"
        if modified and not earlier:
            set_model_metadata(model, ORT_LOWERING, {"kernel": kernel, "reason": reason, **stats})
        return PassResult(model, modified, None, stats)


@dataclass(frozen=True)
class _IntegerSite:
    """An 8-bit Q/DQ MatMul/Gemm: the op, its activation's DQ and Q, its weight's DQ, the activation type."""

    node: Node
    act_dq: Node
    w_dq: Node
    q: Node
    act_type: DataType


class _Rewriter:
    def __init__(self, graph: Graph, kernel: str, *, safe_s8: bool) -> None:
        self.graph = graph
        self.build = Builder(graph)  # owns the fresh names of everything this run adds
        self.kernel = kernel
        self.safe_s8 = safe_s8
        self.stats = {"matmul-u8u8": 0, "matmul-u8s8": 0, "dequantized-at-load": 0, "gathers": 0}
        #: Why 8-bit Q/DQ MatMuls/Gemms were left as written (not lowered to an integer kernel).
        self.misses: list[str] = []
        self._u8_zero_points: dict[object, Value] = {}
        self._orphan_candidates: list[Value] = []
        self._u8_activations: set[int] = set()
        self._u8_weights: set[int] = set()
        self._dead: list[Node] = []

    def rule_sets(self, *, integer: bool, gather: bool, at_load: bool) -> list[list[Rule]]:
        """The lowering's rule sets, in the order they run (each once over the graph, in graph order)."""
        sets = []
        if integer:
            sets.append([Rule("untie-transpose", self._tied_head, self._untie, exclusive=False),
                         Rule("integer-op", self._integer_site, self._integer_op, self._integer_reason)])
        if gather:
            sets.append([Rule("gather", _standard("Gather"), self.gather)])
        if at_load:
            sets.append([Rule("dequantize-at-load", _standard("DequantizeLinear"), self.dequantize_at_load)])
        return sets

    # ------------------------------------------------------------------ integer MatMul / Gemm

    def _tied_head(self, node: Node) -> tuple[Node, Node] | None:
        """A MatMul/Gemm with a Q/DQ activation whose weight is not read through a DequantizeLinear."""
        if node.op_type not in GEMM_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            return None
        act_dq = producer(node.inputs[0], "DequantizeLinear")
        if act_dq is None or producer(node.inputs[1], "DequantizeLinear") is not None:
            return None
        return node, act_dq

    def _untie(self, found: tuple[Node, Node]) -> bool:
        return self._untie_transpose(*found) is not None

    def _integer_site(self, node: Node) -> _IntegerSite | None:
        """An 8-bit Q/DQ MatMul/Gemm: Q → DQ activation, a constant 8-bit weight through a DequantizeLinear."""
        if node.op_type not in GEMM_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            return None
        act_dq, w_dq = producer(node.inputs[0], "DequantizeLinear"), producer(node.inputs[1], "DequantizeLinear")
        if act_dq is None or w_dq is None:
            return None
        q = producer(act_dq.inputs[0], "QuantizeLinear")
        weight = w_dq.inputs[0]
        if q is None or not (is_constant(weight) or _transposed_table(weight) is not None) or is_constant(q.inputs[0]):
            return None
        eight_bit = (DataType.INT8, DataType.UINT8)
        act_type = QDQ(act_dq).dtype
        if act_type not in eight_bit or weight.dtype not in eight_bit:
            return None  # 16-bit activations or low-bit weights: not an 8-bit integer op, they run in float
        return _IntegerSite(node, act_dq, w_dq, q, act_type)

    def _integer_reason(self, site: _IntegerSite) -> str | None:
        """Why onnxruntime's integer kernels cannot take the site as written, or None."""
        if not (_plain_8bit(site.act_dq) and _plain_8bit(site.w_dq) and _plain_8bit(site.q)):
            return "blocked or non-constant quantization parameters"
        if not _per_output_channel(site.node, site.w_dq):
            return "weight scales that are not per output channel"
        if site.act_type == DataType.INT8 and not self._activation_readers(site.q):
            return "a quantized activation that other ops also read"  # left as written
        return None

    def _integer_op(self, site: _IntegerSite) -> bool:
        node, w_dq, q, act_type = site.node, site.w_dq, site.q, site.act_type
        weight = w_dq.inputs[0]
        weight_to_u8 = self.kernel == "u8u8" and weight.dtype == DataType.INT8
        if weight_to_u8 and self.safe_s8 and _pair_safe(node, weight):
            weight_to_u8 = False  # byte-pair sums of these weights cannot saturate: the faster u8s8 is exact
        if act_type == DataType.INT8:
            self._activation_to_u8(q)
        if weight_to_u8:
            self._weight_to_u8(w_dq)
        if node.op_type == "Gemm":
            self._split_gemm_bias(node)
        kernel = "u8u8" if w_dq.inputs[0].dtype == DataType.UINT8 else "u8s8"
        self.stats[f"matmul-{kernel}"] += 1
        annotate(node, ORT_LOWERING, {
            "kernel": kernel,
            "runs_as": "com.microsoft.MatMulIntegerToFloat" if node.op_type == "MatMul" else "com.microsoft.QGemm",
        })
        return True

    def _untie_transpose(self, node: Node, act_dq: Node) -> Node | None:
        """A tied lm_head `MatMul(DQ(x), Transpose(DQ(T, axis=0)))` → `MatMul(DQ(x), DQ(Transpose(T), axis=1))`.

        onnxruntime folds the int8 `Transpose(T)` into an initializer when the
        session loads and then fuses the MatMul into its integer kernel, while
        the file keeps the one table the embedding Gather also reads. Only
        where the u8s8 kernel is exact for the table (it stays int8, shared):
        VNNI, or pairs along its rows within the limit. Returns the new
        DequantizeLinear, or None (nothing changed).
        """
        if node.op_type != "MatMul" or producer(act_dq.inputs[0], "QuantizeLinear") is None:
            return None
        transposed = sole_transpose(node.inputs[1])
        if transposed is None or transposed[1] not in (None, [1, 0]):  # a 2-D table is checked below
            return None
        t = transposed[0]
        dq = producer(t.inputs[0], "DequantizeLinear")
        if dq is None or not _plain_8bit(dq) or not is_constant(dq.inputs[0]):
            return None
        table, scale = dq.inputs[0], dq.inputs[1]
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        axis = dq.attributes.get("axis")
        if table.dtype != DataType.INT8 or table.shape is None or len(table.shape) != 2 or scale.shape is None:
            return None
        if len(scale.shape) == 1 and (axis.as_int() if axis is not None else 1) % 2 != 0:
            return None  # per-column scales of the table are per-input-channel scales of the head
        if zp is not None and np.any(constant_array(zp)):
            return None
        if self.kernel == "u8u8" and not (self.safe_s8 and pair_sums_within(constant_array(table), 1)):
            return None
        g, name = self.graph, node.outputs[0].name
        t_new = make_node("Transpose", [table], attributes={"perm": [1, 0]}, name=self.build.node_name(f"{table.name}_transpose"),
                          output_names=[self.build.fresh(f"{table.name}_transposed")])
        t_new.outputs[0].dtype = DataType.INT8
        t_new.outputs[0].shape = Shape([table.shape[1], table.shape[0]])
        inputs = [t_new.outputs[0], scale] + ([zp] if zp is not None else [])
        dq_new = make_node("DequantizeLinear", inputs, attributes={"axis": 1}, name=self.build.node_name(f"{name}_weight_dq"),
                           output_names=[self.build.fresh(f"{name}_weight")])
        _copy_type(dq_new.outputs[0], node.inputs[1])
        for n in (t_new, dq_new):
            annotate(n, PROVENANCE, "lower-ort-int8")
        annotate(t_new, ORT_LOWERING, {"rewrite": "tied int8 table transposed at session load for the integer kernel"})
        g.insert_before(node, [t_new, dq_new])
        node.replace_input_with(1, dq_new.outputs[0])
        if not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
            self._dead.append(t)
        return dq_new

    def _split_gemm_bias(self, gemm: Node) -> None:
        """Gemm(A, B, C) → Gemm(A, B) + beta·C: onnxruntime fuses a QDQ Gemm into QGemm only without a float C."""
        c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        if c is None or not is_constant(c):
            return
        beta_attr = gemm.attributes.get("beta")
        beta = beta_attr.as_float() if beta_attr is not None else 1.0
        g = self.graph
        bias = c
        if beta != 1.0:
            array = constant_array(c)
            bias = self.build.initializer(f"{c.name}_beta", (array * np.asarray(beta, array.dtype)).astype(array.dtype))
            del gemm.attributes["beta"]
        name = gemm.outputs[0].name
        gemm.replace_input_with(2, None)
        gemm.resize_inputs(2)
        add = make_node("Add", [gemm.outputs[0], bias], name=self.build.node_name(f"{name}_bias"),
                        output_names=[self.build.fresh(f"{name}_with_bias")])
        annotate(add, PROVENANCE, "lower-ort-int8")
        _copy_type(add.outputs[0], gemm.outputs[0])
        g.insert_after(gemm, [add])
        for use in list(gemm.outputs[0].uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, add.outputs[0])
        if gemm.outputs[0].is_graph_output():
            _replace_graph_output(self.build, gemm.outputs[0], add.outputs[0])
        self._orphan_candidates.append(c)

    def _activation_readers(self, q: Node) -> list[Node] | None:
        """The DequantizeLinear readers of an activation's QuantizeLinear, or None if anything else reads it."""
        out = q.outputs[0]
        readers = [u.node for u in out.uses()]
        if id(q) in self._u8_activations:
            return readers
        if out.is_graph_output() or not readers:
            return None
        if any(r.op_type != "DequantizeLinear" or r.domain not in ("", "ai.onnx") or not _plain_8bit(r) for r in readers):
            return None
        return readers

    def _activation_to_u8(self, q: Node) -> None:
        """int8 Q and its DQ readers become uint8 with zero point +128: the same dequantized values."""
        if id(q) in self._u8_activations:
            return
        readers = self._activation_readers(q)
        assert readers is not None
        for n in (q, *readers):
            self._to_u8_zero_point(n)
        if "output_dtype" in q.attributes:
            del q.attributes["output_dtype"]
        if q.outputs[0].dtype is not None:
            q.outputs[0].dtype = DataType.UINT8
        annotate(q, ORT_LOWERING, {"encoding": "uint8, zero point +128"})
        self._u8_activations.add(id(q))

    def _weight_to_u8(self, dq: Node) -> None:
        """An int8 weight becomes uint8 (w + 128) and its DequantizeLinear readers' zero points + 128."""
        weight = dq.inputs[0]
        if id(weight) in self._u8_weights:
            return
        shifted = (constant_array(weight).astype(np.int16) + 128).astype(np.uint8)
        readers = [u.node for u in weight.uses()]
        if weight.is_graph_output() or any(r.op_type != "DequantizeLinear" or r.inputs[0] is not weight for r in readers):
            # Something else reads the int8 weight: the uint8 copy is this DequantizeLinear's own.
            copy = self.build.initializer(f"{weight.name}_u8", shifted)
            dq.replace_input_with(0, copy)
            readers, weight = [dq], copy
        else:
            weight.const_value = tensor(shifted, name=weight.name)
            weight.dtype = DataType.UINT8
        for r in readers:
            self._to_u8_zero_point(r)
            annotate(r, ORT_LOWERING, {"encoding": "uint8, zero point +128"})
        self._u8_weights.add(id(weight))

    def _to_u8_zero_point(self, node: Node) -> None:
        """Give a Q/DQ the uint8 zero point (int8 zero point + 128; 128 when it had none)."""
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        if zp is not None and zp.dtype == DataType.UINT8:
            return
        key = id(zp) if zp is not None else ("none", id(node.inputs[1]))
        new = self._u8_zero_points.get(key)
        if new is None:
            if zp is not None:
                shifted = (constant_array(zp).astype(np.int16) + 128).astype(np.uint8)
                name = f"{zp.name}_u8"
                self._orphan_candidates.append(zp)
            else:
                scale = node.inputs[1]
                shifted = np.full(list(scale.shape or []), 128, dtype=np.uint8)
                name = f"{scale.name}_zero_point_u8"
            new = self.build.initializer(name, shifted)
            self._u8_zero_points[key] = new
        if len(node.inputs) > 2:
            node.replace_input_with(2, new)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, new)

    # ------------------------------------------------------------------ Gather of a dequantized table

    def gather(self, node: Node) -> bool:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return False
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            return False
        dq = producer(node.inputs[0], "DequantizeLinear")
        if dq is None or not _plain_8bit(dq) or not _foldable(dq):
            return False
        table = dq.inputs[0]
        if table.shape is None or len(table.shape) != 2:
            return False
        scale, zp = dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None
        per_row = constant_array(scale).size > 1
        dq_axis = dq.attributes.get("axis")
        if per_row and (dq_axis.as_int() if dq_axis is not None else 1) % 2 != 0:
            return False  # per-column scales (DequantizeLinear's default axis is 1): gathering rows does not select them
        g, ids, name = self.graph, node.inputs[1], node.outputs[0].name
        rows = make_node("Gather", [table, ids], attributes={"axis": 0}, name=self.build.node_name(f"{name}_rows"),
                         output_names=[self.build.fresh(f"{name}_rows_quantized")])
        rows.outputs[0].dtype = table.dtype
        new_nodes = [rows]
        if per_row:
            # Per-row scales (and zero points) gathered with the rows, then (q - zp) · scale as DequantizeLinear computes it.
            row_scale = make_node("Gather", [scale, ids], attributes={"axis": 0}, name=self.build.node_name(f"{name}_row_scale"))
            unsq_axes = self.build.initializer(f"{name}_last_axis", np.array([-1], dtype=np.int64))
            scale_col = make_node("Unsqueeze", [row_scale.outputs[0], unsq_axes], name=self.build.node_name(f"{name}_row_scale_col"))
            new_nodes += [row_scale, scale_col]
            zp_col = None
            if zp is not None and np.any(constant_array(zp)):
                row_zp = make_node("Gather", [zp, ids], attributes={"axis": 0}, name=self.build.node_name(f"{name}_row_zp"))
                zp_col = make_node("Unsqueeze", [row_zp.outputs[0], unsq_axes], name=self.build.node_name(f"{name}_row_zp_col"))
                new_nodes += [row_zp, zp_col]
            new_nodes += _cast_mul(self.build, rows.outputs[0], scale_col.outputs[0], zp_col.outputs[0] if zp_col else None,
                                   scale.dtype, name)
        else:
            new_dq = make_node("DequantizeLinear", [rows.outputs[0], scale, zp], name=self.build.node_name(f"{name}_DequantizeLinear"))
            new_nodes.append(new_dq)
        out = new_nodes[-1].outputs[0]
        _copy_type(out, node.outputs[0])
        for n in new_nodes:
            annotate(n, PROVENANCE, "lower-ort-int8")
        annotate(rows, ORT_LOWERING, {"rewrite": "gather 8-bit rows, then dequantize them"})
        g.insert_before(node, new_nodes)
        _replace_output(node.outputs[0], out, self.build)
        self._dead.append(node)
        if all(u.node is node for u in dq.outputs[0].uses()) and not dq.outputs[0].is_graph_output():
            self._dead.append(dq)  # the table is no longer dequantized as a whole
        self.stats["gathers"] += 1
        return True

    # ------------------------------------------------------------------ weights of ops that stay float

    def dequantize_at_load(self, node: Node) -> bool:
        """A weight DequantizeLinear that no integer kernel absorbs → Cast → Mul, folded by onnxruntime at load."""
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or not _plain_8bit(node):
            return False
        if not is_constant(node.inputs[0]) or not _foldable(node) or node.outputs[0].is_graph_output():
            return False
        dead = {id(n) for n in self._dead}
        readers = [u.node for u in node.outputs[0].uses() if id(u.node) not in dead]
        if not readers or all(_fused_integer(r) for r in readers):
            return False
        if not all(_float_weight_reader(r) for r in readers):
            return False
        g, w = self.graph, node.inputs[0]
        scale, zp = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        shape = _broadcast_shape(node, w, scale)
        if shape is None:
            return False
        new_nodes: list[Node] = []
        scale_in = scale
        if shape != list(scale.shape or []):
            scale_in = self.build.initializer(f"{scale.name}_bcast", constant_array(scale).reshape(shape))
        zp_in = None
        if zp is not None and np.any(constant_array(zp)):
            zp_in = add_initializer(g, self.build.fresh(f"{zp.name}_float"),
                                    constant_array(zp).astype(np.float32).astype(_np_float(scale)).reshape(shape))
        base = node.outputs[0].name
        new_nodes = _cast_mul(self.build, w, scale_in, zp_in, scale.dtype, base)
        out = new_nodes[-1].outputs[0]
        _copy_type(out, node.outputs[0])
        for n in new_nodes:
            annotate(n, PROVENANCE, "lower-ort-int8")
        annotate(new_nodes[-1], ORT_LOWERING, {"rewrite": "DequantizeLinear as Cast->Mul, folded at session load"})
        g.insert_before(node, new_nodes)
        for use in list(node.outputs[0].uses()):
            if id(use.node) not in dead and not _fused_integer(use.node):
                use.node.replace_input_with(use.idx, out)
        if all(id(u.node) in dead for u in node.outputs[0].uses()):
            self._dead.append(node)
        self.stats["dequantized-at-load"] += 1
        return True

    def drop_dead(self) -> None:
        """Remove the nodes this pass replaced, the producers left with no reader (onnxruntime would still run
        them: a whole-table DequantizeLinear costs 28 ms a window on SmolLM2), and initializers only they read."""
        dead = list(self._dead)
        while dead:
            for node in dead:
                self._orphan_candidates.extend(v for v in node.inputs if v is not None)
            removed = {id(n) for n in dead}
            producers = {id(p): p for n in dead for v in n.inputs if v is not None and (p := v.producer()) is not None}
            self.graph.remove(dead, safe=True)
            dead = [p for k, p in producers.items() if k not in removed and p.graph is self.graph and all(
                not o.uses() and not o.is_graph_output() for o in p.outputs)]
        drop_unused_initializers(self.graph, self._orphan_candidates)


# ---------------------------------------------------------------------- helpers


def _standard(op_type: str):
    """A rule's match: the node itself when it is a standard-domain `op_type` (the rewrite looks further)."""
    return lambda node: node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _copy_type(dst: Value, src: Value) -> None:
    """Give `dst` the dtype and shape of `src` (a shape is set only with a dtype: it would not serialize)."""
    if src.dtype is not None:
        dst.dtype = src.dtype
        dst.shape = src.shape


def _plain_8bit(node: Node) -> bool:
    """A Q/DQ without blocks, with constant scale (and zero point)."""
    view = QDQ(node)
    if view.block_size:
        return False
    return is_constant(view.scale) and (view.zero_point is None or is_constant(view.zero_point))


def _foldable(dq: Node) -> bool:
    data = dq.inputs[0]
    if data.dtype not in _FOLDABLE:
        return False
    scale = dq.inputs[1]
    return scale.dtype in (DataType.FLOAT, DataType.FLOAT16) and scale.shape is not None


def _transposed_table(value: Value) -> Value | None:
    """The int8 constant T when `value` is `Transpose(T)` (what `_untie_transpose` writes), else None."""
    t = producer(value, "Transpose")
    return t.inputs[0] if t is not None and is_constant(t.inputs[0]) else None


def _pair_safe(node: Node, weight: Value) -> bool:
    """An int8 weight whose adjacent pairs along K cannot saturate the u8s8 kernel (`optc.passes.int8_pairs`)."""
    table = _transposed_table(weight)
    if table is not None:  # W = Tᵀ: K runs along T's rows
        array = constant_array(table)
        return array is not None and array.ndim == 2 and pair_sums_within(array, 1)
    array = constant_array(weight)
    if array is None or array.ndim != 2:
        return False
    return pair_sums_within(array, weight_axes(node, 2)[1])


def _fused_integer(node: Node) -> bool:
    """A MatMul/Gemm whose activation input is an 8-bit Q → DQ: onnxruntime runs it as an integer kernel."""
    if node.op_type not in GEMM_OPS or node.domain not in ("", "ai.onnx"):
        return False
    dq = producer(node.inputs[0], "DequantizeLinear")
    return (
        dq is not None
        and producer(dq.inputs[0], "QuantizeLinear") is not None
        and QDQ(dq).dtype in (DataType.INT8, DataType.UINT8)
        and (w := producer(node.inputs[1], "DequantizeLinear")) is not None
        and QDQ(w).dtype in (DataType.INT8, DataType.UINT8)
        and _per_output_channel(node, w)
    )


def _per_output_channel(node: Node, w_dq: Node) -> bool:
    """A 2-D weight with one scale, or one per output column: what onnxruntime's integer kernels take."""
    weight, scale = w_dq.inputs[0], w_dq.inputs[1]
    if weight.shape is None or len(weight.shape) != 2 or scale.shape is None:
        return False
    if len(scale.shape) == 0 or (len(scale.shape) == 1 and scale.shape[0] == 1):
        return True
    if len(scale.shape) != 1:
        return False
    attr = w_dq.attributes.get("axis")
    axis = (attr.as_int() if attr is not None else 1) % 2
    return axis == weight_axes(node, 2)[0]


def _float_weight_reader(node: Node) -> bool:
    """Ops that read a weight in float: MatMul/Gemm (B), or a Transpose feeding them (a tied lm_head)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in GEMM_OPS:
        return True
    if node.op_type == "Transpose":
        return all(u.node.op_type in GEMM_OPS for u in node.outputs[0].uses())
    return False


def _broadcast_shape(dq: Node, w: Value, scale: Value) -> list[int] | None:
    """The shape that makes `scale` broadcast against the weight as DequantizeLinear's `axis` says."""
    if w.shape is None or scale.shape is None or any(not isinstance(d, int) for d in w.shape):
        return None
    rank = len(w.shape)
    if len(scale.shape) == 0 or (len(scale.shape) == 1 and scale.shape[0] == 1):
        return list(scale.shape)
    if len(scale.shape) != 1:
        return None
    attr = dq.attributes.get("axis")
    axis = (attr.as_int() if attr is not None else 1) % rank
    if w.shape[axis] != scale.shape[0]:
        return None
    shape = [1] * rank
    shape[axis] = scale.shape[0]
    return shape


def _np_float(value: Value):
    return np.float16 if value.dtype == DataType.FLOAT16 else np.float32


def _cast_mul(build: Builder, q: Value, scale: Value, zp: Value | None, float_type: DataType, base: str) -> list[Node]:
    """(float(q) - zp) · scale: DequantizeLinear's arithmetic in plain ops."""
    cast = make_node("Cast", [q], attributes={"to": int(float_type)}, name=build.node_name(f"{base}_Cast"),
                     output_names=[build.fresh(f"{base}_cast")])
    cast.outputs[0].dtype = float_type
    nodes = [cast]
    x = cast.outputs[0]
    if zp is not None:
        sub = make_node("Sub", [x, zp], name=build.node_name(f"{base}_Sub"), output_names=[build.fresh(f"{base}_centered")])
        nodes.append(sub)
        x = sub.outputs[0]
    mul = make_node("Mul", [x, scale], name=build.node_name(f"{base}_Mul"), output_names=[build.fresh(f"{base}_float")])
    nodes.append(mul)
    return nodes


def _replace_graph_output(build: Builder, old: Value, new: Value) -> None:
    """`new` takes `old`'s place (and name) among the graph outputs."""
    name, new_name = old.name, new.name
    build.rename(old, f"{name}_inner")
    new.name = name
    build.reserve(name)
    build.release(new_name)
    for i, out in enumerate(build.graph.outputs):
        if out is old:
            build.graph.outputs[i] = new


def _replace_output(old: Value, new: Value, build: Builder) -> None:
    """Point every reader of `old` at `new`; a graph output keeps its name."""
    if old.is_graph_output():
        name, new_name = old.name, new.name
        old.name = f"{name}.replaced"
        new.name = name
        build.reserve(old.name)
        build.release(new_name)
    old.replace_all_uses_with(new, replace_graph_outputs=True)


__all__ = ["LowerOrtInt8", "cpu_flags", "host_kernel"]
