"""`lower-ort-int8`: structure, exact numerics in onnxruntime, and graphs it must leave alone.

The reference for every numeric check is the model *before* the pass run by
onnxruntime with graph optimizations off: then DequantizeLinear → MatMul runs
in float, which is what the QDQ graph means. (With optimizations on,
onnxruntime fuses it into integer kernels whose uint8 × int8 form saturates on
CPUs without VNNI, which is what the pass avoids.)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc.backends.ort import lower_ort_int8 as lowering
from optc.ir import DataType, annotation, model_metadata, print_ir, to_proto
from optc.ir.patterns.qdq import quantized_type
from optc.passes import get_pass, parse_pipeline
from tests.fixtures import models
from tests.passes import builders as b

FLOAT = TensorProto.FLOAT
RNG_SEED = 0


# ---------------------------------------------------------------------- tiny QDQ models


def _w8(rng: np.random.Generator, k: int, n: int, absmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights [k, n] (per-column absmax exactly `absmax`) and their per-column scales."""
    w = rng.integers(-absmax, absmax + 1, size=(k, n)).astype(np.int8)
    w[0, :] = absmax
    return w, (rng.random(n) * 0.02 + 0.005).astype(np.float32)


def qdq_mlp(*, absmax: int = 127, gemm: bool = False, shared: bool = True, act_scale: float = 0.05) -> onnx.ModelProto:
    """x → Q/DQ int8 (one pair shared by two readers, as `quantize` emits) → MatMul q and k (DQ int8 per-channel
    weights, axis 1) → Add → Q/DQ → MatMul o (or Gemm with transB=1 and a float bias)."""
    rng = np.random.default_rng(RNG_SEED)
    k, n = 16, 8
    wq, sq = _w8(rng, k, n, absmax)
    wk, sk = _w8(rng, k, n, absmax)
    wo, so = _w8(rng, n, n, absmax)
    inits = [
        numpy_helper.from_array(np.float32(act_scale), "x_scale"),
        numpy_helper.from_array(np.int8(0), "x_zp"),
        numpy_helper.from_array(np.float32(act_scale * 4), "h_scale"),
        numpy_helper.from_array(np.int8(0), "h_zp"),
    ]
    nodes = []
    if shared:
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        ]
    for name, w, s in (("q", wq, sq), ("k", wk, sk)):
        inits += [
            numpy_helper.from_array(w, f"{name}_w"),
            numpy_helper.from_array(s, f"{name}_s"),
            numpy_helper.from_array(np.zeros(n, np.int8), f"{name}_z"),
        ]
        a = "x_dq"
        if not shared:
            nodes += [
                helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], [f"x_q_{name}"], name=f"x_Q_{name}"),
                helper.make_node("DequantizeLinear", [f"x_q_{name}", "x_scale", "x_zp"], [f"x_dq_{name}"], name=f"x_DQ_{name}"),
            ]
            a = f"x_dq_{name}"
        nodes += [
            helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_s", f"{name}_z"], [f"{name}_wdq"], name=f"{name}_WDQ", axis=1),
            helper.make_node("MatMul", [a, f"{name}_wdq"], [f"{name}_out"], name=f"{name}_proj"),
        ]
    nodes += [
        helper.make_node("Add", ["q_out", "k_out"], ["h"], name="add"),
        helper.make_node("QuantizeLinear", ["h", "h_scale", "h_zp"], ["h_q"], name="h_Q"),
        helper.make_node("DequantizeLinear", ["h_q", "h_scale", "h_zp"], ["h_dq"], name="h_DQ"),
    ]
    if gemm:
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(wo.T), "o_w"),  # [N, K] for transB=1
            numpy_helper.from_array(so, "o_s"),
            numpy_helper.from_array(np.zeros(n, np.int8), "o_z"),
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "o_b"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", ["o_w", "o_s", "o_z"], ["o_wdq"], name="o_WDQ", axis=0),
            helper.make_node("Gemm", ["h_dq", "o_wdq", "o_b"], ["y"], name="o_proj", transB=1),
        ]
        x_shape, y_shape = [4, k], [4, n]
    else:
        inits += [
            numpy_helper.from_array(wo, "o_w"),
            numpy_helper.from_array(so, "o_s"),
            numpy_helper.from_array(np.zeros(n, np.int8), "o_z"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", ["o_w", "o_s", "o_z"], ["o_wdq"], name="o_WDQ", axis=1),
            helper.make_node("MatMul", ["h_dq", "o_wdq"], ["y"], name="o_proj"),
        ]
        x_shape, y_shape = [2, 3, k], [2, 3, n]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def weight_only_model(*, act16: bool = False, with_zero_point: bool = False) -> onnx.ModelProto:
    """x (float, or int16 Q/DQ) → MatMul with a DQ int8 per-channel weight: an op that stays float."""
    rng = np.random.default_rng(RNG_SEED + 1)
    w, s = _w8(rng, 16, 8)
    z = rng.integers(-3, 4, size=8).astype(np.int8) if with_zero_point else np.zeros(8, np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s"), numpy_helper.from_array(z, "z")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wdq"], name="WDQ", axis=1)]
    a = "x"
    if act16:
        inits += [numpy_helper.from_array(np.float32(1e-4), "xs"), numpy_helper.from_array(np.int16(0), "xz")]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_Q16"),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="x_DQ16"),
        ]
        a = "xdq"
    nodes.append(helper.make_node("MatMul", [a, "wdq"], ["y"], name="down_proj"))
    graph = helper.make_graph(nodes, "wo", [helper.make_tensor_value_info("x", FLOAT, [2, 3, 16])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 3, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def tied_embedding_model(*, per_row: bool = True) -> onnx.ModelProto:
    """ids → Gather(DQ(int8 table, per row)) → … → lm_head MatMul(h, Transpose(DQ(table))) (tied, weight-only)."""
    rng = np.random.default_rng(RNG_SEED + 2)
    vocab, dim = 20, 8
    table = rng.integers(-127, 128, size=(vocab, dim)).astype(np.int8)
    scale = (rng.random(vocab) * 0.02 + 0.005).astype(np.float32) if per_row else np.float32(0.01)
    zp = np.zeros(vocab, np.int8) if per_row else np.int8(0)
    inits = [numpy_helper.from_array(table, "E"), numpy_helper.from_array(scale, "E_s"), numpy_helper.from_array(zp, "E_z")]
    dq_attrs = {"axis": 0} if per_row else {}
    nodes = [
        helper.make_node("DequantizeLinear", ["E", "E_s", "E_z"], ["E_dq"], name="E_DQ", **dq_attrs),
        helper.make_node("Gather", ["E_dq", "ids"], ["h"], name="embed"),
        helper.make_node("Tanh", ["h"], ["t"], name="act"),
        helper.make_node("Transpose", ["E_dq"], ["E_t"], name="lm_head_T", perm=[1, 0]),
        helper.make_node("MatMul", ["t", "E_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", FLOAT, [2, 5, vocab])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


# ---------------------------------------------------------------------- helpers


def _session(proto: onnx.ModelProto, *, optimize: bool, dump: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if dump:
        options.optimized_model_filepath = dump
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _reference(before: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """The QDQ model's meaning: onnxruntime without optimizations (DequantizeLinear, then float ops)."""
    return _session(before, optimize=False).run(None, feeds)[0]


def _lower(proto: onnx.ModelProto, options: str = "kernel=u8u8"):
    model = models.to_ir(proto)
    result = b.run(model, f"lower-ort-int8{{{options}}}" if options else "lower-ort-int8")
    return result, to_proto(result.model)


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:
    path = str(tmp_path / "optimized.onnx")
    _session(proto, optimize=True, dump=path)
    return [n.op_type for n in onnx.load(path).graph.node]


def _feeds(shape, scale: float = 1.0, seed: int = 0, positive: bool = False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return {"x": np.abs(x) + 2.0 if positive else x}


def _nodes(model, op_type: str):
    return [n for n in model.graph if n.op_type == op_type]


# ---------------------------------------------------------------------- integer MatMul / Gemm


def test_u8u8_reencodes_activations_and_weights():
    result, _ = _lower(qdq_mlp(), "kernel=u8u8")
    model = result.model
    assert result.modified
    assert result.statistics["matmul-u8u8"] == 3 and result.statistics["matmul-u8s8"] == 0
    for q in _nodes(model, "QuantizeLinear"):
        assert quantized_type(q) == DataType.UINT8
        assert q.inputs[2].dtype == DataType.UINT8 and int(q.inputs[2].const_value.numpy()) == 128
    for dq in _nodes(model, "DequantizeLinear"):
        assert quantized_type(dq) == DataType.UINT8
        assert np.all(dq.inputs[2].const_value.numpy() == 128)
    for name in ("q_w", "k_w", "o_w"):
        assert model.graph.initializers[name].const_value.dtype == DataType.UINT8
    for mm in _nodes(model, "MatMul"):
        assert annotation(mm, "ort_lowering")["kernel"] == "u8u8"
    assert model_metadata(model, "ort_lowering")["kernel"] == "u8u8"
    # Old int8 zero points are gone; no other initializer was dropped.
    assert "x_zp" not in model.graph.initializers and "q_s" in model.graph.initializers


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("kernel", ["u8u8", "u8s8"])
def test_lowered_model_fuses_every_matmul_in_onnxruntime(tmp_path, kernel, shared):
    before = qdq_mlp(shared=shared)
    _, after = _lower(before, f"kernel={kernel}")
    ops = _optimized_ops(after, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 3, ops
    assert "DequantizeLinear" not in ops and "MatMul" not in ops


def test_int8_shared_pair_is_not_fused_by_onnxruntime_without_the_pass(tmp_path):
    """Why the pass exists on x86: onnxruntime leaves a shared int8 pair as DequantizeLinear + float MatMul."""
    if lowering.host_kernel()[0] == "keep":
        pytest.skip("non-x86 host: onnxruntime runs int8 Q/DQ directly")
    ops = _optimized_ops(qdq_mlp(shared=True), tmp_path)
    assert "DequantizeLinear" in ops and "MatMul" in ops


@pytest.mark.parametrize(("kernel", "absmax"), [("u8u8", 127), ("u8s8", 64)])
def test_numerics_match_the_qdq_model(kernel, absmax):
    """u8s8 is exact on every CPU only for weights within ±64 (see test_u8u8_is_exact_where…)."""
    before = qdq_mlp(absmax=absmax)
    _, after = _lower(before, f"kernel={kernel}")
    for seed in range(3):
        feeds = _feeds([2, 3, 16], scale=2.0, seed=seed)
        want = _reference(before, feeds)
        got = _session(after, optimize=True).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        # Before optimization the lowered graph is the same QDQ arithmetic, value for value.
        np.testing.assert_array_equal(_session(after, optimize=False).run(None, feeds)[0], want)


def test_u8u8_is_exact_where_uint8_int8_pairs_would_saturate():
    """Large activations and weights at ±127: the byte-pair sums overflow int16; u8u8 stays exact."""
    before = qdq_mlp(act_scale=0.05)
    _, after = _lower(before, "kernel=u8u8")
    feeds = _feeds([2, 3, 16], scale=6.0, seed=7, positive=True)  # x/scale near the top of the int8 range
    want = _reference(before, feeds)
    got = _session(after, optimize=True).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gemm_with_transposed_weight_and_bias(tmp_path):
    before = qdq_mlp(gemm=True)
    result, after = _lower(before, "kernel=u8u8")
    assert result.statistics["matmul-u8u8"] == 3
    gemm = _nodes(result.model, "Gemm")[0]
    assert annotation(gemm, "ort_lowering")["kernel"] == "u8u8"
    # The float bias moves to an Add: onnxruntime fuses a QDQ Gemm into QGemm only without one.
    assert len(gemm.inputs) == 2
    assert [n.op_type for n in result.model.graph][-1] == "Add" and result.model.graph.outputs[0].name == "y"
    assert "QGemm" in _optimized_ops(after, tmp_path)
    feeds = _feeds([4, 16], scale=2.0)
    want = _reference(before, feeds)
    got = _session(after, optimize=True).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_u8s8_keeps_int8_weights():
    result, _ = _lower(qdq_mlp(), "kernel=u8s8")
    assert result.statistics["matmul-u8s8"] == 3
    assert result.model.graph.initializers["q_w"].const_value.dtype == DataType.INT8
    assert all(quantized_type(q) == DataType.UINT8 for q in _nodes(result.model, "QuantizeLinear"))


def test_keep_leaves_integer_qdq_alone():
    model = models.to_ir(qdq_mlp())
    text = print_ir(model)
    result = b.run(model, "lower-ort-int8{kernel=keep}")
    assert not result.modified
    assert print_ir(result.model) == text


# ---------------------------------------------------------------------- auto: the host decides


@pytest.mark.parametrize(
    ("machine", "flags", "kernel"),
    [
        ("x86_64", {"avx2", "fma"}, "u8u8"),
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "u8s8"),
        ("AMD64", {"avx2", "avx_vnni"}, "u8s8"),
        ("x86_64", set(), "u8u8"),
        ("aarch64", set(), "keep"),
        ("arm64", set(), "keep"),
    ],
)
def test_host_kernel(monkeypatch, machine, flags, kernel):
    monkeypatch.setattr(lowering.platform, "machine", lambda: machine)
    monkeypatch.setattr(lowering, "cpu_flags", lambda: frozenset(flags))
    chosen, reason = lowering.host_kernel()
    assert chosen == kernel and reason


def test_auto_uses_u8s8_for_weights_that_cannot_saturate(monkeypatch):
    monkeypatch.setattr(lowering.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(lowering, "cpu_flags", lambda: frozenset({"avx2"}))
    result, _ = _lower(qdq_mlp(absmax=64), "")
    assert result.statistics["matmul-u8s8"] == 3 and result.statistics["matmul-u8u8"] == 0
    assert result.model.graph.initializers["q_w"].const_value.dtype == DataType.INT8
    result, _ = _lower(qdq_mlp(absmax=127), "")
    assert result.statistics["matmul-u8u8"] == 3


def test_auto_uses_u8s8_for_pair_limited_weights(monkeypatch):
    """Full-range int8 weights whose pairs along K sum to at most 128 cannot saturate either."""
    from optc.passes.int8_pairs import limit_pair_sums

    monkeypatch.setattr(lowering.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(lowering, "cpu_flags", lambda: frozenset({"avx2"}))
    proto = qdq_mlp(absmax=127)
    for init in proto.graph.initializer:
        if init.name in ("q_w", "k_w", "o_w"):
            w = numpy_helper.to_array(init).copy()
            limit_pair_sums(w, w.astype(np.float64), 0)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    result, after = _lower(proto, "")
    assert result.statistics["matmul-u8s8"] == 3 and result.statistics["matmul-u8u8"] == 0
    assert int(np.abs(numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "q_w"))).max()) == 127
    feeds = _feeds([2, 3, 16], scale=6.0, seed=7, positive=True)  # activations at the top of the range
    want = _reference(proto, feeds)
    got = _session(after, optimize=True).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_auto_records_the_host_decision():
    result, _ = _lower(qdq_mlp(), "")
    kernel = lowering.host_kernel()[0]
    if kernel == "keep":
        assert not result.modified
    else:
        assert model_metadata(result.model, "ort_lowering")["kernel"] == kernel


# ---------------------------------------------------------------------- weights of ops that stay float


@pytest.mark.parametrize("act16", [False, True])
@pytest.mark.parametrize("with_zero_point", [False, True])
def test_weight_of_a_float_op_is_dequantized_at_load(tmp_path, act16, with_zero_point):
    before = weight_only_model(act16=act16, with_zero_point=with_zero_point)
    result, after = _lower(before)
    assert result.statistics["dequantized-at-load"] == 1
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("DequantizeLinear") == (1 if act16 else 0)  # only the int16 activation pair's
    assert "Cast" in ops and "Mul" in ops
    assert result.model.graph.initializers["w"].const_value.dtype == DataType.INT8  # the file keeps 8 bits
    optimized = _optimized_ops(after, tmp_path)
    assert "MatMul" in optimized and "MatMulNBits" not in optimized and "Cast" not in optimized
    feeds = _feeds([2, 3, 16], scale=0.5)
    want = _reference(before, feeds)
    np.testing.assert_array_equal(_session(after, optimize=True).run(None, feeds)[0], _session(after, optimize=False).run(None, feeds)[0])
    np.testing.assert_allclose(_session(after, optimize=True).run(None, feeds)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_row", [True, False])
def test_tied_embedding_gathers_rows_then_dequantizes(tmp_path, per_row):
    before = tied_embedding_model(per_row=per_row)
    result, after = _lower(before)
    assert result.statistics["gathers"] == 1 and result.statistics["dequantized-at-load"] == 1
    graph = result.model.graph
    gathers = _nodes(result.model, "Gather")
    assert any(g.inputs[0].name == "E" for g in gathers)  # the int8 table is gathered directly
    assert not any(n.op_type == "DequantizeLinear" and n.inputs[0].name == "E" for n in graph)
    assert graph.initializers["E"].const_value.dtype == DataType.INT8
    assert "DequantizeLinear" not in [n for n in _optimized_ops(after, tmp_path) if n == "DequantizeLinear" and per_row]
    feeds = {"ids": np.random.default_rng(3).integers(0, 20, size=(2, 5)).astype(np.int64)}
    want = _reference(before, feeds)
    got = _session(after, optimize=True).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pair_limit", [128, 0])
def test_tied_integer_lm_head_transposes_the_shared_table_at_load(tmp_path, monkeypatch, pair_limit):
    """smoothquant + quantize with an int8 lm_head tied to the int8 table: on AVX2 the head runs as u8s8 when
    the table's pairs are limited (one table in the file, transposed when the session loads), else stays float."""
    from optc.passes import AnalysisManager, PassContext, parse_pipeline
    from tests.fixtures import quant_models as qm

    monkeypatch.setattr(lowering.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(lowering, "cpu_flags", lambda: frozenset({"avx2"}))
    model = qm.to_ir(qm.llama_block(outliers=4.0), vocab=64)
    calib = {"calibration.spec": "random", "calibration.samples": 8, "calibration.seqlen": 16}
    pipeline = f'smoothquant{{exclude=""}},quantize{{embeddings=true exclude="" weight-pair-limit={pair_limit}}}'
    quantized = parse_pipeline(pipeline)(model, AnalysisManager(PassContext(config=calib))).model
    before = to_proto(quantized)
    result = b.run(quantized, "lower-ort-int8")
    after = to_proto(result.model)
    head = next(n for n in result.model.graph if n.name == "lm_head")
    read = {name for n in after.graph.node for name in n.input} | {o.name for o in after.graph.output}
    assert all(any(o in read for o in n.output) for n in after.graph.node)  # nothing left that no one reads
    tables = [i for i in after.graph.initializer if list(i.dims) == [64, 16]]
    assert len(tables) == 1 and tables[0].data_type == TensorProto.INT8  # still one (int8) table in the file
    if pair_limit:
        assert annotation(head, "ort_lowering")["kernel"] == "u8s8"
        assert result.statistics["matmul-u8s8"] == 8 and result.statistics["matmul-u8u8"] == 0
        assert _optimized_ops(after, tmp_path).count("MatMulIntegerToFloat") == 8
    else:
        assert annotation(head, "ort_lowering") is None and result.statistics["matmul-u8s8"] == 0
    for seed in (0, 1):
        feeds = qm.llama_feeds(seed, batch=2, seq=9)
        want = _session(before, optimize=False).run(None, feeds)[0]
        got = _session(after, optimize=True).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------------- left alone


@pytest.mark.parametrize("name", models.BUILDERS)
def test_float_models_are_untouched(name):
    model = models.to_ir(getattr(models, name)())
    text = print_ir(model)
    result = b.run(model, "lower-ort-int8{kernel=u8u8}")
    assert not result.modified
    assert print_ir(result.model) == text
    assert result.remarks == []  # nothing to lower is not a miss


def _edit(proto: onnx.ModelProto, fn) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    fn(out)
    return out


def _assert_untouched(proto: onnx.ModelProto) -> None:
    """The (valid) model goes through lower-ort-int8 unchanged."""
    onnx.checker.check_model(proto)
    model = models.to_ir(proto)
    text = print_ir(model)
    result = b.run(model, "lower-ort-int8{kernel=u8u8}")
    assert not result.modified and print_ir(result.model) == text


def test_blocked_weight_dequantize_is_untouched():
    def block(model):
        w = next(t for t in model.graph.initializer if t.name == "w")
        arr = numpy_helper.to_array(w)
        s = (np.random.default_rng(0).random((16 // 8, 8)) * 0.01 + 0.001).astype(np.float32)
        for i, t in enumerate(model.graph.initializer):
            if t.name == "s":
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(s, "s"))
            if t.name == "z":
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.zeros((2, 8), np.int8), "z"))
        del arr
        dq = model.graph.node[0]
        del dq.attribute[:]
        dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", 8)])

    proto = _edit(weight_only_model(), block)
    _assert_untouched(proto)


def test_table_scaled_per_column_is_untouched():
    """DequantizeLinear's default axis is 1: per-column scales, which gathering rows cannot select."""
    def per_column(model):
        for i, t in enumerate(model.graph.initializer):
            if t.name == "E":
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ones((8, 8), np.int8), "E"))
        dq = model.graph.node[0]
        del dq.attribute[:]
        keep = [n for n in model.graph.node if n.name not in ("lm_head_T", "lm_head", "act")]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        model.graph.output[0].name = "h"
        model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 8

    proto = _edit(tied_embedding_model(per_row=True), per_column)
    for i, t in enumerate(proto.graph.initializer):  # 8 rows of 8: per-row and per-column scales both fit
        if t.name in ("E_s", "E_z"):
            arr = numpy_helper.to_array(t)[:8]
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    _assert_untouched(proto)


def test_quantized_activation_that_is_also_a_graph_output_is_untouched():
    def expose(model):
        model.graph.output.append(helper.make_tensor_value_info("x_q", TensorProto.INT8, [2, 3, 16]))

    model = models.to_ir(_edit(qdq_mlp(), expose))
    result = b.run(model, "lower-ort-int8{kernel=u8u8}")
    # q/k read the exposed pair: left int8; o's own pair is lowered.
    assert result.statistics["matmul-u8u8"] == 1
    assert result.model.graph.initializers["q_w"].const_value.dtype == DataType.INT8
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [(
        "missed", "1 of 3 8-bit Q/DQ MatMul/Gemm ops lowered to integer kernels: "
        "a quantized activation that other ops also read (2)", False,
    )]


def test_dequantized_activation_matmul_without_quantized_weight_is_untouched():
    """Attention-score style MatMul(DQ(x), y): no constant weight, nothing to lower."""
    def drop_weight_dq(model):
        for node in model.graph.node:
            if node.name == "o_proj":
                node.input[1] = "k_out"
        keep = [n for n in model.graph.node if n.name != "o_WDQ"]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        keep_i = [t for t in model.graph.initializer if not t.name.startswith("o_")]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep_i)
        model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 8

    proto = _edit(qdq_mlp(), drop_weight_dq)
    model = models.to_ir(proto)
    result = b.run(model, "lower-ort-int8{kernel=u8u8 dequantize-at-load=false}")
    assert result.statistics["matmul-u8u8"] == 2  # q and k; o reads two activations
    o = next(n for n in result.model.graph if n.name == "o_proj")
    assert annotation(o, "ort_lowering") is None


def test_weight_scaled_per_input_channel_is_not_an_integer_matmul():
    """Scales along K (axis 0 of a MatMul weight): no onnxruntime integer kernel takes them; the weight is
    dequantized at load instead and the activation pair stays as written."""
    def per_input_channel(model):
        for node in model.graph.node:
            if node.name == "o_WDQ":
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("axis", 0))

    before = _edit(qdq_mlp(), per_input_channel)  # o_w is [8, 8]: K == N, so the scales fit either axis
    result, after = _lower(before, "kernel=u8u8")
    assert result.statistics["matmul-u8u8"] == 2 and result.statistics["dequantized-at-load"] == 1
    o = next(n for n in result.model.graph if n.name == "o_proj")
    assert annotation(o, "ort_lowering") is None
    feeds = _feeds([2, 3, 16], scale=2.0)
    want = _reference(before, feeds)
    np.testing.assert_allclose(_session(after, optimize=True).run(None, feeds)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------- pipeline and backend


def test_pipeline_text_and_registration():
    assert get_pass("lower-ort-int8") is lowering.LowerOrtInt8
    for text in ("lower-ort-int8", "lower-ort-int8{kernel=u8s8}", "lower-ort-int8{kernel=keep dequantize-at-load=false gather=false}"):
        assert parse_pipeline(text).pipeline_text() == text


def test_an_explicit_choice_survives_the_backends_auto_run():
    model = models.to_ir(qdq_mlp())
    result = b.run(model, "lower-ort-int8{kernel=u8s8},lower-ort-int8")
    assert result.model.graph.initializers["q_w"].const_value.dtype == DataType.INT8
    assert model_metadata(result.model, "ort_lowering")["kernel"] == "u8s8"
    again = b.run(result.model, "lower-ort-int8")
    assert not again.modified


def test_ort_backend_legalizes_with_the_pass(tmp_path):
    from optc.backends import get_backend
    from optc.driver import CompileOptions, compile_model

    assert "lower-ort-int8" in get_backend("ort").legalize
    before = qdq_mlp()
    out = tmp_path / "lowered.onnx"
    result = compile_model(models.to_ir(before), out, CompileOptions(passes="dce"))
    lowered = onnx.load(str(out))
    assert any("onnxruntime" in c for c in result.artifact.checks)
    meta = {p.key: p.value for p in lowered.metadata_props}
    if lowering.host_kernel()[0] != "keep":
        assert "optc.ort_lowering" in meta
    feeds = _feeds([2, 3, 16], scale=2.0)
    np.testing.assert_allclose(_session(lowered, optimize=True).run(None, feeds)[0], _reference(before, feeds),
                               rtol=1e-5, atol=1e-5)
