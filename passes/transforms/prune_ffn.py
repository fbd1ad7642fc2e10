"""`prune-ffn`: remove FFN intermediate channels (gate/up rows and down columns together).

An FFN is found by graph pattern: a linear layer `down` whose input is made,
through channel-wise ops only (activations, the gating `Mul`, bias `Add`,
scalar or per-channel constants) and Reshapes that keep the F channels on
the last axis (GPT-2's views around its Conv1D Gemms), from the outputs of one
or more linear layers of width F (`gate` and `up` of a gated MLP; `fc1` of
BERT's MLP), with nothing else reading the values in between. Channel j of
every producer (its output row and bias, a Gemm's own bias included), of
per-channel constants on the way, and input row j of `down` go together, so
the function computed on the kept channels is unchanged; the views' widths
follow.

A mixture of experts' MLP (stacked experts gathered per routed row,
`optc.passes.transforms._experts_ffn`) is pruned per expert: each expert keeps
as many channels as a dense MLP of width F would, its own most important ones
by the `expert-stats` analysis (Σ x_j² over the rows routed to it; an expert
no calibration row reached is ranked by its down columns' norms, with a
remark). It counts as one MLP block, its removed channels once.

Importance of channel j, from the `hessian` analysis of `down`'s input (the
diagonal is Σ x_j² over the calibration tokens): `activation` (default) is
‖x_j‖₂ (ModelOpt's Minitron score), `contribution` is ‖x_j‖₂·‖W_down[j, :]‖₂.
Each FFN loses round(ratio·F) channels, rounded down to a multiple of
`multiple` kept (so kernels stay aligned). The HF config's
`intermediate_size` (experts: `moe_intermediate_size` where the config has
it) is updated when every layer ends up equal, and the model metadata
`layer_ffn` lists each FFN's width in graph order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from optc.errors import OptcError
from optc.ir import (
    Model,
    Node,
    Shape,
    Value,
    annotate,
    constant_array,
    is_constant,
    model_metadata,
    node_label,
    set_model_metadata,
)
from optc.ir.annotations import HF_CONFIG, LAYER_FFN, PRUNED_FFN
from optc.ir.patterns.builder import Builder
from optc.passes.analyses.expert_stats import ExpertStats
from optc.passes.analyses.hessian import require_calibration
from optc.passes.attention import linear_of, shape_elements
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.passes.transforms._experts_ffn import ExpertsFFNBlock, experts_ffn_for, prune_experts
from optc.passes.transforms._structure import (
    CHANNELWISE_OPS,
    Linear,
    PruneOptions,
    calibration_hessians,
    drop_unused_initializers,
    keep_outputs,
    linear,
    set_constant,
    set_shape_element,
)
from optc.passes.transforms.split_fused_projections import split_fused_projections


@dataclass
class FFNBlock:
    """A feed-forward block: its producers of width F, the channel-wise nodes between, and `down`."""

    down: Linear
    producers: list[tuple[Linear, Node | None]]  # (linear, bias Add)
    nodes: list[Node] = field(default_factory=list)
    #: Reshapes on the way that keep the F channels on the last axis (GPT-2's views around its Conv1D Gemms).
    reshapes: list[Node] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    width: int = 0


def find_ffn(model: Model) -> list[FFNBlock]:
    """Every FFN block of the graph (see the module docstring), in graph order of `down`."""
    return scan_ffn(model)[0]


def scan_ffn(model: Model) -> tuple[list[FFNBlock], list[tuple[str, str]]]:
    """The FFN blocks of the graph, and the near misses as (down's label, reason).

    A near miss is a `down` layer whose input comes, through channel-wise ops, from a slice of one
    wider linear layer (a fused gate/up projection), or from linear layers of its width whose
    intermediate values something else also reads.
    """
    blocks, misses = [], []
    for node in model.graph:
        down = linear(node)
        if down is None:
            continue
        block = _ffn_for(down)
        if isinstance(block, FFNBlock):
            blocks.append(block)
        elif block is not None:
            misses.append((down.label, block))
    return blocks, misses


def _ffn_for(down: Linear) -> FFNBlock | str | None:
    """The FFN ending in `down`; else the reason it is a near miss; else None (not an FFN)."""
    f = down.in_features
    block = FFNBlock(down, [], width=f)
    stack, seen = [down.activation], set()
    producers: dict[int, tuple[Linear, Node | None]] = {}
    inside: set[int] = {id(down.node)}
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input() or value.is_graph_output():
            return None
        hit = linear_of(value)
        if hit is not None:
            site, bias = hit
            if site.out_features != f:
                return None
            producers[id(site.node)] = (site, bias)
            block.values.append(value)
            if bias is not None:
                block.values.append(site.node.outputs[0])
                inside.add(id(bias))
            inside.add(id(site.node))
            continue
        node = value.producer()
        if node is not None and block.nodes and _fused_producer(node, f):
            return "fused gate_up_proj"
        if node is not None and _keeps_last_axis(node, f):
            block.reshapes.append(node)
            block.values.append(value)
            inside.add(id(node))
            stack.append(node.inputs[0])
            continue
        if node is None or node.op_type not in CHANNELWISE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        block.nodes.append(node)
        block.values.append(value)
        inside.add(id(node))
        for v in node.inputs:
            if v is None:
                continue
            if is_constant(v):
                if not _channel_constant(v, f):
                    return None
                continue
            stack.append(v)
    if not producers:
        return None
    # Nothing outside the block may read a value inside it.
    for value in block.values:
        if any(id(use.node) not in inside for use in value.uses()):
            return "an intermediate value is also read outside the block" if block.nodes else None
        if value.shape is not None and len(value.shape) and value.shape[-1] not in (f, None) and not isinstance(value.shape[-1], str):
            return None
    block.producers = list(producers.values())
    return block


def _fused_producer(node: Node, f: int) -> bool:
    """True when `node` is a Slice or Split of the output of one linear layer of a multiple of `f` channels."""
    if node.op_type not in ("Slice", "Split") or node.domain not in ("", "ai.onnx") or not node.inputs:
        return False
    hit = linear_of(node.inputs[0]) if node.inputs[0] is not None else None
    return hit is not None and hit[0].out_features > f and hit[0].out_features % f == 0


def _keeps_last_axis(node: Node, f: int) -> bool:
    """True when `node` is a Reshape whose target ends in `f`, of a value whose last axis is `f`."""
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    shape = node.inputs[0].shape
    target = shape_elements(node.inputs[1])
    return shape is not None and len(shape) > 0 and shape[-1] == f and target is not None and target[-1] == f


def _channel_constant(value: Value, f: int) -> bool:
    shape = list(value.shape) if value.shape is not None else None
    if shape is None:
        return False
    return not shape or all(d == 1 for d in shape[:-1]) and shape[-1] in (1, f)


@register_pass("prune-ffn")
class PruneFFN(Pass):
    """Remove the least important FFN intermediate channels (gate/up rows and down columns together)."""

    @dataclass
    class Options(PruneOptions):
        multiple: int = option(1, help="keep a multiple of this many channels")

        def validate(self) -> None:
            super().validate()
            if self.multiple < 1:
                raise ValueError(f"option 'multiple' must be at least 1, got {self.multiple}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        # The canonical form first: fused qkv / gate_up projections become one linear layer per piece.
        split, _ = split_fused_projections(model, am.context)
        blocks, misses = scan_ffn(model)
        expert_blocks, expert_misses = scan_experts_ffn(model)
        misses += expert_misses
        context = am.context
        found = len(blocks) + len(expert_blocks)
        if not found and not misses:
            context.remark("missed", "no MLP blocks found", matched_none=True)
        elif misses:
            context.remark("missed", match_summary(found, (why for _, why in misses), "MLP blocks"),
                           matched_none=not found)
        if not found:
            return PassResult(model, bool(split), None, {"ffn-pruned": 0, "channels-removed": 0})
        build = Builder(model.graph)  # owns the fresh names of everything this run adds
        widths = {}  # id(down node) -> the width it keeps
        if blocks:
            hessians = calibration_hessians(model, am, "prune-ffn", [b.down.activation.name for b in blocks])
        for block in blocks:
            stats = hessians.get(block.down.activation.name)
            if stats is None:
                raise OptcError(f"prune-ffn: no calibration statistics for {block.down.activation.name}")
            scores = np.sqrt(np.clip(np.diagonal(stats.xtx.double().cpu().numpy()), 0, None))
            if self.options.importance == "contribution":
                scores = scores * np.linalg.norm(block.down.nk().astype(np.float64), axis=0)
            keep_count = self._keep_count(block.width)
            widths[id(block.down.node)] = keep_count
            if keep_count < block.width:
                _rewrite(build, block, np.sort(np.argsort(-scores, kind="stable")[:keep_count]))
        if expert_blocks:
            self._prune_experts(model, am, build, expert_blocks, widths)
        order = [id(n) for n in model.graph if id(n) in widths]
        all_blocks = {id(b.down.node): b.width for b in [*blocks, *expert_blocks]}
        pruned = sum(1 for k in order if widths[k] < all_blocks[k])
        removed = sum(all_blocks[k] - widths[k] for k in order)
        if not pruned:
            context.remark("analysis", f"ratio={self.options.ratio:g} removes no channel in any of {found} MLP blocks")
            return PassResult(model, bool(split), None, {"ffn-pruned": 0, "channels-removed": 0})
        drop_unused_initializers(model.graph)
        context.remark("passed", f"removed {removed} channels in {pruned} of {found} MLP blocks")
        layer_widths = [int(widths[k]) for k in order]
        set_model_metadata(model, LAYER_FFN, layer_widths)
        config = model_metadata(model, HF_CONFIG)
        if isinstance(config, dict):
            _update_config(config, [widths[id(b.down.node)] for b in blocks],
                           [widths[id(b.down.node)] for b in expert_blocks])
            set_model_metadata(model, HF_CONFIG, config)
        return PassResult(model, True, None, {"ffn-pruned": pruned, "channels-removed": removed})

    def _keep_count(self, f: int) -> int:
        """The channels an FFN of width `f` keeps: round(ratio·f) go, the rest rounded down to `multiple`."""
        keep_count = f - int(round(self.options.ratio * f))
        return max(self.options.multiple, keep_count - keep_count % self.options.multiple)

    def _prune_experts(self, model: Model, am: AnalysisManager, build: Builder, blocks: list[ExpertsFFNBlock],
                       widths: dict[int, int]) -> None:
        """Every expert of each block keeps its own most important channels, as many as a dense MLP keeps."""
        require_calibration(model, am, "prune-ffn")
        pairs = tuple((b.activation.name, b.indices.name, b.axis, b.down.count) for b in blocks)
        stats = am.get(ExpertStats, model, pairs=pairs)
        unrouted = 0
        for block in blocks:
            entry = stats[block.activation.name]
            down_norms = np.linalg.norm(block.down.enk().astype(np.float64), axis=1)  # [E, F]
            scores = np.sqrt(np.clip(entry.squares, 0, None))
            if self.options.importance == "contribution":
                scores = scores * down_norms
            idle = entry.rows == 0
            scores[idle] = down_norms[idle]  # an expert no calibration row reached: ranked by its weights
            unrouted += int(idle.sum())
            keep_count = self._keep_count(block.width)
            widths[id(block.down.node)] = keep_count
            if keep_count < block.width:
                keep = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :keep_count], axis=1)
                prune_experts(build, block, keep)
        if unrouted:
            am.context.remark("analysis", f"{unrouted} expert{'s' if unrouted != 1 else ''} got no calibration "
                              "token: ranked by the norms of the down-projection columns")


def scan_experts_ffn(model: Model) -> tuple[list[ExpertsFFNBlock], list[tuple[str, str]]]:
    """The expert MLPs of the graph (`optc.passes.transforms._experts_ffn`), and the near misses as
    (down's label, reason)."""
    blocks, misses = [], []
    for node in model.graph:
        block = experts_ffn_for(node)
        if isinstance(block, ExpertsFFNBlock):
            blocks.append(block)
        elif block is not None:
            misses.append((node_label(node), block))
    return blocks, misses


def _update_config(config: dict, dense: list[int], expert: list[int]) -> None:
    """The HF config's MLP widths, where every layer ends up equal: `intermediate_size` for dense MLPs,
    `moe_intermediate_size` (Qwen-MoE) or `intermediate_size` (Mixtral, no dense MLP) for experts."""
    if len(set(dense)) == 1 and "intermediate_size" in config:
        config["intermediate_size"] = dense[0]
    if len(set(expert)) == 1:
        key = "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"
        if key in config and not (key == "intermediate_size" and dense):
            config[key] = expert[0]


def _rewrite(build: Builder, block: FFNBlock, keep: np.ndarray) -> None:
    f = block.width
    for site, bias in block.producers:
        keep_outputs(build, site, keep, "pruned")
        if bias is not None:
            index = 0 if constant_array(bias.inputs[0]) is not None else 1
            set_constant(build, bias, index, _take_last(constant_array(bias.inputs[index]), keep, f), "pruned")
    for node in block.nodes:
        for index, v in enumerate(node.inputs):
            if v is not None and is_constant(v) and v.shape is not None and len(v.shape) and v.shape[-1] == f and f > 1:
                set_constant(build, node, index, _take_last(constant_array(v), keep, f), "pruned")
    for reshape in block.reshapes:
        set_shape_element(build, reshape, len(shape_elements(reshape.inputs[1])) - 1, len(keep), "pruned")
    w = block.down.nk()[:, keep]
    stored = w.T if block.down.k_axis == 0 else w
    set_constant(build, block.down.node, 1, np.ascontiguousarray(stored.astype(constant_array(block.down.weight).dtype)), "pruned")
    for value in block.values:
        if value.shape is not None and len(value.shape) and value.shape[-1] == f:
            dims = list(value.shape)
            dims[-1] = len(keep)
            value.shape = Shape(dims)
    annotate(block.down.node, PRUNED_FFN, {"width": len(keep), "of": f})


def _take_last(array: np.ndarray, keep: np.ndarray, f: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(array, keep, axis=-1)) if array.shape[-1] == f else array


__all__ = ["FFNBlock", "PruneFFN", "find_ffn", "scan_experts_ffn", "scan_ffn"]
