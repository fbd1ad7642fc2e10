"""`prune-heads`: remove whole attention heads, ranked by calibration, rewriting the graph consistently.

Attention blocks are found by graph pattern (`optc.passes.attention.find_attention`):
the output projection `o`, the attention matmuls, and the Q/K/V projections
behind reshapes, transposes, rotary embeddings and the GQA repeat. That covers
LLaMA-like decoders and BERT-like encoders as the torch exporter writes them.

Importance of head h (per layer, from the `hessian` analysis of `o`'s input,
whose diagonal is Σ x² over calibration tokens):

* `activation` (default): the L2 norm of the head's slice of `o`'s input;
* `contribution`: the L2 norm of the head's contribution at `o`'s output,
  ‖X_h·W_o[h]‖ = sqrt(tr(W_o[h]ᵀ·X_hᵀX_h·W_o[h])).

Selection, per layer (so every layer keeps the same head counts and the HF
config stays uniform): with grouped-query attention (G = heads/kv_heads > 1)
and `groups=query`, round(ratio·G) query heads are removed from every KV group
(the least important in each group, so the repeat stays uniform); with
`groups=kv`, round(ratio·kv_heads) whole KV groups go (Q, K and V heads). With
plain multi-head attention round(ratio·heads) heads go. At least one head (and
group) always stays.

Rewrite: the Q (and K/V for removed groups) projections lose the heads'
output rows and biases (a bias Add's, or a Gemm's own `C`), `o` loses the
heads' input rows; a constant along the flattened heads (OLMo 2's q_norm /
k_norm weight over the whole projection) loses the heads' entries; every Reshape/Expand
shape operand that spells a head count (the split into heads, the GQA repeat
`Expand` and its merge, the merge back to hidden) is updated, found by a
forward head-axis analysis rather than by value; the static shapes of the
values in between are updated; the HF config metadata (`hf_config`) gets the
new `num_attention_heads`/`num_key_value_heads` and the model metadata
`layer_heads` lists `[heads, kv_heads]` per attention layer.

A normalization over the whole q or k projection (OLMo 2's RMSNorm, across
heads) is not exact after pruning: the kept heads are then normalized by the
mean of squares over themselves alone, not over every head. The pass prunes
it anyway (head pruning is lossy in any case) and says so in an `analysis`
remark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from optc.errors import OptcError
from optc.ir import (
    Model,
    Node,
    Shape,
    annotate,
    constant_array,
    model_metadata,
    set_model_metadata,
)
from optc.ir.annotations import HF_CONFIG, LAYER_HEADS, PRUNED_HEADS
from optc.ir.patterns.builder import Builder
from optc.passes.attention import AttentionBlock, HeadAxes, scan_attention
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.passes.transforms._structure import (
    Linear,
    PruneOptions,
    calibration_hessians,
    drop_unused_initializers,
    keep_outputs,
    set_constant,
    set_shape_element,
)
from optc.passes.transforms.split_fused_projections import split_fused_projections


@register_pass("prune-heads")
class PruneHeads(Pass):
    """Remove the least important attention heads (GQA aware) and rewrite projections, shapes and config."""

    @dataclass
    class Options(PruneOptions):
        groups: Literal["query", "kv"] = option(
            "query", help="with GQA: remove query heads evenly from every KV group, or whole KV groups"
        )

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        # The canonical form first: fused qkv / gate_up projections become one linear layer per piece.
        split, _ = split_fused_projections(model, am.context)
        scan = scan_attention(model)
        blocks = scan.blocks
        context = am.context
        misses = [why for _, why in scan.misses]
        plans = []
        for block in blocks:  # the head-axis analysis fails early on a pattern the rewrite cannot follow
            try:
                plans.append((block, HeadAxes(block)))
            except OptcError as exc:
                misses.append("unsupported attention pattern (" + str(exc).split(" (", 1)[-1])
        if len(plans) < len(blocks):  # layers keep equal head counts: one block it cannot rewrite stops them all
            misses += ["left with the blocks it cannot rewrite"] * len(plans)
            plans = []
        blocks = [b for b, _ in plans]
        if not scan.candidates:
            context.remark("missed", "no attention blocks found", matched_none=True)
        elif misses:
            message = match_summary(len(blocks), misses, "attention blocks")
            context.remark("missed", message, matched_none=not blocks)
        if not blocks:
            return PassResult(model, bool(split), None, {"layers-pruned": 0, "heads-removed": 0})
        hessians = calibration_hessians(model, am, "prune-heads", [b.o.activation.name for b in blocks])
        build = Builder(model.graph)  # owns the fresh names of everything this run adds
        removed_heads = layers = 0
        layer_heads: list[list[int]] = []
        removed: list[list[int]] = []
        for block, axes in plans:
            stats = hessians.get(block.o.activation.name)
            if stats is None:
                raise OptcError(f"prune-heads: no calibration statistics for {block.o.activation.name}")
            scores = head_scores(block, stats.xtx.double().cpu(), self.options.importance)
            keep = select_heads(scores, block.heads, block.kv_heads, self.options.ratio, self.options.groups)
            keep_kv = sorted({h // block.group_size for h in keep})
            removed.append([h for h in range(block.heads) if h not in keep])
            if len(keep) == block.heads:
                layer_heads.append([block.heads, block.kv_heads])
                continue
            _rewrite(build, block, axes, keep, keep_kv)
            removed_heads += block.heads - len(keep)
            layers += 1
            layer_heads.append([len(keep), len(keep_kv)])
        normalized = sum(bool(axes.cross_head) for _, axes in plans)
        if layers and normalized:
            context.remark("analysis", f"{normalized} attention blocks normalize q or k over all their heads at once "
                           "(RMSNorm of the whole projection): the heads left are now normalized over themselves "
                           "alone, which changes their values beyond removing the others")
        if not layers:
            context.remark("analysis", f"ratio={self.options.ratio:g} removes no head in any of {len(blocks)} attention blocks")
            return PassResult(model, bool(split), None, {"layers-pruned": 0, "heads-removed": 0})
        drop_unused_initializers(model.graph)
        _update_config(model, layer_heads, removed, blocks[0].head_dim)
        context.remark("passed", f"removed {removed_heads} heads in {layers} of {len(blocks)} attention blocks")
        return PassResult(model, True, None, {"layers-pruned": layers, "heads-removed": removed_heads})


def head_scores(block: AttentionBlock, xtx: torch.Tensor, importance: str) -> np.ndarray:
    """One importance score per query head from Σ xᵀx at the output projection's input."""
    d = block.head_dim
    scores = np.zeros(block.heads)
    w_o = torch.from_numpy(block.o.nk().T.astype(np.float64))  # [K = heads*d, N]
    for h in range(block.heads):
        sl = slice(h * d, (h + 1) * d)
        if importance == "activation":
            scores[h] = float(torch.diagonal(xtx[sl, sl]).sum().clamp_min(0).sqrt())
        else:
            w = w_o[sl]
            scores[h] = float(torch.trace(w.T @ xtx[sl, sl] @ w).clamp_min(0).sqrt())
    return scores


def select_heads(scores: np.ndarray, heads: int, kv_heads: int, ratio: float, groups: str) -> list[int]:
    """The query heads to keep (sorted): evenly per KV group, or whole KV groups (see the module docstring)."""
    group = heads // kv_heads
    if group == 1 or groups == "kv":
        # Whole groups (with MHA a group is one head): drop the lowest total scores.
        drop = min(int(round(ratio * kv_heads)), kv_heads - 1)
        totals = scores.reshape(kv_heads, group).sum(axis=1)
        dropped = set(np.argsort(totals, kind="stable")[:drop].tolist())
        return [h for h in range(heads) if h // group not in dropped]
    drop = min(int(round(ratio * group)), group - 1)
    keep = []
    for g in range(kv_heads):
        members = np.arange(g * group, (g + 1) * group)
        order = members[np.argsort(scores[members], kind="stable")]
        keep += sorted(order[drop:].tolist())
    return sorted(keep)


def _channels(heads: list[int], d: int) -> np.ndarray:
    return np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads])


def _slice_outputs(build: Builder, site: Linear, bias: Node | None, channels: np.ndarray) -> None:
    keep_outputs(build, site, channels, "pruned")
    if bias is not None:
        index = 0 if constant_array(bias.inputs[0]) is not None else 1
        set_constant(build, bias, index, np.ascontiguousarray(constant_array(bias.inputs[index])[channels]), "pruned")
        _fix_output_shape(bias.outputs[0], len(channels))


def _fix_output_shape(value, channels: int) -> None:
    if value.shape is not None and len(value.shape):
        dims = list(value.shape)
        dims[-1] = channels
        value.shape = Shape(dims)


def _rewrite(build: Builder, block: AttentionBlock, axes: HeadAxes, keep: list[int], keep_kv: list[int]) -> None:
    d = block.head_dim
    q_channels = _channels(keep, d)
    _slice_outputs(build, block.q, block.biases.get("q"), q_channels)
    if len(keep_kv) != block.kv_heads:
        kv_channels = _channels(keep_kv, d)
        _slice_outputs(build, block.k, block.biases.get("k"), kv_channels)
        _slice_outputs(build, block.v, block.biases.get("v"), kv_channels)
    w_o = block.o.nk()[:, q_channels]
    stored = w_o.T if block.o.k_axis == 0 else w_o
    set_constant(build, block.o.node, 1, np.ascontiguousarray(stored.astype(constant_array(block.o.weight).dtype)), "pruned")
    channels = {"HD": q_channels, "KVD": _channels(keep_kv, d)}
    for patch in axes.constants:
        array = constant_array(patch.node.inputs[patch.index])
        if array.shape[patch.axis] != len(channels[patch.role]):
            set_constant(build, patch.node, patch.index,
                         np.ascontiguousarray(np.take(array, channels[patch.role], axis=patch.axis)), "pruned")
    counts = {"H": len(keep), "KV": len(keep_kv), "REP": len(keep) // len(keep_kv)}
    counts["HD"], counts["KVD"] = counts["H"] * d, counts["KV"] * d
    for patch in axes.patches:
        set_shape_element(build, patch.node, patch.position, counts[patch.role], "heads")
    for key, roles in axes.roles.items():
        value = axes.values[key]
        if value.shape is None or value.is_graph_output():
            continue
        dims = list(value.shape)
        for axis, role in roles.items():
            if -axis <= len(dims) and isinstance(dims[axis], int):
                dims[axis] = counts[role]
        value.shape = Shape(dims)
    info = {"heads": counts["H"], "kv_heads": counts["KV"], "kept": keep, "of": block.heads}
    annotate(block.o.node, PRUNED_HEADS, info)


def _update_config(model: Model, layer_heads: list[list[int]], removed: list[list[int]], head_dim: int) -> None:
    """Record per-layer head counts; update the HF config the way its architecture can express them."""
    set_model_metadata(model, LAYER_HEADS, layer_heads)
    config = model_metadata(model, HF_CONFIG)
    if not isinstance(config, dict):
        return
    if "num_key_value_heads" in config or "head_dim" in config:
        # LLaMA-like: head counts are per model; head_dim must be explicit once heads*head_dim != hidden.
        heads = {h for h, _ in layer_heads}
        kv = {k for _, k in layer_heads}
        if len(heads) == 1:
            config["num_attention_heads"] = heads.pop()
        if len(kv) == 1 and "num_key_value_heads" in config:
            config["num_key_value_heads"] = kv.pop()
        config["head_dim"] = head_dim
    else:
        # BERT-like: the original head count stays and `pruned_heads` lists what went (transformers' convention).
        pruned = {str(i): r for i, r in enumerate(removed) if r}
        config["pruned_heads"] = pruned
    set_model_metadata(model, HF_CONFIG, config)


__all__ = ["PruneHeads", "head_scores", "select_heads"]
