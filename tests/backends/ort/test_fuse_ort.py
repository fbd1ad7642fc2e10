"""fuse-ort: a decoder's rotary attention (with a KV cache or without) as GroupQueryAttention, equal to the unfused graph.

The tiny LLaMA of tests/fixtures/kv_models.py (head size 16, two KV heads for four query heads).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import optc  # noqa: E402
from optc.runtime.decoder import fill_decoder_inputs, session_inputs  # noqa: E402
from tests.fixtures.kv_models import LAYERS, kv_compiled, nocache_compiled  # noqa: E402


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _prefill_then_decode(session: ort.InferenceSession, ids: np.ndarray, steps: int) -> list[list[np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    feed = fill_decoder_inputs(session_inputs(session), {"input_ids": ids})
    results = []
    total = ids.shape[1]
    for _ in range(steps + 1):
        out = dict(zip(names, session.run(names, feed), strict=True))
        results.append([out[n] for n in names])
        nxt = out["logits"][:, -1:].argmax(-1).astype(np.int64)
        total += 1
        feed = {"input_ids": nxt, "attention_mask": np.ones((ids.shape[0], total), np.int64),
                "position_ids": np.full((ids.shape[0], 1), total - 1, np.int64)}
        for i in range(LAYERS):
            feed[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
            feed[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    return results


def _gqa_count(path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert "Softmax" not in ops
    assert [o.name for o in proto.graph.output][1:3] == ["present.0.key", "present.0.value"]
    return ops.count("GroupQueryAttention")


def _assert_same_steps(got_path, want_path, ids: np.ndarray, steps: int, atol: float) -> None:
    """Prefill then `steps` decode steps through both models: every output of every step equal within `atol`."""
    got = _prefill_then_decode(_session(got_path), ids, steps=steps)
    want = _prefill_then_decode(_session(want_path), ids, steps=steps)
    for got_step, want_step in zip(got, want, strict=True):
        for a, b in zip(got_step, want_step, strict=True):
            np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_backend_fuses_and_matches_the_export():
    """The ort backend runs fuse-ort: the written fp32 decoder equals the export as traced."""
    result = kv_compiled("cleanup")
    assert _gqa_count(result.artifact.path) == LAYERS
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 9), dtype=np.int64)
    _assert_same_steps(result.artifact.path, result.before_path, ids, steps=3, atol=1e-4)


def test_w8a8_attention_is_fused():
    """Static INT8 activations quantize the projections, not the attention products: GQA still applies."""
    result = kv_compiled("w8a8")
    assert _gqa_count(result.artifact.path) == LAYERS
    ids = np.random.default_rng(3).integers(0, 96, size=(1, 6), dtype=np.int64)
    steps = _prefill_then_decode(_session(result.artifact.path), ids, steps=2)
    reference = _prefill_then_decode(_session(kv_compiled("cleanup").before_path), ids, steps=0)
    assert steps[0][0].shape == reference[0][0].shape
    assert all(np.isfinite(a).all() for step in steps for a in step)


def test_fuse_ort_alone_is_exact(tmp_path):
    """fuse-ort as the only change, on the export: logits and the cache equal within float tolerance."""
    result = kv_compiled("cleanup")
    fused = optc.compile(str(result.before_path), output=str(tmp_path / "model.onnx"), passes="fuse-ort")
    assert any(r.pass_name == "fuse-ort" and r.kind == "passed" for r in fused.remarks)
    ids = np.random.default_rng(1).integers(0, 96, size=(1, 5), dtype=np.int64)
    _assert_same_steps(fused.artifact.path, result.before_path, ids, steps=4, atol=1e-5)
    assert (tmp_path / "genai_config.json").is_file()  # an ONNX decoder input keeps its generation folder


def test_skip_norms_are_exact(tmp_path):
    """norms=true: RMSNorm after a residual Add as SkipSimplifiedLayerNormalization, equal to the export."""
    result = kv_compiled("cleanup")
    fused = optc.compile(str(result.before_path), output=str(tmp_path / "model.onnx"),
                         passes="fuse-ort{norms=true}")
    proto = onnx.load(str(fused.artifact.path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS and "Reciprocal" in ops  # the first norm stays
    ids = np.random.default_rng(4).integers(0, 96, size=(1, 7), dtype=np.int64)
    _assert_same_steps(fused.artifact.path, result.before_path, ids, steps=2, atol=1e-5)


# --------------------------------------------------------------------------- without a cache


def _uncached_ops(path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(i.name.startswith("past_key_values") for i in proto.graph.input)
    return [n.op_type for n in proto.graph.node]


def test_backend_fuses_the_no_cache_export():
    """The export without a cache gets the same GroupQueryAttention: its logits equal the unfused export's within
    float tolerance and, bit for bit, the cache form's prefill from an empty cache (one kernel for both)."""
    plain, cached = nocache_compiled("cleanup"), kv_compiled("cleanup")
    ops = _uncached_ops(plain.artifact.path)
    assert ops.count("GroupQueryAttention") == LAYERS and "Softmax" not in ops
    assert any(r.pass_name == "fuse-ort" and r.kind == "passed" and "no past inputs" in r.message for r in plain.remarks)
    ids = np.random.default_rng(5).integers(0, 96, size=(2, 11), dtype=np.int64)
    fused = _session(plain.artifact.path).run(["logits"], {"input_ids": ids})[0]
    unfused = _session(plain.before_path).run(["logits"], {"input_ids": ids})[0]
    np.testing.assert_allclose(fused, unfused, atol=1e-5, rtol=0)
    session = _session(cached.artifact.path)
    prefill = session.run(["logits"], fill_decoder_inputs(session_inputs(session), {"input_ids": ids}))[0]
    np.testing.assert_array_equal(fused, prefill)


def _edited_export(tmp_path, edit) -> str:
    """The unfused export without a cache, changed by `edit(proto)`, saved as one file."""
    proto = onnx.load(str(nocache_compiled("cleanup").before_path))
    edit(proto)
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return str(path)


def _fuse_alone(source: str, tmp_path):
    (tmp_path / "out").mkdir()
    return optc.compile(source, output=str(tmp_path / "out" / "model.onnx"), passes="fuse-ort")


def _fuse_remarks(result) -> list[tuple[str, str]]:
    return [(r.kind, r.message) for r in result.remarks if r.pass_name == "fuse-ort"]


def _rotary_positions_node(proto: onnx.ModelProto) -> onnx.NodeProto:
    """The node that turns the exporter's positions (Range over input_ids' length) into rotary angles' input."""
    mul = next(n for n in proto.graph.node if n.op_type == "Mul" and any("inv_freq" in i for i in n.input))
    cast = next(n for n in proto.graph.node if mul.input[0] in n.output)
    return next(n for n in proto.graph.node if cast.input[0] in n.output)


def test_no_cache_with_position_ids_is_reported(tmp_path):
    """Rotary positions from a position_ids input (not 0 … length − 1): GroupQueryAttention's first-prompt
    positions may differ, so the attention stays as written, with a remark."""
    def edit(proto):
        proto.graph.input.append(onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["b", "s"]))
        _rotary_positions_node(proto).input[0] = "position_ids"

    result = _fuse_alone(_edited_export(tmp_path, edit), tmp_path)
    assert _fuse_remarks(result) == [("missed", f"0 of {LAYERS} attention blocks fused into GroupQueryAttention: "
                                                "rotary positions are not 0 … sequence length − 1 of input_ids")]
    assert "GroupQueryAttention" not in _uncached_ops(result.artifact.path)


def test_no_cache_with_attention_mask_is_reported(tmp_path):
    """A padding mask input without a cache: seqlens_k would have to come from it, so nothing is fused."""
    def edit(proto):
        proto.graph.input.append(onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["b", "s"]))

    result = _fuse_alone(_edited_export(tmp_path, edit), tmp_path)
    assert _fuse_remarks(result) == [("missed", f"0 of {LAYERS} attention blocks fused into GroupQueryAttention: "
                                                "an attention_mask input without a KV cache")]
    assert "GroupQueryAttention" not in _uncached_ops(result.artifact.path)


@pytest.mark.parametrize("quantized_layers", [1, LAYERS])
def test_no_cache_quantized_attention_products(tmp_path, quantized_layers):
    """Q/DQ on the keys an attention product reads (static INT8 attention): no INT8 GroupQueryAttention, so those
    blocks stay as written; said beside fused blocks, silent when no block can be fused (the cache form's
    attention stays as written too: both forms run the same kernel)."""
    def edit(proto):
        scores = [n for n in proto.graph.node if n.op_type == "MatMul" and any(
            m.op_type == "Add" and n.output[0] in m.input and any(
                s.op_type == "Softmax" and m.output[0] in s.input for s in proto.graph.node) for m in proto.graph.node)]
        assert len(scores) == LAYERS
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.05, np.float32), "qk_scale"))
        nodes = list(proto.graph.node)
        for layer, matmul in enumerate(scores[:quantized_layers]):
            quantize = onnx.helper.make_node("QuantizeLinear", [matmul.input[1], "qk_scale"], [f"qk_q{layer}"])
            dequantize = onnx.helper.make_node("DequantizeLinear", [f"qk_q{layer}", "qk_scale"], [f"qk_dq{layer}"])
            matmul.input[1] = f"qk_dq{layer}"
            at = nodes.index(matmul)
            nodes[at:at] = [quantize, dequantize]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)

    result = _fuse_alone(_edited_export(tmp_path, edit), tmp_path)
    fused = LAYERS - quantized_layers
    assert _uncached_ops(result.artifact.path).count("GroupQueryAttention") == fused
    if fused:
        assert _fuse_remarks(result) == [
            ("missed", f"{fused} of {LAYERS} attention blocks fused into GroupQueryAttention: quantized attention "
                       "products (static INT8 activations): GroupQueryAttention has no INT8 form (1)"),
            ("passed", f"{fused} of {LAYERS} attention blocks fused into GroupQueryAttention (no KV cache: no past inputs)"),
        ]
    else:
        assert _fuse_remarks(result) == []


def test_no_cache_model_of_no_causal_family_is_left_alone(tmp_path):
    """Without a causal-LM config (GroupQueryAttention's mask is causal), fuse-ort neither rewrites nor remarks."""
    def edit(proto):
        kept = [p for p in proto.metadata_props if p.key not in ("optc.hf_config", "optc.hf_export", "optc.architecture")]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)

    result = _fuse_alone(_edited_export(tmp_path, edit), tmp_path)
    assert _fuse_remarks(result) == []
    assert "GroupQueryAttention" not in _uncached_ops(result.artifact.path)


@pytest.mark.parametrize("window, fused", [(8, False), (None, True)])
def test_sliding_window_is_not_fused(tmp_path, window, fused):
    """A config with an attention window shorter than its context (mistral v0.1, phi3-4k): GroupQueryAttention
    as written would attend to the whole context, so the attention stays as exported (exact)."""
    import json

    def edit(proto):
        entry = next(p for p in proto.metadata_props if p.key == "optc.hf_config")
        entry.value = json.dumps({**json.loads(entry.value), "sliding_window": window})

    result = _fuse_alone(_edited_export(tmp_path, edit), tmp_path)
    assert ("GroupQueryAttention" in _uncached_ops(result.artifact.path)) == fused
    if not fused:  # the cache form would stay unfused too: a reason of both forms is not remarked without a cache
        assert _fuse_remarks(result) == []
