"""Built-in container passes and named pipelines."""

from optc.passes.infra.pass_manager import Fixpoint
from optc.passes.infra.registry import register_pass, register_pipeline

register_pass("fixpoint")(Fixpoint)

register_pipeline(
    "cleanup",
    "fixpoint(fold-constants,cse,dce),topo-sort",
    "fold constants, merge duplicates and remove dead code until nothing changes",
)

# 8-bit quantization (issue 4). The recipes are what measurements on SmolLM2-135M
# (held-out perplexity against fp32, `optc.evaluate`) found best; see
# passes/transforms/quantize.py and smoothquant.py for the options.
W8A8 = "smoothquant{alpha=0.8},quantize{calib=mse int16=down_proj embeddings=true}"
FP8 = "quantize{weights=fp8 activations=fp8}"

register_pipeline(
    "w8a8",
    W8A8,
    "INT8 weights (per channel) and embeddings (per row), static INT8 activations after SmoothQuant; "
    "FFN down-projection inputs in INT16",
)
register_pipeline("fp8", FP8, "FP8 E4M3 weights (per channel) and static per-tensor FP8 activations")
