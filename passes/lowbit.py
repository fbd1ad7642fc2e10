"""Shared numerics and IR form of weight-only low-bit quantization (`rtn`, `gptq`, `awq`).

Numerics (torch, vectorized; on CUDA when `torch.cuda.is_available()`): a
weight is handled as `W [N, K]` (one row per output channel, K input channels,
the layout of a PyTorch Linear), cut into groups of `group` consecutive input
channels (the last one may be shorter; `group=-1` is one group per row:
per-channel). Each group gets a scale (and a zero point when asymmetric) on
the integer grid of `bits` bits:

* symmetric: q ∈ [−2^(b−1), 2^(b−1)−1], w ≈ q·s, s = r·max|w| / (2^(b−1)−1);
* asymmetric: q ∈ [0, 2^b−1], w ≈ (q − z)·s, s = r·(max − min) / (2^b−1),
  z = round(−r·min / s).

r = 1 is min-max; with `clip` the ratio r ∈ [CLIP_MIN, 1] that minimizes each
group's squared weight error is searched on a grid (as GPTQ's `mse` observer
and AWQ's clipping search do; r = 7/8 is symmetric's "largest magnitude on −8").

IR form (what `rtn`/`gptq`/`awq` emit and the backends read): a MatMul weight
`B [K, N]` becomes a packed integer initializer (INT4/UINT4 for ≤ 4 bits,
INT8/UINT8 for 5–8 bits, same layout as B), a float scale (and an integer zero
point when asymmetric) and a standard `DequantizeLinear` (opset 21) with
`axis=0, block_size=group` (blocks along K), or `axis=1` per channel, whose
output the MatMul reads. A Gemm with `transB=1` (B `[N, K]`) uses axis 1 /
axis 0 instead. The op is annotated `quant` with `{"weights": "int4",
"bits": 4, "group": 128, "symmetric": true, "method": ..., "activations":
"float", ...}`.

Mixture-of-experts weights (`optc.passes.linear_layers.Experts`: a stacked
`W [E, N, K]` or `[E, K, N]` gathered per token by a GatherND into a batched
MatMul) take the same numerics, each expert a matrix of its own (its rows
stacked with the other experts': rows are independent), and the same IR form in
3-D: codes of W's shape and a blocked `DequantizeLinear` along K (`axis` 2 or
1, `block_size=group`, or K for per-channel) whose output the GatherND reads;
the GatherND is annotated `quant` (`"op": "GatherND"`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import ml_dtypes
import numpy as np
import torch

from optc.errors import OptcError
from optc.ir import (
    DataType,
    Model,
    Node,
    Value,
    annotate,
    annotation,
    source_name,
)
from optc.ir.annotations import PROVENANCE, QUANTIZATION, QUANTIZATION_SKIPPED
from optc.ir.opset import default_opset, ensure_opset
from optc.ir.patterns.builder import Builder
from optc.ir.patterns.ops import GEMM_OPS
from optc.ir.patterns.qdq import dequantized
from optc.passes.analyses.hessian import calibration_hessians
from optc.passes.attention import value_paths
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.layer_selector import LayerSelector, default_exclude
from optc.passes.linear_layers import Experts, Linear, experts, linear, torch_threads

#: Smallest clipping ratio searched with `clip`, and how many ratios.
CLIP_MIN = 0.6
CLIP_STEPS = 16
BITS = (2, 3, 4, 5, 6, 7, 8)
#: Elements of W a step of the clip search works on at once (1 MiB of float32: in cache, few torch calls).
_CHUNK = 1 << 18
#: Blocked DequantizeLinear and INT4 need opset 21 of the default domain.
LOWBIT_OPSET = 21
#: Why the calibrated passes round a mixture of experts' weights to nearest instead.
EXPERTS_NOT_CALIBRATED = "per-expert statistics need each expert's routed tokens, which calibration does not collect"
#: A weight view the site finders select from.
S = TypeVar("S", Linear, Experts)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Grid:
    """An integer grid: `bits` bits, symmetric (signed, zero point 0) or asymmetric (unsigned, zero point)."""

    bits: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def storage(self) -> str:
        """The element type that stores it: int4/uint4 up to 4 bits, int8/uint8 above."""
        return ("int" if self.symmetric else "uint") + ("4" if self.bits <= 4 else "8")

    def numpy_dtype(self):
        return {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}[self.storage]


def group_size(group: int, k: int) -> int:
    """Columns per group: `group`, or all K for per-channel (-1 or 0, or a group at least K)."""
    return k if group <= 0 or group >= k else group


def group_index(k: int, group: int, device: torch.device | None = None) -> torch.Tensor:
    """The group of each input channel (0..ceil(K/g)-1)."""
    return torch.arange(k, device=device) // group_size(group, k)


def _grouped(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] padded to [N, G, g] (pad repeats the last column, so group extrema do not change) and a mask."""
    n, k = w.shape
    groups = -(-k // g)
    pad = groups * g - k
    mask = torch.ones(groups * g, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
        mask[k:] = False
    return w.reshape(n, groups, g), mask.reshape(groups, g)


def _params(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [lo, hi] (per group)."""
    if grid.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / grid.qmax
        zero = torch.zeros_like(scale)
    else:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        scale = (hi - lo) / grid.qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(grid.qmin, grid.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes of `w` (broadcast against scale/zero): clamp(round(w/s) + z)."""
    return torch.clamp(torch.round(w / scale) + zero, grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def find_params(
    w: torch.Tensor, group: int, grid: Grid, *, clip: bool = False, importance: torch.Tensor | None = None,
    norm: float = 2.0, hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point [N, G] of W [N, K] (min-max, or the clip ratio with least error).

    The clip search minimizes Σ_k importance_k·|w − q|^norm per group: `importance` [K] (default ones)
    weighs each input channel, e.g. by the Hessian diagonal E[x_k²], so the range fits the weights
    whose inputs are large; `norm` 2.4 is the reference GPTQ code's `mse` observer. With `hessian`
    (XᵀX [K, K] of the layer's input) it minimizes each group's output error instead,
    Δw_gᵀ·(XᵀX)_gg·Δw_g, cross terms within the group included: AWQ's clipping search (Lin et al.,
    llm-awq `auto_clip`, which measures X_g·Δw_g on sampled tokens).
    """
    g = group_size(group, w.shape[1])
    wg, mask = _grouped(w.float(), g)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale, zero = _params(lo, hi, grid)
    if not clip:
        return scale, zero
    if hessian is not None:
        blocks = _diagonal_blocks(hessian.float().to(w.device), g)

        def error(chunk: torch.Tensor, s: torch.Tensor, z: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
            return _group_output_error(chunk, blocks, s, z, grid)
    else:
        weight: torch.Tensor | None = None if bool(mask.all()) else mask.float()
        if importance is not None:
            imp, _ = _grouped(importance.float().reshape(1, -1).to(w.device), g)
            weight = imp[0] if weight is None else weight * imp[0]

        def error(chunk: torch.Tensor, s: torch.Tensor, z: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
            return _group_error(chunk, weight, s, z, grid, norm, work)
    ratios = torch.linspace(1.0, CLIP_MIN, CLIP_STEPS + 1)[1:].tolist()
    # Rows in chunks of about _CHUNK elements, so the search's temporaries stay in the CPU's cache.
    rows = max(1, _CHUNK // wg[0].numel())
    buffer = torch.empty((min(rows, wg.shape[0]), *wg.shape[1:]), dtype=wg.dtype, device=wg.device)
    for start in range(0, wg.shape[0], rows):
        part = slice(start, start + rows)
        chunk, low, high = wg[part], lo[part], hi[part]
        work = buffer[:chunk.shape[0]]
        best = error(chunk, scale[part], zero[part], work)
        for r in ratios:
            s, z = _params(low * r, high * r, grid)
            err = error(chunk, s, z, work)
            better = err < best
            best = torch.where(better, err, best)
            scale[part] = torch.where(better, s, scale[part])
            zero[part] = torch.where(better, z, zero[part])
    return scale, zero


def _group_error(
    wg: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, grid: Grid,
    norm: float = 2.0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ weight·|dequantize(quantize(w)) − w|^norm per group (the ops of `quantize` and `dequantize`, in
    place in `out`, a buffer of wg's shape)."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    diff = torch.div(wg, s, out=out) if out is not None else wg / s
    diff.round_().add_(z).clamp_(grid.qmin, grid.qmax).sub_(z).mul_(s).sub_(wg)
    err = diff.square_() if norm == 2.0 else diff.abs_().pow_(norm)
    if weight is not None:
        err.mul_(weight)
    return err.sum(dim=-1)


def _diagonal_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal blocks [G, g, g] of a [K, K] matrix (the last one zero-padded to g)."""
    k = h.shape[0]
    groups = -(-k // g)
    padded = torch.zeros(groups * g, groups * g, dtype=h.dtype, device=h.device)
    padded[:k, :k] = h
    idx = torch.arange(groups, device=h.device)
    return padded.reshape(groups, g, groups, g)[idx, :, idx, :]


def _group_output_error(
    wg: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid,
) -> torch.Tensor:
    """Δw_gᵀ·H_gg·Δw_g for every row and group [N, G] (`blocks`: H's diagonal blocks [G, g, g])."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    diff = dequantize(quantize(wg, s, z, grid), s, z) - wg
    return torch.einsum("ngi,gij,ngj->ng", diff, blocks, diff)


def expand(params: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """Per-group [N, G] → per-column [N, K]."""
    return params[:, group_index(k, group, params.device)]


def rtn(
    w: torch.Tensor, group: int, grid: Grid, *, clip: bool = False, hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: integer codes [N, K], scale and zero point [N, G] (`hessian`: clip on the output error)."""
    scale, zero = find_params(w, group, grid, clip=clip, hessian=hessian)
    k = w.shape[1]
    q = quantize(w.float(), expand(scale, k, group), expand(zero, k, group), grid)
    return q, scale, zero


def fake_quantize(
    w: torch.Tensor, group: int, grid: Grid, *, clip: bool = False, hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """W after quantization and dequantization (float)."""
    q, scale, zero = rtn(w, group, grid, clip=clip, hessian=hessian)
    k = w.shape[1]
    return dequantize(q, expand(scale, k, group), expand(zero, k, group))


# --------------------------------------------------------------------------- weight sites in the IR


def linear_site(node: Node) -> Linear | None:
    """The site of a MatMul/Gemm (alpha 1) with a constant float 2-D weight and an activation input, else None."""
    site = linear(node)
    if site is None:
        return None
    alpha = node.attributes.get("alpha") if node.op_type == "Gemm" else None
    if alpha is not None and alpha.as_float() != 1.0:
        return None
    return site


def _select(model: Model, view: Callable[[Node], S | None], exclude: list[str] | tuple[str, ...]) -> tuple[list[S], list[Node]]:
    """The nodes `view` sees in graph order, split into those `exclude` leaves to quantize and those it matched."""
    selector = LayerSelector.of(exclude)
    sites, excluded = [], []
    for node in model.graph:
        site = view(node)
        if site is None:
            continue
        if selector.selects(node, site.weight):
            sites.append(site)
        else:
            excluded.append(node)
    return sites, excluded


def linear_sites(model: Model, exclude: list[str] | tuple[str, ...] = ()) -> tuple[list[Linear], list[Node]]:
    """Quantizable linear layers in graph order (not yet quantized), and the weighted ops `exclude` matched."""
    return _select(model, linear_site, exclude)


def remark_sites(context, model: Model, sites: list[Linear], excluded: list[Node]) -> None:
    """The remarks of a weight-only pass: nothing to quantize, layers it cannot take and why, excluded ones."""
    unsupported = already = 0
    for node in model.graph:
        if linear(node) is not None and linear_site(node) is None:
            unsupported += 1  # a Gemm with alpha != 1
        elif node.op_type in GEMM_OPS and len(node.inputs) > 1 and node.inputs[1] is not None:
            already += dequantized(node.inputs[1]) is not None
    if unsupported:
        message = f"{len(sites)} of {len(sites) + unsupported} linear layers quantizable: Gemm with alpha != 1"
        context.remark("missed", message, matched_none=not sites and not excluded)
    elif not sites and not excluded:
        if already:
            context.remark("analysis", f"nothing left to quantize: MatMul/Gemm ops already quantized: {already}")
        else:
            context.remark("missed", "nothing to quantize: no MatMul/Gemm with a constant float 2-D weight",
                           matched_none=True)
    if excluded:
        context.remark("analysis", f"linear layers left float by exclude: {len(excluded)}")


def matches(node: Node, patterns) -> bool:
    """Whether a node, its outputs or its weight (also by source name) match a pattern (substring or glob)."""
    return not LayerSelector.of(patterns).selects(node, node.inputs[1] if len(node.inputs) > 1 else None)


def _second_input(node: Node) -> Value | None:
    return node.inputs[1] if len(node.inputs) > 1 else None


def mark_excluded(nodes: list[Node], exclude: list[str], weight_of: Callable[[Node], Value | None] = _second_input) -> int:
    """Annotate each excluded node `quant_skipped` with the selector's reason (`weight_of`: the weight it
    reads, by default its second input); returns how many changed."""
    selector = LayerSelector.of(exclude)
    changed = 0
    for node in nodes:
        reason = selector.why_not(node, weight_of(node))
        if reason is not None and annotation(node, QUANTIZATION_SKIPPED) != reason and annotation(node, QUANTIZATION) is None:
            annotate(node, QUANTIZATION_SKIPPED, reason)
            changed += 1
    return changed


def emit(
    model: Model, site: Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    grid: Grid, group: int, info: dict, build: Builder | None = None,
) -> dict:
    """Store codes q [N, K] with scale/zero [N, G] as integer initializer + DequantizeLinear feeding the op.

    The model must already be at `LOWBIT_OPSET` (find the sites with `sites_at_opset`). `build`: the
    pass run's builder (one per run names without scanning the graph each time).
    """
    if (default_opset(model) or 0) < LOWBIT_OPSET:
        raise OptcError(f"low-bit weights need opset {LOWBIT_OPSET}: find the layers with sites_at_opset first")
    graph = model.graph
    build = build if build is not None else Builder(graph)
    node, weight = site.node, site.weight
    n, k = q.shape
    g = group_size(group, k)
    per_channel = g >= k
    float_np = np.float16 if weight.dtype == DataType.FLOAT16 else np.float32
    # int16 holds every code of up to 8 bits (a quarter of a 1B model's 5632-wide layer in int32 is 46 MB).
    codes = q.to("cpu", torch.int16 if grid.bits <= 8 else torch.int32).numpy()
    s = scale.to("cpu", torch.float32).numpy().astype(float_np)
    z = zero.to("cpu", torch.int32).numpy()
    if per_channel:
        s, z = s[:, 0], z[:, 0]
    elif site.k_axis == 0:
        s, z = s.T, z.T  # [G, N] for blocks along axis 0 of B [K, N]
    data = codes if site.k_axis == 1 else codes.T
    dtype = grid.numpy_dtype()
    base = weight.name or "weight"
    q_value = build.initializer(f"{base}_q{grid.bits}", data.astype(dtype, order="C"))
    del codes, data
    for key, v in weight.metadata_props.items():
        q_value.metadata_props[key] = v
    inputs = [q_value, build.initializer(f"{base}_scale", np.ascontiguousarray(s))]
    if not grid.symmetric:
        inputs.append(build.initializer(f"{base}_zero_point", np.ascontiguousarray(z).astype(dtype)))
    k_axis = site.k_axis
    attributes: dict = {"axis": 1 - k_axis if per_channel else k_axis}
    if not per_channel:
        attributes["block_size"] = g
    _insert_dequantize(build, node, 1, weight, inputs, attributes, base, info)
    return _annotate_quantized(node, grid, g if not per_channel else -1, attributes["axis"], q_value, weight, info)


def expert_sites(model: Model, exclude: list[str] | tuple[str, ...] = ()) -> tuple[list[Experts], list[Node]]:
    """Stacked expert weights to quantize in graph order, and the GatherNDs `exclude` matched."""
    return _select(model, experts, exclude)


def emit_experts(
    model: Model, site: Experts, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    grid: Grid, group: int, info: dict, build: Builder | None = None,
) -> dict:
    """Store stacked expert codes q `[E·N, K]` with scale/zero `[E·N, G]` (`Experts.matrix` order) as a 3-D
    integer initializer of W's shape + blocked DequantizeLinear along K feeding the GatherND."""
    if (default_opset(model) or 0) < LOWBIT_OPSET:
        raise OptcError(f"low-bit weights need opset {LOWBIT_OPSET}: raise it before emitting experts")
    graph = model.graph
    build = build if build is not None else Builder(graph)
    weight = site.weight
    e, n, k = site.count, site.out_features, site.in_features
    g = group_size(group, k)
    per_channel = g >= k

    def stacked(t: torch.Tensor, dtype) -> np.ndarray:
        array = t.to("cpu").numpy().reshape(e, n, -1)  # [E, N, K or G]
        return np.ascontiguousarray(array if site.k_axis == 2 else array.transpose(0, 2, 1)).astype(dtype)

    dtype = grid.numpy_dtype()
    float_np = np.float16 if weight.dtype == DataType.FLOAT16 else np.float32
    base = weight.name or "experts"
    q_value = build.initializer(f"{base}_q{grid.bits}", stacked(q.to(torch.int32), np.int32).astype(dtype))
    for key, v in weight.metadata_props.items():
        q_value.metadata_props[key] = v
    inputs = [q_value, build.initializer(f"{base}_scale", stacked(scale.to(torch.float32), float_np))]
    if not grid.symmetric:
        inputs.append(build.initializer(f"{base}_zero_point", stacked(zero.to(torch.int32), np.int32).astype(dtype)))
    attributes = {"axis": site.k_axis, "block_size": g}
    _insert_dequantize(build, site.node, 0, weight, inputs, attributes, base, info)
    return _annotate_quantized(site.node, grid, g if not per_channel else -1, site.k_axis, q_value, weight, info,
                               scheme_suffix=f", {e} experts")


def _insert_dequantize(build: Builder, node: Node, index: int, weight: Value, inputs: list[Value],
                       attributes: dict, base: str, info: dict) -> None:
    """DequantizeLinear(`inputs`) before `node`, read as its input `index` in place of the float `weight`."""
    graph = build.graph
    dq = build.node("DequantizeLinear", inputs, attributes=attributes, name=f"{base}_DequantizeLinear",
                    outputs=[f"{base}_dequantized"])
    annotate(dq, PROVENANCE, info.get("method", "lowbit"))
    dq.outputs[0].dtype = weight.dtype
    dq.outputs[0].shape = weight.shape
    graph.insert_before(node, [dq])
    node.replace_input_with(index, dq.outputs[0])
    if not weight.uses() and not weight.is_graph_output() and weight.name in graph.initializers:
        graph.initializers.pop(weight.name)
        build.release(weight.name)


def _annotate_quantized(node: Node, grid: Grid, group: int, axis: int, q_value: Value, weight: Value, info: dict,
                        scheme_suffix: str = "") -> dict:
    """The `quant` annotation of a weight-only op (group -1: per channel); returned as written."""
    per_channel = group == -1
    full = {
        "op": node.op_type,
        "weights": grid.storage if grid.bits in (4, 8) else f"{grid.storage}({grid.bits}-bit)",
        "bits": grid.bits,
        "group": group,
        "symmetric": grid.symmetric,
        "weight_scheme": ("per-channel" if per_channel else f"group {group}")
        + (" symmetric" if grid.symmetric else " asymmetric") + scheme_suffix,
        "weight_axis": axis,
        "weight": q_value.name,
        "weight_source": source_name(weight),
        "activations": "float",
        **info,
    }
    annotate(node, QUANTIZATION, full)
    return full


def sites_at_opset(model: Model, exclude: list[str] | tuple[str, ...] = ()) -> tuple[list[Linear], list[Node]]:
    """`linear_sites`, with the model first raised to `LOWBIT_OPSET` when there is a layer to quantize (its
    nodes converted: `optc.ir.opset`), so the sites returned are those of the graph `emit` then changes."""
    sites, excluded = linear_sites(model, exclude)
    if sites and ensure_opset(model, LOWBIT_OPSET):
        sites, excluded = linear_sites(model, exclude)  # a conversion may have rebuilt the graph
    return sites, excluded


__all__ = [
    "EXPERTS_NOT_CALIBRATED", "LOWBIT_OPSET", "Experts", "Grid", "Linear", "LowBitOptions", "LowBitPass", "ValuePathOptions", "default_device", "dequantize", "emit", "emit_experts", "expand", "expert_sites", "fake_quantize", "find_params",
    "group_index", "group_size", "linear_site", "linear_sites", "mark_excluded", "matches", "quantize", "rtn",
    "sites_at_opset", "torch_threads",
]


# --------------------------------------------------------------------------- options shared by the passes


@dataclass
class LowBitOptions:
    """Options every weight-only low-bit pass takes."""

    bits: int = option(4, help="bits per weight: 2-8 (stored as int4/uint4 up to 4 bits, int8/uint8 above)")
    group: int = option(128, help="input channels per scale (blocks along K); -1 for one scale per output channel")
    symmetric: bool = option(True, help="symmetric (signed, no zero point; what TensorRT takes); false: uint + zero point")
    clip: bool = option(True, help="search each group's clipping ratio for the least squared weight error (else min-max)")
    exclude: list[str] = option(  # rtn, gptq and awq share these options: their defaults agree
        default_exclude("rtn"), help="ops left in float (node, output, weight or source names; substring or glob)"
    )

    def validate(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"option 'bits' must be 2 to 8, got {self.bits}")
        if self.group not in (-1, 0) and (self.group < 2 or self.group & (self.group - 1)):
            raise ValueError(f"option 'group' must be a power of two of at least 2, or -1 (per channel), got {self.group}")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.symmetric)


@dataclass
class ValuePathOptions(LowBitOptions):
    """The low-bit options plus `ov-bits`, for the calibrated passes (`gptq`, `awq`)."""

    # Issue 16: quantizing one layer at a time on the tiny family models (tools/coverage_matrix.py's
    # models), the value path (v_proj, then o_proj) moved the output most in every family measured;
    # llama.cpp's Q4_K_M likewise gives attn_v more bits. 0 keeps every layer at `bits`.
    ov_bits: int = option(
        0, help="bits of each attention's value path (its v and o projections, found by graph pattern; a fused "
                "qkv counts as v): the OV circuit kept at higher precision; 0: `bits` like every other layer"
    )

    def validate(self) -> None:
        super().validate()
        if self.ov_bits and self.ov_bits not in BITS:
            raise ValueError(f"option 'ov-bits' must be 0 or 2 to 8, got {self.ov_bits}")


# --------------------------------------------------------------------------- the passes' common base


class LowBitPass(Pass):
    """Base of the weight-only low-bit passes (`rtn`, `gptq`, `awq`): finding the layers (the layer
    selector, the opset raise, the remarks), calibration Hessians and emitting the quantized weights."""

    Options: ClassVar[type] = LowBitOptions
    #: What the pass needs from calibration data, for the error line when there is none.
    calibration_need: ClassVar[str] = "calibration statistics"

    def layers(self, model: Model, am: AnalysisManager) -> tuple[list[Linear], list[Node], int]:
        """The layers to quantize (the model raised to `LOWBIT_OPSET` when there is one), those `exclude`
        left out, and how many of those were newly annotated `quant_skipped`; the remarks are emitted."""
        exclude = self.options.exclude
        sites, excluded = sites_at_opset(model, exclude)
        skipped = mark_excluded(excluded, exclude)
        remark_sites(am.context, model, sites, excluded)
        return sites, excluded, skipped

    def expert_layers(self, model: Model, am: AnalysisManager) -> tuple[list[Experts], int]:
        """The stacked mixture-of-experts weights to quantize (the model raised to `LOWBIT_OPSET` when
        there is one), and how many `exclude` left out (annotated `quant_skipped`)."""
        exclude = self.options.exclude
        sites, excluded = expert_sites(model, exclude)
        if sites and ensure_opset(model, LOWBIT_OPSET):
            sites, excluded = expert_sites(model, exclude)
        mark_excluded(excluded, exclude, weight_of=lambda gather: gather.inputs[0])  # GatherND(W, indices)
        if excluded:
            am.context.remark("analysis", f"expert weights left float by exclude: {len(excluded)}")
        return sites, len(excluded)

    def quantize_experts(self, model: Model, am: AnalysisManager, sites: list[Experts], device: torch.device,
                         build: Builder | None = None, not_calibrated: str = "") -> int:
        """Round each expert's weights to nearest on the options' grid (clip search as `clip` says), emit them
        and remark it; returns how many stacked weights were quantized. `not_calibrated`: why the pass's own
        method did not reach the experts (a `missed` remark says they got RTN instead)."""
        opts = self.options
        info: dict = {"clip": opts.clip}
        if not_calibrated:
            info |= {"method": "rtn", "precision_reason": f"not by {self.name}: {not_calibrated}"}
        for site in sites:
            q, scale, zero = rtn(site.matrix(device), opts.group, opts.grid, clip=opts.clip)
            emit_experts(model, site, q, scale, zero, opts.grid, opts.group, {"method": self.name, **info}, build)
        if sites and not_calibrated:
            am.context.remark("missed", f"{len(sites)} stacked mixture-of-experts weights rounded to nearest"
                                        f"{' with clip search' if opts.clip else ''}, not by {self.name}: {not_calibrated}")
        elif sites:
            am.context.remark("passed", f"quantized {len(sites)} stacked mixture-of-experts weights, "
                                        "each expert in groups of its own")
        return len(sites)

    def value_path_grids(self, model: Model, am: AnalysisManager, sites: list[Linear]) -> dict[int, Grid]:
        """The grid of each layer in `sites` that does not take the options' grid (by id of its node): with
        `ov-bits` (`ValuePathOptions`), the v and o projections of every attention core `value_paths` finds
        (a fused qkv counts as v)."""
        opts = self.options
        ov_bits = opts.ov_bits if isinstance(opts, ValuePathOptions) else 0
        if not ov_bits or ov_bits == opts.bits:
            return {}
        nodes = [lin.node for path in value_paths(model) for lin in path if lin is not None]
        return self.layers_at_bits(am, sites, nodes, ov_bits, "ov-bits", "attention block's v/o projection",
                                   "value-path projections")

    def layers_at_bits(self, am: AnalysisManager, sites: list[Linear], nodes: list[Node], bits: int, option: str,
                       missing: str, found: str) -> dict[int, Grid]:
        """`bits` (the options' symmetry) for each of `nodes` among `sites`, by id of the node, as option
        `option` asks: an `analysis` remark says how many (`found`), a `missed` one that there was no `missing`."""
        opts = self.options
        wanted = {id(site.node) for site in sites}
        grid = Grid(bits, opts.symmetric)
        grids = {id(node): grid for node in nodes if id(node) in wanted}
        if not grids:
            am.context.remark("missed", f"{option}={bits}: no {missing} among the layers to quantize; every "
                              f"such layer at {opts.bits} bits")
        else:
            am.context.remark("analysis", f"{option}: {len(grids)} {found} at {bits} bits")
        return grids

    def nothing_quantized(self, model: Model, excluded: list[Node], skipped: int) -> PassResult:
        """The result when no layer is left to quantize (changed only by new `quant_skipped` annotations)."""
        return PassResult(model, skipped > 0, None, {"quantized-ops": 0, "excluded-ops": len(excluded)})

    def calibration_hessians(self, model: Model, am: AnalysisManager, names: list[str]) -> dict:
        """The `hessian` analysis of the activations `names`; one error line when there is no calibration data."""
        return calibration_hessians(model, am, self.name, names, f"{self.calibration_need} from calibration data")

    def emit(self, model: Model, site: Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             info: dict, build: Builder | None = None, grid: Grid | None = None) -> dict:
        """Store one layer's codes with the options' grid (or `grid`) and group (`emit`), annotated with `info`
        and the pass name as `method`; `build` (one per run) owns the fresh names."""
        opts = self.options
        return emit(model, site, q, scale, zero, grid or opts.grid, opts.group, {"method": self.name, **info}, build)
