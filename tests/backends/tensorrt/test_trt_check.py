"""trt-check: one planted violation per TensorRT rule, each found and named; a legal model has no findings."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc.backends.tensorrt.trt_check import RULES, check_tensorrt
from optc.errors import PassFailure
from optc.ir import annotate, from_proto
from optc.passes import AnalysisManager, PassContext, parse_pipeline
from optc.passes.transforms.check_sparsity import nm_violations
from tests.fixtures import models

F = TensorProto.FLOAT
K, N = 8, 4


def _arr(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inits, *, inputs=None, outputs=None, opset: int = 21, annotate_fn=None):
    inputs = inputs or [helper.make_tensor_value_info("x", F, [1, K])]
    outputs = outputs or [helper.make_tensor_value_info("y", F, None)]
    graph = helper.make_graph(nodes, "planted", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    model = from_proto(proto)
    if annotate_fn is not None:
        annotate_fn(model)
    return model


def _weight(k: int = K, n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-127, 128, size=(k, n)).astype(np.int8)


def _act_qdq(x="x", out="xq", *, scale=0.05, zp=None, name="act") -> tuple[list, list]:
    """x → Q → DQ → out with a scalar scale and an int8 zero point 0 (unless `zp` is given)."""
    zp = np.int8(0) if zp is None else zp
    inits = [_arr(f"{name}_scale", np.float32(scale)), _arr(f"{name}_zp", zp)]
    nodes = [
        helper.make_node("QuantizeLinear", [x, f"{name}_scale", f"{name}_zp"], [f"{name}_q"], name=f"{name}_Q"),
        helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [out], name=f"{name}_DQ"),
    ]
    return nodes, inits


def _w_dq(name="w", *, axis=1, data=None, scale=None, zp=None) -> tuple[list, list]:
    data = _weight() if data is None else data
    n = data.shape[axis]
    scale = np.full(n, 0.01, np.float32) if scale is None else scale
    zp = np.zeros(scale.shape, np.int8) if zp is None else zp
    inits = [_arr(f"{name}_q", data), _arr(f"{name}_s", scale), _arr(f"{name}_zp", zp)]
    nodes = [helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"],
                              name=f"{name}_DQ", axis=axis)]
    return nodes, inits


def legal_matmul(**act) -> tuple[list, list]:
    a_nodes, a_inits = _act_qdq(**act)
    w_nodes, w_inits = _w_dq()
    return [*a_nodes, *w_nodes, helper.make_node("MatMul", ["xq", "w_dq"], ["y"], name="mm")], a_inits + w_inits


@dataclasses.dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str


def optc_in_process(*args: str) -> Proc:
    """`optc ARGS` through `optc.cli.main` in this process (the CLI tests cover real child processes)."""
    from optc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Proc(code, out.getvalue(), err.getvalue())


def _rules(model) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in check_tensorrt(model):
        found.setdefault(f.rule.name, []).append(f.node)
    return found


def test_the_legal_pattern_has_no_findings():
    nodes, inits = legal_matmul()
    assert check_tensorrt(_model(nodes, inits)) == []


def test_float_weights_quantized_at_build_time_are_legal():
    """Q → DQ on a float constant (TensorRT quantizes the weight with the Q's scale): per channel on the right axis."""
    a_nodes, a_inits = _act_qdq()
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    inits = [_arr("wf", w), _arr("wf_s", np.full(N, 0.02, np.float32)), _arr("wf_zp", np.zeros(N, np.int8))]
    nodes = [*a_nodes,
             helper.make_node("QuantizeLinear", ["wf", "wf_s", "wf_zp"], ["wf_q"], name="w_Q", axis=1),
             helper.make_node("DequantizeLinear", ["wf_q", "wf_s", "wf_zp"], ["wf_dq"], name="w_DQ", axis=1),
             helper.make_node("MatMul", ["xq", "wf_dq"], ["y"], name="mm")]
    assert check_tensorrt(_model(nodes, a_inits + inits)) == []
    for node in nodes[2:4]:
        node.attribute[0].i = 0  # per row: the wrong axis for MatMul B
    inits[1:] = [_arr("wf_s", np.full(K, 0.02, np.float32)), _arr("wf_zp", np.zeros(K, np.int8))]
    assert {f.rule.name for f in check_tensorrt(_model(nodes, a_inits + inits))} == {"weight-axis"}


def test_every_rule_has_an_id_a_severity_and_a_source():
    assert len({r.id for r in RULES.values()}) == len(RULES) == 19
    for rule in RULES.values():
        assert rule.severity in ("error", "warning") and rule.text and rule.source and "reference/" not in rule.source


# --------------------------------------------------------------------------- one model per rule


def planted_symmetric():
    return _model(*legal_matmul(zp=np.int8(3))), "act_Q"


def planted_scale():
    return _model(*legal_matmul(scale=-0.05)), "act_Q"


def planted_dtype():
    return _model(*legal_matmul(zp=np.uint8(0))), "act_Q"


def planted_per_channel_activation():
    nodes, inits = legal_matmul()
    inits[0] = _arr("act_scale", np.full(K, 0.05, np.float32))
    inits[1] = _arr("act_zp", np.zeros(K, np.int8))
    for node in nodes[:2]:
        node.attribute.append(helper.make_attribute("axis", 1))
    return _model(nodes, inits), "act_Q"


def planted_weight_axis():
    a_nodes, a_inits = _act_qdq()
    w_nodes, w_inits = _w_dq(axis=0)  # per row of [K, N]: the input channels
    return _model([*a_nodes, *w_nodes, helper.make_node("MatMul", ["xq", "w_dq"], ["y"], name="mm")], a_inits + w_inits), "w_DQ"


def planted_bias():
    a_nodes, a_inits = _act_qdq()
    w_nodes, w_inits = _w_dq(axis=0, data=_weight(N, K))
    b_inits = [_arr("b_q", np.arange(N, dtype=np.int32)), _arr("b_s", np.full(N, 1e-3, np.float32)),
               _arr("b_zp", np.zeros(N, np.int32))]
    nodes = [*a_nodes, *w_nodes,
             helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_zp"], ["b_dq"], name="bias_DQ", axis=0),
             helper.make_node("Gemm", ["xq", "w_dq", "b_dq"], ["y"], name="gemm", transB=1)]
    return _model(nodes, a_inits + w_inits + b_inits), "bias_DQ"


def planted_dynamic():
    w_nodes, w_inits = _w_dq(data=_weight().astype(np.uint8), zp=np.zeros(N, np.uint8))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dyn"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="dyn_DQ"),
        *w_nodes, helper.make_node("MatMul", ["xdq", "w_dq"], ["y"], name="mm"),
    ]
    return _model(nodes, w_inits), "dyn"


def planted_integer_op():
    inits = [_arr("w", _weight())]
    nodes = [
        helper.make_node("Cast", ["x"], ["x8"], name="cast", to=TensorProto.INT8),
        helper.make_node("MatMulInteger", ["x8", "w"], ["y"], name="mmi"),
    ]
    return _model(nodes, inits, outputs=[helper.make_tensor_value_info("y", TensorProto.INT32, None)]), "mmi"


def planted_pair():
    nodes, inits = legal_matmul()
    inits.append(_arr("other_scale", np.float32(0.1)))
    nodes[1] = helper.make_node("DequantizeLinear", ["act_q", "other_scale", "act_zp"], ["xq"], name="act_DQ")
    return _model(nodes, inits), "act_Q"


def planted_int4_axis():
    a_nodes, a_inits = _act_qdq()
    data = np.random.default_rng(1).integers(-8, 8, size=(K, N)).astype(ml_dtypes.int4)
    inits = [_arr("w4", data), _arr("w4_s", np.full((K, N // 2), 0.1, np.float32))]
    nodes = [*a_nodes,
             helper.make_node("DequantizeLinear", ["w4", "w4_s"], ["w4_dq"], name="w4_DQ", axis=1, block_size=2),
             helper.make_node("MatMul", ["xq", "w4_dq"], ["y"], name="mm")]
    return _model(nodes, a_inits + inits), "w4_DQ"


def planted_fp8_opset():
    f8 = ml_dtypes.float8_e4m3fn
    a_nodes, a_inits = _act_qdq(zp=np.zeros((), f8))
    w_nodes, w_inits = _w_dq(data=np.ones((K, N), f8), zp=np.zeros(N, f8))
    nodes = [*a_nodes, *w_nodes, helper.make_node("MatMul", ["xq", "w_dq"], ["y"], name="mm")]
    return _model(nodes, a_inits + w_inits, opset=18), "act_Q"


def _fp8_conv(cin: int, cout: int, k: int, fp8_weight: bool = True):
    """x → FP8 Q/DQ → Conv with a per-channel FP8 (or int8) weight `[cout, cin, k, k]`."""
    f8 = ml_dtypes.float8_e4m3fn
    inputs = [helper.make_tensor_value_info("x", F, [1, cin, 8, 8])]
    a_nodes, a_inits = _act_qdq(zp=np.zeros((), f8))
    data = np.ones((cout, cin, k, k), f8 if fp8_weight else np.int8)
    w_nodes, w_inits = _w_dq(axis=0, data=data, zp=np.zeros(cout, f8 if fp8_weight else np.int8))
    if not fp8_weight:
        a_nodes, a_inits = _act_qdq()
    nodes = [*a_nodes, *w_nodes, helper.make_node("Conv", ["xq", "w_dq"], ["y"], name="conv", pads=[k // 2] * 4)]
    return _model(nodes, a_inits + w_inits, inputs=inputs)


def planted_fp8_conv_shape():
    return _fp8_conv(4, 16, 3), "conv"


def planted_residual():
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("x", F, [1, 4, 6, 6])]
    a_nodes, a_inits = _act_qdq()
    w_nodes, w_inits = _w_dq(axis=0, data=rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8),
                             scale=np.full(4, 0.01, np.float32))
    nodes = [*a_nodes, *w_nodes,
             helper.make_node("Conv", ["xq", "w_dq"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["y"], name="residual_add")]
    return _model(nodes, a_inits + w_inits, inputs=inputs), "residual_add"


def planted_concat():
    a_nodes, a_inits = _act_qdq(name="a")
    b_nodes, b_inits = _act_qdq(out="xq2", scale=0.2, name="b")
    nodes = [*a_nodes, *b_nodes, helper.make_node("Concat", ["xq", "xq2"], ["y"], name="cat", axis=1)]
    return _model(nodes, a_inits + b_inits), "cat"


def planted_weighted_output():
    nodes, inits = legal_matmul()
    nodes[-1] = helper.make_node("MatMul", ["xq", "w_dq"], ["mm_out"], name="mm")
    o_nodes, o_inits = _act_qdq(x="mm_out", out="mm_dq", name="out")
    nodes += [*o_nodes, helper.make_node("Sigmoid", ["mm_dq"], ["y"], name="sigmoid")]
    return _model(nodes, inits + o_inits), "mm"


def planted_weighted_inputs():
    w_nodes, w_inits = _w_dq()
    return _model([*w_nodes, helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="mm")], w_inits), "mm"


def planted_shared_qdq():
    nodes, inits = legal_matmul()
    nodes.append(helper.make_node("Softmax", ["xq"], ["probs"], name="softmax"))
    outputs = [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("probs", F, None)]
    return _model(nodes, inits, outputs=outputs), "act_DQ"


def _sparse_model(weight: np.ndarray, axis: int):
    inits = [_arr("w", weight)]

    def mark(model):
        annotate(model.graph.initializers["w"], "sparsity", {"pattern": "2:4", "axis": axis})

    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], inits, annotate_fn=mark)


def planted_sparsity_pattern():
    return _sparse_model(np.ones((K, N), np.float32), 0), "w"


def planted_sparsity_axis():
    w = np.tile(np.array([1, 0, 1, 0], np.float32), (K, N // 4))  # 2:4 along axis 1, not along K
    return _sparse_model(w, 1), "w"


PLANTED = {
    "symmetric": planted_symmetric,
    "constant-positive-scale": planted_scale,
    "qdq-dtype": planted_dtype,
    "per-tensor-activation": planted_per_channel_activation,
    "weight-axis": planted_weight_axis,
    "no-bias-quantization": planted_bias,
    "no-dynamic-quantization": planted_dynamic,
    "no-integer-ops": planted_integer_op,
    "qdq-pair": planted_pair,
    "int4-blocked": planted_int4_axis,
    "fp8-opset": planted_fp8_opset,
    "fp8-conv-shape": planted_fp8_conv_shape,
    "residual-quantized": planted_residual,
    "concat-one-scale": planted_concat,
    "weighted-output": planted_weighted_output,
    "weighted-inputs": planted_weighted_inputs,
    "shared-qdq": planted_shared_qdq,
    "sparsity-2-4": planted_sparsity_pattern,
    "sparsity-axis": planted_sparsity_axis,
}


def test_every_rule_has_a_planted_model():
    assert set(PLANTED) == set(RULES)


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_planted_violation_is_found_and_named(rule):
    model, offender = PLANTED[rule]()
    found = _rules(model)
    assert rule in found, f"{rule} not found; found {found}"
    label = offender if offender != "w" else "w"
    assert any(label in node for node in found[rule])
    text = [str(f) for f in check_tensorrt(model) if f.rule.name == rule][0]
    assert RULES[rule].id in text and rule in text and RULES[rule].text in text


def test_planted_models_break_only_what_they_plant_where_it_is_one_rule():
    """Most planted models break exactly one rule (the dynamic, FP8 and dtype ones imply others)."""
    exact = set(PLANTED) - {"no-dynamic-quantization", "no-integer-ops", "fp8-opset"}
    for rule in sorted(exact):
        model, _ = PLANTED[rule]()
        assert set(_rules(model)) == {rule}, rule


@pytest.mark.parametrize(("cin", "cout", "k", "fp8_weight", "flagged"), [
    (16, 16, 3, True, False),   # TensorRT has FP8 kernels for it
    (16, 16, 5, True, False),   # 25 taps
    (16, 16, 7, True, True),    # 49 taps
    (16, 8, 3, True, True),     # 8 output channels
    (3, 16, 3, True, True),     # an RGB stem
    (4, 4, 3, False, False),    # INT8: the rule is FP8's
])
def test_fp8_conv_shape_follows_tensorrts_fp8_kernels(cin, cout, k, fp8_weight, flagged):
    found = _rules(_fp8_conv(cin, cout, k, fp8_weight))
    assert ("fp8-conv-shape" in found) == flagged, found


def test_2_4_violations_are_counted_exactly():
    w = np.zeros((8, 6), np.float32)
    w[0:4, 0] = [1, 1, 0, 0]
    w[4:8, 1] = [1, 1, 1, 0]
    assert nm_violations(w, 0, 2, 4) == 1  # of 12 groups
    assert nm_violations(w, 1, 2, 4) == -1  # 6 is not divisible by 4


def test_pass_prints_findings_and_strict_fails(capsys):
    model, _ = planted_symmetric()
    am = AnalysisManager(PassContext())
    result = parse_pipeline("trt-check")(model, am)
    assert not result.modified
    err = capsys.readouterr().err
    assert "act_Q: [T01 symmetric, error]" in err and "2 finding(s): 2 error(s)" in err
    with pytest.raises(PassFailure, match="T01 symmetric"):
        parse_pipeline("trt-check{strict=true}")(model, am)


def test_cli_checks_any_onnx_file_and_the_backend_fixes_what_it_can(tmp_path):
    model, _ = planted_symmetric()
    from optc.ir import save_model

    path = tmp_path / "asym.onnx"
    save_model(model, path)
    out = tmp_path / "out.onnx"
    proc = optc_in_process(str(path), "--target", "tensorrt", "--passes=trt-check", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "act_Q: [T01 symmetric, error]" in proc.stderr  # the input, as given
    assert "trt-check: 0 finding(s)" in proc.stdout  # the backend's output after lower-tensorrt
    assert "asymmetric activation Q/DQ made symmetric INT8" in proc.stdout
    from optc.ir import load_model

    assert check_tensorrt(load_model(out)) == []


def test_cli_fails_in_one_line_on_what_cannot_be_fixed(tmp_path):
    model, _ = planted_dynamic()
    proto = onnx.load_from_string(_bytes(model))
    path = tmp_path / "dyn.onnx"
    onnx.save(proto, path)
    proc = optc_in_process(str(path), "--target", "tensorrt", "--passes=dce", "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "TensorRT rule" in lines[0] and "T07 no-dynamic-quantization" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def _bytes(model) -> bytes:
    from optc.ir import to_proto

    return to_proto(model).SerializeToString()


def test_a_float_model_has_no_findings():
    assert check_tensorrt(models.to_ir(models.mlp())) == []
