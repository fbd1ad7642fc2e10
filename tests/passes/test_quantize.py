"""quantize: Q/DQ structure, formats, options, calibration errors and error bounds vs onnxruntime.

Error bounds: SQNR (dB) of the model output against the float model in
onnxruntime, the minimum over 4 random inputs that calibration (16 random
samples of 32 tokens) did not see; measured values in brackets, the bounds
leave 2-4 dB of margin:

| pipeline                        | llama block | BERT block | conv→gemm |
|---------------------------------|-------------|------------|-----------|
| weight-only int8 per-channel    | ≥ 34 [37.2] | ≥ 30 [33.7]| ≥ 32 [35.3]|
| W8A8 int8, minmax               | ≥ 20 [23.5] | ≥ 13 [16.4]| ≥ 25 [28.8]|
| W8A8 int8, mse                  | ≥ 25 [28.7] | ≥ 18 [21.1]|            |
| smoothquant + W8A8 minmax       |             | ≥ 24 [27.6]|            |
| int16 activations everywhere    | weight-only − 1 dB      |            |
| FP8 E4M3 weights + activations  | ≥ 18 [21.2] | ≥ 15 [18.6]|            |

The tiny blocks have 16 channels and planted outlier channels (the llama
block ×4 in the first norm here, the BERT block ×10 in the first LayerNorm),
so they lose more than a real model does.
"""

from __future__ import annotations

import numpy as np
import pytest

from optc.errors import OptcError, PassFailure, UsageError
from optc.ir import DataType, annotation, check_onnx, constant_array, print_ir, verify
from optc.passes import AnalysisManager, PassContext, VerifyEach, get_pass, parse_pipeline
from optc.passes.layer_selector import OUTPUT_HEAD
from tests.fixtures import models
from tests.fixtures import quant_models as qm
from tests.fixtures import text_models as tm
from tests.passes import builders as b

CALIB = {"calibration.spec": "random", "calibration.samples": 16, "calibration.seqlen": 32}
FEED_SEEDS = (5, 6, 7, 8)


def _am(**config):
    return AnalysisManager(PassContext(config={**CALIB, **config}, instruments=[VerifyEach()]))


def _run(model, pipeline):
    result = parse_pipeline(pipeline)(model, _am())
    verify(result.model)
    check_onnx(result.model)
    return result


def _ops(model, op_type):
    return [n for n in model.graph if n.op_type == op_type]


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def _llama(**kwargs):
    proto = qm.llama_block(**{"outliers": 4.0, **kwargs})
    return proto, qm.to_ir(proto, vocab=64)


def _sqnr_llama(proto, model, seeds=FEED_SEEDS):
    values = []
    for seed in seeds:
        feeds = qm.llama_feeds(seed, batch=2, seq=10)
        values.append(qm.sqnr_db(models.run_ort(proto, feeds)[0], models.run_ort(model, feeds)[0]))
    return min(values)


def _sqnr_float(proto, model, seeds=FEED_SEEDS):
    values = []
    for seed in seeds:
        feeds = qm.float_feeds(proto, seed)
        values.append(qm.sqnr_db(models.run_ort(proto, feeds)[0], models.run_ort(model, feeds)[0]))
    return min(values)


# --------------------------------------------------------------------------- structure


def test_weight_only_int8_structure():
    proto, model = _llama()
    result = _run(model, "quantize{activations=none}")
    graph = result.model.graph
    assert result.statistics["quantized-ops"] == 7 and result.statistics["activation-qdq"] == 0
    assert not _ops(result.model, "QuantizeLinear")  # weights are quantized at compile time
    dqs = _ops(result.model, "DequantizeLinear")
    assert len(dqs) == 7
    for dq in dqs:
        q, scale, zero = dq.inputs
        assert q.dtype == DataType.INT8 and zero.dtype == DataType.INT8
        assert dq.attributes["axis"].as_int() == 1  # MatMul B [K, N]: per output channel
        assert scale.shape[0] == q.shape[1] and np.all(constant_array(scale) > 0)
        assert not np.any(constant_array(zero))
        assert np.abs(constant_array(q)).max() == 127  # the largest weight of a channel maps to 127
    # The float weights are gone; the tied embedding stays float for the Gather and the excluded lm_head.
    assert "model.layers.0.mlp.down_proj.weight" not in graph.initializers
    assert "model.layers.0.mlp.down_proj.weight_quantized" in graph.initializers
    assert "model.embed_tokens.weight" in graph.initializers
    assert _sqnr_llama(proto, result.model) >= 34


def test_w8a8_structure_and_annotations():
    proto, model = _llama()
    result = _run(model, "quantize")
    m = result.model
    qs = _ops(m, "QuantizeLinear")
    # One Q/DQ per activation tensor: q/k/v share the norm output, gate/up share the other, plus o and down inputs.
    assert sorted(q.inputs[0].name for q in qs) == ["attn", "gated", "input_layernorm_out", "post_attention_layernorm_out"]
    for q in qs:
        assert q.inputs[2].dtype == DataType.INT8 and int(constant_array(q.inputs[2])) == 0
        assert float(constant_array(q.inputs[1])) > 0 and q.inputs[1].shape == ()  # per tensor
        assert annotation(q, "provenance") == "quantize"
    q_proj = _node(m, "q_proj")
    assert q_proj.inputs[0] is _node(m, "k_proj").inputs[0] is _node(m, "v_proj").inputs[0]
    assert q_proj.inputs[0].producer().op_type == "DequantizeLinear"
    info = annotation(q_proj, "quant")
    assert info["weights"] == "int8" and info["activations"] == "int8"
    assert info["weight_axis"] == 1 and info["weight_scheme"] == "per-channel symmetric"
    assert info["weight_source"] == "model.layers.0.self_attn.q_proj.weight"
    assert info["activation_scheme"] == "per-tensor static symmetric"
    assert info["scale_source"] == "calibration:minmax"
    assert info["activation_scale"] == pytest.approx(info["activation_threshold"] / 127)
    # Attention matmuls (two activations) and the lm_head (excluded by default) stay float.
    for name in ("scores", "attn_values", "lm_head"):
        assert annotation(_node(m, name), "quant") is None
        assert all(v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in _node(m, name).inputs)
    assert annotation(_node(m, "lm_head"), "quant_skipped").startswith("excluded")
    assert result.statistics["excluded-ops"] == 1
    assert _sqnr_llama(proto, m) >= 20


def test_gemm_and_conv_axes():
    proto = qm.conv_gemm()
    model = qm.to_ir(proto)
    result = _run(model, "quantize")
    conv, fc = _node(result.model, "conv"), _node(result.model, "fc")
    assert conv.inputs[1].producer().attributes["axis"].as_int() == 0  # W [M, C, kh, kw]
    assert fc.inputs[1].producer().attributes["axis"].as_int() == 0  # Gemm transB=1: B [N, K]
    assert constant_array(fc.inputs[1].producer().inputs[1]).shape == (5,)
    # Biases stay float: no int32 bias quantization.
    assert conv.inputs[2].dtype == DataType.FLOAT and fc.inputs[2].dtype == DataType.FLOAT
    assert _sqnr_float(proto, result.model) >= 25
    weight_only = _run(qm.to_ir(proto), "quantize{activations=none}")
    assert _sqnr_float(proto, weight_only.model) >= 32


def test_gemm_without_transpose_uses_axis_1():
    model = tm.text_model(
        """
g (float[2,3] x) => (float[2,2] y) <float[3,2] w = {1, -2, 0.5, 3, -1, 0.25}>
{
  y = Gemm(x, w)
}
"""
    )
    before = b.snapshot(model)
    result = _run(model, "quantize")
    dq = _node(result.model, "w_DequantizeLinear")
    assert dq.attributes["axis"].as_int() == 1
    b.assert_same_outputs(before, result.model, atol=0.2)


def test_bert_block():
    proto = qm.bert_block()
    model = qm.to_ir(proto)
    result = _run(model, "quantize")
    assert result.statistics["quantized-ops"] == 6 and result.statistics["activation-qdq"] == 4
    assert _node(result.model, "scores").inputs[0].producer().op_type == "Add"  # untouched
    assert _sqnr_float(proto, result.model) >= 13
    assert _sqnr_float(proto, _run(qm.to_ir(proto), "quantize{activations=none}").model) >= 30
    assert _sqnr_float(proto, _run(qm.to_ir(proto), "quantize{calib=mse}").model) >= 18
    # The outlier channels of the first LayerNorm are what hurts; SmoothQuant moves them into the weights.
    smoothed = _sqnr_float(proto, _run(qm.to_ir(proto), "smoothquant,quantize").model)
    assert smoothed >= 24 and smoothed >= _sqnr_float(proto, result.model) + 5


# --------------------------------------------------------------------------- options


def test_int16_for_chosen_activations():
    proto, model = _llama()
    result = _run(model, "quantize{int16=down_proj}")
    down = _node(result.model, "down_proj")
    q = down.inputs[0].producer().inputs[0].producer()
    assert q.op_type == "QuantizeLinear" and q.inputs[2].dtype == DataType.INT16
    info = annotation(down, "quant")
    assert info["activations"] == "int16" and info["weights"] == "int8"
    assert info["activation_scale"] == pytest.approx(info["activation_threshold"] / 32767)
    assert info["scale_source"] == "calibration:minmax"
    mse = _run(_llama()[1], "quantize{int16=down_proj calib=percentile}")
    assert annotation(_node(mse.model, "down_proj"), "quant")["activation_threshold"] == info["activation_absmax"]
    assert result.statistics["int16-activations"] == 1
    # int16 on every activation is close to weight-only.
    _, everywhere = _llama()
    r16 = _run(everywhere, "quantize{int16=*}")
    _, wonly = _llama()
    rw = _run(wonly, "quantize{activations=none}")
    assert _sqnr_llama(proto, r16.model) >= _sqnr_llama(proto, rw.model) - 1.0


def _expected_sqnrs(model, fmt="int8", calib="mse"):
    """Per activation, the expected SQNR the histogram gives (what min-sqnr compares)."""
    from optc.passes.analyses.activation_histograms import ActivationHistograms
    from optc.passes.analyses.activation_stats import default_values

    hists = _am().get(ActivationHistograms, model, values=tuple(default_values(model)), bins=2048)
    weighted = {n.inputs[0].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    return {name: h.sqnr_db(h.threshold(calib, fmt=fmt), fmt) for name, h in hists.items() if name in weighted}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_min_sqnr_raises_the_precision_of_the_measured_worst_activation(fmt):
    proto, model = _llama()
    sqnrs = sorted(_expected_sqnrs(model, fmt).items(), key=lambda kv: kv[1])
    (worst, worst_db), (_, next_db) = sqnrs[0], sqnrs[1]
    # int8: the planted outliers make one activation clearly worst; FP8's relative grid
    # costs every tensor about the same (~31.6 dB), outliers or not.
    assert next_db > worst_db + (0.5 if fmt == "int8" else 0.01), sqnrs
    limit = round((worst_db + next_db) / 2, 3)
    spec = f"weights={fmt} activations={fmt} " if fmt == "fp8" else ""
    originals = {n.name: n.inputs[0].name for n in model.graph if n.op_type == "MatMul"}
    result = _run(model, f"quantize{{{spec}calib=mse min-sqnr={limit}}}")
    promoted = [n for n in result.model.graph if (annotation(n, "quant") or {}).get("precision_reason")]
    assert promoted, "nothing promoted"
    for node in promoted:
        info = annotation(node, "quant")
        assert info["precision_reason"].startswith(f"{fmt} SQNR") and f"min-sqnr={limit:g}" in info["precision_reason"]
        assert info["activations"] == ("int16" if fmt == "int8" else "float")
    # Exactly the readers of the worst activation, and the plain run scores lower.
    assert {originals[n.name] for n in promoted} == {worst}
    assert result.statistics["sensitive-activations"] == 1
    plain = _run(_llama()[1], f"quantize{{{spec}calib=mse}}")
    assert _sqnr_llama(proto, result.model) > _sqnr_llama(proto, plain.model)


def test_calib_ops_choose_the_range_method_per_activation():
    """calib-ops=PATTERN:METHOD: the activation read by a matching op takes METHOD's range (the annotation says
    which), every other activation keeps `calib`'s; min-sqnr measures each at the range it will get."""
    _, model = _llama()
    result = _run(model, "quantize{calib=minmax percentile=99 calib-ops=q_proj:mse,down:percentile}")
    info = {n.name: annotation(n, "quant") for n in result.model.graph if annotation(n, "quant")}
    # q/k/v share one input: q_proj's entry decides it for all three readers.
    assert {info[k]["scale_source"] for k in ("q_proj", "k_proj", "v_proj")} == {"calibration:mse"}
    assert info["down_proj"]["scale_source"] == "calibration:percentile@99.0"
    assert info["o_proj"]["scale_source"] == info["gate_proj"]["scale_source"] == "calibration:minmax"
    assert info["o_proj"]["activation_threshold"] == info["o_proj"]["activation_absmax"]
    plain = {n.name: annotation(n, "quant") for n in _run(_llama()[1], "quantize{calib=mse}").model.graph if annotation(n, "quant")}
    assert info["q_proj"]["activation_threshold"] == plain["q_proj"]["activation_threshold"] < info["q_proj"]["activation_absmax"]


def test_percentile_needs_enough_values_beyond_the_cut():
    """calib=percentile with fewer than 10 calibration values beyond the cut (the percentile of the sample
    would be its maximum) takes mse ranges, with a remark and a count; with enough, the percentile's."""
    hist_count = _run(_llama()[1], "quantize{calib=percentile percentile=99}").model
    enough = {n.name: annotation(n, "quant") for n in hist_count.graph if annotation(n, "quant")}
    assert {i["scale_source"] for i in enough.values()} == {"calibration:percentile@99.0"}
    result = _run(_llama()[1], "quantize{calib=percentile percentile=99.999}")
    info = {n.name: annotation(n, "quant") for n in result.model.graph if annotation(n, "quant")}
    assert {i["scale_source"] for i in info.values()} == {"calibration:mse"}
    assert result.statistics["percentile-fallbacks"] == result.statistics["activation-qdq"]
    assert any(r.kind == "analysis" and "take mse ranges instead" in r.message for r in result.remarks)
    mse = {n.name: annotation(n, "quant") for n in _run(_llama()[1], "quantize{calib=mse}").model.graph if annotation(n, "quant")}
    assert all(info[k]["activation_threshold"] == mse[k]["activation_threshold"] for k in info)
    # Asymmetric ranges have no mse: they keep the percentile (there the sample's maximum).
    asym = _run(_llama()[1], "quantize{calib=percentile percentile=99.999 symmetric=false}")
    assert "percentile-fallbacks" not in asym.statistics


def test_weight_pair_limit_makes_every_integer_weight_u8s8_safe():
    """weight-pair-limit=128: integer MatMul weights (pairs along K = axis 0) and the table a tied integer lm_head
    reads (pairs along its rows) stay within the limit; weight-only ops keep their plain codes."""
    from optc.passes.int8_pairs import pair_sums_within

    proto, model = _llama()
    result = _run(model, 'quantize{weight-pair-limit=128 embeddings=true exclude="" weight-only=o_proj}')
    plain = _run(_llama()[1], 'quantize{embeddings=true exclude="" weight-only=o_proj}')
    checked = 0
    for node in _ops(result.model, "MatMul"):
        info = annotation(node, "quant")
        if not info or info.get("weights") != "int8":
            continue
        dq = node.inputs[1].producer()
        if info["activations"] == "float":  # o_proj: no integer kernel, no limit
            assert "weight_pair_limit" not in info
            twin = next(n for n in _ops(plain.model, "MatMul") if n.name == node.name).inputs[1].producer()
            np.testing.assert_array_equal(constant_array(dq.inputs[0]), constant_array(twin.inputs[0]))
            continue
        assert info["weight_pair_limit"] == 128
        if dq.op_type == "Transpose":  # the tied lm_head reads the table [vocab, hidden]: K runs along its rows
            assert pair_sums_within(constant_array(dq.inputs[0].producer().inputs[0]), 1)
        else:
            assert pair_sums_within(constant_array(dq.inputs[0]), 0)
        checked += 1
    assert checked == 7  # q, k, v, gate, up, down and the lm_head
    # Only the channels that need it get a wider scale: the output stays within 1 dB of the plain quantization.
    assert _sqnr_llama(proto, result.model) > _sqnr_llama(proto, plain.model) - 1.0


def test_seven_bit_weights():
    _, model = _llama()
    result = _run(model, "quantize{weight-bits=7 embeddings=true}")
    info = annotation(_node(result.model, "q_proj"), "quant")
    assert info["weight_bits"] == 7
    weights = [constant_array(n.inputs[0]) for n in _ops(result.model, "DequantizeLinear") if n.inputs[0].const_value is not None]
    matmul_weights = [w for w in weights if w.dtype == np.int8 and w.ndim == 2]
    assert matmul_weights and max(int(np.abs(w).max()) for w in matmul_weights) == 127  # the table keeps 8 bits
    for node in _ops(result.model, "MatMul"):
        producer = node.inputs[1].producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            assert int(np.abs(constant_array(producer.inputs[0])).max()) <= 63


def test_exclude_and_weight_only():
    _, model = _llama()
    result = _run(model, "quantize{exclude=lm_head,o_proj weight-only=mlp.}")
    m = result.model
    assert annotation(_node(m, "o_proj"), "quant") is None
    for name in ("gate_proj", "up_proj", "down_proj"):
        info = annotation(_node(m, name), "quant")
        assert info["weights"] == "int8" and info["activations"] == "float"
    assert annotation(_node(m, "q_proj"), "quant")["activations"] == "int8"


def test_glob_patterns():
    _, model = _llama()
    result = _run(model, "quantize{exclude=*.self_attn.*}")
    assert result.statistics["quantized-ops"] == 4  # o/q/k/v excluded; lm_head is not matched by the glob
    assert annotation(_node(result.model, "lm_head"), "quant")["weight_path"] == "transpose"


def test_tied_lm_head_through_transpose():
    proto, model = _llama()
    result = _run(model, 'quantize{exclude=""}')
    lm_head = _node(result.model, "lm_head")
    info = annotation(lm_head, "quant")
    assert info["weight_path"] == "transpose" and info["weight_axis"] == 0  # vocab rows of the [V, H] table
    transpose = lm_head.inputs[1].producer()
    assert transpose.inputs[0].producer().op_type == "DequantizeLinear"
    # The Gather still reads the float table.
    assert _node(result.model, "embed_tokens").inputs[0].name == "model.embed_tokens.weight"


def test_embeddings_share_one_int8_table_with_the_tied_lm_head():
    proto, model = _llama()
    result = _run(model, "quantize{embeddings=true}")
    graph = result.model.graph
    assert "model.embed_tokens.weight" not in graph.initializers
    gather = _node(result.model, "embed_tokens")
    dq = gather.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].as_int() == 0
    assert _node(result.model, "lm_head_transpose").inputs[0] is gather.inputs[0]
    assert annotation(gather, "quant")["weight_scheme"] == "per-row symmetric"
    assert result.statistics["quantized-tables"] == 1
    assert annotation(_node(result.model, "lm_head"), "quant_skipped").endswith("the int8 embedding table it is tied to")
    assert _sqnr_llama(proto, result.model) >= 20


@pytest.mark.parametrize("calib", ["minmax", "percentile", "mse", "entropy"])
def test_range_methods(calib):
    proto, model = _llama()
    extra = " percentile=99.9" if calib == "percentile" else ""  # 99.99 needs 100,000 values: these are fewer
    result = _run(model, f"quantize{{calib={calib}{extra}}}")
    info = annotation(_node(result.model, "down_proj"), "quant")
    assert info["scale_source"].startswith(f"calibration:{calib}")
    assert 0 < info["activation_threshold"] <= info["activation_absmax"]
    if calib == "minmax":
        assert info["activation_threshold"] == info["activation_absmax"]
    assert _sqnr_llama(proto, result.model) >= {"minmax": 20, "percentile": 20, "mse": 25, "entropy": 12}[calib]


def test_asymmetric_activations():
    proto = qm.bert_block()
    model = qm.to_ir(proto)
    result = _run(model, "quantize{symmetric=false}")
    q = _ops(result.model, "QuantizeLinear")[0]
    assert q.inputs[2].dtype == DataType.UINT8
    assert annotation(_node(result.model, "fc2_mm"), "quant")["activation_scheme"] == "per-tensor static asymmetric"
    assert _sqnr_float(proto, result.model) >= 10


def test_fp8():
    proto, model = _llama()
    result = _run(model, "quantize{weights=fp8 activations=fp8}")
    for node in _ops(result.model, "QuantizeLinear") + _ops(result.model, "DequantizeLinear"):
        assert node.inputs[2].dtype == DataType.FLOAT8E4M3FN
    info = annotation(_node(result.model, "q_proj"), "quant")
    assert info["weights"] == info["activations"] == "fp8"
    assert info["activation_scale"] == pytest.approx(info["activation_threshold"] / 448)
    assert _sqnr_llama(proto, result.model) >= 18
    bert = qm.bert_block()
    r = _run(qm.to_ir(bert), "quantize{weights=fp8 activations=fp8}")
    assert _sqnr_float(bert, r.model) >= 15


def test_fp8_leaves_convs_without_a_tensorrt_fp8_kernel_float():
    """The CNN's RGB stem (3 input channels) stays float in FP8; the 16-channel Convs are quantized."""
    from tests.fixtures.cnn_models import small_cnn

    result = _run(qm.to_ir(small_cnn()), "quantize{weights=fp8 activations=fp8}")
    stem = _node(result.model, "stem.conv")
    assert stem.inputs[1].producer() is None and annotation(stem, "quant") is None
    assert "no FP8 kernel" in annotation(stem, "quant_skipped") and "3 input channels" in annotation(stem, "quant_skipped")
    assert result.statistics["excluded-ops"] == 1
    assert annotation(_node(result.model, "block.conv1"), "quant")["weights"] == "fp8"
    forced = _run(qm.to_ir(small_cnn()), "quantize{weights=fp8 activations=fp8 fp8-unsupported-convs=true}")
    assert annotation(_node(forced.model, "stem.conv"), "quant")["weights"] == "fp8"
    int8 = _run(qm.to_ir(small_cnn()), "quantize")  # the rule is FP8's
    assert annotation(_node(int8.model, "stem.conv"), "quant")["weights"] == "int8"


def test_activation_only():
    proto, model = _llama()
    result = _run(model, "quantize{weights=none}")
    assert annotation(_node(result.model, "q_proj"), "quant")["weights"] == "float"
    assert len(_ops(result.model, "QuantizeLinear")) == 4
    assert "model.layers.0.self_attn.q_proj.weight" in result.model.graph.initializers


def test_option_validation():
    for text, message in [
        ("quantize{weights=none activations=none}", "quantizes nothing"),
        ("quantize{percentile=0}", "percentile"),
        ("quantize{symmetric=false activations=fp8}", "symmetric"),
        ("quantize{symmetric=false calib=mse}", "minmax or percentile"),
        ("quantize{bins=100}", "power of two"),
        ("quantize{weights=int4}", "weights"),
        ("quantize{calib=kl}", "calib"),
        ("quantize{weight-bits=9}", "weight-bits"),
        ("quantize{weights=fp8 weight-bits=7}", "weight-bits"),
        ("quantize{weight-pair-limit=300}", "weight-pair-limit"),
        ("quantize{weights=fp8 weight-pair-limit=128}", "weight-pair-limit"),
        ("quantize{fp8-unsupported-convs=true}", "applies to FP8"),
        ("quantize{calib-ops=lm_head}", "PATTERN:METHOD"),
        ("quantize{calib-ops=lm_head:kl}", "PATTERN:METHOD"),
        ("quantize{symmetric=false calib-ops=lm_head:mse}", "minmax or percentile"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_pipeline(text)
    text = "quantize{weights=fp8 activations=fp8 calib=mse int16=down_proj}"
    assert parse_pipeline(text).pipeline_text() == text
    default = ",".join(OUTPUT_HEAD)  # the registry's keep_float patterns
    assert parse_pipeline(f"quantize{{exclude={default}}}").pipeline_text() == "quantize"


# --------------------------------------------------------------------------- behaviour


def test_without_calibration_data_it_stops_and_names_the_pass():
    _, model = _llama()
    with pytest.raises(PassFailure) as info:
        parse_pipeline("quantize{activations=int8}")(model, AnalysisManager())
    message = str(info.value)
    assert message.startswith("pass 'quantize' failed: quantize{activations=int8} needs calibration data")
    assert "--calib" in message
    # Standalone (no pass manager) the error names the pass too.
    with pytest.raises(OptcError, match=r"^quantize\{activations=int8\} needs calibration data"):
        get_pass("quantize")()(qm.to_ir(qm.llama_block()), AnalysisManager())


def test_weight_only_needs_no_calibration():
    _, model = _llama()
    result = get_pass("quantize")(activations="none")(model, AnalysisManager())
    assert result.statistics["quantized-ops"] == 7


def test_deterministic():
    texts = []
    for _ in range(2):
        _, model = _llama()
        texts.append(print_ir(_run(model, "smoothquant,quantize{calib=mse int16=down_proj}").model))
    assert texts[0] == texts[1]


def test_second_run_adds_nothing():
    _, model = _llama()
    first = _run(model, "quantize")
    text = print_ir(first.model)
    again = _run(first.model, "quantize")
    assert again.statistics.get("quantized-ops", 0) == 0
    assert print_ir(again.model) == text


def test_nothing_to_quantize():
    model = tm.random_dag(1)
    result = get_pass("quantize")()(model, AnalysisManager())
    assert not result.modified


def test_preserves_nothing():
    _, model = _llama()
    result = _run(model, "quantize")
    assert result.effective_preserved() is not None
    assert not result.effective_preserved().all_preserved()
    from optc.passes.analyses.activation_histograms import ActivationHistograms

    assert not result.effective_preserved().is_preserved(ActivationHistograms)


def test_nothing_to_quantize_is_a_remark_and_already_quantized_is_not_a_miss():
    from onnx import TensorProto, helper

    no_weights = models.make_model(
        [helper.make_node("Relu", ["X"], ["Y"], name="relu")],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
    )
    result = _run(models.to_ir(no_weights), "quantize")
    assert not result.modified
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [
        ("missed", "nothing to quantize: no MatMul/Gemm/Conv with a constant float weight", True),
    ]
    result = parse_pipeline("rtn{exclude=\"\"},quantize{activations=none}")(models.to_ir(models.mlp()), _am())
    assert [(r.pass_name, r.kind, r.message) for r in result.remarks] == [
        ("quantize", "analysis", "nothing left to quantize: MatMul/Gemm/Conv ops already quantized: 2"),
    ]


@pytest.mark.parametrize(("shape", "axis", "pair_limit"), [((300, 70), 0, 0), ((70, 300), 1, 0), ((300, 70), 0, 100),
                                                          ((4, 50, 6), 1, 0)])
def test_quantizing_a_slice_of_channels_at_a_time_is_exact(shape, axis, pair_limit, monkeypatch):
    from optc.passes.transforms import quantize

    weight = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    weight[(slice(None),) * axis + (3,)] = 0  # a channel of zeros keeps scale 1
    fmt = quantize.FORMATS["int8"]
    pair_axis = 1 - axis if pair_limit else None
    codes, scale = quantize.quantize_per_channel(weight, axis, fmt, pair_axis=pair_axis, pair_limit=pair_limit)
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 1000)  # a few channels per slice, the last one short
    sliced_codes, sliced_scale = quantize.quantize_per_channel(weight, axis, fmt, pair_axis=pair_axis, pair_limit=pair_limit)
    assert np.array_equal(codes, sliced_codes) and np.array_equal(scale, sliced_scale)
    assert scale.dtype == np.float32 and scale.shape == (shape[axis],) and scale[3] == 1.0
