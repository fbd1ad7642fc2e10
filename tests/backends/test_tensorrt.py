"""The tensorrt backend and `lower-tensorrt`: legal TensorRT ONNX that onnxruntime runs like the ort target's.

Tiny random models only (the CNN of tests/fixtures/cnn_models.py, the LLaMA block of
tests/fixtures/quant_models.py); SmolLM2 is in tools/bench_tensorrt.py and the
one slow test at the end. The engine build itself needs a GPU and the
`tensorrt` package: here it is exercised against a fake `tensorrt` module that
records what optc asks of it (flags, profile, the inspector's layer JSON),
which checks optc's wiring, not TensorRT.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optc.backends.tensorrt as trt_backend
from optc.backends.tensorrt.trt_check import check_tensorrt
from optc.driver import CompileOptions, compile_model
from optc.errors import OptcError
from optc.ir import (
    DataType,
    annotate,
    annotation,
    constant_array,
    from_proto,
    load_model,
    model_metadata,
)
from optc.passes import AnalysisManager, PassContext, parse_pipeline
from tests.fixtures import models
from tests.fixtures import quant_models as qm
from tests.fixtures.cnn_models import cnn_feeds, small_cnn

W8A8 = "smoothquant{alpha=0.8},quantize{calib=mse int16=down_proj embeddings=true}"


@pytest.fixture(autouse=True)
def _no_tensorrt(monkeypatch):
    """These tests describe the machine without TensorRT unless a test installs the fake."""
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: False)


def _compile(model, out: Path, target: str, passes: str, **kwargs):
    options = CompileOptions(passes=passes, target=target, calib="random", calib_samples=16, calib_seqlen=32, **kwargs)
    return compile_model(model, out, options)


def _run(path: Path, feeds):
    return models.run_ort(str(path), feeds)[0]


def _run_optimized(path: Path, feeds):
    """onnxruntime with its basic graph optimizations (what tools/bench_tensorrt.py scores): constant folding
    and Conv+BatchNorm fusion may rewrite float arithmetic, which the next quantizer can turn into whole steps."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _conv_with_unquantized_residual(act, weight, channels: int = 4):
    """x → Q/DQ → Conv (quantized weight) + Sigmoid(x) → Add: the residual input has no Q/DQ (rule T12)."""
    from tests.backends.tensorrt import test_trt_check as planted

    (a_nodes, a_inits), (w_nodes, w_inits) = act, weight
    nodes = [*a_nodes, *w_nodes,
             helper.make_node("Conv", ["xq", "w_dq"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["x"], ["skip"], name="skip"),
             helper.make_node("Add", ["c", "skip"], ["y"], name="residual_add")]
    return planted._model(nodes, a_inits + w_inits, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])])


def _legalized_residual(model, tmp_path: Path):
    """The checker flags the planted residual; the tensorrt target's output passes it. Returns (model, checks)."""
    assert [f.rule.name for f in check_tensorrt(model)] == ["residual-quantized"]
    result = _compile(model, tmp_path / "out.onnx", "tensorrt", "dce")
    out = load_model(result.artifact.path)
    assert check_tensorrt(out) == []
    return out, result.artifact.checks


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _dtypes(model) -> set[DataType]:
    return {v.const_value.dtype for v in model.graph.initializers.values()}


# --------------------------------------------------------------------------- whole pipelines


def test_cnn_int8_is_legal_and_matches_the_ort_target(tmp_path):
    proto = small_cnn()
    results = {t: _compile(models.to_ir(proto), tmp_path / f"{t}.onnx", t, "quantize") for t in ("ort", "tensorrt")}
    trt = load_model(results["tensorrt"].artifact.path)
    assert check_tensorrt(trt) == []
    residual = next(n for n in trt.graph if n.name == "block.add")
    assert residual.inputs[1].producer().op_type == "DequantizeLinear"  # the skip input is quantized (T12)
    assert sum(n.op_type == "QuantizeLinear" for n in trt.graph) == 6  # one per quantized activation, none added
    feeds = cnn_feeds(seed=3, batch=16)
    ort_out, trt_out, ref = (_run(tmp_path / "ort.onnx", feeds), _run(tmp_path / "tensorrt.onnx", feeds),
                             models.run_ort(proto, feeds)[0])
    assert _rel(trt_out, ort_out) < 1e-6  # quantize placed the residual's Q/DQ: the lowering changes no number
    assert _rel(_run_optimized(tmp_path / "tensorrt.onnx", feeds), _run_optimized(tmp_path / "ort.onnx", feeds)) < 1e-6
    assert abs(_rel(trt_out, ref) - _rel(ort_out, ref)) < 0.005
    assert (trt_out.argmax(1) == ort_out.argmax(1)).mean() >= 0.9


def test_cnn_fp8_is_legal_and_computes_the_ort_targets_numbers(tmp_path):
    """The registered `fp8` pipeline on the CNN: legal for TensorRT, and the same logits as the ort target's.

    `quantize` already reads the residual Add's input `a` through the FP8 Q/DQ that
    block.conv1 reads (TensorRT's placement, decided before any target), so
    `lower-tensorrt` changes no number. A model quantized with `residual=false` gets
    that Q/DQ from the lowering instead (foreign models), and then parts from the ort
    target's by E4M3 rounding of the residual, equally far from float.
    """
    from optc.ir import save_model

    config = {"calibration.spec": "random", "calibration.samples": 16, "calibration.seqlen": 32}
    feeds = cnn_feeds(seed=3, batch=16)
    ref = models.run_ort(small_cnn(), feeds)[0]
    outs = {}
    for variant, pipeline in (("fp8", "fp8"), ("plain", "quantize{weights=fp8 activations=fp8 residual=false}")):
        pre_path = tmp_path / f"{variant}.pre.onnx"
        save_model(parse_pipeline(pipeline)(models.to_ir(small_cnn()), AnalysisManager(PassContext(config=config))).model,
                   pre_path)
        results = {t: _compile(load_model(pre_path), tmp_path / f"{variant}.{t}.onnx", t, "") for t in ("ort", "tensorrt")}
        trt = load_model(results["tensorrt"].artifact.path)
        assert check_tensorrt(trt) == []
        add = next(n for n in trt.graph if n.name == "block.add")
        conv1 = next(n for n in trt.graph if n.name == "block.conv1")
        assert add.inputs[1] is conv1.inputs[0]  # the residual reads `a`'s FP8 Q/DQ, none added
        dq = add.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear" and constant_array(dq.inputs[2]).dtype == ml_dtypes.float8_e4m3fn
        assert sum(n.op_type == "QuantizeLinear" for n in trt.graph) == sum(
            n.op_type == "QuantizeLinear" for n in load_model(results["ort"].artifact.path).graph)
        reused = any("residual Add inputs read through the tensor's existing Q/DQ" in c for c in results["tensorrt"].artifact.checks)
        assert reused == (variant == "plain")  # only the residual=false model needs the lowering's rule
        outs[variant] = {t: _run(results[t].artifact.path, feeds) for t in ("ort", "tensorrt")}
    assert _rel(outs["fp8"]["tensorrt"], outs["fp8"]["ort"]) < 1e-6
    assert _rel(*(_run_optimized(tmp_path / f"fp8.{t}.onnx", feeds) for t in ("tensorrt", "ort"))) < 1e-6
    assert annotation(next(n for n in load_model(tmp_path / "fp8.pre.onnx").graph if n.name == "block.add"), "quant")["residual"] == "a"
    # residual=false: E4M3 rounding of the residual is the one difference (measured 0.03 on these 16 images)
    plain_trt, plain_ort = outs["plain"]["tensorrt"], outs["plain"]["ort"]
    assert 0 < _rel(plain_trt, plain_ort) < 0.06
    assert abs(_rel(plain_trt, ref) - _rel(plain_ort, ref)) < 0.005  # equally far from float
    assert _rel(outs["fp8"]["ort"], plain_trt) < 1e-6  # quantize's residual Q/DQ is the one the lowering would add


def test_fp8_residual_without_an_existing_qdq_gets_an_fp8_minmax_qdq(tmp_path):
    """A calibrated residual Q/DQ takes the Conv's FP8 format and scale amax/448 (ModelOpt: max calibration, x448/127)."""
    from tests.backends.tensorrt import test_trt_check as planted

    f8 = ml_dtypes.float8_e4m3fn
    rng = np.random.default_rng(0)
    model = _conv_with_unquantized_residual(planted._act_qdq(zp=np.zeros((), f8)), planted._w_dq(
        axis=0, data=rng.standard_normal((16, 16, 3, 3)).astype(f8), scale=np.full(16, 0.01, np.float32), zp=np.zeros(16, f8)),
        channels=16)  # FP8 Convs need 16 channels (rule fp8-conv-shape)
    out, checks = _legalized_residual(model, tmp_path)
    dq = next(n for n in out.graph if n.op_type == "Add").inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].producer().inputs[0].name == "skip"
    assert constant_array(dq.inputs[2]).dtype == f8
    assert 0 < float(constant_array(dq.inputs[1])) <= 1.0 / 448 + 1e-9  # sigmoid's range over E4M3's 448


def test_llama_w8a8_drops_int16_and_dequantizes_float_weights(tmp_path):
    proto = qm.llama_block(outliers=4.0)
    outs = {}
    for target in ("ort", "tensorrt"):
        outs[target] = _compile(qm.to_ir(proto, vocab=64), tmp_path / f"{target}.onnx", target, W8A8)
    trt = load_model(outs["tensorrt"].artifact.path)
    assert check_tensorrt(trt) == []
    assert DataType.INT16 not in _dtypes(trt)
    down = next(n for n in trt.graph if n.name == "down_proj")
    assert down.inputs[0].name == "gated" and down.inputs[1].const_value is not None  # float activation and weight
    gather = next(n for n in trt.graph if n.op_type == "Gather")
    assert gather.inputs[0].const_value.dtype == DataType.FLOAT  # the int8 table stored as its dequantized float
    q_proj = next(n for n in trt.graph if n.name == "q_proj")
    assert q_proj.inputs[0].producer().op_type == "DequantizeLinear"
    assert q_proj.inputs[1].producer().inputs[0].const_value.dtype == DataType.INT8
    notes = model_metadata(trt, "tensorrt_lowering")
    assert any("INT16 activation Q/DQ left float" in n and "down_proj" in n for n in notes)
    assert any("lower-tensorrt: " in c and "INT16" in c for c in outs["tensorrt"].artifact.checks)
    feeds = qm.llama_feeds(seed=5, seq=16)
    ref = models.run_ort(proto, feeds)[0]
    ort_out, trt_out = _run(tmp_path / "ort.onnx", feeds), _run(tmp_path / "tensorrt.onnx", feeds)
    # down_proj in float instead of INT16: the TensorRT form is no further from float than the ort one.
    assert qm.sqnr_db(ref, trt_out) >= qm.sqnr_db(ref, ort_out) - 0.5
    assert qm.sqnr_db(ort_out, trt_out) > 25


def test_registered_w8a8_keeps_the_tied_int8_lm_head_quantized(tmp_path):
    """The `w8a8` pipeline's int8 lm_head reads the int8 table through a Transpose: TensorRT moves the DQ past it
    (placement rule 8), so the table stays int8 for the head (and float only for the embedding Gather)."""
    proto = qm.llama_block(outliers=4.0)
    outs = {t: _compile(qm.to_ir(proto, vocab=64), tmp_path / f"{t}.onnx", t, "w8a8") for t in ("ort", "tensorrt")}
    trt = load_model(outs["tensorrt"].artifact.path)
    assert check_tensorrt(trt) == []
    head = next(n for n in trt.graph if n.name == "lm_head")
    transpose = head.inputs[1].producer()
    assert transpose.op_type == "Transpose"
    dq = transpose.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.dtype == DataType.INT8
    assert head.inputs[0].producer().op_type == "DequantizeLinear"
    feeds = qm.llama_feeds(seed=5, seq=16)
    ort_out, trt_out = _run(tmp_path / "ort.onnx", feeds), _run(tmp_path / "tensorrt.onnx", feeds)
    assert qm.sqnr_db(ort_out, trt_out) > 25  # INT16 down_proj → float is the only difference


def test_llama_fp8_keeps_fp8_qdq_and_is_legal(tmp_path):
    proto = qm.llama_block(outliers=4.0)
    result = _compile(qm.to_ir(proto, vocab=64), tmp_path / "fp8.onnx", "tensorrt", "quantize{weights=fp8 activations=fp8}")
    trt = load_model(result.artifact.path)
    assert check_tensorrt(trt) == []
    assert DataType.FLOAT8E4M3FN in _dtypes(trt)
    assert "lower-tensorrt" not in " ".join(result.artifact.checks)  # nothing to rewrite


def test_output_is_deterministic(tmp_path):
    for name in ("a", "b"):
        _compile(models.to_ir(small_cnn()), tmp_path / f"{name}.onnx", "tensorrt", "quantize")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.trtexec.txt").read_text().replace("a.", "b.") == (tmp_path / "b.trtexec.txt").read_text()


# --------------------------------------------------------------------------- lower-tensorrt, rule by rule


def _lower(model, pipeline: str = "lower-tensorrt"):
    return parse_pipeline(pipeline)(model, AnalysisManager(PassContext())).model


def _matmul_int4(data: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, *, block: int, axis: int = 0):
    k, n = data.shape
    inits = [numpy_helper.from_array(data, "w"), numpy_helper.from_array(scale, "s")]
    inputs = ["w", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w_dq"], name="w_DQ", **attrs),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="mm")]
    proto = models.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    return proto


def _x(k: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((2, k)).astype(np.float32)}


def test_uint4_with_zero_point_8_becomes_int4_exactly():
    rng = np.random.default_rng(0)
    k, n, block = 16, 6, 8
    proto = _matmul_int4(rng.integers(0, 16, (k, n)).astype(ml_dtypes.uint4),
                         rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32),
                         np.full((k // block, n), 8, ml_dtypes.uint4), block=block)
    lowered = _lower(models.to_ir(proto))
    assert check_tensorrt(lowered) == []
    dq = next(n for n in lowered.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].const_value.dtype == DataType.INT4
    np.testing.assert_array_equal(models.run_ort(lowered, _x(k))[0], models.run_ort(proto, _x(k))[0])


@pytest.mark.parametrize("uint", [True, False])
def test_asymmetric_int4_is_split_exactly_requantized_or_kept_float(uint):
    rng = np.random.default_rng(1)
    k, n, block = 40, 8, 16  # the last block is shorter
    groups = -(-k // block)
    if uint:
        data, zp = rng.integers(0, 16, (k, n)).astype(ml_dtypes.uint4), rng.integers(2, 14, (groups, n)).astype(ml_dtypes.uint4)
    else:
        data, zp = rng.integers(-8, 8, (k, n)).astype(ml_dtypes.int4), rng.integers(-3, 4, (groups, n)).astype(ml_dtypes.int4)
    proto = _matmul_int4(data, rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32), zp, block=block)
    expected = models.run_ort(proto, _x(k))[0]
    split = _lower(models.to_ir(proto))
    assert check_tensorrt(split) == []
    assert any("zero-point correction GEMM (exact)" in n for n in model_metadata(split, "tensorrt_lowering"))
    dq = next(n for n in split.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].const_value.dtype == DataType.INT4 and len(dq.inputs) == 3
    assert not np.any(constant_array(dq.inputs[2]).astype(np.int8))
    np.testing.assert_allclose(models.run_ort(split, _x(k))[0], expected, rtol=1e-5, atol=1e-5)

    requantized = _lower(models.to_ir(proto), "lower-tensorrt{int4-asymmetric=requantize}")
    assert check_tensorrt(requantized) == []
    notes = model_metadata(requantized, "tensorrt_lowering")
    assert any("asymmetric INT4 blocks re-quantized symmetric" in n and "largest relative weight change" in n for n in notes)
    assert _rel(models.run_ort(requantized, _x(k))[0], expected) < 0.15
    floated = _lower(models.to_ir(proto), "lower-tensorrt{int4-asymmetric=float}")
    assert not any(n.op_type == "DequantizeLinear" for n in floated.graph)
    np.testing.assert_array_equal(models.run_ort(floated, _x(k))[0], expected)


def test_per_channel_int4_becomes_one_block_along_k():
    rng = np.random.default_rng(2)
    k, n = 16, 4
    proto = _matmul_int4(rng.integers(-8, 8, (k, n)).astype(ml_dtypes.int4), rng.uniform(0.01, 0.1, n).astype(np.float32),
                         None, block=0, axis=1)
    lowered = _lower(models.to_ir(proto))
    assert check_tensorrt(lowered) == []
    dq = next(n for n in lowered.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["block_size"].as_int() == k and dq.attributes["axis"].as_int() == 0
    np.testing.assert_array_equal(models.run_ort(lowered, _x(k))[0], models.run_ort(proto, _x(k))[0])


def test_planted_violations_that_lowering_fixes():
    from tests.backends.tensorrt import test_trt_check as planted

    fixable = ("symmetric", "qdq-dtype", "per-tensor-activation", "weight-axis", "no-bias-quantization",
               "residual-quantized", "concat-one-scale", "weighted-output", "weighted-inputs", "shared-qdq")
    for rule in fixable:
        model, _ = planted.PLANTED[rule]()
        if rule == "residual-quantized":
            continue  # needs calibration data: covered by the CNN tests
        lowered = _lower(model)
        assert [str(f) for f in check_tensorrt(lowered)] == [], rule
        assert model_metadata(lowered, "tensorrt_lowering"), rule


def test_concat_inputs_get_the_largest_scale():
    from tests.backends.tensorrt import test_trt_check as planted

    model, _ = planted.planted_concat()
    lowered = _lower(model)
    concat = next(n for n in lowered.graph if n.op_type == "Concat")
    scales = [float(constant_array(v.producer().inputs[1])) for v in concat.inputs]
    assert scales == pytest.approx([0.2, 0.2])


def test_residual_without_an_existing_qdq_is_calibrated(tmp_path):
    from tests.backends.tensorrt import test_trt_check as planted

    rng = np.random.default_rng(0)
    model = _conv_with_unquantized_residual(planted._act_qdq(), planted._w_dq(
        axis=0, data=rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8), scale=np.full(4, 0.01, np.float32)))
    out, checks = _legalized_residual(model, tmp_path)
    add = next(n for n in out.graph if n.op_type == "Add")
    dq = add.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].producer().inputs[0].name == "skip"
    assert 0 < float(constant_array(dq.inputs[1])) <= 1.0 / 127 + 1e-9  # sigmoid's range, minmax
    assert any("residual Add inputs given a calibrated Q/DQ" in c for c in checks)


# --------------------------------------------------------------------------- the backend's files


def _sparse_mlp() -> tuple:
    w = np.tile(np.array([[1.0], [0.0], [-2.0], [0.0]], np.float32), (2, 4))  # [8, 4]: 2:4 along K
    proto = models.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [numpy_helper.from_array(w, "w")])
    model = from_proto(proto)
    annotate(model.graph.initializers["w"], "sparsity", {"pattern": "2:4", "axis": 0})
    return proto, model


def test_without_tensorrt_writes_onnx_and_a_ready_trtexec_line(tmp_path):
    _, model = _sparse_mlp()
    result = _compile(model, tmp_path / "m.onnx", "tensorrt", "dce")
    assert result.artifact.path == tmp_path / "m.onnx" and result.artifact.target == "tensorrt"
    command = (tmp_path / "m.trtexec.txt").read_text().splitlines()[-1]
    assert command == (f"trtexec --onnx={tmp_path / 'm.onnx'} --saveEngine={tmp_path / 'm.engine'} --stronglyTyped "
                       "--sparsity=enable --minShapes=x:1x8 --optShapes=x:1x8 --maxShapes=x:8x8")
    line = [c for c in result.artifact.checks if c.startswith("tensorrt is not installed")]
    assert len(line) == 1 and command in line[0]
    assert any(c.startswith("onnxruntime") for c in result.artifact.checks)
    assert annotation(load_model(tmp_path / "m.onnx").graph.initializers["w"], "sparsity")["pattern"] == "2:4"


@pytest.mark.parametrize("suffix", [".engine", ".plan"])
def test_engine_output_without_tensorrt_writes_the_onnx_beside_it(tmp_path, suffix):
    result = _compile(models.to_ir(small_cnn()), tmp_path / f"net{suffix}", None, "quantize")
    assert result.artifact.target == "tensorrt" and result.artifact.path == tmp_path / "net.onnx"
    assert not (tmp_path / f"net{suffix}").exists()
    assert f"--saveEngine={tmp_path / f'net{suffix}'}" in (tmp_path / "net.trtexec.txt").read_text()
    assert any(f"the engine {tmp_path / f'net{suffix}'} was not built" in c for c in result.artifact.checks)
    assert "--sparsity" not in (tmp_path / "net.trtexec.txt").read_text()


def test_cli_tensorrt_target_with_onnx_output_exits_0(tmp_path):
    from tests.backends.tensorrt.test_trt_check import optc_in_process

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    proc = optc_in_process(str(path), "--target", "tensorrt", "--passes=quantize", "--calib", "random", "-o",
                           str(tmp_path / "out.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "[tensorrt]" in proc.stdout and "trt-check: 0 finding(s)" in proc.stdout
    assert sum("tensorrt is not installed" in line for line in proc.stdout.splitlines()) == 1
    assert (tmp_path / "out.trtexec.txt").exists()


def test_engine_output_may_not_overwrite_the_input(tmp_path):
    from optc.driver import compile_file

    path = tmp_path / "net.onnx"
    onnx.save(small_cnn(), path)
    with pytest.raises(OptcError, match="would overwrite the input"):
        compile_file(path, tmp_path / "net.engine", CompileOptions(passes="dce"))


# --------------------------------------------------------------------------- the engine build, against a fake tensorrt


class _FakeTensorRT(types.ModuleType):
    """Just enough of the tensorrt 10 Python API to follow optc's calls; records them."""

    def __init__(self, layers: list[dict]) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.99-fake"
        self.calls: dict[str, object] = {"flags": set()}
        calls, layer_json = self.calls, json.dumps({"Layers": layers})

        class Logger:
            WARNING = 2

            def __init__(self, level):
                calls["log_level"] = level

        class Config:
            profiling_verbosity = None

            def set_flag(self, flag):
                calls["flags"].add(flag)

            def add_optimization_profile(self, profile):
                calls["profile"] = profile.shapes

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (list(lo), list(opt), list(hi))

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls["parsed"] = path
                return Path(path).exists()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls["network_flags"] = flags
                return object()

            def create_builder_config(self):
                calls["config"] = Config()
                return calls["config"]

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"FAKE-ENGINE"

        class Inspector:
            def get_engine_information(self, fmt):
                return layer_json

        class Engine:
            def create_engine_inspector(self):
                return Inspector()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                calls["deserialized"] = bytes(data)
                return Engine()

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, Parser, Runtime
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.BuilderFlag = types.SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS")
        self.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
        self.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")


LAYERS = [
    {"Name": "conv1", "Inputs": [{"Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
     "TacticName": "sm90_xmma_fprop_implicit_gemm_interleaved_i8i8"},
    {"Name": "gemm", "Inputs": [{"Format/Datatype": "Row major linear FP8 format"}], "TacticName": "sparse_gemm_fp8"},
    {"Name": "softmax", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}], "TacticName": "softmax"},
]


def test_engine_build_with_tensorrt(monkeypatch, tmp_path):
    fake = _FakeTensorRT(LAYERS)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: True)
    _, model = _sparse_mlp()
    result = _compile(model, tmp_path / "m.engine", None, "dce")
    assert result.artifact.path == tmp_path / "m.engine"
    assert (tmp_path / "m.engine").read_bytes() == b"FAKE-ENGINE" and (tmp_path / "m.onnx").exists()
    assert not (tmp_path / "m.trtexec.txt").exists()
    assert fake.calls["network_flags"] == 1 << 1  # STRONGLY_TYPED, no precision flags
    assert fake.calls["flags"] == {"SPARSE_WEIGHTS"}
    assert fake.calls["config"].profiling_verbosity == "DETAILED"
    assert fake.calls["profile"] == {"x": ([1, 8], [1, 8], [8, 8])}
    line = next(c for c in result.artifact.checks if c.startswith("TensorRT 10.99-fake built"))
    assert "3 layers, 1 in INT8, 1 in FP8, 0 with INT4 weights, 1 with sparse tactics" in line
    assert "sparse weights enabled" in line


def test_engine_build_rejected_by_the_parser_leaves_nothing(monkeypatch, tmp_path):
    fake = _FakeTensorRT(LAYERS)
    fake.OnnxParser.parse_from_file = lambda self, path: False
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: True)
    with pytest.raises(OptcError, match="TensorRT's ONNX parser rejected"):
        _compile(models.to_ir(small_cnn()), tmp_path / "m.onnx", "tensorrt", "dce")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.engine").exists()


# --------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_fp8_for_tensorrt_is_legal(tmp_path):
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path

    try:
        path = default_model_path()
    except OptcError as exc:
        pytest.skip(str(exc))
    options = CompileOptions(passes="quantize{weights=fp8 activations=fp8}", target="tensorrt", calib="builtin",
                             calib_samples=2, calib_seqlen=64)
    result = compile_model(load_input(path), tmp_path / "smol.onnx", options)
    assert any(c.startswith("trt-check: 0 finding(s)") for c in result.artifact.checks)
    assert check_tensorrt(load_model(result.artifact.path)) == []


def test_int16_left_float_is_a_remark_and_strict_fails_on_it(tmp_path):
    """TensorRT has no INT16 Q/DQ: the lowering says so, and under strict nothing is written."""
    from optc.passes import RemarkError

    proto = qm.llama_block(outliers=4.0)
    result = _compile(qm.to_ir(proto, vocab=64), tmp_path / "trt.onnx", "tensorrt", W8A8, remarks="lower")
    missed = [r for r in result.remarks if r.kind == "missed"]
    assert [(r.pass_name, r.matched_none) for r in missed] == [("lower-tensorrt", False)]
    assert missed[0].message.startswith("1 INT16 activation Q/DQ left float (TensorRT has no INT16 Q/DQ)")
    ort = _compile(qm.to_ir(proto, vocab=64), tmp_path / "ort.onnx", "ort", W8A8, strict=True)
    assert [r for r in ort.remarks if r.kind == "missed"] == []  # onnxruntime runs INT16: nothing missed
    with pytest.raises(RemarkError, match="--strict: lower-tensorrt: 1 INT16 activation"):
        _compile(qm.to_ir(proto, vocab=64), tmp_path / "strict.onnx", "tensorrt", W8A8, strict=True)
    assert not list(tmp_path.glob("strict*"))  # no output, no reproducer


def test_the_shape_profile_stops_at_a_learned_position_table(tmp_path):
    """gpt2 with 64 learned positions got `--maxShapes=input_ids:8x2048`: an engine that accepts sequences indexing
    past the table. The sequence axes now stop at the table; a rotary model keeps the default ranges."""
    pytest.importorskip("transformers")
    from optc.frontends import load_input
    from tests.architectures.configs import save

    profiles = {family: trt_backend.shape_profile(load_input(save(family, tmp_path / family)[1]))
                for family in ("gpt2", "llama")}
    assert profiles["gpt2"]["input_ids"] == ([1, 1], [1, 64], [8, 64])
    assert profiles["llama"]["input_ids"] == ([1, 1], [1, 256], [8, 2048])
