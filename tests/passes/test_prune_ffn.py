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


# --------------------------------------------------------------------------- other families


def test_gpt2_conv1d_mlp_pruning_is_exact():
    """GPT-2's MLP: Gemm c_fc on [batch*seq, 48] (its own bias C), a Reshape to [batch, seq, 192], GELU,
    a Reshape back and Gemm c_proj: the views' widths follow the kept channels."""
    model = pm.load("gpt2")
    before = pm.param_count(model)
    feeds = pm.feeds(model, 5)
    result = pm.run(model, "prune-ffn{ratio=0.5}", strict=True)
    assert result.statistics == {"ffn-pruned": 2, "channels-removed": 192}
    assert before - pm.param_count(result.model) == 2 * (96 * 48 * 2 + 96)  # c_fc rows and bias, c_proj columns
    assert model_metadata(result.model, "layer_ffn") == [96, 96]
    original = pm.load("gpt2")
    by_name = {n.name: n for n in original.graph}
    for node in result.model.graph:
        if annotation(node, "pruned_ffn"):
            o = by_name[node.name]
            w = constant_array(o.inputs[1]).copy()  # [192, 48]
            kept = _kept_channels(w, constant_array(node.inputs[1]))
            w[[j for j in range(192) if j not in kept]] = 0
            set_constant(original.graph, o, 1, w, "zeroed")
    np.testing.assert_allclose(pm.outputs(result.model, feeds), pm.outputs(original, feeds), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, experts, width, config_key", [
    ("mixtral", 4, 32, "intermediate_size"),
    ("qwen3_moe", 4, 24, "moe_intermediate_size"),
])
def test_experts_pruning_is_exact_per_expert(family, experts, width, config_key):
    """Stacked experts [E, N, K] gathered per routed row: every expert keeps half its channels, its own ones,
    and the model computes what the original computes with the others' down columns zeroed."""
    model = pm.load(family)
    before = pm.param_count(model)
    feeds = pm.feeds(model, 5)
    result = pm.run(model, "prune-ffn{ratio=0.5}", strict=True)
    kept = width // 2
    assert result.statistics == {"ffn-pruned": 2, "channels-removed": 2 * kept}
    # Per expert and layer: gate and up rows and down columns of `kept` channels, 48 wide.
    assert before - pm.param_count(result.model) == 2 * experts * 3 * kept * 48
    assert model_metadata(result.model, "layer_ffn") == [kept, kept]
    assert model_metadata(result.model, "hf_config")[config_key] == kept

    original = pm.load(family)
    by_name = {n.name: n for n in original.graph}
    chosen = []
    for node in result.model.graph:
        info = annotation(node, "pruned_ffn")
        if not info:
            continue
        assert info == {"width": kept, "of": width, "experts": experts}
        gather = by_name[node.name]
        w = constant_array(gather.inputs[0]).copy()  # [E, 48, F]
        pruned = constant_array(node.inputs[0])  # [E, 48, F']
        for e in range(experts):
            columns = {w[e][:, j].tobytes(): j for j in range(width)}
            keep = [columns[pruned[e][:, i].tobytes()] for i in range(kept)]
            assert keep == sorted(keep)
            chosen.append(tuple(keep))
            w[e][:, [j for j in range(width) if j not in keep]] = 0
        set_constant(original.graph, gather, 0, w, "zeroed")
    assert len(set(chosen)) > 1  # each expert its own channels
    np.testing.assert_allclose(pm.outputs(result.model, feeds), pm.outputs(original, feeds), rtol=1e-4, atol=1e-4)


def test_an_expert_no_calibration_row_reaches_is_ranked_by_its_weights():
    """A router that always picks expert 0 (equal logits): expert 1 is pruned by its down columns' norms, and
    the pass says how many experts that was."""
    result = pm.run(pm.experts(router="1.0, 1.0, -1.0, -1.0"), "prune-ffn{ratio=0.5}",
                    calib={"calibration.spec": "random", "calibration.samples": 2, "calibration.seqlen": 8})
    assert result.statistics == {"ffn-pruned": 1, "channels-removed": 1}
    assert ("analysis", "1 expert got no calibration token: ranked by the norms of the down-projection columns") in [(r.kind, r.message) for r in result.remarks]
    down = next(n for n in result.model.graph if annotation(n, "pruned_ffn"))
    np.testing.assert_allclose(constant_array(down.inputs[0])[1].ravel(), [1.0, -0.5])  # expert 1's column 1
