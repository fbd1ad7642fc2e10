"""Shared helpers of the pruning and low-rank passes: layer selection, weight I/O, calibration.

Linear layers (`optc.passes.linear_layers`) are found by graph pattern: a `MatMul` or `Gemm` whose second
input is a constant 2-D float initializer (B `[K, N]`; Gemm `[N, K]` with
`transB=1`). Weights are handled in the layout of the papers, `[N, K]` (rows
are outputs, columns the reduction axis K), and written back in the stored
layout. A constant that something else also reads is copied, never changed
under that reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.errors import OptcError
from optc.ir import Graph, Model, Node, Shape, Value, constant_array, tensor
from optc.ir.patterns.builder import Builder
from optc.ir.patterns.builder import drop_unused_initializers as sweep_initializers
from optc.passes.analyses.hessian import calibration_hessians
from optc.passes.infra.options import option
from optc.passes.layer_selector import LayerSelector
from optc.passes.linear_layers import (
    Linear,
    linear,
    torch_threads,
)

#: Ops that act on each channel of an MLP's intermediate activation separately (activations, the gating
#: `Mul`, a bias `Add`), the path `prune-ffn` follows from gate/up to down.
CHANNELWISE_OPS = frozenset({
    "Mul", "Add", "Sub", "Div", "Sigmoid", "Tanh", "Relu", "Gelu", "Erf", "Pow", "Sqrt", "Exp", "Neg", "Cast",
    "Identity", "Softplus", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Clip", "Max", "Min",
})


@dataclass
class PruneOptions:
    """Options every structural pruning pass (`prune-heads`, `prune-ffn`) takes: how much to remove, ranked how."""

    ratio: float = option(0.25, help="fraction of each layer's heads (rounded per KV group) or FFN channels to remove")
    importance: Literal["activation", "contribution"] = option(
        "activation", help="rank each head or channel by the L2 norm of its input to o_proj/down, "
        "or of its contribution at the output (FFN: ||x_j||*||W_down[j]||)"
    )

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"option 'ratio' must be in [0, 1), got {self.ratio}")


def linears(model: Model) -> list[Linear]:
    """Every linear layer of the main graph, in graph order."""
    return [site for site in (linear(n) for n in model.graph) if site is not None]


def reads_table(value: Value) -> bool:
    """True when `value` is also read as an embedding table (a Gather's data input)."""
    return any(use.node.op_type == "Gather" and use.idx == 0 for use in value.uses())


def select(model: Model, include: Sequence[str], exclude: Sequence[str]) -> list[Linear]:
    """The linear layers to transform: those matching `include` (empty: all), minus `exclude` and embeddings."""
    selector = LayerSelector.of(exclude, include)
    return [site for site in linears(model) if selector.selects(site.node, site.weight) and not reads_table(site.weight)]


def set_constant(target: Graph | Builder, node: Node, index: int, array: np.ndarray, suffix: str) -> Value:
    """Give `node.inputs[index]` the value `array`: in place when only this input reads it, else a copy
    named fresh by `target` (the pass run's builder, or a graph)."""
    value = node.inputs[index]
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output():
        value.const_value = tensor(array, name=value.name)
        value.shape = Shape(list(array.shape))
        return value
    new = Builder.of(target).initializer(f"{value.name}_{suffix}", array)
    for k, v in value.metadata_props.items():
        new.metadata_props[k] = v
    node.replace_input_with(index, new)
    return new


def store_nk(target: Graph | Builder, site: Linear, w_nk: np.ndarray, suffix: str) -> Value:
    """Write a `[N, K]` float array back as the site's weight, in its stored layout and dtype."""
    dtype = constant_array(site.weight).dtype
    stored = (w_nk.T if site.k_axis == 0 else w_nk).astype(dtype)
    return set_constant(target, site.node, 1, np.ascontiguousarray(stored), suffix)


def keep_outputs(target: Graph | Builder, site: Linear, rows: np.ndarray, suffix: str) -> None:
    """Keep only the output features `rows` of a linear layer: its weight's rows, a Gemm's own bias `C`
    entries, and the last axis of its output's static shape."""
    width = site.out_features
    store_nk(target, site, site.nk()[rows], suffix)
    node = site.node
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is not None and bias.shape[-1:] == (width,) and width > 1:
            set_constant(target, node, 2, np.ascontiguousarray(np.take(bias, rows, axis=-1)), suffix)
    output = node.outputs[0]
    if output.shape is not None and len(output.shape):
        output.shape = Shape([*list(output.shape)[:-1], len(rows)])


def set_shape_element(build: Builder, node: Node, position: int, count: int, suffix: str) -> None:
    """Set element `position` of the shape operand (input 1) of a Reshape/Expand `node` to `count`: a
    constant is copied when shared; a Concat of parts gets a copy with that part replaced (which must be
    a constant)."""
    operand = node.inputs[1]
    array = constant_array(operand)
    if array is not None:
        new = array.copy()
        new.reshape(-1)[position] = count
        set_constant(build, node, 1, new, suffix)
        return
    concat = operand.producer()
    parts = list(concat.inputs)
    offset = 0
    for i, part in enumerate(parts):
        data = constant_array(part)
        size = data.size if data is not None else int(part.shape[0])
        if offset <= position < offset + size:
            if data is None:
                raise OptcError(f"the count in {node.name or node.op_type}'s shape is not a constant")
            new = data.copy().reshape(-1)
            new[position - offset] = count
            parts[i] = build.initializer(f"{part.name}_{suffix}", new.reshape(data.shape))
            break
        offset += size
    copy = build.node("Concat", parts, attributes={"axis": 0}, outputs=[f"{operand.name}_{suffix}"])
    copy.name = _free_node_name(build.graph, f"{concat.name or 'Concat'}_{suffix}")
    copy.outputs[0].dtype = operand.dtype
    copy.outputs[0].shape = operand.shape
    build.graph.insert_before(node, [copy])
    node.replace_input_with(1, copy.outputs[0])
    if not list(operand.uses()) and not operand.is_graph_output():
        build.graph.remove(concat, safe=True)
        build.release(o.name for o in concat.outputs)


def _free_node_name(graph: Graph, base: str) -> str:
    """`base`, or `base_i` with the first i no node of the graph is named."""
    taken = {n.name for n in graph}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def drop_unused_initializers(graph) -> int:
    """Remove initializers nothing reads; returns how many went."""
    return len(sweep_initializers(graph))


__all__ = [
    "CHANNELWISE_OPS",
    "Linear",
    "calibration_hessians",
    "drop_unused_initializers",
    "keep_outputs",
    "set_shape_element",
    "linear",
    "linears",
    "select",
    "set_constant",
    "store_nk",
    "torch_threads",
]
