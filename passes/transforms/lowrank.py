"""`lowrank`: replace a linear layer's weight by two thinner factors from a truncated SVD.

For `Y = X·B` with B `[K, N]` (MatMul; Gemm weights are read in their
layout), B ≈ A·C with A `[K, r]` and C `[r, N]`; the graph becomes
`MatMul(X, A)` followed by the original op reading C (a Gemm keeps its bias
and attributes). A layer is factored only where it saves parameters,
r·(K + N) < K·N.

The rank is `rank` when set, else per layer the smallest r whose singular
values hold an `energy` fraction of Σσ². With `whiten=true` the SVD is
activation-aware (SVD-LLM style): with LLᵀ = XᵀX from the `hessian` analysis
(dampened by `damp`·mean diag), the SVD of LᵀB minimizes ‖X·B − X·B̂‖ rather
than ‖B − B̂‖, and A = L⁻ᵀ·U_r·Σ_r. Default scope: every linear layer but
the lm_head and embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from optc.ir import Model, Shape, annotate, constant_array
from optc.ir.annotations import LOWRANK, PROVENANCE
from optc.ir.patterns.builder import Builder
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.layer_selector import default_exclude
from optc.passes.transforms._structure import (
    Linear,
    calibration_hessians,
    drop_unused_initializers,
    linears,
    select,
    set_constant,
    torch_threads,
)


@register_pass("lowrank")
class LowRank(Pass):
    """Split linear weights into two low-rank factors (truncated SVD, optionally activation-aware)."""

    @dataclass
    class Options:
        rank: int = option(0, help="fixed rank per layer (0: choose per layer from energy)")
        energy: float = option(0.9, help="keep the smallest rank whose singular values hold this fraction of sum(s^2)")
        whiten: bool = option(False, help="activation-aware SVD, whitened by the calibration X^T X")
        damp: float = option(0.01, help="whitening dampening: X^T X + damp * mean(diag) * I")
        include: list[str] = option([], help="only layers whose node/weight/parameter name matches (substring or glob)")
        exclude: list[str] = option(default_exclude("lowrank"), help="layers left alone (the lm_head and embeddings by default)")

        def validate(self) -> None:
            if self.rank < 0:
                raise ValueError(f"option 'rank' must be >= 0, got {self.rank}")
            if not 0.0 < self.energy <= 1.0:
                raise ValueError(f"option 'energy' must be in (0, 1], got {self.energy}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        opts = self.options
        sites = select(model, opts.include, opts.exclude)
        if not sites:
            if not linears(model):
                am.context.remark("missed", "nothing to factor: no MatMul/Gemm with a constant float 2-D weight",
                                  matched_none=True)
            return PassResult(model, False, None, {"layers-factored": 0})
        hessians = calibration_hessians(model, am, "lowrank") if opts.whiten else {}
        from tqdm import tqdm

        build = Builder(model.graph)  # owns the fresh names of everything this run adds
        factored = saved = 0
        for site in tqdm(sites, desc="lowrank", unit="layer", leave=False, disable=None):
            b = site.nk().T.astype(np.float64)  # [K, N]
            stats = hessians.get(site.activation.name) if opts.whiten else None
            with torch_threads():
                a, c = factorize(b, opts.rank, opts.energy, stats.xtx.double().cpu() if stats is not None else None, opts.damp)
            k, n = b.shape
            r = a.shape[1]
            if r * (k + n) >= k * n:
                continue
            _rewrite(build, site, a, c)
            factored += 1
            saved += k * n - r * (k + n)
        if factored < len(sites):
            rank = f"rank={opts.rank}" if opts.rank else f"the rank keeping energy={opts.energy:g}"
            message = f"{factored} of {len(sites)} linear layers factored: {rank} would save no parameters"
            am.context.remark("missed" if not factored else "analysis", message, matched_none=not factored)
        if not factored:
            return PassResult(model, False, None, {"layers-factored": 0})
        drop_unused_initializers(model.graph)
        return PassResult(model, True, None, {"layers-factored": factored, "parameters-saved": saved})


def factorize(
    b: np.ndarray, rank: int, energy: float, xtx: torch.Tensor | None = None, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """B `[K, N]` ≈ A `[K, r]` · C `[r, N]` (whitened by XᵀX when given); r = rank, or from the energy."""
    w = torch.from_numpy(b)
    lower = None
    if xtx is not None:
        h = xtx.clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        h += torch.eye(h.shape[0], dtype=h.dtype) * (damp * torch.diagonal(h).mean())
        lower = torch.linalg.cholesky(h)
        w = lower.T @ w
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if rank:
        r = min(rank, s.numel())
    else:
        cumulative = torch.cumsum(s ** 2, 0) / torch.clamp((s ** 2).sum(), min=1e-300)
        r = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
        r = min(max(r, 1), s.numel())
    a = u[:, :r] * s[:r]
    if lower is not None:
        a = torch.linalg.solve_triangular(lower.T, a, upper=True)
    return a.numpy(), vh[:r].numpy()


def _rewrite(build: Builder, site: Linear, a: np.ndarray, c: np.ndarray) -> None:
    node = site.node
    dtype = constant_array(site.weight).dtype
    base = site.weight.name or "weight"
    a_value = build.initializer(f"{base}_lowrank_a", np.ascontiguousarray(a.astype(dtype)))
    first = build.node("MatMul", [site.activation, a_value], name=f"{base}_lowrank", outputs=[f"{base}_lowrank_h"])
    h = first.outputs[0]
    if site.activation.dtype is not None:
        h.dtype = site.activation.dtype
    if site.activation.shape is not None:
        h.shape = Shape([*list(site.activation.shape)[:-1], a.shape[1]])
    annotate(first, PROVENANCE, "lowrank")
    build.graph.insert_before(node, [first])
    node.replace_input_with(0, h)
    stored = c if site.k_axis == 0 else c.T  # MatMul/Gemm B [r, N]; Gemm transB [N, r]
    set_constant(build, node, 1, np.ascontiguousarray(stored.astype(dtype)), "lowrank_b")
    annotate(node, LOWRANK, {"rank": int(a.shape[1]), "in": int(a.shape[0]), "out": int(c.shape[1])})


__all__ = ["LowRank", "factorize"]
