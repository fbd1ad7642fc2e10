"""Qwen3-MoE: Qwen3 with mixture-of-experts MLPs (router `mlp.gate`), llama.cpp's `qwen3moe`."""

from optc.architectures.family import Family

FAMILY = Family(
    name="qwen3_moe", model_types=("qwen3_moe",), task="causal-lm", qk_norm=True, moe=True, sliding_window=True,
    gguf_arch="qwen3moe", keep_float=("lm_head", "*.gate.weight"),
    notes=("the experts are one stacked weight each (gathered per token), which the weight passes do not rewrite",),
)
