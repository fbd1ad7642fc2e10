"""Qwen3: Qwen2 without Q/K/V biases, with RMSNorm on each head's queries and keys (llama.cpp's `qwen3`)."""

from optc.architectures.family import Family

FAMILY = Family(name="qwen3", model_types=("qwen3",), task="causal-lm", qk_norm=True, sliding_window=True,
                gguf_arch="qwen3")
