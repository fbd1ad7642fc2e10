"""`split-fused-projections`: one MatMul per piece of a fused projection (qkv, gate/up), exactly.

Several families compute Q, K and V (or an MLP's gate and up halves) with one
linear layer and cut its output apart: phi3's `qkv_proj` and `gate_up_proj`,
gpt2's `c_attn` (a Gemm, then a Reshape back to `[batch, seq, 3·hidden]`),
gpt_neox's `query_key_value` (heads interleaved: a Reshape to
`[batch, seq, heads, 3·head_dim]`, a Transpose, then the cut), ModernBERT's
`Wqkv` and `Wi`. This pass brings them to the form of LLaMA-like models, one
linear layer per piece, so structural passes (prune-heads, prune-ffn) find
them.

What it matches: a linear layer (MatMul or Gemm with a constant 2-D float
weight), optionally its bias `Add` (a constant over the output features), an
optional Reshape that only splits the feature axis (or only changes leading
axes), an optional Transpose, and then only Split / single-axis Slice nodes
(step 1) cutting along one of the feature axes. Each piece p gets its own
linear layer over the columns it reads (a Gemm keeps its attributes and its
bias's columns), its own bias Add, Reshape (the piece's feature dims; a
computed shape gets its last dims replaced with Slice + Concat) and
Transpose. The outputs are bit-for-bit those of the fused graph (every
output element sums the same products in the same order). The new weights
carry the source parameter name with `[part i/n]` appended, so the GGUF writer
cannot mistake a piece for the whole parameter.

A projection whose output is cut along a feature axis in a way this pass does
not follow is left fused and counted in a `missed` remark with the reason. An
output that is also read whole (a rotary embedding's rotate-half slices its
input and reads it whole) is not a fused projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from optc.ir import Model, Node, Shape, Value, annotate, constant_array, source_name
from optc.ir.annotations import PROVENANCE, SOURCE_NAME
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.context import PassContext
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.passes.linear_layers import Linear, linear

_NAME = "split-fused-projections"
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class FusedProjection:
    """A linear layer whose output is cut into pieces along its feature axis (after an optional reshape)."""

    site: Linear
    bias: np.ndarray | None = None  # [N]
    bias_node: Node | None = None
    bias_first: bool = False  # the bias is the Add's first input
    reshape: Node | None = None
    trailing: tuple[int, ...] = ()  # the reshape output's dims that hold the N features
    transpose: Node | None = None
    perm: list[int] = field(default_factory=list)
    axis: int = 0  # the cut axis, counted within `trailing` (0 when there is no reshape)
    cuts: list[Node] = field(default_factory=list)
    #: (the value the piece replaces, start, stop) along the cut axis
    pieces: list[tuple[Value, int, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return source_name(self.site.weight) or self.site.weight.name or self.site.label


def _int_list(value: Value | None) -> list[int] | None:
    array = constant_array(value) if value is not None else None
    return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]


def _dims(value: Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _sole_use(value: Value) -> Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _attr(node: Node, name: str, default: int | float) -> int | float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_float() if isinstance(default, float) else attr.as_int()


def match_fused(node: Node) -> FusedProjection | str | None:
    """The fused projection `node` computes; a reason when its output is cut in a way not followed; None if not cut."""
    site = linear(node)
    if site is None or len(node.outputs) != 1:
        return None
    n = site.out_features
    fused = FusedProjection(site)
    if node.op_type == "Gemm":
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2])
            if c is None or c.size != n:
                return None
            fused.bias = np.asarray(c).reshape(-1)
    value = node.outputs[0]
    users = [u.node for u in value.uses()]
    if not users:
        return None
    nxt = _sole_use(value)
    if nxt is not None and nxt.op_type == "Add" and fused.bias is None:
        other_index = 1 if nxt.inputs[0] is value else 0
        b = constant_array(nxt.inputs[other_index])
        if b is not None and b.size == n and b.shape[-1:] == (n,):
            fused.bias, fused.bias_node, fused.bias_first = np.asarray(b).reshape(-1), nxt, other_index == 0
            value = nxt.outputs[0]
            nxt = _sole_use(value)
    rank = len(value.shape) if value.shape is not None else None
    trailing: tuple[int, ...] = (n,)
    if nxt is not None and nxt.op_type == "Reshape":
        out = _dims(nxt.outputs[0])
        m = _trailing_count(out, n)
        if m is None:
            return _cut_reason(value, "reshaped in a way that mixes features with other axes")
        fused.reshape, trailing = nxt, tuple(int(d) for d in out[-m:])  # type: ignore[misc]
        value = nxt.outputs[0]
        rank = len(out)  # type: ignore[arg-type]
        nxt = _sole_use(value)
    if nxt is not None and nxt.op_type == "Transpose":
        perm = _int_list_attr(nxt, "perm")
        if perm is None or rank is None:
            return _cut_reason(value, "transposed without a perm")
        fused.transpose, fused.perm = nxt, perm
        value = nxt.outputs[0]
    if rank is None:
        return _cut_reason(value, "output rank unknown")
    fused.trailing = trailing
    return _cuts(fused, value, rank)


def _int_list_attr(node: Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _trailing_count(out: list[int | None] | None, n: int) -> int | None:
    """How many trailing dims of a reshape's output hold the `n` features (their product is n), or None."""
    if not out:
        return None
    product = 1
    for m in range(1, len(out) + 1):
        d = out[-m]
        if d is None:
            return None
        product *= d
        if product == n:
            return m
        if product > n:
            return None
    return None


def _cut_reason(value: Value, why: str) -> str | None:
    """A reason only when the value is in fact cut by Split/Slice further on (else: not a fused projection)."""
    if any(u.node.op_type in ("Split", "Slice") for u in value.uses()):
        return why
    return None


def _cuts(fused: FusedProjection, value: Value, rank: int) -> FusedProjection | str | None:
    users = [u.node for u in value.uses()]
    if not any(u.op_type in ("Split", "Slice") for u in users):
        return None
    if value.is_graph_output() or any(u.op_type not in ("Split", "Slice") for u in users):
        return None  # also read whole (a rotary embedding's rotate-half reads its input both ways): not fused
    axis_after: int | None = None
    for cut in users:
        found = _pieces_of(cut, rank)
        if found is None:
            return f"cut by a {cut.op_type} this pass does not follow (not one axis, step 1, constant bounds)"
        axis, pieces = found
        if axis_after is not None and axis != axis_after:
            return "cut along several axes"
        axis_after = axis
        fused.cuts.append(cut)
        fused.pieces += pieces
    assert axis_after is not None
    axis_before = fused.perm[axis_after] if fused.transpose is not None else axis_after
    first_feature_axis = rank - len(fused.trailing)
    if axis_before < first_feature_axis:
        return None  # cut along a token or batch axis: not a fused projection
    fused.axis = axis_before - first_feature_axis
    size = fused.trailing[fused.axis]
    fused.pieces = [(v, max(0, min(a, size)), max(0, min(b, size))) for v, a, b in fused.pieces]
    if any(b <= a for _, a, b in fused.pieces):
        return "an empty piece"
    if len(fused.pieces) == 1 and fused.pieces[0][1:] == (0, size):
        return None
    return fused


def _pieces_of(cut: Node, rank: int) -> tuple[int, list[tuple[Value, int, int]]] | None:
    """(axis, [(output, start, stop)]) of a Split or a single-axis step-1 Slice with constant bounds."""
    if cut.op_type == "Split":
        axis = int(_attr(cut, "axis", 0)) % rank
        sizes = _int_list(cut.inputs[1]) if len(cut.inputs) > 1 and cut.inputs[1] is not None else None
        if sizes is None:
            shape = _dims(cut.inputs[0])
            total = shape[axis] if shape else None
            count = len(cut.outputs)
            if total is None or total % count:
                return None
            sizes = [total // count] * count
        pieces, start = [], 0
        for out, size in zip(cut.outputs, sizes, strict=True):
            pieces.append((out, start, start + size))
            start += size
        return axis, pieces
    starts, ends = _int_list(cut.inputs[1]), _int_list(cut.inputs[2])
    axes = _int_list(cut.inputs[3]) if len(cut.inputs) > 3 and cut.inputs[3] is not None else [0]
    steps = _int_list(cut.inputs[4]) if len(cut.inputs) > 4 and cut.inputs[4] is not None else [1]
    if not starts or not ends or axes is None or steps is None or len(starts) != 1 or len(axes) != 1 or steps != [1]:
        return None
    shape = _dims(cut.inputs[0])
    axis = axes[0] % rank
    size = shape[axis] if shape else None
    if size is None:
        return None
    start, stop = starts[0], ends[0]
    start = start + size if start < 0 else start
    stop = size if stop >= _INT64_MAX // 2 else (stop + size if stop < 0 else stop)
    return axis, [(cut.outputs[0], start, stop)]


def split(graph, fused: FusedProjection, builder: Builder) -> int:
    """Rewrite one fused projection into one linear layer per piece; returns the number of pieces."""
    site = fused.site
    w_nk = site.nk()
    dtype = constant_array(site.weight).dtype
    columns = np.arange(site.out_features).reshape(fused.trailing)
    source = source_name(site.weight) or site.weight.name or "weight"
    base = site.weight.name or "weight"
    out = site.node.outputs[0].name or base
    label = site.node.name or out
    shared: dict[str, Value] = {}  # the Slice bounds of computed shapes, made once
    total = len(fused.pieces)
    outputs: list[tuple[Value, str]] = []  # graph outputs a piece now computes, and the name they keep
    for index, (old, start, stop) in enumerate(fused.pieces):
        picked = np.take(columns, np.arange(start, stop), axis=fused.axis)
        cols = picked.reshape(-1)
        piece_trailing = list(fused.trailing)
        piece_trailing[fused.axis] = stop - start
        nodes: list[Node] = []
        w_piece = w_nk[cols]
        stored = np.ascontiguousarray((w_piece.T if site.k_axis == 0 else w_piece).astype(dtype))
        weight = builder.initializer(f"{base}_part{index}", stored)
        annotate(weight, SOURCE_NAME, f"{source}[part {index + 1}/{total}]")
        inputs: list[Value | None] = [site.activation, weight]
        bias_value = None
        if fused.bias is not None:
            bias_value = builder.initializer(f"{base}_bias_part{index}", np.ascontiguousarray(fused.bias[cols]))
        if site.node.op_type == "Gemm":
            if bias_value is not None:
                inputs.append(bias_value)
            attributes = {k: a.value for k, a in site.node.attributes.items()}
            proj = builder.node("Gemm", inputs, name=f"{label}_part{index}", outputs=[f"{out}_part{index}"],
                                attributes=attributes)
        else:
            proj = builder.node("MatMul", inputs, name=f"{label}_part{index}", outputs=[f"{out}_part{index}"])
        nodes.append(proj)
        current = proj.outputs[0]
        _like(current, site.node.outputs[0], -1, int(cols.size))
        if fused.bias_node is not None and bias_value is not None:
            pair = [bias_value, current] if fused.bias_first else [current, bias_value]
            add = builder.node("Add", pair, name=f"{label}_bias_part{index}", outputs=[f"{out}_biased{index}"])
            _like(add.outputs[0], current, -1, int(cols.size))
            nodes.append(add)
            current = add.outputs[0]
        if fused.reshape is not None:
            shape_value, extra = _piece_shape(fused.reshape, piece_trailing, builder, index, shared)
            nodes += extra
            reshape = builder.node("Reshape", [current, shape_value], name=f"{fused.reshape.name or 'reshape'}_part{index}",
                                   outputs=[f"{out}_view{index}"],
                                   attributes={k: a.value for k, a in fused.reshape.attributes.items()})
            out_dims = list(fused.reshape.outputs[0].shape or [])
            out_dims[len(out_dims) - len(piece_trailing):] = piece_trailing
            reshape.outputs[0].shape = Shape(out_dims)
            reshape.outputs[0].dtype = current.dtype
            nodes.append(reshape)
            current = reshape.outputs[0]
        if fused.transpose is not None:
            transpose = builder.node("Transpose", [current], name=f"{fused.transpose.name or 'transpose'}_part{index}",
                                     outputs=[f"{out}_t{index}"], attributes={"perm": list(fused.perm)})
            nodes.append(transpose)
            current = transpose.outputs[0]
        current.shape, current.dtype = old.shape, old.dtype
        for node in nodes:
            annotate(node, PROVENANCE, _NAME)
        graph.insert_before(old.producer(), nodes)
        if old.is_graph_output() and old.name:
            outputs.append((current, old.name))
        old.replace_all_uses_with(current, replace_graph_outputs=True)
    dead = [*fused.cuts, *(n for n in (fused.transpose, fused.reshape, fused.bias_node) if n is not None), site.node]
    graph.remove(dead, safe=True)
    for value, name in outputs:  # the model's interface keeps its names
        builder.release(value.name)
        value.name = name
    return total


def _like(value: Value, model_value: Value, axis: int, size: int) -> None:
    value.dtype = model_value.dtype
    if model_value.shape is not None:
        dims = list(model_value.shape)
        dims[axis] = size
        value.shape = Shape(dims)


def _piece_shape(
    reshape: Node, trailing: list[int], builder: Builder, index: int, shared: dict[str, Value]
) -> tuple[Value, list[Node]]:
    """The shape operand of a piece's Reshape: the original with its feature dims replaced."""
    original = reshape.inputs[1]
    keep = len(reshape.outputs[0].shape or []) - len(trailing)
    known = _int_list(original)
    if known is not None:
        return builder.initializer(f"{original.name or 'shape'}_part{index}", np.asarray([*known[:keep], *trailing], np.int64)), []
    if "starts" not in shared:
        shared["starts"] = builder.initializer("shape_start", np.asarray([0], np.int64))
        shared["ends"] = builder.initializer("shape_lead", np.asarray([keep], np.int64))
    starts, ends = shared["starts"], shared["ends"]
    tail = builder.initializer(f"{original.name or 'shape'}_tail{index}", np.asarray(trailing, np.int64))
    head = builder.node("Slice", [original, starts, ends], name=f"shape_head{index}", outputs=[f"shape_head{index}"])
    head.outputs[0].dtype, head.outputs[0].shape = original.dtype, Shape([keep])
    full = builder.node("Concat", [head.outputs[0], tail], name=f"shape_part{index}", outputs=[f"shape_part{index}"],
                        attributes={"axis": 0})
    full.outputs[0].dtype, full.outputs[0].shape = original.dtype, Shape([keep + len(trailing)])
    return full.outputs[0], [head, full]


def split_fused_projections(model: Model, context: PassContext | None = None) -> tuple[int, int]:
    """Split every fused projection of the main graph; returns (projections split, pieces made).

    With a context, says what it did (and what it left fused and why) in remarks.
    """
    graph = model.graph
    found: list[FusedProjection] = []
    misses: list[tuple[str, str]] = []
    for node in list(graph):
        match = match_fused(node)
        if isinstance(match, FusedProjection):
            found.append(match)
        elif isinstance(match, str):
            misses.append((node.name or node.op_type, match))
    if context is not None and misses:
        message = match_summary(len(found), (why for _, why in misses), "fused projections")
        context.remark("missed", message, matched_none=not found)
    if not found:
        return 0, 0
    builder = Builder(graph)
    pieces = 0
    for fused in found:
        pieces += split(graph, fused, builder)
    drop_unused_initializers(graph)
    if context is not None:
        context.remark("passed", f"split {len(found)} fused projections into {pieces} linear layers")
    return len(found), pieces


@register_pass(_NAME)
class SplitFusedProjections(Pass):
    """Split fused projections (qkv, gate/up) into one linear layer per piece, with exactly equal outputs."""

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        split_count, pieces = split_fused_projections(model, am.context)
        if not split_count and not any(isinstance(match_fused(n), str) for n in model.graph):
            am.context.remark("analysis", "no fused projection: no linear layer's output is cut into pieces")
        return PassResult(model, bool(split_count), None, {"projections-split": split_count, "linear-layers-made": pieces})


__all__ = ["FusedProjection", "SplitFusedProjections", "match_fused", "split", "split_fused_projections"]

