"""lower-ort-nbits: MatMulNBits packing is exact for every grid, block and form; the backend runs it."""

from __future__ import annotations

import numpy as np
import pytest

from optc.backends.ort import OrtBackend
from optc.backends.ort.lower_ort_nbits import METADATA
from optc.ir import annotation, model_metadata, to_proto
from tests.fixtures import models
from tests.fixtures import quant_models as qm
from tests.passes import lowbit_helpers as h

FEEDS = qm.llama_feeds(5, batch=2, seq=10)


def _quantized(pipeline: str, hidden: int = 64):
    proto = qm.llama_block(hidden=hidden, ffn=2 * hidden, outliers=4.0)
    return h.run(qm.to_ir(proto, vocab=64), pipeline).model


def _copy(model):
    return qm.to_ir(to_proto(model))


@pytest.mark.parametrize("pipeline", [
    "rtn{group=32}", "rtn{symmetric=false group=32}", "rtn{bits=3 group=16}", "rtn{bits=8 group=-1}",
    "rtn{bits=8 symmetric=false group=-1}", "rtn{bits=2 group=64}", "rtn{symmetric=false group=-1}",
])
def test_matmulnbits_is_exact(pipeline):
    quantized = _quantized(pipeline)
    lowered = h.run(_copy(quantized), "lower-ort-nbits{bits8=true}").model
    nbits = h.ops(lowered, "MatMulNBits")
    assert len(nbits) == 7 and not h.ops(lowered, "DequantizeLinear")
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert h.outputs_equal(quantized, lowered, FEEDS) == 0.0


def test_partial_last_block_is_exact():
    quantized = _quantized("rtn{group=32 symmetric=false}", hidden=48)  # K = 48: one block of 32 and one of 16
    lowered = h.run(_copy(quantized), "lower-ort-nbits").model
    q = next(n for n in lowered.graph if n.op_type == "MatMulNBits" and n.outputs[0].name == "q")
    assert q.attributes["K"].as_int() == 48 and q.attributes["block_size"].as_int() == 32
    assert tuple(q.inputs[1].shape) == (48, 2, 16)  # [N, blocks, block/2 bytes]
    assert h.outputs_equal(quantized, lowered, FEEDS) == 0.0


def test_annotations_and_names_move_to_the_new_node():
    quantized = _quantized("rtn{group=32}")
    lowered = h.run(_copy(quantized), "lower-ort-nbits").model
    node = next(n for n in lowered.graph if n.outputs[0].name == "down")
    assert node.op_type == "MatMulNBits"
    assert annotation(node, "quant")["method"] == "rtn"
    assert annotation(node, "ort_lowering")["runs_as"] == "com.microsoft.MatMulNBits"
    assert lowered.opset_imports["com.microsoft"] == 1


def test_dequantize_at_load_is_exact():
    quantized = _quantized("rtn{symmetric=false group=32}")
    lowered = h.run(_copy(quantized), "lower-ort-nbits{form=dequantize-at-load}").model
    assert not h.ops(lowered, "DequantizeLinear") and h.ops(lowered, "Cast")
    assert h.outputs_equal(quantized, lowered, FEEDS) == 0.0


def test_accuracy_level_4_is_close():
    quantized = _quantized("rtn{group=32}")
    lowered = h.run(_copy(quantized), "lower-ort-nbits{accuracy-level=4}").model
    ref = models.run_ort(quantized, FEEDS)[0]
    out = models.run_ort(lowered, FEEDS)[0]
    assert qm.sqnr_db(ref, out) > 25


def test_a_kv_cache_decoder_gets_int8_compute_and_its_8_bit_weights_too():
    """The default follows what the model runs for: a decoder with a cache decodes, where level 4 is faster."""
    from optc.ir import DataType, make_value

    quantized = _quantized("rtn{bits=8 group=-1}")
    plain = h.run(_copy(quantized), "lower-ort-nbits").model
    assert not h.ops(plain, "MatMulNBits")  # 8-bit weights stay for lower-ort-int8 (folded to float at load)
    decoder = _copy(quantized)
    decoder.graph.inputs.append(make_value("past_key_values.0.key", DataType.FLOAT, [1, 2, "past", 16]))
    lowered = h.run(decoder, "lower-ort-nbits").model
    nbits = h.ops(lowered, "MatMulNBits")
    assert len(nbits) == 7 and {n.attributes["accuracy_level"].as_int() for n in nbits} == {4}
    assert model_metadata(lowered, METADATA)["accuracy_level"] == 4
    exact = _copy(quantized)
    exact.graph.inputs.append(make_value("past_key_values.0.key", DataType.FLOAT, [1, 2, "past", 16]))
    kept = h.run(exact, "lower-ort-nbits{accuracy-level=0}").model  # bits=8 at level 0: slower than float
    assert not h.ops(kept, "MatMulNBits")


def test_a_causal_lm_without_its_cache_computes_as_its_cache_form_does():
    """The no-cache export of a causal LM gets the cache form's level, so both forms give the same perplexity."""
    from optc.ir import set_model_metadata
    from optc.ir.annotations import HF_CONFIG

    quantized = _quantized("rtn{bits=4 group=32}")
    plain = h.run(_copy(quantized), "lower-ort-nbits").model
    assert model_metadata(plain, METADATA)["accuracy_level"] == 0  # no config: not known to generate
    causal = _copy(quantized)
    causal.graph.inputs[0].name = "input_ids"
    set_model_metadata(causal, HF_CONFIG, {"model_type": "llama"})
    lowered = h.run(causal, "lower-ort-nbits").model
    assert {n.attributes["accuracy_level"].as_int() for n in h.ops(lowered, "MatMulNBits")} == {4}
    encoder = _copy(quantized)
    encoder.graph.inputs[0].name = "input_ids"
    set_model_metadata(encoder, HF_CONFIG, {"model_type": "bert"})
    assert model_metadata(h.run(encoder, "lower-ort-nbits").model, METADATA)["accuracy_level"] == 0


def test_small_blocks_stay_as_written():
    quantized = _quantized("rtn{group=8}")
    result = h.run(_copy(quantized), "lower-ort-nbits")
    assert result.statistics["lowered"] == 0 and len(h.ops(result.model, "DequantizeLinear")) == 7


def test_an_explicit_choice_is_kept_by_the_backends_run():
    quantized = _quantized("rtn{group=32}")
    kept = h.run(_copy(quantized), "lower-ort-nbits{form=keep},lower-ort-nbits").model
    assert len(h.ops(kept, "DequantizeLinear")) == 7 and model_metadata(kept, METADATA)["form"] == "keep"
    folded = h.run(_copy(quantized), "lower-ort-nbits{form=dequantize-at-load},lower-ort-nbits").model
    assert not h.ops(folded, "MatMulNBits")


def test_backend_legalizes_low_bit_before_int8(tmp_path):
    assert OrtBackend.legalize.split(",")[-2:] == ["lower-ort-nbits", "lower-ort-int8"]
    from optc.passes import PassContext

    quantized = _quantized("rtn{bits=8 group=-1}")
    model = h.run(_copy(quantized), OrtBackend.legalize).model
    # 8-bit weights: folded to float at load by lower-ort-int8 (MatMulNBits bits=8 ran 1.35x fp32 on SmolLM2)
    assert not h.ops(model, "MatMulNBits") and not h.ops(model, "DequantizeLinear") and h.ops(model, "Cast")
    assert h.outputs_equal(quantized, model, FEEDS) < 1e-4
    artifact = OrtBackend().lower(model, tmp_path / "m.onnx", PassContext())
    assert artifact.checks and np.isfinite(models.run_ort(str(artifact.path), FEEDS)[0]).all()


def test_report_lists_weight_only_layers(tmp_path):
    import json

    from optc.api import compile as optc_compile
    from optc.ir import save_model

    source = tmp_path / "tiny.onnx"
    save_model(qm.to_ir(qm.llama_block(hidden=64, ffn=128), vocab=64), source)
    optc_compile(source, output=tmp_path / "q.onnx", passes="gptq{group=32 symmetric=true}", calib="random", calib_samples=4,
                 calib_seqlen=16, report=tmp_path / "run.json")
    layers = json.loads((tmp_path / "run.json").read_text())["quantization"]["layers"]
    assert len(layers) == 7 and {entry["weights"] for entry in layers} == {"int4"}
    assert all(entry["op_type"] == "MatMulNBits" and entry["status"] == "ok" and entry["sqnr_db"] > 15 for entry in layers)


def test_a_block_matmulnbits_cannot_take_is_a_remark():
    quantized = _quantized("rtn{group=8}")
    result = h.run(_copy(quantized), "lower-ort-nbits")
    assert not result.modified
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [(
        "missed", "0 of 7 weight-only low-bit MatMuls lowered to MatMulNBits: "
        "block_size 8 (MatMulNBits takes a power of two of at least 16)", True,
    )]
    assert h.run(qm.to_ir(qm.llama_block(), vocab=64), "lower-ort-nbits").remarks == []  # nothing to lower


def _tied_head(vocab: int = 80, hidden: int = 96):
    """ids → Gather(DQ(int8 table)) as the embedding, and logits = h·Transpose(DQ(table)): a head tied to the table."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, size=(vocab, hidden), dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, size=vocab).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["table_q", "table_scale"], ["table"], axis=0),
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["embedded", "table_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(codes, "table_q"), numpy_helper.from_array(scale, "table_scale")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return models.to_ir(proto), {"ids": rng.integers(0, vocab, size=(2, 7), dtype=np.int64)}


@pytest.mark.parametrize("level", [0, 4])
def test_head_tied_to_an_int8_table_becomes_matmulnbits(level):
    model, feeds = _tied_head()
    lowered = h.run(_copy(model), f"lower-ort-nbits{{bits8=true accuracy-level={level}}}").model
    (head,) = h.ops(lowered, "MatMulNBits")
    assert head.attributes["bits"].as_int() == 8 and head.attributes["K"].as_int() == 96
    assert head.attributes["N"].as_int() == 80 and not h.ops(lowered, "Transpose")
    assert len(h.ops(lowered, "DequantizeLinear")) == 1  # the embedding's Gather still reads the table
    difference = h.outputs_equal(model, lowered, feeds)
    if level == 0:
        assert difference == 0.0
    else:  # level 4 quantizes the activations to int8 per block: about 1% of the logits' range
        scale = float(np.abs(models.run_ort(model, feeds)[0]).max())
        assert difference <= 0.02 * scale, (difference, scale)


def _at_level(model, level: int):
    """The proto of `model` with every MatMulNBits at accuracy level `level`."""
    from onnx import helper

    proto = to_proto(model)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    return proto


@pytest.mark.parametrize("pipeline", ["rtn{bits=8 group=128}", "rtn{bits=8 symmetric=false group=64}",
                                      "rtn{bits=8 group=-1}"])
def test_level_4_takes_8_bit_weights_in_blocks_of_32(pipeline):
    """At accuracy level 4 an 8-bit weight's group is split into blocks of `bits8-block` (scales and zero
    points repeated: the same weights, as level 0 shows), so level 4's int8 activation blocks are 32 wide.
    K = 96 is not a multiple of 64 or 128: the last group's repeats are cut at K."""
    quantized = _quantized(pipeline, hidden=96)
    lowered = h.run(_copy(quantized), "lower-ort-nbits{bits8=true accuracy-level=4}").model
    nbits = h.ops(lowered, "MatMulNBits")
    assert len(nbits) == 7 and {n.attributes["block_size"].as_int() for n in nbits} == {32}
    q = next(n for n in nbits if n.outputs[0].name == "q")
    assert tuple(q.inputs[1].shape) == (96, 3, 32)  # [N, blocks, block bytes]
    assert h.outputs_equal(quantized, _at_level(lowered, 0), FEEDS) == 0.0
    kept = h.run(_copy(quantized), "lower-ort-nbits{bits8=true accuracy-level=4 bits8-block=0}").model
    group = {"rtn{bits=8 group=128}": 128, "rtn{bits=8 symmetric=false group=64}": 64}.get(pipeline, 128)
    assert {n.attributes["block_size"].as_int() for n in h.ops(kept, "MatMulNBits")} == {group}
    at_zero = h.run(_copy(quantized), "lower-ort-nbits{bits8=true accuracy-level=0}").model
    assert {n.attributes["block_size"].as_int() for n in h.ops(at_zero, "MatMulNBits")} == {group}


def test_bits8_block_is_validated():
    from optc.errors import UsageError

    with pytest.raises(UsageError, match="'bits8-block' must be 0 or a power of two"):
        h.run(_copy(_quantized("rtn{bits=8 group=-1}")), "lower-ort-nbits{bits8-block=24}")


@pytest.mark.parametrize("pipeline", ["rtn{group=32}", "rtn{symmetric=false group=32}", "rtn{bits=8 group=-1}"])
def test_packing_a_slice_of_columns_at_a_time_is_exact(pipeline, monkeypatch):
    from optc.backends.ort import lower_ort_nbits

    quantized = _quantized(pipeline)
    whole = h.run(_copy(quantized), "lower-ort-nbits{bits8=true}").model
    monkeypatch.setattr(lower_ort_nbits, "PACK_CHUNK_ELEMENTS", 100)  # a few columns per slice, one at the end short
    sliced = h.run(_copy(quantized), "lower-ort-nbits{bits8=true}").model
    packed = {v.name: v.const_value.numpy() for v in whole.graph.initializers.values()}
    assert packed.keys() == {v.name for v in sliced.graph.initializers.values()}
    assert all(np.array_equal(v.const_value.numpy(), packed[v.name]) for v in sliced.graph.initializers.values())


def test_lowered_weights_go_to_an_attached_spill_file(tmp_path):
    from optc.ir.spill import SpillFile, attach, detach, is_spilled

    quantized = _quantized("rtn{symmetric=false group=32}")
    before = set(quantized.graph.initializers)
    with SpillFile(tmp_path, "w4.onnx", min_bytes=256) as spill:
        attach(quantized, spill)
        try:
            lowered = h.run(quantized, "lower-ort-nbits").model
        finally:
            detach(quantized)
        added = [v.const_value for name, v in lowered.graph.initializers.items() if name not in before]
        assert len(h.ops(lowered, "MatMulNBits")) == 7
        assert sum(t.nbytes >= 256 for t in added) >= 14  # packed codes and scales of every layer
        assert all(is_spilled(t) for t in added if t.nbytes >= 256)  # none held in memory: they went to the file
