"""Raising a model's opset (`optc.ir.opset.ensure_opset`) and the passes that need it (rtn, quantize{fp8}).

An old model (opset 11/12: `axes` as attributes of ReduceMean, Squeeze and
Unsqueeze) goes through the low-bit and FP8 passes: its nodes are converted,
so onnxruntime runs the result, and it computes what the same model written
natively at opset 21 computes after the same pass (so the only difference
from the float model is the quantization error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc.errors import OptcError
from optc.ir import annotate, annotation, from_proto, to_proto
from optc.ir.opset import default_opset, ensure_opset
from optc.passes import AnalysisManager, PassContext, parse_pipeline
from tests.cli.cli_support import Job, run_in_process, sha256

HIDDEN, OUT = 32, 16


def old_model(opset: int) -> onnx.ModelProto:
    """x [1, 4, 32] -> center by ReduceMean(axes=[2]) -> MatMul [32, 16] -> Unsqueeze/Squeeze(axes=[1]) -> y.

    Below opset 13 the axes are attributes; from 13 (Squeeze, Unsqueeze) and 18 (ReduceMean) they are inputs.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((HIDDEN, OUT)).astype(np.float32) / 4, "w"),
             numpy_helper.from_array(np.array([2], np.int64), "axes2"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1")]
    if opset < 18:
        mean = helper.make_node("ReduceMean", ["x"], ["m"], axes=[2], keepdims=1, name="mean")
    else:
        mean = helper.make_node("ReduceMean", ["x", "axes2"], ["m"], keepdims=1, name="mean")
    if opset < 13:
        unsqueeze = helper.make_node("Unsqueeze", ["h"], ["u"], axes=[1], name="unsqueeze")
        squeeze = helper.make_node("Squeeze", ["u"], ["y"], axes=[1], name="squeeze")
    else:
        unsqueeze = helper.make_node("Unsqueeze", ["h", "axes1"], ["u"], name="unsqueeze")
        squeeze = helper.make_node("Squeeze", ["u", "axes1"], ["y"], name="squeeze")
    nodes = [
        mean,
        helper.make_node("Sub", ["x", "m"], ["c"], name="center"),
        helper.make_node("MatMul", ["c", "w"], ["h"], name="proj"),
        unsqueeze,
        squeeze,
    ]
    graph = helper.make_graph(
        nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, OUT])], inits,
    )
    ir_version = 6 if opset < 13 else 10
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


FEED = {"x": np.random.default_rng(1).standard_normal((1, 4, HIDDEN)).astype(np.float32)}


def run(proto: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, FEED)[0]


def compile_with(proto: onnx.ModelProto, pipeline: str) -> onnx.ModelProto:
    model = from_proto(proto)
    context = PassContext(config={"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 4})
    result = parse_pipeline(pipeline)(model, AnalysisManager(context))
    return to_proto(result.model)


@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize(
    ("pipeline", "minimum", "bound"),
    [("rtn{group=16}", 21, 0.15), ("quantize{weights=fp8 activations=fp8}", 19, 0.1), ("quantize", 13, 0.05)],
)
def test_old_models_are_converted_before_quantizing(opset: int, pipeline: str, minimum: int, bound: float) -> None:
    reference = run(old_model(opset))
    converted = compile_with(old_model(opset), pipeline)
    native = compile_with(old_model(21), pipeline)
    assert {o.domain: o.version for o in converted.opset_import}[""] == minimum
    onnx.checker.check_model(converted)
    got = run(converted)  # onnxruntime loads and runs it: the axes attributes were converted
    with_axes = {n.op_type for n in converted.graph.node if any(a.name == "axes" for a in n.attribute)}
    assert with_axes == (set() if minimum >= 18 else {"ReduceMean"})  # axes became inputs: 13 (Squeeze), 18 (Reduce)
    np.testing.assert_allclose(got, run(native), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < bound  # only the quantization error
    assert any(n.op_type == "DequantizeLinear" for n in converted.graph.node)


def test_annotations_and_ir_version_survive_a_conversion() -> None:
    model = from_proto(old_model(11))
    annotate(model.graph.initializers["w"], "source_name", "layer.weight")
    annotate(next(n for n in model.graph if n.name == "proj"), "note", "kept")
    assert ensure_opset(model, 21) is True
    assert default_opset(model) == 21 and model.ir_version == 10
    assert annotation(model.graph.initializers["w"], "source_name") == "layer.weight"
    assert annotation(next(n for n in model.graph if n.name == "proj"), "note") == "kept"
    assert ensure_opset(model, 19) is False  # already newer: nothing to do


def test_a_model_without_default_domain_nodes_only_gets_the_import() -> None:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4))
    assert ensure_opset(model, 21) and default_opset(model) == 21 and model.ir_version == 10


def test_a_conversion_that_fails_is_one_line(monkeypatch) -> None:
    import onnxscript.version_converter

    def fail(*args, **kwargs):
        raise RuntimeError("no adapter for FancyOp\nsecond line")

    monkeypatch.setattr(onnxscript.version_converter, "convert_version", fail)
    with pytest.raises(OptcError) as info:
        ensure_opset(from_proto(old_model(11)), 21)
    assert str(info.value) == "cannot convert the model from opset 11 to 21: no adapter for FancyOp"


def test_fp8_on_an_opset_17_model_writes_a_model_onnxruntime_runs(tmp_path: Path) -> None:
    """The command line with --no-runtime-check: the FP8 Q/DQ model must still be valid (opset >= 19)."""
    source = tmp_path / "old.onnx"
    proto = old_model(17)
    onnx.save(proto, str(source))
    before = sha256(source)
    job = Job(["old.onnx", "--passes", "quantize{weights=fp8 activations=fp8}", "--calib", "random",
               "--calib-samples", "2", "--no-runtime-check", "-o", "fp8.onnx"], tmp_path)
    result = run_in_process(job)
    assert result.returncode == 0, result
    written = onnx.load(str(tmp_path / "fp8.onnx"))
    assert {o.domain: o.version for o in written.opset_import}[""] == 19
    assert np.isfinite(run(written)).all()
    assert sha256(source) == before


def _one_line_refusal(tmp_path: Path, proto: onnx.ModelProto, *mentions: str) -> None:
    onnx.save(proto, str(tmp_path / "in.onnx"))
    before = sha256(tmp_path / "in.onnx")
    run = run_in_process(Job(["in.onnx", "-o", "out.onnx"], tmp_path))
    assert run.returncode == 1 and len(run.stderr_lines) == 1 and "Traceback" not in run.stderr, run
    for text in mentions:
        assert text in run.stderr, run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"] and sha256(tmp_path / "in.onnx") == before


def test_an_input_of_opset_99_is_refused(tmp_path: Path) -> None:
    proto = old_model(21)
    proto.opset_import[0].version = 99
    _one_line_refusal(tmp_path, proto, "in.onnx", "opset import 'ai.onnx' version 99 does not exist")


def test_an_input_using_a_domain_it_does_not_import_is_refused(tmp_path: Path) -> None:
    proto = old_model(21)
    proto.graph.node[1].domain, proto.graph.node[1].op_type = "com.example", "Center"
    _one_line_refusal(tmp_path, proto, "in.onnx", "domain 'com.example' of Center is not imported")
