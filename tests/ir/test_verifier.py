"""The verifier catches deliberately broken graphs and passes valid ones."""

from __future__ import annotations

import importlib

import onnx
import pytest
from onnx import helper

import optc.ir as oi
from optc.errors import VerificationError
from tests.fixtures import models


def _nodes(model) -> dict[str, oi.Node]:
    return {n.name: n for n in model.graph}


def _only_problem(model, *fragments: str) -> str:
    found = oi.problems(model)
    assert len(found) == 1, found
    for fragment in fragments:
        assert fragment in found[0], found
    with pytest.raises(VerificationError) as info:
        oi.verify(model, where="after pass 'x'")
    assert info.value.problems == found
    assert "after pass 'x'" in str(info.value)
    return found[0]


def test_valid_models_verify_clean(any_model_proto):
    model = models.to_ir(any_model_proto)
    assert oi.problems(model) == []
    oi.verify(model)
    oi.check_onnx(model)


def test_use_before_def():
    proto = models.mlp()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([nodes[1], nodes[0], *nodes[2:]])  # add1 before mm1
    _only_problem(oi.from_proto(proto), "add1", "'h0'", "before its producer mm1", "topological")


def test_use_before_def_after_moving_a_node(mlp):
    graph = mlp.graph
    relu = _nodes(mlp)["relu"]
    graph.remove(relu)
    graph.append(relu)  # now after mm2, which reads its output
    _only_problem(mlp, "mm2", "'h2'", "before its producer relu")


def test_undefined_input():
    proto = models.mlp()
    proto.graph.node[2].input[0] = "ghost"
    _only_problem(oi.from_proto(proto), "relu", "'ghost'", "not defined")


def test_value_from_another_graph(mlp):
    stranger = oi.make_value("stranger", oi.DataType.FLOAT, [2, 16])
    _nodes(mlp)["relu"].replace_input_with(0, stranger)
    _only_problem(mlp, "relu", "'stranger'", "not defined")


def test_duplicate_value_name(mlp):
    _nodes(mlp)["relu"].outputs[0].name = "h0"
    _only_problem(mlp, "'h0'", "defined twice")


def test_duplicate_name_between_input_and_initializer(mlp):
    mlp.graph.initializers["B1"].name = "X"
    found = oi.problems(mlp)
    assert any("'X'" in p and "defined twice" in p for p in found), found


def test_unknown_op(mlp):
    _nodes(mlp)["relu"].op_type = "Frobnicate"
    _only_problem(mlp, "relu", "unknown op 'Frobnicate'", "opset 21")


def test_custom_domain_op_is_not_checked(mlp):
    relu = _nodes(mlp)["relu"]
    relu.domain = "com.example"
    relu.op_type = "Frobnicate"
    mlp.opset_imports["com.example"] = 1
    assert oi.problems(mlp) == []


def test_wrong_input_count(mlp):
    relu = _nodes(mlp)["relu"]
    relu.resize_inputs(2)
    relu.replace_input_with(1, relu.inputs[0])
    _only_problem(mlp, "relu", "Relu takes 1..1 inputs, has 2")


def test_too_few_inputs(mlp):
    mm = _nodes(mlp)["mm1"]
    mm.resize_inputs(1)
    _only_problem(mlp, "mm1", "MatMul takes 2..2 inputs, has 1")


def test_trailing_missing_optional_inputs_are_fine():
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [4])
    clip = helper.make_node("Clip", ["X", "", ""], ["Y"], name="clip")
    model = oi.from_proto(models.make_model([clip], [x], [y]))
    assert oi.problems(model) == []


def test_wrong_output_count(mlp):
    relu = _nodes(mlp)["relu"]
    extra = oi.make_node("Split", [relu.outputs[0]], num_outputs=1, attributes={"num_outputs": 1}, name="split")
    mlp.graph.insert_after(relu, extra)
    assert oi.problems(mlp) == []  # Split with one output is fine
    bad = oi.make_node("Relu", [relu.outputs[0]], num_outputs=2, name="relu2")
    mlp.graph.insert_after(relu, bad)
    _only_problem(mlp, "relu2", "has 1..1 outputs, has 2")


def test_missing_required_attribute(mlp):
    cast = oi.make_node("Cast", [mlp.graph.outputs[0]], name="cast")
    mlp.graph.append(cast)
    _only_problem(mlp, "cast", "needs attribute 'to'")


def test_unknown_attribute(mlp):
    cast = oi.make_node("Relu", [mlp.graph.outputs[0]], name="relu_x", attributes={"alpha": 0.5})
    mlp.graph.append(cast)
    _only_problem(mlp, "relu_x", "no attribute 'alpha'")


def test_initializer_dtype_mismatch(mlp):
    mlp.graph.initializers["B1"].dtype = oi.DataType.INT64
    _only_problem(mlp, "'B1'", "typed INT64 but holds FLOAT")


def test_initializer_shape_mismatch(mlp):
    mlp.graph.initializers["B1"].shape = oi.Shape([3])
    _only_problem(mlp, "'B1'", "shape [16]", "declared [3]")


def test_initializer_rank_mismatch(mlp):
    mlp.graph.initializers["W1"].shape = oi.Shape([8, 16, 1])
    _only_problem(mlp, "'W1'", "shape [8, 16]")


def test_initializer_symbolic_dims_match_anything(mlp):
    mlp.graph.initializers["W1"].shape = oi.Shape(["n", 16])
    assert oi.problems(mlp) == []


def test_initializer_without_data(mlp):
    mlp.graph.initializers["B1"].const_value = None
    found = oi.problems(mlp)
    assert any("'B1' has no data" in p for p in found), found


def test_graph_output_not_produced(mlp):
    mlp.graph.outputs.append(oi.make_value("nowhere", oi.DataType.FLOAT))
    _only_problem(mlp, "graph output 1", "'nowhere'", "not produced")


def test_graph_output_without_name(mlp):
    mlp.graph.outputs[0].name = ""
    found = oi.problems(mlp)
    assert "graph output 0 has no name" in found, found


def test_missing_default_opset(mlp):
    del mlp.opset_imports[""]
    assert "graph imports no default ONNX opset" in oi.problems(mlp)


def test_problem_inside_subgraph(if_ir):
    branch = next(iter(if_ir.graph))
    then_graph = branch.attributes["then_branch"].value
    next(iter(then_graph)).op_type = "Frobnicate"
    _only_problem(if_ir, "then_mm", "unknown op 'Frobnicate'")


def test_subgraph_reading_later_outer_value_is_caught(if_ir):
    # The branch reads X, W and B from the outer scope; a value defined after the If is not visible.
    graph = if_ir.graph
    branch = next(iter(graph))
    late = oi.make_node("Relu", [graph.inputs[1]], name="late")
    graph.append(late)
    else_sub = next(iter(branch.attributes["else_branch"].value))
    else_sub.replace_input_with(1, late.outputs[0])
    found = oi.problems(if_ir)
    assert any("else_sub" in p for p in found), found


def test_many_problems_are_summarized(mlp):
    for node in mlp.graph:
        node.op_type = "Nope"
    with pytest.raises(VerificationError) as info:
        oi.verify(mlp)
    assert len(info.value.problems) == 5
    mlp.graph.outputs.append(oi.make_value("a"))
    mlp.graph.outputs.append(oi.make_value("b"))
    with pytest.raises(VerificationError) as info:
        oi.verify(mlp)
    assert len(info.value.problems) == 7
    assert str(info.value).endswith("(+2 more)")


def test_check_onnx_rejects_what_onnx_rejects(mlp):
    _nodes(mlp)["relu"].op_type = "Frobnicate"
    with pytest.raises(VerificationError, match="onnx.checker"):
        oi.check_onnx(mlp)


def test_check_onnx_does_not_need_external_files(tmp_path):
    proto = models.mlp(features=32, hidden=64)
    onnx.save_model(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    model = oi.load_model(tmp_path / "m.onnx")
    oi.check_onnx(model)
    oi.verify(model)


def test_an_opset_that_does_not_exist(mlp):
    mlp.opset_imports[""] = 99
    found = oi.problems(mlp)
    assert any("opset import 'ai.onnx' version 99 does not exist" in p for p in found), found


def test_an_opset_below_one(mlp):
    mlp.opset_imports["com.example"] = 0
    assert any("'com.example' has version 0" in p for p in oi.problems(mlp))


def test_a_custom_domain_without_an_opset_import(mlp):
    relu = _nodes(mlp)["relu"]
    relu.domain = "com.example"
    relu.op_type = "Frobnicate"
    _only_problem(mlp, "relu", "domain 'com.example'", "not imported")


# --------------------------------------------------------------------------- the annotation schema


def test_wrong_typed_annotation_is_a_problem_naming_node_and_key(mlp):
    node = next(iter(mlp.graph))
    oi.annotate(node, "quant", "int8")  # a string where the schema wants a dict
    problem = _only_problem(mlp, f"node {oi.node_label(node)}", "'optc.quant'", "must be dict, not str")
    assert problem.count("\n") == 0


def test_quantization_annotation_fields_are_typed(mlp):
    node = next(iter(mlp.graph))
    oi.annotate(node, "quant", {"op": node.op_type, "bits": "4"})
    _only_problem(mlp, "'optc.quant'", "field 'bits' must be int, not str")
    oi.annotate(node, "quant", {"bits": 4})
    _only_problem(mlp, "'optc.quant'", "lacks field 'op'")
    oi.annotate(node, "quant", {"op": node.op_type, "bits": True})  # a bool is not an int
    _only_problem(mlp, "field 'bits' must be int, not bool")


def test_unknown_optc_key_and_bad_json_are_problems(mlp):
    weight = mlp.graph.initializers["W1"]
    oi.annotate(weight, "quant_sceme", "sym")
    _only_problem(mlp, "value 'W1'", "unknown annotation key 'optc.quant_sceme'")
    oi.annotate(weight, "quant_sceme", None)
    weight.metadata_props["optc.source_name"] = "{not json"
    _only_problem(mlp, "value 'W1'", "'optc.source_name' is not JSON")


def test_model_metadata_and_list_items_are_checked(mlp):
    oi.set_model_metadata(mlp, "tensorrt_lowering", ["ok", 3])
    _only_problem(mlp, "model: annotation 'optc.tensorrt_lowering'", "item 1 must be str, not int")


def test_foreign_keys_and_well_typed_annotations_verify(mlp):
    ann = importlib.import_module("optc.ir.annotations")  # `optc.ir.annotations` the attribute is a function
    node = next(iter(mlp.graph))
    node.metadata_props["pkg.note"] = "not optc's: not checked"
    oi.annotate(node, ann.QUANTIZATION, {"op": node.op_type, "weights": "int8", "activations": "float", "weight_axis": None})
    oi.annotate(node, ann.PROVENANCE, "quantize")
    oi.annotate(mlp.graph.initializers["W1"], ann.SPARSITY, {"pattern": "2:4", "axis": 0})
    oi.set_model_metadata(mlp, ann.HF_CONFIG, {"model_type": "llama"})
    assert oi.problems(mlp) == []


def test_a_plugin_declares_its_own_key(mlp, monkeypatch):
    ann = importlib.import_module("optc.ir.annotations")  # `optc.ir.annotations` the attribute is a function
    monkeypatch.setitem(ann.SCHEMA, "example_note", ann.AnnotationSpec(str))
    oi.annotate(next(iter(mlp.graph)), "example_note", "fine")
    assert oi.problems(mlp) == []
    with pytest.raises(ValueError, match="already declared"):
        ann.register_annotation("example_note", ann.AnnotationSpec(int))
