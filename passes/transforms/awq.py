"""`awq`: activation-aware weight quantization (Lin et al., AWQ).

Input channels that carry large activations matter most to a layer's output,
so AWQ scales them up in the weight before rounding (their relative rounding
error shrinks) and folds the inverse scale into whatever produces the
activation, which keeps the float function unchanged:

    X·W = (X·diag(1/s))·(diag(s)·W),   s_j = mean|X_j|^α, normalized by √(max s · min s)

For each *group* of linear layers reading one tensor X (q/k/v after a norm,
gate/up after a norm, down after up; found by the same graph patterns as
`smoothquant`, whose matching and folding helpers this pass uses) α is
searched on a grid in [0, 1) for the least output error of the whole group on
the calibration data,

    Σ_layers ‖X·W − (X·diag(1/s))·Q(diag(s)·W)‖²  =  Σ_layers tr(ΔWᵀ · XᵀX · ΔW),

computed exactly from XᵀX (the `hessian` analysis, streamed) and mean|X| per
channel, so no activations are stored. α = 0 (s = 1, plain RTN) is on the
grid: the search never does worse than RTN on the calibration objective (the
search rounds min-max; with `clip` the chosen s is checked once more against
s = 1 under the clipped rounding that is finally used). The
scales are then applied: 1/s into the producer (norm weight and bias, the
`up` projection's columns, or an explicit `Mul` for a post-LN norm output
that the residual also reads), s into the consumers' weight rows.

With `quantize=true` (default) every linear layer is then quantized by RTN
into the IR form of `optc.passes.lowbit`, each group's range (`clip`) searched
for the least error of the layer's output, Δw_gᵀ·(XᵀX)_gg·Δw_g with the XᵀX of
its input after the scaling (AWQ's clipping search, llm-awq `auto_clip`; a
layer calibration did not reach falls back to the least weight error); with
`quantize=false` the weights stay float (rescaled) so another quantizer can
follow: `awq{quantize=false},gptq`.

`ov-bits=N` (shared with `gptq`, `optc.passes.lowbit.ValuePathOptions`): each
attention's value path, its v and o projections (a fused qkv counts as v), is
quantized at N bits, a mixed precision like llama.cpp's Q4_K_M giving `attn_v`
more bits. The α search weighs each layer of a group on its own grid (v at N
bits beside q and k at `bits`). Off (0) by default: `awq` alone is AWQ as
published, every layer at `bits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from optc.errors import OptcError
from optc.ir import Model, annotate
from optc.ir.annotations import AWQ
from optc.ir.patterns.builder import Builder
from optc.passes.infra.analysis import STRUCTURE, AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.lowbit import (
    EXPERTS_NOT_CALIBRATED,
    Grid,
    LowBitPass,
    ValuePathOptions,
    default_device,
    fake_quantize,
    linear_site,
    linear_sites,
    rtn,
    torch_threads,
)
from optc.passes.transforms.smoothquant import (
    S_MAX,
    S_MIN,
    ScaleSite,
    find_groups,
    insert_scale_mul,
    scale_sites,
)


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α normalized by √(max·min), 1 for channels that never fired, clamped like smoothquant."""
    live = mean_abs > 0
    s = torch.ones_like(mean_abs)
    if alpha == 0 or not live.any():
        return s
    s[live] = mean_abs[live].clamp(min=1e-8) ** alpha
    s = s / torch.sqrt(s[live].max() * s[live].min())
    s[~live] = 1.0
    return s.clamp(S_MIN, S_MAX)


def group_error(
    weights: list[torch.Tensor], xtx: torch.Tensor, s: torch.Tensor, group: int, grid: Grid | Sequence[Grid], *,
    clip: bool = False,
) -> float:
    """Σ tr(ΔWᵀ XᵀX ΔW) over the layers (W [N, K]) for scales s: the group's squared output error
    (`clip`: each group's range searched on that output error, as the final rounding does). `grid`: one for
    every layer, or each layer's own (`ov-bits` puts v_proj on another grid than q and k)."""
    total = 0.0
    grids = [grid] * len(weights) if isinstance(grid, Grid) else list(grid)
    scaled_xtx = xtx / torch.outer(s, s) if clip else None  # the scaled layer's input is X·diag(1/s)
    for w, layer_grid in zip(weights, grids, strict=True):
        delta = fake_quantize(w * s, group, layer_grid, clip=clip, hessian=scaled_xtx) / s - w
        total += float(((delta @ xtx) * delta).sum())
    return total


def search_alpha(
    weights: list[torch.Tensor], xtx: torch.Tensor, mean_abs: torch.Tensor, group: int, grid: Grid | Sequence[Grid],
    steps: int,
) -> tuple[float, torch.Tensor, float, float]:
    """The α on [0, 1) with the least group output error: (α, s, its error, the error at α = 0); `grid` as
    in `group_error`."""
    best = (0.0, torch.ones_like(mean_abs), float("inf"))
    base = float("nan")
    for i in range(steps):
        alpha = i / steps
        s = awq_scales(mean_abs, alpha)
        err = group_error(weights, xtx, s, group, grid)
        if i == 0:
            base = err
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], base


@register_pass("awq")
class Awq(LowBitPass):
    """Activation-aware scaling (s = mean|x|^alpha, alpha searched on the group output error), then RTN."""

    calibration_need = "per-channel activation statistics"

    @dataclass
    class Options(ValuePathOptions):
        grid_steps: int = option(20, help="alphas searched: 0, 1/n, ..., (n-1)/n")
        quantize: bool = option(True, help="quantize (RTN) after scaling; false: keep rescaled float weights for gptq")
        insert_mul: bool = option(
            True, help="scale a norm output that also feeds the residual (post-LN BERT) with an explicit Mul"
        )

        def validate(self) -> None:
            super().validate()
            if self.grid_steps < 1:
                raise ValueError(f"option 'grid-steps' must be positive, got {self.grid_steps}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        with torch_threads(default_device()):
            return self._run(model, am)

    def _run(self, model: Model, am: AnalysisManager) -> PassResult:
        opts = self.options
        grid = opts.grid
        groups = find_groups(model, "all", opts.exclude, insert_mul=opts.insert_mul)
        device = default_device()
        # `ov-bits`: the value path's grid, in the α search as in the final rounding (with quantize=false,
        # for the quantizer that follows with the same ov-bits).
        grids = self.value_path_grids(model, am, linear_sites(model, opts.exclude)[0])
        scaled = inserted = copies = 0
        alphas: list[float] = []
        # The inputs of every layer to quantize: the final rounding searches each group's range on the
        # layer's output error (XᵀX), as llm-awq's clipping search does.
        inputs = [site.activation.name for site in linear_sites(model, opts.exclude)[0]] \
            if opts.quantize and opts.clip else []
        #: A consumer's input after scaling (by name) -> (the statistics' name, s): its XᵀX is H / (s·sᵀ).
        rescaled: dict[str, tuple[str, torch.Tensor]] = {}
        hessians = {}
        if groups or inputs:
            hessians = self.calibration_hessians(model, am, [g.value.name for g in groups] + inputs)
        if groups:
            for group in tqdm(groups, desc="awq", unit="group", leave=False, disable=None):
                stats = hessians.get(group.value.name)
                if stats is None or stats.tokens == 0:
                    raise OptcError(f"awq: no calibration data reached {group.value.name!r}")
                sites = [linear_site(node) for node, _ in group.consumers]
                weights = [site.matrix(device) for site in sites]
                layer_grids = [grids.get(id(node), grid) for node, _ in group.consumers]
                xtx = stats.xtx.to(device)
                alpha, s, err, base = search_alpha(weights, xtx, stats.mean_abs().to(device), opts.group,
                                                   layer_grids, opts.grid_steps)
                if opts.clip and opts.quantize and alpha != 0.0:
                    # The search rounds min-max (fast); the final rounding clips: keep s only if it still wins.
                    err = group_error(weights, xtx, s, opts.group, layer_grids, clip=True)
                    base = group_error(weights, xtx, torch.ones_like(s), opts.group, layer_grids, clip=True)
                    if base <= err:
                        alpha, s, err = 0.0, torch.ones_like(s), base
                alphas.append(alpha)
                info = {"alpha": alpha, "producer": group.producer, "input": group.value.name,
                        "error": err, "error_rtn": base}
                for node, _ in group.consumers:
                    annotate(node, AWQ, info)
                if alpha == 0.0:
                    continue
                factor = s.to("cpu", torch.float64).numpy()
                if group.producer == "mul":
                    insert_scale_mul(model.graph, group, 1.0 / factor)
                    inserted += 1
                else:
                    copies += scale_sites(model.graph, group.folds, 1.0 / factor, group.channels)
                copies += scale_sites(model.graph, [ScaleSite(n, 1, a) for n, a in group.consumers], factor, group.channels)
                for node, _ in group.consumers:
                    rescaled[node.inputs[0].name] = (group.value.name, s)
                scaled += 1
        stats_out: dict[str, int | float] = {
            "groups": len(groups), "groups-scaled": scaled, "muls-inserted": inserted, "constants-copied": copies,
            "mean-alpha": float(np.mean(alphas)) if alphas else 0.0,
        }
        if grids:
            stats_out["ov-bits-ops"] = len(grids)
        if not opts.quantize:
            if not groups:
                am.context.remark("missed", "nothing to scale: no linear layer input whose producer can absorb 1/s",
                                  matched_none=True)
            if not scaled:
                return PassResult(model, False, None, stats_out)
            preserved = PreservedAnalyses()
            if not copies and not inserted:
                preserved.preserve_aspects(STRUCTURE)
            return PassResult(model, True, preserved, stats_out)
        sites, excluded, _ = self.layers(model, am)
        expert_sites, experts_excluded = self.expert_layers(model, am)
        build = Builder(model.graph)  # owns the fresh names of everything this run adds
        for site in tqdm(sites, desc="awq quantize", unit="layer", leave=False, disable=None):
            xtx = _input_xtx(site.activation.name, hessians, rescaled, device) if opts.clip else None
            site_grid = grids.get(id(site.node), grid)
            q, scale, zero = rtn(site.matrix(device), opts.group, site_grid, clip=opts.clip, hessian=xtx)
            self.emit(model, site, q, scale, zero, {"clip": "output" if xtx is not None else opts.clip}, build,
                      site_grid)
        experts = self.quantize_experts(model, am, expert_sites, device, build, not_calibrated=EXPERTS_NOT_CALIBRATED)
        stats_out["quantized-ops"] = len(sites) + experts
        stats_out["excluded-ops"] = len(excluded) + experts_excluded
        if experts:
            stats_out["quantized-experts"] = experts
        return PassResult(model, bool(sites) or experts > 0 or scaled > 0, None, stats_out)


def _input_xtx(name: str, hessians: dict, rescaled: dict[str, tuple[str, torch.Tensor]],
               device: torch.device) -> torch.Tensor | None:
    """XᵀX of a layer's input `name` as the model now computes it (after AWQ's scaling), or None when
    calibration did not measure it."""
    source, s = rescaled.get(name, (name, None))
    stats = hessians.get(source)
    if stats is None or stats.tokens == 0:
        return None
    xtx = stats.xtx.to(device)
    return xtx if s is None else xtx / torch.outer(s, s).to(xtx.dtype)


__all__ = ["Awq", "awq_scales", "group_error", "search_alpha"]
