"""`smoothquant`: migrate activation outliers into the weights (Xiao et al., SmoothQuant).

For a tensor X read only by linear layers `X·W₁, X·W₂, …` (q/k/v reading one
normalized tensor, gate/up reading another) the pass picks one scale per input
channel j,

    s_j = max|X_j|^α / max|W_j|^(1−α)

where max|X_j| is the calibrated per-channel absolute max (`activation-stats`)
and max|W_j| the largest weight of input channel j over *every* consumer, then
rewrites `X·W = (X·diag(1/s))·(diag(s)·W)`: each consumer's weight is scaled
along its input-channel axis (MatMul B `[K, N]`: row j times s_j) and 1/s is
folded into the producer of X, so the model computes the same function and
nothing is inserted at run time.

Producers are found by graph pattern on the IR, not by parameter names:

* `norm` (always): a multiplication by a constant per-channel vector applied
  to a normalized tensor (the decomposed RMSNorm the torch exporter emits:
  `Mul(w, Mul(x, Reciprocal(Sqrt(ReduceMean(x²) + eps))))`), the same
  followed by `Add` of a constant bias (decomposed LayerNorm), and
  `LayerNormalization` / `RMSNormalization` ops along the last axis (scale and
  bias are scaled);
* `all` adds linear producers: a `MatMul` or `Gemm` with a constant weight
  (optionally followed by a constant bias `Add`) whose output only the
  smoothed consumers read, also through the gating `Mul` of a gated MLP
  (`down(silu(gate(x)) * up(x))`: 1/s goes into `up`'s columns). The value →
  output projection pair (`v→o`) passes through reshapes, transposes, the
  GQA head repeat and the attention matmul in exported graphs, so it is not
  matched; where `v` feeds `o` directly it is.

A tied lm_head (`MatMul(X, Transpose(T))`, T the embedding table) is a
consumer too when `exclude` does not name it: T is scaled in place along its
hidden axis and every embedding `Gather` of T is followed by `Mul(rows, 1/s)`,
so the file keeps one table and the embeddings are unchanged.

When something besides the linear layers reads X (or X is a graph output),
folding would change that reader too. For a normalization producer the pass
then inserts `Mul(X, 1/s)` in front of the linear layers instead (ModelOpt's
pre-quant scale; the case of post-LN BERT, whose LayerNorm output is also the
residual); `insert-mul=false` skips such groups. Groups are also skipped when
an intermediate of the producer pattern has other readers, when channel counts
disagree, or when a consumer matches `exclude` (default `lm_head`, as in
`quantize`, which leaves it float). A constant that something else also reads
is copied rather than changed.

With `search=true` each group gets its own α from a grid (0.05 … 0.95), the
one whose expected output error under int8 rounding is smallest
(`expected_error`): SmoothQuant's per-layer α search (as Intel Neural
Compressor's auto-α does by running the layer) with the layer replaced by a
noise model that needs only the calibrated per-channel absmax and mean square.

The pass calibrates (`activation-stats`) only if it found something to
smooth, and reports that it preserves no activation statistics (and no
weights): what was measured before it is stale after it. It preserves the
structure when it only rescaled initializers in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.errors import MissingCalibrationData
from optc.ir import (
    Graph,
    Model,
    Node,
    Value,
    annotate,
    constant_array,
    is_constant,
    sole_transpose,
    tensor,
)
from optc.ir.annotations import PROVENANCE, SMOOTHQUANT
from optc.ir.patterns.builder import Builder
from optc.ir.patterns.match import input_at
from optc.ir.patterns.ops import GEMM_OPS, NORM_OPS, NORM_PATH_OPS, REDUCTION_OPS
from optc.ir.patterns.weights import weight_view
from optc.passes.analyses.activation_stats import ActivationStats
from optc.passes.infra.analysis import STRUCTURE, AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.infra.remarks import match_summary
from optc.passes.layer_selector import LayerSelector, default_exclude

#: Clamp of the smoothing factors.
S_MIN, S_MAX = 1e-5, 1e5
#: The α values `search=true` tries for each group.
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: Largest int8 code of the symmetric grids `quantize` uses.
_QMAX = 127.0


@dataclass(frozen=True)
class ScaleSite:
    """A constant input of a node to scale along one axis (-1: the broadcast channel axis)."""

    node: Node
    index: int
    axis: int


@dataclass
class _Group:
    value: Value
    consumers: list[tuple[Node, int]]  # (node, input-channel axis of its weight)
    producer: str  # "norm" | "linear"
    folds: list[ScaleSite]
    channels: int
    tied: list[tuple[Node, ScaleSite]] = dataclasses.field(default_factory=list)  # (consumer, its Transpose'd table)


@register_pass("smoothquant")
class SmoothQuant(Pass):
    """Move activation outliers into weights: s = max|X|^alpha / max|W|^(1-alpha), 1/s folded into the producer."""

    @dataclass
    class Options:
        alpha: float = option(0.5, help="migration strength in [0, 1]: s = max|X|^alpha / max|W|^(1-alpha)")
        targets: Literal["norm", "all"] = option(
            "norm", help="producers to fold into: norm (RMSNorm/LayerNorm) or all (also linear layers, e.g. up->down)"
        )
        exclude: list[str] = option(
            default_exclude("smoothquant"),
            help="skip groups with a consumer whose node, output or weight (source) name matches (substring or glob); "
            "the default matches quantize's, which leaves lm_head in float",
        )
        search: bool = option(
            False,
            help="choose alpha per group from 0.05..0.95, minimizing the expected int8 output error "
            "(per-tensor activations, per-channel weights) from the calibrated absmax and mean square; alpha is unused",
        )
        insert_mul: bool = option(
            True,
            help="when a norm's output has other readers (post-LN BERT's residual), smooth with an explicit "
            "Mul(x, 1/s) before the linear layers instead of skipping",
        )

        def validate(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"option 'alpha' must be in [0, 1], got {self.alpha}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        misses: list[str] = []
        excluded: list[_Group] = []
        groups = find_groups(model, self.options.targets, self.options.exclude, self.options.insert_mul, tied=True,
                             misses=misses, excluded=excluded)
        self._remark(am.context, groups, misses, excluded)
        if not groups:
            return PassResult(model, False, None, {"groups-smoothed": 0})
        stats = self._activation_stats(model, am)
        graph = model.graph
        build = Builder(graph)  # owns the fresh names of everything this run adds
        copies = inserted = 0
        smoothed = 0
        for group in groups:
            stat = stats.get(group.value.name)
            if stat is None or stat.channel_absmax is None or stat.channel_absmax.size != group.channels:
                continue
            weight_sites = [ScaleSite(n, 1, a) for n, a in group.consumers] + [site for _, site in group.tied]
            # |W|'s channel maxima in the weights' own dtype (a max is exact there): no float64 copy of
            # every weight of the group (a tied 49152x576 table is 226 MB in float64) unless α is searched.
            weight_max = np.max([_channel_absmax(site, group.channels) for site in weight_sites], axis=0)
            alpha = self.options.alpha
            if self.options.search and stat.channel_meansq is not None:
                weights = [_channels_first(site, group.channels) for site in weight_sites]
                alpha = search_alpha(stat.channel_absmax, stat.channel_meansq, weights, weight_max)
                del weights
            s = smoothing_scales(stat.channel_absmax, weight_max, alpha)
            if np.all(s == 1.0):
                continue
            if group.producer == "mul":
                insert_scale_mul(build, group, 1.0 / s)
                inserted += 1
            else:
                copies += scale_sites(build, group.folds, 1.0 / s, group.channels)
            copies += scale_sites(build, [ScaleSite(n, 1, a) for n, a in group.consumers], s, group.channels)
            for _, site in group.tied:
                if _scale_tied_table(build, site, s):
                    inserted += 1
                else:
                    copies += scale_sites(build, [site], s, group.channels)
            info = {"alpha": alpha, "producer": group.producer, "input": group.value.name}
            for node in (*(n for n, _ in group.consumers), *(n for n, _ in group.tied)):
                annotate(node, SMOOTHQUANT, info)
            smoothed += 1
        if not smoothed:
            return PassResult(model, False, None, {"groups-smoothed": 0})
        preserved = PreservedAnalyses()
        if not copies and not inserted:
            preserved.preserve_aspects(STRUCTURE)  # only initializer contents changed
        counts = {"groups-smoothed": smoothed, "constants-copied": copies, "muls-inserted": inserted}
        return PassResult(model, True, preserved, counts)

    def _remark(self, context, groups: list[_Group], misses: list[str], excluded: list[_Group]) -> None:
        """Say what the pattern search found: nothing, normalizations it cannot fold into, exclusions."""
        if misses:
            message = match_summary(len(groups), misses, "norm->linear patterns")
            context.remark("missed", message, matched_none=not groups and not excluded)
        elif not groups and not excluded:
            found = "norm->linear" if self.options.targets == "norm" else "norm->linear or linear->linear"
            context.remark("missed", f"no {found} pattern found", matched_none=True)
        if excluded:
            context.remark("analysis", f"groups skipped by exclude={','.join(self.options.exclude)}: {len(excluded)}")

    def _activation_stats(self, model: Model, am: AnalysisManager):
        from optc.passes.infra.calibration import calibration_spec

        try:
            calibration_spec(model, am.context)
        except MissingCalibrationData as exc:
            message = str(exc).split(": ", 1)[-1]
            raise MissingCalibrationData(f"smoothquant needs per-channel activation ranges from calibration data: {message}") from exc
        return am.get(ActivationStats, model)


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s = act^alpha / w^(1-alpha), 1 where either is 0 (a dead channel), clamped to [1e-5, 1e5]."""
    act = np.asarray(act_max, dtype=np.float64)
    w = np.asarray(weight_max, dtype=np.float64)
    valid = (act > 0) & (w > 0) & np.isfinite(act) & np.isfinite(w)
    s = np.ones_like(act)
    s[valid] = act[valid] ** alpha / w[valid] ** (1.0 - alpha)
    return np.clip(s, S_MIN, S_MAX)


def _channels_first(site: ScaleSite, channels: int) -> np.ndarray:
    """A consumer's weight as float64 [input channels, outputs]."""
    w = constant_array(site.node.inputs[site.index]).astype(np.float64)
    return np.moveaxis(w, site.axis, 0).reshape(channels, -1)


def _channel_absmax(site: ScaleSite, channels: int) -> np.ndarray:
    """max |W| per input channel of a consumer's weight (float64 [channels]), the same as
    `np.abs(_channels_first(site, channels)).max(axis=1)` without a float64 copy of the weight."""
    w = np.moveaxis(constant_array(site.node.inputs[site.index]), site.axis, 0).reshape(channels, -1)
    out = np.empty(channels, dtype=np.float64)
    for start in range(0, channels, _ROWS):
        out[start:start + _ROWS] = np.abs(w[start:start + _ROWS]).max(axis=1)
    return out


#: Channels that `_channel_absmax` reads at a time, and about how many elements `_scale_array_banded` scales at a time.
_ROWS = 64
_BAND_ELEMENTS = 1 << 20


def expected_error(act_max: np.ndarray, act_meansq: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """Expected squared output error per token of X·W after smoothing by `s` and int8 rounding of both operands.

    Rounding to a step Δ adds independent noise of variance Δ²/12 to each element: the activation
    X/s gets one step per tensor (its absmax / 127), each output column of diag(s)·W its own. The
    activation noise reaches the output through ‖diag(s)·W‖²_F, the weight noise through Σ E[x_j²]/s_j².
    `weights` are [input channels, outputs] arrays.
    """
    step_x = float(np.max(act_max / s)) / _QMAX
    x_power = float(np.sum(act_meansq / (s * s)))
    error = 0.0
    for w in weights:
        scaled = w * s[:, None]
        step_w = np.abs(scaled).max(axis=0) / _QMAX
        error += step_x * step_x / 12.0 * float(np.sum(scaled * scaled)) + x_power * float(np.sum(step_w * step_w)) / 12.0
    return error


def search_alpha(act_max: np.ndarray, act_meansq: np.ndarray, weights: list[np.ndarray], weight_max: np.ndarray) -> float:
    """The α of `ALPHA_GRID` with the smallest `expected_error` (the smaller α on a tie)."""
    act = np.asarray(act_max, dtype=np.float64)
    meansq = np.asarray(act_meansq, dtype=np.float64)
    errors = [expected_error(act, meansq, weights, smoothing_scales(act, weight_max, a)) for a in ALPHA_GRID]
    return ALPHA_GRID[int(np.argmin(errors))]


# --------------------------------------------------------------------------- matching


def find_groups(
    model: Model, targets: str = "norm", exclude: list[str] | tuple[str, ...] = (), insert_mul: bool = False,
    tied: bool = False, *, misses: list[str] | None = None, excluded: list[_Group] | None = None,
) -> list[_Group]:
    """Every tensor whose readers are all linear layers and whose producer can absorb 1/s, in graph order.

    With `tied`, a linear layer may also read its weight through a `Transpose`
    of a constant (a tied lm_head reading the embedding table). `misses`
    receives why each normalization read by linear layers is not a group;
    `excluded` the groups that `exclude` removed.
    """
    graph = model.graph
    selector = LayerSelector.of(exclude)
    seen: set[int] = set()
    groups = []
    for node in graph:
        axis = balance_axis(node)
        if axis is None and not (tied and tied_weight_site(node) is not None):
            continue
        x = node.inputs[0]
        if id(x) in seen:
            continue
        seen.add(id(x))
        group = _group_for(x, targets, insert_mul, tied)
        if group is None:
            if misses is not None and _norm_output(x):
                misses.append(_why_not(x, tied, insert_mul))
            continue
        if exclude and not all(selector.selects(n, input_at(n, 1)) for n in (*(c for c, _ in group.consumers),
                                                                                   *(c for c, _ in group.tied))):
            if excluded is not None:
                excluded.append(group)
            continue
        groups.append(group)
    return groups


def _norm_output(x: Value) -> bool:
    """True when `x` is a normalization's output (with its affine scale and bias): what `targets=norm` folds into."""
    node = x.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in NORM_OPS:
        return True
    if node.op_type == "Add" and len(node.inputs) == 2:
        inner = [v for v in node.inputs if v is not None and not is_constant(v)]
        return len(inner) == 1 and len([v for v in node.inputs if is_constant(v)]) == 1 and _norm_output(inner[0])
    if node.op_type == "Mul" and len(node.inputs) == 2 and sum(is_constant(v) for v in node.inputs) == 1:
        return any(_is_normalized(v) for v in node.inputs if not is_constant(v))
    return False


def _why_not(x: Value, tied: bool, insert_mul: bool) -> str:
    """Why the normalization output `x`, read by linear layers, is not a group (see `_group_for`)."""
    channels = set()
    others = x.is_graph_output()
    for use in x.uses():
        axis = balance_axis(use.node)
        if axis is not None and use.idx == 0 and use.node.inputs[1] is not x:
            channels.add(int(use.node.inputs[1].shape[axis]))
        elif not (tied and use.idx == 0 and tied_weight_site(use.node) is not None):
            others = True
    if len(channels) > 1:
        return "its linear readers disagree on the channel count"
    if others and not insert_mul:
        return "its output has other readers (insert-mul=false)"
    return "its scale or an intermediate of the norm is not a per-channel constant only it reads"


def balance_axis(node: Node) -> int | None:
    """The input-channel axis of the weight when `node` is X·W with a constant 2-D W, else None."""
    view = weight_view(node, through=(), ops=GEMM_OPS)  # the weight itself, no op in between
    if view is None or view.constant.shape is None or len(view.constant.shape) != 2:
        return None
    trans_a = node.attributes.get("transA") if node.op_type == "Gemm" else None
    if trans_a is not None and trans_a.as_int():
        return None
    return view.k_axis


def tied_weight_site(node: Node) -> ScaleSite | None:
    """A MatMul reading its weight as `Transpose(T)` of a 2-D constant: the site of T's input-channel axis."""
    view = weight_view(node, through=("Transpose",), ops=("MatMul",))
    if view is None or len(view.path) != 1 or view.perm != (1, 0) or view.k_axis is None:
        return None
    if sole_transpose(node.inputs[1]) is None:  # the Transpose only this MatMul reads
        return None
    table = view.constant
    if table.dtype is None or not table.dtype.is_floating_point():
        return None
    return ScaleSite(view.reader, 0, view.k_axis)  # W = Tᵀ: W's input channels (axis 0) are T's axis 1


def _group_for(x: Value, targets: str, insert_mul: bool = True, tied: bool = False) -> _Group | None:
    if x.is_graph_input():
        return None
    consumers: list[tuple[Node, int]] = []
    tied_sites: list[tuple[Node, ScaleSite]] = []
    shared = x.is_graph_output()
    for use in x.uses():
        node, index = use.node, use.idx
        axis = balance_axis(node)
        site = tied_weight_site(node) if tied and axis is None and index == 0 else None
        if site is not None:
            if all(node is not other for other, _ in tied_sites):
                tied_sites.append((node, site))
            continue
        if axis is None or index != 0 or node.inputs[1] is x:
            shared = True  # read by something that is not a smoothable linear layer
            continue
        if all(node is not other for other, _ in consumers):
            consumers.append((node, axis))
    if not consumers and not tied_sites:
        return None
    channels = {int(n.inputs[1].shape[a]) for n, a in consumers}
    channels |= {int(site.node.inputs[0].shape[site.axis]) for _, site in tied_sites}
    if len(channels) != 1:
        return None
    (c,) = channels
    if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int) and x.shape[-1] != c:
        return None
    plan = _plan(x, c, targets)
    if plan is None:
        return None
    kind, folds = plan
    if shared:
        # Folding into the producer would change the other readers too (post-LN BERT: the LayerNorm output
        # is also the residual). For a normalization, smooth with an explicit Mul(x, 1/s) in front of the
        # linear layers instead (ModelOpt's pre-quant scale).
        if not insert_mul or kind != "norm":
            return None
        kind, folds = "mul", []
    return _Group(x, consumers, kind, folds, c, tied_sites)


def _plan(x: Value, c: int, targets: str) -> tuple[str, list[ScaleSite]] | None:
    """How to fold a per-channel 1/s into the producer of `x`: (kind, constant sites), or None."""
    node = x.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in NORM_OPS and node.outputs[0] is x:
        if not _norm_along_last_axis(node, x):
            return None
        sites = [ScaleSite(node, i, -1) for i in (1, 2) if i < len(node.inputs) and node.inputs[i] is not None]
        if not sites or not all(_per_channel_constant(node.inputs[s.index], c) for s in sites):
            return None
        return "norm", sites
    if op == "Mul":
        const = _constant_operand(node, c)
        if const is not None:
            other = node.inputs[1 - const]
            if _is_normalized(other):
                return "norm", [ScaleSite(node, const, -1)]
            # Any product with a per-channel constant absorbs 1/s exactly.
            return ("scale", [ScaleSite(node, const, -1)]) if targets == "all" else None
        if targets != "all" or node.inputs[0] is node.inputs[1]:
            return None
        for i in _gating_order(node):
            sub = _linear_plan(node.inputs[i], c, node)
            if sub is not None:
                return "linear", sub
        return None
    if op == "Add":
        const = _constant_operand(node, c)
        if const is None:
            return None
        inner = node.inputs[1 - const]
        if not _only_read_by(inner, node):
            return None
        sub = _plan(inner, c, targets)
        if sub is None:
            return None
        return sub[0], [*sub[1], ScaleSite(node, const, -1)]
    if targets == "all":
        return _linear_sites(node, c)
    return None


def _linear_plan(value: Value, c: int, reader: Node) -> list[ScaleSite] | None:
    """Sites that scale `value`'s channels when it is a linear layer's output read only by `reader`."""
    if value is None or is_constant(value) or not _only_read_by(value, reader):
        return None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Add":
        const = _constant_operand(node, c)
        if const is None:
            return None
        inner = node.inputs[1 - const]
        sub = _linear_plan(inner, c, node)
        return None if sub is None else [*sub, ScaleSite(node, const, -1)]
    plan = _linear_sites(node, c)
    return None if plan is None else plan[1]


def _linear_sites(node: Node, c: int) -> tuple[str, list[ScaleSite]] | None:
    """The sites that scale the `c` output channels of a linear layer (its weight, and a Gemm's bias)."""
    view = weight_view(node, through=(), ops=GEMM_OPS)  # the weight itself, no op in between
    w = view.constant if view is not None else None
    if w is None or w.shape is None or len(w.shape) != 2 or w.shape[view.out_axis] != c:
        return None
    sites = [ScaleSite(node, 1, view.out_axis)]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        if not _per_channel_constant(node.inputs[2], c):
            return None
        sites.append(ScaleSite(node, 2, -1))
    return "linear", sites


def _gating_order(node: Node) -> list[int]:
    """Operands of a gating Mul, the plain linear one first (the other is usually behind an activation)."""
    def rank(i: int) -> int:
        producer = node.inputs[i].producer()
        return 0 if producer is not None and producer.op_type in (*GEMM_OPS, "Add") else 1

    return sorted((0, 1), key=rank)


def _only_read_by(value: Value, reader: Node) -> bool:
    uses = list(value.uses())
    return (
        len(uses) == 1 and uses[0].node is reader and not value.is_graph_output() and not value.is_graph_input()
    )


def _constant_operand(node: Node, c: int) -> int | None:
    """The index of the one constant, per-channel-compatible operand of a binary op, else None."""
    if len(node.inputs) != 2:
        return None
    flags = [is_constant(v) for v in node.inputs]
    if flags.count(True) != 1:
        return None
    i = flags.index(True)
    return i if _per_channel_constant(node.inputs[i], c) else None


def _per_channel_constant(value: Value | None, c: int) -> bool:
    """A float constant that broadcasts along the last axis only: shape (), [c], [1, ..., 1, c] or all ones."""
    if not is_constant(value) or value.shape is None:
        return False
    if value.dtype is None or not value.dtype.is_floating_point():
        return False
    dims = list(value.shape)
    if not dims:
        return True
    return all(d == 1 for d in dims[:-1]) and dims[-1] in (1, c)


def _norm_along_last_axis(node: Node, x: Value) -> bool:
    attr = node.attributes.get("axis")
    axis = attr.as_int() if attr is not None else -1
    if axis == -1:
        return True
    return x.shape is not None and axis == len(x.shape) - 1


def _is_normalized(value: Value | None) -> bool:
    """True when `value` is x scaled by a per-token statistic of x (RMSNorm/LayerNorm without affine)."""
    if value is None or is_constant(value):
        return False
    node = value.producer()
    if node is None:
        return False
    if node.op_type in NORM_OPS:
        return True
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    candidates = [b] if node.op_type == "Div" else [a, b]
    return any(_reaches_reduction(v, depth=6) for v in candidates if v is not None and not is_constant(v))


def _reaches_reduction(value: Value, depth: int) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type in REDUCTION_OPS:
        return True
    if node.op_type not in NORM_PATH_OPS:
        return False
    return any(_reaches_reduction(v, depth - 1) for v in node.inputs if v is not None and not is_constant(v))


# --------------------------------------------------------------------------- rewriting


def scale_sites(graph: Graph | Builder, sites: list[ScaleSite], factor: np.ndarray, channels: int) -> int:
    """Multiply each site's constant by `factor` along its channel axis; returns how many constants were copied."""
    build = graph if isinstance(graph, Builder) else None  # made when a copy needs a name
    by_value: dict[int, list[ScaleSite]] = {}
    values: dict[int, Value] = {}
    for site in sites:
        value = site.node.inputs[site.index]
        by_value.setdefault(id(value), []).append(site)
        values[id(value)] = value
    copies = 0
    for key, group in by_value.items():
        value = values[key]
        axes = {s.axis for s in group}
        if len(axes) != 1:
            raise AssertionError(f"constant {value.name!r} scaled along two axes")
        array = constant_array(value)
        scaled = _scale_array_banded(array, factor, axes.pop(), channels)
        uses = {(id(u.node), u.idx) for u in value.uses()}
        wanted = {(id(s.node), s.index) for s in group}
        if uses == wanted and not value.is_graph_output():
            value.const_value = tensor(scaled, name=value.name)
            value.shape = _shape_of(scaled)
            _spill_now(value)
        else:
            build = build or Builder(graph)
            new = build.initializer(f"{value.name}_smoothed", scaled)
            for k, v in value.metadata_props.items():
                new.metadata_props[k] = v
            for site in group:
                site.node.replace_input_with(site.index, new)
            copies += 1
    return copies


def _spill_now(value: Value) -> None:
    """Move a weight rescaled in place to the run's spill file at once, when one is attached (the pass
    manager spills only after the pass, by when a 1B model's rescaled weights would all be in RAM)."""
    from optc.ir.spill import attached

    graph = value.graph
    spill = attached(graph) if graph is not None else None
    if spill is not None:
        spill.spill_value(value)


def _scale_tied_table(build: Builder, site: ScaleSite, factor: np.ndarray) -> bool:
    """Scale a table read by a tied lm_head (through `site`'s Transpose) and by embedding Gathers, keeping it tied.

    The table T [vocab, hidden] becomes T·diag(s) in place, and every Gather
    of its rows is followed by `Mul(rows, 1/s)`, so the embeddings are
    unchanged and the file keeps one table. False (nothing done) when
    something else reads T.
    """
    table = site.node.inputs[site.index]
    if table.is_graph_output():
        return False
    gathers = []
    for use in table.uses():
        node = use.node
        if node is site.node:
            continue
        axis = node.attributes.get("axis")
        if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or use.idx != 0
                or (axis is not None and axis.as_int() != 0) or node.outputs[0].is_graph_output()):
            return False
        gathers.append(node)
    array = constant_array(table)
    table.const_value = tensor(_scale_array_banded(array, factor, site.axis, array.shape[site.axis]), name=table.name)
    _spill_now(table)
    for gather in gathers:
        rows = gather.outputs[0]
        readers = list(rows.uses())
        mul = _scaling_mul(build, rows, (1.0 / factor).astype(array.dtype), f"{table.name}_unsmooth", f"{rows.name}_unsmooth")
        build.graph.insert_after(gather, [mul])
        for use in readers:
            use.node.replace_input_with(use.idx, mul.outputs[0])
    return True


def _scaling_mul(build: Builder, x: Value, factor: np.ndarray, scale_name: str, name: str) -> Node:
    """A new `Mul(x, factor)` node (not yet inserted), typed like x, with `factor` as a new initializer."""
    scale = build.initializer(scale_name, factor)
    mul = build.node("Mul", [x, scale], name=name, outputs=[f"{name}ed"])
    if x.dtype is not None:
        mul.outputs[0].dtype = x.dtype
        mul.outputs[0].shape = x.shape
    annotate(mul, PROVENANCE, "smoothquant")
    return mul


def insert_scale_mul(graph: Graph | Builder, group: _Group, inverse: np.ndarray) -> None:
    """x_smoothed = Mul(x, 1/s), read by the group's linear layers instead of x."""
    x = group.value
    dtype = np.float16 if x.dtype is not None and x.dtype.name == "FLOAT16" else np.float32
    build = Builder.of(graph)
    mul = _scaling_mul(build, x, inverse.astype(dtype), f"{x.name}_smooth_scale", f"{x.name}_smooth")
    first = min((n for n, _ in group.consumers), key=_position(build.graph))
    build.graph.insert_before(first, [mul])
    for node, _ in group.consumers:
        node.replace_input_with(0, mul.outputs[0])


def _position(graph):
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda node: order.get(id(node), len(order))


def _scale_array(array: np.ndarray, factor: np.ndarray, axis: int, channels: int) -> np.ndarray:
    dtype = array.dtype
    data = array.astype(np.float64)
    if axis == -1:
        if data.ndim == 0:
            data = data.reshape(1)
        if data.shape[-1] == 1 and channels != 1:
            data = np.broadcast_to(data, (*data.shape[:-1], channels))
        return (data * factor).astype(dtype)
    shape = [1] * data.ndim
    shape[axis] = channels
    return (data * factor.reshape(shape)).astype(dtype)


def _scale_array_banded(array: np.ndarray, factor: np.ndarray, axis: int, channels: int) -> np.ndarray:
    """`_scale_array` a band of slices at a time (the same float64 products, element by element): a large
    weight needs its output and one band in float64 instead of two float64 copies of the whole."""
    if array.ndim < 2 or axis == -1 or array.shape[axis] != channels:
        return _scale_array(array, factor, axis, channels)
    band_axis = 0 if axis % array.ndim != 0 else 1
    out = np.empty(array.shape, dtype=array.dtype)
    shape = [1] * array.ndim
    shape[axis] = channels
    scale = factor.reshape(shape)
    step = max(1, _BAND_ELEMENTS // max(1, array.size // array.shape[band_axis]))
    for start in range(0, array.shape[band_axis], step):
        index = [slice(None)] * array.ndim
        index[band_axis] = slice(start, start + step)
        out[tuple(index)] = (array[tuple(index)].astype(np.float64) * scale).astype(array.dtype)
    return out


def _shape_of(array: np.ndarray):
    from optc.ir import Shape

    return Shape(list(array.shape))


__all__ = ["SmoothQuant", "balance_axis", "expected_error", "find_groups", "search_alpha", "smoothing_scales"]
