"""Block-by-block calibration: the same statistics as the whole-model path, true-sequential GPTQ, spilling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optc.ir import annotation
from optc.passes import AnalysisManager, PassContext
from optc.passes.analyses.activation_histograms import ActivationHistograms
from optc.passes.analyses.activation_stats import ActivationStats
from optc.passes.analyses.hessian import Hessian
from optc.passes.infra.blockwise import ActivationStore, block_partition
from optc.passes.infra.pipeline import parse_pipeline
from tests.fixtures import prune_models


def _am(mode: str, **config) -> AnalysisManager:
    return AnalysisManager(PassContext(config={**prune_models.CALIB, "calibration.blocks": mode, **config}))


def test_the_block_path_gives_the_whole_model_statistics():
    model = prune_models.load("llama")
    whole, blocks = _am("off"), _am("on")
    h_whole, h_blocks = whole.get(Hessian, model, device="cpu"), blocks.get(Hessian, model, device="cpu")
    assert sorted(h_whole) == sorted(h_blocks) and len(h_whole) == 9  # 4 per layer and the head
    for name, entry in h_whole.items():
        assert h_blocks[name].tokens == entry.tokens
        torch.testing.assert_close(h_blocks[name].xtx, entry.xtx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h_blocks[name].abs_sum, entry.abs_sum, rtol=1e-6, atol=1e-6)
    s_whole, s_blocks = whole.get(ActivationStats, model), blocks.get(ActivationStats, model)
    assert sorted(s_whole) == sorted(s_blocks)
    for name, entry in s_whole.items():
        assert (s_blocks[name].min, s_blocks[name].max) == pytest.approx((entry.min, entry.max), rel=1e-6)
        np.testing.assert_allclose(s_blocks[name].channel_absmax, entry.channel_absmax, rtol=1e-6)
    g_whole, g_blocks = whole.get(ActivationHistograms, model), blocks.get(ActivationHistograms, model)
    for name, entry in g_whole.items():
        assert g_blocks[name].edge == entry.edge and abs(int((g_blocks[name].pos - entry.pos).sum())) <= 2


def test_auto_streams_only_when_the_whole_model_exceeds_the_budget():
    model = prune_models.load("llama")
    assert block_partition(model, _am("auto").context) is None  # no budget known: whole model
    assert block_partition(model, _am("auto", **{"calibration.memory_budget": 1 << 40}).context) is None
    assert block_partition(model, _am("auto", **{"calibration.memory_budget": 1000}).context) is not None
    assert block_partition(model, _am("off", **{"calibration.memory_budget": 1000}).context) is None


def test_a_model_without_blocks_calibrates_whole_with_a_remark():
    from tests.fixtures import models

    model = models.to_ir(models.mlp())
    am = _am("on", **{"calibration.spec": "random"})
    am.context.pass_stack.append("gptq")
    assert block_partition(model, am.context) is None
    assert [r.kind for r in am.context.remarks] == ["missed"] and "no decoder blocks" in am.context.remarks[0].message


def _gptq(mode: str):
    model = prune_models.load("llama")
    result = parse_pipeline('gptq{exclude=""}')(model, _am(mode))
    return result.model, result.statistics


def _codes(model) -> dict[str, np.ndarray]:
    from optc.ir import constant_array

    out = {}
    for node in model.graph:
        info = annotation(node, "quant")
        if info is not None:
            out[node.name] = constant_array(model.graph.initializers[info["weight"]]).astype(np.int32)
    return out


def test_sequential_gptq_quantizes_block_0_as_the_whole_model_path_and_later_blocks_from_quantized_inputs():
    whole, whole_stats = _gptq("off")
    seq, seq_stats = _gptq("on")
    assert seq_stats["quantized-ops"] == whole_stats["quantized-ops"] == 15 and seq_stats["rtn-fallbacks"] == 0
    a, b = _codes(whole), _codes(seq)
    assert sorted(a) == sorted(b)
    layer0 = [n for n in a if n in {"node_linear", "node_linear_1", "node_linear_2", "node_linear_3",
                                    "node_linear_4", "node_linear_5", "node_linear_6"}]
    assert len(layer0) == 7
    for name in layer0:  # block 0 reads the prefix's output either way: the same Hessians, the same codes
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], b[n]) for n in a if n not in layer0)  # block 1 saw quantized inputs
    feed = prune_models.feeds(seq)
    reference = prune_models.outputs(prune_models.load("llama"), feed)
    for model in (whole, seq):
        error = np.abs(prune_models.outputs(model, feed) - reference).max()
        assert error < 0.25 * np.abs(reference).max()  # 4-bit weights of a random 32-wide model


def test_the_store_spills_past_its_limit_and_reads_back_the_same_arrays():
    rng = np.random.default_rng(0)
    arrays = [{"h": rng.standard_normal((1, 8, 4)).astype(np.float32)} for _ in range(3)]
    store = ActivationStore(limit=200)  # one sample (128 bytes) in memory, the others on disk
    for item in arrays:
        store.put(item)
    assert store.spilled and len(store) == 3
    for i, item in enumerate(arrays):
        np.testing.assert_array_equal(store.get(i)["h"], item["h"])
    folder = store.folder
    store.close()
    assert folder is not None and not folder.exists()


def test_w8a8_gives_the_same_model_block_by_block():
    """smoothquant and quantize only read statistics, which the block path computes exactly: the same
    weights, scales, zero points, nodes and annotations."""
    from optc.ir import constant_array

    models = []
    for mode in ("off", "on"):
        model = parse_pipeline("w8a8")(prune_models.load("llama"), _am(mode)).model
        models.append((
            {k: constant_array(v) for k, v in model.graph.initializers.items()},
            [(n.op_type, [v.name if v is not None else "" for v in n.inputs], dict(n.metadata_props)) for n in model.graph],
        ))
    (weights_a, nodes_a), (weights_b, nodes_b) = models
    assert nodes_a == nodes_b and sorted(weights_a) == sorted(weights_b)
    for name, array in weights_a.items():
        np.testing.assert_array_equal(weights_b[name], array)


def test_hessian_update_in_bands_gives_the_full_product():
    """`HessianStats.update` adds xᵀx a band of rows at a time (no [K, K] temporary for a wide layer);
    with K above one band the sum is x's full xᵀx, and the token count and |x| sums are unchanged."""
    from optc.passes.analyses.hessian import UPDATE_BAND, HessianStats

    k = UPDATE_BAND * 2 + 37
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 24, k, generator=g) for _ in range(3)]
    stats = HessianStats(torch.zeros(k, k, dtype=torch.float64))
    for x in xs:
        stats.update(x)
    rows = torch.cat([x.reshape(-1, k) for x in xs]).double()
    assert stats.tokens == rows.shape[0]
    torch.testing.assert_close(stats.xtx, rows.T @ rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.abs_sum, rows.abs().sum(dim=0), rtol=1e-6, atol=1e-6)
