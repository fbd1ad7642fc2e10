"""The text form: deterministic, parses back, carries annotations, elides big weights lazily."""

from __future__ import annotations

import onnx
import pytest

import optc.ir as oi
from tests.fixtures import models

MLP_TEXT = """\
<
   ir_version: 10,
   opset_import: ["" : 21]
>
mlp (float[2,3] X) => (float[2,2] Y)
   <float[3,2] W = {1,2,3,4,5,6}, float[2] B = {0.5,-0.5}>
{
   [mm] h = MatMul (X, W)
   [add] Y = Add (h, B)
}
"""


def test_deterministic_same_model_twice(any_model_proto):
    model = models.to_ir(any_model_proto)
    assert oi.print_ir(model) == oi.print_ir(model)


@pytest.mark.parametrize("builder", models.BUILDERS)
def test_deterministic_separately_built_models(builder):
    a = models.to_ir(getattr(models, builder)())
    b = models.to_ir(getattr(models, builder)())
    assert oi.print_ir(a) == oi.print_ir(b)


def test_different_weights_print_differently():
    assert oi.print_ir(models.to_ir(models.mlp(seed=0))) != oi.print_ir(models.to_ir(models.mlp(seed=1)))


def test_round_trip_through_text(any_model_proto):
    text = oi.print_ir(models.to_ir(any_model_proto))
    again = oi.parse_text(text)
    assert oi.problems(again) == []
    assert oi.print_ir(again) == text


def test_parsed_text_computes_the_same(any_model_proto):
    import numpy as np

    text = oi.print_ir(models.to_ir(any_model_proto))
    feeds = models.random_inputs(any_model_proto)
    for got, want in zip(
        models.run_ort(oi.parse_text(text), feeds), models.run_ort(any_model_proto, feeds), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_hand_written_text_parses():
    model = oi.parse_text(MLP_TEXT)
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    assert oi.constant_array(model.graph.initializers["B"]).tolist() == [0.5, -0.5]
    text = oi.print_ir(model)
    assert oi.print_ir(oi.parse_text(text)) == text
    assert "[mm] h = MatMul (X, W)" in text


def test_no_trailing_whitespace(any_model_proto):
    text = oi.print_ir(models.to_ir(any_model_proto))
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert all(line == line.rstrip() for line in text.splitlines())


def test_annotations_round_trip_via_comments(mlp):
    nodes = {n.name: n for n in mlp.graph}
    oi.annotate(nodes["mm1"], "quant", {"bits": 4, "scheme": "sym", "group": 128})
    oi.annotate(nodes["relu"], "provenance", "test-pass")
    oi.set_source_name(mlp.graph.initializers["W1"], "model.layers.0.mlp.up_proj.weight")
    oi.annotate(mlp.graph.inputs[0], "range", [-1.5, 2.0])
    oi.annotate(nodes["add1"].outputs[0], "note", 'spaces, = signs and "quotes"')
    oi.annotate(mlp.graph.outputs[0], "sparsity", "2:4")

    text = oi.print_ir(mlp)
    assert '# @node mm1 quant={"bits":4,"group":128,"scheme":"sym"}' in text
    assert '# @value W1 source_name="model.layers.0.mlp.up_proj.weight"' in text

    again = oi.parse_text(text)
    again_nodes = {n.name: n for n in again.graph}
    assert oi.annotations(again_nodes["mm1"]) == {"quant": {"bits": 4, "group": 128, "scheme": "sym"}}
    assert oi.annotation(again_nodes["relu"], "provenance") == "test-pass"
    assert oi.source_name(again.graph.initializers["W1"]) == "model.layers.0.mlp.up_proj.weight"
    assert oi.annotation(again.graph.inputs[0], "range") == [-1.5, 2.0]
    assert oi.annotation(again_nodes["add1"].outputs[0], "note") == 'spaces, = signs and "quotes"'
    assert oi.annotation(again.graph.outputs[0], "sparsity") == "2:4"
    assert oi.print_ir(again) == text


def test_annotations_on_unnamed_nodes(mlp):
    for node in mlp.graph:
        node.name = None
    oi.annotate(next(iter(mlp.graph)), "provenance", "x")
    text = oi.print_ir(mlp)
    assert '# @node %h0 provenance="x"' in text
    again = oi.parse_text(text)
    assert oi.annotation(next(iter(again.graph)), "provenance") == "x"


def test_model_metadata_round_trips(mlp):
    oi.set_model_metadata(mlp, "architecture", "llama")
    text = oi.print_ir(mlp)
    again = oi.parse_text(text)
    assert oi.model_metadata(again, "architecture") == "llama"
    assert oi.print_ir(again) == text


def test_annotation_naming_unknown_node_is_rejected():
    with pytest.raises(ValueError, match="unknown node 'nope'"):
        oi.parse_text(MLP_TEXT + "# @node nope quant=1\n")
    with pytest.raises(ValueError, match="unknown value 'nope'"):
        oi.parse_text(MLP_TEXT + "# @value nope quant=1\n")


def test_annotation_must_be_json():
    with pytest.raises(ValueError):
        oi.parse_text(MLP_TEXT + "# @node mm quant={bits:4\n")


def test_max_elements_elides_big_initializers(mlp):
    text = oi.print_ir(mlp, max_elements=4)
    assert "float[8,16] W1" in text and "float[8,16] W1 =" not in text
    assert "float[4] B2 = " in text  # 4 elements: kept
    full = oi.print_ir(mlp)
    assert len(text) < len(full) / 3
    assert oi.print_ir(mlp, max_elements=4) == text
    # Elision is a view: the model keeps its weights.
    assert oi.print_ir(mlp) == full


def test_max_elements_never_reads_external_data(tmp_path, monkeypatch):
    proto = models.mlp(features=32, hidden=64)
    onnx.save_model(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    model = oi.load_model(tmp_path / "m.onnx")

    def boom(self, *args, **kwargs):
        raise AssertionError("external tensor data was read")

    for method in ("_load", "numpy", "tobytes", "tofile", "__array__"):
        monkeypatch.setattr(oi.ExternalTensor, method, boom)
    text = oi.print_ir(model, max_elements=1 << 30)  # even a huge limit never inlines external weights
    assert "float[32,64] W1" in text and "W1 =" not in text
    assert "float[64] B1 = " in text


def test_annotations_inside_subgraphs_round_trip(if_ir, loop_ir):
    for model, attr in ((if_ir, "then_branch"), (loop_ir, "body")):
        control = next(iter(model.graph))
        inner = list(control.attributes[attr].value)[-1]
        oi.annotate(inner, "quant", {"bits": 8})
        oi.annotate(inner.outputs[0], "range", [0, 1])
        text = oi.print_ir(model)
        assert f'# @node {inner.name} quant={{"bits":8}}' in text
        again = oi.parse_text(text)
        again_inner = list(next(iter(again.graph)).attributes[attr].value)[-1]
        assert oi.annotation(again_inner, "quant") == {"bits": 8}
        assert oi.annotation(again_inner.outputs[0], "range") == [0, 1]
        assert oi.print_ir(again) == text
