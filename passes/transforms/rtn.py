"""`rtn`: weight-only round-to-nearest quantization to 2–8 bits in groups along the input channels.

Every MatMul/Gemm with a constant float weight (except `exclude`, default the
lm_head) gets its weight replaced by integer codes, a scale per group of
`group` input channels (and a zero point with `symmetric=false`) and a
blocked `DequantizeLinear` feeding the op (the IR form in `optc.passes.lowbit`);
a mixture of experts' stacked weights are quantized the same way, per expert.
With `clip` (default) each group's range is shrunk to the ratio with the least
squared weight error. No calibration data is needed; activations stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from optc.ir import Model
from optc.ir.patterns.builder import Builder
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.pass_base import PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.lowbit import (
    LowBitOptions,
    LowBitPass,
    default_device,
    rtn,
    torch_threads,
)


@register_pass("rtn")
class Rtn(LowBitPass):
    """Weight-only round-to-nearest: int2-int8 weights, a scale per group of input channels, float activations."""

    @dataclass
    class Options(LowBitOptions):
        pass

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        opts = self.options
        sites, excluded, skipped = self.layers(model, am)
        expert_sites, experts_excluded = self.expert_layers(model, am)
        if not sites and not expert_sites:
            return self.nothing_quantized(model, excluded, skipped + experts_excluded)
        device = default_device()
        grid = opts.grid
        build = Builder(model.graph)  # owns the fresh names of everything this run adds
        with torch_threads(device):
            for site in tqdm(sites, desc="rtn", unit="layer", leave=False, disable=None):
                q, scale, zero = rtn(site.matrix(device), opts.group, grid, clip=opts.clip)
                self.emit(model, site, q, scale, zero, {"clip": opts.clip}, build)
            quantized_experts = self.quantize_experts(model, am, expert_sites, device, build)
        stats = {"quantized-ops": len(sites) + quantized_experts, "excluded-ops": len(excluded) + experts_excluded}
        if quantized_experts:
            stats["quantized-experts"] = quantized_experts
        return PassResult(model, True, None, stats)
