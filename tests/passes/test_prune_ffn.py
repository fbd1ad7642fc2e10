"""prune-ffn: gated (LLaMA) and plain (BERT) MLPs, exactness against zeroed channels."""

from __future__ import annotations

import numpy as np
import pytest

from optc.ir import annotation, constant_array, model_metadata
from optc.passes.transforms._structure import set_constant
from optc.passes.transforms.prune_ffn import find_ffn
from tests.fixtures import prune_models as pm
from tests.fixtures import quant_models as qm

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _kept_channels(original_down: np.ndarray, pruned_down: np.ndarray) -> list[int]:
    """Which rows of the original down weight [F, hidden] survive (matched by content)."""
    rows = {original_down[j].tobytes(): j for j in range(original_down.shape[0])}
    return [rows[pruned_down[i].tobytes()] for i in range(pruned_down.shape[0])]


@pytest.mark.parametrize("kind, producers", [("llama", 2), ("bert", 1)])
def test_exported_ffn_pruning_is_exact(kind, producers):
    model = pm.load(kind)
    blocks = find_ffn(model)
    assert [(b.width, len(b.producers)) for b in blocks] == [(48, producers)] * 2
    before = pm.param_count(model)
    feeds = pm.feeds(model, 5)
    result = pm.run(model, "prune-ffn{ratio=0.25}")
    assert result.statistics == {"ffn-pruned": 2, "channels-removed": 24}
    biases = 0 if kind == "llama" else 12 * 2  # fc1 bias entries
    assert before - pm.param_count(result.model) == 12 * 32 * (producers + 1) * 2 + biases
    assert model_metadata(result.model, "hf_config")["intermediate_size"] == 36
    assert model_metadata(result.model, "layer_ffn") == [36, 36]

    original = pm.load(kind)
    by_name = {n.name: n for n in original.graph}
    for node in result.model.graph:
        if annotation(node, "pruned_ffn"):
            o = by_name[node.name]
            w = constant_array(o.inputs[1]).copy()
            kept = _kept_channels(w, constant_array(node.inputs[1]))
            assert len(kept) == 36 and kept == sorted(kept)
            w[[j for j in range(48) if j not in kept]] = 0
            set_constant(original.graph, o, 1, w, "zeroed")
    np.testing.assert_allclose(pm.outputs(result.model, feeds), pm.outputs(original, feeds), rtol=1e-4, atol=1e-4)


def test_multiple_and_contribution_on_llama_block():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    result = pm.run(model, "prune-ffn{ratio=0.3 multiple=8 importance=contribution}",
                     calib={"calibration.spec": "random", "calibration.samples": 2, "calibration.seqlen": 8})
    down = next(n for n in result.model.graph if n.name == "down_proj")
    assert constant_array(down.inputs[1]).shape == (16, 16)  # 32 - round(9.6) = 22 -> 16 (a multiple of 8)
    assert constant_array(next(n for n in result.model.graph if n.name == "gate_proj").inputs[1]).shape == (16, 16)


# --------------------------------------------------------------------------- remarks


def test_fused_gate_up_is_split_then_pruned():
    """Phi-3's fused gate_up_proj: brought to separate gate and up MatMuls first, then pruned, and said so."""
    model = pm.load("phi3")
    before = pm.param_count(model)
    feeds = pm.feeds(model, 5)
    reference = pm.outputs(model, feeds)
    result = pm.run(model, "prune-ffn{ratio=0.25}")
    assert result.statistics == {"ffn-pruned": 2, "channels-removed": 24}
    assert [(r.kind, r.message) for r in result.remarks] == [
        ("passed", "split 4 fused projections into 10 linear layers"),
        ("passed", "removed 24 channels in 2 of 2 MLP blocks"),
    ]
    assert before - pm.param_count(result.model) == 12 * 32 * 3 * 2  # gate and up rows, down columns
    out = pm.outputs(result.model, feeds)
    assert out.shape == reference.shape and np.isfinite(out).all()


def test_phi3_passes_strict():
    result = pm.run(pm.load("phi3"), "prune-ffn", strict=True)
    assert result.statistics["ffn-pruned"] == 2


def test_llama_gives_no_missed_remark_and_a_model_without_mlp_does():
    result = pm.run(pm.load("llama"), "prune-ffn", strict=True)
    assert [(r.kind, r.message) for r in result.remarks] == [("passed", "removed 24 channels in 2 of 2 MLP blocks")]

    from onnx import TensorProto, helper

    from tests.fixtures import models

    one_linear = models.make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
        [models.weight("W", (8, 4), np.random.default_rng(0))],
    )
    (remark,) = pm.run(models.to_ir(one_linear), "prune-ffn").remarks
    assert (remark.kind, remark.message, remark.matched_none) == ("missed", "no MLP blocks found", True)
