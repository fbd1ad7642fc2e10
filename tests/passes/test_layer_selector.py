"""`optc.passes.layer_selector`: one selector and one table of default excludes for every weight pass."""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from optc.ir import annotate
from optc.passes.infra.registry import get_pass
from optc.passes.layer_selector import DEFAULT_EXCLUDES, LayerSelector, default_exclude
from tests.fixtures import models


def _linear(name: str):
    w = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), f"{name}.weight")
    node = helper.make_node("MatMul", ["x", f"{name}.weight"], ["y"], name=name)
    proto = models.make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    node = next(iter(models.to_ir(proto).graph))
    return node, node.inputs[1]


def test_exclude_says_why_and_matches_source_names():
    node, weight = _linear("proj")
    annotate(weight, "source_aliases", ["model.lm_head.weight"])
    selector = LayerSelector.of(["lm_head", "embed"])
    assert selector.why_not(node, weight) == "excluded (exclude=lm_head)"  # the patterns that matched
    assert not selector.selects(node, weight)
    assert selector.selects(node, None)  # without the weight only the node and output names count
    assert LayerSelector().selects(node, weight)


def test_include_narrows_and_exclude_wins():
    node, weight = _linear("model.layers.0.mlp.up_proj")
    assert LayerSelector.of(include=["model.layers.*.mlp.*"]).selects(node, weight)  # a glob, anchored
    assert LayerSelector.of(include=["attn"]).why_not(node, weight) == "not included (include=attn)"
    assert LayerSelector.of(["up_proj"], ["mlp"]).why_not(node, weight) == "excluded (exclude=up_proj)"


def test_every_weight_pass_takes_its_default_from_the_table():
    for name, default in DEFAULT_EXCLUDES.items():
        options = get_pass(name).Options
        field = next(f for f in dataclasses.fields(options) if f.name == "exclude")
        assert field.default_factory() == list(default) == default_exclude(name), name
