"""Gemma 3 (text): Gemma 2's layout with QK-norm and local/global rope bases."""

from optc.architectures.family import Family

FAMILY = Family(name="gemma3_text", model_types=("gemma3_text",), task="causal-lm", norm_offset=True,
                embedding_scale=True, tied_head=True, sliding_window=True, qk_norm=True, gguf_arch="gemma3")
