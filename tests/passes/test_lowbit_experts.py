"""Weight-only low-bit passes on mixture-of-experts models: the stacked expert weights are quantized too.

The tiny mixtral and qwen3_moe (random weights, tests/architectures/configs.py) export their experts as
transformers' `batched_mm` form: a 3-D weight `[E, N, K]` gathered per token into a batched MatMul.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from optc.ir import annotation, check_onnx, constant_array, load_model, save_model, verify
from optc.ir.annotations import QUANTIZATION
from optc.passes import AnalysisManager, PassContext, parse_pipeline
from optc.passes.linear_layers import experts
from tests.architectures import configs

CALIB = {"calibration.spec": "random", "calibration.samples": 8, "calibration.seqlen": 32}
MOE = ("mixtral", "qwen3_moe")
#: rtn's default excludes plus the experts: the dense-only 4-bit model the experts are compared with.
DENSE_ONLY = "exclude='lm_head,*.gate.weight,embed_out,classifier,mlp.experts'"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe")
    done: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTC_CACHE_DIR", str(folder / "cache"))
        mp.delenv("OPTC_NO_CACHE", raising=False)

        def get(family: str) -> Path:
            if family not in done:
                from optc.frontends.transformers import load_transformers

                _, directory = configs.save(family, folder / family)
                done[family] = folder / f"{family}.onnx"
                save_model(load_transformers(directory), done[family])
            return done[family]

        yield get


def _compile(path: Path, pipeline: str):
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    result = parse_pipeline(pipeline)(load_model(path), am)
    verify(result.model)
    check_onnx(result.model)
    return result, am.context.remarks


def _cosine(reference: Path, model) -> float:
    from optc.runtime.ort import open_session

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        names = [v.name for v in load_model(reference).graph.inputs]
        values = []
        for shape in (dict(batch=2, seq=9), dict(batch=1, seq=5, seed=1)):
            feeds = configs.feeds("causal-lm", names, **shape)
            outs = []
            for p in (reference, path):
                session = open_session(p)
                wanted = {i.name for i in session.get_inputs()}
                outs.append(session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0].ravel().astype(np.float64))
            a, b = outs
            values.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return min(values)


def _quantized_experts(model) -> list:
    """The GatherNDs annotated `quant` whose weight is a 3-D integer initializer read by a DequantizeLinear."""
    found = []
    for node in model.graph:
        info = annotation(node, QUANTIZATION)
        if node.op_type != "GatherND" or info is None:
            continue
        dq = node.inputs[0].producer()
        assert dq is not None and dq.op_type == "DequantizeLinear"
        codes = constant_array(dq.inputs[0])
        assert codes.ndim == 3 and codes.dtype.name in ("int4", "uint4", "int8", "uint8")
        found.append((node, info, dq))
    return found


@pytest.mark.parametrize("family", MOE)
def test_rtn_quantizes_every_expert_and_costs_what_dense_4bit_costs(family, exported):
    path = exported(family)
    float_experts = [e for e in (experts(n) for n in load_model(path).graph) if e is not None]
    assert len(float_experts) == 4  # gate_up and down in each of the two layers
    result, remarks = _compile(path, "rtn")
    found = _quantized_experts(result.model)
    assert len(found) == 4
    for _, info, dq in found:
        assert info["bits"] == 4 and info["symmetric"] and info["method"] == "rtn"
        k = constant_array(dq.inputs[0]).shape[2]  # K < 128: one block per row (per channel)
        assert info["group"] == -1 and dq.attributes["axis"].as_int() == 2 and dq.attributes["block_size"].as_int() == k
    assert result.statistics["quantized-experts"] == 4
    assert any(r.kind == "passed" and "4 stacked mixture-of-experts weights" in r.message for r in remarks)
    dense_only, _ = _compile(path, f"rtn{{{DENSE_ONLY}}}")
    assert not _quantized_experts(dense_only.model)
    with_experts, without = _cosine(path, result.model), _cosine(path, dense_only.model)
    print(f"{family}: rtn cosine {with_experts:.5f}, experts float {without:.5f}")
    # The experts are 4-bit like the dense layers: their share of the error is a fraction of the dense layers'.
    assert 1 - with_experts < 1.5 * (1 - without)


@pytest.mark.parametrize("family", MOE)
def test_expert_codes_match_per_expert_rtn(family, exported):
    """Each expert's codes are those rtn gives that expert's matrix alone (asymmetric, group 16)."""
    import torch

    from optc.passes.lowbit import Grid, rtn

    path = exported(family)
    weights = {e.weight.name: e.enk() for e in (experts(n) for n in load_model(path).graph) if e is not None}
    result, _ = _compile(path, "rtn{symmetric=false group=16}")
    for _, info, dq in _quantized_experts(result.model):
        assert info["group"] == 16 and not info["symmetric"]
        source = next(name for name in weights if dq.inputs[0].name.startswith(name))
        codes = constant_array(dq.inputs[0]).astype(np.int32)
        for e, matrix in enumerate(weights[source]):
            q, _, _ = rtn(torch.from_numpy(matrix), 16, Grid(4, False), clip=True)
            np.testing.assert_array_equal(codes[e], q.numpy().astype(np.int32))


def test_expert_quantization_is_deterministic(exported):
    path = exported("mixtral")
    outputs = []
    for _ in range(2):
        result, _ = _compile(path, "rtn")
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "model.onnx"
            save_model(result.model, out)
            outputs.append(b"".join(p.read_bytes() for p in sorted(Path(folder).iterdir())))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("pipeline", ["gptq", "awq"])
def test_calibrated_passes_round_the_experts_and_say_so(pipeline, exported):
    path = exported("qwen3_moe")
    result, remarks = _compile(path, pipeline)
    found = _quantized_experts(result.model)
    assert len(found) == 4 and result.statistics["quantized-experts"] == 4
    for _, info, _ in found:
        assert info["method"] == "rtn" and info["precision_reason"].startswith(f"not by {pipeline}:")
    missed = [r for r in remarks if r.kind == "missed" and "mixture-of-experts" in r.message]
    assert len(missed) == 1 and "4 stacked mixture-of-experts weights rounded to nearest" in missed[0].message
    # the dense layers are still the pass's own
    dense = [annotation(n, QUANTIZATION) for n in result.model.graph if n.op_type == "MatMul"]
    assert any(info is not None and info["method"] == pipeline for info in dense)


def _right_operand_experts(experts_count: int = 3, k: int = 32, n: int = 8):
    """x [T, 1, K] · GatherND(W [E, K, N], idx [T, 1]) → [T, 1, N]: the experts as the MatMul's right operand."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((experts_count, k, n)).astype(np.float32), "experts_w")
    nodes = [helper.make_node("GatherND", ["experts_w", "idx"], ["picked"], batch_dims=0),
             helper.make_node("MatMul", ["x", "picked"], ["y"])]
    graph = helper.make_graph(
        nodes, "experts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, k]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, ["T", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 1, n])], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_experts_as_right_operand_are_quantized_along_axis_1():
    from tests.fixtures import models

    proto = _right_operand_experts()
    result = parse_pipeline("rtn{group=16 symmetric=false}")(models.to_ir(proto), AnalysisManager(PassContext()))
    verify(result.model)
    check_onnx(result.model)
    [(_, info, dq)] = _quantized_experts(result.model)
    assert info["weight_axis"] == 1 and dq.attributes["axis"].as_int() == 1
    assert constant_array(dq.inputs[0]).shape == (3, 32, 8) and constant_array(dq.inputs[1]).shape == (3, 2, 8)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((6, 1, 32)).astype(np.float32), "idx": np.array([[0], [2], [1], [2], [0], [1]])}
    got = models.run_ort(result.model, feeds)[0]
    # the reference: each expert's [N, K] matrix fake-quantized alone by the same rtn, then the routed product
    import torch

    from optc.passes.lowbit import Grid, fake_quantize

    w = constant_array(models.to_ir(proto).graph.initializers["experts_w"])
    dequantized = np.stack([fake_quantize(torch.from_numpy(w[e].T.copy()), 16, Grid(4, False), clip=True).numpy().T
                            for e in range(w.shape[0])])
    expected = np.einsum("tik,tkn->tin", feeds["x"], dequantized[feeds["idx"][:, 0]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
