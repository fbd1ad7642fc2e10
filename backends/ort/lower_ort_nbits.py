"""`lower-ort-nbits`: run weight-only low-bit MatMuls as onnxruntime's `com.microsoft::MatMulNBits`.

Input: the IR form of `rtn`/`gptq`/`awq` (`optc.passes.lowbit`): an INT4/UINT4
(2–4 bits) or INT8/UINT8 (5–8 bits) weight `B [K, N]`, a blocked
`DequantizeLinear(axis=0, block_size=g)` (or per channel, `axis=1`) and a
MatMul. onnxruntime never folds a DequantizeLinear, so as written the weight
is dequantized on every run; `MatMulNBits` reads the packed weight directly.

The rewrite is exact: MatMulNBits stores unsigned codes per column in blocks
of `block_size` along K, two 4-bit codes per byte (low nibble first), with
one scale per block and a zero point that defaults to 2^(bits−1). So signed
codes q become q + 2^(bits−1) with no zero point input (the same dequantized
values (u − 2^(bits−1))·s = q·s), unsigned codes keep their own zero point
(packed like the weight). A per-channel scale is repeated into blocks of
`per-channel-block`. Blocks must be a power of two of at least 16; anything
else (and Gemm) is left as written.

5-8-bit weights are left to `lower-ort-int8` unless `bits8=true` (folding them to
float at load is faster for a window of tokens: README, Results).

`accuracy-level` is MatMulNBits' compute type: 0 (=fp32) computes with float
activations, the numerics of the IR; 4 quantizes activations to int8 per block
on the fly (other numerics; an 8-bit weight then takes blocks of `bits8-block`,
32 by default, its group's scales repeated, so the activations' blocks are as
fine as llama.cpp's Q8_0). The default (`none`) follows what the model is run
for: a causal LM (`optc.runtime.decoder.is_causal_lm`) spends its time decoding
one token at a time, where level 4 is faster (tools/bench_decode.py), and its
8-bit weight-only MatMuls (w4a16's int8 lm_head) then become
MatMulNBits(bits=8) at level 4 too, a quarter of the float weight read per
token. Its no-cache export gets the same level, so the perplexity measured on
it is the perplexity of the cache form that generates. Any other model keeps
level 0 (exact; level 4 was slower for a 256-token window, tools/bench_w4.py)
and folds 8-bit weights to float. `form=dequantize-at-load` instead turns the
DequantizeLinear into Cast → (Sub) → Mul on the block-shaped weight, which
onnxruntime constant-folds into a float weight when the session loads (fp32
speed, small file), `form=keep` leaves the model as is. What was done is
recorded in the model metadata; the backend's own run (`form=auto`) then
keeps an explicit choice such as `--passes 'gptq,lower-ort-nbits{accuracy-level=4}'`.

The MatMul's annotations (`quant`, …) move to the new node, which keeps the
MatMul's output name; each is also annotated `ort_lowering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.ir import (
    DataType,
    ExternalTensor,
    Model,
    Node,
    Value,
    annotate,
    constant_array,
    is_constant,
    make_node,
    model_metadata,
    set_model_metadata,
)
from optc.ir.annotations import HF_CONFIG, ORT_LOWERING, ORT_NBITS_LOWERING
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.ir.patterns.qdq import QDQ, dequantized
from optc.ir.patterns.rewrite import Rule, apply_rules
from optc.passes.infra.analysis import AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.runtime.decoder import is_causal_lm

_LOWBIT = (DataType.INT4, DataType.UINT4, DataType.INT8, DataType.UINT8)
_SIGNED = (DataType.INT4, DataType.INT8)
#: Weight elements packed at once (int32 copies of a slice of columns, not of the whole weight).
PACK_CHUNK_ELEMENTS = 1 << 22
#: Model metadata key recording that (and how) the model was lowered: a later `form=auto` run keeps it.
METADATA = ORT_NBITS_LOWERING


@register_pass("lower-ort-nbits")
class LowerOrtNbits(Pass):
    """Rewrite blocked low-bit DequantizeLinear -> MatMul into com.microsoft MatMulNBits (packed, exact)."""

    @dataclass
    class Options:
        form: Literal["auto", "nbits", "dequantize-at-load", "keep"] = option(
            "auto",
            help="nbits: MatMulNBits; dequantize-at-load: Cast->Mul folded at session load; keep: as written; "
            "auto: nbits unless the model was lowered (or kept) by an earlier run",
        )
        accuracy_level: int | None = option(
            None,
            help="MatMulNBits compute type: 0 float activations (exact), 4 int8 activations per block; "
            "none: 4 for a causal LM, with its KV cache or without (decode speed), 0 otherwise",
        )
        per_channel_block: int = option(128, help="block size that repeats a per-channel scale (MatMulNBits has blocks only)")
        # Issue 17: on a random Llama-2-7B-shaped model, rtn{bits=8 group=128} gave logits cosine 0.9884 to
        # bf16 with blocks of 128, 0.9900 with 64 and 0.9908 with 32 (0.9946 at level 0; tools/bench_scale.py
        # --check). One 8-bit 4096x11008 MatMul runs 1.2-1.65x slower at 32 (tools/bench_nbits8_blocks.py);
        # SmolLM2 w4a16's decode speed stayed within noise (README, Results).
        bits8_block: int = option(
            32, help="at accuracy level 4, the block of 8-bit weights (a larger group's scales repeated): level 4 "
            "quantizes activations per block, so smaller blocks stay closer to float, as llama.cpp's Q8_0 "
            "(32); 0 keeps each weight's own group"
        )
        bits8: bool | None = option(
            None,
            help="also lower 5-8-bit (int8/uint8) weights to MatMulNBits(bits=8); none: for a causal LM at "
            "accuracy level 4 only (on SmolLM2 a 256-token window ran 1.35x fp32 with them, while lower-ort-int8 "
            "folds such weights to float at load: fp32 speed)",
        )

        def validate(self) -> None:
            if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
                raise ValueError(f"option 'accuracy-level' must be 0-4, got {self.accuracy_level}")
            b = self.per_channel_block
            if b < 16 or b & (b - 1):
                raise ValueError(f"option 'per-channel-block' must be a power of two of at least 16, got {b}")
            b = self.bits8_block
            if b and (b < 16 or b & (b - 1)):
                raise ValueError(f"option 'bits8-block' must be 0 or a power of two of at least 16, got {b}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        form = self.options.form
        earlier = model_metadata(model, METADATA)
        if form == "auto":
            form = "keep" if earlier else "nbits"
        if form == "keep":
            if earlier or not any(_plan(n) for n in model.graph):
                return PassResult(model, False)
            set_model_metadata(model, METADATA, {"form": "keep"})
            return PassResult(model, True, PreservedAnalyses.all())
        graph = model.graph
        dead: list[Node] = []  # Transposes and DequantizeLinears the rewrites may leave unread
        build = Builder(graph)  # owns the fresh names of everything this run adds
        level, bits8 = self._choices(model)

        def rewrite(site: _Site) -> bool:
            swap = site.node.inputs[1].producer() if site.transposed else None
            if form == "nbits":
                if site.bits == 8 and not bits8:
                    return False
                done = self._nbits(build, site.node, site.dq, site.weight, site.bits, level, site.transposed)
            else:
                done = not site.transposed and _dequantize_at_load(build, site.node, site.dq)
            if done:
                dead.extend([swap, site.dq] if swap is not None else [site.dq])
            return done

        result = apply_rules(graph, [Rule(form, _weight_only_matmul, rewrite, _nbits_reason)])
        lowered = result.total
        misses = result.reasons() if form == "nbits" else []
        if misses:
            message = match_summary(lowered, misses, "weight-only low-bit MatMuls", "lowered to MatMulNBits")
            am.context.remark("missed", message, matched_none=not lowered)
        if not lowered:
            return PassResult(model, False, None, {"lowered": 0})
        for node in dead:  # a head's Transpose before its DequantizeLinear
            if not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                graph.remove(node, safe=True)
        drop_unused_initializers(graph)
        if form == "nbits" and model.opset_imports.get("com.microsoft") is None:
            model.opset_imports["com.microsoft"] = 1
        set_model_metadata(model, METADATA, {"form": form, "accuracy_level": level, "lowered": lowered})
        return PassResult(model, True, None, {"lowered": lowered})

    def _choices(self, model: Model) -> tuple[int, bool]:
        """The accuracy level and whether 8-bit weights are lowered: the options, or what the model is run for."""
        decoder = is_causal_lm(model_metadata(model, HF_CONFIG), (v.name for v in model.graph.inputs))
        level = self.options.accuracy_level
        if level is None:
            level = 4 if decoder else 0
        bits8 = self.options.bits8
        if bits8 is None:
            bits8 = decoder and level == 4  # bits=8 at level 0 is slower than folding to float
        return level, bits8

    def _nbits(self, build: Builder, node: Node, dq: Node, weight: Value, bits: int, level: int,
               transposed: bool = False) -> bool:
        codes = constant_array(weight)  # as stored: no int32 copy of the whole weight
        codes = codes.T if transposed else codes  # [K, N]
        k, n = codes.shape
        scale = constant_array(dq.inputs[1])
        zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
        zp = constant_array(zp_value).astype(np.int32) if zp_value is not None else None
        block_attr = dq.attributes.get("block_size")
        block = block_attr.as_int() if block_attr is not None else 0
        nbits = 4 if weight.dtype in (DataType.INT4, DataType.UINT4) else 8
        finer = self.options.bits8_block if nbits == 8 and level == 4 else 0
        if block == 0:  # per channel along N: repeat into blocks
            block = finer or self.options.per_channel_block
            blocks = -(-k // block)
            scale = np.broadcast_to(scale.reshape(1, n), (blocks, n))
            if zp is not None:
                zp = np.broadcast_to(zp.reshape(1, n), (blocks, n))
        elif finer and block > finer:  # each group's scale (and zero point) repeated over its sub-blocks
            blocks = -(-k // finer)
            scale = np.repeat(scale, block // finer, axis=0)[:blocks]
            if zp is not None:
                zp = np.repeat(zp, block // finer, axis=0)[:blocks]
            block = finer
        blocks = -(-k // block)
        offset = 1 << (nbits - 1)
        signed = weight.dtype in _SIGNED
        shift = offset if signed else 0
        if signed:
            zp = None  # the default zero point 2^(bits-1) undoes the offset
        elif zp is None:
            zp = np.zeros((blocks, n), dtype=np.int32)
        pad_value = offset if zp is None else 0
        packed = np.empty((n, blocks, block * nbits // 8), dtype=np.uint8)
        step = max(1, PACK_CHUNK_ELEMENTS // max(k, 1))
        for start in range(0, n, step):  # columns are packed independently: a slice of them at a time
            packed[start:start + step] = _packed_columns(codes[:, start:start + step], blocks, block, nbits,
                                                         shift, pad_value)
        del codes
        if isinstance(weight.const_value, ExternalTensor):  # a spilled weight keeps its unpacked codes until released
            weight.const_value.release()
        inputs = [
            node.inputs[0],
            build.initializer(f"{weight.name}_nbits", np.ascontiguousarray(packed)),
            build.initializer(f"{dq.inputs[1].name}_nbits", np.ascontiguousarray(np.asarray(scale).T).reshape(-1)),
        ]
        if zp is not None:
            zp_cols = np.ascontiguousarray(np.asarray(zp).T).astype(np.uint8)  # [N, blocks]
            if nbits == 4:
                if blocks % 2:
                    zp_cols = np.concatenate([zp_cols, np.zeros((n, 1), np.uint8)], axis=1)
                zp_cols = (zp_cols[:, 0::2] | (zp_cols[:, 1::2] << 4)).astype(np.uint8)
            inputs.append(build.initializer(f"{weight.name}_nbits_zero_point", zp_cols.reshape(-1)))
        attrs = {"K": k, "N": n, "bits": nbits, "block_size": block, "accuracy_level": level}
        new = make_node("MatMulNBits", inputs, attributes=attrs, domain="com.microsoft",
                        name=build.node_name(f"{node.name or 'MatMul'}_nbits"))
        _swap(build, node, new)
        annotate(new, ORT_LOWERING, {"runs_as": "com.microsoft.MatMulNBits", "bits": nbits, "block_size": block,
                                       "accuracy_level": level})
        return True


@dataclass(frozen=True)
class _Site:
    """A weight-only low-bit MatMul: the MatMul, the DequantizeLinear of its B [K, N], the codes, storage bits."""

    node: Node
    view: QDQ
    weight: Value
    bits: int
    #: B is Transpose(DQ(codes [N, K])): a head tied to an int8 embedding table (per-row scales).
    transposed: bool = False

    @property
    def dq(self) -> Node:
        return self.view.node


def _plan(node: Node) -> _Site | None:
    """The site when `node` is MatMul(x, DQ(low-bit B [K, N])) and MatMulNBits can take it, else None."""
    site = _weight_only_matmul(node)
    return site if site is not None and _nbits_reason(site) is None else None


def _weight_only_matmul(node: Node) -> _Site | None:
    """The rule's match: MatMul(x, DQ(constant low-bit B [K, N])) with a float activation x, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    b = node.inputs[1]
    swap = b.producer() if b is not None else None
    transposed = swap is not None and swap.op_type == "Transpose" and _swaps_two_axes(swap)
    view = dequantized(swap.inputs[0] if transposed else b)
    if view is None:
        return None
    dq, weight = view.node, view.input
    if not is_constant(weight) or weight.dtype not in _LOWBIT or weight.shape is None or len(weight.shape) != 2:
        return None
    if is_constant(node.inputs[0]) or not all(is_constant(v) for v in dq.inputs[1:] if v is not None):
        return None
    if dequantized(node.inputs[0]) is not None:
        return None  # quantized activations (W8A8, int16): lower-ort-int8's integer kernels, not weight-only
    return _Site(node, view, weight, 4 if weight.dtype in (DataType.INT4, DataType.UINT4) else 8, transposed)


def _swaps_two_axes(node: Node) -> bool:
    """A Transpose with perm [1, 0] or the default reversal (the weight it reads is checked to be 2-D)."""
    perm = node.attributes.get("perm")
    return bool(node.inputs) and (perm is None or list(perm.as_ints()) == [1, 0])


def _nbits_reason(site: _Site) -> str | None:
    """The rule's check: why MatMulNBits cannot take the site's scales, or None."""
    view = site.view
    scale = view.scale
    if scale.dtype != DataType.FLOAT:
        return f"{scale.dtype} scales (MatMulNBits takes float)"
    axis = view.axis % 2
    block = view.block_size
    if site.transposed:  # codes [N, K]: only a scale per row (per output channel) is a MatMulNBits form
        return None if not block and axis == 0 and scale.shape is not None and len(scale.shape) == 1 else (
            "a transposed weight without a scale per row")
    if block:
        if axis != 0:
            return "blocks along N, not K"
        if block < 16 or block & (block - 1):
            return f"block_size {block} (MatMulNBits takes a power of two of at least 16)"
    elif axis != 1 or scale.shape is None or len(scale.shape) != 1:
        return "scales that are neither per block along K nor per output channel"
    return None


def _packed_columns(codes: np.ndarray, blocks: int, block: int, bits: int, shift: int, pad_value: int) -> np.ndarray:
    """Codes [K, c] as MatMulNBits' unsigned, padded, packed columns [c, blocks, block·bits/8]."""
    k, columns = codes.shape
    padded = np.full((blocks * block, columns), pad_value, dtype=np.uint8)
    padded[:k] = (codes.astype(np.int32) + shift).astype(np.uint8)
    return _pack(padded.T.reshape(columns, blocks, block), bits)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis: 4-bit two per byte, low nibble first; 8-bit as is."""
    if bits == 8:
        return values.astype(np.uint8)
    low, high = values[..., 0::2], values[..., 1::2]
    return (low | (high << 4)).astype(np.uint8)


def _swap(build: Builder, old: Node, new: Node) -> None:
    """Put `new` in `old`'s place: same output name and type, annotations moved."""
    graph = build.graph
    out_old, out_new = old.outputs[0], new.outputs[0]
    name = out_old.name
    build.rename(out_old, f"{name}_replaced")
    out_new.name = name
    build.reserve(name)
    if out_old.dtype is not None:  # a shape serializes only with a dtype
        out_new.dtype = out_old.dtype
        out_new.shape = out_old.shape
    for key, value in old.metadata_props.items():
        new.metadata_props[key] = value
    graph.insert_before(old, [new])
    out_old.replace_all_uses_with(out_new, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    build.release(out_old.name)


def _dequantize_at_load(build: Builder, node: Node, dq: Node) -> bool:
    """DequantizeLinear → Cast, Reshape to [G, g, N], (Sub zero point), Mul, Reshape back: constants onnxruntime folds."""
    graph = build.graph
    weight = dq.inputs[0]
    k, n = weight.shape
    scale = constant_array(dq.inputs[1]).astype(np.float32)
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    block_attr = dq.attributes.get("block_size")
    block = block_attr.as_int() if block_attr is not None else 0
    if block and k % block:
        return False  # the view [K/g, g, N] needs whole blocks
    base = weight.name
    shape3 = [k // block, block, n] if block else [k, n]
    nodes: list[Node] = []

    def const(label: str, array: np.ndarray) -> Value:
        return build.initializer(f"{base}_{label}", array)

    cast = make_node("Cast", [weight], attributes={"to": int(DataType.FLOAT)}, name=build.node_name(f"{base}_Cast"),
                     output_names=[build.fresh(f"{base}_cast")])
    nodes.append(cast)
    x = cast.outputs[0]
    if block:  # onnxruntime reshapes no 4-bit tensor: cast first
        reshape = make_node("Reshape", [x, const("block_shape", np.array(shape3, np.int64))],
                            name=build.node_name(f"{base}_Reshape"), output_names=[build.fresh(f"{base}_blocks")])
        nodes.append(reshape)
        x = reshape.outputs[0]
    view = (lambda a: a.reshape(k // block, 1, n)) if block else (lambda a: a.reshape(1, n))
    if zp_value is not None:
        sub = make_node("Sub", [x, const("zp_float", view(constant_array(zp_value).astype(np.float32)))],
                        name=build.node_name(f"{base}_Sub"), output_names=[build.fresh(f"{base}_centered")])
        nodes.append(sub)
        x = sub.outputs[0]
    mul = make_node("Mul", [x, const("scale_view", view(scale))], name=build.node_name(f"{base}_Mul"),
                    output_names=[build.fresh(f"{base}_scaled")])
    nodes.append(mul)
    x = mul.outputs[0]
    if block:
        back = make_node("Reshape", [x, const("shape", np.array([k, n], np.int64))],
                         name=build.node_name(f"{base}_Reshape_back"), output_names=[build.fresh(f"{base}_float")])
        nodes.append(back)
        x = back.outputs[0]
    x.dtype = DataType.FLOAT
    graph.insert_before(dq, nodes)
    dq.outputs[0].replace_all_uses_with(x)
    annotate(node, ORT_LOWERING, {"weights": "dequantized at load (Cast -> Mul, folded by onnxruntime)"})
    return True




__all__ = ["LowerOrtNbits"]
