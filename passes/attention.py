"""Attention blocks found by graph pattern, and a head-axis analysis for rewriting them.

A block is an output projection `o` (a linear layer) whose input is, through
Reshape/Transpose, `MatMul(probs, V)` where `probs` comes (through Softmax,
masking and scaling) from `MatMul(Q, Kᵀ)`, and Q, K, V come (through
Reshape, Transpose, rotary embeddings, the GQA repeat) from one linear layer
each, optionally followed by a bias `Add`. This is what the torch exporter
emits for LLaMA-like decoders and BERT-like encoders; no parameter names are
used.

`HeadAxes` then walks the values between the projections and `o` forward and
records, for each value, which axes carry query heads (`H`), KV heads (`KV`),
the GQA repeat (`REP`) or flattened heads × head_dim (`HD`, `KVD`), and which
elements of Reshape/Expand shape operands encode those counts, so that a pass
can change the number of heads consistently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optc.errors import OptcError
from optc.ir import Model, Node, Value, constant_array, is_constant, transpose_perm
from optc.ir.patterns.ops import ATTENTION_SCORE_OPS, DATA_MOVEMENT_OPS, ELEMENTWISE_OPS, LAYOUT_OPS
from optc.passes.linear_layers import Linear, linear


@dataclass
class AttentionBlock:
    """One attention layer: its four projections and head geometry."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_out: Value  # the projection outputs (after the bias Add when there is one)
    k_out: Value
    v_out: Value
    biases: dict[str, Node] = field(default_factory=dict)  # "q"/"k"/"v"/"o" -> bias Add node
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


def _bias_add(value: Value) -> Node | None:
    """The `Add(value, constant)` that only reads `value`, when that is its only use."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    other = node.inputs[1 - uses[0].idx]
    if not is_constant(other) or other.shape is None or len(other.shape) != 1:
        return None
    return node


def linear_of(value: Value) -> tuple[Linear, Node | None] | None:
    """The linear layer producing `value` (directly, or through a constant bias Add)."""
    node = value.producer()
    if node is None:
        return None
    site = linear(node)
    if site is not None:
        return site, None
    if node.op_type == "Add" and len(node.inputs) == 2:
        for i in (0, 1):
            inner, other = node.inputs[i], node.inputs[1 - i]
            producer = inner.producer() if inner is not None else None
            site = linear(producer) if producer is not None else None
            if site is not None and is_constant(other) and _bias_add(inner) is node:
                return site, node
    return None


def _sources(value: Value, allowed: frozenset[str], limit: int = 64) -> list[tuple[Linear, Node | None, Value]]:
    """Linear layers reached walking back from `value` through `allowed` ops (data inputs only)."""
    found: dict[int, tuple[Linear, Node | None, Value]] = {}
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is None or id(current) in seen or is_constant(current):
            continue
        seen.add(id(current))
        hit = linear_of(current)
        if hit is not None:
            found[id(hit[0].node)] = (hit[0], hit[1], current)
            continue
        node = current.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in allowed:
            continue
        # Split only lets a fused projection be recognized (and reported): Q, K and V must come from three layers.
        inputs = node.inputs[:1] if node.op_type in DATA_MOVEMENT_OPS - {"Concat"} else node.inputs
        stack.extend(v for v in inputs if v is not None)
    return list(found.values())


def _two_activation_matmul(value: Value, through: frozenset[str], depth: int = 8) -> Node | None:
    """A MatMul of two non-constant inputs reached walking back from `value` through `through` ops."""
    for _ in range(depth):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "MatMul" and not any(is_constant(v) for v in node.inputs):
            return node
        if node.op_type not in through:
            return None
        value = node.inputs[0]
    return None


@dataclass
class AttentionScan:
    """The attention blocks of a graph, and the candidates that did not match with the reason for each.

    A candidate is an output projection whose input is `MatMul(probs, V)` with `probs` from `MatMul(Q, Kᵀ)`:
    an attention layer by its core, whether or not its projections could be resolved.
    """

    blocks: list[AttentionBlock] = field(default_factory=list)
    misses: list[tuple[str, str]] = field(default_factory=list)  # (output projection's label, reason)

    @property
    def candidates(self) -> int:
        return len(self.blocks) + len(self.misses)


def find_attention(model: Model) -> list[AttentionBlock]:
    """Every attention block of the graph, in graph order of the output projections."""
    return scan_attention(model).blocks


def scan_attention(model: Model) -> AttentionScan:
    """Every attention block of the graph (in graph order of the output projections) and why the others failed."""
    scan = AttentionScan()
    for node in model.graph:
        o = linear(node)
        if o is None:
            continue
        attn = _two_activation_matmul(o.activation, LAYOUT_OPS)
        if attn is None:
            continue
        score = _two_activation_matmul(attn.inputs[0], ATTENTION_SCORE_OPS, depth=12)
        if score is None:
            continue
        block_or_reason = _block(o, attn, score)
        if isinstance(block_or_reason, str):
            scan.misses.append((o.label, block_or_reason))
        else:
            scan.blocks.append(block_or_reason)
    return scan


def value_paths(model: Model) -> list[tuple[Linear | None, Linear]]:
    """(V's projection, the output projection) of every attention core, in graph order: the OV circuit.

    Unlike `find_attention` this needs no head geometry; a fused qkv (or kv) projection is V's
    projection (as llama.cpp counts a fused attn_qkv as a V tensor), and V's projection is None when V
    does not come from exactly one linear layer.
    """
    paths: list[tuple[Linear | None, Linear]] = []
    for node in model.graph:
        o = linear(node)
        if o is None:
            continue
        attn = _two_activation_matmul(o.activation, LAYOUT_OPS)
        if attn is None or _two_activation_matmul(attn.inputs[0], ATTENTION_SCORE_OPS, depth=12) is None:
            continue
        found = _sources(attn.inputs[1], ELEMENTWISE_OPS | DATA_MOVEMENT_OPS)
        paths.append((found[0][0] if len(found) == 1 else None, o))
    return paths


def _block(o: Linear, attn: Node, score: Node) -> AttentionBlock | str:
    """The block around an attention core, or why its projections do not fit the pattern."""
    path = ELEMENTWISE_OPS | DATA_MOVEMENT_OPS
    sources = {"q": _sources(score.inputs[0], path), "k": _sources(score.inputs[1], path), "v": _sources(attn.inputs[1], path)}
    for key, found in sources.items():
        if len(found) != 1:
            return f"{key.upper()} comes from {len(found) or 'no'} linear layer{'s' if len(found) != 1 else ''}"
    (qs, qb, qo), (ks, kb, ko), (vs, vb, vo) = sources["q"][0], sources["k"][0], sources["v"][0]
    if qs.node is ks.node and ks.node is vs.node:
        return "fused qkv_proj"
    if ks.node is vs.node:
        return "fused kv_proj"
    if qs.node is ks.node or qs.node is vs.node:
        return "Q shares its projection with K or V"
    block = AttentionBlock(qs, ks, vs, o, qo, ko, vo)
    for key, bias in (("q", qb), ("k", kb), ("v", vb), ("o", _bias_add(o.node.outputs[0]))):
        if bias is not None:
            block.biases[key] = bias
    head_dim = _head_dim(attn, qo)
    if head_dim is None:
        return "head_dim unknown (no static shape)"
    q_out, k_out = qs.out_features, ks.out_features
    if q_out % head_dim or k_out % head_dim or vs.out_features != k_out or o.in_features != q_out:
        return (f"projection widths q={q_out} k={k_out} v={vs.out_features} o={o.in_features} "
                f"do not split into heads of {head_dim}")
    block.head_dim, block.heads, block.kv_heads = head_dim, q_out // head_dim, k_out // head_dim
    if block.heads % block.kv_heads:
        return f"{block.heads} query heads are not a multiple of {block.kv_heads} KV heads"
    return block


def _head_dim(attn: Node, q_out: Value) -> int | None:
    """head_dim from the attention output's static shape, else from the Q reshape's target constant."""
    shape = attn.outputs[0].shape
    if shape is not None and len(shape) >= 1 and isinstance(shape[-1], int) and shape[-1] > 0:
        return int(shape[-1])
    for use in q_out.uses():
        if use.node.op_type == "Reshape":
            target = shape_elements(use.node.inputs[1])
            if target and isinstance(target[-1], int) and target[-1] > 0:
                return int(target[-1])
    return None


# --------------------------------------------------------------------------- shape operands


def shape_elements(value: Value) -> list[int | None] | None:
    """The elements of a 1-D shape operand (None where dynamic): a constant, or a Concat of parts."""
    array = constant_array(value)
    if array is not None:
        return [int(x) for x in array.reshape(-1)]
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return None
    out: list[int | None] = []
    for part in node.inputs:
        array = constant_array(part)
        if array is not None:
            out.extend(int(x) for x in array.reshape(-1))
            continue
        if part.shape is None or len(part.shape) != 1 or not isinstance(part.shape[0], int):
            return None
        out.extend([None] * int(part.shape[0]))
    return out


@dataclass(frozen=True)
class ShapePatch:
    """Element `position` of the shape operand of `node` (Reshape/Expand) encodes `role`."""

    node: Node
    position: int
    role: str


@dataclass(frozen=True)
class ConstantPatch:
    """Input `index` of elementwise `node` is a constant whose axis `axis` (negative) runs along the
    flattened heads `role` (`HD`/`KVD`): OLMo 2's q_norm/k_norm weight over the whole projection."""

    node: Node
    index: int
    axis: int
    role: str


class HeadAxes:
    """Forward analysis of head-carrying axes from the projections of a block to its output projection."""

    def __init__(self, block: AttentionBlock) -> None:
        self.block = block
        self.roles: dict[int, dict[int, str]] = {}  # id(value) -> {negative axis: role}
        self.values: dict[int, Value] = {}
        self.patches: list[ShapePatch] = []
        self.constants: list[ConstantPatch] = []
        #: Reductions over the flattened heads (an RMSNorm of the whole q or k projection, OLMo 2): each
        #: head's values are normalized by a statistic of every head's, so removing heads changes it.
        self.cross_head: list[Node] = []
        self.nodes: list[Node] = []
        self._run()

    def _rank(self, value: Value) -> int | None:
        return len(value.shape) if value.shape is not None else None

    def _width(self, role: str) -> int:
        """The width of a flattened-heads axis: heads·head_dim (`HD`) or kv_heads·head_dim (`KVD`)."""
        return (self.block.heads if role == "HD" else self.block.kv_heads) * self.block.head_dim

    def _set(self, value: Value, roles: dict[int, str]) -> None:
        self.roles[id(value)] = roles
        self.values[id(value)] = value

    def _fail(self, node: Node, why: str) -> None:
        raise OptcError(f"prune-heads: unsupported attention pattern at {node.name or node.op_type} ({why})")

    def _run(self) -> None:
        b = self.block
        self._set(b.q_out, {-1: "HD"})
        kv = "HD" if b.heads == b.kv_heads else "KVD"  # without GQA, K/V heads are the query heads
        self._set(b.k_out, {-1: kv})
        self._set(b.v_out, {-1: kv})
        target = b.o.activation
        graph = b.o.node.graph
        ends = _backward_reach(target)
        for node in graph:
            if node is b.o.node:
                break
            if id(node) not in ends:
                continue
            ins = [self.roles.get(id(v)) if v is not None else None for v in node.inputs]
            if not any(ins):
                continue
            self.nodes.append(node)
            out = self._transfer(node, ins)
            for value in node.outputs:
                self._set(value, out)
        if id(target) not in self.roles or self.roles[id(target)] != {-1: "HD"}:
            self._fail(b.o.node, "its input is not the heads flattened along the last axis")

    def _transfer(self, node: Node, ins: list[dict[int, str] | None]) -> dict[int, str]:
        op = node.op_type
        x = ins[0] or {}
        if op == "Shape":
            return {}  # a runtime shape follows the data: nothing to rewrite
        if op in ELEMENTWISE_OPS or op == "Concat":
            if op != "Concat":
                self._head_constants(node)
            merged: dict[int, str] = {}
            for roles in ins:
                for axis, role in (roles or {}).items():
                    if merged.get(axis, role) != role:
                        self._fail(node, f"axis {axis} is both {merged[axis]} and {role}")
                    merged[axis] = role
            if op == "Concat":
                rank = self._rank(node.outputs[0])
                axis = node.attributes["axis"].as_int()
                if rank is None or (axis - rank if axis >= 0 else axis) in merged:
                    self._fail(node, "concatenation along a head axis")
            if op == "Softmax":
                rank = self._rank(node.outputs[0])
                attr = node.attributes.get("axis")
                axis = attr.as_int() if attr is not None else -1
                if rank is not None and (axis - rank if axis >= 0 else axis) in merged:
                    self._fail(node, "softmax over a head axis")
            return merged
        if any(r for r in ins[1:]) and op not in ("MatMul",):
            self._fail(node, "a head-carrying value is used as a shape or index")
        if op == "Slice":
            axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            rank = self._rank(node.inputs[0])
            if axes is None or rank is None:
                self._fail(node, "slice axes unknown")
            if any((int(a) - rank if a >= 0 else int(a)) in x for a in axes.reshape(-1)):
                self._fail(node, "slice along a head axis")
            return dict(x)
        if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"):
            # A per-head reduction (QK-norm's mean of squares over head_dim) keeps the head axes.
            axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            rank = self._rank(node.inputs[0])
            keepdims = node.attributes.get("keepdims")
            if axes is None or rank is None or (keepdims is not None and not keepdims.as_int()):
                self._fail(node, f"{op} on a head-carrying value")
            reduced = {int(a) - rank if a >= 0 else int(a) for a in axes.reshape(-1)}
            if any(x.get(a) in ("H", "KV", "REP") for a in reduced):
                self._fail(node, f"{op} over a head axis")
            if any(a in x for a in reduced):  # over the flattened heads: kept as size 1, no head axis left
                self.cross_head.append(node)
            return {a: r for a, r in x.items() if a not in reduced}
        if op == "Transpose":
            rank = self._rank(node.inputs[0])
            if rank is None:
                self._fail(node, "rank unknown")
            perm_list = transpose_perm(node, rank)
            out = {}
            for i, p in enumerate(perm_list):
                role = x.get(p - rank)
                if role is not None:
                    out[i - rank] = role
            return out
        if op == "Unsqueeze":
            rank = self._rank(node.outputs[0])
            axes = constant_array(node.inputs[1])
            if rank is None or axes is None:
                self._fail(node, "unsqueeze axes unknown")
            inserted = sorted(int(a) % rank for a in axes.reshape(-1))
            in_rank = rank - len(inserted)
            positive = {a + in_rank: r for a, r in x.items()}
            out, j = {}, 0
            for i in range(rank):
                if i in inserted:
                    continue
                if j in positive:
                    out[i - rank] = positive[j]
                j += 1
            return out
        if op == "Squeeze":
            rank = self._rank(node.inputs[0])
            axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if rank is None or axes is None:
                self._fail(node, "squeeze axes unknown")
            removed = {int(a) % rank - rank for a in axes.reshape(-1)}
            if removed & set(x):
                self._fail(node, "squeeze of a head axis")
            return {a + sum(1 for r in removed if r > a): role for a, role in x.items()}
        if op == "Expand":
            return self._expand(node, x)
        if op == "Reshape":
            return self._reshape(node, x)
        if op == "MatMul":
            a, bm = ins[0] or {}, ins[1] or {}
            out = {}
            for axis, role in list(a.items()) + list(bm.items()):
                if axis >= -2:
                    if (axis == -2 and axis in a and a[axis] == role) or (axis == -1 and axis in bm and bm[axis] == role):
                        self._fail(node, "a head axis is a matrix axis")
                    continue
                if out.get(axis, role) != role:
                    self._fail(node, f"axis {axis} is both {out[axis]} and {role}")
                out[axis] = role
            return out
        self._fail(node, f"{op} on a head-carrying value")
        return {}

    def _head_constants(self, node: Node) -> None:
        """Record each constant input of an elementwise node that spans a flattened-heads axis."""
        rank = self._rank(node.outputs[0])
        for index, value in enumerate(node.inputs):
            if value is None or not is_constant(value) or value.shape is None or rank is None:
                continue
            for position, size in enumerate(value.shape):
                axis = position - len(value.shape)
                if size == 1 or not isinstance(size, int):
                    continue
                roles = [self.roles[id(v)].get(axis) for v in node.inputs if v is not None and id(v) in self.roles]
                role = next((r for r in roles if r is not None), None)
                if role in ("HD", "KVD") and size == self._width(role):
                    self.constants.append(ConstantPatch(node, index, axis, role))
                elif role is not None:
                    self._fail(node, f"a constant of {size} along a {role} axis")

    def _expand(self, node: Node, x: dict[int, str]) -> dict[int, str]:
        target = shape_elements(node.inputs[1])
        in_shape = node.inputs[0].shape
        if target is None or in_shape is None:
            self._fail(node, "expand shape unknown")
        rank = len(target)
        out = {a: r for a, r in x.items()}
        for pos, value in enumerate(target):
            axis = pos - rank
            if axis in x:
                if value is not None and value > 1:
                    self.patches.append(ShapePatch(node, pos, x[axis]))
                continue
            in_dim = in_shape[axis] if -axis <= len(in_shape) else 1
            if value is not None and value > 1 and in_dim == 1:
                if x.get(axis - 1) != "KV":
                    self._fail(node, "a repeat that does not follow the KV head axis")
                out[axis] = "REP"
                self.patches.append(ShapePatch(node, pos, "REP"))
        return out

    def _reshape(self, node: Node, x: dict[int, str]) -> dict[int, str]:
        target = shape_elements(node.inputs[1])
        in_rank = self._rank(node.inputs[0])
        out_rank = len(target) if target is not None else self._rank(node.outputs[0])
        if in_rank is None or out_rank is None:
            self._fail(node, "ranks unknown")
        roles = set(x.values())
        flat = x.get(-1) if len(x) == 1 else None
        if flat in ("HD", "KVD") and target is not None and target[-1] == self._width(flat) != self.block.head_dim:
            # Only the leading axes change (GPT-2's Conv1D: a Gemm on [batch·seq, heads·d], viewed back as
            # [batch, seq, heads·d]): the flattened heads stay on the last axis.
            self.patches.append(ShapePatch(node, out_rank - 1, flat))
            return {-1: flat}
        inserted = out_rank - in_rank - 1  # size-1 axes before the heads (ModernBERT's [b, s, 1, heads, d] piece)
        if x.get(-1) in ("HD", "KVD") and len(x) == 1 and inserted >= 0 and \
                (inserted == 0 or (target is not None and all(t == 1 for t in target[-2 - inserted:-2]))):
            head = "H" if x[-1] == "HD" else "KV"
            if target is not None and target[-2] is not None and target[-2] > 0:
                self.patches.append(ShapePatch(node, out_rank - 2, head))
            if target is not None and (target[-1] is None or target[-1] not in (-1, self.block.head_dim)):
                self._fail(node, "the split does not end in head_dim")
            return {-2: head}
        if x.get(-2) in ("H", "KV") and len(x) == 1 and target is not None:
            merged = "HD" if x[-2] == "H" else "KVD"
            # The merge back to [..., heads·d]; with the leading axes flattened too (GPT-2's view for its
            # Conv1D Gemm) only when the target spells that width.
            if out_rank == in_rank - 1 or (out_rank < in_rank - 1 and target[-1] == self._width(merged)):
                if target[-1] is not None and target[-1] > 0:
                    self.patches.append(ShapePatch(node, out_rank - 1, merged))
                return {-1: merged}
        if roles == {"KV", "REP"} and out_rank == in_rank - 1:
            (kv_axis,) = [a for a, r in x.items() if r == "KV"]
            if x.get(kv_axis + 1) != "REP" or target is None:
                self._fail(node, "a repeat that is not merged with its KV axis")
            merged = kv_axis + 1  # the merged axis keeps the REP axis's negative index
            if target[merged] is not None and target[merged] > 0:
                self.patches.append(ShapePatch(node, out_rank + merged, "H"))
            return {merged: "H"}
        before, after = node.inputs[0].shape, node.outputs[0].shape
        if target is not None and out_rank == in_rank and before is not None and after is not None \
                and list(before) == list(after) and all(r in ("H", "KV") for r in roles):
            # A reshape to the shape it already has (Phi-3's view of the attention output): the heads stay put.
            for axis, role in x.items():
                if target[axis] is not None and target[axis] > 0:
                    self.patches.append(ShapePatch(node, out_rank + axis, role))
            return dict(x)
        if len(x) == 1 and target is not None:
            # A reshape that merges the head axis into another axis (the [b*h, s, d] view of K) or back: the
            # target must not spell a head count, and the heads are followed again where the data meets Q.
            (axis, role) = next(iter(x.items()))
            if role in ("H", "KV") and all(t is None or t in (-1, 0, 1, self.block.head_dim) for t in target):
                return {}
        self._fail(node, "a reshape of head axes that is not a split or merge of heads")
        return {}


def _backward_reach(value: Value) -> set[int]:
    """ids of the nodes `value` depends on (data and shape inputs alike)."""
    seen: set[int] = set()
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


__all__ = ["AttentionBlock", "AttentionScan", "ConstantPatch", "HeadAxes", "ShapePatch", "find_attention", "scan_attention", "shape_elements", "value_paths"]
