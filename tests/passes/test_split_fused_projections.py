"""split-fused-projections: exact outputs on fused qkv / gate-up shapes, remarks, and the canonical form prune passes see."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from optc.ir import from_proto
from optc.passes import AnalysisManager, PassContext, RemarkError, VerifyEach, parse_pipeline
from optc.runtime.ort import open_session


def _model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return from_proto(shape_inference.infer_shapes(proto, data_prop=True))  # static shapes, as the frontend gives


def _run(model, strict: bool = False):
    am = AnalysisManager(PassContext(instruments=[VerifyEach()], strict=strict))
    return parse_pipeline("split-fused-projections")(model, am)


def _outputs(model, feeds, tmp_path, name):
    from optc.ir import save_model

    path = tmp_path / f"{name}.onnx"
    save_model(model, path)
    return open_session(path).run(None, feeds)


def _neox_like(rng, heads=3, head_dim=4, hidden=10):
    """x [batch, seq, hidden] → MatMul + bias → [b, s, heads, 3·head_dim] → Transpose → Split in q, k, v."""
    n = 3 * heads * head_dim
    inits = {
        "w": rng.standard_normal((hidden, n)).astype(np.float32),
        "b": rng.standard_normal(n).astype(np.float32),
        "shape": np.array([0, 0, heads, 3 * head_dim], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Reshape", ["hb", "shape"], ["h4"]),
        helper.make_node("Transpose", ["h4"], ["ht"], perm=[0, 2, 1, 3]),
        helper.make_node("Split", ["ht"], ["q", "k", "v"], axis=-1, num_outputs=3),
        helper.make_node("MatMul", ["q", "k_t"], ["s"]),
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["s", "v"], ["y"]),
    ]
    nodes = [nodes[i] for i in (0, 1, 2, 3, 4, 6, 5, 7)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, heads, 5, head_dim])
    return _model(nodes, inits, [x], [y])


def test_interleaved_heads_are_split_exactly(tmp_path):
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 5, 10)).astype(np.float32)}
    before = _outputs(_neox_like(np.random.default_rng(0)), feeds, tmp_path, "before")
    result = _run(_neox_like(np.random.default_rng(0)))
    assert result.statistics == {"projections-split": 1, "linear-layers-made": 3}
    matmuls = [n for n in result.model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert [tuple(n.inputs[1].shape) for n in matmuls] == [(10, 12)] * 3
    assert not [n for n in result.model.graph if n.op_type == "Split"]
    np.testing.assert_array_equal(_outputs(result.model, feeds, tmp_path, "after")[0], before[0])


def test_a_cut_it_cannot_follow_is_a_remark_and_strict_fails():
    rng = np.random.default_rng(1)

    def strided():
        inits = {"w": rng.standard_normal((3, 8)).astype(np.float32), "s": np.array([0], np.int64),
                 "e": np.array([8], np.int64), "a": np.array([-1], np.int64), "t": np.array([2], np.int64)}
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Slice", ["h", "s", "e", "a", "t"], ["y"])]
        return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])

    result = _run(strided())
    assert not result.modified
    (remark,) = result.remarks
    assert remark.kind == "missed" and remark.matched_none
    assert remark.message.startswith("0 of 1 fused projections matched: cut by a Slice")
    with pytest.raises(RemarkError, match=r"^--strict: split-fused-projections: 0 of 1 fused projections"):
        _run(strided(), strict=True)
