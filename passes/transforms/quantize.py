"""`quantize`: insert standard ONNX Q/DQ around weighted ops, INT8 or FP8.

Follows TensorRT's explicit-quantization placement rules. Weights of MatMul, Gemm
and Conv become per-output-channel symmetric constants with a `DequantizeLinear`
(no Q at run time, biases stay float); activations get static per-tensor
`QuantizeLinear → DequantizeLinear` from calibration histograms (`calib=`), one
pair per tensor and precision shared by all its readers. The model is first
raised to the opset its Q/DQ need (`optc.ir.opset.ensure_opset`).

Options choose precision per op: `int16=` and `weight-only=` patterns, `exclude=`
(float), `min-sqnr=` (raise an activation whose measured 8-bit SQNR is too low),
`weight-bits=7` and `weight-pair-limit=128` (exact in onnxruntime's u8s8 kernel on
AVX2), `embeddings=true` (int8 Gather tables), `residual=` (Q/DQ on the input of an
Add after a quantized Conv, which TensorRT fuses) and `fp8-unsupported-convs=`.
Patterns match node, output, weight and source parameter names (substring or glob).

Every quantized node is annotated `quant` (formats, schemes, axis, scales and why
it got its precision); an op left float is annotated `quant_skipped` with the
reason. Activations need calibration data (an error without it); the output is
deterministic for a given model, calibration data and seed. The measured figures
behind these choices are in the README (Results).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.errors import MissingCalibrationData, OptcError
from optc.ir import (
    DataType,
    Model,
    Node,
    Value,
    annotate,
    annotation,
    constant_array,
    is_constant,
    make_node,
    sole_transpose,
    source_name,
)
from optc.ir.annotations import PROVENANCE, QUANTIZATION, QUANTIZATION_SKIPPED
from optc.ir.opset import ensure_opset
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.ir.patterns.ops import QUANTIZED_OPS
from optc.ir.patterns.qdq import dequantized
from optc.ir.patterns.residual import residual_adds
from optc.ir.patterns.weights import weight_view
from optc.passes.analyses.activation_histograms import (
    DEFAULT_BINS,
    FP8_E4M3_MAX,
    PERCENTILE_MIN_TAIL,
    ActivationHistograms,
)
from optc.passes.fp8_convs import fp8_conv_unsupported
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.int8_pairs import limit_pair_sums, pair_limited_scale
from optc.passes.layer_selector import LayerSelector, default_exclude
from optc.passes.linear_layers import FLOAT_TYPES, layer_names, matches_any

_NUMPY_FLOATS = {DataType.FLOAT: np.float32, DataType.FLOAT16: np.float16}


@dataclass(frozen=True)
class _Format:
    """A quantized element type: its name, numpy dtype, range and whether it is integer."""

    name: str  # "int8" | "int16" | "uint8" | "uint16" | "fp8"
    qmin: float
    qmax: float

    @property
    def bits(self) -> int:
        return 16 if "16" in self.name else 8

    def numpy_dtype(self):
        if self.name == "fp8":
            import ml_dtypes

            return ml_dtypes.float8_e4m3fn
        return np.dtype(self.name)

    def cast(self, scaled: np.ndarray) -> np.ndarray:
        """Round values already divided by the scale (ONNX QuantizeLinear: round half to even, saturate)."""
        if self.name == "fp8":
            return np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(self.numpy_dtype())
        return np.clip(np.rint(scaled), self.qmin, self.qmax).astype(self.numpy_dtype())


FORMATS = {
    "int8": _Format("int8", -127, 127),  # symmetric: -128 is never produced by the scales chosen here
    "int16": _Format("int16", -32767, 32767),
    "uint8": _Format("uint8", 0, 255),
    "uint16": _Format("uint16", 0, 65535),
    "fp8": _Format("fp8", -FP8_E4M3_MAX, FP8_E4M3_MAX),
}


@register_pass("quantize")
class Quantize(Pass):
    """Insert Q/DQ: per-channel symmetric weights, static per-tensor activations (INT8, INT16 where asked, or FP8)."""

    @dataclass
    class Options:
        weights: Literal["int8", "fp8", "none"] = option("int8", help="weight format (per output channel, symmetric)")
        activations: Literal["int8", "fp8", "none"] = option(
            "int8", help="activation format (static per tensor, from calibration); none: weight-only"
        )
        calib: Literal["minmax", "percentile", "mse", "entropy"] = option(
            "minmax", help="how activation ranges are chosen from the calibration histograms"
        )
        percentile: float = option(
            99.99, help="the percentile for calib=percentile (an activation with fewer than 10/(1 − p) calibration "
            "values, whose percentile would be its maximum, takes mse instead)"
        )
        calib_ops: list[str] = option(
            [], help="PATTERN:METHOD entries: the activation an op matching PATTERN reads takes its range by METHOD "
            "(minmax, percentile, mse, entropy) instead of calib; the first matching entry wins"
        )
        symmetric: bool = option(True, help="symmetric activations (zero point 0); false: asymmetric uint8")
        exclude: list[str] = option(default_exclude("quantize"), help="ops left in float (names, weight names, source names; substring or glob)")
        int16: list[str] = option([], help="ops whose activations use int16 Q/DQ instead")
        weight_only: list[str] = option([], help="ops whose weights are quantized but activations stay float")
        ops: list[Literal["MatMul", "Gemm", "Conv"]] = option(list(QUANTIZED_OPS), help="op types to quantize")
        embeddings: bool = option(False, help="also store constant Gather tables (embeddings) per row in the weight format")
        bins: int = option(DEFAULT_BINS, help="histogram bins per sign (a power of two)")
        min_sqnr: float = option(
            0.0,
            help="measured sensitivity: an activation whose expected 8-bit SQNR (dB, from its calibration histogram) "
            "is below this gets int16 (int8 runs) or stays float (fp8 runs); 0: off",
        )
        weight_bits: int = option(
            8, help="bits of int8 weights (7: weights within ±63, which onnxruntime's fast u8s8 kernel computes exactly)"
        )
        residual: bool = option(
            True, help="also quantize the other input of an Add that follows a quantized Conv (a residual), in the "
            "Conv's activation format: TensorRT fuses that Add into the Conv (ModelOpt quantizes it the same way)"
        )
        fp8_unsupported_convs: bool = option(
            False, help="with FP8, also quantize Convs TensorRT has no FP8 kernel for (under 16 channels, filters over "
            "32 taps; optc.passes.fp8_convs); default: they stay float"
        )
        weight_pair_limit: int = option(
            0,
            help="limit |q[2i] + q[2i+1]| of int8 MatMul/Gemm weights along K to this (128: onnxruntime's fast "
            "u8s8 kernel is then exact on AVX2 CPUs without VNNI); 0: off",
        )

        def validate(self) -> None:
            if self.weights == "none" and self.activations == "none" and not self.embeddings:
                raise ValueError("weights=none with activations=none quantizes nothing")
            if not 0.0 < self.percentile <= 100.0:
                raise ValueError(f"option 'percentile' must be in (0, 100], got {self.percentile}")
            if not self.symmetric and self.activations == "fp8":
                raise ValueError("FP8 activations are symmetric; drop symmetric=false")
            for method in (self.calib, *(_calib_entry(e)[1] for e in self.calib_ops)):
                if not self.symmetric and method in ("mse", "entropy"):
                    raise ValueError(f"symmetric=false supports calib=minmax or percentile, not {method}")
                if method == "entropy" and self.activations == "fp8":
                    raise ValueError("calib=entropy is for int8 activations; use minmax, percentile or mse with fp8")
            if not 2 <= self.weight_bits <= 8:
                raise ValueError(f"option 'weight-bits' must be between 2 and 8, got {self.weight_bits}")
            if self.weight_bits != 8 and self.weights != "int8":
                raise ValueError("option 'weight-bits' applies to weights=int8")
            if self.weight_pair_limit and not 64 <= self.weight_pair_limit <= 254:
                raise ValueError(f"option 'weight-pair-limit' must be 0 (off) or between 64 and 254, got {self.weight_pair_limit}")
            if self.weight_pair_limit and self.weights != "int8":
                raise ValueError("option 'weight-pair-limit' applies to weights=int8")
            if self.fp8_unsupported_convs and "fp8" not in (self.weights, self.activations):
                raise ValueError("option 'fp8-unsupported-convs' applies to FP8 (weights=fp8 or activations=fp8)")
            if self.bins < 16 or self.bins & (self.bins - 1):
                raise ValueError(f"option 'bins' must be a power of two of at least 16, got {self.bins}")

    def required_opset(self) -> int:
        """The default-domain opset the Q/DQ this pass may emit needs: per-axis 13, FP8 19, INT16 21."""
        opts = self.options
        if opts.activations == "int8" and (opts.int16 or opts.min_sqnr > 0):
            return 21
        return 19 if "fp8" in (opts.weights, opts.activations) else 13

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        opts = self.options
        if _has_candidates(model, opts.ops, opts.embeddings and opts.weights != "none"):
            ensure_opset(model, self.required_opset())  # before planning: a conversion may rebuild the graph
        graph = model.graph
        plans = []
        excluded = []
        skipped = 0
        float_convs = 0
        already = 0  # weighted ops an earlier pass quantized (their weight comes from a DequantizeLinear)
        selector = LayerSelector.of(opts.exclude)
        for node in graph:
            if node.op_type not in opts.ops or node.domain not in ("", "ai.onnx"):
                continue
            weight = _weight_site(node)
            if weight is None:
                already += _dequantized_weight(node)
                continue
            reason = selector.why_not(node, weight.value)
            if reason is not None:
                excluded.append((node, weight))
                if annotation(node, QUANTIZATION_SKIPPED) != reason:
                    annotate(node, QUANTIZATION_SKIPPED, reason)
                    skipped += 1
                continue
            act_fmt = self._activation_format(node, weight)
            why = self._fp8_conv_unsupported(node, weight, act_fmt)
            if why:
                float_convs += 1
                if annotation(node, QUANTIZATION_SKIPPED) != why:
                    annotate(node, QUANTIZATION_SKIPPED, why)
                    skipped += 1
                continue
            if opts.weights == "none" and act_fmt is None:
                continue
            plans.append((node, weight, act_fmt))

        tables = _gather_tables(graph) if opts.embeddings and opts.weights != "none" else []
        self._remark(am.context, len(plans), len(excluded), float_convs, len(tables), already)
        if not plans and not tables:
            return PassResult(model, skipped > 0, None, {"quantized-ops": 0, "excluded-ops": skipped})

        act_values = []
        for node, _, fmt in plans:
            if fmt is not None and node.inputs[0].name not in act_values:
                act_values.append(node.inputs[0].name)
        for _, _, x, _ in _residual_adds(graph, plans) if opts.residual else ():
            if x.name not in act_values:
                act_values.append(x.name)
        histograms = self._histograms(model, am, act_values) if act_values else {}
        methods = self._calib_methods(plans)
        thin_tails = self._thin_tail_fallbacks(histograms, methods, am.context)
        sensitive: dict[str, str] = {}
        if opts.min_sqnr > 0:
            plans, sensitive = self._promote_sensitive(plans, histograms, methods)
        # Found again (a graph walk): min-sqnr may have changed a Conv's format; the one calibration run above
        # already covered every candidate residual.
        residuals = _residual_adds(graph, plans) if opts.residual else []

        weight_fmt = table_fmt = None if opts.weights == "none" else FORMATS[opts.weights]
        if weight_fmt is not None and opts.weight_bits != 8:  # tables keep 8 bits: they feed no integer kernel
            limit = 2 ** (opts.weight_bits - 1) - 1
            weight_fmt = _Format("int8", -limit, limit)
        dq_cache: dict[tuple[int, int], Value] = {}
        act_cache: dict[tuple[int, str], tuple[Value, dict]] = {}
        # A table that a tied integer op (int8 activations) reads through a Transpose gets its pairs limited too.
        build = Builder(graph)  # owns the fresh names of everything this run adds
        integer_tables = {id(w.value) for _, w, f in plans if w.path == "transpose" and f is not None and f.name in ("int8", "uint8")}
        for gather, index in tables:  # first: a tied lm_head below then reuses the table's DequantizeLinear
            limit = opts.weight_pair_limit if id(gather.inputs[index]) in integer_tables else 0
            _quantize_table(build, gather, index, table_fmt, dq_cache, limit)
        for node, weight in excluded:
            if tables and weight.node.inputs[weight.index].producer() is not None:
                reason = annotation(node, QUANTIZATION_SKIPPED, "")
                annotate(node, QUANTIZATION_SKIPPED, reason + f"; its weight is the {table_fmt.name} embedding table it is tied to")
        for node, weight, act_fmt in plans:
            info: dict[str, object] = {"op": node.op_type}
            reason = sensitive.get(node.inputs[0].name) if node.inputs[0] is not None else None
            if weight_fmt is not None:
                integer = act_fmt is not None and act_fmt.name in ("int8", "uint8")  # runs as an integer kernel
                info.update(_quantize_weight(build, node, weight, weight_fmt, dq_cache, opts.weight_pair_limit if integer else 0))
            else:
                info["weights"] = "float"
            if act_fmt is not None:
                x = node.inputs[0]
                key = (id(x), act_fmt.name)
                if key not in act_cache:
                    act_cache[key] = _quantize_activation(build, node, x, act_fmt, histograms[x.name], opts,
                                                          methods.get(x.name, opts.calib))
                dq_out, act_info = act_cache[key]
                node.replace_input_with(0, dq_out)
                info.update(act_info)
            else:
                info["activations"] = "float"
            if reason:
                info["precision_reason"] = reason
            elif act_fmt is not None and act_fmt.bits == 16:
                info["precision_reason"] = "int16=" + ",".join(opts.int16)
            annotate(node, QUANTIZATION, info)
        for add, idx, x, fmt in residuals:  # after the Convs' own Q/DQ, so a residual reuses its tensor's pair
            key = (id(x), fmt.name)
            if key not in act_cache:
                act_cache[key] = _quantize_activation(build, add, x, fmt, histograms[x.name], opts, methods.get(x.name))
            add.replace_input_with(idx, act_cache[key][0])
            annotate(add, QUANTIZATION, {"op": "Add", "weights": "none", "activations": fmt.name, "residual": x.name})
        drop_unused_initializers(graph)
        stats = {
            "quantized-ops": len(plans),
            "excluded-ops": skipped,
            "activation-qdq": len(act_cache),
            "int16-activations": sum(1 for _, f in act_cache if f in ("int16", "uint16")),
            "sensitive-activations": len(sensitive),
            "quantized-tables": len(tables),
            "residual-adds": len(residuals),
        }
        if thin_tails:
            stats["percentile-fallbacks"] = thin_tails
        return PassResult(model, True, None, stats)

    def _calib_methods(self, plans: list) -> dict[str, str]:
        """Per activation name, the range method `calib-ops` gives it (the first entry any of its readers matches)."""
        entries = [_calib_entry(e) for e in self.options.calib_ops]
        methods: dict[str, str] = {}
        for node, weight, fmt in plans:
            x = node.inputs[0]
            if not entries or fmt is None or x is None or x.name in methods:
                continue
            for pattern, method in entries:
                if _matches(node, weight, [pattern]):
                    methods[x.name] = method
                    break
        return methods

    def _thin_tail_fallbacks(self, histograms: dict, methods: dict[str, str], context) -> int:
        """Give `mse` ranges to the symmetric activations whose `percentile` range rests on too few values
        (`TensorHistogram.percentile_is_thin`), so the annotations name the range used. Returns how many;
        a remark says so."""
        opts = self.options
        if not opts.symmetric:
            return 0
        thin = [name for name, hist in histograms.items()
                if methods.get(name, opts.calib) == "percentile" and hist.percentile_is_thin(opts.percentile)]
        for name in thin:
            methods[name] = "mse"
        if thin:
            share = 1.0 - opts.percentile / 100.0
            context.remark("analysis", f"calib=percentile: {len(thin)} activation(s) with under "
                           f"{PERCENTILE_MIN_TAIL / share:,.0f} calibration values (fewer than {PERCENTILE_MIN_TAIL} "
                           f"beyond the {opts.percentile:g}th percentile) take mse ranges instead")
        return len(thin)

    def _promote_sensitive(self, plans: list, histograms: dict, methods: dict[str, str]) -> tuple[list, dict[str, str]]:
        """Raise the precision of activations whose expected 8-bit SQNR is below `min-sqnr`.

        The SQNR is measured on the calibration histogram at the range `calib`
        picks, so the choice follows the data: int8 activations that lose too
        much become int16, FP8 ones stay float. Returns the new plans and, per
        promoted activation, the reason (kept in the `quant` annotation).
        """
        opts = self.options
        reasons: dict[str, str] = {}
        promoted = []
        for node, weight, fmt in plans:
            if fmt is None or fmt.bits == 16:
                promoted.append((node, weight, fmt))
                continue
            name = node.inputs[0].name
            if name not in reasons:
                hist = histograms[name]
                metric = "fp8" if fmt.name == "fp8" else "int8"
                method = "minmax" if fmt.name == "uint8" else methods.get(name, opts.calib)
                sqnr = hist.sqnr_db(hist.threshold(method, percentile=opts.percentile, fmt=metric), metric)
                reasons[name] = f"{fmt.name} SQNR {sqnr:.1f} dB < min-sqnr={opts.min_sqnr:g}" if sqnr < opts.min_sqnr else ""
            if not reasons[name]:
                promoted.append((node, weight, fmt))
            elif fmt.name == "fp8":
                promoted.append((node, weight, None))
            else:
                promoted.append((node, weight, FORMATS["int16" if opts.symmetric else "uint16"]))
        return promoted, {k: v for k, v in reasons.items() if v}

    def _remark(self, context, planned: int, excluded: int, float_convs: int, tables: int, already: int) -> None:
        """Say when nothing was quantizable, and why the ops that stay float do."""
        ops = "/".join(self.options.ops)
        if not planned and not excluded and not float_convs and not tables:
            if already:
                context.remark("analysis", f"nothing left to quantize: {ops} ops already quantized: {already}")
            else:
                context.remark("missed", f"nothing to quantize: no {ops} with a constant float weight", matched_none=True)
            return
        if excluded:
            context.remark("analysis", f"ops left float by exclude={','.join(self.options.exclude)}: {excluded}")
        if float_convs:
            context.remark("analysis", f"Convs left float because TensorRT has no FP8 kernel for their shape: {float_convs}")

    def _fp8_conv_unsupported(self, node: Node, weight: _WeightSite, act_fmt: _Format | None) -> str | None:
        """Why an FP8 Conv would have no TensorRT kernel (it then stays float), or None."""
        fp8 = self.options.weights == "fp8" or (act_fmt is not None and act_fmt.name == "fp8")
        if node.op_type != "Conv" or not fp8 or self.options.fp8_unsupported_convs:
            return None
        why = fp8_conv_unsupported(list(weight.value.shape) if weight.value.shape is not None else None)
        return f"TensorRT has no FP8 kernel for it: {why}" if why else None

    def _activation_format(self, node: Node, weight: _WeightSite) -> _Format | None:
        opts = self.options
        x = node.inputs[0]
        if opts.activations == "none" or x is None or is_constant(x):
            return None
        if x.dtype is not None and x.dtype not in FLOAT_TYPES:
            return None
        if dequantized(x) is not None:
            return None  # already quantized
        if _matches(node, weight, opts.weight_only):
            return None
        if _matches(node, weight, opts.int16):
            return FORMATS["int16" if opts.symmetric else "uint16"]
        if opts.activations == "fp8":
            return FORMATS["fp8"]
        return FORMATS["int8" if opts.symmetric else "uint8"]

    def _histograms(self, model: Model, am: AnalysisManager, values: list[str]):
        from optc.passes.infra.calibration import calibration_spec

        try:
            calibration_spec(model, am.context)
        except MissingCalibrationData as exc:
            raise MissingCalibrationData(
                f"quantize{{activations={self.options.activations}}} needs calibration data for static activation "
                f"scales (it never guesses ranges): {_after_colon(str(exc))}"
            ) from exc
        return am.get(ActivationHistograms, model, values=tuple(values), bins=self.options.bins)


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class _WeightSite:
    """Where a weighted op's constant weight is, and its output-channel axis in the constant's layout."""

    value: Value  # the constant
    node: Node  # the node that reads it (the op, or a Transpose in between)
    index: int
    axis: int  # output-channel axis of the constant
    path: str  # "direct" | "transpose"
    k_axis: int | None = None  # input-channel (reduction) axis of the constant; None for Conv


def _has_candidates(model: Model, ops: list[str], tables: bool) -> bool:
    """Whether the graph has an op this pass could quantize (before exclusions)."""
    graph = model.graph
    if any(n.op_type in ops and n.domain in ("", "ai.onnx") and _weight_site(n) is not None for n in graph):
        return True
    return tables and bool(_gather_tables(graph))


def _weight_site(node: Node) -> _WeightSite | None:
    """The constant float weight of a MatMul/Gemm/Conv (directly or through one Transpose only it reads), or None."""
    view = weight_view(node, through=("Transpose",), ops=QUANTIZED_OPS)
    if view is None or view.out_axis is None or view.constant.dtype not in FLOAT_TYPES:
        return None
    k_axis = None if node.op_type == "Conv" else view.k_axis  # K feeds the pair limit of MatMul/Gemm only
    if view.direct:
        return _WeightSite(view.constant, node, 1, view.out_axis, "direct", k_axis)
    if len(view.path) != 1 or sole_transpose(node.inputs[1]) is None:  # one Transpose, only this op reads it
        return None
    return _WeightSite(view.constant, view.reader, 0, view.out_axis, "transpose", k_axis)


def _dequantized_weight(node: Node) -> bool:
    """True when the op reads its weight from a DequantizeLinear (directly or through a Transpose)."""
    view = weight_view(node, through=("Transpose", "DequantizeLinear"), ops=QUANTIZED_OPS)
    return view is not None and view.through in (("DequantizeLinear",), ("Transpose", "DequantizeLinear"))


def _quantize_weight(build: Builder, node: Node, site: _WeightSite, fmt: _Format, cache, pair_limit: int = 0) -> dict:
    key = (id(site.value), site.axis)
    dq_out = cache.get(key)
    pair_axis = site.k_axis if pair_limit else None
    if dq_out is None:
        dq_out = _dequantized_constant(build, site.value, site.axis, fmt, before=site.node,
                                       pair_axis=pair_axis, pair_limit=pair_limit)
        cache[key] = dq_out
    site.node.replace_input_with(site.index, dq_out)
    info = {
        "weights": fmt.name,
        "weight_scheme": "per-channel symmetric",
        "weight_axis": site.axis,
        "weight": site.value.name,
        "weight_source": source_name(site.value),
        "weight_path": site.path,
    }
    if fmt.name == "int8" and fmt.qmax != 127:
        info["weight_bits"] = int(fmt.qmax).bit_length() + 1
    if pair_axis is not None and fmt.name == "int8":
        info["weight_pair_limit"] = pair_limit
    return info


def _dequantized_constant(
    build: Builder, value: Value, axis: int, fmt: _Format, *, before: Node, pair_axis: int | None = None, pair_limit: int = 0
) -> Value:
    """Store `value` quantized per channel along `axis`; returns the DequantizeLinear output.

    With `pair_axis`, int8 codes of adjacent entries along it are limited to
    |q₀ + q₁| ≤ `pair_limit` (`optc.passes.int8_pairs`).
    """
    array = constant_array(value)
    quantized, scale = quantize_per_channel(array, axis, fmt, pair_axis=pair_axis, pair_limit=pair_limit)
    base = value.name or "weight"
    q_value = build.initializer(f"{base}_quantized", quantized)
    for k, v in value.metadata_props.items():
        q_value.metadata_props[k] = v
    s_value = build.initializer(f"{base}_scale", scale)
    z_value = build.initializer(f"{base}_zero_point", np.zeros(scale.shape, dtype=fmt.numpy_dtype()))
    dq = make_node(
        "DequantizeLinear", [q_value, s_value, z_value], attributes={"axis": axis},
        name=build.node_name(f"{base}_DequantizeLinear"), output_names=[build.fresh(f"{base}_dequantized")],
    )
    annotate(dq, PROVENANCE, "quantize")
    out = dq.outputs[0]
    out.dtype = value.dtype
    out.shape = value.shape
    build.graph.insert_before(before, [dq])
    return out


#: Elements of the weight quantized at once (float64 copies of a chunk, not of the whole weight).
CHUNK_ELEMENTS = 1 << 22


def quantize_per_channel(
    array: np.ndarray, axis: int, fmt: _Format, *, pair_axis: int | None = None, pair_limit: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Codes and per-channel scales of `array` along `axis`, computed a slice of channels at a time.

    Every channel's scale and codes depend on that channel alone, so the slices give the whole
    array's result exactly while holding float64 copies of one slice only.
    """
    if array.ndim == 0 or array.size <= CHUNK_ELEMENTS:
        return _quantize_channels(array, axis, fmt, pair_axis, pair_limit)
    channels = array.shape[axis]
    step = max(1, CHUNK_ELEMENTS // (array.size // channels))
    quantized = np.empty(array.shape, dtype=fmt.numpy_dtype())
    scale = np.empty(channels, dtype=array.dtype)
    for start in range(0, channels, step):
        part = (slice(None),) * axis + (slice(start, start + step),)
        quantized[part], scale[start:start + step] = _quantize_channels(array[part], axis, fmt, pair_axis, pair_limit)
    return quantized, scale


def _quantize_channels(
    array: np.ndarray, axis: int, fmt: _Format, pair_axis: int | None, pair_limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_per_channel` on a whole array (float64 arithmetic, ONNX rounding)."""
    float_dtype = array.dtype
    data = array.astype(np.float64)
    reduce_axes = tuple(i for i in range(data.ndim) if i != axis)
    amax = np.abs(data).max(axis=reduce_axes) if reduce_axes else np.abs(data)
    scale = np.where(amax > 0, amax / fmt.qmax, 1.0).astype(float_dtype)
    shape = [1] * data.ndim
    shape[axis] = -1
    scaled = data / scale.astype(np.float64).reshape(shape)
    if pair_axis is not None and pair_limit and fmt.name == "int8":
        # Widen the scale of the channels whose pair sums would pass the limit, then fix rounding's last step.
        scale = (scale * pair_limited_scale(scaled, axis, pair_axis, pair_limit)).astype(float_dtype)
        scaled = data / scale.astype(np.float64).reshape(shape)
        quantized = fmt.cast(scaled)
        limit_pair_sums(quantized, scaled, pair_axis, pair_limit)
    else:
        quantized = fmt.cast(scaled)
    return quantized, scale


def _gather_tables(graph) -> list[tuple[Node, int]]:
    tables = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        data = node.inputs[0]
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            continue
        if is_constant(data) and data.shape is not None and len(data.shape) == 2 and data.dtype in FLOAT_TYPES:
            tables.append((node, 0))
    return tables


def _quantize_table(build: Builder, gather: Node, index: int, fmt: _Format, cache, pair_limit: int = 0) -> None:
    """Quantize an embedding table per row; every float reader of it reads the dequantized table.

    With `pair_limit`, pairs along the row (the K axis of a tied lm_head) are limited too.
    """
    table = gather.inputs[index]
    if not is_constant(table):
        return
    key = (id(table), 0)
    dq_out = cache.get(key)
    if dq_out is None:
        first = min((u.node for u in table.uses()), key=_position(build.graph))
        dq_out = _dequantized_constant(build, table, 0, fmt, before=first, pair_axis=1 if pair_limit else None,
                                       pair_limit=pair_limit)
        cache[key] = dq_out
    for use in list(table.uses()):
        if use.node.op_type != "DequantizeLinear":
            use.node.replace_input_with(use.idx, dq_out)
    annotate(gather, QUANTIZATION, {"op": "Gather", "weights": fmt.name, "weight_scheme": "per-row symmetric",
                               "weight_axis": 0, "weight": table.name, "weight_source": source_name(table),
                               "activations": "float"})


def _position(graph):
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda node: order.get(id(node), len(order))


def _residual_adds(graph, plans: list) -> list[tuple[Node, int, Value, _Format]]:
    """Adds of a quantized Conv's output (directly or through its BatchNormalization) and a float activation.

    Returns (add, index of the residual input, the residual, the Conv's activation format) for 8-bit
    formats; when both inputs come from quantized Convs the second is taken as the residual, as TensorRT's
    placement rules need only one of them quantized.
    """
    conv_formats = {id(node): fmt for node, _, fmt in plans
                    if node.op_type == "Conv" and fmt is not None and fmt.name in ("int8", "uint8", "fp8")}
    if not conv_formats:
        return []
    found = []
    for match in residual_adds(graph, lambda node: id(node) in conv_formats):
        x = match.residual
        if dequantized(x) is not None or (x.dtype is not None and x.dtype not in FLOAT_TYPES):
            continue
        found.append((match.add, match.index, x, conv_formats[id(match.conv)]))
    return found


# --------------------------------------------------------------------------- activations


def _quantize_activation(
    build: Builder, first: Node, x: Value, fmt: _Format, hist, opts, calib: str | None = None
) -> tuple[Value, dict]:
    """Insert QuantizeLinear → DequantizeLinear for `x` before its first quantized reader (range by `calib`, else opts')."""
    float_dtype = _NUMPY_FLOATS.get(x.dtype, np.float32) if x.dtype is not None else np.float32
    if hist.count == 0:
        raise OptcError(f"quantize: no finite calibration values reached {x.name!r}; cannot choose its scale")
    info: dict[str, object] = {"activations": fmt.name, "activation": x.name}
    # At 16 bits the grid is fine enough that clipping only loses: 16-bit tensors take the full range.
    method = "minmax" if fmt.bits == 16 else (calib or opts.calib)
    if fmt.name in ("uint8", "uint16"):
        lo, hi = hist.bounds(method, percentile=opts.percentile)
        scale = (hi - lo) / fmt.qmax if hi > lo else 1.0
        zero_point = int(np.clip(np.rint(-lo / scale), fmt.qmin, fmt.qmax))
        info.update({"activation_scheme": "per-tensor static asymmetric", "activation_range": [lo, hi]})
    else:
        metric_fmt = "fp8" if fmt.name == "fp8" else fmt.name
        threshold = hist.threshold(method, percentile=opts.percentile, fmt=metric_fmt)
        scale = threshold / fmt.qmax if threshold > 0 else 1.0
        zero_point = 0
        info.update({"activation_scheme": "per-tensor static symmetric", "activation_threshold": threshold})
    scale = float(np.asarray(scale, dtype=float_dtype))
    if not scale > 0 or not np.isfinite(scale):
        raise OptcError(f"quantize: calibration gave {x.name!r} an unusable scale {scale}")
    info.update({
        "activation_scale": scale,
        "activation_zero_point": zero_point,
        "activation_absmax": hist.absmax,
        "scale_source": f"calibration:{method}" + (f"@{opts.percentile}" if method == "percentile" else ""),
    })
    base = x.name if fmt.name in ("int8", "uint8", "fp8") else f"{x.name}_{fmt.name}"
    s_value = build.initializer(f"{base}_scale", np.asarray(scale, dtype=float_dtype))
    z_value = build.initializer(f"{base}_zero_point", np.asarray(zero_point, dtype=fmt.numpy_dtype()))
    q = make_node("QuantizeLinear", [x, s_value, z_value], name=build.node_name(f"{base}_QuantizeLinear"),
                  output_names=[build.fresh(f"{base}_quantized")])
    dq = make_node("DequantizeLinear", [q.outputs[0], s_value, z_value], name=build.node_name(f"{base}_DequantizeLinear"),
                   output_names=[build.fresh(f"{base}_dequantized")])
    if x.dtype is not None:  # a shape without a type does not serialize
        q.outputs[0].dtype = _onnx_type(fmt)
        dq.outputs[0].dtype = x.dtype
        q.outputs[0].shape = dq.outputs[0].shape = x.shape
    for n in (q, dq):
        annotate(n, PROVENANCE, "quantize")
    build.graph.insert_before(first, [q, dq])
    return dq.outputs[0], info


def _onnx_type(fmt: _Format) -> DataType:
    return {
        "int8": DataType.INT8, "int16": DataType.INT16, "uint8": DataType.UINT8,
        "uint16": DataType.UINT16, "fp8": DataType.FLOAT8E4M3FN,
    }[fmt.name]


# --------------------------------------------------------------------------- matching


def _matches(node: Node, weight: _WeightSite | None, patterns) -> bool:
    return bool(patterns) and matches_any(layer_names(node, weight.value if weight is not None else None), patterns)


_CALIB_METHODS = ("minmax", "percentile", "mse", "entropy")


def _calib_entry(entry: str) -> tuple[str, str]:
    """Split a `calib-ops` entry PATTERN:METHOD (ValueError when it is not one)."""
    pattern, sep, method = entry.rpartition(":")
    if not sep or not pattern or method not in _CALIB_METHODS:
        raise ValueError(f"option 'calib-ops' takes PATTERN:METHOD with METHOD one of {', '.join(_CALIB_METHODS)}, got {entry!r}")
    return pattern, method


def _after_colon(message: str) -> str:
    return message.split(": ", 1)[1] if ": " in message else message


__all__ = ["CHUNK_ELEMENTS", "FORMATS", "Quantize", "quantize_per_channel"]
