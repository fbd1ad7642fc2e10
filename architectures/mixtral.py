"""Mixtral: Mistral with mixture-of-experts MLPs (a router `block_sparse_moe.gate` and per-expert projections)."""

from optc.architectures.family import Family

FAMILY = Family(
    name="mixtral", model_types=("mixtral",), task="causal-lm", sliding_window=True, moe=True, gguf_arch="llama",
    keep_float=("lm_head", "*.gate.weight"),
    notes=("the experts are one stacked weight each (gathered per token), which the weight passes do not rewrite",),
)
