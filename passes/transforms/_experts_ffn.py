"""A mixture of experts' MLP for `prune-ffn`: found by graph pattern, pruned per expert.

transformers' `batched_mm` experts export to stacked weights `W [E, ...]` that a GatherND picks per
routed (token, expert) row (`optc.passes.linear_layers.Experts`) for a batched MatMul. An expert
MLP is a `down` experts MatMul whose activation is made, through channel-wise ops, Squeeze /
Unsqueeze and an even Split (the fused gate/up halves), from experts MatMuls gathered by the same
indices, with nothing else reading the values in between. Each expert is a dense gated MLP of its
own: channel j of expert e is row j of each of its gate/up pieces and column j of its down
matrix. Every expert keeps the same number of channels (the stacked weights stay rectangular),
each expert its own most important ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from optc.ir import Node, Shape, Value, annotate, constant_array, is_constant
from optc.ir.annotations import PRUNED_FFN
from optc.ir.patterns.builder import Builder
from optc.passes.linear_layers import Experts, experts
from optc.passes.transforms._structure import CHANNELWISE_OPS, set_constant

_ONNX = ("", "ai.onnx")


@dataclass
class ExpertsFFNBlock:
    """An expert MLP: its stacked producers (with how many pieces of F channels each holds), `down`,
    and the values in between with their channel axis and how many pieces of F channels that axis holds."""

    down: Experts
    activation: Value  # down's input
    axis: int  # the channel axis of `activation` (negative)
    producers: list[tuple[Experts, int]] = field(default_factory=list)
    splits: list[Node] = field(default_factory=list)
    values: list[tuple[Value, int, int]] = field(default_factory=list)
    width: int = 0

    @property
    def indices(self) -> Value:
        """The routing indices `[rows, 1]` every stacked weight of the block is gathered by."""
        return self.down.node.inputs[1]


def _sole_matmul(gather: Experts) -> tuple[Node, int] | None:
    """The one batched MatMul reading the gathered weights, and the operand they are."""
    uses = list(gather.node.outputs[0].uses())
    return (uses[0].node, uses[0].idx) if len(uses) == 1 else None


def _channel_axis(operand: int) -> int:
    """The channel axis (negative) of a batched MatMul's activation and output when the gathered weights
    are its operand `operand`: `W[e]·x` is `[rows, N, K]·[rows, K, 1]` (axis -2), `x·W[e]` is
    `[rows, 1, K]·[rows, K, N]` (axis -1)."""
    return -2 if operand == 0 else -1


def _axes(node: Node) -> list[int] | None:
    axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None:
        attr = node.attributes.get("axes")
        return list(attr.as_ints()) if attr is not None else None
    return [int(a) for a in axes.reshape(-1)]


def _axis_before(node: Node, axis: int) -> int | None:
    """The axis of a Squeeze/Unsqueeze's input that becomes `axis` (negative) of its output."""
    shape_in, shape_out = node.inputs[0].shape, node.outputs[0].shape
    axes = _axes(node)
    if shape_in is None or shape_out is None or axes is None:
        return None
    rank_in, rank_out = len(shape_in), len(shape_out)
    if node.op_type == "Unsqueeze":
        inserted = sorted(a % rank_out for a in axes)
        position = axis % rank_out
        if position in inserted:
            return None
        return position - sum(1 for a in inserted if a < position) - rank_in
    kept = [i for i in range(rank_in) if i not in {a % rank_in for a in axes}]
    return kept[axis % rank_out] - rank_in


def _static(value: Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or -axis > len(shape) or not isinstance(shape[axis], int):
        return None
    return int(shape[axis])


def experts_ffn_for(gather: Node) -> ExpertsFFNBlock | str | None:
    """The expert MLP whose `down` is the experts GatherND `gather`; else why it is a near miss; else None."""
    down = experts(gather)
    if down is None:
        return None
    use = _sole_matmul(down)
    if use is None:
        return None
    matmul, operand = use
    f = down.in_features
    block = ExpertsFFNBlock(down, matmul.inputs[1 - operand], _channel_axis(operand), width=f)
    inside = {id(matmul), id(gather)}
    stack = [(block.activation, block.axis, 1)]
    seen: set[int] = set()
    while stack:
        value, axis, pieces = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input() or value.is_graph_output() or _static(value, axis) != f * pieces:
            return None
        block.values.append((value, axis, pieces))
        node = value.producer()
        if node is None or node.domain not in _ONNX:
            return None
        inside.add(id(node))
        if node.op_type == "MatMul":
            producer = _producer(node, axis, block.indices)
            if producer is None or producer.out_features != f * pieces:
                return None
            block.producers.append((producer, pieces))
            inside.add(id(producer.node))
            continue
        if node.op_type in ("Squeeze", "Unsqueeze"):
            before = _axis_before(node, axis)
            if before is None:
                return None
            stack.append((node.inputs[0], before, pieces))
            continue
        if node.op_type == "Split":
            count = len(node.outputs)
            rank = len(value.shape)
            attr = node.attributes.get("axis")
            split_axis = attr.as_int() if attr is not None else 0
            sizes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if pieces != 1 or split_axis % rank != axis % rank or (sizes is not None and set(sizes.tolist()) != {f}):
                return None
            if node not in block.splits:
                block.splits.append(node)
            stack.append((node.inputs[0], axis, count))
            continue
        if node.op_type not in CHANNELWISE_OPS:
            return None
        for v in node.inputs:
            if v is None:
                continue
            if is_constant(v):
                array = constant_array(v)
                if array is None or array.size != 1:
                    return None
                continue
            if v.shape is None or len(v.shape) != len(value.shape):
                return None
            stack.append((v, axis, pieces))
    if not block.producers:
        return None
    for value, _, _ in block.values:
        if any(id(use.node) not in inside for use in value.uses()):
            return "an intermediate value of an expert MLP is also read outside it"
    for split in block.splits:
        if any(id(out) not in seen for out in split.outputs):
            return "a piece of a fused expert projection is read outside the expert MLP"
    return block


def _producer(matmul: Node, axis: int, indices: Value) -> Experts | None:
    """The experts projection a batched MatMul computes, gathered by `indices`, with its output
    channels on `axis`."""
    for operand, value in enumerate(matmul.inputs):
        gather = value.producer() if value is not None else None
        site = experts(gather) if gather is not None else None
        if site is not None and gather.inputs[1] is indices:
            return site if _channel_axis(operand) == axis else None
    return None


def prune_experts(build: Builder, block: ExpertsFFNBlock, keep: np.ndarray) -> None:
    """Keep channels `keep[e]` (`[E, F']`, each row sorted) of every expert of `block`."""
    f, kept = block.width, keep.shape[1]
    experts_count = keep.shape[0]
    for site, pieces in block.producers:
        rows = np.concatenate([keep + p * f for p in range(pieces)], axis=1)  # [E, pieces·F']
        weights = site.enk()
        _store(build, site, np.stack([weights[e][rows[e]] for e in range(experts_count)]))
    weights = block.down.enk()
    _store(build, block.down, np.stack([weights[e][:, keep[e]] for e in range(experts_count)]))
    for split in block.splits:
        if len(split.inputs) > 1 and split.inputs[1] is not None:
            set_constant(build, split, 1, np.full(len(split.outputs), kept, np.int64), "pruned")
    for value, axis, pieces in block.values:
        dims = list(value.shape)
        dims[axis] = kept * pieces
        value.shape = Shape(dims)
    annotate(block.down.node, PRUNED_FFN, {"width": kept, "of": f, "experts": experts_count})


def _store(build: Builder, site: Experts, enk: np.ndarray) -> None:
    """Write `[E, N, K]` weights back as the site's stacked weight, in its stored layout and dtype, and
    give the gathered value its new shape."""
    dtype = constant_array(site.weight).dtype
    stored = enk if site.k_axis == 2 else enk.transpose(0, 2, 1)
    set_constant(build, site.node, 0, np.ascontiguousarray(stored.astype(dtype)), "pruned")
    gathered = site.node.outputs[0]
    if gathered.shape is not None:
        gathered.shape = Shape([gathered.shape[0], *stored.shape[1:]])


__all__ = ["ExpertsFFNBlock", "experts_ffn_for", "prune_experts"]
