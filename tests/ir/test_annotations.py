"""Annotations on nodes and values, and model metadata: JSON under the `optc.` prefix."""

from __future__ import annotations

import importlib

import pytest

import optc.ir as oi

# `optc.ir.annotations` the attribute is the function; the module holds the well-known keys.
ann = importlib.import_module("optc.ir.annotations")


def test_annotate_and_read_back(mlp):
    node = next(iter(mlp.graph))
    oi.annotate(node, "quant", {"scheme": "sym", "bits": 4, "axis": None})
    assert oi.annotation(node, "quant") == {"scheme": "sym", "bits": 4, "axis": None}
    # Stored as canonical JSON (sorted keys, no spaces) under the optc. prefix.
    assert node.metadata_props["optc.quant"] == '{"axis":null,"bits":4,"scheme":"sym"}'
    assert oi.annotation(node, "optc.quant") == oi.annotation(node, "quant")


def test_default_and_removal(mlp):
    value = mlp.graph.initializers["W1"]
    assert oi.annotation(value, "quant") is None
    assert oi.annotation(value, "quant", default={}) == {}
    oi.annotate(value, "quant", [1, 2])
    oi.annotate(value, "quant", None)
    assert "optc.quant" not in value.metadata_props
    oi.annotate(value, "quant", None)  # removing twice is fine


@pytest.mark.parametrize("payload", [0, 1.5, "text", True, [1, "a", None], {"nested": {"list": [1.25]}}])
def test_json_values(mlp, payload):
    value = mlp.graph.outputs[0]
    oi.annotate(value, "x", payload)
    assert oi.annotation(value, "x") == payload


def test_annotations_lists_only_optc_keys_sorted(mlp):
    node = next(iter(mlp.graph))
    node.metadata_props["foreign"] = "kept but not listed"
    oi.annotate(node, "zeta", 1)
    oi.annotate(node, "alpha", 2)
    assert list(oi.annotations(node)) == ["alpha", "zeta"]
    assert oi.annotations(node) == {"alpha": 2, "zeta": 1}


def test_non_json_value_is_rejected(mlp):
    with pytest.raises(TypeError):
        oi.annotate(next(iter(mlp.graph)), "bad", object())


def test_source_name(mlp):
    w = mlp.graph.initializers["W1"]
    assert oi.source_name(w) == "W1"  # falls back to the IR name
    oi.set_source_name(w, "model.layers.0.mlp.gate_proj.weight")
    assert oi.source_name(w) == "model.layers.0.mlp.gate_proj.weight"
    w.name = "renamed"
    assert oi.source_name(w) == "model.layers.0.mlp.gate_proj.weight"
    assert oi.annotation(w, ann.SOURCE_NAME) == "model.layers.0.mlp.gate_proj.weight"


def test_model_metadata(mlp):
    assert oi.model_metadata(mlp, ann.ARCHITECTURE) is None
    config = {"hidden_size": 16, "num_hidden_layers": 2, "rope_theta": 10000.0}
    oi.set_model_metadata(mlp, ann.HF_CONFIG, config)
    oi.set_model_metadata(mlp, ann.ARCHITECTURE, "LlamaForCausalLM")
    assert oi.model_metadata(mlp, ann.HF_CONFIG) == config
    assert oi.model_metadata(mlp, ann.ARCHITECTURE) == "LlamaForCausalLM"
    assert oi.model_metadata(mlp, ann.TOKENIZER, "none") == "none"


def test_annotations_survive_proto_round_trip(mlp):
    node = next(iter(mlp.graph))
    oi.annotate(node, ann.PROVENANCE, "quantize")
    oi.annotate(mlp.graph.initializers["W1"], ann.GGUF_TYPE, "Q4_K")
    oi.annotate(node.outputs[0], ann.SPARSITY, {"pattern": "2:4"})
    oi.set_model_metadata(mlp, ann.ARCHITECTURE, "mlp")
    again = oi.from_proto(oi.to_proto(mlp))
    again_node = next(iter(again.graph))
    assert oi.annotation(again_node, ann.PROVENANCE) == "quantize"
    assert oi.annotation(again.graph.initializers["W1"], ann.GGUF_TYPE) == "Q4_K"
    assert oi.annotation(again_node.outputs[0], ann.SPARSITY) == {"pattern": "2:4"}
    assert oi.model_metadata(again, ann.ARCHITECTURE) == "mlp"
