"""Per-layer quantization error: SQNR between a float model and its quantized version.

Both models run in onnxruntime over the same calibration samples, with the
output of every quantized node exposed. Nodes are matched by output value
name (the quantize pass keeps the names of the values it quantizes, and the
outputs of a weighted op are invariant under SmoothQuant's rescaling, so the
float and quantized outputs of one layer are directly comparable).

For each matched value it accumulates, over all samples and in float64,

    signal = Σ x²      noise = Σ (x − x̂)²      SQNR = 10·log10(signal / noise) dB

where x is the float model's value and x̂ the quantized model's. The SQNR of a
layer is *cumulative*: x̂ already carries the error of every quantized layer
before it, which is what reaches the model's outputs. The graph outputs (the
end-to-end effect) are measured the same way. The activation quantization of
a layer is also measured on its own, inside the quantized model: x as it
enters QuantizeLinear against DequantizeLinear's output (clipping plus
rounding of the static range; no error from earlier layers). One sample's values of both
models are in memory at a time; memory does not grow with the number of
samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optc.ir import Model, Node, annotation, node_label, source_name
from optc.ir.annotations import QUANTIZATION
from optc.ir.patterns.ops import QUANTIZATION_OPS, WEIGHT_VIEW_OPS
from optc.ir.patterns.qdq import activation_pair
from optc.ir.patterns.weights import trace_back
from optc.runtime.runner import ModelRunner

#: Ops between a weight initializer and the op that reads it: the weight view's (dequantization, a tied
#: transpose), and the Reshape and Mul of a dequantization written out (Cast then Mul).
_WEIGHT_PATH_OPS = (*WEIGHT_VIEW_OPS, "Reshape", "Mul")

#: Elements reduced at a time (float64 scratch of this many elements).
_CHUNK = 1 << 20


@dataclass(frozen=True)
class QuantizedNode:
    """A node the pipeline quantized: what the report measures and shows."""

    name: str
    op_type: str
    #: The value compared between the models (the node's first output).
    output: str
    #: The node's `quant` annotation as the quantize pass wrote it.
    quant: dict[str, Any]
    #: Position in the graph (topological order), for plots in model order.
    index: int
    #: The original parameter name of the node's weight, when known (e.g. `model.layers.3.mlp.down_proj.weight`).
    parameter: str | None = None
    #: The activation as it enters its QuantizeLinear, and what the node reads after DequantizeLinear
    #: (both in the quantized model): their SQNR is the error of the activation quantization alone.
    activation: tuple[str, str] | None = None


def weight_parameter(node: Node, quant: dict[str, Any] | None) -> str | None:
    """The weight's original parameter name: from the annotation, else a constant input (through one DQ/Transpose)."""
    if quant and quant.get("weight_source"):
        return str(quant["weight_source"])
    for value in node.inputs[1:]:
        # through a short chain of dequantization (DQ, or Cast then Mul) and views
        found = trace_back(value, through=_WEIGHT_PATH_OPS, depth=4) if value is not None else None
        if found is not None and not isinstance(found, str):
            return source_name(found.constant)
    return None


def _activation_pair(node: Node) -> tuple[str, str] | None:
    """(x, DequantizeLinear(QuantizeLinear(x))) when the node's data input is a static Q→DQ of x."""
    dq_out = node.inputs[0] if node.inputs else None
    pair = activation_pair(dq_out)
    if pair is None or not pair.source.name or not dq_out.name:
        return None
    return pair.source.name, dq_out.name


def quantized_nodes(model: Model) -> list[QuantizedNode]:
    """Every node with a `quant` annotation (except Q/DQ nodes themselves), in graph order."""
    found = []
    for index, node in enumerate(model.graph):
        quant = annotation(node, QUANTIZATION)
        if quant is None or node.op_type in QUANTIZATION_OPS or not node.outputs or not node.outputs[0].name:
            continue
        quant = quant if isinstance(quant, dict) else {"value": quant}
        found.append(QuantizedNode(node_label(node), node.op_type, node.outputs[0].name, quant, index,
                                   weight_parameter(node, quant), _activation_pair(node)))
    return found


def has_quantized_nodes(model: Model) -> bool:
    return any(annotation(n, QUANTIZATION) is not None for n in model.graph)


@dataclass
class ErrorStats:
    """Running SQNR statistics of one value (float reference vs quantized)."""

    name: str
    #: "ok", or why nothing was measured ("missing in the float model", "shape mismatch ...").
    status: str = "ok"
    signal: float = 0.0
    noise: float = 0.0
    elements: int = 0
    max_abs_error: float = 0.0
    #: Elements of the quantized value that were NaN or infinite.
    nonfinite: int = 0
    samples: int = 0

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        if self.status != "ok":
            return
        if reference.shape != quantized.shape:
            self.status = f"shape mismatch: float {list(reference.shape)} vs quantized {list(quantized.shape)}"
            return
        x = reference.reshape(-1)
        y = quantized.reshape(-1)
        for i in range(0, x.size, _CHUNK):
            yc = y[i:i + _CHUNK]
            if not np.isfinite(yc).all():  # rare: count and zero the NaN/inf elements
                finite = np.isfinite(yc)
                self.nonfinite += int(yc.size - np.count_nonzero(finite))
                yc = np.where(finite, yc, 0)
            xc = x[i:i + _CHUNK].astype(np.float64)
            err = xc - yc  # float64
            self.signal += float(np.dot(xc, xc))
            self.noise += float(np.dot(err, err))
            if err.size:
                self.max_abs_error = max(self.max_abs_error, float(err.max()), -float(err.min()))
        self.elements += x.size
        self.samples += 1

    @property
    def sqnr_db(self) -> float | None:
        """10·log10(signal/noise); +inf when identical, -inf with non-finite output, None when unmeasured."""
        if self.status != "ok" or self.elements == 0:
            return None
        if self.nonfinite:
            return -math.inf
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def as_dict(self) -> dict[str, Any]:
        sqnr = self.sqnr_db
        return {
            "value": self.name,
            "status": self.status,
            # JSON has no infinities: +inf (identical) and -inf are written as strings.
            "sqnr_db": sqnr if sqnr is None or math.isfinite(sqnr) else ("inf" if sqnr > 0 else "-inf"),
            "signal_power": self.signal / self.elements if self.elements else None,
            "noise_power": self.noise / self.elements if self.elements else None,
            "max_abs_error": self.max_abs_error if self.elements else None,
            "elements": self.elements,
            "nonfinite": self.nonfinite,
            "samples": self.samples,
        }


@dataclass
class QuantError:
    """Per-layer and end-to-end error of a quantized model against its float reference."""

    layers: list[tuple[QuantizedNode, ErrorStats]] = field(default_factory=list)
    outputs: list[ErrorStats] = field(default_factory=list)
    #: Activation quantization error alone, by the name of the activation (x vs DQ(Q(x))).
    activations: dict[str, ErrorStats] = field(default_factory=dict)
    samples: int = 0


def _value_names(model: Model) -> set[str]:
    graph = model.graph
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    names |= {o.name for node in graph for o in node.outputs if o.name}
    return names


def _float_outputs(model: Model) -> list[str]:
    from optc.ir import DataType

    floats = {DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16, DataType.DOUBLE}
    return [v.name for v in model.graph.outputs if v.dtype is None or v.dtype in floats]


def measure_error(
    reference: Model,
    quantized: Model,
    samples: Iterable[dict[str, np.ndarray]],
    nodes: Sequence[QuantizedNode] | None = None,
    *,
    threads: int = 0,
) -> QuantError:
    """Run both models over `samples` and accumulate the SQNR of every quantized node and graph output.

    `nodes` defaults to `quantized_nodes(quantized)`. A node whose output is
    missing in either model is reported with that status rather than dropped.
    """
    nodes = list(quantized_nodes(quantized) if nodes is None else nodes)
    ref_names, q_names = _value_names(reference), _value_names(quantized)
    result = QuantError()
    wanted: list[str] = []
    for node in nodes:
        stats = ErrorStats(node.output)
        if node.output not in ref_names:
            stats.status = "missing in the float model"
        elif node.output not in q_names:
            stats.status = "missing in the quantized model"
        else:
            wanted.append(node.output)
        result.layers.append((node, stats))
    q_outputs = {v.name for v in quantized.graph.outputs}
    for name in _float_outputs(reference):
        stats = ErrorStats(name)
        if name not in q_outputs:
            stats.status = "missing in the quantized model"
        result.outputs.append(stats)
    compared = list(dict.fromkeys([*wanted, *(s.name for s in result.outputs if s.status == "ok")]))
    pairs: dict[str, str] = {}
    for node in nodes:
        if node.activation is not None and node.activation[0] not in pairs:
            x, x_dq = node.activation
            stats = result.activations[x] = ErrorStats(x)
            if x in q_names and x_dq in q_names:
                pairs[x] = x_dq
            else:
                stats.status = "missing in the quantized model"
    inputs = {v.name for v in quantized.graph.inputs}
    q_only = list(dict.fromkeys(n for pair in pairs.items() for n in pair if n not in compared and n not in inputs))
    if not compared and not pairs:
        return result
    by_name: dict[str, list[ErrorStats]] = {}
    for _, stats in result.layers:
        by_name.setdefault(stats.name, []).append(stats)
    for stats in result.outputs:
        by_name.setdefault(stats.name, []).append(stats)

    with ModelRunner(reference, compared, threads=threads) as ref_run, \
            ModelRunner(quantized, [*compared, *q_only], threads=threads) as q_run:
        for feed in samples:
            q_out = q_run.run({k: v for k, v in feed.items() if k in q_run.input_names}, [*compared, *q_only])
            for x_name, dq_name in pairs.items():
                x = feed[x_name] if x_name in inputs else q_out[x_name]
                result.activations[x_name].update(np.asarray(x), np.asarray(q_out[dq_name]))
            for name in q_only:
                del q_out[name]
            if compared:
                ref_out = ref_run.run({k: v for k, v in feed.items() if k in ref_run.input_names}, compared)
                for name in compared:
                    x, y = np.asarray(ref_out.pop(name)), np.asarray(q_out.pop(name))
                    for stats in by_name[name]:
                        stats.update(x, y)
                    del x, y
            result.samples += 1
    return result


__all__ = [
    "ErrorStats", "QuantError", "QuantizedNode", "has_quantized_nodes", "measure_error", "quantized_nodes",
    "weight_parameter",
]
