"""Gemma 2: RMSNorm with the +1 offset, sqrt(hidden) embedding scale, tied head, four norms per layer, GeGLU,
alternating sliding-window layers, logit soft-capping."""

from optc.architectures.family import Family

FAMILY = Family(name="gemma2", model_types=("gemma2",), task="causal-lm", norm_offset=True, embedding_scale=True,
                tied_head=True, sliding_window=True, gguf_arch="gemma2")
