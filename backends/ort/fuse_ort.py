"""`fuse-ort`: a decoder's rotary attention as onnxruntime's `com.microsoft::GroupQueryAttention`.

Input: the attention the transformers frontend exports with `kv_cache=True`
(LLaMA-style, rotary embedding on half-rotated head dimensions): per layer

    q, k, v = Transpose(Reshape(X·Wq|Wk|Wv))                  [batch, heads, seq, head_dim]
    q', k'  = q·cos + rotate_half(q)·sin                       cos/sin from position_ids and inv_freq
    present.key = Concat(past.key, k'), present.value = Concat(past.value, v)
    out     = Reshape(Transpose(softmax(q'·c · (repeat(present.key)·c)ᵀ + mask) · repeat(present.value)))

becomes one `GroupQueryAttention(q_lin, k_lin, v_lin, past.key, past.value,
seqlens_k, total_sequence_length, cos_cache, sin_cache)` with `do_rotary=1` and
`scale = c²`, its outputs `out`, `present.key`, `present.value`. The cos/sin
tables are computed from the graph's own `inv_freq` for positions
0..max_position_embeddings-1; `seqlens_k` (attention mask sum − 1) and
`total_sequence_length` (the mask's length) are computed once from
`attention_mask`.

The same causal LM exported without its cache (`input_ids -> logits`, rotary
positions Range(0, sequence length)) gets the same rewrite, so that both forms
run one attention kernel (a quantized model's static activation quantizers
turn two kernels' different float roundings into different int8 steps, so
perplexities of the two forms would differ): `GroupQueryAttention` without
past inputs, `seqlens_k` = sequence length − 1 for every row and
`total_sequence_length` = the sequence length, both from input_ids' shape. Its
present outputs stay, unread: onnxruntime's CPU kernel rounds as in a prefill
from an empty cache only with them. This applies to a model whose config names
a causal-LM family (GroupQueryAttention's mask is causal). It says why it
left attention unfused where the cache form's would be fused (rotary positions
other than 0 … length − 1, an attention_mask input) or beside fused blocks;
attention GroupQueryAttention cannot run in either form (no rotary, a head
size, INT8 attention products) stays as written in both, the same kernel, and
only the cache form's remark says why.

What GroupQueryAttention assumes, and onnxruntime-genai always feeds: the
positions of the new tokens follow the cache (`position_ids` = past_seq …
past_seq + seq − 1) and the attention mask is ones followed by padding at the
right. The result equals the unfused graph within float tolerance (tests:
tests/backends/ort/test_fuse_ort.py).

It leaves attention as written, with a remark, where the structure differs (no
rotary, a fused QKV projection, interleaved rotary, a scaling on cos/sin) and
where the attention's own matrix products are quantized (static INT8
activations: GroupQueryAttention has no INT8 form).

`norms=true` also rewrites RMSNorm (the exporter's Pow → ReduceMean → Add →
Sqrt → Reciprocal → Mul → Mul(γ), which onnxruntime's own optimizer does not
fuse) after a residual Add into `com.microsoft::SkipSimplifiedLayerNormalization`,
its fourth output standing for the sum; exact within float tolerance, but off by
default: SmolLM2's decode was not measurably faster with it (README, Results).
Weight-only MatMuls are `lower-ort-nbits`' job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optc.ir import DataType, Model, Node, Value, constant_array, make_node, model_metadata
from optc.ir.annotations import HF_CONFIG
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.runtime.decoder import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, is_causal_lm

_QUANTIZERS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
               "MatMulIntegerToFloat", "QLinearMatMul")


class _Miss(Exception):
    """Why an attention block did not match (the remark's reason)."""


class _UncachedMiss(_Miss):
    """A reason only the form without a cache has: its counterpart with a cache would be fused."""


@dataclass
class _Attention:
    layer: int
    q_lin: Value
    k_lin: Value
    v_lin: Value
    past_key: Value | None
    past_value: Value | None
    present_key: Value | None
    present_value: Value | None
    output: Value
    inv_freq: np.ndarray
    scale: float
    heads: int
    kv_heads: int
    head_dim: int


@register_pass("fuse-ort")
class FuseOrt(Pass):
    """Rewrite a causal LM's rotary attention (with a KV cache or without) into com.microsoft GroupQueryAttention."""

    @dataclass
    class Options:
        attention: bool = option(True, help="rewrite rotary attention (with a KV cache or without) into GroupQueryAttention")
        norms: bool = option(False, help="rewrite RMSNorm after a residual Add into SkipSimplifiedLayerNormalization "
                             "in a KV-cache decoder (off: not measured faster on SmolLM2 decode)")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        layers = 0
        while PAST_KEY % layers in inputs:
            layers += 1
        config = model_metadata(model, HF_CONFIG) or {}
        uncached = layers == 0 and self.options.attention and is_causal_lm(config, inputs)
        if layers == 0 and not uncached:
            return PassResult(model, False, None, {"fused": 0})
        norms = _fuse_norms(model) if self.options.norms and layers else 0
        if not self.options.attention:
            return PassResult(model, bool(norms), None, {"fused": 0, "norms": norms})
        max_positions = int(config.get("max_position_embeddings") or 0)
        found: list[_Attention] = []
        reasons: list[str] = []
        form_only = 0  # reasons that are the no-cache form's own
        for layer, candidate in enumerate(_uncached_candidates(graph) if uncached else range(layers)):
            if not uncached:
                fused = outputs.get(PRESENT_KEY % layer)
                if fused is not None and fused.producer() is not None and fused.producer().op_type == "GroupQueryAttention":
                    continue  # fused by an earlier run
            try:
                attention = _match_uncached(layer, candidate) if uncached else _match(layer, inputs, outputs)
                if not uncached and "attention_mask" not in inputs:
                    raise _Miss("no attention_mask input")
                if max_positions <= 0:
                    raise _Miss("no max_position_embeddings in the model's config (the rotary tables' length)")
                window = _sliding_window(config)
                if window is not None and window < max_positions:
                    raise _Miss(f"a sliding window of {window} tokens (GroupQueryAttention is written without one)")
                found.append(attention)
            except _Miss as miss:
                reasons.append(str(miss))
                form_only += isinstance(miss, _UncachedMiss)
        if uncached and found and "attention_mask" in inputs:  # padding: GQA would need its own seqlens_k
            reasons, form_only = reasons + ["an attention_mask input without a KV cache"] * len(found), len(found)
            found = []
        total = layers if not uncached else len(found) + len(reasons)
        # Without a cache, attention that GroupQueryAttention cannot run in either form (no rotary, a head size,
        # INT8 attention products) stays as written in both, the same kernel: said only beside fused blocks.
        if reasons and (not uncached or found or form_only):
            am.context.remark(
                "missed", match_summary(len(found), reasons, "attention blocks", "fused into GroupQueryAttention"),
                matched_none=not found,
            )
        if not found:
            return PassResult(model, bool(norms), None, {"fused": 0, "norms": norms})
        build = Builder(graph)
        if uncached:
            lengths = _lengths_from_input_ids(build, inputs["input_ids"])
        else:
            lengths = _lengths_from_mask(build, inputs["attention_mask"])
        shared = _shared_inputs(build, lengths, found[0], max_positions)
        for attention in found:
            _rewrite(build, attention, shared)
        _remove_dead(graph)
        drop_unused_initializers(graph)
        if model.opset_imports.get("com.microsoft") is None:
            model.opset_imports["com.microsoft"] = 1
        form = " (no KV cache: no past inputs)" if uncached else ""
        am.context.remark("passed", f"{len(found)} of {total} attention blocks fused into GroupQueryAttention{form}")
        return PassResult(model, True, None, {"fused": len(found), "norms": norms})


def _sliding_window(config: dict) -> int | None:
    """The config's attention window in tokens, or None (no window, or one the config switches off: qwen2)."""
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False or isinstance(window, bool) or not isinstance(window, int):
        return None
    return window


# --------------------------------------------------------------------------- matching


def _producer(value: Value | None, op: str | tuple[str, ...]) -> Node:
    ops = (op,) if isinstance(op, str) else op
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        found = node.op_type if node is not None else "a graph input or constant"
        raise _Miss(f"expected {' or '.join(ops)}, found {found}")
    return node


def _perm(node: Node) -> list[int]:
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else []


def _axis(node: Node) -> int | None:
    attr = node.attributes.get("axis")
    return attr.as_int() if attr is not None else None


def _heads_input(value: Value) -> Value:
    """`x` of Transpose<perm=0,2,1,3>(Reshape(x)): the projection's [batch, seq, heads·head_dim] output."""
    transpose = _producer(value, "Transpose")
    if _perm(transpose) != [0, 2, 1, 3]:
        raise _Miss(f"a head transpose with perm {_perm(transpose)}")
    reshape = _producer(transpose.inputs[0], "Reshape")
    return reshape.inputs[0]


def _rotary(value: Value) -> tuple[Value, Value, Value]:
    """(x, cos, sin) of Add(Mul(x, cos), Mul(Concat(Neg(Slice(x)), Slice(x)), sin)), either operand order."""
    add = value.producer()
    if add is None or add.op_type != "Add" or any(v is None or v.producer() is None for v in add.inputs):
        raise _Miss("no rotary embedding (Add(Mul(x, cos), Mul(rotate_half(x), sin)))")
    muls = [_producer(v, "Mul") for v in add.inputs]
    for plain, rotated in (muls, muls[::-1]):
        for concat_at in (0, 1):
            concat = rotated.inputs[concat_at].producer() if rotated.inputs[concat_at] is not None else None
            if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
                continue
            neg = concat.inputs[0].producer()
            if neg is None or neg.op_type != "Neg":
                raise _Miss("interleaved rotary (rotate_half is not Concat(Neg(second half), first half))")
            second = _producer(neg.inputs[0], "Slice")
            first = _producer(concat.inputs[1], "Slice")
            x = first.inputs[0]
            if second.inputs[0] is not x:
                raise _Miss("rotate_half halves of different tensors")
            sin = rotated.inputs[1 - concat_at]
            for at in (0, 1):
                if plain.inputs[at] is x:
                    return x, plain.inputs[1 - at], sin
    raise _Miss("no rotary embedding (Add(Mul(x, cos), Mul(rotate_half(x), sin)))")


def _inv_freq(cos: Value, sin: Value, cached: bool) -> np.ndarray:
    """inv_freq of cos = Unsqueeze(Cos(Concat(f, f))), f = Mul(positions, inv_freq); sin the same with Sin.

    The positions are the `position_ids` input with a cache (`cached`), else 0 … sequence length − 1 (a Range over
    input_ids' second dimension), what GroupQueryAttention computes for a first prompt."""
    found = []
    for value, op in ((cos, "Cos"), (sin, "Sin")):
        node = _producer(value, ("Unsqueeze", op))
        if node.op_type == "Unsqueeze":
            node = _producer(node.inputs[0], op)
        concat = _producer(node.inputs[0], "Concat")
        if len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
            raise _Miss("rotary angles are not two copies of one half")
        mul = _producer(concat.inputs[0], "Mul")
        consts = [constant_array(v) for v in mul.inputs]
        table = next((c for c in consts if c is not None), None)
        other = mul.inputs[0] if consts[1] is not None else mul.inputs[1]
        if table is None:
            raise _Miss("rotary angles are not positions × a constant inv_freq (a scaled rotary)")
        if not (_from_position_ids(other) if cached else _from_sequence_range(other)):
            if cached:
                raise _Miss("rotary angles are not position_ids × inv_freq")
            raise _UncachedMiss("rotary positions are not 0 … sequence length − 1 of input_ids")
        found.append((mul, table.reshape(-1).astype(np.float64)))
    if found[0][0] is not found[1][0]:
        raise _Miss("cos and sin from different angles")
    return found[0][1]


def _position_source(value: Value) -> Value | Node | None:
    """The graph input or the Range node `value` comes from through Unsqueeze/Cast/Reshape/Transpose/Expand only."""
    for _ in range(8):
        if value.is_graph_input():
            return value
        node = value.producer()
        if node is not None and node.op_type == "Range":
            return node
        if node is None or node.op_type not in ("Unsqueeze", "Cast", "Reshape", "Transpose", "Expand"):
            return None
        value = node.inputs[0]
    return None


def _from_position_ids(value: Value) -> bool:
    """True when `value` is the position_ids input, reshaped or broadcast."""
    source = _position_source(value)
    return isinstance(source, Value) and source.name == "position_ids"


def _from_sequence_range(value: Value) -> bool:
    """True when `value` is Range(0, sequence length, 1), the length input_ids' second dimension, reshaped or broadcast."""
    source = _position_source(value)
    if not isinstance(source, Node):
        return False
    start, limit, delta = source.inputs
    if constant_array(start) is None or constant_array(delta) is None:
        return False
    if constant_array(start).reshape(-1).tolist() != [0] or constant_array(delta).reshape(-1).tolist() != [1]:
        return False
    node = limit.producer() if limit is not None else None
    while node is not None and node.op_type in ("Squeeze", "Cast", "Reshape"):
        node = node.inputs[0].producer()
    if node is None or node.op_type not in ("Shape", "Gather") or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Gather":
        index = constant_array(node.inputs[1])
        shape = node.inputs[0].producer()
        if index is None or index.reshape(-1).tolist() != [1] or shape is None or shape.op_type != "Shape":
            return False
        return shape.inputs[0].is_graph_input() and shape.inputs[0].name == "input_ids" and "start" not in shape.attributes
    begin, end = node.attributes.get("start"), node.attributes.get("end")
    return (node.inputs[0].is_graph_input() and node.inputs[0].name == "input_ids" and begin is not None
            and begin.as_int() == 1 and end is not None and end.as_int() == 2)


def _scale_of(value: Value) -> tuple[Value, float]:
    """(x, c) of Mul(x, c) with a constant scalar c, else (value, 1)."""
    node = value.producer()
    if node is not None and node.op_type == "Mul":
        for at in (0, 1):
            c = constant_array(node.inputs[at])
            if c is not None and c.size == 1:
                return node.inputs[1 - at], float(c.reshape(-1)[0])
    return value, 1.0


def _only_use(value: Value) -> Node:
    """The one reader of `value` that reads its data (Shape nodes read only its shape)."""
    uses = [use for use in value.uses() if use[0].op_type != "Shape"]
    if len(uses) != 1:
        raise _Miss(f"{value.name} has {len(uses)} readers, expected 1")
    return uses[0][0]


def _follow_to_matmul(value: Value) -> tuple[Node, int]:
    """The MatMul reached from `value` through layout-only ops (repeat_kv, transposes) and its input index."""
    for _ in range(12):
        node = _only_use(value)
        if node.op_type in _QUANTIZERS:
            raise _Miss("quantized attention products (static INT8 activations): GroupQueryAttention has no INT8 form")
        if node.op_type == "MatMul":
            return node, next(i for i, v in enumerate(node.inputs) if v is value)
        if node.op_type not in ("Unsqueeze", "Expand", "Reshape", "Transpose", "Mul"):
            raise _Miss(f"an unexpected {node.op_type} between the keys or values and the attention product")
        value = node.outputs[0]
    raise _Miss("no attention product after the cache")


def _match(layer: int, inputs: dict[str, Value], outputs: dict[str, Value]) -> _Attention:
    """Layer `layer` of a KV-cache decoder: present = Concat(past, new) for keys and values, then the attention."""
    past_key, past_value = inputs.get(PAST_KEY % layer), inputs.get(PAST_VALUE % layer)
    present_key, present_value = outputs.get(PRESENT_KEY % layer), outputs.get(PRESENT_VALUE % layer)
    if past_value is None or present_key is None or present_value is None:
        raise _Miss(f"layer {layer} lacks a past or present tensor")
    key_concat = _producer(present_key, "Concat")
    value_concat = _producer(present_value, "Concat")
    for concat, past in ((key_concat, past_key), (value_concat, past_value)):
        if len(concat.inputs) != 2 or concat.inputs[0] is not past or _axis(concat) not in (2, -2):
            raise _Miss("present is not Concat(past, new) along the sequence axis")
    attention = _match_attention(layer, key_concat.inputs[1], value_concat.inputs[1], present_key, present_value,
                                 past_key.shape, cached=True)
    attention.past_key, attention.past_value = past_key, past_value
    attention.present_key, attention.present_value = present_key, present_value
    return attention


def _uncached_candidates(graph) -> list[Node]:
    """The Softmax nodes of a decoder without a cache, in graph order: one per attention block."""
    return [node for node in graph if node.op_type == "Softmax" and node.domain in ("", "ai.onnx")]


def _walk_back(value: Value, through: tuple[str, ...]) -> Value:
    """The value `value` comes from through the layout-only ops `through` (their first input; a Mul's non-constant one)."""
    for _ in range(12):
        node = value.producer()
        if node is None or node.op_type not in through:
            if node is not None and node.op_type in _QUANTIZERS:
                raise _Miss("quantized attention products (static INT8 activations): GroupQueryAttention has no INT8 form")
            return value
        operand = node.inputs[0]
        if node.op_type == "Mul":
            operand = next((v for v in node.inputs if constant_array(v) is None), None)
            if operand is None or sum(constant_array(v) is None for v in node.inputs) != 1:
                raise _Miss("a non-constant factor on the keys")
        value = operand
    raise _Miss("no projection before the attention product")


def _match_uncached(layer: int, softmax: Node) -> _Attention:
    """Attention block `layer` of a decoder without a cache, found from its Softmax: the keys and values the
    attention products read, traced back through repeat_kv and transposes, then matched as with a cache."""
    readers = [use[0] for use in softmax.outputs[0].uses() if use[0].op_type != "IsNaN"]
    if len(readers) != 1:
        raise _Miss(f"the attention probabilities have {len(readers)} readers, expected 1")
    probs = readers[0]
    if probs.op_type == "Where":
        probs = _only_use(probs.outputs[0])
    if probs.op_type != "MatMul" or probs.inputs[0].producer() not in (softmax, readers[0]):
        raise _Miss("no attention product after the softmax")
    score = _producer(softmax.inputs[0], ("Add", "MatMul"))
    if score.op_type == "Add":
        score = next((v.producer() for v in score.inputs if v.producer() is not None
                      and v.producer().op_type == "MatMul"), None)
        if score is None:
            raise _Miss("no attention scores before the softmax")
    k_rot = _walk_back(score.inputs[1], ("Unsqueeze", "Expand", "Reshape", "Transpose", "Mul"))
    v_heads = _walk_back(probs.inputs[1], ("Unsqueeze", "Expand", "Reshape"))
    _producer(v_heads, "Transpose")
    return _match_attention(layer, k_rot, v_heads, k_rot, v_heads, v_heads.shape, cached=False)


def _match_attention(
    layer: int, k_rot: Value, v_heads: Value, key_start: Value, value_start: Value, kv_shape, *, cached: bool,
) -> _Attention:
    """The attention after the rotated keys `k_rot` and the values `v_heads` (both [batch, kv_heads, seq,
    head_dim]): `key_start`/`value_start` are what the attention products read (present with a cache, else
    the same values); `kv_shape` the shape the head count and size come from."""
    k_heads, cos, sin = _rotary(k_rot)
    k_lin = _heads_input(k_heads)
    v_lin = _heads_input(v_heads)
    inv_freq = _inv_freq(cos, sin, cached)

    scores, key_at = _follow_to_matmul(key_start)
    probs_matmul, value_at = _follow_to_matmul(value_start)
    if key_at != 1 or value_at != 1:
        raise _Miss("the keys or values are not the right operand of the attention products")
    q_scaled = scores.inputs[0]
    q_rot, q_scale = _scale_of(q_scaled)
    k_scale = 1.0
    node = key_start
    for _ in range(12):  # the scale on the key side, if any, sits on the repeat_kv path
        reader = _only_use(node)
        if reader is scores:
            break
        if reader.op_type == "Mul":
            c = next((constant_array(v) for v in reader.inputs if constant_array(v) is not None), None)
            if c is None or c.size != 1:
                raise _Miss("a non-constant factor on the keys")
            k_scale *= float(c.reshape(-1)[0])
        node = reader.outputs[0]
    q_heads, q_cos, q_sin = _rotary(q_rot)
    if q_cos is not cos or q_sin is not sin:
        raise _Miss("queries and keys rotated with different tables")
    q_lin = _heads_input(q_heads)

    # softmax(scores + mask) [→ Where(IsNaN) guard] → probs_matmul
    softmax_out = probs_matmul.inputs[0]
    node = _producer(softmax_out, ("Softmax", "Where"))
    if node.op_type == "Where":
        node = _producer(node.inputs[2], "Softmax")
    add = _producer(node.inputs[0], ("Add", "MatMul"))
    if add.op_type == "Add" and scores.outputs[0] not in add.inputs:
        raise _Miss("the mask is not added to the attention scores")
    if add.op_type == "MatMul" and add is not scores:
        raise _Miss("softmax of another product")
    transpose = _only_use(probs_matmul.outputs[0])
    if transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        raise _Miss("the attention output is not transposed back to [batch, seq, heads, head_dim]")
    reshape = _only_use(transpose.outputs[0])
    if reshape.op_type != "Reshape":
        raise _Miss("the attention output is not reshaped to [batch, seq, hidden]")

    shape = kv_shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise _Miss("the keys and values have no static head count and head size")
    kv_heads, head_dim = int(shape[1]), int(shape[3])
    if head_dim % 16:
        raise _Miss(f"head size {head_dim} (onnxruntime's CPU GroupQueryAttention needs a multiple of 16)")
    if inv_freq.size * 2 != head_dim:
        raise _Miss(f"rotary on {inv_freq.size * 2} of {head_dim} head dimensions (partial rotary)")
    q_width = q_lin.shape[-1] if q_lin.shape is not None and len(q_lin.shape) else None
    if not isinstance(q_width, int) or q_width % head_dim:
        raise _Miss("the query projection has no static width")
    return _Attention(
        layer, q_lin, k_lin, v_lin, None, None, None, None, reshape.outputs[0],
        inv_freq, q_scale * k_scale, q_width // head_dim, kv_heads, head_dim,
    )


# --------------------------------------------------------------------------- rewriting


@dataclass
class _Shared:
    seqlens_k: Value
    total_length: Value
    cos_cache: Value
    sin_cache: Value


def _add_first(build: Builder, nodes: list[tuple[str, list[Value], str, dict[str, int]]]) -> list[Value]:
    """Insert `(op, inputs, name, attributes)` nodes at the graph's start (inputs may name earlier outputs by
    index: an int); returns their outputs."""
    made: list[Node] = []
    for op, inputs, base, attributes in nodes:
        operands = [made[v].outputs[0] if isinstance(v, int) else v for v in inputs]
        made.append(build.node(op, operands, name=base, outputs=[base], attributes=attributes or None))
    graph = build.graph
    graph.insert_before(next(iter(graph)), made)
    return [node.outputs[0] for node in made]


def _lengths_from_mask(build: Builder, mask: Value) -> tuple[Value, Value]:
    """seqlens_k = Σ mask − 1 per row and total_sequence_length = the mask's length (int32): with a cache."""
    one = build.initializer("gqa_one", np.array([1], dtype=np.int64))
    axis1 = build.initializer("gqa_axis_1", np.array([1], dtype=np.int64))
    made = _add_first(build, [
        ("Cast", [mask], "gqa_mask_int64", {"to": DataType.INT64.value}),
        ("ReduceSum", [0, axis1], "gqa_mask_sum", {"keepdims": 0}),
        ("Sub", [1, one], "gqa_seqlens_int64", {}),
        ("Cast", [2], "gqa_seqlens_k", {"to": DataType.INT32.value}),
        ("Shape", [mask], "gqa_mask_length", {"start": 1, "end": 2}),
        ("Squeeze", [4], "gqa_total_length_int64", {}),
        ("Cast", [5], "gqa_total_sequence_length", {"to": DataType.INT32.value}),
    ])
    return made[3], made[6]


def _lengths_from_input_ids(build: Builder, input_ids: Value) -> tuple[Value, Value]:
    """seqlens_k = sequence length − 1 for every row and total_sequence_length = the sequence length (int32):
    without a cache every row is a whole first prompt."""
    one = build.initializer("gqa_one", np.array([1], dtype=np.int64))
    made = _add_first(build, [
        ("Shape", [input_ids], "gqa_batch", {"start": 0, "end": 1}),
        ("Shape", [input_ids], "gqa_sequence_length", {"start": 1, "end": 2}),
        ("Sub", [1, one], "gqa_last_position", {}),
        ("Expand", [2, 0], "gqa_seqlens_int64", {}),
        ("Cast", [3], "gqa_seqlens_k", {"to": DataType.INT32.value}),
        ("Squeeze", [1], "gqa_total_length_int64", {}),
        ("Cast", [5], "gqa_total_sequence_length", {"to": DataType.INT32.value}),
    ])
    return made[4], made[6]


def _shared_inputs(build: Builder, lengths: tuple[Value, Value], first: _Attention, max_positions: int) -> _Shared:
    """`lengths` (seqlens_k, total_sequence_length) and the rotary tables for positions 0..max_positions-1."""
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * first.inv_freq[None, :]
    return _Shared(
        *lengths,
        build.initializer("gqa_cos_cache", np.cos(angles).astype(np.float32)),
        build.initializer("gqa_sin_cache", np.sin(angles).astype(np.float32)),
    )


def _rewrite(build: Builder, attention: _Attention, shared: _Shared) -> None:
    graph = build.graph
    cached = attention.present_key is not None
    new = make_node(
        "GroupQueryAttention",
        [attention.q_lin, attention.k_lin, attention.v_lin, attention.past_key, attention.past_value,
         shared.seqlens_k, shared.total_length, shared.cos_cache, shared.sin_cache],
        attributes={
            "num_heads": attention.heads, "kv_num_heads": attention.kv_heads, "do_rotary": 1,
            "rotary_interleaved": 0, "scale": attention.scale,
        },
        num_outputs=3, domain="com.microsoft", name=build.node_name(f"gqa_{attention.layer}"),
    )
    anchor = attention.output.producer()
    graph.insert_after(anchor, new)
    out = new.outputs[0]
    out.name = build.fresh(f"gqa_{attention.layer}_output")
    out.shape, out.type = attention.output.shape, attention.output.type
    attention.output.replace_all_uses_with(out)
    if not cached:
        # No cache to return, but the present outputs stay (unread): without them onnxruntime's CPU kernel takes
        # another path, whose rounding differs from the cache form's prefill from an empty cache.
        for fresh, name in ((new.outputs[1], "present_key"), (new.outputs[2], "present_value")):
            fresh.name = build.fresh(f"gqa_{attention.layer}_{name}")
        return
    # The present tensors keep their graph-output names: hand them over from the old Concats.
    for old, fresh in ((attention.present_key, new.outputs[1]), (attention.present_value, new.outputs[2])):
        name, shape, value_type = old.name, old.shape, old.type
        index = list(graph.outputs).index(old)
        old.name = build.fresh(f"{name}_unfused")
        fresh.name, fresh.shape, fresh.type = name, shape, value_type
        graph.outputs[index] = fresh


def _fuse_norms(model: Model) -> int:
    """RMSNorm x·rsqrt(mean(x²) + eps)·γ as SimplifiedLayerNormalization, with a residual Add before it as
    com.microsoft SkipSimplifiedLayerNormalization (whose fourth output is the sum); returns how many."""
    graph = model.graph
    build = Builder(graph)
    done = 0
    for reciprocal in [n for n in graph if n.op_type == "Reciprocal"]:
        try:
            sqrt = _producer(reciprocal.inputs[0], "Sqrt")
            add = _producer(sqrt.inputs[0], "Add")
            eps = next((constant_array(v) for v in add.inputs if constant_array(v) is not None), None)
            mean = next((v.producer() for v in add.inputs if constant_array(v) is None), None)
            if eps is None or eps.size != 1 or mean is None or mean.op_type != "ReduceMean":
                continue
            axes = constant_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
            keep = mean.attributes.get("keepdims")
            if axes is None or axes.reshape(-1).tolist() != [-1] or (keep is not None and keep.as_int() != 1):
                continue
            power = _producer(mean.inputs[0], "Pow")
            two = constant_array(power.inputs[1])
            x = power.inputs[0]
            if two is None or two.size != 1 or float(two.reshape(-1)[0]) != 2.0:
                continue
            scale = _only_use(reciprocal.outputs[0])
            if scale.op_type != "Mul" or x not in scale.inputs:
                continue
            weight_mul = _only_use(scale.outputs[0])
            gamma = next((v for v in weight_mul.inputs if constant_array(v) is not None), None)
            if weight_mul.op_type != "Mul" or gamma is None or constant_array(gamma).ndim != 1:
                continue
        except _Miss:
            continue
        out = weight_mul.outputs[0]
        epsilon = float(eps.reshape(-1)[0])
        residual = x.producer()
        skip = residual is not None and residual.op_type == "Add" and all(
            v is not None and constant_array(v) is None for v in residual.inputs) and x.shape == residual.inputs[0].shape \
            and x.shape == residual.inputs[1].shape and not x.is_graph_output()
        if not skip:  # onnxruntime's SimplifiedLayerNormalization lives in the ONNX domain, which optc verifies
            continue
        new = make_node("SkipSimplifiedLayerNormalization", [residual.inputs[0], residual.inputs[1], gamma],
                        attributes={"epsilon": epsilon}, num_outputs=4, domain="com.microsoft",
                        name=build.node_name(f"{weight_mul.name or 'rmsnorm'}_skip"))
        graph.insert_after(weight_mul, new)
        new.outputs[0].name = build.fresh(f"{out.name}_fused")
        new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
        out.replace_all_uses_with(new.outputs[0])
        if out.is_graph_output():  # pragma: no cover - a norm's output is not a graph output in a decoder
            continue
        if skip:  # noqa: SIM102 - the residual sum replaces the Add's output for its other readers
            total = new.outputs[3]
            total.name = build.fresh(f"{x.name}_sum")
            total.shape, total.type = x.shape, x.type
            for user, index in list(x.uses()):
                if user is not power and user is not scale:
                    user.replace_input_with(index, total)
            for unused in new.outputs[1:3]:
                unused.name = ""
        done += 1
    if done:
        _remove_dead(graph)
        if model.opset_imports.get("com.microsoft") is None:
            model.opset_imports["com.microsoft"] = 1
    return done


def _remove_dead(graph) -> None:
    """Remove nodes whose outputs nothing reads (the unfused attention), to a fixpoint."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
                changed = True


__all__ = ["FuseOrt"]
