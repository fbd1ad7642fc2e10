"""`optc.passes.linear_layers`: the linear-layer view, name patterns and torch threads the weight passes share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optc.ir import annotate
from optc.passes.linear_layers import layer_names, linear, matches_any, torch_threads
from tests.fixtures import models


def _gemm_model(trans_a: int = 0, trans_b: int = 1):
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2) if not trans_b else
                                np.arange(6, dtype=np.float32).reshape(2, 3), "proj.weight")
    node = helper.make_node("Gemm", ["x", "proj.weight"], ["y"], name="proj", transA=trans_a, transB=trans_b)
    shape = [3, 4] if trans_a else [4, 3]
    proto = models.make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], [w])
    return models.to_ir(proto)


def test_linear_reads_the_reduction_axis_and_gives_nk():
    model = _gemm_model(trans_b=1)
    site = linear(next(iter(model.graph)))
    assert site is not None and site.k_axis == 1 and (site.in_features, site.out_features) == (3, 2)
    assert site.nk().shape == (2, 3)
    plain = linear(next(iter(_gemm_model(trans_b=0).graph)))
    assert plain is not None and plain.k_axis == 0 and plain.nk().shape == (2, 3)
    assert linear(next(iter(_gemm_model(trans_a=1).graph))) is None  # transA: not X·W
    for one in (site, plain):
        matrix = one.matrix()
        assert matrix.dtype == torch.float32 and matrix.is_contiguous()
        np.testing.assert_array_equal(matrix.numpy(), one.nk())
    assert site.label == "proj"


def test_patterns_match_node_output_weight_and_source_names():
    model = _gemm_model()
    node = next(iter(model.graph))
    weight = node.inputs[1]
    annotate(weight, "source_aliases", ["model.layers.0.mlp.down_proj.weight"])
    names = layer_names(node, weight)
    assert {"proj", "y", "proj.weight", "model.layers.0.mlp.down_proj.weight"} <= set(names)
    assert matches_any(names, ["down_proj"])  # substring
    assert matches_any(names, ["model.layers.*.mlp.*"])  # glob
    assert not matches_any(names, ["lm_head", "layers.1*"])
    assert not matches_any(layer_names(node, None), ["down_proj"])  # without the weight, only node and outputs


def test_torch_threads_pins_cpu_work_and_restores():
    before = torch.get_num_threads()
    with torch_threads("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(torch.device("cuda", 0) if torch.cuda.is_available() else "meta"):
        assert torch.get_num_threads() == before  # a non-CPU device is left alone


def test_torch_threads_honours_the_environment(monkeypatch):
    monkeypatch.setenv("OPTC_TORCH_THREADS", "2")
    with torch_threads():
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-3"])
def test_torch_threads_never_goes_below_one(monkeypatch, value):
    monkeypatch.setenv("OPTC_TORCH_THREADS", value)
    with torch_threads():
        assert torch.get_num_threads() == 1
