"""fuse-ort: a KV-cache decoder's rotary attention as GroupQueryAttention, equal to the unfused graph.

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
from tests.fixtures.kv_models import LAYERS, kv_compiled  # noqa: E402


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
