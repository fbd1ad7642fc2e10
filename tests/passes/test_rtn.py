"""rtn and the shared low-bit numerics: grids, groups, the IR form (INT4 + blocked DequantizeLinear), options.

SQNR bounds (dB, model output vs float in onnxruntime, min over 2 unseen inputs; measured in brackets) on the
64-channel llama block: W8 per-channel ≥ 38 [42.2], W4 g32 ≥ 18 [21.9], W4 g128 (per channel here) ≥ 15 [17.8],
W3 ≥ 9 [12.3], W2 g32 ≥ 2 [5.3].
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from optc.errors import UsageError
from optc.ir import DataType, annotation, constant_array, from_proto, to_proto
from optc.passes import parse_pipeline
from optc.passes.lowbit import Grid, dequantize, expand, find_params, group_size, rtn
from tests.fixtures import models
from tests.fixtures import quant_models as qm
from tests.passes import lowbit_helpers as h

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_on_the_grid_and_rounding_is_nearest(bits, symmetric):
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(bits))
    grid = Grid(bits, symmetric)
    q, scale, zero = rtn(w, 32, grid)  # K=48, g=32: a full group and a partial one
    assert scale.shape == zero.shape == (24, 2)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax and torch.equal(q, q.round())
    s, z = expand(scale, 48, 32), expand(zero, 48, 32)
    err = (dequantize(q, s, z) - w).abs()
    assert torch.all(err <= s / 2 + 1e-6)  # min-max: nothing is clipped, every weight rounds to its nearest level
    if symmetric:
        assert torch.all(zero == 0)
    assert (scale > 0).all()


def test_partial_last_group_uses_only_its_own_columns():
    w = torch.zeros(2, 40)
    w[:, 32:] = 0.01  # the partial group (8 columns) has tiny weights
    w[:, :32] = 5.0
    scale, _ = find_params(w, 32, Grid(4))
    assert scale[0, 1] == pytest.approx(0.01 / 7)


def test_clip_search_lowers_the_weight_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    grid = Grid(3)
    errs = {}
    for clip in (False, True):
        q, scale, zero = rtn(w, 64, grid, clip=clip)
        errs[clip] = float((dequantize(q, expand(scale, 256, 64), expand(zero, 256, 64)) - w).square().sum())
    assert errs[True] < 0.8 * errs[False]


def _weighted_error(w, scale, zero, grid, group, importance, norm):
    k = w.shape[1]
    deq = dequantize(torch.clamp(torch.round(w / expand(scale, k, group)) + expand(zero, k, group), grid.qmin, grid.qmax),
                     expand(scale, k, group), expand(zero, k, group))
    return float(((deq - w).abs().pow(norm) * importance).sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_minimizes_its_own_weighted_objective(symmetric):
    """With importance and norm the search picks, per group, the ratio with the least Σ importance·|w − q|^norm,
    so its objective is no worse than that of the unweighted squared-error choice, and lower on heavy tails."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g) ** 3
    importance = torch.exp(2 * torch.randn(128, generator=g))
    grid = Grid(3, symmetric)
    plain = find_params(w, 32, grid, clip=True)
    for norm in (2.0, 2.4):
        weighted = find_params(w, 32, grid, clip=True, importance=importance, norm=norm)
        ours = _weighted_error(w, *weighted, grid, 32, importance, norm)
        theirs = _weighted_error(w, *plain, grid, 32, importance, norm)
        assert ours <= theirs * (1 + 1e-6)
    weighted = find_params(w, 32, grid, clip=True, importance=importance)
    assert _weighted_error(w, *weighted, grid, 32, importance, 2.0) < 0.97 * _weighted_error(w, *plain, grid, 32, importance, 2.0)


def _output_error(w, scale, zero, grid, group, xtx):
    k = w.shape[1]
    deq = dequantize(torch.clamp(torch.round(w / expand(scale, k, group)) + expand(zero, k, group), grid.qmin, grid.qmax),
                     expand(scale, k, group), expand(zero, k, group))
    delta = deq - w
    return float(((delta @ xtx) * delta).sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_on_the_output_error(symmetric):
    """With `hessian` (XᵀX) the search minimizes each group's Δwᵀ·H_gg·Δw: on correlated inputs that is a lower
    output error than the diagonal weighting gives, and exactly the diagonal weighting when H is diagonal."""
    g = torch.Generator().manual_seed(5)
    k, group = 96, 32  # three groups
    w = torch.randn(24, k, generator=g) ** 3
    mix = torch.eye(k) + 0.6 * torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(400, k, generator=g) @ mix * torch.exp(torch.randn(k, generator=g))
    xtx = x.T @ x
    grid = Grid(3, symmetric)
    full = find_params(w, group, grid, clip=True, hessian=xtx)
    diagonal = find_params(w, group, grid, clip=True, importance=torch.diagonal(xtx))
    ours, theirs = _output_error(w, *full, grid, group, xtx), _output_error(w, *diagonal, grid, group, xtx)
    assert ours < theirs  # measured 0.8% lower (symmetric grid)
    # Each group's choice is the best ratio on that group's own block (cross-group terms are not searched).
    for i in range(k // group):
        cols = slice(i * group, (i + 1) * group)
        block = torch.zeros_like(xtx)
        block[cols, cols] = xtx[cols, cols]
        assert _output_error(w, *full, grid, group, block) <= _output_error(w, *diagonal, grid, group, block) * (1 + 1e-6)
    d = torch.diagonal(xtx)
    same = find_params(w, group, grid, clip=True, hessian=torch.diag(d))
    assert torch.equal(same[0], diagonal[0]) and torch.equal(same[1], diagonal[1])


def test_clip_search_on_the_output_error_of_a_partial_group():
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(6))
    xtx = torch.eye(40)
    scale, zero = find_params(w, 32, Grid(4, False), clip=True, hessian=xtx)  # groups of 32 and 8 columns
    plain = find_params(w, 32, Grid(4, False), clip=True)
    assert torch.equal(scale, plain[0]) and torch.equal(zero, plain[1])


def test_clip_importance_of_ones_is_the_plain_search():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) ** 3
    a = find_params(w, 32, Grid(4), clip=True)
    b = find_params(w, 32, Grid(4), clip=True, importance=torch.ones(64))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(("group", "importance", "norm"), [(32, False, 2.0), (32, True, 2.4), (-1, False, 2.0)])
def test_clip_search_in_row_chunks_equals_one_pass(monkeypatch, group, importance, norm):
    """The search works on chunks of rows (in cache); each group's choice, and so every bit, is the same."""
    import optc.passes.lowbit as lowbit

    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 100, generator=g) ** 3  # 100 = 3 groups of 32 and a padded one
    weights = torch.rand(100, generator=g) if importance else None
    whole = find_params(w, group, Grid(4, symmetric=False), clip=True, importance=weights, norm=norm)
    monkeypatch.setattr(lowbit, "_CHUNK", 300)  # a few rows at a time, the last chunk shorter
    chunked = find_params(w, group, Grid(4, symmetric=False), clip=True, importance=weights, norm=norm)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    searched_rows = lowbit._CHUNK // (128 if group == 32 else 100)
    assert 1 <= searched_rows < w.shape[0]


def test_per_channel_is_one_group():
    assert group_size(-1, 100) == group_size(0, 100) == group_size(128, 100) == 100
    w = torch.randn(4, 100)
    assert find_params(w, -1, Grid(8))[0].shape == (4, 1)


# --------------------------------------------------------------------------- the pass and its IR form


def test_ir_form_on_a_llama_block():
    proto, model = h.llama()
    result = h.run(model, "rtn{group=32}")
    m = result.model
    assert result.statistics["quantized-ops"] == 7
    for name in LINEARS:
        mm = h.node(m, name)
        dq = mm.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear"
        assert dq.attributes["axis"].as_int() == 0 and dq.attributes["block_size"].as_int() == 32
        weight, scale = dq.inputs[0], dq.inputs[1]
        assert weight.dtype == DataType.INT4 and len(dq.inputs) == 2  # symmetric: no zero point
        k, n = weight.shape
        assert tuple(scale.shape) == (k // 32, n) and scale.dtype == DataType.FLOAT
        info = annotation(mm, "quant")
        assert info["weights"] == "int4" and info["bits"] == 4 and info["group"] == 32
        assert info["symmetric"] is True and info["method"] == "rtn" and info["activations"] == "float"
    assert not any(v.dtype == DataType.FLOAT and v.name.endswith("q_proj.weight") for v in m.graph.initializers.values())
    assert h.sqnr_llama(proto, m) >= 18  # measured 21.9


def test_int4_packs_two_per_byte_in_the_file(tmp_path):
    _, model = h.llama()
    m = h.run(model, "rtn{group=32}").model
    proto = to_proto(m)
    sizes = {t.name: len(t.raw_data) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    assert sizes and all(size == np.prod(constant_array(m.graph.initializers[n]).shape) // 2 for n, size in sizes.items())


@pytest.mark.parametrize(("pipeline", "dtype", "bound"), [
    ("rtn{bits=8 group=-1}", DataType.INT8, 38),  # measured 42.2
    ("rtn{bits=3 group=64}", DataType.INT4, 9),  # measured 12.3
    ("rtn{bits=2 group=32}", DataType.INT4, 2),  # measured 5.3
    ("rtn{bits=6 group=32}", DataType.INT8, 28),
])
def test_bits_and_groups(pipeline, dtype, bound):
    proto, model = h.llama()
    m = h.run(model, pipeline).model
    info = annotation(h.node(m, "q_proj"), "quant")
    dq = h.node(m, "q_proj").inputs[1].producer()
    assert dq.inputs[0].dtype == dtype
    codes = constant_array(dq.inputs[0]).astype(np.int32)
    grid = Grid(info["bits"], True)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    if info["group"] == -1:
        assert dq.attributes["axis"].as_int() == 1 and "block_size" not in dq.attributes
        assert tuple(dq.inputs[1].shape) == (codes.shape[1],)
    assert h.sqnr_llama(proto, m) >= bound


def test_more_bits_less_error():
    proto, _ = h.llama()
    values = [h.sqnr_llama(proto, h.run(h.llama()[1], f"rtn{{bits={b} group=32}}").model) for b in (2, 3, 4, 8)]
    assert values == sorted(values)


def test_asymmetric_has_uint4_and_zero_points():
    proto, model = h.llama()
    m = h.run(model, "rtn{symmetric=false group=32}").model
    dq = h.node(m, "gate_proj").inputs[1].producer()
    assert dq.inputs[0].dtype == DataType.UINT4 and dq.inputs[2].dtype == DataType.UINT4
    assert dq.inputs[2].shape == dq.inputs[1].shape
    assert annotation(h.node(m, "gate_proj"), "quant")["symmetric"] is False
    assert h.sqnr_llama(proto, m) >= 18


def test_exclude_leaves_ops_float_with_a_reason():
    _, model = h.llama()
    result = h.run(model, "rtn{exclude=down_proj}")
    down = h.node(result.model, "down_proj")
    assert down.inputs[1].producer() is None and "excluded" in annotation(down, "quant_skipped")
    assert result.statistics == {"quantized-ops": 6, "excluded-ops": 1}
    # the tied lm_head reads a Transpose of the embedding table: never quantized
    assert annotation(h.node(result.model, "lm_head"), "quant") is None


def test_bert_block_and_gemm():
    proto, model = h.bert(post_ln=True)
    m = h.run(model, "rtn{group=32}").model
    assert len([n for n in m.graph if annotation(n, "quant")]) == 6
    assert h.sqnr_float(proto, m) >= 15
    proto = qm.conv_gemm()
    m = h.run(qm.to_ir(proto), "rtn{group=16 bits=8}").model
    fc = h.node(m, "fc")
    dq = fc.inputs[1].producer()
    # Gemm(transB=1): B is [N, K], blocks along K = axis 1
    assert dq.attributes["axis"].as_int() == 1 and dq.attributes["block_size"].as_int() == 16
    assert h.node(m, "conv").inputs[1].producer() is None  # Conv is not weight-only low-bit
    assert h.sqnr_float(proto, m) >= 30


def test_opset_is_raised_to_21_and_the_model_loads():
    proto = qm.llama_block(hidden=32, ffn=64)
    proto.opset_import[0].version = 18
    model = from_proto(proto)
    m = h.run(model, "rtn{group=16}").model
    assert m.opset_imports[""] == 21
    models.run_ort(m, qm.llama_feeds(1))


def test_deterministic():
    a = to_proto(h.run(h.llama()[1], "rtn{group=32}").model).SerializeToString()
    b = to_proto(h.run(h.llama()[1], "rtn{group=32}").model).SerializeToString()
    assert a == b


def test_nothing_to_quantize_is_unchanged():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("x", "y")]
    result = parse_pipeline("rtn")(from_proto(models.make_model(nodes, io[:1], io[1:])), h.am())
    assert not result.modified and result.statistics["quantized-ops"] == 0


@pytest.mark.parametrize(("text", "message"), [
    ("rtn{bits=9}", "bits"), ("rtn{bits=1}", "bits"), ("rtn{group=48}", "group"), ("rtn{group=1}", "group"),
])
def test_option_validation(text, message):
    with pytest.raises(UsageError, match=message):
        parse_pipeline(text)


def test_named_pipelines():
    from optc.passes import all_pipelines
    from optc.passes.pipelines import W4A16, W4A16_FAST

    pipelines = all_pipelines()
    assert pipelines["w4a16"].text == W4A16 and pipelines["w4a16-fast"].text == W4A16_FAST
    proto, model = h.bert()
    m = h.run(model, "w4a16-fast").model
    info = annotation(h.node(m, "fc1_mm"), "quant")
    assert info["method"] == "rtn" and info["symmetric"] is False and info["bits"] == 4
    assert h.sqnr_float(proto, m) >= 12  # K = 64 < 128: one group per channel


def test_a_gemm_it_cannot_take_and_no_linear_layer_are_remarks():
    from onnx import TensorProto, helper

    from optc.passes import AnalysisManager, PassContext, RemarkError

    gemm = models.make_model(
        [helper.make_node("Gemm", ["X", "W"], ["Y"], name="scaled", alpha=0.5)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
        [models.weight("W", (8, 4), np.random.default_rng(0))],
    )
    result = parse_pipeline("rtn")(from_proto(gemm))
    assert not result.modified
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [
        ("missed", "0 of 1 linear layers quantizable: Gemm with alpha != 1", True),
    ]
    relu = models.make_model(
        [helper.make_node("Relu", ["X"], ["Y"], name="relu")],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
    )
    with pytest.raises(RemarkError, match="rtn: nothing to quantize: no MatMul/Gemm with a constant float 2-D weight"):
        parse_pipeline("rtn")(from_proto(relu), AnalysisManager(PassContext(strict=True)))
    assert parse_pipeline("rtn")(from_proto(models.mlp()), AnalysisManager(PassContext(strict=True))).modified
