"""The block partition of a decoder: prefix, one block per layer, suffix; each stage runs on its own."""

from __future__ import annotations

import numpy as np

from optc.ir.patterns.blocks import find_blocks, stage_model
from optc.runtime.runner import ModelRunner
from tests.fixtures import prune_models
from tests.fixtures import quant_models as qm


def _chain(model, partition, feed):
    values = dict(feed)
    for stage in partition.stages:
        with ModelRunner(stage_model(model, stage)) as runner:
            values.update(runner.run({v.name: values[v.name] for v in stage.inputs}))
    return values


def test_a_llama_splits_into_one_block_per_layer_and_the_stages_compute_the_model():
    model = prune_models.load("llama")
    partition = find_blocks(model)
    assert not isinstance(partition, str), partition
    assert [s.name for s in partition.stages] == ["prefix", "block 0", "block 1", "suffix"]
    assert partition.prefix.outputs[0].name == "embedding"  # h0 first, then the side values
    for b, block in enumerate(partition.blocks):
        assert block.inputs[0] is partition.stream[b] and block.outputs == [partition.stream[b + 1]]
        # every other input is a side value the prefix computes (mask, rotary tables, shapes)
        assert {v.name for v in block.inputs[1:]} <= {v.name for v in partition.prefix.outputs[1:]}
        matmuls = [n for n in block.nodes if n.op_type == "MatMul" and n.inputs[1].is_initializer()]
        assert len(matmuls) == 7  # q, k, v, o, gate, up, down
    assert [v.name for v in partition.suffix.outputs] == ["logits"]
    feed = prune_models.feeds(model)
    expected = prune_models.outputs(model, feed)
    np.testing.assert_array_equal(_chain(model, partition, feed)["logits"], expected)


def test_a_stage_model_holds_only_its_own_weights_and_leaves_the_model_alone():
    model = prune_models.load("llama")
    nodes = model.graph.num_nodes()
    partition = find_blocks(model)
    block = stage_model(model, partition.blocks[1], ["linear_8"])
    assert [v.name for v in block.graph.outputs][-1] == "linear_8"
    names = set(block.graph.initializers)
    assert any("layers.1" in n for n in names) and not any("layers.0" in n for n in names)
    assert "hf.model.embed_tokens.weight" not in names
    assert model.graph.num_nodes() == nodes and all(n.graph is model.graph for n in model.graph)


def test_without_a_layer_count_each_residual_add_ends_a_block():
    model = qm.to_ir(qm.llama_block(), vocab=64)  # one layer, no HF config: two residual Adds
    partition = find_blocks(model)
    assert [s.outputs[0].name for s in partition.blocks] == ["residual1", "residual2"]


def test_a_model_without_a_residual_stream_says_why():
    from tests.fixtures import models

    assert find_blocks(models.to_ir(models.mlp())) == "0 embedding Gathers of a constant table (one expected)"


def test_the_last_stage_for_extras_alone_leaves_out_what_they_do_not_need():
    """The suffix asked only for the final norm's output (`only_extras`, the block path's last stage) holds
    neither the head's MatMul nor its weight, and computes the same values as the whole suffix."""
    model = prune_models.load("llama")
    partition = find_blocks(model)
    suffix = partition.suffix
    head = next(n for n in suffix.nodes if n.op_type == "MatMul")
    norm_out = head.inputs[0].name
    full = stage_model(model, suffix, [norm_out])
    cut = stage_model(model, suffix, [norm_out], only_extras=True)
    assert [v.name for v in cut.graph.outputs] == [norm_out]
    assert all(n.op_type != "MatMul" for n in cut.graph)
    head_weights = {v.name for v in head.inputs if v is not None and v.is_initializer()}
    assert not head_weights & set(cut.graph.initializers)
    feed = prune_models.feeds(model)
    values = _chain(model, partition, feed)
    stage_feed = {v.name: values[v.name] for v in suffix.inputs}
    with ModelRunner(full) as a, ModelRunner(cut) as b:
        np.testing.assert_array_equal(b.run(stage_feed)[norm_out], a.run(stage_feed)[norm_out])
