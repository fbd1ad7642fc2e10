"""`gptq`: weight-only quantization that corrects the rounding error with second-order information (Frantar et al., GPTQ).

For each linear layer `Y = X·Wᵀ` (W `[N, K]`) with the Hessian H = 2·XᵀX/n of
its calibrated input (the `hessian` analysis), the columns of W are quantized
one at a time and each column's rounding error is spread over the columns not
yet quantized, weighted by the inverse Hessian (optimal brain surgeon), as
published and as llm-compressor implements it:

1. act-order (`act-order=true`): columns in order of decreasing diag(H); the
   group scales are then computed before the loop from the original weight
   (static groups: no `g_idx`, no runtime reorder); without act-order each
   group's scale is computed from the updated weight when its first column
   is reached;
2. dead columns (diag(H) = 0: an input channel that was always zero): H_ii = 1, W_:i = 0;
3. dampening: H += damp·mean(diag H)·I;
4. Hinv = upper Cholesky factor of H⁻¹ (`cholesky_inverse` of the Cholesky
   factor). If a Cholesky factorization fails, the layer falls back to RTN
   (a warning, and `fallback: rtn` in its annotation);
5. lazy block updates: within a block of `block` columns, for column i:
   q = quant(w_i), err = (w_i − q)/Hinv_ii, W[:, i:] −= err ⊗ Hinv[i, i:];
   after the block, W[:, end:] −= Err·Hinv[block, end:];
6. the permutation is undone.

Group ranges are asymmetric by default (a zero point per group) and clipped by a
grid search of each group's range (`clip`); with `clip-hessian` (default) that search weighs
each input channel's error by diag(H) = E[x²], the error the layer's output sees
when channels are uncorrelated, and `clip-norm` sets the exponent (the GPTQ
reference code's `mse` observer uses |w − q|^2.4).

The loss Σ (w − q)²/Hinv_ii²/2 is reported per layer (`gptq_loss` in the
annotation) and in total. Layers sharing an input (q/k/v, gate/up) share H, its
factorization and one column loop (their rows stacked). Math in torch fp32, on CUDA when available. The output is
the same IR form as `rtn` (integer codes, scales, blocked DequantizeLinear).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from optc.errors import OptcError
from optc.ir import Model, annotation
from optc.ir.annotations import SPARSITY
from optc.ir.patterns.blocks import BlockPartition, Stage
from optc.ir.patterns.builder import Builder
from optc.passes.analyses.hessian import (
    DeferredHessian,
    HessianStats,
    combine_over_ranks,
    require_calibration,
)
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.blockwise import block_partition, run_blocks
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.lowbit import (
    BITS,
    EXPERTS_NOT_CALIBRATED,
    Grid,
    LowBitPass,
    ValuePathOptions,
    default_device,
    dequantize,
    expand,
    find_params,
    group_size,
    quantize,
    rtn,
    torch_threads,
)
from optc.runtime import distributed
from optc.runtime.distributed import share_out
from optc.runtime.runner import release_free_memory

log = logging.getLogger(__name__)


@dataclass
class GptqResult:
    """Integer codes [N, K], scale and zero point [N, G], the loss, and whether RTN was used instead."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    loss: float
    fallback: bool = False
    #: The loss of each row (output channel).
    row_loss: torch.Tensor | None = None


@dataclass
class Factor:
    """What GPTQ needs from one Hessian: the column order, the dead columns and the upper Cholesky factor of H⁻¹."""

    perm: torch.Tensor | None
    dead: torch.Tensor
    hinv: torch.Tensor | None  # None: Cholesky failed


def factor(h: torch.Tensor, *, damp: float = 0.01, act_order: bool = True, overwrite: bool = False) -> Factor:
    """Steps 1-4: act-order permutation, dead columns, dampening and Hinv = chol(H⁻¹)ᵀ (upper).

    With `overwrite=True` (an fp32 `h` the caller no longer needs) the work is done in `h`'s own storage
    (else in one copy of it): the rows are permuted in place (cycle by cycle), the columns a band of rows at a time, and the two
    Cholesky factorizations and the inverse run in place on the column-major view of `h` (LAPACK's own
    layout, so torch makes no [K, K] copy), after the lower triangle is copied over the upper one (the
    factorization of a C-ordered `h` reads its lower triangle). At most one [K, K] matrix and a band are
    alive, which matters for a wide layer (a 1B model's FFN down-projection, K = 5632, is 121 MiB a
    matrix). The result is the same either way, bit for bit."""
    if not overwrite or h.dtype != torch.float32:
        h = h.clone().float()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        _permute(h, perm)
        for start in range(0, h.shape[0], _BAND):
            band = h[start:start + _BAND]
            band.copy_(band.index_select(1, perm))
    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    _lower_to_upper(h)
    f = h.mT  # column-major: with h symmetric, the same matrix
    try:
        torch.linalg.cholesky(f, out=f)
        torch.cholesky_inverse(f, out=f)
        torch.linalg.cholesky(f, upper=True, out=f)
    except torch.linalg.LinAlgError:
        return Factor(perm, dead, None)
    if not _all_finite(f):
        return Factor(perm, dead, None)
    return Factor(perm, dead, f)


def _permute(m: torch.Tensor, perm: torch.Tensor, *, dim: int = 0) -> None:
    """m ← m.index_select(dim, perm) in place (a matrix), following the permutation's cycles with one row
    (or column) of scratch."""
    line = m.select  # line(dim, i): row i (dim 0) or column i (dim 1), a view
    order = perm.tolist()
    done = [False] * len(order)
    for first in range(len(order)):
        if done[first] or order[first] == first:
            continue
        saved = line(dim, first).clone()
        i = first
        while True:
            done[i] = True
            j = order[i]
            if j == first:
                line(dim, i).copy_(saved)
                break
            line(dim, i).copy_(line(dim, j))
            i = j


def _lower_to_upper(h: torch.Tensor) -> None:
    """Copy the lower triangle of the square `h` over its upper one, a band of rows at a time."""
    k = h.shape[0]
    for start in range(0, k, _BAND):
        end = min(start + _BAND, k)
        block = h[start:end, start:end]
        block.copy_(torch.tril(block) + torch.tril(block, -1).mT)
        h[start:end, end:].copy_(h[end:, start:end].mT)


def _all_finite(h: torch.Tensor) -> bool:
    """Whether every element is finite, a band of rows at a time (torch.isfinite of the whole [K, K] matrix
    makes its absolute values and two boolean masks: 212 MiB at K = 5632)."""
    return all(bool(torch.isfinite(h[start:start + _BAND]).all()) for start in range(0, h.shape[0], _BAND))


#: Rows per band when `factor` permutes the columns in place.
_BAND = 256


def gptq_quantize(
    w: torch.Tensor, fac: Factor, group: int, grid: Grid, *, block: int = 128, clip: bool = False,
    keep_zero: torch.Tensor | None = None, importance: torch.Tensor | None = None, norm: float = 2.0,
    reuse: bool = False,
) -> GptqResult:
    """GPTQ of W [N, K] (rows: output channels) given the factored Hessian of its input.

    `reuse=True` (a contiguous fp32 W the caller has no further use for): W's own storage is the working copy
    (its columns permuted in place, cycle by cycle) and takes the codes at the end, in the original column
    order: one [N, K] matrix alive instead of two (the same codes).

    `keep_zero` (bool [N, K]) marks pruned weights: they are quantized to the code of 0 whatever
    the updates brought them to, and their error propagates like any other (as SparseGPT does),
    so a 2:4 or unstructured mask set earlier survives quantization.
    """
    n, k = w.shape
    if fac.hinv is None:
        w = w.clone().float()
        w[:, fac.dead] = 0.0
        q, scale, zero = rtn(w, group, grid, clip=clip)
        return GptqResult(q, scale, zero, float("nan"), fallback=True, row_loss=torch.full((n,), float("nan")))
    # One working copy of W, in column order (the caller's W is left as it was), or, with `reuse`, the caller's
    # W itself, its columns permuted in place: then W is the only [N, K] matrix alive.
    order = fac.perm if fac.perm is not None else torch.arange(k, device=w.device)
    g = group_size(group, k)
    static = fac.perm is not None or g >= k
    groups = -(-k // g)
    own = reuse and w.dtype == torch.float32 and w.is_contiguous()
    if own:
        w[:, fac.dead] = 0.0
        if static:  # from the weight in its own column order, before it is permuted
            scale, zero = find_params(w, group, grid, clip=clip, importance=importance, norm=norm)
        if fac.perm is not None:
            _permute(w, fac.perm, dim=1)
    else:
        w = w.index_select(1, order).float()
        w[:, fac.dead[order]] = 0.0
        if static:
            unpermuted = torch.empty_like(w).index_copy_(1, order, w)
            scale, zero = find_params(unpermuted, group, grid, clip=clip, importance=importance, norm=norm)
            del unpermuted
    if not static:
        scale = torch.ones(n, groups, device=w.device)
        zero = torch.zeros(n, groups, device=w.device)
    mask = keep_zero[:, order] if keep_zero is not None else None
    col_group = (order // g).tolist()
    imp = importance[order] if importance is not None else None
    hinv = fac.hinv
    # Each finished block of columns holds its codes in W's own storage (its float values are not read
    # again), so no second [N, K] matrix is needed for the codes.
    losses = torch.zeros(n, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            grp = col_group[col]
            if not static and col % g == 0:
                s, z = find_params(torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g], -1, grid, clip=clip,
                                   importance=imp[col:col + g] if imp is not None else None, norm=norm)
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            s, z = scale[:, grp], zero[:, grp]
            x = w1[:, i]
            d = h1[i, i]
            qi = quantize(x, s, z, grid)
            if mask is not None:
                qi = torch.where(mask[:, col], quantize(torch.zeros_like(x), s, z, grid), qi)
            q1[:, i] = qi
            e = (x - dequantize(qi, s, z)) / d
            w1[:, i:].sub_(torch.outer(e, h1[i, i:]))
            err1[:, i] = e
        losses += err1.square().sum(dim=1) / 2  # Σ (w − q)² / Hinv_ii² / 2
        w[:, i1:i2] = q1
        if i2 < k:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if own:  # the codes in the original column order, in W's storage
        if fac.perm is not None:
            _permute(w, torch.argsort(fac.perm), dim=1)
        out = w
    else:
        out = torch.empty_like(w).index_copy_(1, order, w)
    del w
    return GptqResult(out, scale, zero, float(losses.sum()), row_loss=losses)


def dequantized(result: GptqResult, group: int) -> torch.Tensor:
    """The float weight [N, K] GPTQ chose."""
    k = result.q.shape[1]
    return dequantize(result.q, expand(result.scale, k, group), expand(result.zero, k, group))


@register_pass("gptq")
class Gptq(LowBitPass):
    """Weight-only GPTQ: columns quantized in order with the Hessian-weighted error spread over the rest."""

    calibration_need = "the Hessian of each layer's input"
    #: The grid of each layer that does not take the options' (by id of its node), set by each `run`.
    _grids: dict[int, Grid] = {}
    #: The statistics of those layers ("ov-bits-ops", "down-bits-ops"), set with `_grids`.
    _grid_counts: dict[str, int] = {}

    @dataclass
    class Options(ValuePathOptions):
        # Asymmetric by default (issue 19): on the development text (stdlib docstrings, calibration on
        # pydoc_data topics) W4 g128 is 1.181x fp32 symmetric, 1.124x asymmetric (tools/bench_quality.py).
        # TensorRT takes the zero points through lower-tensorrt's exact split.
        symmetric: bool = option(False, help="symmetric (signed, no zero point); false (default): uint + zero point per group")
        act_order: bool = option(True, help="quantize columns by decreasing Hessian diagonal (static group scales)")
        damp: float = option(0.01, help="dampening: H += damp * mean(diag H) * I")
        block: int = option(128, help="columns per lazy batch update")
        # Issue 19, chosen on the development text (stdlib docstrings, calibration 32x256 of pydoc_data
        # topics, W4 g128 asymmetric): 1.124x fp32 with the plain range search, 1.073x weighted by diag H.
        clip_hessian: bool = option(
            True, help="with clip: weigh each input channel's error by the Hessian diagonal E[x²] in the range search"
        )
        clip_norm: float = option(2.0, help="with clip: the range search minimizes Σ|w − q|^clip-norm (2.4: the GPTQ code's mse)")
        # Issue 19: llama.cpp's Q3_K mixes keep some FFN down projections at higher bits (Q3_K_M: Q4_K/Q5_K).
        down_bits: int = option(
            0, help="bits of each FFN's down projection (found by graph pattern, as prune-ffn does); 0: `bits`"
        )

        def validate(self) -> None:
            super().validate()
            if not 0.0 < self.damp < 1.0:
                raise ValueError(f"option 'damp' must be in (0, 1), got {self.damp}")
            if self.block < 1:
                raise ValueError(f"option 'block' must be positive, got {self.block}")
            if not 1.0 <= self.clip_norm <= 4.0:
                raise ValueError(f"option 'clip-norm' must be in [1, 4], got {self.clip_norm}")
            if self.down_bits and self.down_bits not in BITS:
                raise ValueError(f"option 'down-bits' must be 0 or 2 to 8, got {self.down_bits}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        sites, excluded, skipped = self.layers(model, am)
        expert_sites, experts_excluded = self.expert_layers(model, am)
        if not sites and not expert_sites:
            return self.nothing_quantized(model, excluded, skipped + experts_excluded)
        self._grids = self._site_grids(model, am, sites)
        device = default_device()
        with torch_threads(device):  # first, so the dense layers' Hessians see the experts' rounding
            experts = self.quantize_experts(model, am, expert_sites, device, not_calibrated=EXPERTS_NOT_CALIBRATED)
        if not sites:
            return self._result(model, sites, excluded, 0.0, 0, experts)
        partition = block_partition(model, am.context)
        if partition is not None:
            with torch_threads(device):
                return self._sequential(model, am, partition, sites, excluded, device, experts)
        hessians = self.calibration_hessians(model, am, [s.activation.name for s in sites])
        with torch_threads(device):
            total, fallbacks = self._quantize(model, sites, hessians, device, Builder(model.graph))
        return self._result(model, sites, excluded, total, fallbacks, experts)

    def _site_grids(self, model: Model, am: AnalysisManager, sites) -> dict[int, Grid]:
        """The grid of each layer that does not take the options' grid (by id of its node): the value path's
        (`ov-bits`, `LowBitPass.value_path_grids`) and, with `down-bits`, the down projection of every FFN
        block `find_ffn` finds."""
        opts = self.options
        grids = self.value_path_grids(model, am, sites)
        counts = {"ov-bits-ops": len(grids)} if grids else {}
        if opts.down_bits and opts.down_bits != opts.bits:
            from optc.passes.transforms.prune_ffn import find_ffn

            down = self.layers_at_bits(am, sites, [block.down.node for block in find_ffn(model)], opts.down_bits,
                                       "down-bits", "FFN down projection", "FFN down projections")
            if down:
                counts["down-bits-ops"] = len(down)
            grids.update(down)
        self._grid_counts = counts
        return grids

    def _grid_of(self, site) -> Grid:
        return self._grids.get(id(site.node), self.options.grid)

    def _result(self, model: Model, sites, excluded, total: float, fallbacks: int, experts: int = 0) -> PassResult:
        stats = {"quantized-ops": len(sites) + experts, "excluded-ops": len(excluded), "rtn-fallbacks": fallbacks, "loss": total}
        stats.update(self._grid_counts)
        if experts:
            stats["quantized-experts"] = experts
        return PassResult(model, True, None, stats)

    def _sequential(self, model: Model, am: AnalysisManager, partition: BlockPartition, sites, excluded,
                    device, experts: int = 0) -> PassResult:
        """True-sequential GPTQ (the reference code's `llama_sequential`): block by block, each block's
        Hessians come from the calibration inputs that the blocks before it, already quantized, computed;
        only one block's Hessians are held at a time."""
        require_calibration(model, am, self.name, f"{self.calibration_need} from calibration data")
        by_stage: dict[str, list] = {}
        for site in sites:
            stage = partition.stage_of(site.activation.name)
            if stage is None:
                raise OptcError(f"gptq: no calibration data reaches {site.activation.name!r}, the input of {site.label}")
            by_stage.setdefault(stage.name, []).append(site)
        stats: dict[str, HessianStats] = {}
        build = Builder(model.graph)
        totals = [0.0, 0]
        # One process: each Hessian keeps its samples' rows while they are smaller than its float64 sum, and
        # forms the fp32 Hessian from them a band at a time (the same bits, without the [K, K] float64 sum).
        # Under torchrun the ranks add float64 sums, so each is accumulated as it comes.
        deferred = not distributed.current().distributed

        def update(name: str, array: np.ndarray) -> None:
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            entry = stats.get(name)
            if entry is None:
                k = int(x.shape[-1])
                entry = stats[name] = DeferredHessian(k, device) if deferred else \
                    HessianStats(torch.zeros(k, k, dtype=torch.float64, device=device))
            entry.update(x)

        def after_stage(stage: Stage) -> bool:
            members = by_stage.get(stage.name)
            if not members:
                return False
            names = list(dict.fromkeys(site.activation.name for site in members))
            mine = {name: stats.pop(name) for name in names if name in stats}
            if distributed.current().distributed:
                mine = combine_over_ranks(mine, names, device)
            for name in mine:  # no loop variable left holding the last Hessian while `_quantize` consumes them
                mine[name].finish()
            release_free_memory()  # the rows and float64 bands `finish` freed
            total, fallbacks = self._quantize(model, members, mine, device, build, consume=True)
            totals[0] += total
            totals[1] += fallbacks
            return True

        run_blocks(model, am.context, partition, [s.activation.name for s in sites], update, after_stage)
        return self._result(model, sites, excluded, totals[0], int(totals[1]), experts)

    def _quantize(self, model: Model, sites, hessians, device, build: Builder, *, consume: bool = False) -> tuple[float, int]:
        """Layers sharing an input share H, so their rows are quantized together as one matrix (the same
        math: GPTQ treats rows independently given H), which halves the column loop on q/k/v and gate/up.
        Returns the total loss and the number of RTN fallbacks.

        `consume=True` (the block path, whose Hessians are this block's own): each Hessian is taken out of
        `hessians` and factored in its own storage, so one layer's [K, K] matrices are alive at a time
        instead of every Hessian of the block plus five copies of one."""
        opts = self.options
        by_input: dict[str, list] = {}
        for site in sites:
            by_input.setdefault(site.activation.name, []).append(site)
        total, fallbacks = 0.0, 0
        progress = tqdm(total=len(sites), desc="gptq", unit="layer", leave=False, disable=None)
        groups = list(by_input.items())
        for name, members in groups:  # (no loop variable holds a Hessian: `consume` frees each one in turn)
            if hessians.get(name) is None or hessians[name].tokens == 0:
                raise OptcError(f"gptq: no calibration data reached {name!r}, the input of {members[0].label}")

        def solve(group: tuple[str, list]) -> tuple[torch.Tensor, ...]:
            name, members = group
            if consume:
                entry = hessians.pop(name)
                h = entry.xtx.to(device=device, dtype=torch.float32).mul_(2.0 / max(entry.tokens, 1))
                del entry
            else:
                h = hessians[name].hessian().to(device)
            importance = torch.diagonal(h).clone() if opts.clip_hessian else None
            fac = factor(h, damp=opts.damp, act_order=opts.act_order, overwrite=consume)
            del h
            # Members on one grid are stacked into one column loop; another grid (ov-bits) gets its own loop
            # over the same factored H. The results are put back in the members' order.
            by_grid: dict[Grid, list[int]] = {}
            for i, site in enumerate(members):
                by_grid.setdefault(self._grid_of(site), []).append(i)
            parts: list = [None] * len(members)
            fallback = False
            for member_grid, indices in by_grid.items():
                sparse = any(annotation(members[i].node, SPARSITY) for i in indices)
                keep_zero = torch.cat([members[i].matrix(device) == 0 for i in indices]) if sparse else None
                # The stacked weight is built in the call (cat copies even one member's): no one else holds it, so
                # gptq_quantize's working copy is the only other one and its storage takes the codes at the end.
                result = gptq_quantize(torch.cat([members[i].matrix(device) for i in indices]), fac, opts.group,
                                       member_grid, block=opts.block, clip=opts.clip, keep_zero=keep_zero,
                                       importance=importance, norm=opts.clip_norm, reuse=True)
                fallback = fallback or result.fallback
                stacked_rows = sum(members[i].out_features for i in indices)
                row_loss = result.row_loss if result.row_loss is not None else torch.zeros(stacked_rows)
                row = 0
                for i in indices:
                    rows = slice(row, row + members[i].out_features)
                    row += members[i].out_features
                    parts[i] = (result.q[rows], result.scale[rows], result.zero[rows], row_loss[rows])
                del result
            # One part (a layer of its own, or members on one grid) is used as it is: no copy of the codes.
            q, scale, zero, row_loss = parts[0] if len(parts) == 1 else (torch.cat([p[j] for p in parts]) for j in range(4))
            del parts
            return q, scale, zero, row_loss, torch.tensor([float(fallback)])

        # Under torchrun each rank solves every N-th group and the results are broadcast (share_out).
        for (_, members), (q, scale, zero, row_loss, fallback) in zip(groups, share_out(groups, solve), strict=True):
            row = 0
            for site in members:
                rows = slice(row, row + site.out_features)
                row += site.out_features
                info: dict = {"act_order": opts.act_order, "damp": opts.damp, "clip": opts.clip}
                if opts.clip:
                    info.update(clip_hessian=opts.clip_hessian, clip_norm=opts.clip_norm)
                if bool(fallback[0]):
                    log.warning("gptq: Cholesky factorization failed for %s; quantized with RTN", site.label)
                    info["fallback"] = "rtn"
                    fallbacks += 1
                else:
                    loss = float(row_loss[rows].sum())
                    info["gptq_loss"] = loss
                    total += loss
                self.emit(model, site, q[rows], scale[rows], zero[rows], info, build, self._grid_of(site))
                progress.update()
            del q, scale, zero, row_loss, fallback  # not alive while the next group is solved
            if consume:
                release_free_memory()
        progress.close()
        return total, fallbacks

__all__ = ["Factor", "Gptq", "GptqResult", "dequantized", "factor", "gptq_quantize"]
