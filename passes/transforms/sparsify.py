"""`sparsify`: N:M (2:4, 4:8) or unstructured weight sparsity by magnitude, Wanda or SparseGPT.

Every linear layer (MatMul / Gemm with a constant 2-D weight) is pruned except
those matching `exclude` (default: the lm_head and embedding tables, also a
tied head read through the embedding's alias). Weights are handled as
`[N, K]` (outputs × reduction axis); the N:M groups are M consecutive input
channels along K, the axis TensorRT's sparse tensor cores need (MatMul B
`[K, N]`: axis 0; Gemm with `transB=1`: axis 1).

Methods (`pattern=N:M` keeps at most N non-zeros in each group of M along K;
`pattern=unstructured` zeroes a `sparsity` fraction):

* `magnitude`: score |W|; N:M keeps the N largest of each group, unstructured
  prunes the smallest fraction of the whole matrix.
* `wanda` (Sun et al. 2023): score |W_ij|·‖X_j‖₂ with ‖X_j‖₂² the diagonal of
  the calibration XᵀX (`hessian` analysis); unstructured compares within each
  output row.
* `sparsegpt` (Frantar & Alistarh 2023): the OBS reconstruction with the
  calibration Hessian H = 2XᵀX/n, dampened by `damp`·mean(diag H), through
  the upper Cholesky factor of H⁻¹, processed in blocks of `block-size`
  columns. N:M masks are chosen per row inside each group of M columns when
  the sweep reaches the group (score w²/[H⁻¹]²_jj); unstructured masks are
  chosen adaptively per block. Pruned weights' error is spread onto the not
  yet processed columns.

Each pruned node and its weight are annotated `sparsity` (`optc.ir.annotate`)
with the pattern, the K axis of the stored weight, the method and the achieved
fraction of zeros; `check-sparsity` (and `check_nm_sparsity`) verify the
pattern later, also through DequantizeLinear after quantization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from optc.errors import OptcError
from optc.ir import Model, annotate
from optc.ir.annotations import SPARSITY
from optc.passes.infra.analysis import STRUCTURE, AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.layer_selector import default_exclude
from optc.passes.transforms._structure import (
    Linear,
    calibration_hessians,
    linears,
    select,
    store_nk,
    torch_threads,
)

_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(text: str) -> tuple[int, int] | None:
    """`"2:4"` → (2, 4); `"unstructured"` → None; anything else raises ValueError."""
    if text == "unstructured":
        return None
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"option 'pattern' must be N:M (e.g. 2:4) or unstructured, got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"option 'pattern' {text}: need 0 < N < M")
    return n, m


@register_pass("sparsify")
class Sparsify(Pass):
    """Prune linear weights to N:M along K (2:4 for TensorRT) or unstructured: magnitude, Wanda or SparseGPT."""

    @dataclass
    class Options:
        pattern: str = option("2:4", help="N:M (at most N non-zeros per M consecutive weights along K) or unstructured")
        sparsity: float = option(0.5, help="fraction of weights zeroed with pattern=unstructured")
        method: Literal["magnitude", "wanda", "sparsegpt"] = option("sparsegpt", help="how weights are chosen (and updated)")
        block_size: int = option(128, help="SparseGPT columns per block")
        damp: float = option(0.01, help="SparseGPT dampening: H += damp * mean(diag H) * I")
        include: list[str] = option([], help="only layers whose node/weight/parameter name matches (substring or glob)")
        exclude: list[str] = option(default_exclude("sparsify"), help="layers left dense (the lm_head and embeddings by default)")

        def validate(self) -> None:
            nm = parse_pattern(self.pattern)
            if nm is None and not 0.0 < self.sparsity < 1.0:
                raise ValueError(f"option 'sparsity' must be in (0, 1), got {self.sparsity}")
            if self.block_size < 1 or (nm is not None and self.block_size % nm[1]):
                raise ValueError(f"option 'block-size' must be a positive multiple of M, got {self.block_size}")
            if not 0.0 <= self.damp < 1.0:
                raise ValueError(f"option 'damp' must be in [0, 1), got {self.damp}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        opts = self.options
        nm = parse_pattern(opts.pattern)
        sites = select(model, opts.include, opts.exclude)
        skipped = 0
        if nm is not None:
            kept = [s for s in sites if s.in_features % nm[1] == 0]
            skipped = len(sites) - len(kept)
            if skipped:
                message = f"{len(kept)} of {len(sites)} linear layers matched: K not divisible by M={nm[1]} ({skipped})"
                am.context.remark("missed", message, matched_none=not kept)
            sites = kept
        if not sites and not skipped and not linears(model):
            am.context.remark("missed", "nothing to sparsify: no MatMul/Gemm with a constant float 2-D weight",
                              matched_none=True)
        if not sites:
            return PassResult(model, False, None, {"layers-sparsified": 0, "layers-skipped": skipped})
        hessians = None
        if opts.method != "magnitude":
            hessians = calibration_hessians(model, am, "sparsify")
        with torch_threads():
            zeros, total = self._prune(model, sites, hessians, nm)
        preserved = PreservedAnalyses().preserve_aspects(STRUCTURE)
        counts = {"layers-sparsified": len(sites), "layers-skipped": skipped, "zero-fraction": round(zeros / max(total, 1), 4)}
        return PassResult(model, True, preserved, counts)

    def _prune(self, model: Model, sites: list[Linear], hessians, nm) -> tuple[int, int]:
        from tqdm import tqdm

        opts = self.options
        zeros = total = 0
        for site in tqdm(sites, desc=f"sparsify ({opts.method})", unit="layer", leave=False, disable=None):
            w = torch.from_numpy(site.nk())
            if opts.method == "magnitude":
                pruned = magnitude_prune(w, nm, opts.sparsity)
            else:
                stats = hessians.get(site.activation.name)
                if stats is None or stats.channels != w.shape[1]:
                    raise OptcError(f"sparsify: no calibration statistics for the input of {site.node.name or site.weight.name}")
                if opts.method == "wanda":
                    pruned = wanda_prune(w, torch.diagonal(stats.xtx).cpu(), nm, opts.sparsity)
                else:
                    pruned = sparsegpt_prune(w, stats.hessian().cpu(), nm, opts.sparsity, opts.block_size, opts.damp)
            array = pruned.numpy()
            new = store_nk(model.graph, site, array, "sparse")
            info = {
                "pattern": opts.pattern,
                "axis": site.k_axis,
                "method": opts.method,
                "sparsity": round(float((array == 0).mean()), 6),
            }
            annotate(site.node, SPARSITY, info)
            annotate(new, SPARSITY, info)
            zeros += int((array == 0).sum())
            total += array.size
        return zeros, total


# --------------------------------------------------------------------------- masks


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: the M−N lowest scores of each group of M consecutive columns, per row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def _fraction_mask(score: torch.Tensor, sparsity: float, dim: int | None) -> torch.Tensor:
    """True where pruned: the lowest `sparsity` fraction of the scores, per row (dim=1) or overall (None)."""
    if dim is None:
        k = int(score.numel() * sparsity)
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        if k:
            mask[torch.argsort(score.flatten(), stable=True)[:k]] = True
        return mask.reshape(score.shape)
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], True)
    return mask


def magnitude_prune(w: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
    """Zero the smallest |w|: per group of M along K (N:M), or the smallest fraction of the matrix."""
    score = w.abs()
    mask = _nm_mask(score, *nm) if nm is not None else _fraction_mask(score, sparsity, None)
    return w.masked_fill(mask, 0.0)


def wanda_prune(w: torch.Tensor, x_sq: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
    """Wanda: zero the smallest |W_ij|·‖X_j‖₂ (per group of M along K, or per output row)."""
    score = w.abs() * torch.sqrt(x_sq.to(torch.float32).clamp_min(0)).unsqueeze(0)
    mask = _nm_mask(score, *nm) if nm is not None else _fraction_mask(score, sparsity, 1)
    return w.masked_fill(mask, 0.0)


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    nm: tuple[int, int] | None,
    sparsity: float,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT on `w` `[N, K]` with H `[K, K]`: OBS pruning with error compensation, column blocks."""
    w = w.clone().to(torch.float64)
    h = hessian.clone().to(torch.float64)
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = torch.diagonal(h).mean()
    h += torch.eye(cols, dtype=h.dtype) * (damp * mean_diag)
    try:
        lower = torch.linalg.cholesky(h)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise OptcError(f"sparsify: the Hessian is not positive definite even after dampening ({exc})") from exc
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        err1 = torch.zeros_like(w1)
        if nm is None:
            mask1 = _fraction_mask(w1 ** 2 / d.unsqueeze(0) ** 2, sparsity, None)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                mask1[:, i:i + nm[1]] = _nm_mask(group, *nm)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(torch.float32)


__all__ = ["Sparsify", "magnitude_prune", "parse_pattern", "sparsegpt_prune", "wanda_prune"]
